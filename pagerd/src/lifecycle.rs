//! Snapshot and fork lifecycle: every change of what exists, made durable in the store before
//! it takes effect, under one lock.
//!
//! ```text
//! register:   import file ─▶ snapshot.json ─▶ rename into place ─▶ map it ─▶ registry
//! fork:       snapshot exists, not pending delete ─▶ fork record ─▶ registry ─▶ listen
//! attached:   fork record gains the VMM's identity (pid + start time)
//! ended/close: stop serving ─▶ remove fork record ─▶ finish a pending delete if no refs left
//! delete:     scan fork records (unreadable → refuse) ─▶ refs? conflict / mark pending
//!             : trash the directory
//! restart:    remove leftovers ─▶ map snapshots ─▶ each fork record: no VMM → listen again,
//!             VMM alive → detached, VMM gone → reap ─▶ finish pending deletes
//! ```
//!
//! Reference counts are read off the fork records every time they are needed
//! ([`Store::scan_forks`]); nothing stores a count. Processes holding a snapshot's memory file
//! on the FUSE mount ([`FileUsers`]) are references too: they live only in memory, since the
//! kernel tells the daemon when each handle is released.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::file_users::{FileKey, FileUserInfo, FileUsers};
use crate::fuse::MountInfo;
use crate::ids::Id;
use crate::registry::{unix_ms, Fork, ForkEvent, ForkInfo, ForkState, Registry, RegistryError};
use crate::serve::{ServeError, Server};
use crate::snapshot::{Snapshot, SnapshotError, ZERO_MAP_PAGE};
use crate::stats::ForkStatsReport;
use crate::store::{ForkRecord, ForkScan, SnapshotMeta, Store, StoreError, VmmIdentity};

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// No such snapshot or fork.
    #[error("no {kind} `{id}`")]
    NotFound {
        /// "snapshot" or "fork".
        kind: &'static str,
        /// The id.
        id: Id,
    },
    /// The id is taken.
    #[error("{kind} `{id}` already exists")]
    Exists {
        /// "snapshot" or "fork".
        kind: &'static str,
        /// The id.
        id: Id,
    },
    /// Live forks, or processes holding its memory file, reference the snapshot.
    #[error(
        "snapshot `{snapshot}` is referenced by {}; close them first, or delete with defer",
        references(forks, file_users)
    )]
    InUse {
        /// The snapshot.
        snapshot: Id,
        /// The forks referencing it.
        forks: Vec<Id>,
        /// The processes holding its memory file on the FUSE mount.
        file_users: Vec<FileUserInfo>,
    },
    /// The snapshot is being deleted; no new forks.
    #[error("snapshot `{0}` is pending deletion; no new forks of it are allowed")]
    DeletePending(Id),
    /// Some fork record cannot be read, so no reference count can be trusted.
    #[error("cannot count the forks of snapshot `{snapshot}`: unreadable fork record(s) {}; repair or remove them", paths(records))]
    CountsUnknown {
        /// The snapshot.
        snapshot: Id,
        /// The unreadable records.
        records: Vec<PathBuf>,
    },
    /// The snapshot's files on disk are damaged.
    #[error("snapshot `{snapshot}` is damaged: {why}")]
    Broken {
        /// The snapshot.
        snapshot: Id,
        /// What is wrong.
        why: String,
    },
    /// The path given cannot be a memory file.
    #[error("{}: {why}", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The memory file cannot be mapped.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Reading or writing the state directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The serving side failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A wait ran out.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn list(ids: &[Id]) -> String {
    ids.iter().map(Id::as_str).collect::<Vec<_>>().join(", ")
}

fn references(forks: &[Id], file_users: &[FileUserInfo]) -> String {
    let mut parts = Vec::new();
    if !forks.is_empty() {
        parts.push(format!("{} fork(s): {}", forks.len(), list(forks)));
    }
    if !file_users.is_empty() {
        let users: Vec<String> = file_users
            .iter()
            .map(|u| format!("{} (pid {}, {:?})", u.id, u.pid, u.state).to_lowercase())
            .collect();
        parts.push(format!(
            "{} process(es) holding its memory file: {}",
            users.len(),
            users.join(", ")
        ));
    }
    parts.join(" and ")
}

fn paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A snapshot as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: Id,
    /// The memory file in the state directory.
    pub path: PathBuf,
    /// What is recorded (absent when the metadata is unreadable).
    #[serde(flatten)]
    pub meta: Option<SnapshotMeta>,
    /// 4 KiB pages that are all zeros (when mapped).
    pub zero_pages: Option<u64>,
    /// References: forks plus processes holding its memory file; `null` when some fork
    /// record is unreadable.
    pub ref_count: Option<usize>,
    /// The forks' ids; `null` when unknown.
    pub forks: Option<Vec<Id>>,
    /// Processes holding its memory file on the FUSE mount.
    pub file_users: Vec<FileUserInfo>,
    /// Its memory file on the FUSE mount, for VMMs that map a file (when mounted).
    pub fuse_file: Option<PathBuf>,
    /// The unreadable fork records that make the count unknown.
    pub unreadable_fork_records: Vec<PathBuf>,
    /// What is wrong with a damaged snapshot.
    pub error: Option<String>,
}

/// What a delete did.
#[derive(Debug, Clone, Serialize)]
pub struct DeleteOutcome {
    /// The snapshot.
    pub id: Id,
    /// Gone now.
    pub deleted: bool,
    /// Marked for deletion when its last fork ends.
    pub pending: bool,
    /// The forks it waits for.
    pub forks: Vec<Id>,
    /// The processes holding its memory file it waits for.
    pub file_users: Vec<FileUserInfo>,
}

/// What reconciliation did at start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    /// Leftover files removed.
    pub removed_leftovers: Vec<PathBuf>,
    /// Snapshots mapped.
    pub snapshots: usize,
    /// Damaged snapshots (kept, not served).
    pub damaged_snapshots: Vec<Id>,
    /// Forks waiting for a VMM again.
    pub waiting: Vec<Id>,
    /// Forks whose VMM outlived the previous daemon.
    pub detached: Vec<Id>,
    /// Forks whose VMM is gone: their records were removed.
    pub reaped: Vec<Id>,
    /// Deferred deletes finished.
    pub deleted: Vec<Id>,
    /// Unreadable fork records (kept; deletes are refused while they exist).
    pub unreadable_fork_records: Vec<PathBuf>,
}

/// The in-memory copy of snapshot metadata, changed only together with the store.
#[derive(Debug, Default)]
struct Catalog {
    metas: BTreeMap<Id, SnapshotMeta>,
    damaged: BTreeMap<Id, String>,
}

impl Catalog {
    /// Registered, and not on its way out.
    fn forkable(&self, id: &Id) -> bool {
        self.metas.get(id).is_some_and(|m| !m.delete_pending)
    }
}

/// Snapshots and forks, on disk and served.
#[derive(Debug)]
pub struct Lifecycle {
    store: Store,
    registry: Arc<Registry>,
    server: Server,
    catalog: Mutex<Catalog>,
    next_fork: AtomicU64,
    file_users: FileUsers,
    fuse: OnceLock<MountInfo>,
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Lifecycle {
    /// A lifecycle over a state directory, a registry and a server.
    pub fn new(store: Store, registry: Arc<Registry>, server: Server) -> Self {
        Self {
            store,
            registry,
            server,
            catalog: Mutex::new(Catalog::default()),
            next_fork: AtomicU64::new(1),
            file_users: FileUsers::default(),
            fuse: OnceLock::new(),
        }
    }

    /// The server.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The state directory.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Processes holding memory files on the FUSE mount.
    pub fn file_users(&self) -> &FileUsers {
        &self.file_users
    }

    /// Records where the FUSE view is mounted (once: the daemon mounts it once).
    pub fn set_fuse_mount(&self, mount: MountInfo) {
        let _ = self.fuse.set(mount);
    }

    /// The FUSE view, if it is mounted.
    pub fn fuse_mount(&self) -> Option<&MountInfo> {
        self.fuse.get()
    }

    fn lock(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn socket_path(&self, fork: &Id) -> PathBuf {
        self.store.sockets_dir().join(format!("{fork}.sock"))
    }

    /// Rebuilds everything from the state directory after a start or a crash.
    pub fn reconcile(&self) -> Result<ReconcileReport, LifecycleError> {
        let mut catalog = self.lock();
        let mut report = ReconcileReport {
            removed_leftovers: self.store.remove_leftovers()?,
            ..ReconcileReport::default()
        };
        for stored in self.store.snapshots()? {
            let opened = stored.meta.and_then(|meta| {
                let snapshot = Snapshot::open(meta.id.clone(), &self.store.memory_path(&meta.id))
                    .map_err(|e| crate::errors::error_chain(&e))?;
                if snapshot.size() != meta.size {
                    return Err(format!(
                        "memory file is {} bytes, recorded {}",
                        snapshot.size(),
                        meta.size
                    ));
                }
                Ok((meta, snapshot))
            });
            match opened {
                Ok((meta, snapshot)) => {
                    self.registry.add_snapshot(snapshot)?;
                    catalog.metas.insert(meta.id.clone(), meta);
                    report.snapshots += 1;
                }
                Err(why) => {
                    tracing::error!(snapshot = %stored.id, %why, "damaged snapshot kept but not served");
                    report.damaged_snapshots.push(stored.id.clone());
                    catalog.damaged.insert(stored.id, why);
                }
            }
        }
        let scan = self.store.scan_forks()?;
        for unreadable in &scan.unreadable {
            tracing::error!(record = %unreadable.path.display(), error = %unreadable.error,
                "unreadable fork record; snapshot deletes are refused until it is repaired or removed");
        }
        report.unreadable_fork_records = scan.unreadable.iter().map(|u| u.path.clone()).collect();
        for record in &scan.records {
            let created = time_of(record.created_unix_ms);
            let socket = self.socket_path(&record.id);
            match record.vmm {
                Some(vmm) if !vmm.is_alive() => {
                    self.store.remove_fork(&record.id)?;
                    report.reaped.push(record.id.clone());
                }
                Some(_) => {
                    let fork = self.registry.add_fork(
                        record.id.clone(),
                        record.snapshot.clone(),
                        socket,
                        ForkState::Detached,
                        created,
                    )?;
                    self.registry.update(&fork, |s| {
                        s.vmm_pid = record.vmm.map(|v| v.pid);
                        s.end_reason = Some("daemon_restarted".into());
                    });
                    report.detached.push(record.id.clone());
                }
                None => {
                    let fork = self.registry.add_fork(
                        record.id.clone(),
                        record.snapshot.clone(),
                        socket,
                        ForkState::Waiting,
                        created,
                    )?;
                    if let Err(e) = self.server.listen(fork) {
                        tracing::error!(fork = %record.id, error = %e, "cannot listen for the fork's VMM");
                    }
                    report.waiting.push(record.id.clone());
                }
            }
        }
        let pending: Vec<Id> = catalog
            .metas
            .values()
            .filter(|m| m.delete_pending)
            .map(|m| m.id.clone())
            .collect();
        for id in pending {
            if self.finish_pending_delete(&mut catalog, &id)? {
                report.deleted.push(id);
            }
        }
        tracing::info!(report = %serde_json::to_string(&report).unwrap_or_default(), "reconciled the state directory");
        Ok(report)
    }

    /// Registers a memory file as snapshot `id`.
    pub fn register_snapshot(&self, id: Id, path: &Path) -> Result<SnapshotInfo, LifecycleError> {
        let bad = |why: &str| LifecycleError::BadPath {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        if !path.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        let meta = std::fs::metadata(path).map_err(|e| bad(&e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file"));
        }
        if self
            .fuse_mount()
            .is_some_and(|m| std::os::unix::fs::MetadataExt::dev(&meta) == m.device)
        {
            // Reading it would need the FUSE view, whose opens wait for this very lock.
            return Err(bad(
                "the file is on pagerd's own FUSE mount; register the original",
            ));
        }
        if meta.len() == 0 || meta.len() % ZERO_MAP_PAGE != 0 {
            return Err(bad(&format!(
                "size {} is not a non-zero multiple of 4096",
                meta.len()
            )));
        }
        let mut catalog = self.lock();
        if catalog.metas.contains_key(&id) || catalog.damaged.contains_key(&id) {
            return Err(LifecycleError::Exists {
                kind: "snapshot",
                id,
            });
        }
        let stored = self.store.add_snapshot(&id, path, meta.len(), now_ms())?;
        let snapshot = match Snapshot::open(id.clone(), &self.store.memory_path(&id)) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.store.remove_snapshot(&id);
                return Err(e.into());
            }
        };
        tracing::info!(snapshot = %id, source = %path.display(), import = ?stored.import, size = stored.size,
            zero_pages = snapshot.zero_page_count(), "snapshot registered");
        self.registry.add_snapshot(snapshot)?;
        catalog.metas.insert(id.clone(), stored);
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, &id, &scan))
    }

    fn snapshot_info(&self, catalog: &Catalog, id: &Id, scan: &ForkScan) -> SnapshotInfo {
        let forks = scan.referencing(id);
        let file_users = self.file_users.referencing(id);
        SnapshotInfo {
            id: id.clone(),
            path: self.store.memory_path(id),
            meta: catalog.metas.get(id).cloned(),
            zero_pages: self.registry.snapshot(id).ok().map(|s| s.zero_page_count()),
            ref_count: forks.as_ref().map(|f| f.len() + file_users.len()),
            forks,
            file_users,
            fuse_file: self
                .fuse_mount()
                .map(|m| crate::fuse::memory_file(&m.path, id)),
            unreadable_fork_records: scan.unreadable.iter().map(|u| u.path.clone()).collect(),
            error: catalog.damaged.get(id).cloned(),
        }
    }

    /// Every snapshot, with reference counts read off the fork records.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, LifecycleError> {
        let catalog = self.lock();
        let scan = self.store.scan_forks()?;
        let ids: Vec<Id> = catalog
            .metas
            .keys()
            .chain(catalog.damaged.keys())
            .cloned()
            .collect();
        Ok(ids
            .iter()
            .map(|id| self.snapshot_info(&catalog, id, &scan))
            .collect())
    }

    /// One snapshot.
    pub fn snapshot(&self, id: &Id) -> Result<SnapshotInfo, LifecycleError> {
        let catalog = self.lock();
        if !catalog.metas.contains_key(id) && !catalog.damaged.contains_key(id) {
            return Err(LifecycleError::NotFound {
                kind: "snapshot",
                id: id.clone(),
            });
        }
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, id, &scan))
    }

    /// Deletes a snapshot no fork references; with `defer`, marks a referenced one to be
    /// deleted when its last fork ends.
    pub fn delete_snapshot(&self, id: &Id, defer: bool) -> Result<DeleteOutcome, LifecycleError> {
        let mut catalog = self.lock();
        if let Some(why) = catalog.damaged.get(id) {
            return Err(LifecycleError::Broken {
                snapshot: id.clone(),
                why: why.clone(),
            });
        }
        let Some(meta) = catalog.metas.get(id).cloned() else {
            return Err(LifecycleError::NotFound {
                kind: "snapshot",
                id: id.clone(),
            });
        };
        let scan = self.store.scan_forks()?;
        let forks = scan
            .referencing(id)
            .ok_or_else(|| LifecycleError::CountsUnknown {
                snapshot: id.clone(),
                records: scan.unreadable.iter().map(|u| u.path.clone()).collect(),
            })?;
        let file_users = self.file_users.referencing(id);
        if forks.is_empty() && file_users.is_empty() {
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
            });
        }
        let pending = SnapshotMeta {
            delete_pending: true,
            ..meta
        };
        self.store.write_snapshot_meta(&pending)?;
        catalog.metas.insert(id.clone(), pending);
        tracing::info!(snapshot = %id, references = %references(&forks, &file_users), "snapshot will be deleted when its last reference ends");
        Ok(DeleteOutcome {
            id: id.clone(),
            deleted: false,
            pending: true,
            forks,
            file_users,
        })
    }

    fn remove_snapshot_now(&self, catalog: &mut Catalog, id: &Id) -> Result<(), LifecycleError> {
        self.store.remove_snapshot(id)?;
        self.registry.remove_snapshot(id);
        catalog.metas.remove(id);
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Deletes a pending snapshot if no fork record names it and no process holds its memory
    /// file any more. Unknown counts keep it.
    fn finish_pending_delete(
        &self,
        catalog: &mut Catalog,
        id: &Id,
    ) -> Result<bool, LifecycleError> {
        if !catalog.metas.get(id).is_some_and(|m| m.delete_pending) {
            return Ok(false);
        }
        if !self.file_users.referencing(id).is_empty() {
            return Ok(false);
        }
        let scan = self.store.scan_forks()?;
        if scan.referencing(id).is_some_and(|forks| forks.is_empty()) {
            self.remove_snapshot_now(catalog, id)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Creates a fork of `snapshot`; its record is on disk before its socket listens.
    pub fn create_fork(&self, id: Option<Id>, snapshot: &Id) -> Result<ForkInfo, LifecycleError> {
        let catalog = self.lock();
        let meta = catalog
            .metas
            .get(snapshot)
            .ok_or_else(|| LifecycleError::NotFound {
                kind: "snapshot",
                id: snapshot.clone(),
            })?;
        if meta.delete_pending {
            return Err(LifecycleError::DeletePending(snapshot.clone()));
        }
        self.server.admit_fork()?;
        let id = match id {
            Some(id) => id,
            None => self.generated_fork_id(),
        };
        let taken = self.registry.fork(&id).is_ok() || self.store.fork_exists(&id);
        if taken {
            return Err(LifecycleError::Exists { kind: "fork", id });
        }
        let created = now_ms();
        self.store.write_fork(&ForkRecord {
            id: id.clone(),
            snapshot: snapshot.clone(),
            created_unix_ms: created,
            vmm: None,
        })?;
        let fork = self.registry.add_fork(
            id.clone(),
            snapshot.clone(),
            self.socket_path(&id),
            ForkState::Waiting,
            time_of(created),
        )?;
        if let Err(e) = self.server.listen(fork.clone()) {
            let _ = self.registry.remove_fork(&id);
            let _ = self.store.remove_fork(&id);
            return Err(e.into());
        }
        drop(catalog);
        tracing::info!(fork = %id, snapshot = %snapshot, socket = %fork.handoff_socket().display(), "fork created");
        Ok(fork.info())
    }

    fn generated_fork_id(&self) -> Id {
        loop {
            let n = self.next_fork.fetch_add(1, Ordering::Relaxed);
            let id: Id = format!("fork-{n}")
                .parse()
                .expect("generated ids are valid");
            if self.registry.fork(&id).is_err() && !self.store.fork_exists(&id) {
                return id;
            }
        }
    }

    /// Stops serving a fork, releases its reference and forgets it.
    pub fn close_fork(&self, id: &Id) -> Result<ForkInfo, LifecycleError> {
        let fork = self
            .registry
            .fork(id)
            .map_err(|_| LifecycleError::NotFound {
                kind: "fork",
                id: id.clone(),
            })?;
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
        let result = match &event {
            ForkEvent::Attached(fork) => self.on_attached(fork),
            ForkEvent::Ended(fork) => self.on_ended(fork),
        };
        if let Err(e) = result {
            tracing::error!(error = %crate::errors::error_chain(&e), ?event, "cannot record a fork event");
        }
    }

    fn is_current(&self, fork: &Arc<Fork>) -> bool {
        self.registry
            .fork(fork.id())
            .is_ok_and(|f| Arc::ptr_eq(&f, fork))
    }

    fn on_attached(&self, fork: &Arc<Fork>) -> Result<(), LifecycleError> {
        let _catalog = self.lock();
        if !self.is_current(fork) {
            return Ok(());
        }
        let status = fork.status();
        let Some(vmm) = status.vmm_pid.and_then(VmmIdentity::of) else {
            return Ok(());
        };
        let record = ForkRecord {
            id: fork.id().clone(),
            snapshot: fork.snapshot().clone(),
            created_unix_ms: unix_ms(fork.created()),
            vmm: Some(vmm),
        };
        // A fork that already ended (its VMM died at once) has released its record.
        if status.state == ForkState::Serving {
            self.store.write_fork(&record)?;
        }
        Ok(())
    }

    fn on_ended(&self, fork: &Arc<Fork>) -> Result<(), LifecycleError> {
        let mut catalog = self.lock();
        if !self.is_current(fork) || fork.status().end_reason.as_deref() == Some("shutdown") {
            return Ok(());
        }
        self.store.remove_fork(fork.id())?;
        self.finish_pending_delete(&mut catalog, fork.snapshot())?;
        Ok(())
    }

    /// A snapshot whose memory file may be opened now: registered, mapped, not pending
    /// deletion.
    pub fn openable_snapshot(&self, id: &Id) -> Option<Arc<Snapshot>> {
        let catalog = self.lock();
        catalog
            .forkable(id)
            .then(|| self.registry.snapshot(id).ok())
            .flatten()
    }

    /// Every snapshot whose memory file may be opened now.
    pub fn openable_snapshots(&self) -> Vec<Arc<Snapshot>> {
        let catalog = self.lock();
        let mut snapshots = self.registry.snapshots();
        snapshots.retain(|s| catalog.forkable(s.id()));
        snapshots
    }

    /// Records that process `pid` opened `snapshot`'s memory file, if that very snapshot may
    /// still be opened (a delete or a re-registration may have happened since the kernel
    /// looked the file up). Returns the handle that identifies the reference.
    pub fn open_memory_file(
        &self,
        snapshot: &Arc<Snapshot>,
        pid: i32,
        backing: Option<FileKey>,
    ) -> Result<u64, LifecycleError> {
        let catalog = self.lock();
        let id = snapshot.id();
        match catalog.metas.get(id) {
            Some(meta) if meta.delete_pending => {
                return Err(LifecycleError::DeletePending(id.clone()))
            }
            Some(_)
                if self
                    .registry
                    .snapshot(id)
                    .is_ok_and(|current| Arc::ptr_eq(&current, snapshot)) => {}
            _ => {
                return Err(LifecycleError::NotFound {
                    kind: "snapshot",
                    id: id.clone(),
                })
            }
        }
        let handle = self.file_users.open(id.clone(), pid, backing);
        drop(catalog);
        tracing::info!(snapshot = %id, pid, handle, "memory file opened");
        Ok(handle)
    }

    /// The kernel released a memory file handle: the reference ends (unless the process still
    /// maps the file through passthrough), which may finish a pending delete.
    pub fn release_memory_file(&self, handle: u64) {
        let mut catalog = self.lock();
        if let Some(snapshot) = self.file_users.release(handle) {
            tracing::info!(snapshot = %snapshot, handle, "memory file released");
            self.after_file_user_left(&mut catalog, &snapshot);
        }
    }

    /// A file user of `snapshot` is gone: a delete may have been waiting for it.
    fn after_file_user_left(&self, catalog: &mut Catalog, snapshot: &Id) {
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

    /// Waits for a fork state.
    pub fn wait_fork(
        &self,
        id: &Id,
        state: ForkState,
        timeout: Duration,
    ) -> Result<ForkInfo, LifecycleError> {
        Ok(self.registry.wait_for_state(id, state, timeout)?.info())
    }

    /// Summed counters of every fork the daemon knows.
    pub fn totals(&self) -> ForkStatsReport {
        let mut total = ForkStatsReport::default();
        for fork in self.registry.forks() {
            total += &fork.stats.report();
        }
        total
    }

    /// Damaged snapshots and unreadable fork records, for status.
    pub fn problems(&self) -> Result<(Vec<Id>, Vec<PathBuf>), LifecycleError> {
        let catalog = self.lock();
        let scan = self.store.scan_forks()?;
        Ok((
            catalog.damaged.keys().cloned().collect(),
            scan.unreadable.into_iter().map(|u| u.path).collect(),
        ))
    }
}
