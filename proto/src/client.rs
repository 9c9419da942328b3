//! A blocking client of the control socket: one connection per call, one request line out,
//! one response line back, decoded into the [`model`](crate::model) type of that request.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::control::{
    request_line, Call, ControlError, DaemonUpgrade, ErrorCode, ForkClose, ForkCreate, ForkGet,
    ForkList, ForkWait, Request, Response, SnapshotClearWorkingSet, SnapshotDelete, SnapshotGet,
    SnapshotList, SnapshotRecord, SnapshotRegister, Stats, Status, VmGet, VmList, VmSnapshot,
    VmStart, VmStop, VmWait,
};
use crate::ids::{Id, Kind};
use crate::model::{
    DeleteOutcome, ForkInfo, ForkListEntry, ForkState, NetworkOverride, SnapshotInfo, StatsReport,
    StatusReport, VmBackend, VmInfo, VmState, VmmKind,
};
use crate::prefetch::Prefetch;

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
    /// The file to pass could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
pub fn parse_id<K: Kind>(text: &str) -> Result<Id<K>, ClientError> {
    text.parse().map_err(|e: crate::ids::InvalidId| {
        ClientError::Refused(ControlError::new(ErrorCode::InvalidArgument, e.to_string()))
    })
}

/// A client of the control socket at one path.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the socket at `path`, giving up on an answer after [`IO_TIMEOUT`].
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            timeout: IO_TIMEOUT,
        }
    }

    /// The same client, giving up on an answer after `timeout` (waits add their own).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and returns the daemon's result as JSON.
    pub fn call_value(&self, request: &Request) -> Result<Value, ClientError> {
        self.call_value_with_fds(request, &[])
    }

    /// Sends one request with descriptors attached to its line (`SCM_RIGHTS`) and returns
    /// the daemon's result as JSON.
    pub fn call_value_with_fds(
        &self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        let extra = match request {
            Request::ForkWait(ForkWait { timeout_ms, .. })
            | Request::VmWait(VmWait { timeout_ms, .. }) => {
                Duration::from_millis(timeout_ms.unwrap_or(10_000))
            }
            Request::VmStop(VmStop { timeout_ms, .. }) => {
                Duration::from_millis(timeout_ms.unwrap_or(5_000))
            }
            _ => Duration::ZERO,
        };
        stream
            .set_read_timeout(Some(self.timeout + extra))
            .map_err(ClientError::Io)?;
        let line = request_line(&Value::from(1), request) + "\n";
        crate::fdpass::send_with_fds(&stream, line.as_bytes(), fds).map_err(ClientError::Io)?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(ClientError::Io)?;
        let response: Response = serde_json::from_str(&line)
            .map_err(|e| ClientError::Malformed(format!("{e}: {line:?}")))?;
        response.into_result().map_err(ClientError::Refused)
    }

    /// Sends one request and decodes the daemon's answer as that request's answer type.
    pub fn call<C: Call>(&self, call: C) -> Result<C::Answer, ClientError> {
        self.call_with_fds(call, &[])
    }

    /// [`Self::call`] with descriptors attached to the request's line.
    pub fn call_with_fds<C: Call>(
        &self,
        call: C,
        fds: &[BorrowedFd<'_>],
    ) -> Result<C::Answer, ClientError> {
        let value = self.call_value_with_fds(&call.into(), fds)?;
        serde_json::from_value(value).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// `status`.
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.call(Status {})
    }

    /// `stats`.
    pub fn stats(&self) -> Result<StatsReport, ClientError> {
        self.call(Stats {})
    }

    /// `snapshot.register` of the file at `path`, opened here (a symlink is refused, as the
    /// daemon does) and passed as a descriptor: the daemon reads only what this process can.
    /// With `link` the file is linked, not copied, and must never be written again.
    pub fn register_snapshot(
        &self,
        id: impl AsRef<str>,
        path: &Path,
        link: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        let file = open_memory_file(path)?;
        self.register_snapshot_fd(id, path, file.as_fd(), link)
    }

    /// `snapshot.register` of an open file; `name` is recorded as its source.
    pub fn register_snapshot_fd(
        &self,
        id: impl AsRef<str>,
        name: &Path,
        file: BorrowedFd<'_>,
        link: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        let call = SnapshotRegister {
            snapshot: parse_id(id.as_ref())?,
            path: Some(name.to_owned()),
            fd: true,
            link,
            vmstate: None,
            vmm: None,
        };
        self.call_with_fds(call, &[file])
    }

    /// `snapshot.register` by path alone: the daemon opens the file itself, which it allows
    /// only for root and its own user.
    pub fn register_snapshot_path(
        &self,
        id: impl AsRef<str>,
        path: &Path,
        link: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call(SnapshotRegister {
            snapshot: parse_id(id.as_ref())?,
            path: Some(path.to_owned()),
            fd: false,
            link,
            vmstate: None,
            vmm: None,
        })
    }

    /// `snapshot.register` of a memory file with the hypervisor state saved beside it: both
    /// opened here and passed as descriptors (memory first).
    pub fn register_bundle(
        &self,
        id: impl AsRef<str>,
        memory: &Path,
        vmstate: &Path,
        vmm: VmmKind,
        link: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        let memory_file = open_memory_file(memory)?;
        let state_file = open_memory_file(vmstate)?;
        let call = SnapshotRegister {
            snapshot: parse_id(id.as_ref())?,
            path: Some(memory.to_owned()),
            fd: true,
            link,
            vmstate: Some(vmstate.to_owned()),
            vmm: Some(vmm),
        };
        self.call_with_fds(call, &[memory_file.as_fd(), state_file.as_fd()])
    }

    /// `snapshot.delete`; `force` removes a damaged snapshot.
    pub fn delete_snapshot(
        &self,
        id: impl AsRef<str>,
        defer: bool,
        force: bool,
    ) -> Result<DeleteOutcome, ClientError> {
        self.call(SnapshotDelete {
            snapshot: parse_id(id.as_ref())?,
            defer,
            force,
        })
    }

    /// `snapshot.list`.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.call(SnapshotList {})
    }

    /// `snapshot.get`.
    pub fn snapshot(&self, id: impl AsRef<str>) -> Result<SnapshotInfo, ClientError> {
        self.call(SnapshotGet {
            snapshot: parse_id(id.as_ref())?,
        })
    }

    /// `fork.create` with the daemon's default prefetch.
    pub fn create_fork(
        &self,
        snapshot: impl AsRef<str>,
        fork: Option<&str>,
    ) -> Result<ForkInfo, ClientError> {
        self.create_fork_with(snapshot, fork, None)
    }

    /// `fork.create`, choosing what is installed before the guest asks.
    pub fn create_fork_with(
        &self,
        snapshot: impl AsRef<str>,
        fork: Option<&str>,
        prefetch: Option<Prefetch>,
    ) -> Result<ForkInfo, ClientError> {
        self.call(ForkCreate {
            snapshot: parse_id(snapshot.as_ref())?,
            fork: fork.map(parse_id).transpose()?,
            prefetch,
        })
    }

    /// `snapshot.record`: the next `forks` uffd forks record the working set.
    pub fn record_working_set(
        &self,
        snapshot: impl AsRef<str>,
        forks: Option<u32>,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call(SnapshotRecord {
            snapshot: parse_id(snapshot.as_ref())?,
            forks,
        })
    }

    /// `snapshot.clear_working_set`.
    pub fn clear_working_set(
        &self,
        snapshot: impl AsRef<str>,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call(SnapshotClearWorkingSet {
            snapshot: parse_id(snapshot.as_ref())?,
        })
    }

    /// `fork.list`.
    pub fn forks(&self) -> Result<Vec<ForkListEntry>, ClientError> {
        self.call(ForkList {})
    }

    /// `fork.get`.
    pub fn fork(&self, id: impl AsRef<str>) -> Result<ForkInfo, ClientError> {
        self.call(ForkGet {
            fork: parse_id(id.as_ref())?,
        })
    }

    /// `fork.wait`.
    pub fn wait_fork(
        &self,
        id: impl AsRef<str>,
        state: ForkState,
        timeout: Duration,
    ) -> Result<ForkInfo, ClientError> {
        self.call(ForkWait {
            fork: parse_id(id.as_ref())?,
            state,
            timeout_ms: Some(millis(timeout)),
        })
    }

    /// `fork.close`.
    pub fn close_fork(&self, id: impl AsRef<str>) -> Result<ForkInfo, ClientError> {
        self.call(ForkClose {
            fork: parse_id(id.as_ref())?,
        })
    }

    /// `vm.start` with the daemon's default prefetch.
    pub fn start_vm(
        &self,
        snapshot: impl AsRef<str>,
        vm: Option<&str>,
        backend: VmBackend,
        network_overrides: Vec<NetworkOverride>,
        vsock: Option<PathBuf>,
    ) -> Result<VmInfo, ClientError> {
        self.start_vm_with(snapshot, vm, backend, network_overrides, vsock, None)
    }

    /// `vm.start`, choosing what the VM's fork prefetches.
    pub fn start_vm_with(
        &self,
        snapshot: impl AsRef<str>,
        vm: Option<&str>,
        backend: VmBackend,
        network_overrides: Vec<NetworkOverride>,
        vsock: Option<PathBuf>,
        prefetch: Option<Prefetch>,
    ) -> Result<VmInfo, ClientError> {
        self.call(VmStart {
            snapshot: parse_id(snapshot.as_ref())?,
            vm: vm.map(parse_id).transpose()?,
            backend,
            prefetch,
            network_overrides,
            vsock,
        })
    }

    /// `vm.list`.
    pub fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.call(VmList {})
    }

    /// `vm.get`.
    pub fn vm(&self, id: impl AsRef<str>) -> Result<VmInfo, ClientError> {
        self.call(VmGet {
            vm: parse_id(id.as_ref())?,
        })
    }

    /// `vm.stop`.
    pub fn stop_vm(
        &self,
        id: impl AsRef<str>,
        timeout: Option<Duration>,
    ) -> Result<VmInfo, ClientError> {
        self.call(VmStop {
            vm: parse_id(id.as_ref())?,
            timeout_ms: timeout.map(millis),
        })
    }

    /// `vm.wait`.
    pub fn wait_vm(
        &self,
        id: impl AsRef<str>,
        state: VmState,
        timeout: Duration,
    ) -> Result<VmInfo, ClientError> {
        self.call(VmWait {
            vm: parse_id(id.as_ref())?,
            state,
            timeout_ms: Some(millis(timeout)),
        })
    }

    /// `vm.snapshot`: a new snapshot `snapshot` of VM `id`.
    pub fn snapshot_vm(
        &self,
        id: impl AsRef<str>,
        snapshot: impl AsRef<str>,
        resume: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call(VmSnapshot {
            vm: parse_id(id.as_ref())?,
            snapshot: parse_id(snapshot.as_ref())?,
            resume,
        })
    }

    /// Asks the daemon to replace its program in place (`daemon.upgrade`).
    pub fn upgrade(
        &self,
        binary: Option<std::path::PathBuf>,
    ) -> Result<crate::model::UpgradeStarted, ClientError> {
        self.call(DaemonUpgrade { binary })
    }
}

/// Opens a memory file to pass to pagerd, refusing a symlink as pagerd does.
/// A duration in whole milliseconds, as requests carry timeouts.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn open_memory_file(path: &Path) -> Result<File, ClientError> {
    File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| {
            let source = if source.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(source.kind(), "is a symlink; pass the target")
            } else {
                source
            };
            ClientError::Open {
                path: path.to_owned(),
                source,
            }
        })
}
