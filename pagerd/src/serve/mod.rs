//! Serving forks over userfaultfd: workers, the handoff acceptor, and the fault path.
//!
//! [`Server`] owns a pool of [`worker`]s (default: one per core) and the [`acceptor`]. Listening
//! for a fork binds its handoff socket; when a VMM hands over its uffd there, the acceptor
//! validates the regions against the snapshot and gives the new [`session`] to the least
//! loaded worker, which serves its faults until the VMM exits or the fork is closed.
//!
//! Before the VMM hears "ok", the acceptor has the fork's record rewritten with what serving
//! needs ([`AttachJournal`]): a daemon that dies at any moment after that finds the record and
//! takes the uffd back from the live VMM at its next start ([`Server::recover`], [`recover`]).

pub mod acceptor;
mod attach;
#[cfg(test)]
mod fake_vmm;
mod fault;
pub mod memory;
pub mod prefetch;
mod prefetch_queue;
pub mod priority;
pub mod record;
pub mod recover;
pub mod region;
pub mod session;
pub mod spin;
pub mod start;
pub mod uffd;
pub mod worker;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use acceptor::{AcceptorCommand, AcceptorHandle};
use session::ServeOptions;
use worker::{Command, WorkerHandle};

use proto::handoff;
use recover::{RecoverError, ServedUffd};
use session::Session;
use uffd::Userfaultfd;

use crate::registry::{Fork, Registry, Serving, Transition};

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
    /// No more forks, in all or for this user.
    #[error(transparent)]
    TooManyForks(#[from] crate::owners::ForkQuotaError),
}

/// Something that happened to a fork on a serving thread, for the lifecycle to record (off
/// the serving threads: recording writes to disk).
#[derive(Debug)]
pub(crate) enum ForkEvent {
    /// Serving ended.
    Ended(Arc<Fork>),
    /// A recording fork's first touches, for its snapshot's working set.
    Recorded {
        /// The snapshot recorded.
        snapshot: Arc<crate::snapshot::Snapshot>,
        /// Which recording.
        ticket: crate::working_set::slot::Ticket,
        /// Snapshot pages in first-touch order.
        trace: crate::working_set::merge::Trace,
    },
}

/// Where the acceptor makes an attached VMM durable (its identity, its uffd's and its
/// regions) before the VMM is told its handoff was accepted; a failure refuses the handoff.
pub(crate) trait AttachJournal: Send + Sync + std::fmt::Debug {
    /// Records that `vmm_pid` now serves `fork` through `uffd`.
    fn attached(&self, fork: &Fork, vmm_pid: i32, uffd: &ServedUffd) -> io::Result<()>;
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
    options: ServeOptions,
}

impl Server {
    /// Starts `workers` worker threads and the acceptor.
    pub fn start(
        registry: Arc<Registry>,
        events: ForkEvents,
        journal: Arc<dyn AttachJournal>,
        workers: usize,
        options: ServeOptions,
        handoff_timeout: Duration,
    ) -> io::Result<Self> {
        let count = workers.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let budget = Arc::new(spin::SpinBudget::new(count, cores));
        let workers: Vec<WorkerHandle> = (0..count)
            .map(|i| {
                WorkerHandle::spawn(
                    i,
                    registry.clone(),
                    events.clone(),
                    options.spin,
                    budget.clone(),
                    options.replay_nice,
                )
            })
            .collect::<io::Result<_>>()?;
        let workers = Arc::new(workers);
        let acceptor = AcceptorHandle::spawn(
            registry.clone(),
            journal,
            workers.clone(),
            options,
            handoff_timeout,
        )?;
        Ok(Self {
            workers,
            acceptor,
            registry,
            options,
        })
    }

    /// Whether `uid` may create one more fork: the daemon keeps at most `--max-forks` (each
    /// costs a listening socket and its record, and a session's page maps once served), and
    /// a user other than the operators at most `--max-forks-per-uid`, never the reserve.
    pub fn admit_fork(&self, uid: u32) -> Result<(), ServeError> {
        let forks = self.registry.forks();
        let of_uid = forks.iter().filter(|f| f.owner() == uid).count();
        self.options
            .fork_quota
            .admit(uid, forks.len(), of_uid)
            .map_err(ServeError::from)
    }

    /// How many worker threads serve.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Sessions per worker.
    pub fn worker_loads(&self) -> Vec<usize> {
        self.workers.iter().map(WorkerHandle::load).collect()
    }

    /// Starts listening on the fork's handoff socket (replacing a stale socket there), or on
    /// `inherited`, the fork's socket still listening as the program an upgrade replaced
    /// left it.
    pub fn listen(
        &self,
        fork: Arc<Fork>,
        inherited: Option<std::os::unix::net::UnixListener>,
    ) -> Result<(), ServeError> {
        let listener = match inherited {
            Some(listener) => listener,
            None => {
                let path = fork.handoff_socket().clone();
                if path.as_os_str().len() > MAX_SOCKET_PATH {
                    return Err(ServeError::SocketPathTooLong(path));
                }
                bind_fresh(&path).map_err(|source| ServeError::Bind { path, source })?
            }
        };
        if !self.acceptor.send(AcceptorCommand::Listen(fork, listener)) {
            return Err(ServeError::Stopped);
        }
        Ok(())
    }

    /// Stops accepting handoffs and returns every fork's handoff socket, still listening, for
    /// the program an upgrade executes.
    pub fn hand_over_listeners(&self) -> Vec<(proto::ForkId, std::os::unix::net::UnixListener)> {
        let (done, wait) = mpsc::channel();
        if !self.acceptor.send(AcceptorCommand::HandOver { done }) {
            return Vec::new();
        }
        wait.recv_timeout(CLOSE_TIMEOUT).unwrap_or_default()
    }

    /// Serves again a fork whose VMM outlived the previous daemon, on `uffd` taken back from
    /// it (see [`recover`]): the recorded regions are validated against the snapshot again,
    /// every region is woken (faults the dead daemon read and never answered are raised
    /// again), and a worker serves it. The VMM's death is watched through `pidfd`.
    pub fn recover(
        &self,
        fork: &Arc<Fork>,
        vmm_pid: i32,
        pidfd: OwnedFd,
        uffd: OwnedFd,
        served: ServedUffd,
        inherited: Option<std::os::unix::net::UnixListener>,
    ) -> Result<(), RecoverError> {
        let snapshot = self
            .registry
            .snapshot(fork.snapshot())
            .map_err(|e| RecoverError::Invalid(e.to_string()))?;
        handoff::validate(&served.regions, snapshot.size())
            .map_err(|e| RecoverError::Invalid(e.to_string()))?;
        let uffd = Userfaultfd::new(uffd).map_err(|e| RecoverError::Setup(e.to_string()))?;
        let features = uffd.features().unwrap_or(served.features);
        if uffd::unsupported_features(features) != 0 {
            return Err(RecoverError::Invalid(format!(
                "the uffd negotiated features {features:#x} that pagerd does not serve"
            )));
        }
        let worker = (0..self.workers.len())
            .min_by_key(|&i| self.workers[i].load())
            .ok_or_else(|| RecoverError::Setup("no worker is running".into()))?;
        let ranges: Vec<(u64, u64)> = served
            .regions
            .iter()
            .map(|r| (r.base_host_virt_addr, r.size))
            .collect();
        let session = Session::recovered(
            fork.clone(),
            snapshot,
            uffd,
            Some(pidfd),
            served.regions,
            self.options,
        )
        .map_err(|e| RecoverError::Setup(crate::errors::error_chain(&e)))?;
        // Threads asleep on a fault the dead daemon read fault again, into this uffd; the
        // worker drains whatever is queued as soon as it has the session.
        for (start, len) in ranges {
            match uffd::PageInstaller::wake(session.uffd(), crate::memory::VmmAddr(start), len) {
                Ok(()) => {}
                Err(nix::errno::Errno::ESRCH) => return Err(RecoverError::VmmGone),
                Err(e) => return Err(RecoverError::Setup(format!("UFFDIO_WAKE: {e}"))),
            }
        }
        let serving = Serving {
            worker,
            vmm_pid: Some(vmm_pid),
            uffd_features: features,
        };
        self.registry
            .transition(fork, Transition::Attach(serving))
            .map_err(|e| RecoverError::Setup(e.to_string()))?;
        if self.workers[worker]
            .send(Command::Attach(Box::new(session)))
            .is_err()
        {
            return Err(RecoverError::Setup("the worker has exited".into()));
        }
        // A recovered fork listens too: a VMM connecting is told `already_serving`.
        if let Err(e) = self.listen(fork.clone(), inherited) {
            tracing::warn!(fork = %fork.id(), error = %e, "cannot listen on a recovered fork's handoff socket");
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
        if let Some(w) = fork.status().phase.worker() {
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
