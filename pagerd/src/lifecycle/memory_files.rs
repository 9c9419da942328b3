//! What the FUSE view may ask of the lifecycle ([`MemoryFiles`]), and where the view is
//! mounted ([`FuseMount`]), which the lifecycle reports but never mounts itself.
//!
//! A process opening a snapshot's memory file on the mount is a reference, taken under the
//! lifecycle's lock so that it cannot race a delete; the kernel's release ends it (unless the
//! process still maps the file through passthrough, see [`FileUsers`](crate::file_users)).

use std::path::PathBuf;
use std::sync::Arc;

use proto::model::ReadPath;
use proto::SnapshotId;

use super::{Catalog, Lifecycle, LifecycleError};
use crate::file_users::FileKey;
use crate::snapshot::Snapshot;
use crate::store::MEMORY_FILE;

/// The directory of the mount that holds one directory per snapshot.
pub(crate) const SNAPSHOTS_DIR: &str = "snapshots";

/// A mounted FUSE view, as the rest of the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FuseMount {
    /// The mount point (absolute).
    pub path: PathBuf,
    /// The mount's device number.
    pub device: u64,
    /// The read path the kernel granted.
    pub read_path: ReadPath,
}

impl FuseMount {
    /// Where snapshot `id`'s memory file is on this mount.
    pub fn memory_file(&self, id: &SnapshotId) -> PathBuf {
        self.path
            .join(SNAPSHOTS_DIR)
            .join(id.as_str())
            .join(MEMORY_FILE)
    }
}

/// The lifecycle as the FUSE view reaches it.
pub(crate) trait MemoryFiles: std::fmt::Debug + Send + Sync + 'static {
    /// A snapshot whose memory file may be opened now: registered, mapped, not pending
    /// deletion.
    fn openable_snapshot(&self, id: &SnapshotId) -> Option<Arc<Snapshot>>;

    /// Every snapshot whose memory file may be opened now.
    fn openable_snapshots(&self) -> Vec<Arc<Snapshot>>;

    /// Records that process `pid` opened `snapshot`'s memory file, if that very snapshot may
    /// still be opened. Returns the handle that identifies the reference.
    fn open_memory_file(
        &self,
        snapshot: &Arc<Snapshot>,
        pid: i32,
        backing: Option<FileKey>,
    ) -> Result<u64, LifecycleError>;

    /// The kernel released a memory file handle.
    fn release_memory_file(&self, handle: u64);
}

impl MemoryFiles for Lifecycle {
    /// A snapshot whose memory file may be opened now: registered, mapped, not pending
    /// deletion.
    fn openable_snapshot(&self, id: &SnapshotId) -> Option<Arc<Snapshot>> {
        let catalog = self.lock();
        catalog
            .forkable(id)
            .then(|| self.registry.snapshot(id).ok())
            .flatten()
    }

    /// Every snapshot whose memory file may be opened now.
    fn openable_snapshots(&self) -> Vec<Arc<Snapshot>> {
        let catalog = self.lock();
        let mut snapshots = self.registry.snapshots();
        snapshots.retain(|s| catalog.forkable(s.id()));
        snapshots
    }

    /// Records that process `pid` opened `snapshot`'s memory file, if that very snapshot may
    /// still be opened (a delete or a re-registration may have happened since the kernel
    /// looked the file up). Returns the handle that identifies the reference.
    fn open_memory_file(
        &self,
        snapshot: &Arc<Snapshot>,
        pid: i32,
        backing: Option<FileKey>,
    ) -> Result<u64, LifecycleError> {
        let mut catalog = self.lock();
        let id = snapshot.id();
        self.verify_unchanged(&mut catalog, id)?;
        match catalog.metas.get(id) {
            Some(meta) if meta.delete_pending => {
                return Err(LifecycleError::DeletePending(id.clone()))
            }
            Some(_)
                if self
                    .registry
                    .snapshot(id)
                    .is_ok_and(|current| Arc::ptr_eq(&current, snapshot)) => {}
            _ => return Err(LifecycleError::no_snapshot(id)),
        }
        let handle = self.file_users.open(id.clone(), pid, backing);
        drop(catalog);
        tracing::info!(snapshot = %id, pid, handle, "memory file opened");
        Ok(handle)
    }

    /// The kernel released a memory file handle: the reference ends (unless the process still
    /// maps the file through passthrough), which may finish a pending delete.
    fn release_memory_file(&self, handle: u64) {
        let mut catalog = self.lock();
        if let Some(snapshot) = self.file_users.release(handle) {
            tracing::info!(snapshot = %snapshot, handle, "memory file released");
            self.after_file_user_left(&mut catalog, &snapshot);
        }
    }
}

impl Lifecycle {
    /// A file user of `snapshot` is gone: a delete may have been waiting for it.
    fn after_file_user_left(&self, catalog: &mut Catalog, snapshot: &SnapshotId) {
        if let Err(e) = self.finish_pending_delete(catalog, snapshot) {
            tracing::error!(error = %crate::errors::error_chain(&e), snapshot = %snapshot, "cannot finish a pending delete");
        }
    }

    /// Ends the references of processes that no longer map a memory file they once opened,
    /// and finishes the deletes that were waiting for them.
    pub fn recheck_file_users(&self) {
        if !self.file_users.any_mapped() {
            return;
        }
        let mut catalog = self.lock();
        for snapshot in self.file_users.prune() {
            self.after_file_user_left(&mut catalog, &snapshot);
        }
    }
}
