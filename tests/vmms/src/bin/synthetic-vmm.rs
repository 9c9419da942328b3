//! `synthetic-vmm`: restores guest memory like Firecracker, hands its uffd to a page server and
//! runs a script of steps against it, printing one JSON line per step on stdout.
//!
//! ```text
//! synthetic-vmm --snapshot mem.bin --socket fork.sock --region 4M@0 --region 1M@8M \
//!     verify dontneed:0:64K verify wait verify
//! ```
//!
//! Steps: `verify` (the pages `--order`/`--percent` pick), `verify:OFF:LEN` (one guest range), `dontneed:OFF:LEN`,
//! `wait` (prints `waiting`, reads a line from stdin), `hold` (waits for stdin to close),
//! `churn` (touch everything, give it all back, forever), `touch-outside` (fault in the
//! registered but undeclared tail), `touch` (read one byte of each page `verify` would check,
//! comparing nothing), `footprint` (guest memory's Rss and Pss), `stamp:N` (write N into the first 8 bytes of every page;
//! later `verify`s expect it there). With `--count-faults`, each `verified` event also says how
//! many of the pass's page faults were guest memory's own (`guest_faults`). Sizes take K, M and G suffixes. Exit status 1 means a page
//! held the wrong bytes; the offending page is printed.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use test_vmms::events::{emit, exit_status};
use test_vmms::sizes::{parse_range, parse_size};
use test_vmms::synthetic::{
    monotonic_ns, AccessOrder, AccessPath, AccessPlan, GuestMemory, RegionSpec,
};

/// Restores guest memory like Firecracker and checks it against the snapshot.
#[derive(Debug, Parser)]
struct Args {
    /// The snapshot memory file (what every page must hold).
    #[arg(long)]
    snapshot: PathBuf,
    /// The page server's handoff socket. Without it, guest memory is the file mapped
    /// MAP_PRIVATE (Firecracker's File backend).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A region as SIZE@FILE_OFFSET; repeat for several. Default: the whole file as one.
    #[arg(long = "region", value_parser = parse_region)]
    regions: Vec<RegionSpec>,
    /// Back guest memory with 2 MiB hugetlbfs pages.
    #[arg(long)]
    hugepages: bool,
    /// Which pages `verify` reads, in which order.
    #[arg(long, value_enum, default_value = "sequential")]
    order: AccessOrder,
    /// How many of the pages `verify` reads, in percent (the working set).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100))]
    percent: u64,
    /// Seeds random page choices and orders.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Without --socket: copy the memory file (--memory-file, else --snapshot) into anonymous
    /// memory first instead of mapping it.
    #[arg(long)]
    copy_file: bool,
    /// Without --socket: map (or copy) this file as guest memory instead of the snapshot
    /// itself (a page server's FUSE memory file, or another copy of the snapshot); pages are
    /// still checked against --snapshot.
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// After each `verify`, map --snapshot afresh and count the faults its comparisons cost,
    /// printing them (`check_faults`) and the rest of the pass's faults, guest memory's own
    /// (`guest_faults`), in its event. Exact when --snapshot is wholly in the page cache.
    #[arg(long)]
    count_faults: bool,
    /// How `verify` reads guest memory.
    #[arg(long, value_enum, default_value = "user")]
    access: AccessPath,
    /// Register this many bytes past the last region without declaring them.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    undeclared_tail: u64,
    /// Sleep this many microseconds before each page `verify` reads (a paced guest that
    /// keeps faulting for a while; the sleeps are not counted in the read latencies).
    #[arg(long, default_value_t = 0)]
    pace_us: u64,
    /// The steps to run, in order (all are checked before memory is mapped or handed off).
    #[arg(value_parser = parse_step)]
    steps: Vec<Step>,
}

/// One step of the script.
#[derive(Debug, Clone)]
enum Step {
    Verify(Option<(u64, u64)>),
    Footprint,
    Touch,
    Stamp(u64),
    DontNeed(u64, u64),
    Wait,
    Hold,
    TouchOutside,
    Churn,
}

fn parse_step(step: &str) -> Result<Step, String> {
    Ok(match step.split_once(':').unwrap_or((step, "")) {
        ("verify", "") => Step::Verify(None),
        ("verify", range) => Step::Verify(Some(parse_range(range)?)),
        ("footprint", "") => Step::Footprint,
        ("touch", "") => Step::Touch,
        ("stamp", tag) => Step::Stamp(tag.parse().map_err(|e| format!("bad stamp `{tag}`: {e}"))?),
        ("dontneed", range) => {
            let (off, len) = parse_range(range)?;
            Step::DontNeed(off, len)
        }
        ("wait", "") => Step::Wait,
        ("hold", "") => Step::Hold,
        ("touch-outside", "") => Step::TouchOutside,
        ("churn", "") => Step::Churn,
        _ => return Err(format!("unknown step `{step}`")),
    })
}

fn parse_region(s: &str) -> Result<RegionSpec, String> {
    let (size, offset) = s.split_once('@').ok_or("a region is SIZE@FILE_OFFSET")?;
    Ok(RegionSpec {
        size: parse_size(size)?,
        file_offset: parse_size(offset)?,
    })
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let layout = if args.regions.is_empty() {
        vec![RegionSpec {
            size: std::fs::metadata(&args.snapshot)?.len(),
            file_offset: 0,
        }]
    } else {
        args.regions.clone()
    };
    let started_ns = monotonic_ns();
    let mut memory;
    let _connection;
    if let Some(socket) = &args.socket {
        memory = GuestMemory::map_for_uffd(
            &args.snapshot,
            &layout,
            args.hugepages,
            args.undeclared_tail,
        )?;
        _connection = Some(memory.hand_off(socket)?);
        emit(
            serde_json::json!({"event": "handed_off", "pid": std::process::id(), "t_ns": monotonic_ns()}),
        );
    } else if args.copy_file {
        let file = args.memory_file.as_deref().unwrap_or(&args.snapshot);
        memory = GuestMemory::copy_file(&args.snapshot, file, &layout)?;
        _connection = None;
    } else {
        let file = args.memory_file.as_deref().unwrap_or(&args.snapshot);
        memory = GuestMemory::map_file(&args.snapshot, file, &layout)?;
        _connection = None;
    }
    memory.set_pace(std::time::Duration::from_micros(args.pace_us));
    emit(serde_json::json!({"event": "ready", "started_ns": started_ns, "t_ns": monotonic_ns()}));
    let plan = AccessPlan {
        order: args.order,
        percent: args.percent,
        seed: args.seed,
    };
    let stdin = std::io::stdin();
    for step in &args.steps {
        match *step {
            Step::Verify(range) => {
                let report = memory.verify(range, &plan, args.access)?;
                let mut event = serde_json::json!({"event": "verified", "report": report});
                if args.count_faults {
                    let check = memory.comparison_faults(range, &plan)?;
                    event["check_faults"] = check.into();
                    event["guest_faults"] = report.faults.saturating_sub(check).into();
                }
                emit(event);
            }
            Step::Footprint => {
                let footprint = memory.footprint()?;
                emit(serde_json::json!({"event": "footprint", "guest": footprint}));
            }
            Step::Touch => {
                let pages = memory.touch(&plan);
                emit(serde_json::json!({"event": "touched", "pages": pages}));
            }
            Step::Stamp(tag) => {
                memory.stamp(tag)?;
                emit(serde_json::json!({"event": "stamped", "tag": tag}));
            }
            Step::DontNeed(off, len) => {
                memory.dont_need(off, len)?;
                emit(serde_json::json!({"event": "dontneed", "offset": off, "len": len}));
            }
            Step::Wait => {
                emit(serde_json::json!({"event": "waiting"}));
                stdin.lock().read_line(&mut String::new())?;
            }
            Step::Hold => {
                emit(serde_json::json!({"event": "holding"}));
                std::io::copy(&mut stdin.lock(), &mut std::io::sink())?;
            }
            Step::TouchOutside => {
                memory.touch_undeclared_tail()?;
                emit(serde_json::json!({"event": "touched_outside"}));
            }
            Step::Churn => memory.churn(|| emit(serde_json::json!({"event": "churning"})))?,
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_status("synthetic-vmm", run(Args::parse()))
}
