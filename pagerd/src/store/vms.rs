//! Launched VMs on disk: one directory per VM, holding its record and everything the
//! hypervisor process needs a path for.
//!
//! ```text
//! STATE/vms/<id>/                0700 (0750 root:GROUP)
//!   vm.json                      VmRecord: snapshot, backend, state, pid + start time, …
//!   api.sock                     the hypervisor's API socket
//!   console.log                  the guest console (the hypervisor's stdout and stderr),
//!   console.log.1                capped: the previous part once it grew past the cap
//!   firecracker.log              Firecracker's own log (warnings and worse)
//!   .snapshot-<new>/             vm.snapshot's output before it is registered (a leftover
//!                                is removed at start)
//! STATE/vms/.tmp-<id>-…/         a deleted VM's directory, moved aside before it is removed
//!                                (a leftover is removed at start)
//! ```
//!
//! A record in state `starting` or `running` is a reference on its snapshot (besides the
//! fork or the FUSE file use it also holds), so that a VM keeps its snapshot even across a
//! daemon restart, when the FUSE file users are forgotten.

use std::path::{Path, PathBuf};

use proto::model::VmInfo;
use proto::{SnapshotId, VmId};
use serde::{Deserialize, Serialize};

use super::atomic::{fsync_dir, temp_name, write_atomic, TEMP_PREFIX};
use super::{at, to_json, Store, StoreError};

/// The record's file name in a VM's directory.
pub const VM_RECORD: &str = "vm.json";

/// What is recorded about a launched VM: what `vm.get` answers, plus the process's start
/// time so that a recycled pid is never mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// What is reported.
    #[serde(flatten)]
    pub info: VmInfo,
    /// The hypervisor's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// Every VM record on disk.
#[derive(Debug, Clone, Default)]
pub struct VmScan {
    /// Records read.
    pub records: Vec<VmRecord>,
    /// Records that could not be read, and why.
    pub unreadable: Vec<(PathBuf, String)>,
}

impl VmScan {
    /// The VMs whose hypervisor may still run on `snapshot`.
    pub fn live_on(&self, snapshot: &SnapshotId) -> Vec<VmId> {
        self.records
            .iter()
            .filter(|r| &r.info.snapshot == snapshot && r.info.state.is_live())
            .map(|r| r.info.id.clone())
            .collect()
    }
}

impl Store {
    /// Where VM directories live.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// A VM's directory.
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms_dir().join(id.as_str())
    }

    /// Creates a new VM's directory; `AlreadyExists` if the id was used before.
    pub fn create_vm_dir(&self, id: &VmId) -> Result<PathBuf, StoreError> {
        let dir = self.vm_dir(id);
        std::fs::create_dir(&dir).map_err(at("cannot create", &dir))?;
        self.access
            .apply(&dir, self.access.dir_mode())
            .map_err(at("cannot set the mode of", &dir))?;
        Ok(dir)
    }

    /// Takes a deleted VM's directory out of every listing at once: renamed to a temp name
    /// (which a scan skips and [`Self::remove_vm_leftovers`] removes). Returns where it went,
    /// for the caller to remove.
    pub fn retire_vm_dir(&self, id: &VmId) -> Result<PathBuf, StoreError> {
        let dir = self.vms_dir();
        let from = self.vm_dir(id);
        let to = dir.join(temp_name(id.as_str()));
        std::fs::rename(&from, &to).map_err(at("cannot move aside", &from))?;
        fsync_dir(&dir).map_err(at("cannot sync", &dir))?;
        Ok(to)
    }

    /// Removes the directories of deleted VMs that a crash left behind. Returns them.
    pub fn remove_vm_leftovers(&self) -> Result<Vec<PathBuf>, StoreError> {
        let dir = self.vms_dir();
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
            let entry = entry.map_err(at("cannot list", &dir))?;
            let retired = entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if retired {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(at("cannot remove", &path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Writes a VM's record atomically.
    pub fn write_vm(&self, record: &VmRecord) -> Result<(), StoreError> {
        let dir = self.vm_dir(&record.info.id);
        write_atomic(&dir, VM_RECORD, &to_json(record))
            .map_err(at("cannot write", &dir.join(VM_RECORD)))
    }

    /// Reads every VM record.
    pub fn scan_vms(&self) -> Result<VmScan, StoreError> {
        let dir = self.vms_dir();
        let mut scan = VmScan::default();
        for entry in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
            let entry = entry.map_err(at("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path().join(VM_RECORD);
            match read_vm(&path, &name) {
                Ok(Some(record)) => scan.records.push(record),
                // A directory whose record was never written: a start that crashed at once.
                Ok(None) => {}
                Err(error) => scan.unreadable.push((path, error)),
            }
        }
        scan.records.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(scan)
    }
}

fn read_vm(path: &Path, name: &str) -> Result<Option<VmRecord>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let record: VmRecord = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if record.info.id.as_str() != name {
        return Err(format!("it names VM `{}`", record.info.id));
    }
    Ok(Some(record))
}
