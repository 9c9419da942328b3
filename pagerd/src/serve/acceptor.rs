//! The handoff acceptor: one thread listening on every waiting fork's handoff socket.
//!
//! ```text
//!   listener (fork f) ─accept─▶ pending connection ─HandoffReceiver::poll─▶ complete?
//!        ├─ refused (no/several fds, bad JSON, bad regions, features pagerd does not serve,
//!        │     the fork already served, setup failed, timeout …) ─▶ error line to the peer,
//!        │     close, note it on the fork; a waiting fork keeps waiting for a good handoff
//!        └─ accepted ─▶ Session (built here) ─▶ "ok" line ─▶ least-loaded worker
//! ```
//!
//! Connections are non-blocking and read as data arrives, so a client that connects and sends
//! nothing (or sends slowly) holds up no one; it is dropped when its deadline passes. How many
//! may wait for their message at once is bounded ([`crate::admission`]): at most
//! [`MAX_PENDING`] in all (the last [`RESERVED_PENDING`] for root and pagerd's user), and for
//! anyone else [`MAX_PENDING_PER_UID`] per uid and [`MAX_PENDING_PER_SOCKET`] per fork socket;
//! one more is answered `busy` and closed at once. Out of descriptors (`EMFILE`), a spare
//! descriptor ([`crate::spare_fd`]) takes each waiting connection off the backlog to answer it
//! `busy`, so the loop never spins. A fork's
//! listener stays open until the fork is forgotten, so a second VMM connecting to a fork that
//! is already served gets an `already_serving` reply rather than a reset. Everything a session
//! allocates is allocated here, before the VMM hears "ok": a failure is a refusal
//! (`setup_failed`), never a panic on a worker.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream as MioUnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use proto::control::ErrorCode;
use proto::fdpass::{HandoffReceiver, ReceivedHandoff};
use proto::handoff::{self, HandoffError, HandoffRefusal, HandoffReply};
use proto::model::{EndReason, HandoffErrorInfo, RefusalReason};
use slab::Slab;

use crate::admission::{Admission, Counted, Permit};
use crate::errors::error_chain;
use crate::ratelimit::RateLimiter;
use crate::registry::{Fork, Registry, Serving, Transition};
use crate::serve::attach::{check_features, check_waiting, AttachError};
use crate::serve::recover::{self, ServedUffd};
use crate::serve::session::{ServeOptions, Session};
use crate::serve::uffd::{self, Userfaultfd};
use crate::serve::worker::{Command, WorkerHandle};
use crate::serve::AttachJournal;
use crate::spare_fd::{self, SpareFd};
use crate::sys;
use proto::ForkId;

const WAKER: Token = Token(usize::MAX);
/// The most handoff connections waiting for their message at once.
pub const MAX_PENDING: usize = 256;
/// Of [`MAX_PENDING`], those only root and pagerd's own user may take.
pub const RESERVED_PENDING: usize = 32;
/// The most waiting handoff connections of one uid other than root's and pagerd's.
pub const MAX_PENDING_PER_UID: usize = 16;
/// The most waiting connections from uids other than root's and pagerd's on one fork's socket
/// (a VMM needs one).
pub const MAX_PENDING_PER_SOCKET: usize = 8;
/// How long handing the sockets over (at an upgrade) waits for handoffs already accepted to
/// complete.
const HAND_OVER_GRACE: Duration = Duration::from_millis(500);

/// What the acceptor can be asked to do.
#[derive(Debug)]
pub enum AcceptorCommand {
    /// Start accepting handoffs for a fork on this listener.
    Listen(Arc<Fork>, std::os::unix::net::UnixListener),
    /// Stop accepting for a fork: close its listener and pending connections.
    Forget {
        /// The fork.
        fork: ForkId,
        /// Signalled when done.
        done: Sender<()>,
    },
    /// Stop accepting on every fork's handoff socket and return them, still listening (their
    /// backlogs and files intact), for the program an upgrade executes.
    HandOver {
        /// Receives the listeners.
        done: Sender<Vec<(ForkId, std::os::unix::net::UnixListener)>>,
    },
    /// Close everything and exit.
    Shutdown,
}

/// Handle on the acceptor thread.
#[derive(Debug)]
pub struct AcceptorHandle {
    tx: Sender<AcceptorCommand>,
    waker: Waker,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AcceptorHandle {
    /// Starts the acceptor.
    pub fn spawn(
        registry: Arc<Registry>,
        journal: Arc<dyn AttachJournal>,
        workers: Arc<Vec<WorkerHandle>>,
        options: ServeOptions,
        handoff_timeout: Duration,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (tx, rx) = mpsc::channel();
        let mut acceptor = Acceptor {
            poll,
            rx,
            registry,
            journal,
            workers,
            options,
            handoff_timeout,
            listeners: Slab::new(),
            pending: Slab::new(),
            admission: Admission::new(
                Counted::PendingHandoffs,
                MAX_PENDING,
                RESERVED_PENDING,
                MAX_PENDING_PER_UID,
                nix::unistd::geteuid().as_raw(),
            ),
            spare: SpareFd::new(),
            busy_log: RateLimiter::new(5, Duration::from_secs(10)),
        };
        let thread = std::thread::Builder::new()
            .name("pagerd-handoff".into())
            .spawn(move || acceptor.run())?;
        Ok(Self {
            tx,
            waker,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a command; `false` if the acceptor has exited.
    pub fn send(&self, command: AcceptorCommand) -> bool {
        let sent = self.tx.send(command).is_ok();
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the handoff acceptor");
        }
        sent
    }

    /// Stops the acceptor and waits for it.
    pub fn shutdown(&self) {
        self.send(AcceptorCommand::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

struct Listening {
    fork: Arc<Fork>,
    listener: UnixListener,
}

struct Pending {
    fork: Arc<Fork>,
    stream: MioUnixStream,
    receiver: HandoffReceiver,
    peer_pid: Option<i32>,
    deadline: Instant,
    /// The listener it came in on.
    listener: usize,
    /// Whether its peer is someone other than root or pagerd's user.
    limited: bool,
    /// Its place in the bound on waiting connections.
    _permit: Permit,
}

struct Acceptor {
    poll: Poll,
    rx: Receiver<AcceptorCommand>,
    registry: Arc<Registry>,
    journal: Arc<dyn AttachJournal>,
    workers: Arc<Vec<WorkerHandle>>,
    options: ServeOptions,
    handoff_timeout: Duration,
    listeners: Slab<Listening>,
    pending: Slab<Pending>,
    admission: Arc<Admission>,
    spare: SpareFd,
    busy_log: RateLimiter,
}

fn listener_token(key: usize) -> Token {
    Token(key * 2)
}

fn pending_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

impl Acceptor {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .pending
                .iter()
                .map(|(_, p)| p.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "handoff poll failed; the acceptor stops");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        if !self.commands() {
                            self.close_all();
                            return;
                        }
                    }
                    Token(t) if t % 2 == 0 => self.accept(t / 2),
                    Token(t) => self.read_pending(t / 2),
                }
            }
            self.expire();
        }
    }

    fn commands(&mut self) -> bool {
        while let Ok(command) = self.rx.try_recv() {
            match command {
                AcceptorCommand::Listen(fork, listener) => self.listen(fork, listener),
                AcceptorCommand::Forget { fork, done } => {
                    self.forget(&fork);
                    let _ = done.send(());
                }
                AcceptorCommand::HandOver { done } => {
                    let _ = done.send(self.hand_over());
                }
                AcceptorCommand::Shutdown => return false,
            }
        }
        true
    }

    fn listen(&mut self, fork: Arc<Fork>, listener: std::os::unix::net::UnixListener) {
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!(fork = %fork.id(), error = %e, "cannot make the handoff socket non-blocking");
            return;
        }
        let mut listener = UnixListener::from_std(listener);
        let entry = self.listeners.vacant_entry();
        if let Err(e) = self.poll.registry().register(
            &mut listener,
            listener_token(entry.key()),
            Interest::READABLE,
        ) {
            tracing::error!(fork = %fork.id(), error = %e, "cannot watch the handoff socket");
            return;
        }
        entry.insert(Listening { fork, listener });
    }

    fn forget(&mut self, fork: &ForkId) {
        let keys: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.fork.id() == fork)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.close_listener(key);
        }
        let keys: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.fork.id() == fork)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.drop_pending(key);
        }
    }

    fn hand_over(&mut self) -> Vec<(ForkId, std::os::unix::net::UnixListener)> {
        // Accept no more (connections wait in the backlogs, for the next program), and finish
        // the handoffs already accepted: a VMM that connected just now must not be cut off.
        let registry = self.poll.registry();
        for (_, l) in self.listeners.iter_mut() {
            let _ = registry.deregister(&mut l.listener);
        }
        let end = Instant::now() + HAND_OVER_GRACE;
        while !self.pending.is_empty() && Instant::now() < end {
            let keys: Vec<usize> = self.pending.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.read_pending(key);
            }
            if !self.pending.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let keys: Vec<usize> = self.listeners.iter().map(|(k, _)| k).collect();
        keys.into_iter()
            .filter_map(|key| {
                let l = self.listeners.try_remove(key)?;
                Some((l.fork.id().clone(), l.listener.into()))
            })
            .collect()
    }

    fn close_listener(&mut self, key: usize) {
        if let Some(mut l) = self.listeners.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut l.listener);
            let _ = std::fs::remove_file(l.fork.handoff_socket());
        }
    }

    fn drop_pending(&mut self, key: usize) -> Option<Pending> {
        let mut p = self.pending.try_remove(key)?;
        let _ = self.poll.registry().deregister(&mut p.stream);
        Some(p)
    }

    fn close_all(&mut self) {
        let keys: Vec<usize> = self.listeners.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_listener(key);
        }
        let keys: Vec<usize> = self.pending.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drop_pending(key);
        }
    }

    fn accept(&mut self, key: usize) {
        self.spare.refill();
        loop {
            let Some(l) = self.listeners.get(key) else {
                return;
            };
            let (mut stream, _) = match l.listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if spare_fd::out_of_descriptors(&e) => {
                    // Take the connection off the backlog in the spare's room and turn it
                    // away; the next one, if any, the same way.
                    let fork = l.fork.clone();
                    self.spare.release();
                    let accepted = l.listener.accept();
                    let took_one = accepted.is_ok();
                    if let Ok((stream, _)) = &accepted {
                        self.turn_away(&fork, stream, &e.to_string());
                    }
                    drop(accepted);
                    self.spare.refill();
                    if !took_one {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(fork = %l.fork.id(), error = %e, "accept failed");
                    return;
                }
            };
            let fork = l.fork.clone();
            let (peer_uid, peer_pid) = match nix::sys::socket::getsockopt(
                &stream,
                nix::sys::socket::sockopt::PeerCredentials,
            ) {
                Ok(c) => (c.uid(), (c.pid() > 0).then_some(c.pid())),
                Err(_) => (u32::MAX, None),
            };
            let permit = match self.admission.admit(peer_uid) {
                Ok(permit) => permit,
                Err(refusal) => {
                    self.turn_away(&fork, &stream, &refusal.to_string());
                    continue;
                }
            };
            let limited = !self.admission.is_operator(peer_uid);
            if limited && spare_fd::low_on_descriptors() {
                self.turn_away(&fork, &stream, "pagerd is low on file descriptors");
                continue;
            }
            let on_socket = || {
                self.pending
                    .iter()
                    .filter(|(_, p)| p.listener == key && p.limited)
            };
            if limited && on_socket().count() >= MAX_PENDING_PER_SOCKET {
                let why = format!(
                    "{MAX_PENDING_PER_SOCKET} connections to this fork's socket sent no handoff yet"
                );
                self.turn_away(&fork, &stream, &why);
                continue;
            }
            tracing::debug!(fork = %fork.id(), peer_pid, "handoff connection accepted");
            let entry = self.pending.vacant_entry();
            let pkey = entry.key();
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, pending_token(pkey), Interest::READABLE)
            {
                tracing::warn!(fork = %fork.id(), error = %e, "cannot watch a handoff connection");
                continue;
            }
            entry.insert(Pending {
                fork,
                stream,
                receiver: HandoffReceiver::new(),
                peer_pid,
                deadline: Instant::now() + self.handoff_timeout,
                listener: key,
                limited,
                _permit: permit,
            });
            // Data that arrived with the connection will not raise a new edge.
            self.read_pending(pkey);
        }
    }

    fn read_pending(&mut self, key: usize) {
        let Some(p) = self.pending.get_mut(key) else {
            return;
        };
        let result = p.receiver.poll(&p.stream);
        match result {
            Ok(None) => {}
            Ok(Some(handoff)) => {
                let p = self.drop_pending(key).expect("pending entry exists");
                self.attach(p, handoff);
            }
            Err(e) => {
                let p = self.drop_pending(key).expect("pending entry exists");
                self.refuse(p, AttachError::Handoff(e));
            }
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            let p = self.drop_pending(key).expect("pending entry exists");
            let timeout_ms = u64::try_from(self.handoff_timeout.as_millis()).unwrap_or(u64::MAX);
            self.refuse(
                p,
                AttachError::Handoff(HandoffError::TimedOut { timeout_ms }),
            );
        }
    }

    /// Answers a connection that may not wait for its handoff `busy` and closes it, without
    /// noting it on the fork (a flood must not bury the fork's own last error).
    fn turn_away(&mut self, fork: &Fork, stream: &impl AsFd, why: &str) {
        crate::stats::DAEMON.refused(RefusalReason::Busy);
        if let Some(suppressed) = self.busy_log.check(Instant::now()) {
            tracing::warn!(fork = %fork.id(), suppressed, why, "handoff connection turned away");
        }
        let refusal = HandoffRefusal {
            code: ErrorCode::Unavailable,
            reason: RefusalReason::Busy,
            message: format!("busy: {why}; try again later"),
        };
        let line = HandoffReply {
            ok: false,
            fork: None,
            error: Some(refusal),
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            // Never waits: the socket is fresh and the line short, or the peer is gone.
            let _ = nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&stream.as_fd()),
                text.as_bytes(),
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
        }
    }

    fn refuse(&mut self, p: Pending, error: AttachError) {
        let refusal = HandoffRefusal {
            code: error.code(),
            reason: error.reason(),
            message: error_chain(&error),
        };
        crate::stats::DAEMON.refused(refusal.reason);
        tracing::warn!(fork = %p.fork.id(), peer_pid = p.peer_pid, reason = %refusal.reason,
            error = %refusal.message, "handoff refused");
        // Record first: whoever reads the reply may look at the fork next.
        self.registry.handoff_refused(
            &p.fork,
            HandoffErrorInfo {
                reason: refusal.reason,
                message: refusal.message.clone(),
            },
        );
        reply(
            &p.stream,
            &HandoffReply {
                ok: false,
                fork: None,
                error: Some(refusal),
            },
        );
    }

    fn attach(&mut self, p: Pending, handoff: ReceivedHandoff) {
        match self.try_attach(&p, handoff) {
            Ok(prepared) => {
                self.record_attached(&p.fork, &prepared);
                reply(
                    &p.stream,
                    &HandoffReply {
                        ok: true,
                        fork: Some(p.fork.id().clone()),
                        error: None,
                    },
                );
                // The connection stays open for as long as the VMM runs.
                let connection = UnixStream::from(std::os::fd::OwnedFd::from(p.stream));
                self.start_session(p.fork, prepared, connection);
            }
            Err(e) => self.refuse(p, e),
        }
    }

    /// Makes the attached VMM durable before it hears "ok": from here on a restarted daemon
    /// takes the uffd back rather than leaving the VMM to freeze. Should recording fail
    /// anyway (the space kept at creation was not enough), the VMM is served all the same:
    /// refusing would leave a guest that never reads the reply hanging; only a restart of
    /// pagerd then cannot take this uffd back (`record_error`).
    fn record_attached(&self, fork: &Fork, prepared: &PreparedSession) {
        let (Some(pid), Some(served)) = (prepared.peer_pid, &prepared.served) else {
            return;
        };
        if let Err(e) = self.journal.attached(fork, pid, served) {
            let why = error_chain(&e);
            tracing::error!(fork = %fork.id(), error = %why,
                "cannot record the attached VMM: served, but a restart cannot take it back");
            self.registry.record_failed(fork, why);
        }
    }

    /// Checks the handoff against the fork and its snapshot and builds its session (without
    /// the connection, which is added once the reply is written).
    fn try_attach(
        &self,
        p: &Pending,
        handoff: ReceivedHandoff,
    ) -> Result<PreparedSession, AttachError> {
        check_waiting(p.fork.id(), p.fork.status().phase.state())?;
        let snapshot = self
            .registry
            .snapshot(p.fork.snapshot())
            .map_err(|_| AttachError::SnapshotGone(p.fork.snapshot().clone()))?;
        handoff::validate(&handoff.regions, snapshot.size())?;
        let uffd = Userfaultfd::new(handoff.uffd).map_err(AttachError::Setup)?;
        let features = uffd.features();
        tracing::debug!(fork = %p.fork.id(), peer_pid = p.peer_pid, regions = handoff.regions.len(),
            bytes = handoff.regions.iter().map(|r| r.size).sum::<u64>(),
            features, "handoff received");
        let features = check_features(features)?;
        let pidfd = match p.peer_pid.map(sys::pidfd_open) {
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => return Err(AttachError::Setup(e)),
            None => None,
        };
        let worker = (0..self.workers.len())
            .min_by_key(|&i| self.workers[i].load())
            .ok_or(AttachError::NoWorker)?;
        let served = match recover::inode_of(uffd.as_fd()) {
            Ok(ino) => Some(ServedUffd {
                vmm_fd: p.peer_pid.and_then(|pid| recover::vmm_fd_of(pid, ino)),
                ino,
                features,
                regions: handoff.regions.clone(),
            }),
            Err(e) => return Err(AttachError::Setup(e)),
        };
        let session = Session::attached(
            p.fork.clone(),
            snapshot,
            uffd,
            pidfd,
            handoff.regions,
            self.options,
        )
        .map_err(AttachError::SessionSetup)?;
        Ok(PreparedSession {
            session,
            features,
            worker,
            peer_pid: p.peer_pid,
            served,
        })
    }

    fn start_session(
        &mut self,
        fork: Arc<Fork>,
        prepared: PreparedSession,
        connection: UnixStream,
    ) {
        let PreparedSession {
            mut session,
            features,
            worker,
            peer_pid,
            served: _,
        } = prepared;
        if features & uffd::FEATURE_EVENT_REMOVE == 0 {
            tracing::warn!(fork = %fork.id(), "the VMM did not negotiate UFFD_FEATURE_EVENT_REMOVE; \
                pages it gives back cannot be tracked");
        }
        session.keep_connection(connection);
        let serving = Serving {
            worker,
            vmm_pid: peer_pid,
            uffd_features: features,
        };
        if let Err(e) = self.registry.transition(&fork, Transition::Attach(serving)) {
            // Checked `waiting` in `try_attach`, on this thread: nothing else attaches it.
            tracing::error!(fork = %fork.id(), error = %e, "the fork changed state during its handoff");
            return;
        }
        // The fork's listener stays: later connections are told `already_serving`.
        if self.workers[worker]
            .send(Command::Attach(Box::new(session)))
            .is_err()
        {
            tracing::error!(fork = %fork.id(), "worker has exited; the fork cannot be served");
            let _ = self
                .registry
                .transition(&fork, Transition::End(EndReason::NoWorker));
        }
    }
}

struct PreparedSession {
    session: Session,
    features: u64,
    worker: usize,
    peer_pid: Option<i32>,
    served: Option<ServedUffd>,
}

/// Best effort: one JSON line to the VMM. Firecracker never reads it; synthetic VMMs and
/// operators debugging a refused handoff can.
fn reply(stream: &MioUnixStream, line: &HandoffReply) {
    let Ok(mut text) = serde_json::to_string(line) else {
        return;
    };
    text.push('\n');
    let mut writer: &MioUnixStream = stream;
    let _ = writer.write_all(text.as_bytes());
}
