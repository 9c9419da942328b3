//! Reconciliation at start: the state directory and live processes, made consistent again.
//!
//! ```text
//! remove leftovers (temp files, trash, stale sockets) ─▶ map each snapshot, check its memory
//! file against its record (damaged: kept, reported, not served) ─▶ load working sets ─▶ each
//! fork record: no VMM → listen again; VMM alive → take its uffd back or detach with the
//! reason; VMM gone → reap ─▶ processes still mapping memory files counted again ─▶ finish
//! pending deletes
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::registry::{ForkPhase, Transition};
use proto::{ForkId, SnapshotId};

use super::{recovery, time_of, Lifecycle, LifecycleError, ReconcileReport};
use crate::snapshot::Snapshot;
use crate::store::damage::Damage;
use crate::store::SnapshotMeta;

impl Lifecycle {
    /// Rebuilds everything from the state directory after a start or a crash. `fuse_mount` is
    /// where memory files were (or are to be) shown: processes still mapping them from an
    /// earlier daemon are counted again before any deferred delete is finished.
    ///
    /// `handoffs` are the forks' handoff sockets the program an upgrade replaced handed over,
    /// still listening: their forks listen on them (VMMs that connected meanwhile are served),
    /// and the sockets of forks that no longer exist are closed and removed.
    pub fn reconcile(
        &self,
        fuse_mount: &Path,
        mut handoffs: BTreeMap<ForkId, std::os::unix::net::UnixListener>,
    ) -> Result<ReconcileReport, LifecycleError> {
        let mut catalog = self.lock();
        let keep: Vec<PathBuf> = handoffs.keys().map(|id| self.socket_path(id)).collect();
        let mut report = ReconcileReport {
            removed_leftovers: self.store.remove_leftovers(&keep)?,
            ..ReconcileReport::default()
        };
        for stored in self.store.snapshots()? {
            let opened = stored.meta.and_then(|meta| self.open_stored(meta));
            match opened {
                Ok((meta, snapshot)) => {
                    self.registry.add_snapshot(snapshot)?;
                    catalog.metas.insert(meta.id.clone(), meta);
                    report.snapshots += 1;
                }
                Err(damage) => {
                    tracing::error!(snapshot = %stored.id, why = %damage, "damaged snapshot kept but not served");
                    report.damaged_snapshots.push(stored.id.clone());
                    catalog.damaged.insert(stored.id, damage);
                }
            }
        }
        self.working_sets().load_stored();
        let scan = self.store.scan_forks()?;
        for unreadable in &scan.unreadable {
            tracing::error!(record = %unreadable.path.display(), error = %unreadable.error,
                "unreadable fork record; snapshot deletes are refused until it is repaired or removed");
        }
        report.unreadable_fork_records = scan.unreadable.iter().map(|u| u.path.clone()).collect();
        // What the previous program counted goes on from where it stopped.
        let mut counters = self.store.take_counters();
        let mut carry_over = |fork: &crate::registry::Fork| {
            if let Some(previous) = counters.remove(fork.id()) {
                fork.stats.carry_over(&previous);
            }
        };
        for record in &scan.records {
            let created = time_of(record.created_unix_ms);
            let socket = self.socket_path(&record.id);
            match record.vmm {
                Some(vmm) if !vmm.is_alive() => {
                    self.store.remove_fork(&record.id)?;
                    report.reaped.push(record.id.clone());
                }
                Some(vmm) => {
                    let fork = self.registry.add_fork(
                        self.new_fork_of(record, socket, created),
                        ForkPhase::Recovering { vmm_pid: vmm.pid },
                    )?;
                    carry_over(&fork);
                    let inherited = handoffs.remove(&record.id);
                    match recovery::recover_fork(&self.server, &fork, record, vmm, inherited) {
                        Ok(()) => report.recovered.push(record.id.clone()),
                        Err(e) => {
                            tracing::error!(fork = %record.id, vmm_pid = vmm.pid, error = %crate::errors::error_chain(&e),
                                "the VMM outlived the previous daemon but its uffd cannot be taken back; detached");
                            let _ = self
                                .registry
                                .transition(&fork, Transition::Detach(e.reason()));
                            report.detached.push(record.id.clone());
                        }
                    }
                }
                None => {
                    let fork = self.registry.add_fork(
                        self.new_fork_of(record, socket, created),
                        ForkPhase::Waiting,
                    )?;
                    carry_over(&fork);
                    let inherited = handoffs.remove(&record.id);
                    if let Err(e) = self.server.listen(fork, inherited) {
                        tracing::error!(fork = %record.id, error = %e, "cannot listen for the fork's VMM");
                    }
                    report.waiting.push(record.id.clone());
                }
            }
        }
        for (id, listener) in std::mem::take(&mut handoffs) {
            drop(listener);
            let _ = std::fs::remove_file(self.socket_path(&id));
        }
        let roots = [
            fuse_mount.to_owned(),
            self.store.root().to_owned(),
            PathBuf::from("/"),
        ];
        let snapshots: BTreeSet<SnapshotId> = catalog
            .metas
            .keys()
            .chain(catalog.damaged.keys())
            .cloned()
            .collect();
        for mapper in crate::file_users::find_mappers(&roots, &snapshots) {
            tracing::info!(snapshot = %mapper.snapshot, pid = mapper.pid, "a process still maps a memory file from before the restart");
            self.file_users.adopt(mapper);
            report.file_users += 1;
        }
        let pending: Vec<SnapshotId> = catalog
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
        report.log();
        Ok(report)
    }

    /// Maps a snapshot found in the state directory and checks its memory file against its
    /// record; `Err` says why it is damaged.
    fn open_stored(&self, meta: SnapshotMeta) -> Result<(SnapshotMeta, Snapshot), Damage> {
        let snapshot = self
            .open_snapshot(&meta.id)
            .map_err(|e| Damage::Unmappable(Arc::new(e)))?;
        if snapshot.size() != meta.size {
            return Err(Damage::SizeMismatch {
                actual: snapshot.size(),
                recorded: meta.size,
            });
        }
        let meta = self.store.verify_memory(meta, snapshot.file())?;
        Ok((meta, snapshot))
    }
}
