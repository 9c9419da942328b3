//! The fork fan-out benchmark: how long until N forks of one snapshot run on their working
//! set, what it costs, and what each fork's faults cost, for pagerd's two paths and three
//! baselines run on the same machine, in the same run, from the same snapshot file.
//!
//! ```text
//!  mode              memory of each fork                         who serves its faults
//!  pagerd            anonymous, uffd handed to one pagerd         pagerd (shared mapping, workers)
//!  fuse-cached       pagerd's FUSE memory file, MAP_PRIVATE       pagerd fills the FUSE page cache
//!  fuse-passthrough  pagerd's FUSE memory file, MAP_PRIVATE       the kernel (FUSE passthrough)
//!  copy              anonymous, the file copied in first          nobody: every page is there
//!  map-private       the local file mapped MAP_PRIVATE            the kernel's page cache (floor)
//!  naive             anonymous, uffd handed to its own handler    one naive-handler process per fork
//! ```
//!
//! After every fork has read its working set, all of them are still alive when each reports
//! its guest memory's proportional set size (Pss): pages shared through the page cache count
//! once in the sum, private copies count in full.
//!
//! Each fork is a `synthetic-vmm` process that reads its working set once and checks every
//! byte. Times are taken with CLOCK_MONOTONIC in the forks and measured from the moment the
//! harness starts launching them (t0): *ready* is when the slowest fork has read its first
//! page (handoff → first fault served), *working set* is when the slowest fork has read its
//! last. CPU time and peak RSS of every process come from `wait4`; pagerd's from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proto::model::ForkState;
use serde::Serialize;
use serde_json::{json, Value};
use test_vmms::synthetic::monotonic_ns;
use testkit::{binary, proc_status_kb, Daemon, Vmm};

/// One way of giving forks their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Forks hand their uffd to one pagerd.
    Pagerd,
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
}

impl Mode {
    /// Every mode, pagerd's first.
    pub const ALL: [Mode; 6] = [
        Mode::Pagerd,
        Mode::FuseCached,
        Mode::FusePassthrough,
        Mode::Copy,
        Mode::MapPrivate,
        Mode::Naive,
    ];

    /// Whether pagerd serves this mode (the others are baselines).
    pub fn is_pagerd(self) -> bool {
        matches!(
            self,
            Mode::Pagerd | Mode::FuseCached | Mode::FusePassthrough
        )
    }

    /// The mode called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The name used in tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pagerd => "pagerd",
            Mode::FuseCached => "fuse-cached",
            Mode::FusePassthrough => "fuse-passthrough",
            Mode::Copy => "copy",
            Mode::MapPrivate => "map-private",
            Mode::Naive => "naive",
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
}

impl Scenario {
    /// Bytes of working set one fork reads.
    pub fn working_set_bytes(&self) -> u64 {
        (self.size_mib << 20) * self.percent / 100
    }

    /// A rough upper bound of the memory a mode needs, to skip what this machine cannot hold.
    pub fn memory_needed(&self, mode: Mode) -> u64 {
        let file = self.size_mib << 20;
        let private = self.forks as u64 * self.working_set_bytes();
        match mode {
            Mode::Pagerd | Mode::Naive => file + private,
            Mode::Copy => file + self.forks as u64 * file,
            Mode::MapPrivate | Mode::FusePassthrough => file,
            Mode::FuseCached => 2 * file,
        }
    }
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
    /// CPU seconds of the page server(s): pagerd, or all naive handlers.
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

/// Resource use of a reaped child.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_s: f64,
    max_rss_kib: u64,
    success: bool,
}

fn tv_s(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// Waits for a child with `wait4`, for its status and resource use.
fn reap(pid: u32) -> Usage {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(pid).expect("pid fits");
    // SAFETY: waiting on our own child with valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    Usage {
        cpu_s: tv_s(usage.ru_utime) + tv_s(usage.ru_stime),
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

/// How long the harness waits for any one event of a fork (large matrices are slow).
const EVENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(900);

/// CPU seconds a process has used so far.
fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / hz
}

/// Runs the forks of one scenario in one mode against `mem`.
/// `pagerd_args` are extra arguments for the pagerd process.
pub fn run(
    scenario: &Scenario,
    mode: Mode,
    mem: &Path,
    scratch: &Path,
    pagerd_args: &[String],
) -> Outcome {
    let (order, _) = scenario.pattern.order_and_percent();
    let percent = scenario.percent;
    let extra: Vec<&str> = pagerd_args.iter().map(String::as_str).collect();
    let daemon = match mode {
        Mode::Pagerd => Some(Daemon::start(&[("base", mem)], &extra)),
        Mode::FuseCached | Mode::FusePassthrough => {
            let read_path = if mode == Mode::FuseCached {
                "cached"
            } else {
                "passthrough"
            };
            let mut args = vec!["--fuse", read_path];
            args.extend(&extra);
            Some(Daemon::start(&[("base", mem)], &args))
        }
        _ => None,
    };
    let memory_file = match mode {
        Mode::FuseCached | Mode::FusePassthrough => daemon.as_ref().map(|d| d.fuse_file("base")),
        _ => None,
    };
    let fork_args = |i: usize, socket: Option<&Path>| {
        let mut args = vec![
            "--snapshot".to_owned(),
            mem.display().to_string(),
            "--order".into(),
            order.into(),
            "--percent".into(),
            percent.to_string(),
            "--seed".into(),
            (1000 + i).to_string(),
        ];
        match (mode, socket) {
            (_, Some(socket)) => args.extend(["--socket".to_owned(), socket.display().to_string()]),
            (Mode::Copy, None) => args.push("--copy-file".into()),
            _ => {}
        }
        if let Some(file) = &memory_file {
            args.extend(["--memory-file".to_owned(), file.display().to_string()]);
        }
        args.extend(["verify", "wait", "footprint", "hold"].map(String::from));
        args
    };

    let mut handlers = Vec::new();
    let mut sockets: Vec<Option<PathBuf>> = vec![None; scenario.forks];
    match (mode, &daemon) {
        (Mode::Pagerd, Some(d)) => {
            for (i, socket) in sockets.iter_mut().enumerate() {
                *socket = Some(d.create_fork("base", &format!("f{i}")));
            }
        }
        (Mode::Naive, _) => {
            for (i, socket) in sockets.iter_mut().enumerate() {
                let path = scratch.join(format!("naive-{i}.sock"));
                let _ = std::fs::remove_file(&path);
                let mut child = Command::new(binary("naive-handler"))
                    .args([
                        "--socket",
                        &path.display().to_string(),
                        "--snapshot",
                        &mem.display().to_string(),
                    ])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn naive-handler");
                let mut line = String::new();
                BufReader::new(child.stdout.take().expect("stdout"))
                    .read_line(&mut line)
                    .expect("listening");
                assert_eq!(line.trim(), "listening");
                handlers.push(child.id());
                std::mem::forget(child);
                *socket = Some(path);
            }
        }
        _ => {}
    }
    let cpu_before = daemon.as_ref().map_or(0.0, |d| proc_cpu_s(d.pid()));

    let t0 = monotonic_ns();
    let mut forks: Vec<Vmm> = sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| Vmm::spawn(&fork_args(i, socket.as_deref())))
        .collect();
    let mut outcome = Outcome::default();
    let mut p50s = Vec::new();
    let reports: Vec<Value> = forks
        .iter_mut()
        .map(|fork| {
            let report = fork.expect_within("verified", EVENT_DEADLINE)["report"].clone();
            fork.expect_within("waiting", EVENT_DEADLINE);
            report
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
    // Only now, with every share measured, may they exit.
    for fork in &mut forks {
        fork.close_stdin();
    }
    for (fork, report) in forks.into_iter().zip(reports) {
        // Reaped with wait4 for its resource use (`Vmm` then finds nothing left to reap).
        let usage = reap(fork.pid());
        assert!(usage.success, "fork {} failed", fork.pid());
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
        outcome.forks_cpu_s += usage.cpu_s;
        outcome.forks_peak_rss_kib += usage.max_rss_kib;
        outcome.forks_anon_kib += report["rss_anon_kib"].as_u64().unwrap_or(0);
    }
    p50s.sort_unstable();
    outcome.latency_p50_ns = p50s.get(p50s.len() / 2).copied().unwrap_or(0);
    outcome.pages_per_s = outcome.pages as f64 / outcome.working_set_s.max(1e-9);
    if let Some(d) = daemon {
        outcome.server_cpu_s = proc_cpu_s(d.pid()) - cpu_before;
        outcome.server_peak_rss_kib = proc_status_kb(d.pid(), "VmHWM");
        let uffd_forks = if mode == Mode::Pagerd {
            scenario.forks
        } else {
            0
        };
        let errors: u64 = (0..uffd_forks)
            .map(|i| d.wait_fork(&format!("f{i}"), ForkState::Ended).stats.errors)
            .sum();
        assert_eq!(errors, 0, "pagerd reported fault errors");
        d.stop();
    }
    for pid in handlers {
        let usage = reap(pid);
        outcome.server_cpu_s += usage.cpu_s;
        outcome.server_peak_rss_kib += usage.max_rss_kib;
    }
    outcome
}

/// A row of results: one scenario, every mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario.
    pub scenario: Scenario,
    /// Outcome per mode, in [`Mode::ALL`] order.
    pub outcomes: Vec<(Mode, Outcome)>,
}

/// `a ÷ b`, or null when there is no baseline figure.
fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(a / b)
    } else {
        Value::Null
    }
}

impl Row {
    /// Each pagerd mode's figures as ratios to each baseline that ran, as
    /// `{pagerd_mode: {baseline: {figure: ratio}}}` (pagerd ÷ baseline, so below 1 means
    /// pagerd is faster or cheaper).
    pub fn ratios(&self) -> Value {
        let ran = |m: &&(Mode, Outcome)| m.1.skipped.is_none();
        let mut out = serde_json::Map::new();
        for (mode, p) in self.outcomes.iter().filter(ran).filter(|m| m.0.is_pagerd()) {
            let mut against = serde_json::Map::new();
            for (base, b) in self
                .outcomes
                .iter()
                .filter(ran)
                .filter(|m| !m.0.is_pagerd())
            {
                against.insert(
                    base.name().to_owned(),
                    json!({
                        "ready": ratio(p.ready_s, b.ready_s),
                        "working_set": ratio(p.working_set_s, b.working_set_s),
                        "latency_p99": ratio(p.latency_p99_ns as f64, b.latency_p99_ns as f64),
                        "forks_anon_memory": ratio(p.forks_anon_kib as f64, b.forks_anon_kib as f64),
                        "guest_memory": ratio(p.forks_guest_pss_kib as f64, b.forks_guest_pss_kib as f64),
                        "total_cpu": ratio(p.server_cpu_s + p.forks_cpu_s, b.server_cpu_s + b.forks_cpu_s),
                    }),
                );
            }
            out.insert(mode.name().to_owned(), Value::Object(against));
        }
        Value::Object(out)
    }
}
