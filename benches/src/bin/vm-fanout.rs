//! `vm-fanout`: N real Firecracker VMs restored at once from one snapshot of the test guest
//! (`testkit::firecracker`), through four memory paths:
//!
//! ```text
//! pagerd-uffd     fork.create per VM; PUT /snapshot/load Uffd on its handoff socket
//! pagerd-fuse     File backend on pagerd's FUSE memory file (passthrough where granted)
//! fc-handler      Firecracker's own uffd_on_demand_handler, one per VM (vendored)
//! file            File backend on the snapshot file itself (the floor: no page server)
//! ```
//!
//! Every VM's Firecracker is started and its API socket up first; the clock runs from the
//! first load request (sent to all VMs from one thread each) until every guest's console shows
//! its first `OK` (a full check of its 8 MiB after the restore). Then: Pss summed over the
//! Firecracker processes (`/proc/<pid>/smaps_rollup`), and the page server's CPU time over the
//! run (pagerd's, the handlers' summed; none for `file`).
//!
//! ```text
//! cargo run --release -p pagerd-benches --bin vm-fanout -- --vms 1,8,32
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::model::VmBackend;
use testkit::firecracker::{count, fixture, Fixture};
use testkit::{poll_until, Daemon};
use vmm_glue::firecracker::{self as fc, Api, LoadRequest};

/// Restore N Firecracker VMs at once through each memory path and time them.
#[derive(Debug, Parser)]
struct Args {
    /// VM counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    vms: Vec<usize>,
    /// Paths [default: all]: pagerd-uffd, pagerd-fuse, fc-handler, file.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// How long to wait for every guest's report, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

const ALL_PATHS: [&str; 4] = ["pagerd-uffd", "pagerd-fuse", "fc-handler", "file"];

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
}

fn run(path: &'static str, n: usize, fixture: &Fixture, binary: &Path, timeout: Duration) -> Row {
    let dir = tempfile::Builder::new()
        .prefix("vm-fanout")
        .tempdir()
        .expect("tempdir");
    let daemon = path
        .starts_with("pagerd")
        .then(|| Daemon::start(&[("base", &fixture.memory)], &[]));
    let mut vms: Vec<Vm> = (0..n)
        .map(|i| spawn_firecracker(binary, dir.path(), i))
        .collect();
    let mut memories = Vec::new();
    for (i, vm) in vms.iter_mut().enumerate() {
        let memory = match path {
            "pagerd-uffd" => daemon
                .as_ref()
                .expect("daemon")
                .create_fork("base", &format!("f{i}")),
            "pagerd-fuse" => daemon.as_ref().expect("daemon").fuse_file("base"),
            "fc-handler" => {
                let socket = dir.path().join(format!("handler-{i}.sock"));
                let handler = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../shared/vendor/firecracker/uffd_on_demand_handler");
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
    let backend = if path == "pagerd-uffd" || path == "fc-handler" {
        VmBackend::Uffd
    } else {
        VmBackend::File
    };
    let server_pids: Vec<u32> = match path {
        "pagerd-uffd" | "pagerd-fuse" => vec![daemon.as_ref().expect("daemon").pid()],
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
    drop(vms);
    drop(daemon);
    Row {
        path,
        vms: n,
        seconds,
        pss_mib: pss as f64 / 1024.0,
        server_cpu_s: (!server_pids.is_empty()).then_some(cpu_after - cpu_before),
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
    let paths: Vec<&'static str> = if args.paths.is_empty() {
        ALL_PATHS.to_vec()
    } else {
        ALL_PATHS
            .into_iter()
            .filter(|p| args.paths.iter().any(|a| a == p))
            .collect()
    };
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
    println!("| VMs | path | load → every first OK (s) | vs file | Pss of the VMMs (MiB) | page-server CPU (s) |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let floor = rows
            .iter()
            .find(|r| r.vms == row.vms && r.path == "file")
            .map(|r| r.seconds);
        let ratio = floor.map_or_else(|| "-".into(), |f| format!("{:.2}x", row.seconds / f));
        let cpu = row
            .server_cpu_s
            .map_or_else(|| "-".into(), |c| format!("{c:.2}"));
        println!(
            "| {} | {} | {:.2} | {ratio} | {:.1} | {cpu} |",
            row.vms, row.path, row.seconds, row.pss_mib
        );
    }
}
