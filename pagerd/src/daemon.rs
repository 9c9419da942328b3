//! The daemon: opens snapshots, starts serving and the control socket, answers requests, and
//! shuts down cleanly on SIGTERM or SIGINT.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};

use crate::config::Config;
use crate::control::protocol::{ControlError, ErrorCode, Request};
use crate::control::{ControlServer, Handler};
use crate::ids::Id;
use crate::registry::{ForkState, Registry, RegistryError};
use crate::serve::session::ServeOptions;
use crate::serve::{ServeError, Server};
use crate::snapshot::{Snapshot, SnapshotError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The runtime directory could not be made.
    #[error("cannot create run directory {path}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot given on the command line could not be opened.
    #[error("cannot open snapshot `{id}`")]
    Snapshot {
        /// The snapshot.
        id: Id,
        /// Why.
        #[source]
        source: SnapshotError,
    },
    /// Two snapshots or forks share an id.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Serving threads could not start.
    #[error("cannot start serving")]
    Serve(#[source] std::io::Error),
    /// A fork given on the command line could not be created.
    #[error("cannot create fork `{id}`")]
    Fork {
        /// The fork.
        id: Id,
        /// Why.
        #[source]
        source: ServeError,
    },
    /// The control socket could not be bound.
    #[error("cannot listen on control socket {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signals could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
}

/// Sets up logging to stderr; `PAGERD_LOG` overrides `default_filter`.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PAGERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The running daemon, as the control socket sees it.
#[derive(Debug)]
pub struct Daemon {
    registry: Arc<Registry>,
    server: Server,
    started: Instant,
    next_fork: AtomicU64,
}

/// The longest `fork.wait` allowed.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

impl From<RegistryError> for ControlError {
    fn from(e: RegistryError) -> Self {
        let code = match &e {
            RegistryError::NoSnapshot(_) | RegistryError::NoFork(_) => ErrorCode::NotFound,
            RegistryError::Exists { .. } => ErrorCode::Conflict,
            RegistryError::WaitTimedOut { .. } => ErrorCode::Unavailable,
        };
        ControlError::new(code, e.to_string())
    }
}

impl From<ServeError> for ControlError {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Registry(r) => r.into(),
            ServeError::SocketPathTooLong(_) => {
                ControlError::new(ErrorCode::InvalidArgument, e.to_string())
            }
            ServeError::Stopped => ControlError::new(ErrorCode::Unavailable, e.to_string()),
            ServeError::Bind { .. } => {
                ControlError::new(ErrorCode::Internal, crate::serve::acceptor::error_chain(&e))
            }
        }
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))
}

impl Daemon {
    fn generated_fork_id(&self) -> Id {
        loop {
            let n = self.next_fork.fetch_add(1, Ordering::Relaxed);
            let id: Id = format!("fork-{n}")
                .parse()
                .expect("generated ids are valid");
            if self.registry.fork(&id).is_err() {
                return id;
            }
        }
    }

    fn status(&self) -> Value {
        let forks = self.registry.forks();
        let count = |state| forks.iter().filter(|f| f.status().state == state).count();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "workers": self.server.worker_count(),
            "worker_sessions": self.server.worker_loads(),
            "snapshots": self.registry.snapshots().len(),
            "forks": {
                "waiting": count(ForkState::Waiting),
                "serving": count(ForkState::Serving),
                "ended": count(ForkState::Ended),
            },
            "open_fds": crate::sys::open_fd_count().ok(),
        })
    }
}

impl Handler for Daemon {
    fn handle(&self, request: Request) -> Result<Value, ControlError> {
        match request {
            Request::Status {} => Ok(self.status()),
            Request::SnapshotList {} => {
                let infos: Vec<_> = self
                    .registry
                    .snapshots()
                    .iter()
                    .map(|s| self.registry.snapshot_info(s))
                    .collect();
                to_value(infos)
            }
            Request::SnapshotGet { snapshot } => {
                let snapshot = self.registry.snapshot(&snapshot)?;
                to_value(self.registry.snapshot_info(&snapshot))
            }
            Request::ForkCreate { snapshot, fork } => {
                let id = fork.unwrap_or_else(|| self.generated_fork_id());
                to_value(self.server.create_fork(id, &snapshot)?.info())
            }
            Request::ForkList {} => to_value(
                self.registry
                    .forks()
                    .iter()
                    .map(|f| f.info())
                    .collect::<Vec<_>>(),
            ),
            Request::ForkGet { fork } => to_value(self.registry.fork(&fork)?.info()),
            Request::ForkWait {
                fork,
                state,
                timeout_ms,
            } => {
                let timeout = timeout_ms
                    .map_or(DEFAULT_WAIT, Duration::from_millis)
                    .min(MAX_WAIT);
                to_value(self.registry.wait_for_state(&fork, state, timeout)?.info())
            }
            Request::ForkClose { fork } => to_value(self.server.close_fork(&fork)?.info()),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Block the shutdown signals before any thread starts, so every thread inherits the mask
    // and only the main thread's `sigwait` sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(DaemonError::Signals)?;

    std::fs::create_dir_all(&config.run_dir).map_err(|source| DaemonError::RunDir {
        path: config.run_dir.clone(),
        source,
    })?;
    let registry = Arc::new(Registry::new());
    for (id, path) in &config.snapshots {
        let snapshot =
            Snapshot::open(id.clone(), path).map_err(|source| DaemonError::Snapshot {
                id: id.clone(),
                source,
            })?;
        tracing::info!(snapshot = %id, path = %path.display(), size = snapshot.size(),
            zero_pages = snapshot.zero_page_count(), "snapshot opened");
        registry.add_snapshot(snapshot)?;
    }
    let options = ServeOptions {
        fault_around_pages: config.fault_around,
        spin: Duration::from_micros(config.spin_us),
    };
    let server = Server::start(
        registry.clone(),
        config.worker_count(),
        &config.run_dir.join("forks"),
        options,
        config.handoff_timeout(),
    )
    .map_err(DaemonError::Serve)?;
    let daemon = Arc::new(Daemon {
        registry,
        server,
        started: Instant::now(),
        next_fork: AtomicU64::new(1),
    });
    for (id, snapshot) in &config.forks {
        daemon
            .server
            .create_fork(id.clone(), snapshot)
            .map_err(|source| DaemonError::Fork {
                id: id.clone(),
                source,
            })?;
    }
    let control_path = config.control_socket();
    let mut control = ControlServer::start(
        &control_path,
        daemon.clone(),
        Duration::from_millis(config.control_idle_timeout_ms),
    )
    .map_err(|source| DaemonError::Control {
        path: control_path.clone(),
        source,
    })?;
    tracing::info!(control = %control_path.display(), workers = daemon.server.worker_count(), "pagerd ready");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "pagerd ready control={}", control_path.display());
    let _ = stdout.flush();
    drop(stdout);

    let signal = signals.wait().map_err(DaemonError::Signals)?;
    tracing::info!(signal = ?signal, "shutting down");
    control.stop();
    daemon.server.shutdown();
    for fork in daemon.registry.forks() {
        let _ = std::fs::remove_file(fork.handoff_socket());
    }
    Ok(())
}
