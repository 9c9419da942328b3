//! Fork records (`forks/<id>.json`): the only source of reference counts, and what a
//! restarted daemon needs to take a live VMM's uffd back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{at, to_json, Store, StoreError};
use crate::store::atomic::{remove_durably, write_atomic, TEMP_PREFIX};
use proto::model::ForkStatsReport;
use proto::{ForkId, SnapshotId};

/// The VMM serving a fork, identified so that a recycled pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmIdentity {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

impl VmmIdentity {
    /// The identity of a running process.
    pub fn of(pid: i32) -> Option<Self> {
        process_start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether that very process is still alive.
    pub fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is "(comm)" and may hold spaces; count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What is recorded about a fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRecord {
    /// Fork id (also the file name).
    pub id: ForkId,
    /// The snapshot it references: the only source of reference counts.
    pub snapshot: SnapshotId,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VMM, once one has handed over its uffd.
    #[serde(default)]
    pub vmm: Option<VmmIdentity>,
    /// What serving the VMM's uffd needs, so that a restarted daemon can take it back
    /// (absent in records written before pagerd kept it: such forks can only be detached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uffd: Option<UffdRecord>,
    /// What the fork was created to prefetch (absent: the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<proto::prefetch::Prefetch>,
    /// The uid that created it (absent in records written before owners were kept: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

/// A served VMM's uffd: how to find it again in the VMM, and the regions it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UffdRecord {
    /// The uffd's number in the VMM's descriptor table at attach, if it was found there.
    #[serde(default)]
    pub vmm_fd: Option<i32>,
    /// The uffd's inode (each userfaultfd has its own anonymous inode): the identity that
    /// tells it apart from any other descriptor the VMM holds.
    pub ino: u64,
    /// The features the VMM negotiated.
    pub features: u64,
    /// The regions, as the handoff declared them.
    pub regions: Vec<RegionRecord>,
}

/// One region of a [`UffdRecord`] (the handoff's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRecord {
    /// Start in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Start of its bytes in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

/// A fork record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadableRecord {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub error: String,
}

/// Every fork record on disk.
#[derive(Debug, Clone, Default)]
pub struct ForkScan {
    /// Records read.
    pub records: Vec<ForkRecord>,
    /// Records that could not be read.
    pub unreadable: Vec<UnreadableRecord>,
}

impl ForkScan {
    /// Ids of the forks referencing `snapshot`, or `None` if some record is unreadable.
    pub fn referencing(&self, snapshot: &SnapshotId) -> Option<Vec<ForkId>> {
        self.unreadable.is_empty().then(|| {
            self.records
                .iter()
                .filter(|r| &r.snapshot == snapshot)
                .map(|r| r.id.clone())
                .collect()
        })
    }
}

/// The name prefix of the space kept for a fork's attach record (`.reserve-ID`).
pub const RESERVE_PREFIX: &str = ".reserve-";

/// The file in which a stopping daemon leaves every fork's counters for the next program.
pub const COUNTERS_FILE: &str = ".counters";
/// Bytes kept per waiting fork: room for its record once a VMM attaches (a record with a
/// hundred regions fits).
pub const RESERVE_BYTES: usize = 16 * 1024;

impl Store {
    /// Keeps [`RESERVE_BYTES`] of the state disk for fork `id`'s attach record, so that a VMM
    /// attaching once the disk is full is still recorded ([`Self::release_fork_space`] frees
    /// them just before).
    pub fn reserve_fork_space(&self, id: &ForkId) -> Result<(), StoreError> {
        use std::io::Write;
        let path = self.forks_dir().join(format!("{RESERVE_PREFIX}{id}"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&[0; RESERVE_BYTES]));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(at("cannot keep space for the fork's record at", &path)(e));
        }
        Ok(())
    }

    /// Frees the space kept for fork `id` (if any).
    pub fn release_fork_space(&self, id: &ForkId) {
        let _ = std::fs::remove_file(self.forks_dir().join(format!("{RESERVE_PREFIX}{id}")));
    }

    /// Writes a fork record.
    pub fn write_fork(&self, record: &ForkRecord) -> Result<(), StoreError> {
        let dir = self.forks_dir();
        let name = fork_file(&record.id);
        write_atomic(&dir, &name, &to_json(record)).map_err(at("cannot write", &dir.join(&name)))
    }

    /// Whether a record (readable or not) exists for fork `id`.
    pub fn fork_exists(&self, id: &ForkId) -> bool {
        self.forks_dir().join(fork_file(id)).exists()
    }

    /// Removes a fork record (its reference ends).
    pub fn remove_fork(&self, id: &ForkId) -> Result<(), StoreError> {
        self.release_fork_space(id);
        let dir = self.forks_dir();
        let name = fork_file(id);
        remove_durably(&dir, &name).map_err(at("cannot remove", &dir.join(&name)))
    }

    /// Keeps every fork's counters for the next program (an upgrade's, or the next start's):
    /// one file, written once at shutdown.
    pub fn write_counters(
        &self,
        counters: &BTreeMap<ForkId, ForkStatsReport>,
    ) -> Result<(), StoreError> {
        let dir = self.forks_dir();
        write_atomic(&dir, COUNTERS_FILE, &to_json(counters))
            .map_err(at("cannot write", &dir.join(COUNTERS_FILE)))
    }

    /// The counters the previous program kept, taken (the file is removed, so counters are
    /// carried over once). Unreadable counters are logged and dropped: they are counters, not
    /// state.
    pub fn take_counters(&self) -> BTreeMap<ForkId, ForkStatsReport> {
        let path = self.forks_dir().join(COUNTERS_FILE);
        let counters = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e,
                    "unreadable fork counters; forks count from 0");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        let _ = std::fs::remove_file(&path);
        counters
    }

    /// Reads every fork record.
    pub fn scan_forks(&self) -> Result<ForkScan, StoreError> {
        let dir = self.forks_dir();
        let mut scan = ForkScan::default();
        for entry in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
            let entry = entry.map_err(at("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX)
                || name.starts_with(RESERVE_PREFIX)
                || name == COUNTERS_FILE
            {
                continue;
            }
            let path = entry.path();
            match read_fork(&path, &name) {
                Ok(record) => scan.records.push(record),
                Err(error) => scan.unreadable.push(UnreadableRecord { path, error }),
            }
        }
        scan.records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(scan)
    }
}

fn fork_file(id: &ForkId) -> String {
    format!("{id}.json")
}

fn read_fork(path: &Path, name: &str) -> Result<ForkRecord, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let record: ForkRecord = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if name != fork_file(&record.id) {
        return Err(format!("it names fork `{}`", record.id));
    }
    Ok(record)
}
