//! pagerd: one daemon serving the memory of many forked microVMs from shared snapshot files.
//!
//! ```text
//!   VMM ──uffd handoff──▶ serve::acceptor ──Session──▶ serve::worker (×cores) ──UFFDIO_COPY──▶ VMM
//!                                 │                          ▲
//!   ctl ──JSON──▶ control ──▶ lifecycle ──▶ store (on disk), registry (snapshots, forks, stats)
//!   VMM ──mmap MAP_PRIVATE──▶ FUSE mount ──▶ fuse::fs (open = reference, read / passthrough)
//! ```
//!
//! The modules are internal (only [`config`] and [`metrics`] are public), so they are named
//! here, not linked:
//!
//! - `snapshot`: an immutable memory file mapped once, read-only, with its zero-page map.
//! - `serve`: handoff sockets, worker threads, and the fault path.
//! - `registry`: snapshots and forks in memory, waiting on state changes; `fork_state`: a
//!   fork's states, each with its data, and the one place that moves it between them.
//! - `memory`: typed places in memory (a VMM's addresses, a memory file's offsets and pages)
//!   and the source a fork's pages come from.
//! - `store`: the state directory (snapshot and fork records, written atomically, and why a
//!   snapshot is damaged); `lifecycle`: every change of what exists, made durable first, and
//!   restart reconciliation, with the reports and working sets read from it.
//! - `fuse`: the read-only FUSE mount with one memory file per snapshot, for VMMs that can
//!   only map a file; `file_users`: the processes holding those files (references too).
//! - `control`: the JSON control socket; `daemon` starts and stops everything;
//!   `control::registration`: who may register which file (descriptors, not paths, from
//!   non-root); `admission`: how many connections are served at once, and for whom.
//! - `access`: who may read guest memory — the modes and group of everything pagerd makes;
//!   `owners`: who may change which object, and how many forks each user may hold.
//! - `vms`: hypervisors launched from snapshots, wired to pagerd, and supervised.
//! - `working_set`: the pages a snapshot's forks touch, recorded, stored beside it, and
//!   replayed into new forks before their guests ask.
//! - `upgrade`: replacing the daemon's program in place, keeping every fork served;
//!   `trusted`: files only root can change (programs to execute, memory files to link).

mod access;
mod admission;
mod bitmap;
pub mod config;
mod control;
mod daemon;
mod errors;
mod extents;
mod file_users;
mod fork_state;
mod fuse;
mod lifecycle;
mod manual;
mod memory;
pub mod metrics;
mod notify;
mod owners;
mod ratelimit;
mod registry;
mod serve;
mod snapshot;
mod spare_fd;
mod stats;
mod store;
mod sys;
mod trusted;
mod upgrade;
mod vms;
mod working_set;

/// How a pagerd binary names itself, in its ELF section `.pagerd_version` (the binary's
/// `main` puts it there): an upgrade reads it from the file instead of running the file.
pub const VERSION_NOTE: &str = concat!("pagerd ", env!("CARGO_PKG_VERSION"));

/// Sets up logging and runs the daemon until SIGTERM or SIGINT. On failure, the error and its
/// causes, as one line.
pub fn run(config: config::Config) -> Result<(), String> {
    if let Some(dir) = &config.write_docs {
        return manual::write(dir).map_err(|e| format!("cannot write the manual: {e}"));
    }
    daemon::init_logging(&config.log, config.log_format);
    daemon::run(config).map_err(|e| errors::error_chain(&e))
}
