//! What differs between the hypervisors pagerd launches, behind one trait: where the binary
//! is found, its command line, how its control socket comes up, how a snapshot is restored
//! into it with its memory from pagerd, and whether (and how) it snapshots a running guest.
//!
//! ```text
//! for_kind(vmm) ─▶ &dyn Hypervisor
//!   find_binary(binary())          explicit path ─▶ $ENV ─▶ PATH
//!   command(Launch)                the process, waiting on control_socket_name()
//!   wait_ready(socket)             the socket accepts connections
//!   restore(socket, Restore)       device state loaded, memory wired, guest running
//!   snapshots()                    pause ─▶ create ─▶ resume, when it can
//! ```
//!
//! The wire enum [`VmmKind`] names the hypervisor; [`for_kind`] is the one place it is
//! matched to pick the implementation.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proto::model::{NetworkOverride, VmBackend, VmmKind};

use crate::binary::BinaryLookup;
use crate::firecracker::{Firecracker, FirecrackerError};
use crate::qemu::{Qemu, QemuError};

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// Firecracker's API refused or failed.
    #[error(transparent)]
    Firecracker(#[from] FirecrackerError),
    /// QEMU's QMP refused or failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
}

impl HypervisorError {
    /// Whether the hypervisor refused the snapshot it was asked to restore as bad input (the
    /// caller's bundle), rather than failing itself.
    pub fn rejected_snapshot(&self) -> bool {
        match self {
            Self::Firecracker(e) => e.rejected_snapshot(),
            Self::Qemu(e) => e.rejected_snapshot(),
        }
    }
}

/// What a hypervisor can do beyond restoring a snapshot from pagerd's FUSE view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// It hands its userfaultfd to pagerd (the `uffd` backend).
    pub uffd_backend: bool,
    /// A clone can be given its own tap devices and vsock socket.
    pub device_overrides: bool,
    /// It can run through Firecracker's jailer.
    pub jailer: bool,
}

/// How one hypervisor process is started.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// The VM's id.
    pub id: &'a str,
    /// The VM's directory, where the hypervisor's own log goes ([`Hypervisor::log_file_name`]).
    pub dir: &'a Path,
    /// The control socket it listens on.
    pub control_socket: &'a Path,
    /// Where its memory comes from: the memory file it maps, or a fork's handoff socket.
    pub memory: &'a Path,
    /// The guest memory's size in bytes.
    pub memory_size: u64,
}

/// What a started hypervisor restores, with paths as the process sees them.
#[derive(Debug, Clone, Copy)]
pub struct Restore<'a> {
    /// The saved device state.
    pub vmstate: &'a Path,
    /// How memory is served.
    pub backend: VmBackend,
    /// The memory file it maps, or a fork's handoff socket.
    pub memory: &'a Path,
    /// Tap devices for this clone.
    pub network_overrides: &'a [NetworkOverride],
    /// The vsock socket for this clone.
    pub vsock: Option<&'a Path>,
}

/// One hypervisor, as pagerd launches, restores and snapshots it.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Which hypervisor this is.
    fn kind(&self) -> VmmKind;

    /// Where its binary is looked for ([`crate::find_binary`]).
    fn binary(&self) -> &'static BinaryLookup;

    /// What it can do.
    fn capabilities(&self) -> Capabilities;

    /// The name of its control socket in the VM's directory.
    fn control_socket_name(&self) -> &'static str;

    /// The name of its own log in the VM's directory, which must exist before it starts.
    fn log_file_name(&self) -> Option<&'static str>;

    /// The command starting it, waiting on its control socket for a snapshot to restore. The
    /// caller wires stdin, stdout (the guest console) and stderr.
    fn command(&self, launch: &Launch<'_>) -> Command;

    /// Waits until its control socket accepts connections, for at most `timeout`; `alive`
    /// ends the wait early when the process is gone.
    fn wait_ready(
        &self,
        socket: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), HypervisorError>;

    /// Restores `restore` into the process listening on `socket` and lets the guest run.
    fn restore(&self, socket: &Path, restore: &Restore<'_>) -> Result<(), HypervisorError>;

    /// How it saves a running guest as a new snapshot, if it can.
    fn snapshots(&self) -> Option<&dyn Snapshots>;
}

/// Saving a running guest: device state and memory, while paused.
pub trait Snapshots {
    /// Pauses the guest.
    fn pause(&self, socket: &Path) -> Result<(), HypervisorError>;
    /// Writes the paused guest's device state to `vmstate` and its memory to `memory`.
    fn create(&self, socket: &Path, vmstate: &Path, memory: &Path) -> Result<(), HypervisorError>;
    /// Lets the guest run again.
    fn resume(&self, socket: &Path) -> Result<(), HypervisorError>;
}

/// The hypervisor `kind` names.
pub fn for_kind(kind: VmmKind) -> &'static dyn Hypervisor {
    match kind {
        VmmKind::Firecracker => &Firecracker,
        VmmKind::Qemu => &Qemu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_gets_its_own_hypervisor() {
        for kind in [VmmKind::Firecracker, VmmKind::Qemu] {
            assert_eq!(for_kind(kind).kind(), kind);
        }
    }

    #[test]
    fn firecracker_does_everything_and_qemu_only_file_clones() {
        let firecracker = for_kind(VmmKind::Firecracker);
        assert_eq!(
            firecracker.capabilities(),
            Capabilities {
                uffd_backend: true,
                device_overrides: true,
                jailer: true
            }
        );
        assert!(firecracker.snapshots().is_some());
        assert_eq!(firecracker.control_socket_name(), "api.sock");
        assert_eq!(firecracker.log_file_name(), Some("firecracker.log"));
        assert_eq!(firecracker.binary().env, "FIRECRACKER");
        assert_eq!(firecracker.binary().file_name, "firecracker");

        let qemu = for_kind(VmmKind::Qemu);
        assert_eq!(
            qemu.capabilities(),
            Capabilities {
                uffd_backend: false,
                device_overrides: false,
                jailer: false
            }
        );
        assert!(qemu.snapshots().is_none());
        assert_eq!(qemu.control_socket_name(), "qmp.sock");
        assert_eq!(qemu.log_file_name(), None);
        assert_eq!(qemu.binary().env, "QEMU");
        assert_eq!(qemu.binary().file_name, "qemu-system-x86_64");
    }
}
