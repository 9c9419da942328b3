//! The state directory: snapshot and fork records on disk, the only truth that survives a
//! crash.
//!
//! ```text
//! STATE/                         0700 (0750 root:GROUP with --group; see crate::access)
//!   control.sock                 the control socket (default)
//!   lock                         flock'ed by the running daemon
//!   snapshots/<id>/memory        the memory file: pagerd's copy (0400, 0440 root:GROUP), or
//!                                with ImportMode::Link the caller's inode, modes untouched
//!   snapshots/<id>/snapshot.json SnapshotMeta, with the memory file's FileIdentity
//!   snapshots/<id>/vmstate       the hypervisor's device state, when saved with it (a copy,
//!                                mode as a copied memory file)
//!   snapshots/<id>/working-set   its recorded working set (crate::working_set), 0600
//!   forks/<id>.json              ForkRecord ([`forks`]): the fork names its snapshot
//!   sockets/<id>.sock            handoff sockets of waiting forks
//!   vms/<id>/                    a launched VM (see [`vms`]): vm.json, api.sock,
//!                                console.log, firecracker.log
//! ```
//!
//! A fork record exists exactly while the fork holds a reference on its snapshot (waiting for
//! its VMM, serving it, or detached from a VMM that outlived a daemon restart). Reference
//! counts are never stored: they are the number of fork records naming the snapshot, read off
//! the disk by [`Store::scan_forks`]. A record that cannot be read makes every count unknown,
//! and deleting fails closed.
//!
//! Every write is atomic (`atomic`): a snapshot appears by renaming a fully written temp
//! directory, and disappears by renaming it to a trash name before removing it; records are
//! written by temp file, fsync, rename, fsync of the directory. Whatever a crash leaves behind
//! (`.tmp-*`, `.trash-*`, sockets) is removed by [`Store::remove_leftovers`].
//!
//! Modes and groups follow the [`Access`] policy the store was opened with;
//! [`Store::open_with`] brings an existing directory to it, and [`Store::verify_memory`] a
//! snapshot's memory file. What it finds wrong with a snapshot is a [`damage::Damage`], typed,
//! whose `Display` is the message reported.

pub mod atomic;
pub mod damage;
pub mod exported;
mod forks;
pub mod identity;
pub mod import;
pub mod vms;
pub mod zero_map;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::access::Access;
use crate::bitmap::Bitmap;
use atomic::{fsync_dir, temp_name, write_atomic, TEMP_PREFIX};
use damage::{Damage, NotLinkable, RecordProblem};
use identity::{FileIdentity, FileIdentityExt};
use import::{ImportMethod, ImportMode};
use proto::SnapshotId;

pub use forks::{ForkRecord, ForkScan, RegionRecord, UffdRecord, VmmIdentity};

const TRASH_PREFIX: &str = ".trash-";
const META_FILE: &str = "snapshot.json";
/// The directory of the forks' handoff sockets, in the state directory.
pub const SOCKETS_DIR: &str = "sockets";
/// The name of a snapshot's memory file (in the state directory and on the FUSE mount).
pub const MEMORY_FILE: &str = "memory";
/// The name of a snapshot's hypervisor state file.
pub const VMSTATE_FILE: &str = "vmstate";

/// A snapshot's hypervisor state, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateMeta {
    /// The hypervisor it is for.
    pub vmm: proto::model::VmmKind,
    /// Its size in bytes.
    pub size: u64,
}

/// A hypervisor state file to bring in with a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct VmStateSource<'a> {
    /// The open file.
    pub file: &'a std::fs::File,
    /// Its size.
    pub size: u64,
    /// The hypervisor it is for.
    pub vmm: proto::model::VmmKind,
}

/// What is recorded about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// Snapshot id (also the directory name).
    pub id: SnapshotId,
    /// Memory file size in bytes.
    pub size: u64,
    /// Granularity pagerd tracks the file in.
    pub page_size: u64,
    /// Registration time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Where the memory file came from.
    pub source: PathBuf,
    /// How it was brought in.
    pub import: ImportMethod,
    /// Delete as soon as no fork references it; no new forks meanwhile.
    #[serde(default)]
    pub delete_pending: bool,
    /// The memory file as it was once in place, to notice later changes (absent in
    /// metadata written before pagerd recorded it; recorded at the next start).
    #[serde(default)]
    pub file: Option<FileIdentity>,
    /// The hypervisor state saved with the memory (`vmstate` beside it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<VmStateMeta>,
    /// The uid that registered it (absent in metadata written before owners were kept: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

impl SnapshotMeta {
    /// Why the memory file, open as `file`, is no longer what was recorded (an `fstat`);
    /// `None` while it is unchanged or nothing was recorded.
    pub fn file_changed(&self, file: &std::fs::File) -> Option<Damage> {
        let recorded = self.file.as_ref()?;
        match FileIdentity::of(file) {
            Ok(now) => recorded.changes(&now).map(Damage::Changed),
            Err(e) => Some(Damage::Uninspectable(e.into())),
        }
    }
}

/// A snapshot directory as found on disk.
#[derive(Debug)]
pub struct StoredSnapshot {
    /// The directory name.
    pub id: SnapshotId,
    /// Its metadata, or why it cannot be used.
    pub meta: Result<SnapshotMeta, Damage>,
}

/// Errors of store operations, with the path involved.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}", path.display())]
pub struct StoreError {
    /// What was being done.
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Why it failed.
    #[source]
    pub source: io::Error,
}

fn at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    access: Access,
    /// An exclusive lock on `STATE_DIR/lock`, held while the store is open: one daemon per
    /// state directory.
    _lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl Store {
    /// Opens (creating if needed) the state directory at `root`, and brings the modes and
    /// groups of its directories and records to `access`.
    pub fn open_with(root: &Path, access: Access) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(at("cannot create", root))?;
        access
            .apply(root, access.dir_mode())
            .map_err(at("cannot set the mode of", root))?;
        let lock_path = root.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(at("cannot open", &lock_path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                let source = if e == nix::errno::Errno::EWOULDBLOCK {
                    io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        "another pagerd is using this state directory",
                    )
                } else {
                    e.into()
                };
                StoreError {
                    action: "cannot lock",
                    path: lock_path.clone(),
                    source,
                }
            })?;
        access
            .apply(&lock_path, access.record_mode())
            .map_err(at("cannot set the mode of", &lock_path))?;
        let store = Self {
            root: root.to_owned(),
            access,
            _lock: std::sync::Arc::new(lock),
        };
        for dir in [
            store.snapshots_dir(),
            store.forks_dir(),
            store.sockets_dir(),
            store.vms_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(at("cannot create", &dir))?;
            access
                .apply(&dir, access.dir_mode())
                .map_err(at("cannot set the mode of", &dir))?;
        }
        store.secure_contents()?;
        Ok(store)
    }

    /// Brings snapshot directories, their metadata and fork records to the access policy
    /// (memory files are [`verify_memory`](Self::verify_memory)'s, which knows which ones
    /// pagerd owns).
    fn secure_contents(&self) -> Result<(), StoreError> {
        let access = &self.access;
        let snapshots = self.snapshots_dir();
        for entry in std::fs::read_dir(&snapshots).map_err(at("cannot list", &snapshots))? {
            let entry = entry.map_err(at("cannot list", &snapshots))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path();
            access
                .apply(&dir, access.dir_mode())
                .map_err(at("cannot set the mode of", &dir))?;
            let meta = dir.join(META_FILE);
            if meta.exists() {
                access
                    .apply(&meta, access.record_mode())
                    .map_err(at("cannot set the mode of", &meta))?;
            }
        }
        let forks = self.forks_dir();
        for entry in std::fs::read_dir(&forks).map_err(at("cannot list", &forks))? {
            let entry = entry.map_err(at("cannot list", &forks))?;
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                access
                    .apply(&path, access.record_mode())
                    .map_err(at("cannot set the mode of", &path))?;
            }
        }
        Ok(())
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where snapshot directories live.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where fork records live.
    pub fn forks_dir(&self) -> PathBuf {
        self.root.join("forks")
    }

    /// Where handoff sockets live.
    pub fn sockets_dir(&self) -> PathBuf {
        self.root.join(SOCKETS_DIR)
    }

    /// A snapshot's directory: its memory file, metadata, device state and working set.
    pub fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(id.as_str())
    }

    /// The memory file of a snapshot.
    pub fn memory_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir(id).join(MEMORY_FILE)
    }

    /// The hypervisor state file of a snapshot (present when its metadata says so).
    pub fn vmstate_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(id.as_str()).join(VMSTATE_FILE)
    }

    /// Brings `source` (a checked, open source of `size` bytes, named `source_name` in the
    /// record) in as snapshot `id`: a temp directory with the memory file, the hypervisor
    /// state if given (always copied) and the metadata, renamed into place in one step. The
    /// metadata records the memory file's identity as it is once in place.
    #[allow(clippy::too_many_arguments)]
    pub fn add_snapshot(
        &self,
        id: &SnapshotId,
        source: &std::fs::File,
        source_name: &Path,
        size: u64,
        mode: ImportMode,
        created_unix_ms: u64,
        vmstate: Option<VmStateSource<'_>>,
        owner: u32,
        done: &std::sync::atomic::AtomicU64,
    ) -> Result<SnapshotMeta, StoreError> {
        let dir = self.snapshots_dir();
        let final_dir = dir.join(id.as_str());
        if final_dir.exists() {
            return Err(StoreError {
                action: "a snapshot directory already exists at",
                path: final_dir,
                source: io::ErrorKind::AlreadyExists.into(),
            });
        }
        let temp = dir.join(temp_name(id.as_str()));
        let result = (|| {
            std::fs::create_dir(&temp).map_err(at("cannot create", &temp))?;
            self.access
                .apply(&temp, self.access.dir_mode())
                .map_err(at("cannot set the mode of", &temp))?;
            let memory = temp.join(MEMORY_FILE);
            let imported = import::import(source, &memory, size, mode, &self.access, done)
                .map_err(at("cannot bring in the memory file as", &memory))?;
            let file = std::fs::metadata(&memory)
                .map(|m| FileIdentity::from_metadata(&m))
                .map_err(at("cannot inspect", &memory))?;
            if let Some(map) = &imported.zero_map {
                // Learnt while copying: opening the snapshot need not read it again.
                write_atomic(&temp, zero_map::FILE_NAME, &zero_map::encode(&file, map))
                    .map_err(at("cannot write", &temp.join(zero_map::FILE_NAME)))?;
            }
            let vmstate = match vmstate {
                Some(state) => {
                    let path = temp.join(VMSTATE_FILE);
                    import::import(
                        state.file,
                        &path,
                        state.size,
                        ImportMode::Copy,
                        &self.access,
                        &std::sync::atomic::AtomicU64::new(0),
                    )
                    .map_err(at("cannot bring in the hypervisor state as", &path))?;
                    Some(VmStateMeta {
                        vmm: state.vmm,
                        size: state.size,
                    })
                }
                None => None,
            };
            let meta = SnapshotMeta {
                id: id.clone(),
                size: file.size,
                page_size: crate::snapshot::ZERO_MAP_PAGE,
                created_unix_ms,
                source: source_name.to_owned(),
                import: imported.method,
                delete_pending: false,
                file: Some(file),
                vmstate,
                owner: Some(owner),
            };
            write_atomic(&temp, META_FILE, &to_json(&meta))
                .map_err(at("cannot write", &temp.join(META_FILE)))?;
            std::fs::rename(&temp, &final_dir).map_err(at("cannot move into place", &final_dir))?;
            fsync_dir(&dir).map_err(at("cannot sync", &dir))?;
            Ok(meta)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

    /// Whether a file with metadata `source` can be linked into the state directory (same
    /// filesystem); `Err` says why not.
    pub fn check_linkable(&self, source: &std::fs::Metadata) -> Result<(), NotLinkable> {
        use std::os::unix::fs::MetadataExt;
        let here = std::fs::metadata(self.snapshots_dir()).map_err(NotLinkable::Unreadable)?;
        if here.dev() == source.dev() {
            Ok(())
        } else {
            Err(NotLinkable::OtherFilesystem)
        }
    }

    /// Checks a snapshot's memory file, just opened as `file` from
    /// [`memory_path`](Self::memory_path), against what `meta` recorded, and brings a file
    /// pagerd owns to the access policy's mode and group. Returns the metadata to keep (with
    /// the identity recorded again if pagerd changed the file's mode, or had none recorded),
    /// or why the snapshot is damaged.
    pub fn verify_memory(
        &self,
        mut meta: SnapshotMeta,
        file: &std::fs::File,
    ) -> Result<SnapshotMeta, Damage> {
        if let Some(damage) = meta.file_changed(file) {
            return Err(damage);
        }
        let mut rerecord = meta.file.is_none();
        if meta.import.is_private() {
            let path = self.memory_path(&meta.id);
            match self.access.apply(&path, self.access.memory_mode()) {
                Ok(changed) => rerecord |= changed,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot set the memory file's mode")
                }
            }
        }
        if rerecord {
            meta.file = Some(FileIdentity::of(file).map_err(|e| Damage::Uninspectable(e.into()))?);
            if let Err(e) = self.write_snapshot_meta(&meta) {
                tracing::warn!(snapshot = %meta.id, error = %crate::errors::error_chain(&e), "cannot record the memory file's identity");
            }
        }
        Ok(meta)
    }

    /// The stored zero map of snapshot `id` ([`zero_map`]), if it describes its memory `file`
    /// of `pages` 4 KiB pages as the file is now.
    pub fn load_zero_map(
        &self,
        id: &SnapshotId,
        file: &std::fs::File,
        pages: u64,
    ) -> Option<Bitmap> {
        let path = self.snapshot_dir(id).join(zero_map::FILE_NAME);
        let bytes = std::fs::read(&path).ok()?;
        let map = FileIdentity::of(file)
            .ok()
            .and_then(|identity| zero_map::decode(&bytes, &identity, pages));
        if map.is_none() {
            tracing::warn!(snapshot = %id, path = %path.display(),
                "the stored zero map does not describe the memory file; reading the file again");
        }
        map
    }

    /// Stores snapshot `id`'s zero map, of its memory `file` as it is now.
    pub fn store_zero_map(
        &self,
        id: &SnapshotId,
        file: &std::fs::File,
        map: &Bitmap,
    ) -> Result<(), StoreError> {
        let dir = self.snapshot_dir(id);
        let identity =
            FileIdentity::of(file).map_err(at("cannot inspect", &self.memory_path(id)))?;
        write_atomic(&dir, zero_map::FILE_NAME, &zero_map::encode(&identity, map))
            .map_err(at("cannot write", &dir.join(zero_map::FILE_NAME)))
    }

    /// Rewrites a snapshot's metadata.
    pub fn write_snapshot_meta(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let dir = self.snapshots_dir().join(meta.id.as_str());
        write_atomic(&dir, META_FILE, &to_json(meta))
            .map_err(at("cannot write", &dir.join(META_FILE)))
    }

    /// Every snapshot directory, with its metadata or why it is unreadable.
    pub fn snapshots(&self) -> Result<Vec<StoredSnapshot>, StoreError> {
        let dir = self.snapshots_dir();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
            let entry = entry.map_err(at("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = name.parse::<SnapshotId>() else {
                continue;
            };
            let meta_path = entry.path().join(META_FILE);
            let meta = std::fs::read(&meta_path)
                .map_err(|e| RecordProblem::Read(e.into()))
                .and_then(|bytes| {
                    serde_json::from_slice::<SnapshotMeta>(&bytes)
                        .map_err(|e| RecordProblem::Parse(e.into()))
                })
                .and_then(|m| {
                    if m.id == id {
                        Ok(m)
                    } else {
                        Err(RecordProblem::NamesAnother(m.id))
                    }
                })
                .map_err(|problem| Damage::UnreadableRecord {
                    path: meta_path,
                    problem,
                });
            found.push(StoredSnapshot { id, meta });
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// Removes a snapshot directory: renamed to a trash name first, so a crash leaves either
    /// the whole snapshot or trash that reconciliation removes.
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let dir = self.snapshots_dir();
        let trash = dir.join(format!("{TRASH_PREFIX}{}", temp_name(id.as_str())));
        let from = dir.join(id.as_str());
        std::fs::rename(&from, &trash).map_err(at("cannot move to trash", &from))?;
        fsync_dir(&dir).map_err(at("cannot sync", &dir))?;
        std::fs::remove_dir_all(&trash).map_err(at("cannot remove", &trash))
    }

    /// Removes what a crash can leave behind: half-written temp files and directories,
    /// snapshots half-way to deletion, and every socket (they are bound afresh). Returns what
    /// it removed.
    /// The sockets in `keep` stay: handed over, still listening, by the program an upgrade
    /// replaced.
    pub fn remove_leftovers(&self, keep: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        for dir in [self.snapshots_dir(), self.forks_dir(), self.sockets_dir()] {
            let is_sockets = dir == self.sockets_dir();
            for entry in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
                let entry = entry.map_err(at("cannot list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(is_sockets || name.starts_with(TEMP_PREFIX) || name.starts_with(TRASH_PREFIX))
                {
                    continue;
                }
                let path = entry.path();
                if is_sockets && keep.contains(&path) {
                    continue;
                }
                let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                result.map_err(at("cannot remove", &path))?;
                removed.push(path);
            }
            fsync_dir(&dir).map_err(at("cannot sync", &dir))?;
        }
        // Space kept for forks whose records are gone.
        let forks = self.forks_dir();
        for entry in std::fs::read_dir(&forks).map_err(at("cannot list", &forks))? {
            let name = entry.map_err(at("cannot list", &forks))?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_prefix(forks::RESERVE_PREFIX) {
                if !forks.join(format!("{id}.json")).exists() {
                    let path = forks.join(&*name);
                    std::fs::remove_file(&path).map_err(at("cannot remove", &path))?;
                    removed.push(path);
                }
            }
        }
        // A record rewritten in place (`snapshot.json`) leaves its temp file in the snapshot's
        // own directory when the daemon dies mid-write.
        let snapshots = self.snapshots_dir();
        for entry in std::fs::read_dir(&snapshots).map_err(at("cannot list", &snapshots))? {
            let dir = entry.map_err(at("cannot list", &snapshots))?.path();
            if !dir.is_dir() {
                continue;
            }
            let mut any = false;
            for file in std::fs::read_dir(&dir).map_err(at("cannot list", &dir))? {
                let file = file.map_err(at("cannot list", &dir))?;
                if file.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let path = file.path();
                    std::fs::remove_file(&path).map_err(at("cannot remove", &path))?;
                    removed.push(path);
                    any = true;
                }
            }
            if any {
                fsync_dir(&dir).map_err(at("cannot sync", &dir))?;
            }
        }
        Ok(removed)
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records always serialize");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<K: proto::ids::Kind>(s: &str) -> proto::Id<K> {
        s.parse().unwrap()
    }

    #[test]
    fn snapshots_and_fork_records_round_trip_and_counts_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("state"), Access::default()).unwrap();
        let src = dir.path().join("mem");
        std::fs::write(&src, vec![1u8; 8192]).unwrap();
        let (file, _) = import::open_source(&src).unwrap();
        let add = |id: &SnapshotId| {
            store.add_snapshot(
                id,
                &file,
                &src,
                8192,
                ImportMode::Copy,
                5,
                None,
                0,
                &Default::default(),
            )
        };
        let meta = add(&id("s")).unwrap();
        assert_eq!(store.snapshots().unwrap()[0].meta.as_ref().unwrap(), &meta);
        assert!(add(&id("s")).is_err());

        for f in ["a", "b"] {
            let record = ForkRecord {
                id: id(f),
                snapshot: id("s"),
                created_unix_ms: 1,
                vmm: None,
                uffd: None,
                prefetch: None,
                owner: Some(1000),
            };
            store.write_fork(&record).unwrap();
        }
        let scan = store.scan_forks().unwrap();
        assert_eq!(scan.referencing(&id("s")), Some(vec![id("a"), id("b")]));
        // A record of a serving fork round-trips with its uffd.
        let serving = ForkRecord {
            id: id("a"),
            snapshot: id("s"),
            created_unix_ms: 1,
            vmm: Some(VmmIdentity {
                pid: 7,
                start_time: 9,
            }),
            uffd: Some(UffdRecord {
                vmm_fd: Some(12),
                ino: 4321,
                features: 0x8000_0008,
                regions: vec![RegionRecord {
                    base_host_virt_addr: 0x7f00_0000_0000,
                    size: 8192,
                    offset: 0,
                    page_size: 4096,
                }],
            }),
            prefetch: None,
            owner: None,
        };
        store.write_fork(&serving).unwrap();
        let scan = store.scan_forks().unwrap();
        assert!(scan.records.contains(&serving));

        std::fs::write(store.forks_dir().join("c.json"), b"{\"id\":\"c\",\"snap").unwrap();
        let scan = store.scan_forks().unwrap();
        assert_eq!(scan.referencing(&id("s")), None);
        assert!(scan.unreadable[0].path.ends_with("forks/c.json"));

        store.remove_snapshot(&id("s")).unwrap();
        assert!(store.snapshots().unwrap().is_empty());
    }

    #[test]
    fn a_record_written_before_uffds_were_kept_still_loads() {
        let old = r#"{"id":"f","snapshot":"s","created_unix_ms":3,"vmm":{"pid":5,"start_time":6}}"#;
        let record: ForkRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.uffd, None);
        assert_eq!(record.vmm.unwrap().pid, 5);
    }

    #[test]
    fn leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), Access::default()).unwrap();
        std::fs::create_dir(store.snapshots_dir().join(".tmp-x-1-2")).unwrap();
        std::fs::create_dir(store.snapshots_dir().join(".trash-.tmp-y-1-3")).unwrap();
        std::fs::write(store.forks_dir().join(".tmp-f.json-1-4"), b"{").unwrap();
        std::fs::write(store.sockets_dir().join("f.sock"), b"").unwrap();
        std::fs::write(store.forks_dir().join("kept.json"), b"{").unwrap();
        let snapshot = store.snapshots_dir().join("s");
        std::fs::create_dir(&snapshot).unwrap();
        std::fs::write(snapshot.join("snapshot.json"), b"{}").unwrap();
        std::fs::write(snapshot.join(".tmp-snapshot.json-1-5"), b"{").unwrap();
        assert_eq!(store.remove_leftovers(&[]).unwrap().len(), 5);
        assert!(store.forks_dir().join("kept.json").exists());
        assert!(snapshot.join("snapshot.json").exists());
        assert!(!snapshot.join(".tmp-snapshot.json-1-5").exists());
    }

    #[test]
    fn a_live_process_is_recognised_and_a_dead_pid_is_not() {
        let me = VmmIdentity::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(me.is_alive());
        let impostor = VmmIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
    }
}
