//! The daemon: reconciles the state directory, starts serving and the control socket, answers
//! requests, and shuts down cleanly on SIGTERM or SIGINT.
//!
//! A shutdown stops serving but keeps every fork record: VMMs still running keep their
//! references, and the next start reconciles them (detached if alive, reaped if gone).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};

use crate::config::Config;
use crate::control::protocol::{ControlError, ErrorCode, Request};
use crate::control::{ControlServer, Handler};
use crate::errors::error_chain;
use crate::file_users::FileUserInfo;
use crate::fuse::FuseView;
use crate::ids::Id;
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::registry::{ForkInfo, ForkState, Registry, RegistryError};
use crate::serve::session::ServeOptions;
use crate::serve::{ServeError, Server};
use crate::store::{Store, StoreError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be opened.
    #[error("cannot open the state directory")]
    State(#[source] StoreError),
    /// Reconciling the state directory failed.
    #[error("cannot reconcile the state directory")]
    Reconcile(#[source] LifecycleError),
    /// A snapshot or fork given on the command line could not be set up.
    #[error("cannot set up `{id}` from the command line")]
    CommandLine {
        /// The snapshot or fork.
        id: Id,
        /// Why.
        #[source]
        source: LifecycleError,
    },
    /// Serving threads could not start.
    #[error("cannot start serving")]
    Serve(#[source] std::io::Error),
    /// The control group does not exist.
    #[error("unknown control group `{0}`")]
    Group(String),
    /// The control socket could not be bound.
    #[error("cannot listen on control socket {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The FUSE view could not be mounted.
    #[error("cannot mount the FUSE view of memory files")]
    Fuse(#[source] crate::fuse::FuseError),
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

/// The longest `fork.wait` allowed.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// How often processes that only map a memory file (passthrough) are checked for having let go.
const FILE_USER_RECHECK: Duration = Duration::from_secs(1);

impl From<LifecycleError> for ControlError {
    fn from(e: LifecycleError) -> Self {
        let code = match &e {
            LifecycleError::NotFound { .. } => ErrorCode::NotFound,
            LifecycleError::Exists { .. }
            | LifecycleError::InUse { .. }
            | LifecycleError::DeletePending(_) => ErrorCode::Conflict,
            LifecycleError::BadPath { .. } | LifecycleError::Snapshot(_) => {
                ErrorCode::InvalidArgument
            }
            LifecycleError::Registry(RegistryError::NoFork(_) | RegistryError::NoSnapshot(_)) => {
                ErrorCode::NotFound
            }
            LifecycleError::Registry(RegistryError::Exists { .. }) => ErrorCode::Conflict,
            LifecycleError::Registry(RegistryError::WaitTimedOut { .. }) => ErrorCode::Unavailable,
            LifecycleError::Serve(ServeError::SocketPathTooLong(_)) => ErrorCode::InvalidArgument,
            LifecycleError::Serve(ServeError::Stopped | ServeError::TooManyForks { .. }) => {
                ErrorCode::Unavailable
            }
            LifecycleError::Store(s) if s.source.kind() == std::io::ErrorKind::StorageFull => {
                ErrorCode::Unavailable
            }
            LifecycleError::CountsUnknown { .. }
            | LifecycleError::Broken { .. }
            | LifecycleError::Store(_)
            | LifecycleError::Serve(_) => ErrorCode::Internal,
        };
        ControlError::new(code, error_chain(&e))
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))
}

/// The running daemon, as the control socket sees it.
#[derive(Debug)]
pub struct Daemon {
    lifecycle: Arc<Lifecycle>,
    started: Instant,
}

/// One entry of `fork.list`: a uffd fork, or a process holding a memory file on the FUSE mount.
#[derive(Debug, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ForkListEntry {
    Uffd(Box<ForkInfo>),
    File(FileUserInfo),
}

impl Daemon {
    fn status(&self) -> Result<Value, ControlError> {
        let registry = self.lifecycle.registry();
        let forks = registry.forks();
        let count = |state| forks.iter().filter(|f| f.status().state == state).count();
        let (damaged, unreadable) = self.lifecycle.problems()?;
        let server = self.lifecycle.server();
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "healthy": damaged.is_empty() && unreadable.is_empty(),
            "state_dir": self.lifecycle.store().root(),
            "workers": server.worker_count(),
            "worker_sessions": server.worker_loads(),
            "snapshots": registry.snapshots().len(),
            "forks": {
                "waiting": count(ForkState::Waiting),
                "serving": count(ForkState::Serving),
                "detached": count(ForkState::Detached),
                "ended": count(ForkState::Ended),
            },
            "damaged_snapshots": damaged,
            "unreadable_fork_records": unreadable,
            "open_fds": crate::sys::open_fd_count().ok(),
            "fuse": self.lifecycle.fuse_mount().map(|mount| json!({
                "mountpoint": mount.path,
                "read_path": format!("{:?}", mount.read_path).to_lowercase(),
                "file_users": self.lifecycle.file_users().list().len(),
            })),
        }))
    }
}

impl Handler for Daemon {
    fn handle(&self, request: Request) -> Result<Value, ControlError> {
        let lc = &self.lifecycle;
        match request {
            Request::Status {} => self.status(),
            Request::Stats {} => to_value(json!({
                "forks": lc.registry().forks().len(),
                "totals": lc.totals(),
            })),
            Request::SnapshotRegister { snapshot, path } => {
                to_value(lc.register_snapshot(snapshot, &path)?)
            }
            Request::SnapshotDelete { snapshot, defer } => {
                to_value(lc.delete_snapshot(&snapshot, defer)?)
            }
            Request::SnapshotList {} => to_value(lc.snapshots()?),
            Request::SnapshotGet { snapshot } => to_value(lc.snapshot(&snapshot)?),
            Request::ForkCreate { snapshot, fork } => to_value(lc.create_fork(fork, &snapshot)?),
            Request::ForkList {} => {
                let forks = lc.registry().forks();
                let uffd = forks.iter().map(|f| f.info());
                let files = lc.file_users().list();
                to_value(
                    uffd.map(|f| ForkListEntry::Uffd(Box::new(f)))
                        .chain(files.into_iter().map(ForkListEntry::File))
                        .collect::<Vec<_>>(),
                )
            }
            Request::ForkGet { fork } => {
                let fork = lc
                    .registry()
                    .fork(&fork)
                    .map_err(|e| ControlError::new(ErrorCode::NotFound, e.to_string()))?;
                to_value(fork.info())
            }
            Request::ForkWait {
                fork,
                state,
                timeout_ms,
            } => {
                let timeout = timeout_ms
                    .map_or(DEFAULT_WAIT, Duration::from_millis)
                    .min(MAX_WAIT);
                to_value(lc.wait_fork(&fork, state, timeout)?)
            }
            Request::ForkClose { fork } => to_value(lc.close_fork(&fork)?),
        }
    }
}

fn group_id(name: &str) -> Result<u32, DaemonError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(DaemonError::Group(name.to_owned())),
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

    let control_gid = config.control_group.as_deref().map(group_id).transpose()?;
    let store = Store::open(&config.state_dir).map_err(DaemonError::State)?;
    let registry = Arc::new(Registry::new());
    let options = ServeOptions {
        fault_around_pages: config.fault_around,
        spin: Duration::from_micros(config.spin_us),
        max_forks: usize::try_from(config.max_forks).unwrap_or(usize::MAX),
    };
    let server = Server::start(
        registry.clone(),
        config.worker_count(),
        options,
        config.handoff_timeout(),
    )
    .map_err(DaemonError::Serve)?;
    let lifecycle = Arc::new(Lifecycle::new(store, registry.clone(), server));

    // Serving threads report attach and end here; disk writes happen off their threads.
    let (events, inbox) = mpsc::channel();
    registry.set_event_sink(events);
    let janitor = {
        let lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("pagerd-lifecycle".into())
            .spawn(move || loop {
                match inbox.recv_timeout(FILE_USER_RECHECK) {
                    Ok(event) => lifecycle.on_event(event),
                    Err(mpsc::RecvTimeoutError::Timeout) => lifecycle.recheck_file_users(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            })
            .map_err(DaemonError::Serve)?
    };

    lifecycle.reconcile().map_err(DaemonError::Reconcile)?;
    for (id, path) in &config.snapshots {
        if lifecycle.snapshot(id).is_err() {
            lifecycle
                .register_snapshot(id.clone(), path)
                .map_err(|source| DaemonError::CommandLine {
                    id: id.clone(),
                    source,
                })?;
        }
    }
    for (id, snapshot) in &config.forks {
        if registry.fork(id).is_err() {
            lifecycle
                .create_fork(Some(id.clone()), snapshot)
                .map_err(|source| DaemonError::CommandLine {
                    id: id.clone(),
                    source,
                })?;
        }
    }
    let fuse = config
        .fuse_options()
        .map(|options| FuseView::mount(lifecycle.clone(), &options))
        .transpose()
        .map_err(DaemonError::Fuse)?;
    let daemon = Arc::new(Daemon {
        lifecycle: lifecycle.clone(),
        started: Instant::now(),
    });
    let control_path = config.control_socket();
    let mut control = ControlServer::start(
        &control_path,
        daemon,
        Duration::from_millis(config.control_idle_timeout_ms),
        control_gid,
    )
    .map_err(|source| DaemonError::Control {
        path: control_path.clone(),
        source,
    })?;
    tracing::info!(control = %control_path.display(), workers = lifecycle.server().worker_count(), "pagerd ready");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "pagerd ready control={}", control_path.display());
    let _ = stdout.flush();
    drop(stdout);

    let signal = signals.wait().map_err(DaemonError::Signals)?;
    tracing::info!(signal = ?signal, "shutting down; fork records are kept for the next start");
    control.stop();
    if let Some(fuse) = fuse {
        fuse.unmount();
    }
    registry.clear_event_sink();
    let _ = janitor.join();
    lifecycle.server().shutdown();
    for fork in registry.forks() {
        let _ = std::fs::remove_file(fork.handoff_socket());
    }
    Ok(())
}
