//! What the lifecycle reports: counters, the fork list, forks by state, a one-line summary for
//! the service manager, and the daemon's status.

use proto::model::{
    ForkCounts, ForkInfo, ForkListEntry, ForkState, FuseStatus, StatsReport, StatusReport, VmCounts,
};
use proto::Id;

use super::{Lifecycle, LifecycleError};

impl Lifecycle {
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
    pub fn fork(&self, id: &Id) -> Result<ForkInfo, LifecycleError> {
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
        let (damaged, unreadable) = {
            let catalog = self.lock();
            let scan = self.store.scan_forks()?;
            (
                catalog.damaged.keys().cloned().collect::<Vec<_>>(),
                scan.unreadable
                    .into_iter()
                    .map(|u| u.path)
                    .collect::<Vec<_>>(),
            )
        };
        let forks = self.fork_counts();
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            healthy: damaged.is_empty() && unreadable.is_empty(),
            state_dir: self.store.root().to_owned(),
            workers: self.server.worker_count(),
            worker_sessions: self.server.worker_loads(),
            snapshots: self.registry.snapshots().len(),
            forks,
            vms: VmCounts::default(),
            damaged_snapshots: damaged,
            unreadable_fork_records: unreadable,
            open_fds: crate::sys::open_fd_count().ok(),
            fuse: self.fuse.get().map(|mount| FuseStatus {
                mountpoint: mount.path.clone(),
                read_path: mount.read_path,
                file_users: self.file_users.list().len(),
            }),
        })
    }
}
