//! `fanout`: the fork fan-out benchmark (see `pagerd_benches::fanout`).
//!
//! ```text
//! cargo run --release -p pagerd-benches --bin fanout            # the full matrix
//! cargo run --release -p pagerd-benches --bin fanout -- --quick # a smoke run for CI
//! cargo run --release -p pagerd-benches --bin fanout -- --quick --cold # page cache dropped
//! ```
//!
//! Prints progress and a table; writes `fanout.json` and `fanout.svg` to `--out`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use pagerd_benches::fanout::{run, Mode, Outcome, Pattern, Row, Scenario, SnapshotFiles};
use pagerd_benches::report;
use serde_json::json;
use testkit::write_snapshot;

/// How fast N forks of one snapshot reach their working set: pagerd (uffd on demand, replaying
/// or graduating a working set recorded first, and its FUSE memory file cached or passthrough)
/// against copying the file, mapping it MAP_PRIVATE, one naive handler per fork and one
/// Firecracker uffd_on_demand_handler per fork.
#[derive(Debug, Parser)]
struct Args {
    /// A small matrix (64 MiB, 1 and 4 forks) that runs in well under two minutes.
    #[arg(long)]
    quick: bool,
    /// Fork counts [default: 1,8,32,128; quick: 1,4].
    #[arg(long, value_delimiter = ',')]
    forks: Vec<usize>,
    /// Snapshot sizes in MiB [default: 256,1024; quick: 64].
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Access patterns [default: sequential,random,hot].
    #[arg(long, value_delimiter = ',', value_parser = ["sequential", "random", "hot"])]
    patterns: Vec<String>,
    /// Share of the snapshot each fork reads, in percent [default: sequential 25, random and
    /// hot 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    percent: Option<u64>,
    /// Only dense snapshots (no run with mostly-zero memory).
    #[arg(long)]
    dense_only: bool,
    /// Modes to run [default: all]: pagerd, pagerd-replay, pagerd-graduate, fuse-cached,
    /// fuse-passthrough, copy, map-private, naive, fc-handler.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    modes: Vec<Mode>,
    /// Drop the snapshot's files from the page cache before the forks start (after pagerd has
    /// started and recorded; it is started afresh first where it recorded).
    #[arg(long)]
    cold: bool,
    /// An extra pagerd command-line argument (repeatable), e.g. --pagerd-arg=--spin-us=0.
    #[arg(long = "pagerd-arg", allow_hyphen_values = true)]
    pagerd_args: Vec<String>,
    /// Skip a mode whose estimated memory exceeds this share of RAM, in percent.
    #[arg(long, default_value_t = 60)]
    memory_percent: u64,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn parse_mode(name: &str) -> Result<Mode, String> {
    Mode::from_name(name).ok_or_else(|| format!("unknown mode `{name}`"))
}

fn mem_total() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    kib * 1024
}

fn main() {
    let args = Args::parse();
    let forks = match (&args.forks[..], args.quick) {
        ([], false) => vec![1, 8, 32, 128],
        ([], true) => vec![1, 4],
        (given, _) => given.to_vec(),
    };
    let sizes = match (&args.sizes[..], args.quick) {
        ([], false) => vec![256, 1024],
        ([], true) => vec![64],
        (given, _) => given.to_vec(),
    };
    let patterns: Vec<Pattern> = if args.patterns.is_empty() {
        vec![Pattern::Sequential, Pattern::Random, Pattern::Hot]
    } else {
        args.patterns
            .iter()
            .map(|p| match p.as_str() {
                "sequential" => Pattern::Sequential,
                "random" => Pattern::Random,
                _ => Pattern::Hot,
            })
            .collect()
    };
    let densities: &[bool] = if args.dense_only {
        &[false]
    } else {
        &[false, true]
    };
    let budget = mem_total() * args.memory_percent / 100;
    std::fs::create_dir_all(&args.out).expect("output directory");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let started = Instant::now();
    let total = sizes.len() * densities.len() * patterns.len() * forks.len();
    let mut rows = Vec::new();
    for &size_mib in &sizes {
        for &sparse in densities {
            let mem = scratch.path().join(format!("mem-{size_mib}-{sparse}"));
            let zero_tail = if sparse { (size_mib << 20) / 4 * 3 } else { 0 };
            write_snapshot(&mem, size_mib << 20, 7 + size_mib, 0, zero_tail);
            let files = SnapshotFiles {
                check: mem.with_extension("check"),
                memory: mem,
            };
            std::fs::copy(&files.memory, &files.check).expect("copy the snapshot for checking");
            for &pattern in &patterns {
                for &n in &forks {
                    let scenario = Scenario {
                        forks: n,
                        size_mib,
                        pattern,
                        sparse,
                        cold: args.cold,
                        percent: args
                            .percent
                            .unwrap_or_else(|| pattern.order_and_percent().1),
                    };
                    let mut outcomes = Vec::new();
                    for mode in Mode::ALL {
                        if !args.modes.is_empty() && !args.modes.contains(&mode) {
                            continue;
                        }
                        let need = scenario.memory_needed(mode);
                        let outcome = if need > budget {
                            Outcome::skipped(format!(
                                "needs ~{} MiB, over the {} MiB budget",
                                need >> 20,
                                budget >> 20
                            ))
                        } else {
                            run(&scenario, mode, &files, scratch.path(), &args.pagerd_args)
                        };
                        outcomes.push((mode, outcome));
                    }
                    rows.push(Row { scenario, outcomes });
                    let (first, p) = &rows.last().expect("row").outcomes[0];
                    eprintln!(
                        "[{}/{total} {:>5.0}s] {n:>3} forks, {size_mib} MiB, {}, {}, {}: {} {:.3}s to working set",
                        rows.len(),
                        started.elapsed().as_secs_f64(),
                        pattern.name(),
                        if sparse { "sparse" } else { "dense" },
                        scenario.cache(),
                        first.name(),
                        p.working_set_s
                    );
                }
            }
            std::fs::remove_file(&files.memory).ok();
            std::fs::remove_file(&files.check).ok();
        }
    }
    print!("{}", report::table(&rows));
    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "mem_total_mib": mem_total() >> 20,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "seconds": started.elapsed().as_secs_f64(),
        "quick": args.quick,
        "cold": args.cold,
    });
    report::write_json(&rows, &machine, &args.out.join("fanout.json")).expect("write json");
    report::write_chart(&rows, &args.out.join("fanout.svg")).expect("write chart");
    eprintln!(
        "done in {:.0} s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        args.out.join("fanout.json").display(),
        args.out.join("fanout.svg").display()
    );
}
