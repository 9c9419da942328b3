//! A client of pagerd's control socket: one request line out, one response line back.

use std::io::{BufRead, BufReader, Write};
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
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
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
        writeln!(stream, "{}", Value::Object(request)).map_err(ClientError::Io)?;
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
