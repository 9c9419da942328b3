//! The control socket: a Unix stream socket speaking newline-delimited JSON (`proto::control`).
//!
//! One thread accepts; each connection gets a thread of its own that reads request lines
//! (at most [`MAX_REQUEST_BYTES`] each), hands them to the [`Handler`] and writes one
//! response line per request. A connection idle for longer than the idle timeout is closed, as
//! is one that sends an over-long line; at most [`MAX_CONNECTIONS`] are served at once and the
//! rest are told the daemon is busy.
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

mod dispatch;
mod registration;

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
use proto::control::{parse_line, response, ControlError, ErrorCode, Request, MAX_REQUEST_BYTES};
use serde_json::Value;

pub(crate) use dispatch::Dispatcher;

use crate::access::Access;

/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// The most passed descriptors one connection may hold that no answered request has taken
/// yet; more close the connection.
pub const MAX_FDS_PER_CONNECTION: usize = 16;
/// The most descriptors one message can carry (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
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
    /// `group` may connect too.
    pub fn start(
        path: &Path,
        handler: Arc<dyn Handler>,
        idle_timeout: Duration,
        group: Option<u32>,
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
        Access::new(group).apply_socket(path)?;
        Self::serve(listener, path, handler, idle_timeout, group)
    }

    /// Serves `handler` on a socket already listening at `path` (handed over by the program
    /// an upgrade replaced; connections waiting in its backlog are answered here).
    pub fn adopt(
        listener: UnixListener,
        path: &Path,
        handler: Arc<dyn Handler>,
        idle_timeout: Duration,
        group: Option<u32>,
    ) -> io::Result<Self> {
        Self::serve(listener, path, handler, idle_timeout, group)
    }

    fn serve(
        listener: UnixListener,
        path: &Path,
        handler: Arc<dyn Handler>,
        idle_timeout: Duration,
        group: Option<u32>,
    ) -> io::Result<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (wake_rx, wake) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let accepting = listener.try_clone()?;
        let (stop, active2) = (stopping.clone(), active.clone());
        let thread = std::thread::Builder::new()
            .name("pagerd-control".into())
            .spawn(move || {
                accept_loop(
                    accepting,
                    wake_rx,
                    handler,
                    idle_timeout,
                    group,
                    stop,
                    active2,
                )
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
    idle: Duration,
    group: Option<u32>,
    stopping: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
) {
    let owner = nix::unistd::geteuid().as_raw();
    loop {
        // Never accept once stopping: a connection left in the backlog is answered by the
        // program an upgrade executes.
        if !wait_for_connection(&listener, &wake) || stopping.load(Ordering::SeqCst) {
            return;
        }
        let conn = listener.accept().map(|(stream, _)| stream);
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                continue;
            }
        };
        let peer = match nix::sys::socket::getsockopt(
            &stream,
            nix::sys::socket::sockopt::PeerCredentials,
        ) {
            Ok(c) if may_connect(c.into(), owner, group) => Peer::from(c),
            other => {
                tracing::warn!(creds = ?other.map(|c| c.uid()), "control connection from another user refused");
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let busy = ControlError::new(
                ErrorCode::Unavailable,
                "too many control connections; try again",
            );
            let _ = writeln!(stream, "{}", response(Value::Null, Err(busy)));
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (handler, active2) = (handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("pagerd-control-conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &*handler, idle, peer) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
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

/// A request line and the descriptors that came with it.
#[derive(Debug, Default)]
struct Line {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What the next read of a connection gave.
#[derive(Debug)]
enum Next {
    Line(Line),
    TooLong,
    TooManyFds,
    Closed,
}

/// Splits what a connection sends into lines, each with the descriptors sent with it.
struct LineReader<'a> {
    stream: &'a UnixStream,
    /// Bytes of the line not complete yet, and the descriptors that came with them.
    partial: Line,
    complete: VecDeque<Line>,
    chunk: Vec<u8>,
    cmsg: Vec<u8>,
    closed: bool,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a UnixStream) -> Self {
        Self {
            stream,
            partial: Line::default(),
            complete: VecDeque::new(),
            chunk: vec![0; CHUNK_BYTES],
            cmsg: nix::cmsg_space!([RawFd; SCM_MAX_FD]),
            closed: false,
        }
    }

    fn held_fds(&self) -> usize {
        self.partial.fds.len() + self.complete.iter().map(|l| l.fds.len()).sum::<usize>()
    }

    fn next(&mut self) -> io::Result<Next> {
        loop {
            if let Some(line) = self.complete.pop_front() {
                return Ok(if line.bytes.len() > MAX_REQUEST_BYTES + 1 {
                    Next::TooLong
                } else {
                    Next::Line(line)
                });
            }
            if self.partial.bytes.len() > MAX_REQUEST_BYTES {
                return Ok(Next::TooLong);
            }
            if self.closed {
                // A last line without its newline still counts, as it always has.
                let rest = std::mem::take(&mut self.partial);
                return Ok(if rest.bytes.is_empty() {
                    Next::Closed
                } else {
                    Next::Line(rest)
                });
            }
            self.receive()?;
            if self.held_fds() > MAX_FDS_PER_CONNECTION {
                return Ok(Next::TooManyFds);
            }
        }
    }

    /// One `recvmsg`: its bytes split into lines; its descriptors go to the line holding the
    /// last byte that came with them.
    fn receive(&mut self) -> io::Result<()> {
        let mut iov = [IoSliceMut::new(&mut self.chunk)];
        let msg = loop {
            match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.map_err(io::Error::from)?,
            }
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process for
                // this message; nothing else owns them, so each is wrapped exactly once.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("passed descriptors were truncated"));
        }
        let len = msg.bytes;
        if len == 0 {
            self.closed = true;
            self.partial.fds.extend(fds);
            return Ok(());
        }
        let data = &self.chunk[..len];
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            self.partial.bytes.extend_from_slice(&rest[..=pos]);
            self.complete.push_back(std::mem::take(&mut self.partial));
            rest = &rest[pos + 1..];
        }
        self.partial.bytes.extend_from_slice(rest);
        let owner = match self.complete.back_mut() {
            Some(last) if rest.is_empty() => last,
            _ => &mut self.partial,
        };
        owner.fds.extend(fds);
        Ok(())
    }
}

fn serve_connection(
    stream: UnixStream,
    handler: &dyn Handler,
    idle: Duration,
    peer: Peer,
) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let mut reader = LineReader::new(&stream);
    let mut writer = &stream;
    loop {
        let line = match reader.next()? {
            Next::Line(line) => line,
            Next::Closed => return Ok(()),
            Next::TooLong => {
                let err = ControlError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                    ),
                );
                writeln!(writer, "{}", response(Value::Null, Err(err)))?;
                return Ok(());
            }
            Next::TooManyFds => {
                let err = ControlError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "more than {MAX_FDS_PER_CONNECTION} descriptors passed without a request \
                         to take them; closing the connection"
                    ),
                );
                writeln!(writer, "{}", response(Value::Null, Err(err)))?;
                return Ok(());
            }
        };
        // Descriptors that no request takes are closed when the context goes, below.
        let mut context = RequestContext::new(Some(peer), line.fds);
        if line.bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse_line(&line.bytes);
        let outcome = parsed
            .request
            .and_then(|request| handler.handle_with(request, &mut context));
        let after_reply = context.take_after_reply();
        drop(context);
        let written =
            writeln!(writer, "{}", response(parsed.id, outcome)).and_then(|()| writer.flush());
        if let Some(then) = after_reply {
            then();
        }
        written?;
    }
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
        let mut server =
            ControlServer::start(&path, handler.clone(), Duration::from_secs(10), None).unwrap();
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
        let mut server =
            ControlServer::start(&path, handler, Duration::from_secs(10), None).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let many = vec![null.as_fd(); MAX_FDS_PER_CONNECTION + 1];
        let r = send(&stream, "{\"v\":1,", &many);
        assert_eq!(r["error"]["code"], "invalid_argument", "{r}");
        server.stop();
    }
}
