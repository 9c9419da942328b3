//! Fault rate of one fork: how fast one VMM reads a whole snapshot through pagerd, sequentially
//! and in random order, next to the same reads through a `MAP_PRIVATE` mapping of the file
//! (Firecracker's File backend, served by the page cache), all in the same run.
//!
//! `cargo bench -p pagerd-benches --bench fault_rate [-- --size-mib N --runs N]`
//!
//! Prints a table and writes `target/bench/fault_rate.json`.

use std::time::Instant;

use pagerd_benches::{file_pass, median, pagerd_pass, Pass};
use serde_json::json;
use testkit::{write_snapshot, Daemon};

fn arg_value(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let size_mib = arg_value("--size-mib", 256);
    let runs = arg_value("--runs", 3);
    let spin = arg_value("--spin-us", 50).to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    // "dense": every page holds data. "sparse": a quarter data, the rest zeros, as real guest
    // memory mostly is.
    let snapshots = [
        (
            "dense",
            write_snapshot(&dir.path().join("dense"), size_mib << 20, 42, 0, 0),
        ),
        (
            "sparse",
            write_snapshot(
                &dir.path().join("sparse"),
                size_mib << 20,
                43,
                0,
                (size_mib << 20) / 4 * 3,
            ),
        ),
    ];
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, mem) in &snapshots {
        for fault_around in [1u64, 32] {
            let fa = fault_around.to_string();
            let daemon = Daemon::start(
                &[("base", mem)],
                &["--fault-around", &fa, "--spin-us", &spin],
            );
            for order in ["sequential", "random"] {
                let mut pagerd = Vec::new();
                let mut file = Vec::new();
                for run in 0..runs {
                    eprintln!(
                        "{name}, fault-around {fault_around:>2}, {order:<10} run {}/{runs}",
                        run + 1
                    );
                    pagerd.push(pagerd_pass(
                        &daemon,
                        "base",
                        &format!("f{fault_around}-{order}-{run}"),
                        mem,
                        order,
                    ));
                    file.push(file_pass(mem, order));
                }
                rows.push(Row {
                    snapshot: name,
                    fault_around,
                    order,
                    pagerd: median(pagerd),
                    file: median(file),
                });
            }
        }
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    print_and_save(size_mib, runs, &rows);
}

struct Row {
    snapshot: &'static str,
    fault_around: u64,
    order: &'static str,
    pagerd: Pass,
    file: Pass,
}

fn print_and_save(size_mib: u64, runs: u64, rows: &[Row]) {
    println!("one fork reading a {size_mib} MiB snapshot once (median of {runs} runs)");
    println!(
        "{:<8} {:>12} {:<10} {:>8} {:>10} {:>10} {:>16} {:>8}",
        "snapshot",
        "fault-around",
        "order",
        "faults",
        "faults/s",
        "pages/s",
        "MAP_PRIVATE p/s",
        "ratio"
    );
    let mut json_rows = Vec::new();
    for r in rows {
        let (p, f) = (&r.pagerd, &r.file);
        let ratio = p.pages_per_sec() / f.pages_per_sec();
        println!(
            "{:<8} {:>12} {:<10} {:>8} {:>10.0} {:>10.0} {:>16.0} {:>8.3}",
            r.snapshot,
            r.fault_around,
            r.order,
            p.faults,
            p.faults_per_sec(),
            p.pages_per_sec(),
            f.pages_per_sec(),
            ratio
        );
        json_rows.push(json!({
            "snapshot": r.snapshot, "fault_around_pages": r.fault_around, "order": r.order,
            "pagerd": p, "map_private": f,
            "pagerd_faults_per_sec": p.faults_per_sec(), "pagerd_pages_per_sec": p.pages_per_sec(),
            "map_private_pages_per_sec": f.pages_per_sec(), "pagerd_over_map_private": ratio,
        }));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("bench dir");
    let doc = json!({"size_mib": size_mib, "runs": runs, "rows": json_rows});
    std::fs::write(
        out.join("fault_rate.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write results");
}
