//! Hypervisor-facing pieces of pagerd.
//!
//! - [`handoff`]: the JSON message a VMM sends with its userfaultfd (Firecracker's
//!   `GuestRegionUffdMapping` list), parsing that tolerates what VMMs send, and the validation
//!   that rejects what pagerd must never serve.
//! - [`events`]: the JSON event lines the VMM binaries print.
//! - [`fdpass`]: one message plus file descriptors over a Unix stream socket (`SCM_RIGHTS`),
//!   the peer's credentials (`SO_PEERCRED`), and the incremental receiver pagerd drives from
//!   its event loop.
//! - [`synthetic`]: a synthetic VMM that maps guest memory exactly as Firecracker does, hands
//!   its uffd to pagerd and checks every byte it reads. Tests and benches run it as the
//!   `synthetic-vmm` binary.
//! - [`kvm`]: a tiny KVM VMM whose CPL3 guest checksums its pagerd-served memory (the
//!   `kvm-vmm` binary).

pub mod events;
pub mod fdpass;
pub mod handoff;
pub mod kvm;
pub mod synthetic;
