//! The control socket: a Unix stream socket speaking newline-delimited JSON (`proto::control`).
//!
//! One thread accepts; each connection gets a thread of its own ([`connection`]) that reads request lines
//! (framed by [`proto::framing::LineBuffer`]: at most [`proto::control::MAX_REQUEST_BYTES`]
//! each, nesting at most [`proto::json::MAX_DEPTH`] deep), hands them to the [`Handler`] and
//! writes one response line per request. A connection idle for longer than the idle timeout is closed, as
//! is one whose line grows too long or too deep (answered `invalid_argument` as soon as the
//! bytes show it, not when the line ends).
//!
//! How many connections are served at once, and for whom, is [`crate::admission`]: at most
//! [`MAX_CONNECTIONS`], the last [`RESERVED_CONNECTIONS`] of them for root and the daemon's own
//! user, and at most `--max-connections-per-uid` for each other uid. A connection beyond that
//! gets one `unavailable` line and is closed.
//!
//! Who may connect: the socket is 0600, or 0660 with the configured group
//! ([`crate::access`]), and the peer's `SO_PEERCRED` must be the socket owner's uid, root, or
//! a member of that group (primary or supplementary).
//!
//! Descriptors may come with a request line (`SCM_RIGHTS`), e.g. the memory file a client
//! registers, which proves the client itself could open it:
//!
//! ```text
//! client: sendmsg("{…\"op\":\"snapshot.register\",\"fd\":true}\n", SCM_RIGHTS[fd])
//! daemon: recvmsg (MSG_CMSG_CLOEXEC, room for 253 fds: never truncated)
//!         ─▶ the fds belong to the line holding the last byte that came with them
//!         ─▶ Handler::handle_with(request, RequestContext { peer, fds })
//!         ─▶ every fd the request did not take is closed once it is answered
//! ```
//!
//! A client sends such a line in one `sendmsg` and does not send the next line before the
//! answer; at most [`MAX_FDS_PER_CONNECTION`] descriptors may wait for their line.

mod connection;
mod dispatch;
mod registration;

use std::collections::VecDeque;
use std::io::{self};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::UnixCredentials;
use proto::control::{ControlError, ErrorCode, Request};
use serde_json::Value;

pub(crate) use dispatch::Dispatcher;
/// The most control connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Control connections only root and the daemon's own user may take.
pub const RESERVED_CONNECTIONS: usize = 16;
/// The default of `--max-connections-per-uid`.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 32;

use crate::access::Access;
use crate::admission::{Admission, Counted, Permit};
use crate::ratelimit::RateLimiter;
use crate::spare_fd::{self, SpareFd};
use connection::{answer, serve_connection};
/// The most passed descriptors one connection may hold that no answered request has taken
/// yet; more close the connection.
pub const MAX_FDS_PER_CONNECTION: usize = 16;
/// Bytes read per `recvmsg`.
const CHUNK_BYTES: usize = 64 * 1024;

/// Who is at the other end of a connection (`SO_PEERCRED` when it was accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id (0 if not visible from pagerd's pid namespace).
    pub pid: i32,
}

impl From<UnixCredentials> for Peer {
    fn from(c: UnixCredentials) -> Self {
        Self {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }
    }
}

/// What came with a request besides its line: who sent it, and the descriptors passed with
/// it, in the order they were sent.
#[derive(Default)]
pub struct RequestContext {
    peer: Option<Peer>,
    fds: VecDeque<OwnedFd>,
    after_reply: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("peer", &self.peer)
            .field("fds", &self.fds)
            .field("after_reply", &self.after_reply.is_some())
            .finish()
    }
}

impl RequestContext {
    /// A context for a request from `peer` (`None`: unknown, as for in-process callers)
    /// with `fds`.
    pub fn new(peer: Option<Peer>, fds: Vec<OwnedFd>) -> Self {
        Self {
            peer,
            fds: fds.into(),
            after_reply: None,
        }
    }

    /// Runs `then` once the answer has been written to the client (or writing it failed),
    /// e.g. an upgrade that must not start before its caller heard it was accepted.
    pub fn after_reply(&mut self, then: impl FnOnce() + Send + 'static) {
        self.after_reply = Some(Box::new(then));
    }

    /// The action to run once the answer is written, taken out of the context.
    fn take_after_reply(&mut self) -> Option<Box<dyn FnOnce() + Send>> {
        self.after_reply.take()
    }

    /// The peer, when known.
    pub fn peer(&self) -> Option<Peer> {
        self.peer
    }

    /// Takes the next descriptor passed with the request.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// How many passed descriptors are left.
    #[cfg(test)]
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }
}

/// Answers requests; implemented by the daemon, and testable without a socket.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, request: Request) -> Result<Value, ControlError>;

    /// Handles one request with its context: the peer and the descriptors passed with its
    /// line (those it does not take are closed after it returns). The socket calls this;
    /// the default ignores the context.
    fn handle_with(
        &self,
        request: Request,
        context: &mut RequestContext,
    ) -> Result<Value, ControlError> {
        let _ = context;
        self.handle(request)
    }
}

/// How the control socket serves its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlOptions {
    /// How long a connection may stay silent before it is closed.
    pub idle_timeout: Duration,
    /// The group whose members may connect (besides root and the daemon's own user).
    pub group: Option<u32>,
    /// The most connections one uid other than root and the daemon's own may hold at once.
    pub max_connections_per_uid: usize,
}

/// The listening control socket and its accept thread.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Writing a byte wakes the accept loop, which then returns without accepting, so that
    /// connections waiting in the backlog stay there (for the program an upgrade executes).
    wake: OwnedFd,
    /// The listening socket (the accept loop has a duplicate): handed over at an upgrade.
    listener: UnixListener,
    active: Arc<AtomicUsize>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and starts serving `handler`. Members of
    /// `options.group` may connect too.
    pub fn start(
        path: &Path,
        handler: Arc<dyn Handler>,
        options: ControlOptions,
    ) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        Access::new(options.group).apply_socket(path)?;
        Self::serve(listener, path, handler, options)
    }

    /// Serves `handler` on a socket already listening at `path` (handed over by the program
    /// an upgrade replaced; connections waiting in its backlog are answered here).
    pub fn adopt(
        listener: UnixListener,
        path: &Path,
        handler: Arc<dyn Handler>,
        options: ControlOptions,
    ) -> io::Result<Self> {
        Self::serve(listener, path, handler, options)
    }

    fn serve(
        listener: UnixListener,
        path: &Path,
        handler: Arc<dyn Handler>,
        options: ControlOptions,
    ) -> io::Result<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (wake_rx, wake) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let accepting = listener.try_clone()?;
        let (stop, active2) = (stopping.clone(), active.clone());
        // Opened here, not in the thread: once this returns, the daemon's descriptors are all
        // there (tests count them).
        let spare = SpareFd::new();
        let thread = std::thread::Builder::new()
            .name("pagerd-control".into())
            .spawn(move || {
                accept_loop(accepting, wake_rx, handler, options, stop, active2, spare)
            })?;
        Ok(Self {
            path: path.to_owned(),
            stopping,
            thread: Some(thread),
            wake,
            listener,
            active,
        })
    }

    fn stop_accepting(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&self.wake, &[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops accepting and removes the socket.
    pub fn stop(&mut self) {
        self.stop_accepting();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Stops accepting, waits (at most `grace`) for requests under way to be answered, and
    /// returns the still-listening socket, its backlog intact, for the next program.
    pub fn hand_over(mut self, grace: Duration) -> io::Result<UnixListener> {
        self.stop_accepting();
        let end = std::time::Instant::now() + grace;
        while self.active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.listener.try_clone()
    }
}

/// Waits until `listener` has a connection (`true`) or `wake` is written (`false`).
fn wait_for_connection(listener: &UnixListener, wake: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
                let ready = fds[0].revents().is_some_and(|r| !r.is_empty());
                if woken {
                    return false;
                }
                if ready {
                    return true;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "control socket poll failed");
                return false;
            }
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    wake: OwnedFd,
    handler: Arc<dyn Handler>,
    options: ControlOptions,
    stopping: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    mut spare: SpareFd,
) {
    let owner = nix::unistd::geteuid().as_raw();
    let admission = Admission::new(
        Counted::ControlConnections,
        MAX_CONNECTIONS,
        RESERVED_CONNECTIONS,
        options.max_connections_per_uid,
        owner,
    );
    let mut failures = RateLimiter::new(5, Duration::from_secs(10));
    loop {
        // Never accept once stopping: a connection left in the backlog is answered by the
        // program an upgrade executes.
        if !wait_for_connection(&listener, &wake) || stopping.load(Ordering::SeqCst) {
            return;
        }
        spare.refill();
        let mut in_spare_room = false;
        let conn = match listener.accept() {
            // Out of descriptors the listener stays readable: take the connection in the
            // spare's room (an operator's is served in it, anyone else's turned away below).
            Err(e) if spare_fd::out_of_descriptors(&e) => {
                if let Some(suppressed) = failures.check(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "control accept: out of descriptors");
                }
                spare.release();
                in_spare_room = true;
                listener.accept()
            }
            other => other,
        };
        let stream = match conn.map(|(stream, _)| stream) {
            Ok(s) => s,
            Err(e) => {
                if let Some(suppressed) = failures.check(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "control accept failed");
                }
                if spare_fd::out_of_descriptors(&e) {
                    // Not even the spare: wait for a descriptor to be freed, not in a spin.
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let peer =
            match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            {
                Ok(c) if may_connect(c.into(), owner, options.group) => Peer::from(c),
                other => {
                    tracing::warn!(
                        peer_uid = other.ok().map(|c| c.uid()),
                        "control connection from another user refused"
                    );
                    continue;
                }
            };
        if !admission.is_operator(peer.uid) && (in_spare_room || spare_fd::low_on_descriptors()) {
            // The last descriptors are kept for root: anyone else's connection closes at once.
            refuse(stream, "pagerd is low on file descriptors; try again later");
            continue;
        }
        let permit = match admission.admit(peer.uid) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::debug!(uid = peer.uid, pid = peer.pid, %refusal, "control connection refused");
                refuse(stream, &refusal.to_string());
                continue;
            }
        };
        let (handler, serving) = (handler.clone(), active.clone());
        active.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("pagerd-control-conn".into())
            .spawn(move || {
                let _permit: Permit = permit;
                if let Err(e) = serve_connection(stream, &*handler, options.idle_timeout, peer) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                serving.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            // The closure, with the stream and the permit, is dropped: the connection closes.
            tracing::warn!(error = %e, "no thread for a control connection");
        }
    }
}

/// Answers a connection that is not served with one `unavailable` line, never waiting for
/// the peer to read it, and closes it.
fn refuse(stream: UnixStream, message: &str) {
    let busy = ControlError::new(ErrorCode::Unavailable, message);
    if stream.set_nonblocking(true).is_ok() {
        // One short line into an empty socket: it fits, or the client is gone.
        let _ = answer(&stream, Value::Null, Err(busy));
    }
}

/// Whether `peer` may use the control socket: its owner, root, or a member of `group`.
fn may_connect(peer: Peer, owner: u32, group: Option<u32>) -> bool {
    peer.uid == owner
        || peer.uid == 0
        || group.is_some_and(|g| peer.gid == g || supplementary_groups(peer.pid).contains(&g))
}

/// The supplementary groups of process `pid` (`/proc/<pid>/status`); none if unreadable.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsFd;

    /// Answers `status` with how many descriptors came with it, taking `take` of them.
    struct CountFds {
        take: usize,
        taken: std::sync::Mutex<Vec<OwnedFd>>,
    }

    impl Handler for CountFds {
        fn handle(&self, _request: Request) -> Result<Value, ControlError> {
            Ok(Value::from(-1))
        }

        fn handle_with(
            &self,
            _request: Request,
            context: &mut RequestContext,
        ) -> Result<Value, ControlError> {
            let count = context.fd_count();
            for _ in 0..self.take {
                if let Some(fd) = context.take_fd() {
                    self.taken.lock().unwrap().push(fd);
                }
            }
            Ok(serde_json::json!({"fds": count, "uid": context.peer().map(|p| p.uid)}))
        }
    }

    fn options() -> ControlOptions {
        idle_after(Duration::from_secs(10))
    }

    fn idle_after(idle_timeout: Duration) -> ControlOptions {
        ControlOptions {
            idle_timeout,
            group: None,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
        }
    }

    fn send(stream: &UnixStream, line: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> Value {
        proto::fdpass::send_with_fds(stream, line.as_bytes(), fds).unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    #[test]
    fn descriptors_go_with_their_line_and_unused_ones_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler = Arc::new(CountFds {
            take: 1,
            taken: Default::default(),
        });
        let mut server = ControlServer::start(&path, handler.clone(), options()).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        // Three pipes: their write ends are passed; a read end sees EOF once every copy of
        // its write end is closed.
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| nix::unistd::pipe().unwrap()).collect();
        let borrowed: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        let status = "{\"v\":1,\"op\":\"status\"}\n";
        let r = send(&stream, status, &borrowed);
        assert_eq!(r["result"]["fds"], 3, "{r}");
        assert_eq!(r["result"]["uid"], nix::unistd::getuid().as_raw());
        let r = send(&stream, status, &[]);
        assert_eq!(
            r["result"]["fds"], 0,
            "the next line gets none of them: {r}"
        );
        let ends: Vec<std::fs::File> = pipes.into_iter().map(|(r, _)| r.into()).collect();
        for (i, end) in ends.iter().enumerate() {
            nix::fcntl::fcntl(
                end,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
            let read = std::io::Read::read(&mut &*end, &mut [0u8; 1]);
            if i == 0 {
                // Taken by the handler: still open there.
                assert_eq!(read.unwrap_err().kind(), io::ErrorKind::WouldBlock);
            } else {
                assert_eq!(read.unwrap(), 0, "pipe {i}: the daemon closed its copy");
            }
        }
        assert_eq!(handler.taken.lock().unwrap().len(), 1);
        drop(stream);
        server.stop();
    }

    #[test]
    fn too_many_waiting_descriptors_close_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler = Arc::new(CountFds {
            take: 0,
            taken: Default::default(),
        });
        let mut server = ControlServer::start(&path, handler, options()).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let many = vec![null.as_fd(); MAX_FDS_PER_CONNECTION + 1];
        let r = send(&stream, "{\"v\":1,", &many);
        assert_eq!(r["error"]["code"], "invalid_argument", "{r}");
        server.stop();
    }

    #[test]
    fn a_line_nesting_too_deep_is_refused_before_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler = Arc::new(CountFds {
            take: 0,
            taken: Default::default(),
        });
        // An idle timeout far longer than the read below waits: an answer at all proves the
        // daemon did not wait for the line to end.
        let mut server =
            ControlServer::start(&path, handler, idle_after(Duration::from_secs(600))).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let status = send(&stream, "{\"v\":1,\"op\":\"status\"}\n", &[]);
        assert_eq!(status["ok"], true, "{status}");
        let r = send(&stream, &"[".repeat(1000), &[]);
        assert_eq!(r["error"]["code"], "invalid_argument", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("deeper"),
            "{r}"
        );
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut &stream, &mut rest).unwrap();
        assert!(rest.is_empty(), "then the connection is closed");
        server.stop();
    }

    #[test]
    fn a_line_sent_in_pieces_is_one_request_with_its_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler = Arc::new(CountFds {
            take: 0,
            taken: Default::default(),
        });
        let mut server = ControlServer::start(&path, handler, options()).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        proto::fdpass::send_with_fds(&stream, b"{\"v\":1,", &[null.as_fd()]).unwrap();
        let r = send(&stream, "\"op\":\"status\"}\n", &[null.as_fd()]);
        assert_eq!(r["result"]["fds"], 2, "{r}");
        server.stop();
    }
}
