//! A blocking client of the control socket: one connection per call, one request line out,
//! one response line back, decoded into the [`model`](crate::model) type of that request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::control::{request_line, ControlError, ErrorCode, Request, Response};
use crate::ids::Id;
use crate::model::{
    DeleteOutcome, ForkInfo, ForkListEntry, ForkState, SnapshotInfo, StatsReport, StatusReport,
};

/// How long a request may take before the client gives up (waits add their own timeout).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
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
    /// The daemon answered something that is not a response of the expected shape.
    #[error("pagerd sent a malformed response: {0}")]
    Malformed(String),
    /// The daemon refused the request.
    #[error("pagerd refused the request")]
    Refused(#[source] ControlError),
}

impl ClientError {
    /// The daemon's error code, when it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Parses an id given by a person, as a refusal the daemon would have given.
pub fn parse_id(text: &str) -> Result<Id, ClientError> {
    text.parse().map_err(|e: crate::ids::InvalidId| {
        ClientError::Refused(ControlError::new(ErrorCode::InvalidArgument, e.to_string()))
    })
}

/// A client of the control socket at one path.
#[derive(Debug, Clone)]
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

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and returns the daemon's result as JSON.
    pub fn call_value(&self, request: &Request) -> Result<Value, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let extra = match request {
            Request::ForkWait { timeout_ms, .. } => {
                Duration::from_millis(timeout_ms.unwrap_or(10_000))
            }
            _ => Duration::ZERO,
        };
        stream
            .set_read_timeout(Some(IO_TIMEOUT + extra))
            .map_err(ClientError::Io)?;
        writeln!(stream, "{}", request_line(&Value::from(1), request)).map_err(ClientError::Io)?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(ClientError::Io)?;
        let response: Response = serde_json::from_str(&line)
            .map_err(|e| ClientError::Malformed(format!("{e}: {line:?}")))?;
        response.into_result().map_err(ClientError::Refused)
    }

    /// Sends one request and decodes the result as `T`.
    pub fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ClientError> {
        let value = self.call_value(request)?;
        serde_json::from_value(value).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// `status`.
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.call(&Request::Status {})
    }

    /// `stats`.
    pub fn stats(&self) -> Result<StatsReport, ClientError> {
        self.call(&Request::Stats {})
    }

    /// `snapshot.register`.
    pub fn register_snapshot(&self, id: &str, path: &Path) -> Result<SnapshotInfo, ClientError> {
        self.call(&Request::SnapshotRegister {
            snapshot: parse_id(id)?,
            path: path.to_owned(),
        })
    }

    /// `snapshot.delete`.
    pub fn delete_snapshot(&self, id: &str, defer: bool) -> Result<DeleteOutcome, ClientError> {
        self.call(&Request::SnapshotDelete {
            snapshot: parse_id(id)?,
            defer,
        })
    }

    /// `snapshot.list`.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.call(&Request::SnapshotList {})
    }

    /// `snapshot.get`.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ClientError> {
        self.call(&Request::SnapshotGet {
            snapshot: parse_id(id)?,
        })
    }

    /// `fork.create`.
    pub fn create_fork(&self, snapshot: &str, fork: Option<&str>) -> Result<ForkInfo, ClientError> {
        self.call(&Request::ForkCreate {
            snapshot: parse_id(snapshot)?,
            fork: fork.map(parse_id).transpose()?,
        })
    }

    /// `fork.list`.
    pub fn forks(&self) -> Result<Vec<ForkListEntry>, ClientError> {
        self.call(&Request::ForkList {})
    }

    /// `fork.get`.
    pub fn fork(&self, id: &str) -> Result<ForkInfo, ClientError> {
        self.call(&Request::ForkGet {
            fork: parse_id(id)?,
        })
    }

    /// `fork.wait`.
    pub fn wait_fork(
        &self,
        id: &str,
        state: ForkState,
        timeout: Duration,
    ) -> Result<ForkInfo, ClientError> {
        self.call(&Request::ForkWait {
            fork: parse_id(id)?,
            state,
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    /// `fork.close`.
    pub fn close_fork(&self, id: &str) -> Result<ForkInfo, ClientError> {
        self.call(&Request::ForkClose {
            fork: parse_id(id)?,
        })
    }
}
