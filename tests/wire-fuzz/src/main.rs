//! `wire-fuzz`: an end-to-end fuzzer of pagerd's two sockets.
//!
//! ```text
//! cargo run --release -p pagerd-wire-fuzz -- --control-inputs 20000 --handoffs 2000
//! cargo run --release -p pagerd-wire-fuzz -- --control-inputs 1000000 --handoffs 100000 \
//!     --time-limit 7200
//! ```
//!
//! It starts a real pagerd (testkit's `Daemon`) with one snapshot, and keeps a *victim* fork
//! served by a synthetic VMM that faults all the time (`churn`). Then, from one seed, it
//! interleaves hostile control inputs on the control socket (`control.rs`) and hostile
//! handoffs on extra forks' sockets (`handoff.rs`), checking every answer as it comes, and
//! cleaning up what the inputs created from time to time. At the end it checks that:
//!
//! - the daemon never crashed: the same pid still answers `status`, healthy, and its log has
//!   no panic;
//! - its descriptors came back to the count before the run (the victim's included), and its
//!   resident memory grew by less than `--max-rss-growth-mib`;
//! - the victim kept making progress all along (its fault counter rose in every window) and
//!   saw no serving error.
//!
//! It prints one summary line, and exits 1 on any violation (after printing it and the last
//! inputs sent), 2 on a usage error.

mod control;
mod fds;
mod handoff;
mod member;
mod rng;

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::control::{
    ErrorCode, ForkClose, ForkCreate, ForkGet, ForkList, Request, SnapshotDelete, SnapshotGet,
    SnapshotList, Status,
};
use proto::model::{ForkInfo, ForkListEntry, ForkState, SnapshotInfo};
use proto::ForkId;
use testkit::{poll_until, write_snapshot, Daemon, Vmm};

use crate::fds::FdFactory;
use crate::handoff::{Handled, Hanging};
use crate::rng::Rng;

/// Hostile control lines and handoffs against a real pagerd while a victim fork is served.
#[derive(Debug, Parser)]
struct Args {
    /// Control inputs to send (an input is one message of one or more lines).
    #[arg(long, default_value_t = 20_000)]
    control_inputs: u64,
    /// Handoffs to send.
    #[arg(long, default_value_t = 2_000)]
    handoffs: u64,
    /// Stop sending after this many seconds, counts reached or not (the checks still run;
    /// with --require-counts falling short is a failure).
    #[arg(long, default_value_t = 110)]
    time_limit: u64,
    /// Fail when the time limit stops the run before both counts are reached.
    #[arg(long)]
    require_counts: bool,
    /// The seed of every random choice (decimal or 0x hex).
    #[arg(long, default_value = "0x5eed", value_parser = parse_seed)]
    seed: u64,
    /// How much the daemon's resident memory may grow over the run, in MiB.
    #[arg(long, default_value_t = 64)]
    max_rss_growth_mib: u64,
    /// The most descriptors one handoff carries. More than 8 reach past what pagerd's
    /// handoff receiver reads at once (see docs/security.md, "Fuzzing").
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=253))]
    handoff_max_fds: u64,
    /// The snapshot's size in MiB (a multiple of 2).
    #[arg(long, default_value_t = 8)]
    snapshot_mib: u64,
    /// Send the control inputs as a `--group` member (the test kit's `pagerd-member`,
    /// created if missing), which owns neither the victim nor its snapshot: requests to
    /// delete or close them are sent as they are, and must change nothing.
    #[arg(long)]
    member: bool,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

const MIB: u64 = 1 << 20;
/// The victim's fork and snapshot.
const VICTIM: &str = "victim";
const SNAPSHOT: &str = "base";
/// The handoff fuzzer's forks are `hf-0`, `hf-1`, …
const HANDOFF_PREFIX: &str = "hf-";
/// pagerd's handoff timeout in this run: hanging handoffs are refused this soon.
const HANDOFF_TIMEOUT: Duration = Duration::from_millis(300);
/// Cleanup (and a victim progress sample) every this many inputs.
const CLEANUP_EVERY: u64 = 2_000;
/// The victim must make progress within every window this long.
const PROGRESS_WINDOW: Duration = Duration::from_secs(10);
/// How many recent inputs a failure report shows.
const RECENT: usize = 12;

/// What the run did.
#[derive(Debug, Default)]
struct Counts {
    control_inputs: u64,
    control_answers: u64,
    control_errors: [u64; ErrorCode::ALL.len()],
    control_closed: u64,
    fds_passed: u64,
    handoffs: u64,
    accepted: u64,
    refused: BTreeMap<String, u64>,
    no_reply: u64,
    hanging: u64,
    cleanups: u64,
    /// The longest a control input waited for its answers.
    slowest_control: Duration,
    /// The longest a handoff waited for its reply.
    slowest_handoff: Duration,
}

struct Fuzz<'a> {
    args: &'a Args,
    daemon: Daemon,
    factory: FdFactory,
    rng: Rng,
    controls: control::Generator,
    handoffs: handoff::Generator,
    file_size: u64,
    connection: Option<control::Connection>,
    handoff_fork: (ForkId, PathBuf),
    next_handoff_fork: u64,
    hanging: Hanging,
    counts: Counts,
    recent: VecDeque<String>,
    victim_faults: (u64, Instant),
    violations: Vec<String>,
    /// Makes the control connections as a `--group` member (`--member`).
    member: Option<member::MemberConnector>,
}

/// Set by SIGINT, SIGTERM or SIGHUP: stop sending, check, and clean up (the daemon and the
/// victim are this process's children and must not outlive it).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn stop_on_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(interrupted),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(signal, &action) };
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    stop_on_signals();
    if args.snapshot_mib == 0 || args.snapshot_mib % 2 != 0 {
        eprintln!("wire-fuzz: --snapshot-mib must be a positive multiple of 2");
        return ExitCode::from(2);
    }
    let scratch = tempfile::Builder::new()
        .prefix("wire-fuzz")
        .tempdir()
        .expect("scratch directory");
    let mem = write_snapshot(
        &scratch.path().join("memory"),
        args.snapshot_mib * MIB,
        args.seed,
        4,
        MIB,
    );
    let small = write_snapshot(&scratch.path().join("small"), 4096, args.seed, 0, 0);
    let timeout_ms = HANDOFF_TIMEOUT.as_millis().to_string();
    let mut daemon_args = vec![
        "--handoff-timeout-ms",
        &timeout_ms,
        "--control-idle-timeout-ms",
        "60000",
    ];
    if args.member {
        daemon_args.extend(["--group", testkit::tenants::GROUP]);
    }
    let daemon = Daemon::start(&[(SNAPSHOT, &mem)], &daemon_args);
    let member = if args.member {
        let user = &testkit::tenants::tenants().member;
        // The member must reach the control socket in the daemon's directory.
        std::fs::set_permissions(daemon.scratch(), std::fs::Permissions::from_mode(0o755))
            .expect("open up the daemon's directory");
        match member::MemberConnector::start(user.uid, user.gid) {
            Ok(connector) => Some(connector),
            Err(e) => {
                eprintln!("wire-fuzz: cannot act as {}: {e}", user.name);
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let victim_socket = daemon.create_fork(SNAPSHOT, VICTIM);
    let mut victim = Vmm::attach(&mem, &victim_socket, &["churn"]);
    victim.expect("churning");
    daemon.wait_fork(VICTIM, ForkState::Serving);

    // A symlink to a memory file: refused by name.
    let _ = std::os::unix::fs::symlink(&small, scratch.path().join("memory-link"));
    let mut fuzz = Fuzz::new(&args, daemon, scratch.path(), &small, member);
    let summary = fuzz.run();
    let failed = !fuzz.violations.is_empty();
    if failed {
        eprintln!("wire-fuzz: FAILED, seed {:#x}", args.seed);
        for v in &fuzz.violations {
            eprintln!("  violation: {v}");
        }
        eprintln!("  last inputs, oldest first:");
        for r in &fuzz.recent {
            eprintln!("    {r}");
        }
        eprintln!("  pagerd's threads (name, wait channel, system call):");
        for thread in threads(fuzz.daemon.pid()) {
            eprintln!("    {thread}");
        }
        let log = fuzz.daemon.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("  pagerd log, last lines:");
        for line in tail.iter().rev() {
            eprintln!("    {line}");
        }
    }
    println!("{summary}");
    victim.kill();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What each thread of process `pid` is doing, for a report of a stall.
fn threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let read = |name: &str| {
                std::fs::read_to_string(task.path().join(name))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            let syscall = read("syscall");
            let number = syscall.split_whitespace().next().unwrap_or("?");
            format!("{} {} {number}", read("comm"), read("wchan"))
        })
        .collect()
}

fn lossy(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(160)]);
    let more = if bytes.len() > 160 {
        format!("… ({} bytes)", bytes.len())
    } else {
        String::new()
    };
    format!("{text:?}{more}")
}

impl<'a> Fuzz<'a> {
    fn new(
        args: &'a Args,
        daemon: Daemon,
        scratch: &Path,
        small: &Path,
        member: Option<member::MemberConnector>,
    ) -> Self {
        let protected = control::Protected {
            snapshot: SNAPSHOT.into(),
            victim: VICTIM.into(),
            handoff_prefix: HANDOFF_PREFIX.into(),
            member: member.is_some(),
        };
        // Not the snapshot itself: copying it again and again would only measure the disk.
        let paths = vec![
            small.to_owned(),
            scratch.to_owned(),
            scratch.join("missing"),
            scratch.join("memory-link"),
        ];
        let faults = daemon.fork(VICTIM).stats.faults;
        Self {
            args,
            factory: FdFactory::new(scratch, small),
            rng: Rng::new(args.seed),
            controls: control::Generator::new(protected, paths),
            handoffs: handoff::Generator::new(args.snapshot_mib * MIB, args.handoff_max_fds),
            file_size: args.snapshot_mib * MIB,
            connection: None,
            handoff_fork: ("hf-none".parse().expect("an id"), PathBuf::new()),
            next_handoff_fork: 0,
            hanging: Hanging::new(16, HANDOFF_TIMEOUT + Duration::from_secs(10)),
            counts: Counts::default(),
            recent: VecDeque::new(),
            victim_faults: (faults, Instant::now()),
            violations: Vec::new(),
            daemon,
            member,
        }
    }

    fn remember(&mut self, what: String) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// The whole run: fuzz, then the final checks; returns the summary line.
    fn run(&mut self) -> String {
        let started = Instant::now();
        // Before the first handoff fork: the end has none either.
        let baseline_fds = self.daemon.fd_count();
        let start_rss = self.daemon.status_kb("VmRSS");
        if let Err(e) = self.new_handoff_fork() {
            self.violation(e);
        }
        let mut rss_baseline = None;
        let (total_c, total_h) = (self.args.control_inputs, self.args.handoffs);
        let total = total_c + total_h;
        let time_limit = Duration::from_secs(self.args.time_limit);
        let mut stopped_by_time = false;
        let mut step = 0u64;
        while step < total && self.violations.is_empty() {
            if started.elapsed() > time_limit || INTERRUPTED.load(Ordering::SeqCst) {
                stopped_by_time = true;
                break;
            }
            // Spread the handoffs evenly among the control inputs.
            let handoff_turn = (self.counts.handoffs + 1) * total_c
                <= (self.counts.control_inputs + 1) * total_h
                && self.counts.handoffs < total_h;
            let result = if handoff_turn || self.counts.control_inputs >= total_c {
                self.one_handoff()
            } else {
                self.one_control_input()
            };
            if let Err(e) = result {
                self.violation(e);
                break;
            }
            step += 1;
            if step % CLEANUP_EVERY == 0 {
                if let Err(e) = self.cleanup(false) {
                    self.violation(e);
                }
                // The resident set is measured once the run has warmed up (allocator arenas,
                // thread stacks, the snapshot's pages mapped by the victim's faults).
                if rss_baseline.is_none() && step >= (total / 20).max(CLEANUP_EVERY) {
                    rss_baseline = Some(self.daemon.status_kb("VmRSS"));
                }
            }
            if step % (total / 10).max(1) == 0 {
                eprintln!(
                    "wire-fuzz: {step}/{total} ({} control inputs, {} handoffs) after {:.0?}: \
                     pagerd rss {} KiB, {} descriptors (this fuzzer's connections included)",
                    self.counts.control_inputs,
                    self.counts.handoffs,
                    started.elapsed(),
                    self.daemon.status_kb("VmRSS"),
                    std::fs::read_dir(format!("/proc/{}/fd", self.daemon.pid()))
                        .map_or(0, Iterator::count),
                );
            }
        }
        let elapsed = started.elapsed();
        if INTERRUPTED.load(Ordering::SeqCst) {
            self.violation("interrupted by a signal".into());
        } else if stopped_by_time && self.args.require_counts {
            self.violation(format!(
                "the time limit ({time_limit:?}) ran out after {step} of {total} inputs"
            ));
        }
        let rss_baseline = rss_baseline.unwrap_or(start_rss);
        let end = self.final_checks(baseline_fds, rss_baseline);
        let c = &self.counts;
        let refused: Vec<String> = c.refused.iter().map(|(r, n)| format!("{r}:{n}")).collect();
        let errors: Vec<String> = ErrorCode::ALL
            .iter()
            .zip(c.control_errors)
            .map(|(code, n)| format!("{code}:{n}"))
            .collect();
        format!(
            "wire-fuzz: {} seed={:#x} control_inputs={} (answers={}; {}; closed_by_daemon={} \
             fds_passed={}) handoffs={} (accepted={} refused={} no_reply={} hanging={}; {}) \
             in {:.1}s{}; slowest answer {:.0?}, reply {:.0?}; daemon pid={} fds={}→{} rss_kib={}→{} (start {}) victim_faults={}",
            if self.violations.is_empty() {
                "OK"
            } else {
                "FAILED"
            },
            self.args.seed,
            c.control_inputs,
            c.control_answers,
            errors.join(" "),
            c.control_closed,
            c.fds_passed,
            c.handoffs,
            c.accepted,
            c.refused.values().sum::<u64>(),
            c.no_reply,
            c.hanging,
            refused.join(" "),
            elapsed.as_secs_f64(),
            if stopped_by_time { " (time limit)" } else { "" },
            c.slowest_control,
            c.slowest_handoff,
            self.daemon.pid(),
            baseline_fds,
            end.fds,
            rss_baseline,
            end.rss,
            start_rss,
            end.victim_faults,
        )
    }

    fn one_control_input(&mut self) -> Result<(), String> {
        let input = self
            .controls
            .input(&mut self.rng, &self.factory)
            .map_err(|e| format!("making descriptors: {e}"))?;
        let expected = control::expected(&input);
        self.counts.control_inputs += 1;
        self.counts.fds_passed += input.fds.len() as u64;
        self.remember(format!(
            "control #{}: {} fds {:?}, {} piece(s): {}",
            self.counts.control_inputs,
            input.fds.len(),
            &input.fd_kinds[..input.fd_kinds.len().min(4)],
            input.pieces,
            lossy(&input.bytes)
        ));
        let connection = match self.connection.as_mut() {
            Some(c) => c,
            None => {
                let socket = self.daemon.control_socket();
                let opened = match &self.member {
                    Some(member) => member
                        .connect(socket.to_owned())
                        .and_then(control::Connection::from_stream),
                    None => control::Connection::open(socket),
                };
                self.connection
                    .insert(opened.map_err(|e| format!("connecting to the control socket: {e}"))?)
            }
        };
        let sent = Instant::now();
        let outcome = connection.exchange(&input, &expected)?;
        self.counts.slowest_control = self.counts.slowest_control.max(sent.elapsed());
        self.counts.control_answers += outcome.answers;
        for (total, n) in self.counts.control_errors.iter_mut().zip(outcome.errors) {
            *total += n;
        }
        if outcome.closed {
            self.counts.control_closed += 1;
            self.connection = None;
        }
        Ok(())
    }

    fn one_handoff(&mut self) -> Result<(), String> {
        let h = self
            .handoffs
            .handoff(&mut self.rng, &self.factory)
            .map_err(|e| format!("making descriptors: {e}"))?;
        self.counts.handoffs += 1;
        self.remember(format!(
            "handoff #{} to {}: {:?}, fds {:?}: {}",
            self.counts.handoffs,
            self.handoff_fork.0,
            h.mode,
            &h.fd_kinds[..h.fd_kinds.len().min(4)],
            lossy(&h.body)
        ));
        self.hanging.settle_due(HANDOFF_TIMEOUT)?;
        let sent = Instant::now();
        let handled =
            handoff::exchange(&self.handoff_fork.1, &h, self.file_size, &mut self.hanging)?;
        self.counts.slowest_handoff = self.counts.slowest_handoff.max(sent.elapsed());
        match handled {
            Handled::Accepted => {
                self.counts.accepted += 1;
                // Served now: the fork takes no other handoff. Close it, make the next.
                let closing = ForkClose {
                    fork: self.handoff_fork.0.clone(),
                };
                self.daemon
                    .client()
                    .call(closing)
                    .map_err(|e| format!("closing a served handoff fork: {e:?}"))?;
                self.new_handoff_fork()?;
            }
            Handled::Refused(reason) => {
                let name = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{reason:?}"));
                *self.counts.refused.entry(name).or_default() += 1;
            }
            Handled::NoReply => self.counts.no_reply += 1,
            Handled::Hanging => self.counts.hanging += 1,
        }
        Ok(())
    }

    fn new_handoff_fork(&mut self) -> Result<(), String> {
        let id: ForkId = format!("{HANDOFF_PREFIX}{}", self.next_handoff_fork)
            .parse()
            .expect("an id");
        self.next_handoff_fork += 1;
        let info: ForkInfo = self
            .daemon
            .client()
            .call(ForkCreate {
                snapshot: SNAPSHOT.parse().expect("an id"),
                fork: Some(id.clone()),
                prefetch: None,
            })
            .map_err(|e| format!("creating handoff fork {id}: {e:?}"))?;
        self.handoff_fork = (id, info.handoff_socket);
        Ok(())
    }

    /// Closes every fork but the victim (and, unless `all`, the current handoff fork) and
    /// deletes every snapshot but the victim's; checks the victim's progress.
    fn cleanup(&mut self, all: bool) -> Result<(), String> {
        self.counts.cleanups += 1;
        let client = self.daemon.client();
        let forks: Vec<ForkListEntry> = client
            .call(ForkList {})
            .map_err(|e| format!("fork.list: {e:?}"))?;
        for entry in forks {
            let ForkListEntry::Uffd(fork) = entry else {
                continue;
            };
            if fork.id.as_str() == VICTIM || (!all && fork.id == self.handoff_fork.0) {
                continue;
            }
            // It may be gone already.
            let _ = client.call_value(&Request::ForkClose(ForkClose { fork: fork.id }));
        }
        let snapshots: Vec<SnapshotInfo> = client
            .call(SnapshotList {})
            .map_err(|e| format!("snapshot.list: {e:?}"))?;
        for s in snapshots {
            if s.id.as_str() != SNAPSHOT {
                let _ = client.call_value(&Request::SnapshotDelete(SnapshotDelete {
                    snapshot: s.id,
                    defer: false,
                    force: true,
                }));
            }
        }
        let victim = self.victim()?;
        let base: SnapshotInfo = client
            .call(SnapshotGet {
                snapshot: SNAPSHOT.parse().expect("an id"),
            })
            .map_err(|e| format!("snapshot.get {SNAPSHOT}: {e:?}"))?;
        if base.delete_pending {
            return Err(format!("the victim's snapshot was changed: {base:?}"));
        }
        let (faults, since) = self.victim_faults;
        if victim.stats.faults > faults {
            self.victim_faults = (victim.stats.faults, Instant::now());
        } else if since.elapsed() > PROGRESS_WINDOW {
            return Err(format!(
                "the victim made no progress for {:?} (faults {faults})",
                since.elapsed()
            ));
        }
        Ok(())
    }

    fn victim(&self) -> Result<ForkInfo, String> {
        let victim: ForkInfo = self
            .daemon
            .client()
            .call(ForkGet {
                fork: VICTIM.parse().expect("an id"),
            })
            .map_err(|e| format!("fork.get victim: {e:?}"))?;
        if victim.state != ForkState::Serving || victim.stats.errors != 0 {
            return Err(format!(
                "the victim is {:?} (end {:?}) with {} errors",
                victim.state, victim.end_reason, victim.stats.errors
            ));
        }
        Ok(victim)
    }

    fn final_checks(&mut self, baseline_fds: usize, rss_baseline: u64) -> End {
        self.connection = None;
        if let Err(e) = self.hanging.settle_all() {
            self.violation(e);
        }
        if let Err(e) = self.cleanup(true) {
            self.violation(e);
        }
        // The victim still makes progress.
        let before = self.victim().map(|v| v.stats.faults);
        let progressed = match before {
            Ok(before) => poll_until(PROGRESS_WINDOW, || {
                self.victim().is_ok_and(|v| v.stats.faults > before)
            }),
            Err(e) => {
                self.violation(e);
                false
            }
        };
        if !progressed {
            self.violation("the victim made no progress after the run".into());
        }
        let victim_faults = self.victim().map(|v| v.stats.faults).unwrap_or(0);
        // The same daemon, healthy.
        match self.daemon.client().call(Status {}) {
            Ok(status) if status.pid == self.daemon.pid() && status.healthy => {}
            other => self.violation(format!("status after the run: {other:?}")),
        }
        let log = self.daemon.log();
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            self.violation(format!("the daemon's log has a panic: {line}"));
        }
        // Descriptors back to where they were (what the closes release goes on a thread of the
        // daemon's own, hence the wait).
        let mut fds = 0;
        let settled = poll_until(Duration::from_secs(30), || {
            fds = self.daemon.fd_count();
            fds == baseline_fds
        });
        if !settled {
            self.violation(format!(
                "the daemon holds {fds} descriptors, {baseline_fds} before the run:\n{}",
                self.daemon.fd_listing()
            ));
        }
        let rss = self.daemon.status_kb("VmRSS");
        let bound = self.args.max_rss_growth_mib * 1024;
        if rss > rss_baseline + bound {
            self.violation(format!(
                "the daemon's resident set grew from {rss_baseline} to {rss} KiB (bound {bound})"
            ));
        }
        End {
            fds,
            rss,
            victim_faults,
        }
    }
}

/// What the final checks measured.
struct End {
    fds: usize,
    rss: u64,
    victim_faults: u64,
}
