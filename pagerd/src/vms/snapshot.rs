//! `vm.snapshot`: a running clone saved as a new snapshot to fan out from.

use std::path::Path;

use proto::model::{SnapshotInfo, VmState};
use proto::{SnapshotId, VmId};

use crate::lifecycle::LifecycleError;

use super::{io, VmError, Vms};

impl Vms {
    /// Saves a running VM as snapshot `new`: paused, written by the hypervisor into the VM's
    /// directory, registered (copied in) with its device state, then resumed if `resume`
    /// (or if anything failed).
    pub fn snapshot(
        &self,
        id: &VmId,
        new: SnapshotId,
        resume: bool,
    ) -> Result<SnapshotInfo, VmError> {
        let info = self.get(id)?;
        if info.state != VmState::Running {
            return Err(VmError::WrongState {
                vm: id.clone(),
                state: info.state,
            });
        }
        let Some(snapshots) = vmm_glue::hypervisor::for_kind(info.vmm).snapshots() else {
            return Err(VmError::Unsupported {
                vmm: info.vmm,
                operation: "vm.snapshot",
            });
        };
        if self.host.snapshot(&new).is_ok() {
            return Err(VmError::Lifecycle(LifecycleError::Exists {
                kind: "snapshot",
                id: new.to_string(),
            }));
        }
        // Where the hypervisor writes the snapshot: the VM's directory, or for a jailed VM a
        // directory of its chroot it may write, named as it sees it.
        let name = format!(".snapshot-{new}");
        let (out, seen_as) = match &info.jail {
            Some(jail) => {
                let seen_as = super::jail::writable_dir(jail, &name)
                    .map_err(io(format!("create {name} in the jail")))?;
                (super::jail::inside(jail, &seen_as), seen_as)
            }
            None => {
                let out = self.store.vm_dir(id).join(&name);
                let _ = std::fs::remove_dir_all(&out);
                std::fs::create_dir(&out).map_err(io(format!("create {}", out.display())))?;
                (out.clone(), out)
            }
        };
        let socket = &info.api_socket;
        let hypervisor_error = |source| VmError::hypervisor(id.clone(), source);
        let (vmstate, memory) = (out.join("vmstate"), out.join("memory"));
        let result = snapshots.pause(socket).map_err(hypervisor_error).and_then(|()| {
            let saved = snapshots
                .create(socket, &seen_as.join("vmstate"), &seen_as.join("memory"))
                .map_err(hypervisor_error)
                .and_then(|()| {
                    self.host
                        .register(new.clone(), &memory, &vmstate, info.vmm, info.owner)
                        .map_err(VmError::from)
                });
            if resume || saved.is_err() {
                if let Err(e) = snapshots.resume(socket) {
                    tracing::error!(vm = %id, error = %crate::errors::error_chain(&e), "cannot resume the VM after a snapshot");
                }
            }
            saved
        });
        let _ = std::fs::remove_dir_all(&out);
        if let Ok(snapshot) = &result {
            tracing::info!(vm = %id, snapshot = %snapshot.id, resumed = resume, "VM snapshotted");
        }
        result
    }
}

/// Removes `vm.snapshot` output a crash left in a VM's directory.
pub(super) fn remove_snapshot_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".snapshot-")
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
