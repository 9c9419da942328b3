//! Serving forks over userfaultfd: workers, the handoff acceptor, and the fault path.
//!
//! [`Server`] owns a pool of [`worker`]s (default: one per core) and the [`acceptor`]. Listening
//! for a fork binds its handoff socket; when a VMM hands over its uffd there, the acceptor
//! validates the regions against the snapshot and gives the new [`session`] to the least
//! loaded worker, which serves its faults until the VMM exits or the fork is closed.

pub mod acceptor;
pub mod session;
pub mod uffd;
pub mod worker;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use acceptor::{AcceptorCommand, AcceptorHandle};
use session::ServeOptions;
use worker::{Command, WorkerHandle};

use proto::model::ForkState;

use crate::registry::{Fork, Registry};

/// The longest path a Unix socket address can hold, less the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long closing a fork waits for its worker to let go of it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors creating or closing forks.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The handoff socket path would not fit in a socket address.
    #[error("handoff socket path {0} is longer than {MAX_SOCKET_PATH} bytes")]
    SocketPathTooLong(PathBuf),
    /// Binding the handoff socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A serving thread has exited.
    #[error("the serving threads are not running")]
    Stopped,
    /// The daemon already keeps `--max-forks` forks.
    #[error("the daemon already keeps {max} forks (--max-forks); close some first")]
    TooManyForks {
        /// The limit.
        max: usize,
    },
}

/// Something that happened to a fork on a serving thread, for the lifecycle to record (off
/// the serving threads: recording writes to disk).
#[derive(Debug)]
pub(crate) enum ForkEvent {
    /// A VMM handed over its uffd.
    Attached(Arc<Fork>),
    /// Serving ended.
    Ended(Arc<Fork>),
}

/// Where serving threads report [`ForkEvent`]s. Events sent after the receiver is gone (at
/// shutdown, when endings must not release references) are dropped.
pub(crate) type ForkEvents = mpsc::Sender<ForkEvent>;

/// Workers plus the acceptor.
#[derive(Debug)]
pub struct Server {
    workers: Arc<Vec<WorkerHandle>>,
    acceptor: AcceptorHandle,
    registry: Arc<Registry>,
    max_forks: usize,
}

impl Server {
    /// Starts `workers` worker threads and the acceptor.
    pub fn start(
        registry: Arc<Registry>,
        events: ForkEvents,
        workers: usize,
        options: ServeOptions,
        handoff_timeout: Duration,
    ) -> io::Result<Self> {
        let workers: Vec<WorkerHandle> = (0..workers.max(1))
            .map(|i| WorkerHandle::spawn(i, registry.clone(), events.clone(), options.spin))
            .collect::<io::Result<_>>()?;
        let workers = Arc::new(workers);
        let acceptor = AcceptorHandle::spawn(
            registry.clone(),
            events,
            workers.clone(),
            options,
            handoff_timeout,
        )?;
        Ok(Self {
            workers,
            acceptor,
            registry,
            max_forks: options.max_forks,
        })
    }

    /// Whether one more fork may be created: the daemon keeps at most `max_forks` (each costs
    /// a listening socket and its record, and a session's page maps once served).
    pub fn admit_fork(&self) -> Result<(), ServeError> {
        if self.registry.forks().len() >= self.max_forks {
            return Err(ServeError::TooManyForks {
                max: self.max_forks,
            });
        }
        Ok(())
    }

    /// How many worker threads serve.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Sessions per worker.
    pub fn worker_loads(&self) -> Vec<usize> {
        self.workers.iter().map(WorkerHandle::load).collect()
    }

    /// Starts listening on the fork's handoff socket (replacing a stale socket there).
    pub fn listen(&self, fork: Arc<Fork>) -> Result<(), ServeError> {
        let path = fork.handoff_socket().clone();
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ServeError::SocketPathTooLong(path));
        }
        let listener = bind_fresh(&path).map_err(|source| ServeError::Bind { path, source })?;
        if !self.acceptor.send(AcceptorCommand::Listen(fork, listener)) {
            return Err(ServeError::Stopped);
        }
        Ok(())
    }

    /// Stops everything serving a fork: its handoff socket, half-received handoffs, and its
    /// session; returns once every descriptor it held is closed.
    pub fn stop(&self, fork: &Fork) {
        // First the acceptor: once it has forgotten the fork, no handoff can attach it.
        let (done, wait) = mpsc::channel();
        if self.acceptor.send(AcceptorCommand::Forget {
            fork: fork.id().clone(),
            done,
        }) {
            let _ = wait.recv_timeout(CLOSE_TIMEOUT);
        }
        let status = fork.status();
        if let (ForkState::Serving, Some(w)) = (status.state, status.worker) {
            let (done, wait) = mpsc::channel();
            if self.workers[w]
                .send(Command::Close {
                    fork: fork.id().clone(),
                    done,
                })
                .is_ok()
            {
                let _ = wait.recv_timeout(CLOSE_TIMEOUT);
            }
        }
    }

    /// Stops the acceptor and every worker (live forks stop being served).
    pub fn shutdown(&self) {
        self.acceptor.shutdown();
        for w in self.workers.iter() {
            w.shutdown();
        }
    }
}

/// Binds a Unix listener at `path`, replacing a stale socket left there (never another kind
/// of file). The socket gets the group access of its directory (0600, or 0660 root:GROUP
/// with `--group`: [`crate::access`]); until then the daemon's umask keeps it private.
fn bind_fresh(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    crate::access::restrict_socket_like_its_directory(path)?;
    Ok(listener)
}
