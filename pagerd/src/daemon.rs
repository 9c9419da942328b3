//! The daemon: reconciles the state directory, starts serving and the control socket, answers
//! requests, and shuts down cleanly on SIGTERM or SIGINT.
//!
//! A shutdown stops serving but keeps every fork record: VMMs still running keep their
//! references, and the next start reconciles them (taken back and served if alive, reaped if
//! gone). SIGUSR2 or `daemon.upgrade` stops the same way and then executes the new program in
//! place ([`crate::upgrade`]).
//!
//! Before anything else the umask becomes 077 and the state directory is brought to the
//! access policy (`--group`, [`crate::access`]). A lifecycle thread records what serving
//! threads report and, about once a second, checks file users and the memory files of every
//! snapshot.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::access::{self, Access};
use crate::config::{Config, LogFormat};
use crate::control::{ControlOptions, ControlServer, Dispatcher};
use crate::fuse::FuseView;
use crate::lifecycle::{Lifecycle, LifecycleError, MemoryFiles, RecordJournal};
use crate::metrics::MetricsServer;
use crate::notify;
use crate::registry::Registry;
use crate::serve::session::ServeOptions;
use crate::serve::Server;
use crate::store::import::ImportMode;
use crate::store::{Store, StoreError};
use crate::upgrade::{self, Upgrade, UPGRADE_SIGNAL};
use crate::vms::{VmOptions, Vms};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
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
        id: String,
        /// Why.
        #[source]
        source: LifecycleError,
    },
    /// Serving threads could not start.
    #[error("cannot start serving")]
    Serve(#[source] std::io::Error),
    /// The group does not exist.
    #[error("unknown group `{0}`")]
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
    /// The current directory is needed to make a relative path absolute, and is gone.
    #[error("cannot make the configured paths absolute")]
    Paths(#[source] std::io::Error),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics at {0}")]
    Metrics(String, #[source] std::io::Error),
    /// The launched VMs could not be taken up.
    #[error("cannot take up the launched VMs")]
    Vms(#[source] crate::vms::VmError),
    /// Signals could not be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    /// Neither the new program nor the old one could be executed for an upgrade.
    #[error("cannot execute the new program, nor the old one")]
    Upgrade(#[source] std::io::Error),
    /// The directory of the jails cannot be made.
    #[error("cannot make the jails' directory {0}")]
    Jail(PathBuf, #[source] std::io::Error),
}

/// Sets up logging to stderr: `RUST_LOG` overrides `default_filter`.
pub(crate) fn init_logging(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// How often processes that only map a memory file (passthrough) are checked for having let
/// go, and memory files for having changed.
const JANITOR_PERIOD: Duration = Duration::from_secs(1);

/// How long an upgrade waits for control requests under way to be answered.
const CONTROL_GRACE: Duration = Duration::from_millis(500);

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
pub(crate) fn run(mut config: Config) -> Result<(), DaemonError> {
    let began = Instant::now();
    config.make_paths_absolute().map_err(DaemonError::Paths)?;
    // Before any thread starts: it edits the environment.
    let inherited_control = upgrade::inherited_control(&config.control_socket());
    let inherited_handoffs =
        upgrade::inherited_handoffs(&config.state_dir.join(crate::store::SOCKETS_DIR));
    let configured_program = upgrade::configured_program();
    // Block the shutdown signals before any thread starts, so every thread inherits the mask
    // and only the main thread's `sigwait` sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(UPGRADE_SIGNAL);
    signals.thread_block().map_err(DaemonError::Signals)?;

    access::restrict_umask();
    crate::spare_fd::raise_descriptor_limit();
    let group = config.group.as_deref().map(group_id).transpose()?;
    let access = Access::new(group);
    let store = Store::open_with(&config.state_dir, access).map_err(DaemonError::State)?;
    let registry = Arc::new(Registry::new());
    let options = ServeOptions {
        fault_around_pages: config.fault_around,
        spin: Duration::from_micros(config.spin_us),
        fork_quota: crate::owners::ForkQuota {
            max: usize::try_from(config.max_forks).unwrap_or(usize::MAX),
            per_uid: usize::try_from(config.max_forks_per_uid).unwrap_or(usize::MAX),
        },
        record_forks: config.record_forks,
        record_window: Duration::from_secs(config.record_secs),
        replay_nice: config.replay_nice,
    };
    // Serving threads report attach and end here; disk writes happen off their threads.
    let (events, inbox) = mpsc::channel();
    let journal = Arc::new(RecordJournal::new(store.clone()));
    let server = Server::start(
        registry.clone(),
        events,
        journal,
        config.worker_count(),
        options,
        config.handoff_timeout(),
    )
    .map_err(DaemonError::Serve)?;
    let lifecycle = Arc::new(Lifecycle::new(
        store.clone(),
        registry.clone(),
        server,
        config.prefetch,
        crate::lifecycle::SnapshotLimits {
            max_size: config.max_snapshot_size,
            per_uid_bytes: config.max_snapshot_bytes_per_uid,
        },
    ));
    let stopping = Arc::new(AtomicBool::new(false));
    let janitor = {
        let (lifecycle, stopping) = (lifecycle.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("pagerd-lifecycle".into())
            .spawn(move || {
                let mut next_pass = Instant::now() + JANITOR_PERIOD;
                while !stopping.load(Ordering::SeqCst) {
                    let wait = next_pass.saturating_duration_since(Instant::now());
                    match inbox.recv_timeout(wait) {
                        Ok(event) => lifecycle.on_event(event),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    // Also under a steady stream of events.
                    if Instant::now() >= next_pass {
                        lifecycle.recheck_file_users();
                        lifecycle.check_snapshot_files();
                        notify::status(&lifecycle.reports().summary());
                        next_pass = Instant::now() + JANITOR_PERIOD;
                    }
                }
            })
            .map_err(DaemonError::Serve)?
    };

    notify::status("reconciling the state directory");
    lifecycle
        .reconcile(&config.fuse_mountpoint(), inherited_handoffs)
        .map_err(DaemonError::Reconcile)?;
    for (id, path) in &config.snapshots {
        if lifecycle.snapshot(id).is_err() {
            lifecycle
                .register_snapshot_path(
                    id.clone(),
                    path,
                    ImportMode::Copy,
                    None,
                    crate::owners::ROOT,
                )
                .map_err(|source| DaemonError::CommandLine {
                    id: id.to_string(),
                    source,
                })?;
        }
    }
    for (id, snapshot) in &config.forks {
        if lifecycle.reports().fork(id).is_err() {
            lifecycle
                .create_fork(Some(id.clone()), snapshot, None, crate::owners::ROOT)
                .map_err(|source| DaemonError::CommandLine {
                    id: id.to_string(),
                    source,
                })?;
        }
    }
    let fuse = match config.fuse_options(access) {
        Some(options) => {
            let files: Arc<dyn MemoryFiles> = lifecycle.clone();
            let view = FuseView::mount(files, &options).map_err(DaemonError::Fuse)?;
            lifecycle.set_fuse_mount(view.info().clone());
            Some(view)
        }
        None => None,
    };
    let vms = Vms::new(
        lifecycle.clone(),
        store,
        VmOptions {
            firecracker: config.firecracker.clone(),
            qemu: config.qemu.clone(),
            console_cap: config.console_log_max_kib.saturating_mul(1024),
            retention: Some(config.vm_retention).filter(|d| !d.is_zero()),
            jail: match (&config.jailer, group) {
                (Some(jailer), Some(gid)) => {
                    let base = config.state_dir.join("jail");
                    std::fs::create_dir_all(&base)
                        .and_then(|()| {
                            std::fs::set_permissions(
                                &base,
                                std::os::unix::fs::PermissionsExt::from_mode(0o700),
                            )
                        })
                        .map_err(|e| DaemonError::Jail(base.clone(), e))?;
                    Some(crate::vms::JailOptions {
                        jailer: jailer.clone(),
                        first_uid: config.jail_uids.0,
                        uids: config.jail_uids.1,
                        gid,
                        base,
                    })
                }
                _ => None,
            },
        },
    );
    vms.reconcile().map_err(DaemonError::Vms)?;
    let upgrade = Arc::new(Upgrade::new(configured_program));
    let control_path = config.control_socket();
    let handler = Arc::new(Dispatcher::new(
        lifecycle.clone(),
        vms.clone(),
        upgrade.clone(),
    ));
    let options = ControlOptions {
        idle_timeout: Duration::from_millis(config.control_idle_timeout_ms),
        group,
        max_connections_per_uid: config.max_connections_per_uid,
    };
    let started = match inherited_control {
        Some(listener) => {
            tracing::info!(control = %control_path.display(), "answering on the control socket the previous program handed over");
            ControlServer::adopt(listener, &control_path, handler, options)
        }
        None => ControlServer::start(&control_path, handler, options),
    };
    let mut control = started.map_err(|source| DaemonError::Control {
        path: control_path.clone(),
        source,
    })?;
    let _metrics = config
        .metrics_addr
        .as_ref()
        .map(|addr| {
            let sources = crate::metrics::Sources {
                lifecycle: lifecycle.clone(),
                vms: vms.clone(),
            };
            MetricsServer::start(addr, Arc::new(sources))
                .map_err(|source| DaemonError::Metrics(addr.to_string(), source))
        })
        .transpose()?;
    tracing::info!(control = %control_path.display(), workers = config.worker_count(),
        version = env!("CARGO_PKG_VERSION"), pid = std::process::id(),
        options = %std::env::args().skip(1).collect::<Vec<_>>().join(" "), "pagerd ready");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "pagerd ready control={}", control_path.display());
    let _ = stdout.flush();
    drop(stdout);
    crate::stats::DAEMON.ready(began.elapsed());
    notify::ready(&lifecycle.reports().summary());

    let next = loop {
        let signal = signals.wait().map_err(DaemonError::Signals)?;
        if signal != UPGRADE_SIGNAL {
            tracing::info!(signal = %signal, "shutting down; fork records are kept for the next start");
            notify::stopping();
            break None;
        }
        match upgrade.take_program() {
            Ok(program) => break Some(program),
            Err(e) => {
                tracing::error!(error = %crate::errors::error_chain(&e), "upgrade refused; still running");
                upgrade.clear();
            }
        }
    };
    // At an upgrade the control socket keeps listening: requests made meanwhile wait in its
    // backlog for the new program.
    let mut handoffs = Vec::new();
    let handed_over = match next {
        Some(_) => {
            tracing::info!("upgrading: serving stops here and resumes in the new program");
            notify::status("upgrading: the new program takes over every fork");
            // The handoff sockets keep listening too: VMMs connecting from now on are served
            // by the new program.
            handoffs = lifecycle.hand_over_listeners();
            control
                .hand_over(CONTROL_GRACE)
                .map_err(|e| tracing::warn!(error = %e, "cannot keep the control socket for the new program"))
                .ok()
        }
        None => {
            control.stop();
            None
        }
    };
    if let Some(fuse) = fuse {
        fuse.unmount();
    }
    // Endings from here on are the shutdown's own: they must not release references (the
    // lifecycle ignores `shutdown` endings too). The janitor is not waited for: it may be
    // asleep for up to a recheck period, and whatever it writes is atomic.
    stopping.store(true, Ordering::SeqCst);
    drop(janitor);
    lifecycle.shutdown(next.is_some());
    if let Some(program) = next {
        return Err(DaemonError::Upgrade(upgrade::exec(
            &program,
            upgrade.configured(),
            handed_over,
            handoffs,
        )));
    }
    Ok(())
}
