//! What the daemon reports about what exists ([`Reports`]): counters, the fork list, forks by
//! state, a one-line summary for the service manager, and the daemon's status.
//!
//! ```text
//! Lifecycle::reports() ─▶ Reports ─▶ registry (forks, totals, snapshots)
//!                                  ├▶ file users (processes holding memory files)
//!                                  ├▶ server (workers and their loads)
//!                                  └▶ Lifecycle::health() (damaged snapshots, unreadable records)
//! ```
//!
//! Reports only read: nothing here takes the lifecycle's lock except through
//! [`Lifecycle::health`], and nothing here changes what exists.

use std::path::Path;
use std::time::Instant;

use proto::model::{
    ForkCounts, ForkInfo, ForkListEntry, ForkState, FuseStatus, StatsReport, StatusReport, VmCounts,
};
use proto::{ForkId, SnapshotId};

use super::{FuseMount, Lifecycle, LifecycleError};
use crate::file_users::FileUsers;
use crate::registry::Registry;
use crate::serve::Server;

/// A read-only view of what the lifecycle keeps, for answers and metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reports<'a> {
    lifecycle: &'a Lifecycle,
    registry: &'a Registry,
    file_users: &'a FileUsers,
    server: &'a Server,
    fuse: Option<&'a FuseMount>,
    state_dir: &'a Path,
    started: Instant,
}

/// What makes the daemon unhealthy, read under the lifecycle's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Health {
    /// Snapshots kept but not served.
    pub damaged_snapshots: Vec<SnapshotId>,
    /// Fork records that cannot be read (deletes are refused meanwhile).
    pub unreadable_fork_records: Vec<std::path::PathBuf>,
}

impl Lifecycle {
    /// What the lifecycle keeps, to report on.
    pub fn reports(&self) -> Reports<'_> {
        Reports {
            lifecycle: self,
            registry: &self.registry,
            file_users: &self.file_users,
            server: &self.server,
            fuse: self.fuse.get(),
            state_dir: self.store.root(),
            started: self.started,
        }
    }

    /// The damaged snapshots and the unreadable fork records.
    pub fn health(&self) -> Result<Health, LifecycleError> {
        let catalog = self.lock();
        let scan = self.store.scan_forks()?;
        Ok(Health {
            damaged_snapshots: catalog.damaged.keys().cloned().collect(),
            unreadable_fork_records: scan.unreadable.into_iter().map(|u| u.path).collect(),
        })
    }
}

impl Reports<'_> {
    /// Counters summed over every fork since the daemon started (closed ones included).
    pub fn stats(&self) -> StatsReport {
        StatsReport {
            forks: self.registry.forks().len(),
            totals: self.registry.totals(),
        }
    }

    /// Every uffd fork, then every process holding a memory file.
    pub fn fork_list(&self) -> Vec<ForkListEntry> {
        let forks = self.registry.forks();
        let uffd = forks
            .iter()
            .map(|f| ForkListEntry::Uffd(Box::new(f.info())));
        let files = self.file_users.list().into_iter().map(ForkListEntry::File);
        uffd.chain(files).collect()
    }

    /// One uffd fork.
    pub fn fork(&self, id: &ForkId) -> Result<ForkInfo, LifecycleError> {
        Ok(self.registry.fork(id)?.info())
    }

    /// Forks by state.
    pub fn fork_counts(&self) -> ForkCounts {
        let mut forks = ForkCounts::default();
        for fork in self.registry.forks() {
            match fork.status().phase.state() {
                ForkState::Waiting => forks.waiting += 1,
                ForkState::Serving => forks.serving += 1,
                ForkState::Ended => forks.ended += 1,
                ForkState::Detached => forks.detached += 1,
            }
        }
        forks
    }

    /// One line on what the daemon serves, for a service manager's status.
    pub fn summary(&self) -> String {
        let forks = self.fork_counts();
        format!(
            "serving {} forks ({} waiting, {} detached) of {} snapshots; {} processes hold memory files",
            forks.serving,
            forks.waiting,
            forks.detached,
            self.registry.snapshots().len(),
            self.file_users.list().len()
        )
    }

    /// Health, version and counts.
    pub fn status(&self) -> Result<StatusReport, LifecycleError> {
        let Health {
            damaged_snapshots: damaged,
            unreadable_fork_records: unreadable,
        } = self.lifecycle.health()?;
        let forks = self.fork_counts();
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            healthy: damaged.is_empty() && unreadable.is_empty(),
            state_dir: self.state_dir.to_owned(),
            workers: self.server.worker_count(),
            worker_sessions: self.server.worker_loads(),
            snapshots: self.registry.snapshots().len(),
            forks,
            vms: VmCounts::default(),
            damaged_snapshots: damaged,
            unreadable_fork_records: unreadable,
            open_fds: crate::sys::open_fd_count().ok(),
            fuse: self.fuse.map(|mount| FuseStatus {
                mountpoint: mount.path.clone(),
                read_path: mount.read_path,
                file_users: self.file_users.list().len(),
            }),
        })
    }
}
