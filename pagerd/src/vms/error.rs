//! Why a VM operation was refused or failed.

use proto::model::{VmState, VmmKind};
use proto::{SnapshotId, VmId};
use vmm_glue::firecracker::FirecrackerError;
use vmm_glue::qemu::QemuError;
use vmm_glue::HypervisorError;

use crate::lifecycle::LifecycleError;
use crate::store::StoreError;

/// Why a VM operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VmError {
    /// No such VM.
    #[error("no VM `{0}`")]
    NotFound(VmId),
    /// The id is taken.
    #[error("VM `{0}` already exists")]
    Exists(VmId),
    /// The snapshot has no hypervisor state to start from.
    #[error("snapshot `{0}` has no saved hypervisor state; register it with --vmstate")]
    NoVmState(SnapshotId),
    /// That hypervisor cannot do this (yet).
    #[error("{operation} is not supported for {vmm} VMs")]
    Unsupported {
        /// The hypervisor.
        vmm: VmmKind,
        /// What was asked.
        operation: &'static str,
    },
    /// The file backend needs the FUSE view.
    #[error("the file backend needs pagerd's FUSE view, which is off")]
    NoFuse,
    /// No hypervisor binary.
    #[error("cannot launch: {0}")]
    NoBinary(String),
    /// Every uid of `--jail-uids` runs a VM already.
    #[error("every uid of --jail-uids runs a VM already; stop one, or widen the range")]
    NoJailUid,
    /// The VM is not in a state that allows it.
    #[error("VM `{vm}` is {state}")]
    WrongState {
        /// The VM.
        vm: VmId,
        /// Its state.
        state: VmState,
    },
    /// A VM still (or not yet) running cannot be deleted.
    #[error(
        "VM `{vm}` is {state}: only an exited or failed VM can be deleted; stop it first (vm.stop)"
    )]
    Live {
        /// The VM.
        vm: VmId,
        /// Its state.
        state: VmState,
    },
    /// The hypervisor refused the snapshot it was given; the VM is `failed` with this reason.
    #[error("VM `{vm}` failed to start: {reason}")]
    StartRejected {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// Starting it failed; the VM is `failed` with this reason.
    #[error("VM `{vm}` failed to start: {reason}")]
    StartFailed {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// The hypervisor's API refused or failed.
    #[error("VM `{vm}`")]
    Api {
        /// The VM.
        vm: VmId,
        /// What failed.
        #[source]
        source: FirecrackerError,
    },
    /// QEMU's QMP refused or failed.
    #[error("VM `{vm}`")]
    Qmp {
        /// The VM.
        vm: VmId,
        /// What failed.
        #[source]
        source: QemuError,
    },
    /// Waiting ran out.
    #[error("VM `{vm}` did not reach {state} within {timeout_ms} ms")]
    WaitTimedOut {
        /// The VM.
        vm: VmId,
        /// The state waited for.
        state: VmState,
        /// How long.
        timeout_ms: u64,
    },
    /// A file operation failed.
    #[error("cannot {action}")]
    Io {
        /// What.
        action: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot or fork operation failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// Reading or writing records failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VmError {
    /// A hypervisor call for VM `vm` failed: Firecracker's API or QEMU's QMP.
    pub(crate) fn hypervisor(vm: VmId, error: HypervisorError) -> Self {
        match error {
            HypervisorError::Firecracker(source) => Self::Api { vm, source },
            HypervisorError::Qemu(source) => Self::Qmp { vm, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use proto::control::{ControlError, ErrorCode};

    use super::*;

    fn vm() -> VmId {
        "a".parse().unwrap()
    }

    #[test]
    fn hypervisor_failures_name_the_vm_and_keep_the_hypervisors_words() {
        let firecracker = FirecrackerError::NotReady {
            socket: PathBuf::from("/v/api.sock"),
            timeout: Duration::from_secs(10),
        };
        let error = VmError::hypervisor(vm(), firecracker.into());
        assert!(matches!(&error, VmError::Api { vm, .. } if vm.as_str() == "a"));
        assert_eq!(
            crate::errors::error_chain(&error),
            "VM `a`: the API socket /v/api.sock did not come up within 10s"
        );
        let qemu = QemuError::Migration("failed".into());
        let error = VmError::hypervisor(vm(), qemu.into());
        assert!(matches!(&error, VmError::Qmp { .. }));
        assert_eq!(
            crate::errors::error_chain(&error),
            "VM `a`: the incoming migration ended as failed"
        );
    }

    #[test]
    fn each_error_answers_with_its_stable_code() {
        let io = || std::io::Error::other("x");
        let cases = [
            (VmError::NotFound(vm()), ErrorCode::NotFound),
            (VmError::Exists(vm()), ErrorCode::Conflict),
            (
                VmError::WrongState {
                    vm: vm(),
                    state: VmState::Starting,
                },
                ErrorCode::Conflict,
            ),
            (
                VmError::Live {
                    vm: vm(),
                    state: VmState::Running,
                },
                ErrorCode::Conflict,
            ),
            (
                VmError::NoVmState("s".parse().unwrap()),
                ErrorCode::InvalidArgument,
            ),
            (
                VmError::StartRejected {
                    vm: vm(),
                    reason: "refused".into(),
                },
                ErrorCode::InvalidArgument,
            ),
            (
                VmError::Unsupported {
                    vmm: VmmKind::Qemu,
                    operation: "vm.snapshot",
                },
                ErrorCode::InvalidArgument,
            ),
            (VmError::NoFuse, ErrorCode::Unavailable),
            (VmError::NoBinary("none".into()), ErrorCode::Unavailable),
            (VmError::NoJailUid, ErrorCode::Unavailable),
            (
                VmError::WaitTimedOut {
                    vm: vm(),
                    state: VmState::Exited,
                    timeout_ms: 1,
                },
                ErrorCode::Unavailable,
            ),
            (
                VmError::StartFailed {
                    vm: vm(),
                    reason: "why".into(),
                },
                ErrorCode::Internal,
            ),
            (
                VmError::hypervisor(vm(), QemuError::Migration("x".into()).into()),
                ErrorCode::Internal,
            ),
            (
                VmError::Io {
                    action: "x".into(),
                    source: io(),
                },
                ErrorCode::Internal,
            ),
            (
                VmError::Lifecycle(LifecycleError::NotFound {
                    kind: "snapshot",
                    id: "s".into(),
                }),
                ErrorCode::NotFound,
            ),
            (
                VmError::Lifecycle(LifecycleError::Exists {
                    kind: "snapshot",
                    id: "s".into(),
                }),
                ErrorCode::Conflict,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let answer = ControlError::from(error);
            assert_eq!(answer.code, code, "{text}");
            assert!(answer.message.starts_with(&text), "{}", answer.message);
        }
    }

    #[test]
    fn unsupported_operations_name_the_hypervisor() {
        let error = VmError::Unsupported {
            vmm: VmmKind::Qemu,
            operation: "tap and vsock overrides",
        };
        assert_eq!(
            error.to_string(),
            "tap and vsock overrides is not supported for qemu VMs"
        );
    }
}
