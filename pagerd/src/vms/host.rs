//! What VM supervision needs from the rest of the daemon, and nothing more: the lifecycle
//! implements [`VmHost`], so `vms` never reaches into the store's snapshot and fork records
//! or the serving side.

use std::path::Path;

use proto::model::{ForkInfo, SnapshotInfo, VmmKind};
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId};

use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::store::import::ImportMode;

/// Snapshots and forks, as launched VMs use them.
pub(crate) trait VmHost: Send + Sync + std::fmt::Debug {
    /// One snapshot (its hypervisor state and FUSE file).
    fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, LifecycleError>;
    /// A fork whose handoff socket the VM's hypervisor is given.
    fn create_fork(
        &self,
        id: ForkId,
        snapshot: &SnapshotId,
        prefetch: Option<Prefetch>,
        owner: u32,
    ) -> Result<ForkInfo, LifecycleError>;
    /// Ends a VM's fork (its hypervisor is gone).
    fn close_fork(&self, id: &ForkId) -> Result<ForkInfo, LifecycleError>;
    /// Registers files a hypervisor just wrote as a new snapshot (copied in).
    fn register(
        &self,
        id: SnapshotId,
        memory: &Path,
        vmstate: &Path,
        vmm: VmmKind,
        owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError>;
    /// A VM stopped using `snapshot`.
    fn released(&self, snapshot: &SnapshotId);
}

impl VmHost for Lifecycle {
    fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, LifecycleError> {
        Lifecycle::snapshot(self, id)
    }

    fn create_fork(
        &self,
        id: ForkId,
        snapshot: &SnapshotId,
        prefetch: Option<Prefetch>,
        owner: u32,
    ) -> Result<ForkInfo, LifecycleError> {
        Lifecycle::create_fork(self, Some(id), snapshot, prefetch, owner)
    }

    fn close_fork(&self, id: &ForkId) -> Result<ForkInfo, LifecycleError> {
        Lifecycle::close_fork(self, id)
    }

    fn register(
        &self,
        id: SnapshotId,
        memory: &Path,
        vmstate: &Path,
        vmm: VmmKind,
        owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError> {
        self.register_snapshot_path(id, memory, ImportMode::Copy, Some((vmstate, vmm)), owner)
    }

    fn released(&self, snapshot: &SnapshotId) {
        self.vm_released(snapshot);
    }
}
