//! Registration: a memory file brought into the state directory (copied, cloned or linked)
//! under the size and per-user quotas, the copy made without the lifecycle's lock while the
//! snapshot shows `importing`, then mapped with its zero map (stored, or learnt and stored).

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use proto::model::{SnapshotInfo, VmmKind};
use proto::SnapshotId;

use super::{now_ms, Catalog, Importing, Lifecycle, LifecycleError};
use crate::snapshot::{Snapshot, ZERO_MAP_PAGE};
use crate::store::import::{ImportMethod, ImportMode, Source};
use crate::store::{SnapshotMeta, VmStateSource};

/// How much more time a start asks of the service manager before it reads a snapshot to find
/// its zero pages (a large one on a slow disk).
const SCAN_TIME_EXTENSION: Duration = Duration::from_secs(300);

impl Lifecycle {
    /// Registers the memory file at `path` (absolute; a symlink is refused) as snapshot `id`
    /// of `owner` (a uid).
    pub fn register_snapshot_path(
        &self,
        id: SnapshotId,
        path: &Path,
        mode: ImportMode,
        vmstate: Option<(&Path, VmmKind)>,
        owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError> {
        if !path.is_absolute() || vmstate.is_some_and(|(p, _)| !p.is_absolute()) {
            return Err(LifecycleError::BadPath {
                path: path.to_owned(),
                why: "the path must be absolute".into(),
            });
        }
        let open = |path: &Path| {
            Source::open(path).map_err(|e| LifecycleError::BadPath {
                path: path.to_owned(),
                why: crate::errors::error_chain(&e),
            })
        };
        let source = open(path)?;
        let vmstate = vmstate
            .map(|(p, vmm)| open(p).map(|s| (s, vmm)))
            .transpose()?;
        self.register_snapshot(id, source, mode, vmstate, owner)
    }

    /// Registers an open memory file as snapshot `id`, copied (or cloned) into the state
    /// directory, or linked ([`ImportMode::Link`]: the caller promises never to write it);
    /// with `vmstate`, the hypervisor's device state saved with it (always copied). `owner`
    /// (a uid) may delete it and change its working set.
    pub fn register_snapshot(
        &self,
        id: SnapshotId,
        source: Source,
        mut mode: ImportMode,
        vmstate: Option<(Source, VmmKind)>,
        owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError> {
        let bad = |why: String| LifecycleError::BadPath {
            path: source.name.clone(),
            why,
        };
        if self
            .fuse
            .get()
            .is_some_and(|m| std::os::unix::fs::MetadataExt::dev(&source.meta) == m.device)
        {
            // Reading it would need the FUSE view, whose opens wait for this very lock.
            return Err(bad(
                "the file is on pagerd's own FUSE mount; register the original".into(),
            ));
        }
        let size = source.meta.len();
        if size == 0 || size % ZERO_MAP_PAGE != 0 {
            return Err(bad(format!(
                "size {size} is not a non-zero multiple of 4096"
            )));
        }
        if size > self.limits.max_size {
            return Err(LifecycleError::TooLarge {
                size,
                max: self.limits.max_size,
            });
        }
        if mode == ImportMode::Link {
            if let Err(why) = crate::trusted::check_open_file(&source.file, &source.name) {
                // Its contents could change behind the snapshot's back without any metadata
                // moving (a writer's shared mapping): only files root alone can change are
                // linked.
                tracing::info!(snapshot = %id, source = %source.name.display(), %why,
                    "not linking a file others can change: copying it");
                mode = ImportMode::Copy;
            }
        }
        if mode == ImportMode::Link {
            self.store.check_linkable(&source.meta).map_err(|reason| {
                LifecycleError::NotLinkable {
                    path: source.name.clone(),
                    reason,
                }
            })?;
        }
        let mut catalog = self.lock();
        if catalog.taken(&id) {
            return Err(LifecycleError::Exists {
                kind: "snapshot",
                id: id.to_string(),
            });
        }
        let used = catalog.bytes_of(owner);
        if !crate::owners::is_operator(owner)
            && used.saturating_add(size) > self.limits.per_uid_bytes
        {
            return Err(LifecycleError::Quota {
                uid: owner,
                used,
                size,
                quota: self.limits.per_uid_bytes,
            });
        }
        if mode == ImportMode::Link {
            if let Some(other) = linked_as(&catalog, &source.meta) {
                // Another name would change the inode's ctime, which the other snapshot
                // watches: one linked snapshot per file.
                return Err(bad(format!(
                    "this file is already linked as snapshot `{other}`; fork that one, or \
                     register a copy"
                )));
            }
        }
        // The copy (and the zero-page scan) run without the lock: nothing else waits for
        // them. The id is held meanwhile, and its bytes count against the owner's quota.
        let done = Arc::new(AtomicU64::new(0));
        catalog.importing.insert(
            id.clone(),
            Importing {
                owner,
                size,
                done: done.clone(),
            },
        );
        drop(catalog);
        let started = std::time::Instant::now();
        let imported = self.import(&id, &source, mode, vmstate.as_ref(), owner, &done);
        let mut catalog = self.lock();
        catalog.importing.remove(&id);
        let (stored, snapshot) = imported?;
        crate::stats::DAEMON.imported(stored.import, started.elapsed());
        tracing::info!(snapshot = %id, source = %source.name.display(), import = %stored.import, size = stored.size,
            zero_pages = snapshot.zero_page_count(), "snapshot registered");
        if let Err(e) = self.registry.add_snapshot(snapshot) {
            let _ = self.store.remove_snapshot(&id);
            return Err(e.into());
        }
        catalog.metas.insert(id.clone(), stored);
        let scan = self.store.scan_forks()?;
        Ok(self.snapshot_info(&catalog, &id, &scan))
    }

    /// Maps snapshot `id`'s memory file with its zero map: the stored one if it still describes
    /// the file, else found by reading the file and stored for the next start
    /// ([`crate::store::zero_map`]).
    pub(super) fn open_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Snapshot, crate::snapshot::SnapshotError> {
        let snapshot = Snapshot::open(id.clone(), &self.store.memory_path(id), |file, pages| {
            let stored = self.store.load_zero_map(id, file, pages);
            if stored.is_none() {
                // Reading a large file takes a while: keep the service manager waiting.
                crate::notify::starting(
                    &format!("reading snapshot {id} to find its zero pages"),
                    SCAN_TIME_EXTENSION,
                );
            }
            stored
        })?;
        if snapshot.zero_pages_scanned() {
            if let Err(e) = self
                .store
                .store_zero_map(id, snapshot.file(), snapshot.zero_map())
            {
                tracing::warn!(snapshot = %id, error = %crate::errors::error_chain(&e),
                    "cannot store the zero map; the next start reads the memory file again");
            }
        }
        Ok(snapshot)
    }

    /// Brings a registration's files into the state directory and opens the memory file
    /// (called without the lock); on failure nothing of it is left.
    fn import(
        &self,
        id: &SnapshotId,
        source: &Source,
        mode: ImportMode,
        vmstate: Option<&(Source, VmmKind)>,
        owner: u32,
        done: &AtomicU64,
    ) -> Result<(SnapshotMeta, Snapshot), LifecycleError> {
        let state = vmstate.map(|(state, vmm)| VmStateSource {
            file: &state.file,
            size: state.meta.len(),
            vmm: *vmm,
        });
        let stored = self.store.add_snapshot(
            id,
            &source.file,
            &source.name,
            source.meta.len(),
            mode,
            now_ms(),
            state,
            owner,
            done,
        )?;
        let opened = self
            .open_snapshot(id)
            .map_err(LifecycleError::from)
            .and_then(|snapshot| match stored.file_changed(snapshot.file()) {
                // A linked file written while it was being registered.
                Some(damage) => Err(LifecycleError::ChangedWhileImporting {
                    path: source.name.clone(),
                    damage,
                }),
                None => Ok(snapshot),
            });
        match opened {
            Ok(snapshot) => Ok((stored, snapshot)),
            Err(e) => {
                let _ = self.store.remove_snapshot(id);
                Err(e)
            }
        }
    }
}

/// The snapshot that already links the file with metadata `source`, if any.
fn linked_as(catalog: &Catalog, source: &std::fs::Metadata) -> Option<SnapshotId> {
    use std::os::unix::fs::MetadataExt;
    catalog
        .metas
        .values()
        .find(|m| {
            m.import == ImportMethod::Hardlink
                && m.file
                    .is_some_and(|f| f.dev == source.dev() && f.ino == source.ino())
        })
        .map(|m| m.id.clone())
}
