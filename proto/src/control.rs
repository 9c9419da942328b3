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

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{ForkId, SnapshotId, VmId};
use crate::model::{
    DeleteOutcome, ExportInfo, ForkInfo, ForkListEntry, ForkState, NetworkOverride, SnapshotInfo,
    StatsReport, StatusReport, UpgradeStarted, VmBackend, VmInfo, VmState, VmmKind,
};
use crate::prefetch::Prefetch;

/// The protocol version this daemon speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request's parameters, tied by the type system to what the daemon answers.
pub trait Call: Serialize + DeserializeOwned + Into<Request> {
    /// The answer's type.
    type Answer: Serialize + DeserializeOwned;
}

/// Declares [`Request`] (one variant per op, carrying its parameter struct), each op's wire
/// name (written once, here), and the answer of each parameter struct ([`Call`]).
macro_rules! requests {
    ($( $(#[$doc:meta])* $op:literal => $variant:ident -> $answer:ty; )*) => {
        /// Every request the daemon understands, by its `op`.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum Request {
            $( $(#[$doc])* #[serde(rename = $op)] $variant($variant), )*
        }

        impl Request {
            /// Every `op` of the protocol.
            pub const OPS: &'static [&'static str] = &[$($op),*];

            /// The request's `op` on the wire.
            pub fn op(&self) -> &'static str {
                match self {
                    $( Self::$variant(_) => $op, )*
                }
            }
        }

        $(
            impl Call for $variant {
                type Answer = $answer;
            }

            impl From<$variant> for Request {
                fn from(call: $variant) -> Self {
                    Self::$variant(call)
                }
            }
        )*
    };
}

requests! {
    /// Daemon health, version and counts.
    "status" => Status -> StatusReport;
    /// Summed serving counters.
    "stats" => Stats -> StatsReport;
    /// Registers a memory file as a snapshot.
    "snapshot.register" => SnapshotRegister -> SnapshotInfo;
    /// Deletes a snapshot no fork references.
    "snapshot.delete" => SnapshotDelete -> DeleteOutcome;
    /// Every snapshot.
    "snapshot.list" => SnapshotList -> Vec<SnapshotInfo>;
    /// One snapshot.
    "snapshot.get" => SnapshotGet -> SnapshotInfo;
    /// Records a snapshot's working set from its next forks.
    "snapshot.record" => SnapshotRecord -> SnapshotInfo;
    /// Deletes a snapshot's stored working set.
    "snapshot.clear_working_set" => SnapshotClearWorkingSet -> SnapshotInfo;
    /// Writes a snapshot to a directory (backup, or moving it to another host).
    "snapshot.export" => SnapshotExport -> ExportInfo;
    /// Registers a snapshot from an exported directory, its digests checked.
    "snapshot.import" => SnapshotImport -> SnapshotInfo;
    /// Creates a fork.
    "fork.create" => ForkCreate -> ForkInfo;
    /// Every fork.
    "fork.list" => ForkList -> Vec<ForkListEntry>;
    /// One fork, with its counters.
    "fork.get" => ForkGet -> ForkInfo;
    /// Waits until a fork reaches a state.
    "fork.wait" => ForkWait -> ForkInfo;
    /// Stops serving a fork and forgets it.
    "fork.close" => ForkClose -> ForkInfo;
    /// Starts a hypervisor restored from a snapshot.
    "vm.start" => VmStart -> VmInfo;
    /// Every launched VM.
    "vm.list" => VmList -> Vec<VmInfo>;
    /// One launched VM.
    "vm.get" => VmGet -> VmInfo;
    /// Stops a VM.
    "vm.stop" => VmStop -> VmInfo;
    /// Waits until a VM reaches a state.
    "vm.wait" => VmWait -> VmInfo;
    /// Deletes an exited or failed VM.
    "vm.delete" => VmDelete -> VmInfo;
    /// Saves a running VM as a new snapshot.
    "vm.snapshot" => VmSnapshot -> SnapshotInfo;
    /// Replaces the daemon's program in place.
    "daemon.upgrade" => DaemonUpgrade -> UpgradeStarted;
}

impl Request {
    /// Whether the request changes something (as opposed to reading or waiting): what the
    /// daemon logs at `info`, with who asked.
    pub fn changes(&self) -> bool {
        !matches!(
            self,
            Self::Status(_)
                | Self::Stats(_)
                | Self::SnapshotList(_)
                | Self::SnapshotGet(_)
                | Self::ForkList(_)
                | Self::ForkGet(_)
                | Self::ForkWait(_)
                | Self::VmList(_)
                | Self::VmGet(_)
                | Self::VmWait(_)
        )
    }
}

/// `status`: daemon health, version and counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {}

/// `stats`: summed serving counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {}

/// `snapshot.register`: registers a memory file as a snapshot: copied (reflinked where the
/// filesystem can) into the state directory, or linked with `link`; never modified
/// afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRegister {
    /// The new snapshot's id.
    pub snapshot: SnapshotId,
    /// Absolute path of the memory file; with `fd`, only the name recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The memory file comes as a descriptor passed with this line (`SCM_RIGHTS`), opened
    /// for reading by the client. Required unless the client is root.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fd: bool,
    /// Link the file instead of copying it. The file must then never be written,
    /// truncated or replaced in place again while the snapshot exists; a change marks
    /// the snapshot damaged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub link: bool,
    /// The hypervisor's device state saved with the memory (always copied, mode as the
    /// memory's); with `fd`, it is the second descriptor and this only its recorded name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<PathBuf>,
    /// Which hypervisor `vmstate` is for (required with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
}

/// `snapshot.delete`: deletes a snapshot no fork references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelete {
    /// Its id.
    pub snapshot: SnapshotId,
    /// If forks reference it, delete it when the last one ends instead of refusing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub defer: bool,
    /// Delete a damaged snapshot (still refused while anything references it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// `snapshot.list`: every snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotList {}

/// `snapshot.get`: one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotGet {
    /// Its id.
    pub snapshot: SnapshotId,
}

/// `snapshot.record`: records the working set of a snapshot from its next `forks` uffd forks
/// (default 1), merged with nothing before: the new set replaces the stored one once they are
/// done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// Its id.
    pub snapshot: SnapshotId,
    /// How many forks to record (1 to 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forks: Option<u32>,
}

/// `snapshot.clear_working_set`: deletes a snapshot's stored working set (and any recording
/// in progress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotClearWorkingSet {
    /// Its id.
    pub snapshot: SnapshotId,
}

/// `snapshot.export`: writes a snapshot (memory, device state, working set, and a manifest
/// with their digests) to a directory, created if missing and holding no export yet. Root
/// and pagerd's own user only: the daemon writes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotExport {
    /// Its id.
    pub snapshot: SnapshotId,
    /// The directory (absolute).
    pub dir: PathBuf,
}

/// `snapshot.import`: registers the export in a directory as a snapshot once every file
/// matches its digest. Root and pagerd's own user only: the daemon reads there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotImport {
    /// The directory (absolute).
    pub dir: PathBuf,
    /// The new snapshot's id (default: the id it was exported as).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotId>,
}

/// `fork.create`: creates a fork and returns the handoff socket its VMM must be given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkCreate {
    /// The snapshot to fork.
    pub snapshot: SnapshotId,
    /// The fork's id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkId>,
    /// What to install before the guest asks (default: the daemon's `--prefetch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Prefetch>,
}

/// `fork.list`: every fork.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkList {}

/// `fork.get`: one fork, with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkGet {
    /// Its id.
    pub fork: ForkId,
}

/// `fork.wait`: waits until a fork reaches a state (`serving` is also satisfied by `ended`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkWait {
    /// Its id.
    pub fork: ForkId,
    /// The state to wait for.
    pub state: ForkState,
    /// How long to wait at most, in ms (default 10000, at most 600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `fork.close`: stops serving a fork and forgets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkClose {
    /// Its id.
    pub fork: ForkId,
}

/// `vm.start`: starts a hypervisor restored from a snapshot with saved device state, its
/// memory served by pagerd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStart {
    /// The snapshot to restore.
    pub snapshot: SnapshotId,
    /// The VM's id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmId>,
    /// How it gets its memory (default `uffd`).
    #[serde(default)]
    pub backend: VmBackend,
    /// Host tap devices for the snapshot's network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock Unix socket path for this clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<PathBuf>,
    /// What its `uffd` fork gets installed before the guest asks (default: the daemon's
    /// `--prefetch`); not for the `file` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Prefetch>,
}

/// `vm.list`: every launched VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmList {}

/// `vm.get`: one launched VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGet {
    /// Its id.
    pub vm: VmId,
}

/// `vm.stop`: stops a VM: SIGTERM, then SIGKILL after the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStop {
    /// Its id.
    pub vm: VmId,
    /// How long to wait after SIGTERM before SIGKILL, in ms (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `vm.wait`: waits until a VM reaches a state (`running` is also satisfied by `exited` and
/// `failed`, `exited` by `failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmWait {
    /// Its id.
    pub vm: VmId,
    /// The state to wait for.
    pub state: VmState,
    /// How long to wait at most, in ms (default 10000, at most 600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `vm.delete`: deletes an exited or failed VM: its record and directory; its id is free
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDelete {
    /// Its id.
    pub vm: VmId,
}

/// `vm.snapshot`: pauses a running VM, saves its device state and memory as a new snapshot
/// (a new fan-out parent), then resumes it or leaves it paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The VM.
    pub vm: VmId,
    /// The new snapshot's id.
    pub snapshot: SnapshotId,
    /// Resume the VM afterwards (otherwise it stays paused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// `daemon.upgrade`: replaces the daemon's program in place (same pid): every live fork is
/// taken back and served by the new program.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonUpgrade {
    /// The new program (absolute path); default: the one the daemon was started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
}

/// Stable error codes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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
    pub const ALL: &'static [Self] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
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
            Request::ForkCreate(ForkCreate {
                snapshot: "s1".parse().unwrap(),
                fork: None,
                prefetch: None,
            })
        );
        assert_eq!(
            parse_line(br#"{"v":1,"op":"status"}"#).request.unwrap(),
            Request::Status(Status {})
        );
    }

    #[test]
    fn request_lines_round_trip() {
        let requests = [
            Request::Status(Status {}),
            Request::ForkCreate(ForkCreate {
                snapshot: "s1".parse().unwrap(),
                fork: None,
                prefetch: Some(Prefetch::Graduate),
            }),
            Request::SnapshotRecord(SnapshotRecord {
                snapshot: "s1".parse().unwrap(),
                forks: Some(2),
            }),
            Request::SnapshotClearWorkingSet(SnapshotClearWorkingSet {
                snapshot: "s1".parse().unwrap(),
            }),
            Request::SnapshotDelete(SnapshotDelete {
                snapshot: "s1".parse().unwrap(),
                defer: true,
                force: false,
            }),
            Request::SnapshotRegister(SnapshotRegister {
                snapshot: "s1".parse().unwrap(),
                path: Some("/m".into()),
                fd: true,
                link: true,
                vmstate: Some("/v".into()),
                vmm: Some(VmmKind::Firecracker),
            }),
            Request::VmStart(VmStart {
                snapshot: "s1".parse().unwrap(),
                vm: Some("vm1".parse().unwrap()),
                backend: VmBackend::File,
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap1".into(),
                }],
                vsock: Some("/v.sock".into()),
                prefetch: Some(Prefetch::Off),
            }),
            Request::VmSnapshot(VmSnapshot {
                vm: "vm1".parse().unwrap(),
                snapshot: "s2".parse().unwrap(),
                resume: true,
            }),
            Request::VmDelete(VmDelete {
                vm: "vm1".parse().unwrap(),
            }),
            Request::ForkWait(ForkWait {
                fork: "f".parse().unwrap(),
                state: ForkState::Ended,
                timeout_ms: Some(5),
            }),
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
            let again =
                parse_line(request_line(&parsed.id, &Request::Status(Status {})).as_bytes());
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
