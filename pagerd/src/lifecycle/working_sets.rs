//! Working-set bookkeeping ([`WorkingSets`]): recording on request, storing what recordings
//! learn, loading stored sets at start, and clearing them.
//!
//! ```text
//! snapshot.record ─▶ slot armed (the next N forks record)
//! trace from a worker ─▶ slot.submit ─▶ complete? merge ─▶ plan ─▶ temp file (no lock held)
//!     ─▶ under the lock: still the same snapshot and recording? rename into place, install
//! start ─▶ each snapshot's stored set loaded (a damaged file is reported, not used)
//! snapshot.clear_working_set ─▶ slot cleared, file removed durably
//! ```
//!
//! Stored sets live in the snapshot's directory, so deleting the snapshot deletes its set.
//! Whether a snapshot may take a set (registered, unchanged, not on its way out) is the
//! lifecycle's to decide: [`WorkingSets`] asks it, and changes a set only under its lock.

use std::sync::Arc;

use proto::model::SnapshotInfo;
use proto::SnapshotId;

use super::{now_ms, Lifecycle, LifecycleError};
use crate::memory::{FilePage, MemorySource};
use crate::registry::Registry;
use crate::snapshot::Snapshot;
use crate::store::atomic::remove_durably;
use crate::store::Store;
use crate::working_set::merge::{merge, Trace};
use crate::working_set::slot::Ticket;
use crate::working_set::{Plan, WorkingSet, FILE_NAME};

/// The working sets of the snapshots the lifecycle keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkingSets<'a> {
    lifecycle: &'a Lifecycle,
    store: &'a Store,
    registry: &'a Registry,
}

impl Lifecycle {
    /// The working sets of its snapshots.
    pub fn working_sets(&self) -> WorkingSets<'_> {
        WorkingSets {
            lifecycle: self,
            store: &self.store,
            registry: &self.registry,
        }
    }
}

impl WorkingSets<'_> {
    /// Has the next `forks` uffd forks of `id` record its working set.
    pub fn record(&self, id: &SnapshotId, forks: u32) -> Result<SnapshotInfo, LifecycleError> {
        self.lifecycle.change_forkable(id, |snapshot| {
            snapshot.working_set.arm(forks);
            tracing::info!(snapshot = %id, forks, "recording the working set");
            Ok(())
        })
    }

    /// Deletes the stored working set of `id` and stops any recording.
    pub fn clear(&self, id: &SnapshotId) -> Result<SnapshotInfo, LifecycleError> {
        self.lifecycle.change_registered(id, |snapshot| {
            snapshot.working_set.clear();
            let dir = self.store.snapshot_dir(id);
            remove_durably(&dir, FILE_NAME).map_err(|e| crate::store::StoreError {
                action: "cannot remove the working set in",
                path: dir.clone(),
                source: e,
            })?;
            tracing::info!(snapshot = %id, "working set cleared");
            Ok(())
        })
    }

    /// A recording fork's first touches. Once its recording is complete, the merged set is
    /// written beside the snapshot and replayed into new forks from then on.
    pub fn on_recorded(&self, snapshot: &Arc<Snapshot>, ticket: Ticket, trace: Trace) {
        let Some(done) = snapshot.working_set.submit(ticket, trace) else {
            return;
        };
        let id = snapshot.id().clone();
        let forks = u32::try_from(done.traces.len()).unwrap_or(u32::MAX);
        let ordered = merge(&done.traces);
        let plan = Plan::new(&ordered, |page| snapshot.is_zero_page(FilePage(page)));
        // The write happens without the lifecycle lock: a large set takes a while.
        let dir = self.store.snapshot_dir(&id);
        let written =
            WorkingSet::write(&dir, &plan, snapshot.size(), forks, now_ms(), |off, len| {
                snapshot.read_at(off, len)
            });
        let installed = self.lifecycle.while_current(snapshot, || {
            if !snapshot.working_set.is_latest(done.ticket) {
                return false;
            }
            match written.and_then(|pending| pending.commit()) {
                Ok(set) => {
                    tracing::info!(snapshot = %id, forks, pages = set.info().pages, runs = set.info().runs,
                        bytes = set.info().file_bytes, "working set stored");
                    snapshot.working_set.set(Some(Arc::new(set)));
                }
                Err(e) => {
                    tracing::error!(snapshot = %id, error = %e, "cannot store the working set; forks are served on demand");
                    snapshot
                        .working_set
                        .set_error(format!("cannot store the working set: {e}"));
                }
            }
            true
        });
        if installed != Some(true) {
            tracing::info!(snapshot = %id, "a recording finished after its snapshot was deleted or its set cleared; dropped");
        }
    }

    /// Loads the stored working set of every mapped snapshot (at start). A file that cannot
    /// be used is reported in `snapshot.get` and left alone; its snapshot records anew.
    pub fn load_stored(&self) {
        for snapshot in self.registry.snapshots() {
            let path = self.store.snapshot_dir(snapshot.id()).join(FILE_NAME);
            match WorkingSet::load(&path, snapshot.size()) {
                Ok(set) => snapshot.working_set.set(set.map(Arc::new)),
                Err(e) => {
                    tracing::error!(snapshot = %snapshot.id(), path = %path.display(), error = %e,
                        "unusable working set; forks are served on demand until a new one is recorded");
                    snapshot
                        .working_set
                        .set_error(format!("{}: {e}", path.display()));
                }
            }
        }
    }
}
