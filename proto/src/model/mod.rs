//! What the daemon reports: forks, snapshots, processes holding memory files, status and
//! counters, and the typed reasons behind states.
//!
//! Every enum serialises as a stable snake_case string (`"vmm_exited"`, `"already_serving"`,
//! `"passthrough"`); code compares the enums, never the strings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ids::{ForkId, SnapshotId, VmId};
use crate::prefetch::{Prefetch, RecordingInfo, WorkingSetInfo};

mod vm;
pub use vm::{JailInfo, NetworkOverride, VmBackend, VmInfo, VmState, VmStateInfo, VmmKind};

/// Where a fork is in its life.
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
pub enum ForkState {
    /// The handoff socket listens; no VMM has handed over a uffd yet.
    Waiting,
    /// A VMM's uffd is being served.
    Serving,
    /// Serving stopped and the reference was released; the entry stays, for its counters,
    /// until the fork is closed or the daemon restarts.
    Ended,
    /// Its VMM outlived a daemon restart: nobody serves it, but it still references its
    /// snapshot until it is closed.
    Detached,
}

impl ForkState {
    /// Every state, in life order.
    pub const ALL: &'static [Self] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why serving a fork ended (or, for `detached`, why nobody serves it).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
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
pub enum EndReason {
    /// The VMM process exited (its pidfd fired, or the kernel answered `ESRCH`).
    VmmExited,
    /// The uffd hung up.
    UffdGone,
    /// The fork was closed on the control socket.
    Closed,
    /// The daemon shut down while serving it.
    Shutdown,
    /// Reading the uffd failed.
    ReadFailed,
    /// The VMM tampered with the shared uffd (e.g. cleared `O_NONBLOCK`); it was cut off.
    UffdTampered,
    /// The VMM raised a fault pagerd cannot serve (write-protect, minor, or one that could
    /// not even be answered with poison).
    UnservableFault,
    /// The same fault kept coming back for a page already present.
    Livelock,
    /// The worker chosen to serve it had exited.
    NoWorker,
    /// Every page was present (graduation): pagerd unregistered the memory from the uffd and
    /// let go; the fork needs nothing more from it.
    Graduated,
}

impl EndReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a fork whose VMM outlived a daemon restart is `detached`: its uffd could not be taken
/// back, so nothing serves it.
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
pub enum DetachedReason {
    /// The record predates pagerd keeping what recovery needs (regions, the uffd's identity).
    RecordTooOld,
    /// No descriptor of the VMM is that uffd any more.
    UffdNotFound,
    /// The daemon may not take descriptors out of the VMM (`pidfd_getfd` needs ptrace rights:
    /// root or `CAP_SYS_PTRACE`).
    NotPermitted,
    /// The recorded regions no longer fit the snapshot, or the snapshot is not served.
    InvalidRecord,
    /// Serving could not be set up again.
    SetupFailed,
}

impl DetachedReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a handoff was refused: sent to the VMM on its connection and kept on the fork.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
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
pub enum RefusalReason {
    /// No file descriptor came with the message.
    NoFd,
    /// More than one file descriptor came with it.
    SeveralFds,
    /// The descriptor is not a userfaultfd.
    NotUserfaultfd,
    /// The uffd negotiated features pagerd does not serve (fork, remap or unmap events).
    UnsupportedFeatures,
    /// The message is over the size limit.
    TooLarge,
    /// The connection closed before a whole message.
    Incomplete,
    /// Reading the socket failed.
    Io,
    /// No whole message arrived in time.
    TimedOut,
    /// The bytes are not a region list.
    InvalidJson,
    /// The region list is empty.
    NoRegions,
    /// Too many regions.
    TooManyRegions,
    /// A region has no page size.
    MissingPageSize,
    /// A region's two page-size fields disagree.
    PageSizeMismatch,
    /// A page size other than 4 KiB or 2 MiB.
    UnsupportedPageSize,
    /// A base, size or offset not aligned to the page size.
    Unaligned,
    /// A region of size zero.
    EmptyRegion,
    /// A range overflows 64 bits.
    Overflow,
    /// Two regions overlap in the VMM's address space.
    Overlap,
    /// Two regions overlap in the snapshot memory file.
    FileOverlap,
    /// A region runs past the end of the memory file.
    PastEndOfFile,
    /// The fork already has a VMM.
    AlreadyServing,
    /// The fork's snapshot is not being served.
    SnapshotMissing,
    /// Setting up serving failed (an allocation or system call).
    SetupFailed,
    /// No worker thread is running.
    NoWorker,
    /// Too many handoff connections are waiting for their message (in all, for this socket
    /// or for the peer's uid), or pagerd is out of file descriptors: try again later.
    Busy,
}

/// How a snapshot's memory file was brought into the state directory.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
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
pub enum ImportMethod {
    /// A second name for the operator's inode (asked for by name; the file must never be
    /// written again).
    Hardlink,
    /// A copy-on-write clone of the extents.
    Reflink,
    /// A byte copy.
    Copy,
}

impl ImportMethod {
    /// Whether pagerd owns the file (a copy or clone), as opposed to sharing the caller's.
    pub fn is_private(self) -> bool {
        self != Self::Hardlink
    }
}

/// How reads of the FUSE memory files reach the snapshot.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
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
pub enum ReadPath {
    /// pagerd answers every read.
    Cached,
    /// The kernel reads and maps the backing file itself (FUSE passthrough).
    Passthrough,
}

/// A refused handoff, as reported on its fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffErrorInfo {
    /// Stable reason.
    pub reason: RefusalReason,
    /// What a human can act on.
    pub message: String,
}

/// A point-in-time copy of a fork's serving counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkStatsReport {
    /// Page-fault events read.
    pub faults: u64,
    /// Pages filled by copying snapshot bytes.
    pub pages_copied: u64,
    /// Bytes filled by copying snapshot bytes.
    pub bytes_copied: u64,
    /// Pages filled with zeros.
    pub zero_pages: u64,
    /// Faults on pages already present.
    pub already_present: u64,
    /// REMOVE events applied.
    pub removes: u64,
    /// Faults retried after `EAGAIN`.
    pub deferred_retries: u64,
    /// Faults outside every declared region.
    pub outside_faults: u64,
    /// Pages answered with `UFFDIO_POISON` (the access gets `SIGBUS`).
    #[serde(default)]
    pub poisoned_pages: u64,
    /// Faults that failed otherwise.
    pub errors: u64,
    /// Pages installed by replaying the snapshot's working set (copies and zero pages).
    #[serde(default)]
    pub replayed_pages: u64,
    /// Pages installed by graduation (after the working set, before any fault).
    #[serde(default)]
    pub graduated_pages: u64,
    /// Pages replay or graduation left alone: already present, or given back by the guest.
    #[serde(default)]
    pub prefetch_skipped: u64,
    /// Pages this fork contributed to a working-set recording (first touches).
    #[serde(default)]
    pub recorded_pages: u64,
    /// Fault service latency in nanoseconds.
    pub latency_ns: LatencyReport,
}

/// Summary of a latency histogram, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl std::ops::AddAssign<&ForkStatsReport> for ForkStatsReport {
    /// Adds another fork's counters; of the latency summary only `count` and `max` add up.
    fn add_assign(&mut self, r: &ForkStatsReport) {
        self.faults += r.faults;
        self.pages_copied += r.pages_copied;
        self.bytes_copied += r.bytes_copied;
        self.zero_pages += r.zero_pages;
        self.already_present += r.already_present;
        self.removes += r.removes;
        self.deferred_retries += r.deferred_retries;
        self.outside_faults += r.outside_faults;
        self.poisoned_pages += r.poisoned_pages;
        self.errors += r.errors;
        self.replayed_pages += r.replayed_pages;
        self.graduated_pages += r.graduated_pages;
        self.prefetch_skipped += r.prefetch_skipped;
        self.recorded_pages += r.recorded_pages;
        self.latency_ns.count += r.latency_ns.count;
        self.latency_ns.max = self.latency_ns.max.max(r.latency_ns.max);
    }
}

/// A uffd fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkInfo {
    /// Fork id.
    pub id: ForkId,
    /// Snapshot id.
    pub snapshot: SnapshotId,
    /// The uid that created it (root for forks created before owners were kept).
    #[serde(default)]
    pub owner: u32,
    /// State.
    pub state: ForkState,
    /// The socket to give the VMM.
    pub handoff_socket: PathBuf,
    /// The VMM's pid.
    pub vmm_pid: Option<i32>,
    /// Negotiated uffd features.
    pub uffd_features: Option<u64>,
    /// Serving worker.
    pub worker: Option<usize>,
    /// Why serving ended.
    pub end_reason: Option<EndReason>,
    /// Why a `detached` fork's uffd could not be taken back after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_reason: Option<DetachedReason>,
    /// 1 when this daemon took the fork's uffd back from its live VMM at start (after a
    /// crash, restart or upgrade), 0 when it attached the VMM itself.
    #[serde(default)]
    pub recovered: u32,
    /// Why the attached VMM could not be recorded (a full state disk, say): the fork is
    /// served, but a restart of pagerd cannot take its uffd back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_error: Option<String>,
    /// The last refused handoff.
    pub last_handoff_error: Option<HandoffErrorInfo>,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// What pagerd installs before the guest asks.
    #[serde(default)]
    pub prefetch: Prefetch,
    /// Whether this fork records what it touches into the snapshot's working set.
    #[serde(default)]
    pub recording: bool,
    /// Serving counters.
    pub stats: ForkStatsReport,
}

/// How a process holds a memory file on the FUSE mount.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
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
pub enum FileUserState {
    /// The kernel holds an open handle (descriptors or mappings).
    Open,
    /// The handle was released but the process still maps the file (passthrough).
    Mapped,
}

/// A process holding a snapshot's memory file on the FUSE mount (a reference too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUserInfo {
    /// `file-<handle>`.
    pub id: String,
    /// The snapshot whose memory file it holds.
    pub snapshot: SnapshotId,
    /// The process, from the FUSE request (0 if the kernel could not name it).
    pub pid: i32,
    /// How it holds the file.
    pub state: FileUserState,
    /// When it opened the file, ms since the Unix epoch.
    pub opened_unix_ms: u64,
}

impl std::fmt::Display for FileUserInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            FileUserState::Open => "open",
            FileUserState::Mapped => "mapped",
        };
        write!(f, "{} (pid {}, {state})", self.id, self.pid)
    }
}

/// One entry of `fork.list`: a uffd fork, or a process holding a memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ForkListEntry {
    /// A uffd fork.
    Uffd(Box<ForkInfo>),
    /// A process holding a memory file on the FUSE mount.
    File(FileUserInfo),
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: SnapshotId,
    /// The memory file in the state directory.
    pub path: PathBuf,
    /// Memory file size in bytes (absent when the metadata is unreadable).
    pub size: Option<u64>,
    /// Registration time, ms since the Unix epoch.
    pub created_unix_ms: Option<u64>,
    /// The uid that registered it (root for snapshots registered before owners were kept;
    /// absent when the metadata is unreadable).
    #[serde(default)]
    pub owner: Option<u32>,
    /// Where the memory file came from.
    pub source: Option<PathBuf>,
    /// How it was brought in.
    pub import: Option<ImportMethod>,
    /// The memory file's identity as recorded at registration (a change marks the snapshot
    /// damaged).
    #[serde(default)]
    pub file: Option<FileIdentity>,
    /// Deleted as soon as nothing references it; no new forks meanwhile.
    pub delete_pending: bool,
    /// 4 KiB pages that are all zeros (when mapped).
    pub zero_pages: Option<u64>,
    /// References: forks plus processes holding its memory file; `null` when some fork
    /// record is unreadable.
    pub ref_count: Option<usize>,
    /// The forks' ids; `null` when unknown.
    pub forks: Option<Vec<ForkId>>,
    /// Processes holding its memory file on the FUSE mount.
    pub file_users: Vec<FileUserInfo>,
    /// Its memory file on the FUSE mount, for VMMs that map a file (when mounted).
    pub fuse_file: Option<PathBuf>,
    /// The unreadable fork records that make the count unknown.
    pub unreadable_fork_records: Vec<PathBuf>,
    /// What is wrong with a damaged snapshot.
    pub error: Option<String>,
    /// The hypervisor state saved with the memory, if any (a snapshot without it serves
    /// uffd and FUSE clients alone).
    #[serde(default)]
    pub vmstate: Option<VmStateInfo>,
    /// Launched VMs still using it (starting or running).
    #[serde(default)]
    pub vms: Vec<VmId>,
    /// The recorded working set replayed into new forks, if any.
    #[serde(default)]
    pub working_set: Option<WorkingSetInfo>,
    /// A recording in progress.
    #[serde(default)]
    pub recording: Option<RecordingInfo>,
    /// Why the stored working set cannot be used (forks are then served on demand and a new
    /// set is recorded).
    #[serde(default)]
    pub working_set_error: Option<String>,
    /// While its memory file is still being brought in: how far. Nothing else waits for an
    /// import; the snapshot can be forked once this is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importing: Option<ImportProgress>,
}

/// How far an import has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportProgress {
    /// Bytes of the memory file brought in so far.
    pub done_bytes: u64,
    /// Bytes in all (the file's size).
    pub total_bytes: u64,
}

/// What is compared to notice that a memory file changed: `fstat` of the file once it is in
/// place, recorded with the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// The filesystem's device number.
    pub dev: u64,
    /// The inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Last change of contents or metadata, ns since the Unix epoch.
    pub ctime_ns: i64,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    /// The snapshot.
    pub id: SnapshotId,
    /// Gone now.
    pub deleted: bool,
    /// Marked for deletion when its last reference ends.
    pub pending: bool,
    /// The forks it waits for.
    pub forks: Vec<ForkId>,
    /// The processes holding its memory file it waits for.
    pub file_users: Vec<FileUserInfo>,
}

/// Forks by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkCounts {
    /// Waiting for a VMM.
    pub waiting: usize,
    /// Served.
    pub serving: usize,
    /// Ended, kept for their counters.
    pub ended: usize,
    /// Alive VMMs nobody serves.
    pub detached: usize,
}

/// Launched VMs by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCounts {
    /// Being restored.
    pub starting: usize,
    /// Running.
    pub running: usize,
    /// Exited.
    pub exited: usize,
    /// Failed to start.
    pub failed: usize,
}

/// The FUSE view, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseStatus {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// The read path the kernel granted.
    pub read_path: ReadPath,
    /// Processes holding memory files.
    pub file_users: usize,
}

/// The answer to `snapshot.export`: what was written where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The directory written.
    pub dir: PathBuf,
    /// The memory's size in bytes.
    pub size: u64,
    /// BLAKE3 of the memory's data pages (what `snapshot.import` checks).
    pub blake3: String,
    /// Whether the hypervisor's device state went with it.
    pub vmstate: bool,
    /// Whether its working set went with it.
    pub working_set: bool,
}

/// The answer to `daemon.upgrade`: the daemon is about to run `binary` in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStarted {
    /// The daemon's pid, which the new program keeps.
    pub pid: u32,
    /// The program it will run.
    pub binary: std::path::PathBuf,
    /// The version answering (the old one).
    pub version: String,
}

/// Daemon health, version and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's version.
    pub version: String,
    /// Its pid.
    pub pid: u32,
    /// Time since it started, ms.
    pub uptime_ms: u64,
    /// No damaged snapshot and no unreadable fork record.
    pub healthy: bool,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Serving threads.
    pub workers: usize,
    /// Sessions per worker.
    pub worker_sessions: Vec<usize>,
    /// Snapshots served.
    pub snapshots: usize,
    /// Forks by state.
    pub forks: ForkCounts,
    /// Launched VMs by state.
    #[serde(default)]
    pub vms: VmCounts,
    /// Snapshots kept but not served.
    pub damaged_snapshots: Vec<SnapshotId>,
    /// Fork records that cannot be read (deletes are refused while they exist).
    pub unreadable_fork_records: Vec<PathBuf>,
    /// Descriptors the daemon has open.
    pub open_fds: Option<usize>,
    /// The FUSE view, when mounted.
    pub fuse: Option<FuseStatus>,
}

/// Serving counters summed over every fork the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Forks counted.
    pub forks: usize,
    /// Their summed counters.
    pub totals: ForkStatsReport,
}
