//! Shared pieces of pagerd's benchmarks: running synthetic VMMs against pagerd and against
//! the plain-file baseline, and reporting figures as ratios measured in the same run.
//!
//! - [`fanout`]: the fork fan-out matrix (pagerd on demand, replaying or graduating a recorded
//!   working set, and through FUSE, against copy, MAP_PRIVATE, naive handlers and Firecracker's
//!   handler), warm or cold; [`report`]: its table, JSON and chart. The `fanout` binary runs it.
//! - [`cache`]: dropping and measuring the page cache of snapshot files (cold runs).
//! - The helpers below serve `benches/fault_rate.rs`.

pub mod cache;
pub mod fanout;
pub mod report;

use std::path::Path;

use proto::model::ForkState;
use serde_json::Value;
use testkit::{Daemon, Vmm};

/// One timed pass of a synthetic VMM over guest memory.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Pass {
    /// Pages read.
    pub pages: u64,
    /// Wall time of the pass, in nanoseconds.
    pub elapsed_ns: u64,
    /// Page faults pagerd served (0 for the file baseline, whose faults the kernel serves).
    pub faults: u64,
}

impl Pass {
    /// Pages read per second.
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / (self.elapsed_ns as f64 / 1e9)
    }

    /// Faults served per second.
    pub fn faults_per_sec(&self) -> f64 {
        self.faults as f64 / (self.elapsed_ns as f64 / 1e9)
    }
}

fn verify_report(events: &[Value]) -> &Value {
    &events
        .iter()
        .find(|e| e["event"] == "verified")
        .expect("the VMM verified its memory")["report"]
}

/// Reads all of `mem` once through a new fork of `snapshot` served by `daemon`.
pub fn pagerd_pass(daemon: &Daemon, snapshot: &str, fork: &str, mem: &Path, order: &str) -> Pass {
    let socket = daemon.create_fork(snapshot, fork);
    let args = [
        "--snapshot",
        path_str(mem),
        "--socket",
        path_str(&socket),
        "--order",
        order,
        "verify",
    ];
    let events = Vmm::spawn(&args).finish();
    let report = verify_report(&events);
    let record = daemon.wait_fork(fork, ForkState::Ended);
    daemon.close_fork(fork);
    Pass {
        pages: report["pages"].as_u64().expect("pages"),
        elapsed_ns: report["elapsed_ns"].as_u64().expect("elapsed"),
        faults: record.stats.faults,
    }
}

/// Reads all of `mem` once through a `MAP_PRIVATE` mapping of the file (the page-cache floor).
pub fn file_pass(mem: &Path, order: &str) -> Pass {
    let events = Vmm::spawn(&["--snapshot", path_str(mem), "--order", order, "verify"]).finish();
    let report = verify_report(&events);
    Pass {
        pages: report["pages"].as_u64().expect("pages"),
        elapsed_ns: report["elapsed_ns"].as_u64().expect("elapsed"),
        faults: 0,
    }
}

/// The pass with the median elapsed time.
pub fn median(mut passes: Vec<Pass>) -> Pass {
    passes.sort_by_key(|p| p.elapsed_ns);
    passes[passes.len() / 2]
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
