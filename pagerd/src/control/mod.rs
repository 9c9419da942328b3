//! The control socket: a Unix stream socket speaking newline-delimited JSON (`proto::control`).
//!
//! One thread accepts; each connection gets a thread of its own that reads request lines
//! (at most [`MAX_REQUEST_BYTES`] each), hands them to the [`Handler`] and writes one
//! response line per request. A connection idle for longer than the idle timeout is closed, as
//! is one that sends an over-long line; at most [`MAX_CONNECTIONS`] are served at once and the
//! rest are told the daemon is busy. Only the socket owner's uid, root, and members of the
//! configured group may connect (mode 0660 and an `SO_PEERCRED` check).

mod dispatch;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use proto::control::{parse_line, response, ControlError, ErrorCode, Request, MAX_REQUEST_BYTES};
use serde_json::Value;

pub(crate) use dispatch::Dispatcher;

/// The most connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// Answers requests; implemented by the daemon, and testable without a socket.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, request: Request) -> Result<Value, ControlError>;
}

/// The listening control socket and its accept thread.
#[derive(Debug)]
pub(crate) struct ControlServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and starts serving `handler`. Members of
    /// `group` (by primary gid) may connect too.
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
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("pagerd-control".into())
            .spawn(move || accept_loop(listener, handler, idle_timeout, group, stop))?;
        Ok(Self {
            path: path.to_owned(),
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops accepting and removes the socket.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    idle: Duration,
    group: Option<u32>,
    stopping: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let owner = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                continue;
            }
        };
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if c.uid() == owner || c.uid() == 0 || Some(c.gid()) == group => {}
            other => {
                tracing::warn!(creds = ?other.map(|c| c.uid()), "control connection from another user refused");
                continue;
            }
        }
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
                if let Err(e) = serve_connection(stream, &*handler, idle) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn Handler, idle: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST_BYTES {
            let err = ControlError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                ),
            );
            writeln!(writer, "{}", response(Value::Null, Err(err)))?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse_line(&line);
        let outcome = parsed.request.and_then(|request| handler.handle(request));
        writeln!(writer, "{}", response(parsed.id, outcome))?;
        writer.flush()?;
    }
}
