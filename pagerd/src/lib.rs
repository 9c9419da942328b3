//! pagerd: one daemon serving the memory of many forked microVMs from shared snapshot files.
//!
//! ```text
//!   VMM ──uffd handoff──▶ serve::acceptor ──Session──▶ serve::worker (×cores) ──UFFDIO_COPY──▶ VMM
//!                                 │                          ▲
//!   ctl ──JSON──▶ control ──▶ daemon::Daemon ──▶ registry (snapshots, forks, stats)
//!   VMM ──mmap MAP_PRIVATE──▶ FUSE mount ──▶ fuse::fs (open = reference, read / passthrough)
//! ```
//!
//! - [`snapshot`]: an immutable memory file mapped once, read-only, with its zero-page map.
//! - [`serve`]: handoff sockets, worker threads, and the fault path.
//! - [`registry`]: snapshots and forks in memory, fork states, waiting on state changes.
//! - [`store`]: the state directory (snapshot and fork records, written atomically);
//!   [`lifecycle`]: every change of what exists, made durable first, and restart reconciliation.
//! - [`fuse`]: the read-only FUSE mount with one memory file per snapshot, for VMMs that can
//!   only map a file; [`file_users`]: the processes holding those files (references too).
//! - [`control`]: the JSON control socket; [`daemon`] answers it and runs everything;
//!   [`registration`]: who may register which file (descriptors, not paths, from non-root).
//! - [`access`]: who may read guest memory — the modes and group of everything pagerd makes.

pub mod access;
pub mod bitmap;
pub mod config;
pub mod control;
pub mod daemon;
pub mod errors;
pub mod extents;
pub mod file_users;
pub mod fuse;
pub mod ids;
pub mod lifecycle;
pub mod ratelimit;
pub mod registration;
pub mod registry;
pub mod serve;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod sys;
