//! Guest memory as pagerd serves it: typed places ([`VmmAddr`] where a VMM maps guest memory,
//! [`FileOffset`] and [`FilePage`] in a memory file) and the [`MemorySource`] a fork's pages
//! come from.
//!
//! ```text
//!   fault at VmmAddr ──region──▶ FileOffset ──MemorySource──▶ CopySource ──UFFDIO_COPY──▶ VMM
//!                                            └─ is_zero_page ─────────────UFFDIO_ZEROPAGE─▶ VMM
//! ```
//!
//! Today's source is a local snapshot file mapped once ([`crate::snapshot::Snapshot`]); the
//! fault path and prefetch know only the trait, so other sources (a host cache of a remote
//! snapshot, a stack of layers) slot in under them unchanged.

mod addr;
mod source;

pub use addr::{FileOffset, FilePage, VmmAddr, PAGE_4K};
pub use source::{CopySource, MemorySource};

#[cfg(test)]
pub use source::BytesSource;
