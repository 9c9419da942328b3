//! VMMs for pagerd's tests and benchmarks, outside the daemon's dependency graph.
//!
//! - [`synthetic`]: a synthetic VMM that maps guest memory exactly as Firecracker does, hands
//!   its uffd to pagerd and checks every byte it reads. Tests and benches run it as the
//!   `synthetic-vmm` binary.
//! - [`kvm`]: a tiny KVM VMM whose CPL3 guest checksums its pagerd-served memory (the
//!   `kvm-vmm` binary).
//! - [`events`]: the JSON event lines the binaries print; [`sizes`]: sizes on their command
//!   lines.

pub mod events;
pub mod kvm;
pub mod sizes;
pub mod synthetic;
