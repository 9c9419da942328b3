//! The fork fan-out benchmark: how long until N forks of one snapshot run on their working
//! set, what it costs, and what each fork's faults cost, for pagerd's paths and four baselines
//! run on the same machine, in the same run, from the same snapshot file.
//!
//! ```text
//!  mode              memory of each fork                         who serves its faults
//!  pagerd            anonymous, uffd handed to one pagerd         pagerd, on demand only (prefetch off)
//!  pagerd-replay     anonymous, uffd handed to one pagerd         pagerd; the working set it recorded
//!                                                                 from one fork first is installed
//!                                                                 at handoff (prefetch working_set)
//!  pagerd-graduate   anonymous, uffd handed to one pagerd         the same, then every other page in
//!                                                                 the background; pagerd lets go
//!  fuse-cached       pagerd's FUSE memory file, MAP_PRIVATE       pagerd fills the FUSE page cache
//!  fuse-passthrough  pagerd's FUSE memory file, MAP_PRIVATE       the kernel (FUSE passthrough)
//!  copy              anonymous, the file copied in first          nobody: every page is there
//!  map-private       the local file mapped MAP_PRIVATE            the kernel's page cache (floor)
//!  naive             anonymous, uffd handed to its own handler    one naive-handler process per fork
//!  fc-handler        anonymous, uffd handed to its own handler    one Firecracker uffd_on_demand_handler
//!                                                                 process per fork
//! ```
//!
//! Each fork is a `synthetic-vmm` process that reads its working set once and checks every
//! byte against a copy of the memory file that no page server reads and that stays in the page
//! cache (so a cold run costs the forks' checks nothing, and the checks' own page faults can be
//! told apart from guest memory's). Times are taken with CLOCK_MONOTONIC in the forks and
//! measured from the moment the harness starts launching them (t0): *ready* is when the slowest
//! fork has read its first page (handoff → first fault served), *working set* is when the
//! slowest fork has read its last. Each fork also counts the page faults it took on guest
//! memory while reading (`getrusage`, the checks' faults taken out), the same measure in every
//! mode; for pagerd's uffd modes pagerd's own counters add the faults it served and the pages
//! it installed ahead of them. After every fork has read its working set, all of them are still
//! alive when each reports its guest memory's proportional set size (Pss): pages shared through
//! the page cache count once in the sum, private copies count in full. CPU time and peak RSS of
//! every process come from `wait4`; pagerd's from `/proc`.
//!
//! A *cold* scenario drops the snapshot's files from the page cache right before the forks
//! start ([`crate::cache`]): the memory file, and for pagerd everything under its
//! `snapshots/` (its copy of the memory file, the working set). pagerd is started afresh after
//! recording, so that its shared mapping holds no page. What is still cached is measured and
//! must be under [`COLD_MAX_CACHED_PERCENT`].

mod process;
mod row;
mod servers;

pub use row::Row;

use std::path::{Path, PathBuf};

use proto::model::{ForkState, ForkStatsReport};
use proto::prefetch::Prefetch;
use serde::Serialize;
use serde_json::Value;
use test_vmms::synthetic::monotonic_ns;
use testkit::{proc_status_kb, Daemon, Vmm};

use crate::cache;
use process::{kill, proc_cpu_s, reap};
use servers::SNAPSHOT;

/// One way of giving forks their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Forks hand their uffd to one pagerd, which serves faults only (`prefetch: off`).
    Pagerd,
    /// As `Pagerd`, after recording the working set from one fork: pagerd installs it in each
    /// fork when it hands off (`prefetch: working_set`).
    PagerdReplay,
    /// As `PagerdReplay`, then pagerd fills every other page in the background and lets the
    /// fork go once all are present (`prefetch: graduate`).
    PagerdGraduate,
    /// Forks map pagerd's FUSE memory file; pagerd answers the reads.
    FuseCached,
    /// Forks map pagerd's FUSE memory file; the kernel reads the backing file (passthrough).
    FusePassthrough,
    /// Each fork copies the memory file before it starts (what platforms did before sharing).
    Copy,
    /// Each fork maps the file `MAP_PRIVATE` (Firecracker's File backend; the page-cache floor).
    MapPrivate,
    /// One naive single-threaded handler per fork, one 4 KiB copy per fault.
    Naive,
    /// One Firecracker `uffd_on_demand_handler` per fork, one 4 KiB copy per fault.
    FcHandler,
}

impl Mode {
    /// Every mode, pagerd's first.
    pub const ALL: [Mode; 9] = [
        Mode::Pagerd,
        Mode::PagerdReplay,
        Mode::PagerdGraduate,
        Mode::FuseCached,
        Mode::FusePassthrough,
        Mode::Copy,
        Mode::MapPrivate,
        Mode::Naive,
        Mode::FcHandler,
    ];

    /// Whether pagerd serves this mode (the others are baselines).
    pub fn is_pagerd(self) -> bool {
        matches!(
            self,
            Mode::Pagerd
                | Mode::PagerdReplay
                | Mode::PagerdGraduate
                | Mode::FuseCached
                | Mode::FusePassthrough
        )
    }

    /// What pagerd's uffd forks of this mode prefetch (`None`: pagerd serves no uffd here).
    pub fn prefetch(self) -> Option<Prefetch> {
        match self {
            Mode::Pagerd => Some(Prefetch::Off),
            Mode::PagerdReplay => Some(Prefetch::WorkingSet),
            Mode::PagerdGraduate => Some(Prefetch::Graduate),
            _ => None,
        }
    }

    /// The mode called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The name used in tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pagerd => "pagerd",
            Mode::PagerdReplay => "pagerd-replay",
            Mode::PagerdGraduate => "pagerd-graduate",
            Mode::FuseCached => "fuse-cached",
            Mode::FusePassthrough => "fuse-passthrough",
            Mode::Copy => "copy",
            Mode::MapPrivate => "map-private",
            Mode::Naive => "naive",
            Mode::FcHandler => "fc-handler",
        }
    }
}

/// What the forks read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// The first 25% of memory, in order.
    Sequential,
    /// 10% of the pages picked at random, different for every fork.
    Random,
    /// 10% of the pages, the same for every fork (in random order).
    Hot,
}

impl Pattern {
    /// The synthetic VMM's `--order` and `--percent` for this pattern.
    pub fn order_and_percent(self) -> (&'static str, u64) {
        match self {
            Pattern::Sequential => ("sequential", 25),
            Pattern::Random => ("random", 10),
            Pattern::Hot => ("hot", 10),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::Hot => "hot",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// Forks started at once.
    pub forks: usize,
    /// Snapshot size in MiB.
    pub size_mib: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Whether three quarters of the snapshot are zeros.
    pub sparse: bool,
    /// Share of the snapshot each fork reads, in percent (the pattern's default unless set).
    pub percent: u64,
    /// Whether the snapshot's files are dropped from the page cache before the forks start.
    pub cold: bool,
}

impl Scenario {
    /// Bytes of working set one fork reads.
    pub fn working_set_bytes(&self) -> u64 {
        (self.size_mib << 20) * self.percent / 100
    }

    /// "warm" or "cold": the page cache when the forks start.
    pub fn cache(&self) -> &'static str {
        if self.cold {
            "cold"
        } else {
            "warm"
        }
    }

    /// A rough upper bound of the memory a mode needs, to skip what this machine cannot hold
    /// (the forks' checking copy of the file included).
    pub fn memory_needed(&self, mode: Mode) -> u64 {
        let file = self.size_mib << 20;
        let private = self.forks as u64 * self.working_set_bytes();
        let served = match mode {
            Mode::Pagerd | Mode::Naive | Mode::FcHandler => file + private,
            // A set recorded from another fork may miss what this one reads (random).
            Mode::PagerdReplay => file + 2 * private,
            Mode::Copy | Mode::PagerdGraduate => file + self.forks as u64 * file,
            Mode::MapPrivate | Mode::FusePassthrough => file,
            Mode::FuseCached => 2 * file,
        };
        served + file
    }
}

/// A cold scenario fails if more than this share of the snapshot's files is still cached
/// when the forks start.
pub const COLD_MAX_CACHED_PERCENT: f64 = 5.0;

/// The snapshot a scenario runs from: the memory file the page servers (and file-backed
/// forks) read, and a copy of it the forks check every byte against.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    /// The memory file.
    pub memory: PathBuf,
    /// Its copy for checking, kept in the page cache (never dropped).
    pub check: PathBuf,
}

/// What one scenario measured for one mode.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// Why it was not run, if it was not.
    pub skipped: Option<String>,
    /// Seconds from t0 until every fork had read its first page.
    pub ready_s: f64,
    /// Seconds from t0 until every fork had read its whole working set.
    pub working_set_s: f64,
    /// Pages read by all forks.
    pub pages: u64,
    /// Pages per second over the working-set time.
    pub pages_per_s: f64,
    /// Median over forks of the median page-read time (ns); the first touch is the fault.
    pub latency_p50_ns: u64,
    /// Largest 99th-percentile page-read time of any fork (ns).
    pub latency_p99_ns: u64,
    /// Slowest page read of any fork (ns).
    pub latency_max_ns: u64,
    /// Page faults one fork took on its guest memory while reading its working set, averaged
    /// over the forks: their own count (`getrusage`, the checks' faults taken out), the same
    /// measure in every mode.
    pub fork_faults_per_fork: Option<f64>,
    /// uffd faults pagerd served per fork, from its fork counters (pagerd's uffd modes).
    pub faults_per_fork: Option<f64>,
    /// Pages pagerd installed per fork by replaying the working set (pagerd's uffd modes).
    pub replayed_pages_per_fork: Option<f64>,
    /// Pages pagerd installed per fork by graduation (pagerd's uffd modes).
    pub graduated_pages_per_fork: Option<f64>,
    /// Pages of the working set recorded before the forks started (replay and graduate).
    pub working_set_pages: Option<u64>,
    /// Cold scenarios: the share of the snapshot's files still in the page cache right before
    /// the forks started, in percent.
    pub cached_percent_at_start: Option<f64>,
    /// CPU seconds of the page server(s): pagerd, or all handlers.
    pub server_cpu_s: f64,
    /// Peak RSS of the page server(s) in KiB (pagerd's includes its mapping of the snapshot).
    pub server_peak_rss_kib: u64,
    /// CPU seconds of all forks.
    pub forks_cpu_s: f64,
    /// Sum of the forks' peak RSS in KiB (counts shared page-cache pages in every fork).
    pub forks_peak_rss_kib: u64,
    /// Sum of the forks' private anonymous memory at the end, in KiB.
    pub forks_anon_kib: u64,
    /// Sum of the forks' guest-memory Pss in KiB, all forks alive: what their memory costs,
    /// shared page-cache pages counted once.
    pub forks_guest_pss_kib: u64,
}

impl Outcome {
    /// An outcome that says why the mode did not run.
    pub fn skipped(why: String) -> Self {
        Self {
            skipped: Some(why),
            ..Self::default()
        }
    }
}

/// How long the harness waits for any one event of a fork (large matrices are slow).
const EVENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(900);

/// Why `mode` cannot run `scenario` on this machine, if it cannot.
fn unrunnable(scenario: &Scenario, mode: Mode) -> Option<String> {
    match mode {
        Mode::FcHandler => testkit::firecracker::uffd_handler().err(),
        Mode::Naive if scenario.cold => Some(
            "naive-handler maps the whole file MAP_POPULATE when it starts, so its cache is \
             never cold (fc-handler is the cold per-fork handler)"
                .into(),
        ),
        _ => None,
    }
}

/// The id of measured fork `i`.
fn fork_id(i: usize) -> String {
    format!("f{i}")
}

/// Drops the snapshot's files from the page cache (the memory file; pagerd's `snapshots/`
/// when `daemon` is given) and returns the share still cached, which must be small.
fn make_cold(files: &SnapshotFiles, daemon: Option<&Daemon>) -> f64 {
    let mut paths = vec![files.memory.clone()];
    if let Some(d) = daemon {
        paths.extend(cache::regular_files(&d.state_dir().join("snapshots")).expect("state files"));
    }
    let left = cache::drop_all(&paths).expect("drop the snapshot's pages");
    let percent = left.percent();
    assert!(
        percent < COLD_MAX_CACHED_PERCENT,
        "not cold: {} of {} bytes ({percent:.1}%) of {paths:?} are still cached",
        left.cached,
        left.size
    );
    percent
}

/// Runs the forks of one scenario in one mode.
/// `pagerd_args` are extra arguments for the pagerd process.
pub fn run(
    scenario: &Scenario,
    mode: Mode,
    files: &SnapshotFiles,
    scratch: &Path,
    pagerd_args: &[String],
) -> Outcome {
    if let Some(why) = unrunnable(scenario, mode) {
        eprintln!("SKIPPED {}: {why}", mode.name());
        return Outcome::skipped(why);
    }
    // The checks' page faults are told apart from guest memory's exactly when their copy is
    // wholly cached.
    if cache::residency(&files.check).map_or(true, |r| r.cached < r.size) {
        cache::warm_file(&files.check).expect("read the checking copy");
    }
    let mut outcome = Outcome::default();
    let mut daemon = mode
        .is_pagerd()
        .then(|| servers::start_pagerd(mode, &files.memory, pagerd_args));
    if let (Some(d), Some(prefetch)) = (daemon.as_mut(), mode.prefetch()) {
        if prefetch.replays() {
            outcome.working_set_pages =
                Some(servers::record_working_set(d, scenario, &files.check));
            if scenario.cold {
                // A fresh process: its mapping holds none of the pages recording copied.
                d.respawn();
            }
        }
    }
    let mut handlers = Vec::new();
    let mut sockets: Vec<Option<PathBuf>> = vec![None; scenario.forks];
    match (mode, &daemon) {
        (Mode::Naive | Mode::FcHandler, _) => {
            let (pids, paths) = if mode == Mode::Naive {
                servers::start_naive(scenario.forks, &files.memory, scratch)
            } else {
                let binary = testkit::firecracker::uffd_handler().expect("checked above");
                servers::start_fc_handlers(&binary, scenario.forks, &files.memory, scratch)
            };
            handlers = pids;
            sockets = paths.into_iter().map(Some).collect();
        }
        (_, Some(d)) if mode.prefetch().is_some() => {
            for (i, socket) in sockets.iter_mut().enumerate() {
                *socket = Some(d.create_fork_with(SNAPSHOT, &fork_id(i), mode.prefetch()));
            }
        }
        _ => {}
    }
    let memory_file = match mode {
        Mode::FuseCached | Mode::FusePassthrough => daemon.as_ref().map(|d| d.fuse_file(SNAPSHOT)),
        Mode::MapPrivate | Mode::Copy => Some(files.memory.clone()),
        _ => None,
    };
    if scenario.cold {
        outcome.cached_percent_at_start = Some(make_cold(files, daemon.as_ref()));
    }
    let fork_args = |i: usize, socket: Option<&Path>| {
        let (order, _) = scenario.pattern.order_and_percent();
        let mut args = vec![
            "--snapshot".to_owned(),
            files.check.display().to_string(),
            "--order".into(),
            order.into(),
            "--percent".into(),
            scenario.percent.to_string(),
            "--seed".into(),
            (1000 + i).to_string(),
            "--count-faults".into(),
        ];
        if let Some(socket) = socket {
            args.extend(["--socket".to_owned(), socket.display().to_string()]);
        }
        if mode == Mode::Copy {
            args.push("--copy-file".into());
        }
        if let Some(file) = &memory_file {
            args.extend(["--memory-file".to_owned(), file.display().to_string()]);
        }
        args.extend(["verify", "wait", "footprint", "hold"].map(String::from));
        args
    };
    let cpu_before = daemon.as_ref().map_or(0.0, |d| proc_cpu_s(d.pid()));

    let t0 = monotonic_ns();
    let mut forks: Vec<Vmm> = sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| Vmm::spawn(&fork_args(i, socket.as_deref())))
        .collect();
    let verified: Vec<Value> = forks
        .iter_mut()
        .map(|fork| {
            let event = fork.expect_within("verified", EVENT_DEADLINE);
            fork.expect_within("waiting", EVENT_DEADLINE);
            event
        })
        .collect();
    // Every fork holds its working set now: each reports its share of guest memory.
    for fork in &mut forks {
        fork.resume();
    }
    for fork in &mut forks {
        let footprint = fork.expect_within("footprint", EVENT_DEADLINE);
        outcome.forks_guest_pss_kib += footprint["guest"]["pss_kib"].as_u64().unwrap_or(0);
    }
    if mode == Mode::FcHandler {
        // Once its VMM hangs up, Firecracker's handler panics, and its panic hook SIGKILLs the
        // peer's pid, which might be reused by then: it goes first, while the forks hold.
        handlers.iter().copied().for_each(kill);
    }
    // Only now, with every share measured, may they exit.
    for fork in &mut forks {
        fork.close_stdin();
    }
    let mut p50s = Vec::new();
    let mut fork_faults = Some(0);
    for (fork, event) in forks.into_iter().zip(verified) {
        // Reaped with wait4 for its resource use (`Vmm` then finds nothing left to reap).
        let usage = reap(fork.pid());
        assert!(usage.success, "fork {} failed", fork.pid());
        let report = &event["report"];
        let at = |field: &str| {
            (report[field]
                .as_u64()
                .expect("timestamp")
                .saturating_sub(t0)) as f64
                / 1e9
        };
        outcome.ready_s = outcome.ready_s.max(at("first_page_ns"));
        outcome.working_set_s = outcome.working_set_s.max(at("done_ns"));
        outcome.pages += report["pages"].as_u64().expect("pages");
        let lat = &report["read_latency_ns"];
        p50s.push(lat["p50"].as_u64().unwrap_or(0));
        outcome.latency_p99_ns = outcome.latency_p99_ns.max(lat["p99"].as_u64().unwrap_or(0));
        outcome.latency_max_ns = outcome.latency_max_ns.max(lat["max"].as_u64().unwrap_or(0));
        fork_faults = fork_faults
            .zip(event["guest_faults"].as_u64())
            .map(|(a, b)| a + b);
        outcome.forks_cpu_s += usage.cpu_s;
        outcome.forks_peak_rss_kib += usage.max_rss_kib;
        outcome.forks_anon_kib += report["rss_anon_kib"].as_u64().unwrap_or(0);
    }
    let per_fork = |total: u64| total as f64 / scenario.forks.max(1) as f64;
    p50s.sort_unstable();
    outcome.latency_p50_ns = p50s.get(p50s.len() / 2).copied().unwrap_or(0);
    outcome.pages_per_s = outcome.pages as f64 / outcome.working_set_s.max(1e-9);
    outcome.fork_faults_per_fork = fork_faults.map(per_fork);
    if let Some(d) = daemon {
        outcome.server_cpu_s = proc_cpu_s(d.pid()) - cpu_before;
        outcome.server_peak_rss_kib = proc_status_kb(d.pid(), "VmHWM");
        if mode.prefetch().is_some() {
            // A graduated fork's session ends before its VMM does: `ended` either way.
            let mut stats = ForkStatsReport::default();
            for i in 0..scenario.forks {
                stats += &d.wait_fork(&fork_id(i), ForkState::Ended).stats;
            }
            assert_eq!(stats.errors, 0, "pagerd reported fault errors");
            outcome.faults_per_fork = Some(per_fork(stats.faults));
            outcome.replayed_pages_per_fork = Some(per_fork(stats.replayed_pages));
            outcome.graduated_pages_per_fork = Some(per_fork(stats.graduated_pages));
        }
        d.stop();
    }
    for pid in handlers {
        let usage = reap(pid);
        outcome.server_cpu_s += usage.cpu_s;
        outcome.server_peak_rss_kib += usage.max_rss_kib;
    }
    outcome
}
