//! Why a VM operation was refused or failed.

use proto::model::{VmState, VmmKind};
use proto::Id;
use vmm_glue::firecracker::FirecrackerError;
use vmm_glue::qemu::QemuError;

use crate::lifecycle::LifecycleError;
use crate::store::StoreError;

/// Why a VM operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VmError {
    /// No such VM.
    #[error("no VM `{0}`")]
    NotFound(Id),
    /// The id is taken.
    #[error("VM `{0}` already exists")]
    Exists(Id),
    /// The snapshot has no hypervisor state to start from.
    #[error("snapshot `{0}` has no saved hypervisor state; register it with --vmstate")]
    NoVmState(Id),
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
        vm: Id,
        /// Its state.
        state: VmState,
    },
    /// Starting it failed; the VM is `failed` with this reason.
    #[error("VM `{vm}` failed to start: {reason}")]
    StartFailed {
        /// The VM.
        vm: Id,
        /// Why.
        reason: String,
    },
    /// The hypervisor's API refused or failed.
    #[error("VM `{vm}`")]
    Api {
        /// The VM.
        vm: Id,
        /// What failed.
        #[source]
        source: FirecrackerError,
    },
    /// QEMU's QMP refused or failed.
    #[error("VM `{vm}`")]
    Qmp {
        /// The VM.
        vm: Id,
        /// What failed.
        #[source]
        source: QemuError,
    },
    /// Waiting ran out.
    #[error("VM `{vm}` did not reach {state} within {timeout_ms} ms")]
    WaitTimedOut {
        /// The VM.
        vm: Id,
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
