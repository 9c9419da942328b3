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
//! are rejected. `docs/protocol.md` lists every request. [`ErrorCode::exit_code`] is the
//! CLI's exit status for each error.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::Id;
use crate::model::{ForkState, NetworkOverride, VmBackend, VmState, VmmKind};
use crate::prefetch::Prefetch;

/// The protocol version this daemon speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Every request the daemon understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<std::path::PathBuf>,
        /// The memory file comes as a descriptor passed with this line (`SCM_RIGHTS`), opened
        /// for reading by the client. Required unless the client is root.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fd: bool,
        /// Link the file instead of copying it. The file must then never be written,
        /// truncated or replaced in place again while the snapshot exists; a change marks
        /// the snapshot damaged.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        link: bool,
        /// The hypervisor's device state saved with the memory (always copied, mode as the
        /// memory's); with `fd`, it is the second descriptor and this only its recorded name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vmstate: Option<std::path::PathBuf>,
        /// Which hypervisor `vmstate` is for (required with it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vmm: Option<VmmKind>,
    },
    /// Deletes a snapshot no fork references.
    #[serde(rename = "snapshot.delete")]
    SnapshotDelete {
        /// Its id.
        snapshot: Id,
        /// If forks reference it, delete it when the last one ends instead of refusing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        defer: bool,
        /// Delete a damaged snapshot (still refused while anything references it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
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
    /// Records the working set of a snapshot from its next `forks` uffd forks (default 1),
    /// merged with nothing before: the new set replaces the stored one once they are done.
    #[serde(rename = "snapshot.record")]
    SnapshotRecord {
        /// Its id.
        snapshot: Id,
        /// How many forks to record (1 to 16).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        forks: Option<u32>,
    },
    /// Deletes a snapshot's stored working set (and any recording in progress).
    #[serde(rename = "snapshot.clear_working_set")]
    SnapshotClearWorkingSet {
        /// Its id.
        snapshot: Id,
    },
    /// Creates a fork and returns the handoff socket its VMM must be given.
    #[serde(rename = "fork.create")]
    ForkCreate {
        /// The snapshot to fork.
        snapshot: Id,
        /// The fork's id; generated when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fork: Option<Id>,
        /// What to install before the guest asks (default: the daemon's `--prefetch`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefetch: Option<Prefetch>,
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Stops serving a fork and forgets it.
    #[serde(rename = "fork.close")]
    ForkClose {
        /// Its id.
        fork: Id,
    },
    /// Starts a hypervisor restored from a snapshot with saved device state, its memory
    /// served by pagerd.
    #[serde(rename = "vm.start")]
    VmStart {
        /// The snapshot to restore.
        snapshot: Id,
        /// The VM's id; generated when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<Id>,
        /// How it gets its memory (default `uffd`).
        #[serde(default)]
        backend: VmBackend,
        /// Host tap devices for the snapshot's network interfaces.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        network_overrides: Vec<NetworkOverride>,
        /// The vsock Unix socket path for this clone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vsock: Option<std::path::PathBuf>,
        /// What its `uffd` fork gets installed before the guest asks (default: the daemon's
        /// `--prefetch`); not for the `file` backend.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefetch: Option<Prefetch>,
    },
    /// Every launched VM.
    #[serde(rename = "vm.list")]
    VmList {},
    /// One launched VM.
    #[serde(rename = "vm.get")]
    VmGet {
        /// Its id.
        vm: Id,
    },
    /// Stops a VM: SIGTERM, then SIGKILL after the timeout.
    #[serde(rename = "vm.stop")]
    VmStop {
        /// Its id.
        vm: Id,
        /// How long to wait after SIGTERM before SIGKILL, in ms (default 5000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Waits until a VM reaches a state (`running` is also satisfied by `exited` and
    /// `failed`, `exited` by `failed`).
    #[serde(rename = "vm.wait")]
    VmWait {
        /// Its id.
        vm: Id,
        /// The state to wait for.
        state: VmState,
        /// How long to wait at most, in ms (default 10000, at most 600000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Deletes an exited or failed VM: its record and directory; its id is free again.
    #[serde(rename = "vm.delete")]
    VmDelete {
        /// Its id.
        vm: Id,
    },
    /// Pauses a running VM, saves its device state and memory as a new snapshot (a new
    /// fan-out parent), then resumes it or leaves it paused.
    #[serde(rename = "vm.snapshot")]
    VmSnapshot {
        /// The VM.
        vm: Id,
        /// The new snapshot's id.
        snapshot: Id,
        /// Resume the VM afterwards (otherwise it stays paused).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    /// Replaces the daemon's program in place (same pid): every live fork is taken back and
    /// served by the new program.
    #[serde(rename = "daemon.upgrade")]
    DaemonUpgrade {
        /// The new program (absolute path); default: the one the daemon was started from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The caller may not do this: the operation is root's, or the object is another user's.
    PermissionDenied,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::InvalidArgument,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::PermissionDenied,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::InvalidArgument => "invalid_argument",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::PermissionDenied => "permission_denied",
        }
    }

    /// The exit status `pagerctl` ends with when the daemon answers this error (see
    /// `docs/protocol.md`; 2 is a usage error, 8 an unreachable daemon, 9 an unhealthy one).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::NotFound => 3,
            Self::Conflict => 4,
            Self::InvalidArgument => 5,
            Self::Unavailable => 6,
            Self::Internal => 7,
            Self::PermissionDenied => 10,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
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
    let mut object: Map<String, Value> = match crate::json::parse_strict(line) {
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

/// One request as a line for the socket (without the newline): the request's fields plus
/// the protocol version and the caller's `id`.
pub fn request_line(id: &Value, request: &Request) -> String {
    let mut object = match serde_json::to_value(request) {
        Ok(Value::Object(object)) => object,
        // Every request is a struct variant, which serialises as an object.
        _ => Map::new(),
    };
    object.insert("v".into(), Value::from(PROTOCOL_VERSION));
    object.insert("id".into(), id.clone());
    Value::Object(object).to_string()
}

/// A response line as a client reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The protocol version.
    pub v: u64,
    /// The request's id, echoed.
    #[serde(default)]
    pub id: Value,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when it did.
    #[serde(default)]
    pub result: Option<Value>,
    /// The error, when it did not.
    #[serde(default)]
    pub error: Option<ControlError>,
}

impl Response {
    /// The result, or the error.
    pub fn into_result(self) -> Result<Value, ControlError> {
        match (self.ok, self.result, self.error) {
            (true, result, _) => Ok(result.unwrap_or(Value::Null)),
            (false, _, Some(error)) => Err(error),
            (false, _, None) => Err(ControlError::new(
                ErrorCode::Internal,
                "the daemon refused the request without saying why",
            )),
        }
    }
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
                fork: None,
                prefetch: None,
            }
        );
        assert_eq!(
            parse_line(br#"{"v":1,"op":"status"}"#).request.unwrap(),
            Request::Status {}
        );
    }

    #[test]
    fn request_lines_round_trip() {
        let requests = [
            Request::Status {},
            Request::ForkCreate {
                snapshot: "s1".parse().unwrap(),
                fork: None,
                prefetch: Some(Prefetch::Graduate),
            },
            Request::SnapshotRecord {
                snapshot: "s1".parse().unwrap(),
                forks: Some(2),
            },
            Request::SnapshotClearWorkingSet {
                snapshot: "s1".parse().unwrap(),
            },
            Request::SnapshotDelete {
                snapshot: "s1".parse().unwrap(),
                defer: true,
                force: false,
            },
            Request::SnapshotRegister {
                snapshot: "s1".parse().unwrap(),
                path: Some("/m".into()),
                fd: true,
                link: true,
                vmstate: Some("/v".into()),
                vmm: Some(VmmKind::Firecracker),
            },
            Request::VmStart {
                snapshot: "s1".parse().unwrap(),
                vm: Some("vm1".parse().unwrap()),
                backend: VmBackend::File,
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap1".into(),
                }],
                vsock: Some("/v.sock".into()),
                prefetch: Some(Prefetch::Off),
            },
            Request::VmSnapshot {
                vm: "vm1".parse().unwrap(),
                snapshot: "s2".parse().unwrap(),
                resume: true,
            },
            Request::VmDelete {
                vm: "vm1".parse().unwrap(),
            },
            Request::ForkWait {
                fork: "f".parse().unwrap(),
                state: ForkState::Ended,
                timeout_ms: Some(5),
            },
        ];
        for request in requests {
            let line = request_line(&Value::from(9), &request);
            let parsed = parse_line(line.as_bytes());
            assert_eq!(parsed.id, Value::from(9));
            assert_eq!(parsed.request.unwrap(), request, "{line}");
        }
    }

    #[test]
    fn ids_are_echoed_exactly_floats_included() {
        // Found by fuzzing: parsed with serde_json's default (fast, not always nearest)
        // float parsing, this id came back one unit in the last place off.
        for id in [
            "18446000000000138365696",
            "1.8446000000000139e22",
            "0.1",
            "-2.5e-308",
        ] {
            let line = format!("{{\"v\":1,\"id\":[{id}],\"op\":\"status\"}}");
            let parsed = parse_line(line.as_bytes());
            let echoed = response(parsed.id.clone(), Ok(Value::Null)).to_string();
            let read: Response = serde_json::from_str(&echoed).unwrap();
            assert_eq!(read.id, parsed.id, "{line} → {echoed}");
            let again = parse_line(request_line(&parsed.id, &Request::Status {}).as_bytes());
            assert_eq!(again.id, parsed.id, "{line}");
        }
    }

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes: Vec<u8> = ErrorCode::ALL.iter().map(|c| c.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        // 0 done, 1 other failures, 2 usage, 8 unreachable, 9 unhealthy (pagerctl's own).
        assert!(
            codes.iter().all(|&c| c > 2 && c != 8 && c != 9),
            "{codes:?}"
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
            r#"{"v":1,"op":"fork.get","fork":"a","fork":"b"}"#,
        ] {
            assert_eq!(code(line), ErrorCode::InvalidArgument, "{line}");
        }
    }
}
