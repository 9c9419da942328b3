//! A `vm.start` request, and what is decided from it before anything is created: whether the
//! snapshot's hypervisor can do what it asks, and which memory file (if any) the hypervisor
//! maps.
//!
//! ```text
//! backend uffd, hypervisor without it            ─▶ unsupported
//! tap or vsock overrides, hypervisor without them ─▶ unsupported
//! memory: uffd ─▶ none (a fork's handoff socket, made later)
//!         file ─▶ the FUSE memory file | the snapshot's own file when jailed | no FUSE: refused
//! ```

use std::path::PathBuf;

use proto::control::VmStart;
use proto::model::{SnapshotInfo, VmBackend};
use vmm_glue::Hypervisor;

use super::VmError;

/// A `vm.start` request as the client sent it, and who sent it.
#[derive(Debug, Clone)]
pub(crate) struct StartRequest {
    /// What was asked, untouched.
    pub call: VmStart,
    /// The uid starting it: it owns the VM and its fork.
    pub owner: u32,
}

impl StartRequest {
    /// Refuses what `hypervisor` cannot do.
    pub(super) fn check_supported(&self, hypervisor: &dyn Hypervisor) -> Result<(), VmError> {
        let can = hypervisor.capabilities();
        let unsupported = |operation| VmError::Unsupported {
            vmm: hypervisor.kind(),
            operation,
        };
        let call = &self.call;
        if call.backend == VmBackend::Uffd && !can.uffd_backend {
            return Err(unsupported("the uffd backend (use --backend file)"));
        }
        let overrides = !call.network_overrides.is_empty() || call.vsock.is_some();
        if overrides && !can.device_overrides {
            return Err(unsupported("tap and vsock overrides"));
        }
        Ok(())
    }
}

/// The memory file a VM of `backend` maps from `snapshot`, if any: the FUSE view's, or for a
/// `jailed` VM the snapshot's own file (it is bind-mounted into the chroot, and the FUSE view
/// is another filesystem; the VM's record is its reference).
pub(super) fn memory_file(
    backend: VmBackend,
    jailed: bool,
    snapshot: &SnapshotInfo,
) -> Result<Option<PathBuf>, VmError> {
    match backend {
        VmBackend::File if jailed => Ok(Some(snapshot.path.clone())),
        VmBackend::File => Ok(Some(snapshot.fuse_file.clone().ok_or(VmError::NoFuse)?)),
        VmBackend::Uffd => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use proto::model::{NetworkOverride, VmmKind};
    use vmm_glue::hypervisor::for_kind;

    use super::super::tests::snapshot;
    use super::*;

    fn request(backend: VmBackend) -> StartRequest {
        StartRequest {
            call: VmStart {
                snapshot: "s".parse().unwrap(),
                vm: None,
                backend,
                network_overrides: Vec::new(),
                vsock: None,
                prefetch: None,
            },
            owner: 0,
        }
    }

    fn refusal(kind: VmmKind, request: &StartRequest) -> Option<&'static str> {
        match request.check_supported(for_kind(kind)) {
            Ok(()) => None,
            Err(VmError::Unsupported { vmm, operation }) => {
                assert_eq!(vmm, kind);
                Some(operation)
            }
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn firecracker_takes_either_backend_and_its_overrides() {
        let mut with_devices = request(VmBackend::Uffd);
        with_devices.call.network_overrides.push(NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
        });
        with_devices.call.vsock = Some("/v.sock".into());
        for request in [request(VmBackend::File), with_devices] {
            assert_eq!(refusal(VmmKind::Firecracker, &request), None);
        }
    }

    #[test]
    fn qemu_refuses_the_uffd_backend_and_overrides() {
        assert_eq!(
            refusal(VmmKind::Qemu, &request(VmBackend::Uffd)),
            Some("the uffd backend (use --backend file)")
        );
        assert_eq!(refusal(VmmKind::Qemu, &request(VmBackend::File)), None);
        let mut tap = request(VmBackend::File);
        tap.call.network_overrides.push(NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
        });
        assert_eq!(
            refusal(VmmKind::Qemu, &tap),
            Some("tap and vsock overrides")
        );
        let mut vsock = request(VmBackend::File);
        vsock.call.vsock = Some("/v.sock".into());
        assert_eq!(
            refusal(VmmKind::Qemu, &vsock),
            Some("tap and vsock overrides")
        );
    }

    #[test]
    fn the_memory_file_follows_the_backend_and_the_jail() {
        let fused = snapshot(Some("/fuse/snapshots/s/memory"), None);
        assert_eq!(memory_file(VmBackend::Uffd, false, &fused).unwrap(), None);
        assert_eq!(memory_file(VmBackend::Uffd, true, &fused).unwrap(), None);
        assert_eq!(
            memory_file(VmBackend::File, false, &fused).unwrap(),
            Some(PathBuf::from("/fuse/snapshots/s/memory"))
        );
        assert_eq!(
            memory_file(VmBackend::File, true, &fused).unwrap(),
            Some(PathBuf::from("/state/snapshots/s/memory"))
        );
        let unfused = snapshot(None, None);
        assert!(matches!(
            memory_file(VmBackend::File, false, &unfused),
            Err(VmError::NoFuse)
        ));
        assert_eq!(
            memory_file(VmBackend::File, true, &unfused).unwrap(),
            Some(PathBuf::from("/state/snapshots/s/memory")),
            "a jailed VM does not need the FUSE view"
        );
    }
}
