//! `vm-fanout`: N real Firecracker VMs restored at once from one snapshot of the test guest
//! (`testkit::firecracker`), through five memory paths:
//!
//! ```text
//! pagerd-uffd         fork.create per VM (prefetch off: on demand); PUT /snapshot/load Uffd on
//!                     its handoff socket
//! pagerd-uffd-replay  the same, after pagerd recorded the working set from one VM restored
//!                     first (until its first OK); each fork replays it (prefetch working_set)
//! pagerd-fuse         File backend on pagerd's FUSE memory file (passthrough where granted)
//! fc-handler          Firecracker's own uffd_on_demand_handler, one per VM (vendored)
//! file                File backend on the snapshot file itself (the floor: no page server)
//! ```
//!
//! Every VM's Firecracker is started and its API socket up first; the clock runs from the
//! first load request (sent to all VMs from one thread each) until every guest's console shows
//! its first `OK` (a full check of its 8 MiB after the restore). Then: Pss summed over the
//! Firecracker processes (`/proc/<pid>/smaps_rollup`), the page server's CPU time over the
//! run (pagerd's, the handlers' summed; none for `file`), and for the pagerd uffd paths the
//! faults pagerd served and the pages it replayed, per VM. Every pagerd runs with
//! `--record-forks 0`: only the replay path records, and only when asked.
//!
//! ```text
//! cargo run --release -p pagerd-benches --bin vm-fanout -- --vms 1,8,32
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::model::{ForkState, ForkStatsReport, VmBackend};
use proto::prefetch::Prefetch;
use testkit::firecracker::{count, fixture, uffd_handler, Fixture};
use testkit::{poll_until, wait_until, Daemon, DEADLINE};
use vmm_glue::firecracker::{self as fc, Api, LoadRequest};

/// Restore N Firecracker VMs at once through each memory path and time them.
#[derive(Debug, Parser)]
struct Args {
    /// VM counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    vms: Vec<usize>,
    /// Paths [default: all]: pagerd-uffd, pagerd-uffd-replay, pagerd-fuse, fc-handler, file.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// How long to wait for every guest's report, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

const ALL_PATHS: [&str; 5] = [
    "pagerd-uffd",
    "pagerd-uffd-replay",
    "pagerd-fuse",
    "fc-handler",
    "file",
];

struct Vm {
    firecracker: Child,
    handler: Option<Child>,
    api: PathBuf,
    console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [Some(&mut self.firecracker), self.handler.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    ticks as f64 / ticks_per_second()
}

/// Pss of a process in KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn spawn_firecracker(binary: &Path, dir: &Path, i: usize) -> Vm {
    let api = dir.join(format!("fc-{i}.sock"));
    let console = dir.join(format!("console-{i}.log"));
    let log = dir.join(format!("fc-{i}.log"));
    std::fs::write(&log, b"").expect("log");
    let firecracker = fc::command(binary, &format!("vm{i}"), &api, &log)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).expect("console"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start firecracker");
    Vm {
        firecracker,
        handler: None,
        api,
        console,
    }
}

struct Row {
    path: &'static str,
    vms: usize,
    seconds: f64,
    pss_mib: f64,
    server_cpu_s: Option<f64>,
    /// Faults pagerd served and pages it replayed, per VM (pagerd's uffd paths).
    pagerd_per_vm: Option<(f64, f64)>,
}

/// What the forks of a pagerd uffd path prefetch.
fn prefetch(path: &str) -> Option<Prefetch> {
    match path {
        "pagerd-uffd" => Some(Prefetch::Off),
        "pagerd-uffd-replay" => Some(Prefetch::WorkingSet),
        _ => None,
    }
}

/// Records the snapshot's working set from one VM restored through a fork of `daemon`: it
/// runs until its guest's first `OK` (a whole pass over its memory) and is then killed, which
/// ends the recording; returns once pagerd has stored the set.
fn record(daemon: &Daemon, fixture: &Fixture, binary: &Path, dir: &Path, timeout: Duration) {
    daemon
        .client()
        .record_working_set("base", Some(1))
        .unwrap_or_else(|e| panic!("snapshot.record refused: {e:?}\n{}", daemon.log()));
    let socket = daemon.create_fork_with("base", "recorder", Some(Prefetch::Off));
    let dir = dir.join("recorder");
    std::fs::create_dir(&dir).expect("recorder dir");
    let vm = spawn_firecracker(binary, &dir, 0);
    Api::new(&vm.api)
        .wait_ready(Duration::from_secs(30), || true)
        .expect("firecracker API");
    let load = LoadRequest::new(&fixture.vmstate, VmBackend::Uffd, &socket, &[], None);
    Api::new(&vm.api).load(&load).expect("snapshot load");
    assert!(
        poll_until(timeout, || count(&vm.console, "OK") >= 1),
        "the recording VM never reported"
    );
    drop(vm);
    daemon.wait_fork("recorder", ForkState::Ended);
    wait_until("pagerd to store the recorded working set", DEADLINE, || {
        daemon.snapshot("base").working_set.is_some()
    });
    daemon.close_fork("recorder");
}

fn run(path: &'static str, n: usize, fixture: &Fixture, binary: &Path, timeout: Duration) -> Row {
    let dir = tempfile::Builder::new()
        .prefix("vm-fanout")
        .tempdir()
        .expect("tempdir");
    let daemon = path
        .starts_with("pagerd")
        .then(|| Daemon::start(&[("base", &fixture.memory)], &["--record-forks", "0"]));
    if path == "pagerd-uffd-replay" {
        record(
            daemon.as_ref().expect("daemon"),
            fixture,
            binary,
            dir.path(),
            timeout,
        );
    }
    let mut vms: Vec<Vm> = (0..n)
        .map(|i| spawn_firecracker(binary, dir.path(), i))
        .collect();
    let mut memories = Vec::new();
    for (i, vm) in vms.iter_mut().enumerate() {
        let memory = match path {
            "pagerd-uffd" | "pagerd-uffd-replay" => daemon
                .as_ref()
                .expect("daemon")
                .create_fork_with("base", &format!("f{i}"), prefetch(path)),
            "pagerd-fuse" => daemon.as_ref().expect("daemon").fuse_file("base"),
            "fc-handler" => {
                let socket = dir.path().join(format!("handler-{i}.sock"));
                let handler = uffd_handler().expect("checked before the run");
                vm.handler = Some(
                    Command::new(handler)
                        .arg(&socket)
                        .arg(&fixture.memory)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("start uffd_on_demand_handler"),
                );
                assert!(poll_until(Duration::from_secs(10), || socket.exists()));
                socket
            }
            _ => fixture.memory.clone(),
        };
        Api::new(&vm.api)
            .wait_ready(Duration::from_secs(30), || true)
            .expect("firecracker API");
        memories.push(memory);
    }
    let backend = if prefetch(path).is_some() || path == "fc-handler" {
        VmBackend::Uffd
    } else {
        VmBackend::File
    };
    let server_pids: Vec<u32> = match path {
        "pagerd-uffd" | "pagerd-uffd-replay" | "pagerd-fuse" => {
            vec![daemon.as_ref().expect("daemon").pid()]
        }
        "fc-handler" => vms
            .iter()
            .filter_map(|v| v.handler.as_ref().map(Child::id))
            .collect(),
        _ => Vec::new(),
    };
    let cpu_before: f64 = server_pids.iter().map(|&p| cpu_seconds(p)).sum();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (vm, memory) in vms.iter().zip(&memories) {
            let (api, vmstate) = (vm.api.clone(), fixture.vmstate.clone());
            scope.spawn(move || {
                let load = LoadRequest::new(&vmstate, backend, memory, &[], None);
                Api::new(&api).load(&load).expect("snapshot load");
            });
        }
    });
    let all = poll_until(timeout, || vms.iter().all(|v| count(&v.console, "OK") >= 1));
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        all,
        "{path} x{n}: not every guest reported within {timeout:?}"
    );
    assert!(vms.iter().all(|v| count(&v.console, "BAD") == 0));
    let cpu_after: f64 = server_pids.iter().map(|&p| cpu_seconds(p)).sum();
    let pss: u64 = vms.iter().map(|v| pss_kib(v.firecracker.id())).sum();
    let pagerd_per_vm = daemon
        .as_ref()
        .filter(|_| prefetch(path).is_some())
        .map(|d| {
            let mut stats = ForkStatsReport::default();
            for i in 0..n {
                stats += &d.fork(&format!("f{i}")).stats;
            }
            assert_eq!(stats.errors, 0, "pagerd reported fault errors");
            let per_vm = |total: u64| total as f64 / n as f64;
            (per_vm(stats.faults), per_vm(stats.replayed_pages))
        });
    drop(vms);
    drop(daemon);
    Row {
        path,
        vms: n,
        seconds,
        pss_mib: pss as f64 / 1024.0,
        server_cpu_s: (!server_pids.is_empty()).then_some(cpu_after - cpu_before),
        pagerd_per_vm,
    }
}

fn main() {
    let args = Args::parse();
    let fixture = match fixture() {
        Ok(f) => f,
        Err(why) => {
            eprintln!("vm-fanout: skipped: {why}");
            return;
        }
    };
    let binary = testkit::firecracker::binary().expect("firecracker");
    let paths: Vec<&'static str> = ALL_PATHS
        .into_iter()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|a| a == p))
        .filter(|&p| match (p, uffd_handler()) {
            ("fc-handler", Err(why)) => {
                eprintln!("vm-fanout: SKIPPED fc-handler: {why}");
                false
            }
            _ => true,
        })
        .collect();
    let mut rows = Vec::new();
    for &n in &args.vms {
        for &path in &paths {
            eprintln!("vm-fanout: {path} x{n} …");
            let row = run(
                path,
                n,
                &fixture,
                &binary,
                Duration::from_secs(args.timeout_s),
            );
            eprintln!(
                "vm-fanout: {path} x{n}: {:.2} s, Pss {:.1} MiB",
                row.seconds, row.pss_mib
            );
            rows.push(row);
        }
    }
    println!("| VMs | path | load → every first OK (s) | vs file | vs pagerd-uffd | Pss of the VMMs (MiB) | page-server CPU (s) | pagerd faults / VM | replayed pages / VM |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let versus = |other: &str| {
            rows.iter()
                .find(|r| r.vms == row.vms && r.path == other)
                .map_or_else(
                    || "-".into(),
                    |r| format!("{:.2}x", row.seconds / r.seconds),
                )
        };
        let cpu = row
            .server_cpu_s
            .map_or_else(|| "-".into(), |c| format!("{c:.2}"));
        let (faults, replayed) = row.pagerd_per_vm.map_or_else(
            || ("-".into(), "-".into()),
            |(f, r)| (format!("{f:.0}"), format!("{r:.0}")),
        );
        println!(
            "| {} | {} | {:.2} | {} | {} | {:.1} | {cpu} | {faults} | {replayed} |",
            row.vms,
            row.path,
            row.seconds,
            versus("file"),
            versus("pagerd-uffd"),
            row.pss_mib
        );
    }
}
