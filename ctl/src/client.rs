//! A client of pagerd's control socket: one request line out, one response line back.
//! A descriptor may go with the line (`SCM_RIGHTS`, in the same `sendmsg` as the line's first
//! byte): `snapshot add` passes the memory file it opened, which proves to pagerd that this
//! user may read it.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// How long a request may take before the client gives up (waits add their own timeout).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to pagerd at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file to pass could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to pagerd failed")]
    Io(#[source] std::io::Error),
    /// The daemon answered something that is not a response.
    #[error("pagerd sent a malformed response: {0}")]
    Malformed(String),
    /// The daemon refused the request.
    #[error("pagerd refused the request ({code}): {message}")]
    Refused {
        /// Stable error code.
        code: String,
        /// The daemon's message.
        message: String,
    },
}

/// A connection to the control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the socket at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// Sends `op` with `args` (an object, or null) and returns the result.
    pub fn request(
        &self,
        op: &str,
        args: Value,
        extra_wait: Duration,
    ) -> Result<Value, ClientError> {
        self.request_with_fd(op, args, None, extra_wait)
    }

    /// [`request`](Self::request), passing `fd` with the request line.
    pub fn request_with_fd(
        &self,
        op: &str,
        args: Value,
        fd: Option<BorrowedFd<'_>>,
        extra_wait: Duration,
    ) -> Result<Value, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT + extra_wait))
            .map_err(ClientError::Io)?;
        let mut request = Map::new();
        request.insert("v".into(), json!(1));
        request.insert("id".into(), json!(1));
        request.insert("op".into(), json!(op));
        if let Value::Object(args) = args {
            request.extend(args);
        }
        let line = format!("{}\n", Value::Object(request));
        send_line(&stream, line.as_bytes(), fd).map_err(ClientError::Io)?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(ClientError::Io)?;
        let response: Value = serde_json::from_str(&line)
            .map_err(|e| ClientError::Malformed(format!("{e}: {line:?}")))?;
        match response["ok"] {
            Value::Bool(true) => Ok(response["result"].clone()),
            Value::Bool(false) => Err(ClientError::Refused {
                code: response["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: response["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            }),
            _ => Err(ClientError::Malformed(line)),
        }
    }
}

/// Sends `line`, with `fd` attached to its first byte.
fn send_line(stream: &UnixStream, line: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<i32> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(line)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(std::io::Error::from)?,
        }
    };
    let mut writer = stream;
    writer.write_all(&line[sent..])
}
