//! The hypervisor-facing side of pagerd: what a VMM (or whatever starts one) does to have
//! pagerd serve its guest memory, and how hypervisors are started wired to it.
//!
//! - [`hand_off`]: the Firecracker uffd handoff, as a VMM performs it: connect to a fork's
//!   handoff socket and send the guest regions with the userfaultfd. The wire format itself
//!   lives in [`proto::handoff`] and [`proto::fdpass`], shared with the daemon.
//! - [`hypervisor`]: the [`Hypervisor`] trait, what differs between the hypervisors pagerd
//!   launches, and [`hypervisor::for_kind`], which picks one by its wire name.
//! - [`binary`]: finding a hypervisor's binary ([`find_binary`]); [`ready`]: waiting for its
//!   control socket to come up.
//! - [`firecracker`]: its command line and its API (snapshot load and create, pause and
//!   resume), over [`http`], hyper's HTTP/1.1 client on a Unix socket.
//! - [`qemu`]: the QEMU machine bundles are made with and restored into (RAM the FUSE memory
//!   file, mapped privately), and the QMP calls that save and restore device state.

pub mod binary;
pub mod firecracker;
pub mod http;
pub mod hypervisor;
pub mod qemu;
pub mod ready;

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

pub use binary::{find_binary, BinaryLookup, BinaryNotFound, NamedBy};
pub use hypervisor::{Hypervisor, HypervisorError};
pub use proto::handoff::GuestRegionUffdMapping;

/// Connects to a fork's handoff socket and hands over `uffd` with the `regions` it covers,
/// exactly as Firecracker does. The returned connection must stay open for as long as the VMM
/// runs; pagerd writes one JSON error line on it if it refuses the handoff.
pub fn hand_off(
    socket: &Path,
    regions: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    proto::fdpass::send_handoff(&stream, regions, uffd)?;
    Ok(stream)
}
