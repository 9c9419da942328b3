//! pagerd's wire, spelled once for the daemon, `pagerctl`, VMMs and the tests.
//!
//! ```text
//!   pagerctl / scripts ──[control]── NDJSON requests ──▶ pagerd ◀── uffd + JSON ──[handoff]── VMM
//!                          answers: [model] types                       [fdpass]: SCM_RIGHTS
//! ```
//!
//! - [`control`]: every control request ([`control::Request`]), the response envelope, the
//!   stable error codes and the CLI's exit code for each.
//! - [`model`]: what the daemon answers with (forks, snapshots, status, counters) and the
//!   typed reasons (end reasons, handoff refusals, the FUSE read path) it reports.
//! - [`client`]: a blocking client of the control socket with one typed call per request.
//! - [`defaults`]: where the state directory and control socket are when nobody says.
//! - [`ids`]: snapshot and fork names, safe to use in file names.
//! - [`json`]: strict parsing of request lines (no duplicate keys, bounded nesting).
//! - [`framing`]: a connection's bytes split into request lines, over-long and over-deep
//!   lines refused as soon as they show it.
//! - [`prefetch`]: working sets (recorded, replayed) and the prefetch policy of a fork.
//! - [`wire`]: how every wire enum gets its names (once, from its variants).
//! - [`handoff`]: the message a VMM sends with its userfaultfd, its parsing and validation;
//!   [`fdpass`]: sending and receiving it with the fd over a Unix socket.

pub mod client;
pub mod control;
pub mod defaults;
pub mod fdpass;
pub mod framing;
pub mod handoff;
pub mod ids;
pub mod json;
pub mod model;
pub mod prefetch;
pub mod wire;

pub use ids::{ForkId, Id, SnapshotId, VmId};
