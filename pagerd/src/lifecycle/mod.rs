//! Snapshot and fork lifecycle: every change of what exists, made durable in the store before
//! it takes effect, under one lock.
//!
//! ```text
//! register:   import file ─▶ snapshot.json ─▶ rename into place ─▶ map it ─▶ registry
//! fork:       snapshot exists, not pending delete ─▶ fork record ─▶ registry ─▶ listen
//! attached:   fork record gains the VMM's identity (pid + start time) and its uffd's
//!             (number in the VMM, inode, features, regions), before the VMM hears ok
//! ended/close: stop serving ─▶ remove fork record ─▶ finish a pending delete if no refs left
//! delete:     scan fork records (unreadable → refuse) ─▶ refs? conflict / mark pending
//!             : trash the directory
//! restart:    remove leftovers ─▶ map snapshots, check each memory file against its record
//!             ─▶ each fork record: no VMM → listen again, VMM alive → take its uffd back
//!             (pidfd_getfd) and serve again, or detached with the reason,
//!             VMM gone → reap ─▶ processes still mapping memory files counted again
//!             ─▶ finish pending deletes
//! checks:     every second, before each fork and each FUSE open: the memory file's fstat
//!             against its record; a change marks the snapshot damaged (no new forks; a forced
//!             delete removes it once nothing references it)
//! ```
//!
//! Reference counts are read off the fork records every time they are needed
//! ([`Store::scan_forks`]); nothing stores a count. Processes holding a snapshot's memory file
//! on the FUSE mount ([`FileUsers`]) are references too: they live only in memory, since the
//! kernel tells the daemon when each handle is released.
//!
//! [`Lifecycle`] only decides what exists. What is reported about it (stats, lists, the
//! status, the service manager's summary) is read through [`Lifecycle::reports`]
//! (`report.rs`), and working sets are kept through [`Lifecycle::working_sets`]
//! (`working_sets.rs`), which asks the lifecycle, under its lock, whether a snapshot may still
//! take one. Refusals are [`LifecycleError`]s, with one `NotFound` whichever side noticed.

mod error;
mod memory_files;
mod reconcile;
mod recovery;
mod register;
mod report;
#[cfg(test)]
mod tests;
mod transfer;
mod working_sets;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::model::{
    DeleteOutcome, EndReason, FileUserInfo, ForkInfo, ForkState, ImportProgress, SnapshotInfo,
    VmStateInfo,
};
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId, VmId};
use serde::Serialize;

pub(crate) use error::LifecycleError;
pub(crate) use memory_files::{FuseMount, MemoryFiles, SNAPSHOTS_DIR};
pub(crate) use recovery::RecordJournal;

use crate::file_users::FileUsers;
use crate::registry::{unix_ms, Fork, ForkPhase, NewFork, Registry};
use crate::serve::{ForkEvent, Server};
use crate::snapshot::Snapshot;
use crate::store::damage::Damage;
use crate::store::{ForkRecord, ForkScan, SnapshotMeta, Store};
use error::references;

/// What reconciliation did at start.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ReconcileReport {
    /// Leftover files removed.
    pub removed_leftovers: Vec<PathBuf>,
    /// Snapshots mapped.
    pub snapshots: usize,
    /// Damaged snapshots (kept, not served).
    pub damaged_snapshots: Vec<SnapshotId>,
    /// Forks waiting for a VMM again.
    pub waiting: Vec<ForkId>,
    /// Forks whose VMM outlived the previous daemon and whose uffd was taken back: served.
    pub recovered: Vec<ForkId>,
    /// Forks whose VMM outlived the previous daemon but whose uffd could not be taken back.
    pub detached: Vec<ForkId>,
    /// Forks whose VMM is gone: their records were removed.
    pub reaped: Vec<ForkId>,
    /// Processes found still mapping a memory file (counted again as file users).
    pub file_users: usize,
    /// Deferred deletes finished.
    pub deleted: Vec<SnapshotId>,
    /// Unreadable fork records (kept; deletes are refused while they exist).
    pub unreadable_fork_records: Vec<PathBuf>,
}

impl ReconcileReport {
    /// One log line with every count a field of its own, and the ids of the forks and
    /// snapshots named (comma-separated) beside them.
    fn log(&self) {
        fn ids<T: std::fmt::Display>(list: &[T]) -> String {
            list.iter().map(T::to_string).collect::<Vec<_>>().join(",")
        }
        tracing::info!(
            snapshots = self.snapshots,
            damaged_snapshots = self.damaged_snapshots.len(),
            damaged_snapshot_ids = %ids(&self.damaged_snapshots),
            waiting = self.waiting.len(),
            recovered = self.recovered.len(),
            recovered_ids = %ids(&self.recovered),
            detached = self.detached.len(),
            detached_ids = %ids(&self.detached),
            reaped = self.reaped.len(),
            reaped_ids = %ids(&self.reaped),
            file_users = self.file_users,
            deleted = self.deleted.len(),
            deleted_ids = %ids(&self.deleted),
            unreadable_fork_records = self.unreadable_fork_records.len(),
            removed_leftovers = self.removed_leftovers.len(),
            "reconciled the state directory"
        );
    }
}

/// The in-memory copy of snapshot metadata, changed only together with the store.
#[derive(Debug, Default)]
struct Catalog {
    metas: BTreeMap<SnapshotId, SnapshotMeta>,
    damaged: BTreeMap<SnapshotId, Damage>,
    /// Registrations whose files are being brought in, outside the lock.
    importing: BTreeMap<SnapshotId, Importing>,
}

/// A registration under way.
#[derive(Debug)]
struct Importing {
    owner: u32,
    size: u64,
    done: Arc<AtomicU64>,
}

/// How large snapshots may be, one and per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotLimits {
    /// `--max-snapshot-size`.
    pub max_size: u64,
    /// `--max-snapshot-bytes-per-uid` (operators are not held to it).
    pub per_uid_bytes: u64,
}

impl Catalog {
    /// Bytes of snapshots `uid` has registered or is registering.
    fn bytes_of(&self, uid: u32) -> u64 {
        let owner = |m: &SnapshotMeta| m.owner.unwrap_or(crate::owners::ROOT);
        let registered: u64 = self
            .metas
            .values()
            .filter(|m| owner(m) == uid)
            .map(|m| m.size)
            .sum();
        let importing: u64 = self
            .importing
            .values()
            .filter(|i| i.owner == uid)
            .map(|i| i.size)
            .sum();
        registered + importing
    }

    /// Whether `id` names a snapshot, a damaged one, or one being imported.
    fn taken(&self, id: &SnapshotId) -> bool {
        self.metas.contains_key(id)
            || self.damaged.contains_key(id)
            || self.importing.contains_key(id)
    }
}

impl Catalog {
    /// Registered, not damaged, and not on its way out.
    fn forkable(&self, id: &SnapshotId) -> bool {
        self.metas.get(id).is_some_and(|m| !m.delete_pending) && !self.damaged.contains_key(id)
    }
}

/// Snapshots and forks, on disk and served: the one place that decides what exists.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    store: Store,
    registry: Arc<Registry>,
    server: Server,
    catalog: Mutex<Catalog>,
    next_fork: AtomicU64,
    file_users: FileUsers,
    fuse: OnceLock<FuseMount>,
    started: Instant,
    /// What a fork prefetches unless `fork.create` says (`--prefetch`).
    default_prefetch: Prefetch,
    /// How large snapshots may be.
    limits: SnapshotLimits,
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Lifecycle {
    /// A lifecycle over a state directory, a registry and a server.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        server: Server,
        default_prefetch: Prefetch,
        limits: SnapshotLimits,
    ) -> Self {
        Self {
            default_prefetch,
            limits,
            store,
            registry,
            server,
            catalog: Mutex::new(Catalog::default()),
            next_fork: AtomicU64::new(1),
            file_users: FileUsers::default(),
            fuse: OnceLock::new(),
            started: Instant::now(),
        }
    }

    /// Records where the FUSE view is mounted (once: the daemon mounts it once).
    pub fn set_fuse_mount(&self, mount: FuseMount) {
        let _ = self.fuse.set(mount);
    }

    fn lock(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn socket_path(&self, fork: &ForkId) -> PathBuf {
        self.store.sockets_dir().join(format!("{fork}.sock"))
    }

    fn snapshot_info(&self, catalog: &Catalog, id: &SnapshotId, scan: &ForkScan) -> SnapshotInfo {
        let forks = scan.referencing(id);
        let (working_set, recording, working_set_error) = self
            .registry
            .snapshot(id)
            .map(|s| s.working_set.info())
            .unwrap_or_default();
        let vms = self.live_vms(id);
        let file_users = self.file_users.referencing(id);
        let meta = catalog.metas.get(id);
        SnapshotInfo {
            id: id.clone(),
            path: self.store.memory_path(id),
            size: meta.map(|m| m.size),
            created_unix_ms: meta.map(|m| m.created_unix_ms),
            owner: meta.map(|m| m.owner.unwrap_or(crate::owners::ROOT)),
            source: meta.map(|m| m.source.clone()),
            import: meta.map(|m| m.import),
            file: meta.and_then(|m| m.file),
            delete_pending: meta.is_some_and(|m| m.delete_pending),
            zero_pages: self.registry.snapshot(id).ok().map(|s| s.zero_page_count()),
            ref_count: forks.as_ref().map(|f| f.len() + file_users.len()),
            forks,
            file_users,
            fuse_file: self.fuse.get().map(|m| m.memory_file(id)),
            unreadable_fork_records: scan.unreadable.iter().map(|u| u.path.clone()).collect(),
            error: catalog.damaged.get(id).map(ToString::to_string),
            vmstate: meta.and_then(|m| m.vmstate).map(|v| VmStateInfo {
                vmm: v.vmm,
                path: self.store.vmstate_path(id),
                size: v.size,
            }),
            vms,
            working_set,
            recording,
            working_set_error,
            importing: catalog.importing.get(id).map(|i| ImportProgress {
                done_bytes: i.done.load(Ordering::Relaxed),
                total_bytes: i.size,
            }),
        }
    }

    /// The launched VMs whose records say they may still run on `snapshot` (references too),
    /// as far as they can be read (for reports).
    fn live_vms(&self, snapshot: &SnapshotId) -> Vec<VmId> {
        self.counted_vms(snapshot).unwrap_or_else(|e| match e {
            LifecycleError::CountsUnknown { .. } => self
                .store
                .scan_vms()
                .map(|scan| scan.live_on(snapshot))
                .unwrap_or_default(),
            _ => Vec::new(),
        })
    }

    /// The launched VMs running on `snapshot`, or, if some VM record cannot be read, a
    /// refusal naming it: counting fails closed, as with fork records.
    fn counted_vms(&self, snapshot: &SnapshotId) -> Result<Vec<VmId>, LifecycleError> {
        let scan = self.store.scan_vms()?;
        if !scan.unreadable.is_empty() {
            for (path, error) in &scan.unreadable {
                tracing::warn!(record = %path.display(), %error, "unreadable VM record");
            }
            return Err(LifecycleError::CountsUnknown {
                snapshot: snapshot.clone(),
                records: scan.unreadable.into_iter().map(|(path, _)| path).collect(),
            });
        }
        Ok(scan.live_on(snapshot))
    }

    /// Called when a launched VM stops using `snapshot`: finishes a deferred delete that
    /// waited for it.
    pub fn vm_released(&self, snapshot: &SnapshotId) {
        let mut catalog = self.lock();
        if let Err(e) = self.finish_pending_delete(&mut catalog, snapshot) {
            tracing::error!(snapshot = %snapshot, error = %crate::errors::error_chain(&e), "cannot finish a deferred delete");
        }
    }

    /// Every snapshot, with reference counts read off the fork records.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, LifecycleError> {
        let catalog = self.lock();
        let scan = self.store.scan_forks()?;
        let ids: BTreeSet<SnapshotId> = catalog
            .metas
            .keys()
            .chain(catalog.damaged.keys())
            .chain(catalog.importing.keys())
            .cloned()
            .collect();
        Ok(ids
            .iter()
            .map(|id| self.snapshot_info(&catalog, id, &scan))
            .collect())
    }

    /// The uid that registered snapshot `id`.
    pub fn snapshot_owner(&self, id: &SnapshotId) -> Result<u32, LifecycleError> {
        let catalog = self.lock();
        match catalog.metas.get(id) {
            Some(meta) => Ok(meta.owner.unwrap_or(crate::owners::ROOT)),
            // A damaged snapshot whose metadata is gone: only the operators may remove it.
            None if catalog.damaged.contains_key(id) => Ok(crate::owners::ROOT),
            None => Err(LifecycleError::no_snapshot(id)),
        }
    }

    /// One snapshot.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, LifecycleError> {
        let catalog = self.lock();
        if !catalog.taken(id) {
            return Err(LifecycleError::no_snapshot(id));
        }
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, id, &scan))
    }

    /// Deletes a snapshot no fork references; with `defer`, marks a referenced one to be
    /// deleted when its last fork ends. A damaged snapshot is removed only with `force`, and
    /// only once nothing references it (`force` changes nothing for a healthy one).
    pub fn delete_snapshot(
        &self,
        id: &SnapshotId,
        defer: bool,
        force: bool,
    ) -> Result<DeleteOutcome, LifecycleError> {
        let mut catalog = self.lock();
        if let Some(damage) = catalog.damaged.get(id) {
            if !force {
                return Err(LifecycleError::BrokenNeedsForce {
                    snapshot: id.clone(),
                    damage: damage.clone(),
                });
            }
            return self.delete_damaged(&mut catalog, id);
        }
        let Some(meta) = catalog.metas.get(id).cloned() else {
            return Err(LifecycleError::no_snapshot(id));
        };
        let (forks, file_users) = self.references_of(id)?;
        let vms = self.counted_vms(id)?;
        if forks.is_empty() && file_users.is_empty() && vms.is_empty() {
            self.remove_snapshot_now(&mut catalog, id)?;
            return Ok(DeleteOutcome {
                id: id.clone(),
                deleted: true,
                pending: false,
                forks,
                file_users,
            });
        }
        if !defer {
            return Err(LifecycleError::InUse {
                snapshot: id.clone(),
                forks,
                file_users,
                vms,
            });
        }
        let pending = SnapshotMeta {
            delete_pending: true,
            ..meta
        };
        self.store.write_snapshot_meta(&pending)?;
        catalog.metas.insert(id.clone(), pending);
        tracing::info!(snapshot = %id, references = %references(&forks, &file_users, &vms), "snapshot will be deleted when its last reference ends");
        Ok(DeleteOutcome {
            id: id.clone(),
            deleted: false,
            pending: true,
            forks,
            file_users,
        })
    }

    /// The forks (read off their records) and the processes holding its memory file that
    /// reference snapshot `id`; fails closed when some fork record cannot be read.
    fn references_of(
        &self,
        id: &SnapshotId,
    ) -> Result<(Vec<ForkId>, Vec<FileUserInfo>), LifecycleError> {
        let scan = self.store.scan_forks()?;
        let forks = scan
            .referencing(id)
            .ok_or_else(|| LifecycleError::CountsUnknown {
                snapshot: id.clone(),
                records: scan.unreadable.iter().map(|u| u.path.clone()).collect(),
            })?;
        Ok((forks, self.file_users.referencing(id)))
    }

    /// A forced delete of a damaged snapshot: refused while forks or file users reference it
    /// (or while they cannot be counted).
    fn delete_damaged(
        &self,
        catalog: &mut Catalog,
        id: &SnapshotId,
    ) -> Result<DeleteOutcome, LifecycleError> {
        let (forks, file_users) = self.references_of(id)?;
        let vms = self.counted_vms(id)?;
        if !forks.is_empty() || !file_users.is_empty() || !vms.is_empty() {
            return Err(LifecycleError::InUse {
                snapshot: id.clone(),
                forks,
                file_users,
                vms,
            });
        }
        self.remove_snapshot_now(catalog, id)?;
        Ok(DeleteOutcome {
            id: id.clone(),
            deleted: true,
            pending: false,
            forks,
            file_users,
        })
    }

    fn remove_snapshot_now(
        &self,
        catalog: &mut Catalog,
        id: &SnapshotId,
    ) -> Result<(), LifecycleError> {
        self.store.remove_snapshot(id)?;
        self.registry.remove_snapshot(id);
        catalog.metas.remove(id);
        catalog.damaged.remove(id);
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Marks a snapshot damaged if its memory file changed since it was recorded (one
    /// `fstat`); `Err` if it is damaged, now or before.
    fn verify_unchanged(
        &self,
        catalog: &mut Catalog,
        id: &SnapshotId,
    ) -> Result<(), LifecycleError> {
        if let Some(damage) = catalog.damaged.get(id) {
            return Err(LifecycleError::Broken {
                snapshot: id.clone(),
                damage: damage.clone(),
            });
        }
        let (Some(meta), Ok(snapshot)) = (catalog.metas.get(id), self.registry.snapshot(id)) else {
            return Ok(());
        };
        let Some(damage) = meta.file_changed(snapshot.file()) else {
            return Ok(());
        };
        tracing::error!(snapshot = %id, why = %damage, "snapshot damaged: no new forks of it; forks already running may read changed bytes");
        catalog.damaged.insert(id.clone(), damage.clone());
        Err(LifecycleError::Broken {
            snapshot: id.clone(),
            damage,
        })
    }

    /// A registered snapshot that is not on its way out (`not_found`, `conflict` otherwise).
    fn forkable_snapshot(
        &self,
        catalog: &Catalog,
        id: &SnapshotId,
    ) -> Result<Arc<Snapshot>, LifecycleError> {
        let meta = catalog
            .metas
            .get(id)
            .ok_or_else(|| LifecycleError::no_snapshot(id))?;
        if meta.delete_pending {
            return Err(LifecycleError::DeletePending(id.clone()));
        }
        Ok(self.registry.snapshot(id)?)
    }

    /// Under the lock, runs `change` on snapshot `id` if new forks of it may be made
    /// (unchanged, registered, not pending deletion); then describes it.
    pub(super) fn change_forkable(
        &self,
        id: &SnapshotId,
        change: impl FnOnce(&Arc<Snapshot>) -> Result<(), LifecycleError>,
    ) -> Result<SnapshotInfo, LifecycleError> {
        let mut catalog = self.lock();
        self.verify_unchanged(&mut catalog, id)?;
        change(&self.forkable_snapshot(&catalog, id)?)?;
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, id, &scan))
    }

    /// Under the lock, runs `change` on mapped snapshot `id`, whatever its state; then
    /// describes it.
    pub(super) fn change_registered(
        &self,
        id: &SnapshotId,
        change: impl FnOnce(&Arc<Snapshot>) -> Result<(), LifecycleError>,
    ) -> Result<SnapshotInfo, LifecycleError> {
        let catalog = self.lock();
        change(&self.registry.snapshot(id)?)?;
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, id, &scan))
    }

    /// Under the lock, runs `f` if `snapshot` is still the one registered under its id and
    /// new forks of it may be made; `None` (without running it) if not.
    pub(super) fn while_current<R>(
        &self,
        snapshot: &Arc<Snapshot>,
        f: impl FnOnce() -> R,
    ) -> Option<R> {
        let catalog = self.lock();
        let id = snapshot.id();
        let current = self
            .registry
            .snapshot(id)
            .is_ok_and(|s| Arc::ptr_eq(&s, snapshot));
        (current && catalog.forkable(id)).then(f)
    }

    /// Checks every snapshot's memory file against its record (one `fstat` each) and marks
    /// the changed ones damaged. The daemon calls it about once a second.
    pub fn check_snapshot_files(&self) {
        let mut catalog = self.lock();
        let ids: Vec<SnapshotId> = catalog.metas.keys().cloned().collect();
        for id in ids {
            let _ = self.verify_unchanged(&mut catalog, &id);
        }
    }

    /// Deletes a pending snapshot if no fork record names it and no process holds its memory
    /// file any more. Unknown counts keep it.
    fn finish_pending_delete(
        &self,
        catalog: &mut Catalog,
        id: &SnapshotId,
    ) -> Result<bool, LifecycleError> {
        if !catalog.metas.get(id).is_some_and(|m| m.delete_pending) {
            return Ok(false);
        }
        if !self.file_users.referencing(id).is_empty()
            || !self.counted_vms(id).is_ok_and(|vms| vms.is_empty())
        {
            return Ok(false);
        }
        let scan = self.store.scan_forks()?;
        if scan.referencing(id).is_some_and(|forks| forks.is_empty()) {
            self.remove_snapshot_now(catalog, id)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Creates a fork of `snapshot` owned by `owner` (a uid); its record is on disk before its
    /// socket listens.
    pub fn create_fork(
        &self,
        id: Option<ForkId>,
        snapshot: &SnapshotId,
        prefetch: Option<Prefetch>,
        owner: u32,
    ) -> Result<ForkInfo, LifecycleError> {
        let prefetch = prefetch.unwrap_or(self.default_prefetch);
        let mut catalog = self.lock();
        self.verify_unchanged(&mut catalog, snapshot)?;
        self.forkable_snapshot(&catalog, snapshot)?;
        self.server.admit_fork(owner)?;
        let id = match id {
            Some(id) => id,
            None => self.generated_fork_id(),
        };
        let taken = self.registry.fork(&id).is_ok() || self.store.fork_exists(&id);
        if taken {
            return Err(LifecycleError::Exists {
                kind: "fork",
                id: id.to_string(),
            });
        }
        let created = now_ms();
        self.store.write_fork(&ForkRecord {
            id: id.clone(),
            snapshot: snapshot.clone(),
            created_unix_ms: created,
            vmm: None,
            uffd: None,
            prefetch: Some(prefetch),
            owner: Some(owner),
        })?;
        if let Err(e) = self.store.reserve_fork_space(&id) {
            let _ = self.store.remove_fork(&id);
            return Err(e.into());
        }
        let fork = self.registry.add_fork(
            NewFork {
                id: id.clone(),
                snapshot: snapshot.clone(),
                owner,
                handoff_socket: self.socket_path(&id),
                created: time_of(created),
                prefetch,
            },
            ForkPhase::Waiting,
        )?;
        if let Err(e) = self.server.listen(fork.clone(), None) {
            let _ = self.registry.remove_fork(&id);
            let _ = self.store.remove_fork(&id);
            return Err(e.into());
        }
        drop(catalog);
        tracing::info!(fork = %id, snapshot = %snapshot, socket = %fork.handoff_socket().display(), "fork created");
        Ok(fork.info())
    }

    fn generated_fork_id(&self) -> ForkId {
        loop {
            let n = self.next_fork.fetch_add(1, Ordering::Relaxed);
            let id: ForkId = format!("fork-{n}")
                .parse()
                .expect("generated ids are valid");
            if self.registry.fork(&id).is_err() && !self.store.fork_exists(&id) {
                return id;
            }
        }
    }

    /// The registry entry of a fork read back from its record at start.
    fn new_fork_of(&self, record: &ForkRecord, socket: PathBuf, created: SystemTime) -> NewFork {
        NewFork {
            id: record.id.clone(),
            snapshot: record.snapshot.clone(),
            owner: record.owner.unwrap_or(crate::owners::ROOT),
            handoff_socket: socket,
            created,
            prefetch: record.prefetch.unwrap_or(self.default_prefetch),
        }
    }

    /// The uid that created fork `id`.
    pub fn fork_owner(&self, id: &ForkId) -> Result<u32, LifecycleError> {
        Ok(self.registry.fork(id)?.owner())
    }

    /// Stops serving a fork, releases its reference and forgets it.
    pub fn close_fork(&self, id: &ForkId) -> Result<ForkInfo, LifecycleError> {
        let fork = self.registry.fork(id)?;
        self.server.stop(&fork);
        let mut catalog = self.lock();
        self.store.remove_fork(id)?;
        if self.registry.fork(id).is_ok_and(|f| Arc::ptr_eq(&f, &fork)) {
            self.registry.remove_fork(id)?;
        }
        self.finish_pending_delete(&mut catalog, fork.snapshot())?;
        drop(catalog);
        tracing::info!(fork = %id, "fork closed");
        Ok(fork.info())
    }

    /// Records what a serving thread reported.
    pub fn on_event(&self, event: ForkEvent) {
        match event {
            ForkEvent::Ended(fork) => {
                if let Err(e) = self.on_ended(&fork) {
                    tracing::error!(error = %crate::errors::error_chain(&e), fork = %fork.id(),
                        "cannot record the end of a fork");
                }
            }
            ForkEvent::Recorded {
                snapshot,
                ticket,
                trace,
            } => self.working_sets().on_recorded(&snapshot, ticket, trace),
        }
    }

    fn is_current(&self, fork: &Arc<Fork>) -> bool {
        self.registry
            .fork(fork.id())
            .is_ok_and(|f| Arc::ptr_eq(&f, fork))
    }

    fn on_ended(&self, fork: &Arc<Fork>) -> Result<(), LifecycleError> {
        let mut catalog = self.lock();
        if !self.is_current(fork) || fork.status().phase.end_reason() == Some(EndReason::Shutdown) {
            return Ok(());
        }
        self.store.remove_fork(fork.id())?;
        self.finish_pending_delete(&mut catalog, fork.snapshot())?;
        Ok(())
    }

    /// Waits for a fork state.
    pub fn wait_fork(
        &self,
        id: &ForkId,
        state: ForkState,
        timeout: Duration,
    ) -> Result<ForkInfo, LifecycleError> {
        Ok(self.registry.wait_for_state(id, state, timeout)?.info())
    }

    /// Stops accepting handoffs and returns every fork's handoff socket, still listening, for
    /// the program an upgrade executes.
    pub fn hand_over_listeners(&self) -> Vec<(ForkId, std::os::unix::net::UnixListener)> {
        self.server.hand_over_listeners()
    }

    /// Stops serving every fork (at shutdown; their records stay for the next start). At an
    /// upgrade (`keep_sockets`) the handoff socket files stay: the new program listens on them.
    pub fn shutdown(&self, keep_sockets: bool) {
        self.server.shutdown();
        // Every session has ended: the counters are final. The next program carries them on.
        let counters = self
            .registry
            .forks()
            .iter()
            .map(|fork| (fork.id().clone(), fork.stats.report()))
            .collect();
        if let Err(e) = self.store.write_counters(&counters) {
            tracing::warn!(error = %crate::errors::error_chain(&e),
                "cannot keep the forks' counters; they start from 0 in the next program");
        }
        if keep_sockets {
            return;
        }
        for fork in self.registry.forks() {
            let _ = std::fs::remove_file(fork.handoff_socket());
        }
    }
}
