//! The page servers of the fan-out modes, set up before the clock starts: one pagerd (serving
//! on demand, or replaying or graduating a working set it first recorded from one fork), one
//! `naive-handler` per fork, or one Firecracker `uffd_on_demand_handler` per fork.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proto::model::ForkState;
use proto::prefetch::Prefetch;
use testkit::{binary, wait_until, Daemon, Vmm, DEADLINE};

use super::process::{kill, reap, wait_listening};
use super::{Mode, Scenario};

/// The snapshot's id in every pagerd the harness starts.
pub const SNAPSHOT: &str = "base";

/// The fork that records the working set.
const RECORDER: &str = "recorder";

/// The recording fork's seed (the measured forks' are 1000 and up): with the `random`
/// pattern it reads other pages than any of them.
const RECORD_SEED: &str = "1";

/// Starts pagerd for `mode` on `memory`, with `extra` arguments after the harness's own:
/// `--record-forks 0`, so that no snapshot records by itself, and the FUSE read path for the
/// FUSE modes.
pub fn start_pagerd(mode: Mode, memory: &Path, extra: &[String]) -> Daemon {
    let mut args = vec!["--record-forks", "0"];
    match mode {
        Mode::FuseCached => args.extend(["--fuse", "cached"]),
        Mode::FusePassthrough => args.extend(["--fuse", "passthrough"]),
        _ => {}
    }
    args.extend(extra.iter().map(String::as_str));
    Daemon::start(&[(SNAPSHOT, memory)], &args)
}

/// Records the snapshot's working set from one fork that reads what the measured forks read
/// (the same pattern and share, another seed), then waits until pagerd has stored it; returns
/// the set's pages. `check` is the copy of the memory file the fork compares against.
pub fn record_working_set(daemon: &Daemon, scenario: &Scenario, check: &Path) -> u64 {
    daemon
        .client()
        .record_working_set(SNAPSHOT, Some(1))
        .unwrap_or_else(|e| panic!("snapshot.record refused: {e:?}\n{}", daemon.log()));
    let socket = daemon.create_fork_with(SNAPSHOT, RECORDER, Some(Prefetch::Off));
    let (order, _) = scenario.pattern.order_and_percent();
    let percent = scenario.percent.to_string();
    Vmm::attach(
        check,
        &socket,
        &[
            "--order",
            order,
            "--percent",
            &percent,
            "--seed",
            RECORD_SEED,
            "verify",
        ],
    )
    .finish();
    let recorder = daemon.wait_fork(RECORDER, ForkState::Ended);
    let mut pages = None;
    wait_until(
        "pagerd to store the working set the recording fork touched",
        DEADLINE,
        || {
            pages = daemon.snapshot(SNAPSHOT).working_set.map(|w| w.pages);
            pages.is_some()
        },
    );
    daemon.close_fork(RECORDER);
    assert_eq!(
        recorder.stats.errors, 0,
        "the recording fork had fault errors"
    );
    pages.expect("a working set")
}

/// Starts one `naive-handler` per fork, each once it says it listens; returns their pids and
/// sockets.
pub fn start_naive(forks: usize, memory: &Path, scratch: &Path) -> (Vec<u32>, Vec<PathBuf>) {
    (0..forks)
        .map(|i| {
            let path = scratch.join(format!("naive-{i}.sock"));
            let _ = std::fs::remove_file(&path);
            let mut child = Command::new(binary("naive-handler"))
                .arg("--socket")
                .arg(&path)
                .arg("--snapshot")
                .arg(memory)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn naive-handler");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("listening");
            assert_eq!(line.trim(), "listening");
            let pid = child.id();
            // Reaped with wait4 later, for its resource use.
            std::mem::forget(child);
            (pid, path)
        })
        .unzip()
}

/// Starts one Firecracker `uffd_on_demand_handler SOCKET MEMFILE` per fork (`handler` is
/// the binary), each once its socket listens (it says nothing); returns their pids and
/// sockets. What they print goes to `fc-handler-N.log` in `scratch`.
pub fn start_fc_handlers(
    handler: &Path,
    forks: usize,
    memory: &Path,
    scratch: &Path,
) -> (Vec<u32>, Vec<PathBuf>) {
    (0..forks)
        .map(|i| {
            let path = scratch.join(format!("fc-handler-{i}.sock"));
            let _ = std::fs::remove_file(&path);
            let log = scratch.join(format!("fc-handler-{i}.log"));
            let out = std::fs::File::create(&log).expect("handler log");
            let child = Command::new(handler)
                .arg(&path)
                .arg(memory)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", handler.display()));
            let pid = child.id();
            // Reaped with wait4 later, for its resource use.
            std::mem::forget(child);
            if !wait_listening(&path, DEADLINE) {
                kill(pid);
                reap(pid);
                panic!(
                    "{} never listened on {}: {}",
                    handler.display(),
                    path.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            (pid, path)
        })
        .unzip()
}
