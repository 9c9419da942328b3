//! What one screen of `pagerctl top` says, computed from two samples of the daemon: the
//! header (daemon, fork, VM and file-user counts) and one row per fork or file user, the
//! busiest first.
//!
//! A fork's fault rate is the growth of its fault count since the previous sample, per second;
//! a fork seen for the first time, and a file user (whose faults the kernel's page cache
//! answers), has none. Rows sort by rate, then by state (serving, waiting, detached, ended),
//! then by faults so far, then by id.

use std::collections::HashMap;
use std::time::Instant;

use proto::model::{ForkListEntry, ForkState, StatusReport, VmInfo};

use crate::units;

/// What the daemon said at one moment.
pub struct Sample {
    /// `status`.
    pub status: StatusReport,
    /// `fork.list`: forks and file users.
    pub forks: Vec<ForkListEntry>,
    /// `vm.list`.
    pub vms: Vec<VmInfo>,
    /// When it was taken.
    pub at: Instant,
}

/// One fork or file user on screen (a file user's id is `file-N` and its state `open` or
/// `mapped`).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Fork id, or `file-N`.
    pub id: String,
    /// `uffd` or `file`.
    pub kind: &'static str,
    /// The snapshot it reads.
    pub snapshot: String,
    /// Its state.
    pub state: String,
    /// The VMM's (or file user's) pid.
    pub pid: Option<i32>,
    /// The VM pagerd launched on it, if any.
    pub vm: Option<String>,
    /// Faults per second since the previous sample.
    pub rate: Option<f64>,
    /// Faults so far.
    pub faults: Option<u64>,
    /// Bytes copied so far.
    pub copied: Option<u64>,
    /// Fault latency p99, in ns.
    pub p99: Option<u64>,
    /// Sort rank of its state (serving first).
    pub rank: u8,
}

impl Row {
    /// The cells under [`COLUMNS`], `-` where there is nothing to say.
    pub fn cells(&self) -> Vec<String> {
        let dash = || "-".to_owned();
        vec![
            self.id.clone(),
            self.snapshot.clone(),
            self.state.clone(),
            self.pid.map_or_else(dash, |p| p.to_string()),
            self.vm.clone().unwrap_or_else(dash),
            self.rate.map_or_else(dash, |r| format!("{r:.0}")),
            self.faults.map_or_else(dash, |f| f.to_string()),
            self.copied.map_or_else(dash, units::bytes),
            self.p99.map_or_else(dash, units::nanos),
        ]
    }

    /// Whether it faulted since the previous sample.
    pub fn busy(&self) -> bool {
        self.rate.is_some_and(|r| r > 0.0)
    }
}

/// The column headers, in [`Row::cells`] order.
pub const COLUMNS: [&str; 9] = [
    "ID", "SNAPSHOT", "STATE", "PID", "VM", "FAULTS/S", "FAULTS", "COPIED", "P99",
];

/// One screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Daemon version, pid, uptime and health.
    pub title: String,
    /// Forks by state and file users.
    pub forks: String,
    /// VMs by state.
    pub vms: String,
    /// Every fork and file user, the busiest first.
    pub rows: Vec<Row>,
}

/// Turns samples into frames, remembering each fork's fault count between them.
#[derive(Default)]
pub struct Rates {
    previous: Option<(Instant, HashMap<String, u64>)>,
}

impl Rates {
    /// The frame for `sample`, with rates since the previous one.
    pub fn frame(&mut self, sample: &Sample) -> Frame {
        let by_fork: HashMap<&str, &str> = sample
            .vms
            .iter()
            .filter_map(|v| Some((v.fork.as_ref()?.as_str(), v.id.as_str())))
            .collect();
        let by_pid: HashMap<i32, &str> = sample
            .vms
            .iter()
            .filter_map(|v| Some((v.pid?, v.id.as_str())))
            .collect();
        let seconds = self.previous.as_ref().map(|(at, _)| {
            sample
                .at
                .saturating_duration_since(*at)
                .as_secs_f64()
                .max(1e-3)
        });
        let mut faults = HashMap::new();
        let mut rows: Vec<Row> = sample
            .forks
            .iter()
            .map(|entry| match entry {
                ForkListEntry::Uffd(f) => {
                    faults.insert(f.id.to_string(), f.stats.faults);
                    let before = self
                        .previous
                        .as_ref()
                        .and_then(|(_, counts)| counts.get(f.id.as_str()));
                    let rate = before.zip(seconds).map(|(before, seconds)| {
                        f.stats.faults.saturating_sub(*before) as f64 / seconds
                    });
                    Row {
                        id: f.id.to_string(),
                        kind: "uffd",
                        snapshot: f.snapshot.to_string(),
                        state: f.state.to_string(),
                        pid: f.vmm_pid,
                        vm: by_fork.get(f.id.as_str()).map(|v| (*v).to_owned()),
                        rate,
                        faults: Some(f.stats.faults),
                        copied: Some(f.stats.bytes_copied),
                        p99: Some(f.stats.latency_ns.p99),
                        rank: match f.state {
                            ForkState::Serving => 0,
                            ForkState::Waiting => 1,
                            ForkState::Detached => 2,
                            ForkState::Ended => 3,
                        },
                    }
                }
                ForkListEntry::File(u) => Row {
                    id: u.id.clone(),
                    kind: "file",
                    snapshot: u.snapshot.to_string(),
                    state: u.state.to_string(),
                    pid: Some(u.pid),
                    vm: by_pid.get(&u.pid).map(|v| (*v).to_owned()),
                    rate: None,
                    faults: None,
                    copied: None,
                    p99: None,
                    rank: 0,
                },
            })
            .collect();
        rows.sort_by(|a, b| {
            let rate = |r: &Row| r.rate.unwrap_or(-1.0);
            rate(b)
                .total_cmp(&rate(a))
                .then(a.rank.cmp(&b.rank))
                .then(b.faults.cmp(&a.faults))
                .then_with(|| a.id.cmp(&b.id))
        });
        self.previous = Some((sample.at, faults));
        let s = &sample.status;
        let files = rows.iter().filter(|r| r.kind == "file").count();
        Frame {
            title: format!(
                "pagerd {} (pid {}), up {}, {}",
                s.version,
                s.pid,
                units::uptime(s.uptime_ms),
                if s.healthy { "healthy" } else { "UNHEALTHY" }
            ),
            forks: format!(
                "forks: {} serving, {} waiting, {} detached, {} ended; file users: {files}",
                s.forks.serving, s.forks.waiting, s.forks.detached, s.forks.ended
            ),
            vms: format!(
                "vms: {} starting, {} running, {} exited, {} failed",
                s.vms.starting, s.vms.running, s.vms.exited, s.vms.failed
            ),
            rows,
        }
    }
}
