//! `vm.delete`, and the removal of ended VMs' records past their retention: an exited or
//! failed VM's record and directory go, and its id is free for a new `vm.start`.
//!
//! ```text
//! starting | running ─▶ refused (Live: stop it first)
//! exited | failed    ─▶ under the table lock: vms/<id>/ renamed to vms/.tmp-… (out of every
//!                       listing at once) and the VM forgotten ─▶ the renamed directory removed
//! ```
//!
//! The rename happens while the table is locked, so a `vm.start` reusing the id (which
//! creates the directory under the same lock) never meets the old one. A crash between the
//! rename and the removal leaves a `.tmp-` directory, removed at the next start.

use proto::model::VmInfo;
use proto::VmId;

use super::{VmError, Vms};

impl Vms {
    /// Deletes an ended VM: its record and its directory (console log included). Returns the
    /// VM as it was.
    pub fn delete(&self, id: &VmId) -> Result<VmInfo, VmError> {
        let info = self.remove(id)?;
        tracing::info!(vm = %id, state = %info.state, "VM deleted");
        Ok(info)
    }

    /// Forgets an ended VM and removes its directory; refuses a live one.
    pub(super) fn remove(&self, id: &VmId) -> Result<VmInfo, VmError> {
        let (info, retired) = {
            let mut table = self.lock();
            let slot = table.get(id).ok_or_else(|| VmError::NotFound(id.clone()))?;
            let state = slot.record.info.state;
            if state.is_live() {
                return Err(VmError::Live {
                    vm: id.clone(),
                    state,
                });
            }
            let retired = self.store.retire_vm_dir(id)?;
            let slot = table.remove(id).expect("looked up under the same lock");
            (slot.record.info, retired)
        };
        self.changed.notify_all();
        if let Err(e) = std::fs::remove_dir_all(&retired) {
            tracing::warn!(dir = %retired.display(), error = %e, "cannot remove a deleted VM's directory; it is removed at the next start");
        }
        Ok(info)
    }
}
