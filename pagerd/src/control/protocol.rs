//! The control protocol: newline-delimited JSON, one request object per line, one response
//! per line.
//!
//! ```text
//! → {"v":1,"id":7,"op":"fork.create","snapshot":"base","fork":"vm-1"}
//! ← {"v":1,"id":7,"ok":true,"result":{"id":"vm-1","state":"waiting","handoff_socket":"…",…}}
//! → {"v":1,"id":8,"op":"fork.get","fork":"nope"}
//! ← {"v":1,"id":8,"ok":false,"error":{"code":"not_found","message":"no fork `nope`"}}
//! ```
//!
//! `v` is required and must be [`PROTOCOL_VERSION`]; `id` is any JSON value and is echoed
//! back; `op` picks the request; every other field belongs to the request, and unknown fields
//! are rejected. `docs/protocol.md` lists every request.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::Id;
use crate::registry::ForkState;

/// The protocol version this daemon speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Every request the daemon understands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Request {
    /// Daemon health, version and counts.
    #[serde(rename = "status")]
    Status {},
    /// Summed serving counters.
    #[serde(rename = "stats")]
    Stats {},
    /// Registers a memory file as a snapshot: copied (reflinked where the filesystem can)
    /// into the state directory, or linked with `link`; never modified afterwards.
    #[serde(rename = "snapshot.register")]
    SnapshotRegister {
        /// The new snapshot's id.
        snapshot: Id,
        /// Absolute path of the memory file; with `fd`, only the name recorded.
        #[serde(default)]
        path: Option<std::path::PathBuf>,
        /// The memory file comes as a descriptor passed with this line (`SCM_RIGHTS`), opened
        /// for reading by the client. Required unless the client is root.
        #[serde(default)]
        fd: bool,
        /// Link the file instead of copying it. The file must then never be written,
        /// truncated or replaced in place again while the snapshot exists; a change marks
        /// the snapshot damaged.
        #[serde(default)]
        link: bool,
    },
    /// Deletes a snapshot no fork references.
    #[serde(rename = "snapshot.delete")]
    SnapshotDelete {
        /// Its id.
        snapshot: Id,
        /// If forks reference it, delete it when the last one ends instead of refusing.
        #[serde(default)]
        defer: bool,
        /// Delete a damaged snapshot (still refused while anything references it).
        #[serde(default)]
        force: bool,
    },
    /// Every snapshot.
    #[serde(rename = "snapshot.list")]
    SnapshotList {},
    /// One snapshot.
    #[serde(rename = "snapshot.get")]
    SnapshotGet {
        /// Its id.
        snapshot: Id,
    },
    /// Creates a fork and returns the handoff socket its VMM must be given.
    #[serde(rename = "fork.create")]
    ForkCreate {
        /// The snapshot to fork.
        snapshot: Id,
        /// The fork's id; generated when absent.
        #[serde(default)]
        fork: Option<Id>,
    },
    /// Every fork.
    #[serde(rename = "fork.list")]
    ForkList {},
    /// One fork, with its counters.
    #[serde(rename = "fork.get")]
    ForkGet {
        /// Its id.
        fork: Id,
    },
    /// Waits until a fork reaches a state (`serving` is also satisfied by `ended`).
    #[serde(rename = "fork.wait")]
    ForkWait {
        /// Its id.
        fork: Id,
        /// The state to wait for.
        state: ForkState,
        /// How long to wait at most, in ms (default 10000, at most 600000).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Stops serving a fork and forgets it.
    #[serde(rename = "fork.close")]
    ForkClose {
        /// Its id.
        fork: Id,
    },
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The thing named does not exist.
    NotFound,
    /// The request conflicts with the current state (try again later, or change it first).
    Conflict,
    /// The request is malformed or its values are not acceptable.
    InvalidArgument,
    /// The daemon cannot do it now (overloaded, timed out, shutting down).
    Unavailable,
    /// A bug or an unexpected system failure.
    Internal,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ControlError {
    /// Stable code.
    pub code: ErrorCode,
    /// What a human can act on.
    pub message: String,
}

impl ControlError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A request line, parsed: its id (echoed back) and the request or why it is malformed.
#[derive(Debug)]
pub struct ParsedLine {
    /// The caller's request id, or null.
    pub id: Value,
    /// The request.
    pub request: Result<Request, ControlError>,
}

/// Parses one request line.
pub fn parse_line(line: &[u8]) -> ParsedLine {
    let invalid = |message: String| ControlError::new(ErrorCode::InvalidArgument, message);
    let mut object: Map<String, Value> = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return ParsedLine {
                id: Value::Null,
                request: Err(invalid("a request must be a JSON object".into())),
            }
        }
        Err(e) => {
            return ParsedLine {
                id: Value::Null,
                request: Err(invalid(format!("request is not valid JSON: {e}"))),
            }
        }
    };
    let id = object.remove("id").unwrap_or(Value::Null);
    let request = match object.remove("v") {
        Some(Value::Number(v)) if v.as_u64() == Some(PROTOCOL_VERSION) => {
            serde_json::from_value::<Request>(Value::Object(object))
                .map_err(|e| invalid(format!("bad request: {e}")))
        }
        Some(other) => Err(invalid(format!(
            "unsupported protocol version {other}; this daemon speaks v{PROTOCOL_VERSION}"
        ))),
        None => Err(invalid(format!(
            "missing protocol version field `v` (use {PROTOCOL_VERSION})"
        ))),
    };
    ParsedLine { id, request }
}

/// Builds a response line (without the newline).
pub fn response(id: Value, outcome: Result<Value, ControlError>) -> Value {
    match outcome {
        Ok(result) => {
            serde_json::json!({"v": PROTOCOL_VERSION, "id": id, "ok": true, "result": result})
        }
        Err(error) => {
            serde_json::json!({"v": PROTOCOL_VERSION, "id": id, "ok": false, "error": error})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> ErrorCode {
        parse_line(line.as_bytes()).request.unwrap_err().code
    }

    #[test]
    fn parses_requests_and_echoes_ids() {
        let p = parse_line(br#"{"v":1,"id":"abc","op":"fork.create","snapshot":"s1"}"#);
        assert_eq!(p.id, Value::from("abc"));
        assert_eq!(
            p.request.unwrap(),
            Request::ForkCreate {
                snapshot: "s1".parse().unwrap(),
                fork: None
            }
        );
        assert_eq!(
            parse_line(br#"{"v":1,"op":"status"}"#).request.unwrap(),
            Request::Status {}
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        for line in [
            "not json",
            "[1,2]",
            r#"{"op":"status"}"#,
            r#"{"v":2,"op":"status"}"#,
            r#"{"v":1,"op":"explode"}"#,
            r#"{"v":1,"op":"status","extra":1}"#,
            r#"{"v":1,"op":"fork.get","fork":42}"#,
            r#"{"v":1,"op":"fork.get","fork":"../../etc"}"#,
            r#"{"v":1,"op":"fork.get"}"#,
        ] {
            assert_eq!(code(line), ErrorCode::InvalidArgument, "{line}");
        }
    }
}
