//! `restart`: how long a guest's faults stall while pagerd is upgraded in place
//! (`daemon.upgrade`) or SIGKILLed and restarted, as a ratio against the normal fault latency
//! measured by the same VMMs in the same run, and how many faults were lost (a lost fault
//! leaves its VMM asleep for good: it never finishes).
//!
//! ```text
//! cargo run --release -p pagerd-benches --bin restart
//! cargo run --release -p pagerd-benches --bin restart -- --forks 8 --rounds 5   # quicker
//! ```
//!
//! Each phase starts a fresh daemon and `--forks` synthetic VMMs that read every page of their
//! memory in random order, `--pace-us` apart, timing each read themselves (the sleeps are not
//! timed). While they read, the daemon is upgraded (or killed and restarted) `--rounds` times
//! at random moments. A read that began while no daemon served measures the stall: the
//! longest read of the phase is the longest stall; the median of the VMMs' p50 reads is the
//! normal fault latency. With `--ballast-gib N` a second snapshot of N GiB of data (linked,
//! not copied) is registered too: what a start must not read again. Writes `restart.json` to
//! `--out`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use testkit::{write_snapshot, Daemon, Vmm};

/// Fault stalls across pagerd upgrades and crashes.
#[derive(Debug, Parser)]
struct Args {
    /// Forks faulting at once.
    #[arg(long, default_value_t = 16)]
    forks: usize,
    /// Upgrades (or kills) per phase.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Each fork's memory, in MiB (every page is read once).
    #[arg(long, default_value_t = 8)]
    size_mib: u64,
    /// Pause between a VMM's reads, in µs.
    #[arg(long, default_value_t = 1000)]
    pace_us: u64,
    /// A second registered snapshot of this many GiB of data, which no fork uses.
    #[arg(long, default_value_t = 0)]
    ballast_gib: u64,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Upgrade,
    Crash,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Upgrade => "upgrade",
            Self::Crash => "crash (SIGKILL + restart)",
        }
    }
}

/// A small xorshift generator for the moments of the upgrades or kills.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `gib` GiB of non-zero bytes at `path`.
fn write_ballast(path: &std::path::Path, gib: u64) {
    use std::io::Write;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create ballast"));
    for _ in 0..gib << 10 {
        out.write_all(&chunk).expect("write ballast");
    }
    out.flush().expect("write ballast");
}

fn run_phase(
    phase: Phase,
    args: &Args,
    mem: &std::path::Path,
    ballast: Option<&std::path::Path>,
) -> Value {
    let mut daemon = Daemon::start(&[("base", mem)], &["--fuse", "off"]);
    if let Some(path) = ballast {
        daemon
            .client()
            .register_snapshot_path("ballast", path, true)
            .expect("register the ballast");
    }
    let mut vmms: Vec<Vmm> = daemon.paced_readers(args.forks, mem, args.pace_us);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut outages = Vec::new();
    let started = Instant::now();
    for _ in 0..args.rounds {
        std::thread::sleep(Duration::from_millis(50 + rng.below(200)));
        let t = Instant::now();
        match phase {
            Phase::Upgrade => {
                daemon.upgrade(None);
            }
            Phase::Crash => {
                daemon.sigkill();
                daemon.respawn();
            }
        }
        outages.push(t.elapsed());
    }
    let during = started.elapsed();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut max_read = 0;
    let mut hung = 0;
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    for vmm in &mut vmms {
        let left = deadline.saturating_duration_since(Instant::now());
        let verified = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            vmm.expect_within("verified", left)
        }));
        match verified {
            Ok(event) => {
                let latency = &event["report"]["read_latency_ns"];
                p50s.push(latency["p50"].as_u64().unwrap_or(0));
                p99s.push(latency["p99"].as_u64().unwrap_or(0));
                max_read = max_read.max(latency["max"].as_u64().unwrap_or(0));
            }
            Err(_) if vmm_is_running(vmm) => hung += 1,
            Err(_) => failed += 1,
        }
    }
    let normal = median(p50s);
    let longest_outage = outages.iter().max().copied().unwrap_or_default();
    json!({
        "phase": phase.name(),
        "ballast_gib": args.ballast_gib,
        "forks": args.forks,
        "rounds": args.rounds,
        "during_ms": during.as_millis() as u64,
        "normal_fault_p50_ns": normal,
        "normal_fault_p99_ns": median(p99s),
        "longest_stall_ns": max_read,
        "stall_over_normal": if normal > 0 { max_read as f64 / normal as f64 } else { 0.0 },
        "longest_control_outage_ms": longest_outage.as_millis() as u64,
        "control_outages_ms": outages.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
        "faults_lost": hung,
        "vmms_failed": failed,
    })
}

fn vmm_is_running(vmm: &Vmm) -> bool {
    std::path::Path::new(&format!("/proc/{}", vmm.pid())).exists()
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = write_snapshot(&dir.path().join("mem"), args.size_mib << 20, 0x5eed, 7, 0);
    let ballast = (args.ballast_gib > 0).then(|| {
        let path = dir.path().join("ballast");
        write_ballast(&path, args.ballast_gib);
        path
    });
    let mut rows = Vec::new();
    for phase in [Phase::Upgrade, Phase::Crash] {
        eprintln!(
            "phase: {} ({} forks, {} rounds)",
            phase.name(),
            args.forks,
            args.rounds
        );
        let row = run_phase(phase, &args, &mem, ballast.as_deref());
        println!("{row}");
        rows.push(row);
    }
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>10} {:>12} {:>6}",
        "phase", "fault p50", "fault p99", "longest stall", "ratio", "ctl outage", "lost"
    );
    for r in &rows {
        println!(
            "{:<28} {:>9} µs {:>9} µs {:>11} ms {:>9.0}x {:>9} ms {:>6}",
            r["phase"].as_str().unwrap_or(""),
            r["normal_fault_p50_ns"].as_u64().unwrap_or(0) / 1000,
            r["normal_fault_p99_ns"].as_u64().unwrap_or(0) / 1000,
            r["longest_stall_ns"].as_u64().unwrap_or(0) / 1_000_000,
            r["stall_over_normal"].as_f64().unwrap_or(0.0),
            r["longest_control_outage_ms"].as_u64().unwrap_or(0),
            r["faults_lost"].as_u64().unwrap_or(0),
        );
    }
    std::fs::create_dir_all(&args.out).expect("create --out");
    let path = args.out.join("restart.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&rows).expect("json")).expect("write json");
    eprintln!("wrote {}", path.display());
}
