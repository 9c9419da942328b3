//! An operator's first hour: `pagerd` and `pagerctl` with no arguments meet; a relative state
//! directory never reaches a VMM as a relative path; every `pagerctl` outcome has its exit
//! status, errors are one line with their code, and `--json` errors are JSON on stdout; the
//! client waits as long as `--timeout` says; `fork close` takes several ids; `fork ls` says
//! what its numbers count and `fork get` when a fork was made and when it records instead of
//! graduating; `fork get` tells why a fork ended and why its last handoff was refused; logs
//! follow `RUST_LOG` and come as JSON on request; the README states pagerctl's defaults.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use proto::control::ErrorCode;
use proto::model::{EndReason, ForkInfo, ForkState, RefusalReason, StatusReport};
use serde_json::Value;
use testkit::{binary, new_uffd, raw_handoff, skip, write_snapshot, Daemon, Launch, Vmm};

const MIB: u64 = 1 << 20;

/// Runs `pagerctl` with `args` and no `PAGERD_*` variables: only its defaults say where the
/// daemon is.
fn pagerctl_bare(args: &[&str]) -> Output {
    Command::new(binary("pagerctl"))
        .args(args)
        .env_remove(proto::defaults::STATE_DIR_ENV)
        .env_remove(proto::defaults::SOCKET_ENV)
        .output()
        .expect("run pagerctl")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn pagerd_and_pagerctl_meet_with_no_arguments() {
    let default_state = PathBuf::from(proto::defaults::STATE_DIR);
    if default_state.exists() {
        skip(
            "pagerd_and_pagerctl_meet_with_no_arguments",
            "/var/lib/pagerd already exists on this machine; the test uses the real default and \
             leaves an existing installation alone",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 71, 1, 0);
    let daemon = Daemon::launch(Launch {
        args: &[],
        cwd: None,
        env: &[],
        state: default_state.clone(),
        control: proto::defaults::control_socket(&default_state),
    });

    let out = pagerctl_bare(&["--json", "status"]);
    assert!(out.status.success(), "{out:?}");
    let status: StatusReport = serde_json::from_value(json_of(&out)).unwrap();
    assert_eq!(status.state_dir, default_state);
    assert_eq!(status.pid, daemon.pid());

    let out = pagerctl_bare(&["snapshot", "add", "base", mem.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = pagerctl_bare(&["fork", "create", "base", "--id", "vm1"]);
    assert!(out.status.success(), "{out:?}");
    let socket = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(socket, default_state.join("sockets/vm1.sock"));
    let mut vmm = Vmm::attach(&mem, &socket, &["verify"]);
    vmm.expect("verified");
    vmm.finish();
    assert!(pagerctl_bare(&["fork", "close", "vm1"]).status.success());
    assert!(pagerctl_bare(&["snapshot", "rm", "base"]).status.success());

    assert!(daemon.stop().success());
    std::fs::remove_dir_all(&default_state).unwrap();
}

#[test]
fn a_relative_state_dir_is_made_absolute_before_any_path_reaches_a_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 72, 1, 0);
    let state = dir.path().join("relative-state");
    let daemon = Daemon::launch(Launch {
        args: &["--state-dir", "relative-state", "--fuse", "off"],
        cwd: Some(dir.path()),
        env: &[],
        state: state.clone(),
        control: state.join("control.sock"),
    });
    assert_eq!(daemon.status().state_dir, state);
    daemon.register_snapshot("base", &mem);
    let socket = daemon.create_fork("base", "vm1");
    assert!(socket.is_absolute(), "{}", socket.display());
    assert_eq!(socket, state.join("sockets/vm1.sock"));
    let mut vmm = Vmm::attach(&mem, &socket, &["verify"]);
    vmm.expect("verified");
    vmm.finish();
}

#[test]
fn every_pagerctl_outcome_has_its_exit_status_and_json_errors_go_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 73, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let exit = |code: ErrorCode| Some(i32::from(code.exit_code()));

    // Found, not found, a bad id, a conflict, a usage error.
    assert_eq!(daemon.pagerctl(&["snapshot", "get", "base"]).code, Some(0));
    let run = daemon.pagerctl(&["--json", "fork", "get", "nope"]);
    assert_eq!(run.code, exit(ErrorCode::NotFound), "{run:?}");
    let printed: Value = run.json();
    assert_eq!(printed["error"]["code"], "not_found", "{printed}");
    assert!(run.stderr.is_empty(), "--json errors go to stdout: {run:?}");
    // Ids are parsed with the command line: a bad one is a usage error, nothing is sent.
    let run = daemon.pagerctl(&["fork", "get", "../etc"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("invalid id"), "{run:?}");
    daemon.create_fork("base", "f");
    let run = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert_eq!(run.code, exit(ErrorCode::Conflict), "{run:?}");
    assert!(run.stderr.contains("1 fork(s): f"), "{run:?}");
    assert_eq!(daemon.pagerctl(&["fork", "frobnicate"]).code, Some(2));

    // A healthy daemon's status exits 0; an unreadable fork record makes it unhealthy (9).
    assert_eq!(daemon.pagerctl(&["status"]).code, Some(0));
    std::fs::write(daemon.state_dir().join("forks/broken.json"), b"{not json").unwrap();
    daemon.respawn();
    let run = daemon.pagerctl(&["status"]);
    assert_eq!(run.code, Some(9), "{run:?}");
    assert!(run.stdout.contains("UNHEALTHY"), "{run:?}");

    // No daemon at all: 8, with a JSON error when asked.
    let out = Command::new(binary("pagerctl"))
        .args(["--socket", "/nonexistent/control.sock", "--json", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    assert_eq!(json_of(&out)["error"]["code"], "unreachable");
}

#[test]
fn fork_get_tells_why_a_fork_ended_and_why_its_last_handoff_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 74, 1, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let socket = daemon.create_fork("base", "f");

    let uffd = new_uffd();
    let reply = raw_handoff(
        &socket,
        b"[{\"size\": 1}]",
        &[std::os::fd::AsFd::as_fd(&uffd)],
    )
    .expect("a reply");
    assert!(!reply.ok);
    let info = daemon.fork("f");
    let refusal = info.last_handoff_error.clone().expect("recorded");
    assert_eq!(refusal.reason, RefusalReason::InvalidJson);
    let run = daemon.pagerctl(&["fork", "get", "f"]);
    assert!(run.success(), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "last handoff error: {} (invalid_json)",
            refusal.message
        )),
        "{}",
        run.stdout
    );

    let mut vmm = Vmm::attach(&mem, &socket, &["verify"]);
    vmm.expect("verified");
    vmm.finish();
    let ended = daemon.wait_fork("f", ForkState::Ended);
    assert_eq!(ended.end_reason, Some(EndReason::VmmExited));
    let run = daemon.pagerctl(&["fork", "get", "f"]);
    assert!(run.stdout.contains("state: ended"), "{}", run.stdout);
    assert!(
        run.stdout.contains("end reason: vmm_exited"),
        "{}",
        run.stdout
    );
    // Sizes and latencies read in units, not raw numbers.
    let copied = run.stdout.lines().find(|l| l.contains("copied:")).unwrap();
    assert!(copied.ends_with("B)"), "{copied}");
    let latency = run.stdout.lines().find(|l| l.contains("latency:")).unwrap();
    assert!(
        ["ns", "µs", "ms"].iter().any(|unit| latency.contains(unit)),
        "{latency}"
    );
    let json: ForkInfo = daemon.pagerctl(&["--json", "fork", "get", "f"]).json();
    assert_eq!(json, daemon.fork("f"));
}

/// The stderr lines of a pagerd started with `args` and `env`, once it is ready and stopped.
fn log_lines(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let state = dir.join("state");
    let state_arg = state.display().to_string();
    let mut all = vec!["--state-dir", &state_arg, "--fuse", "off"];
    all.extend(args);
    let daemon = Daemon::launch(Launch {
        args: &all,
        cwd: None,
        env,
        control: state.join("control.sock"),
        state,
    });
    daemon.status();
    let log = daemon.log();
    assert!(daemon.stop().success());
    log.lines().map(str::to_owned).collect()
}

#[test]
fn logs_follow_rust_log_and_come_as_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let json = log_lines(&dir.path().join("a"), &["--log-format", "json"], &[]);
    let ready: Vec<Value> = json
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &Value| v["fields"]["message"] == "pagerd ready")
        .collect();
    assert_eq!(ready.len(), 1, "{json:?}");
    assert_eq!(ready[0]["level"], "INFO");

    let quiet = log_lines(&dir.path().join("b"), &[], &[("RUST_LOG", "warn")]);
    assert!(
        !quiet.iter().any(|l| l.contains("pagerd ready")),
        "RUST_LOG=warn hides info lines: {quiet:?}"
    );
    let debug = log_lines(&dir.path().join("d"), &[], &[("RUST_LOG", "pagerd=debug")]);
    assert!(
        debug
            .iter()
            .any(|l| l.contains("control request") && l.contains("op=\"status\"")),
        "debug shows each control request: {debug:?}"
    );
    let chatty = log_lines(
        &dir.path().join("c"),
        &["--log", "warn"],
        &[("RUST_LOG", "info")],
    );
    assert!(
        chatty.iter().any(|l| l.contains("pagerd ready")),
        "RUST_LOG overrides --log: {chatty:?}"
    );
}

#[test]
fn pagerctl_top_shows_each_fork_and_its_fault_rate() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 75, 1, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let socket = daemon.create_fork("base", "busy");
    let mut busy = Vmm::attach(&mem, &socket, &["churn"]);
    busy.expect("churning");
    daemon.create_fork("base", "idle");
    let run = daemon.pagerctl(&["top", "--iterations", "3", "--interval-ms", "200"]);
    assert!(run.success(), "{run:?}");
    let frames: Vec<&str> = run.stdout.split("\npagerd ").collect();
    assert_eq!(frames.len(), 3, "{}", run.stdout);
    let last = frames[2];
    assert!(last.contains("1 serving, 1 waiting"), "{last}");
    let row = |id: &str| {
        last.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {last}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (busy_row, idle_row) = (row("busy"), row("idle"));
    let rate = |row: &[String]| row[5].parse::<f64>().unwrap();
    assert!(
        rate(&busy_row) > 0.0,
        "a churning fork faults: {busy_row:?}"
    );
    assert_eq!(rate(&idle_row), 0.0, "{idle_row:?}");
    assert_eq!(busy_row[2], "serving");
    busy.kill();
}

#[test]
fn errors_are_one_line_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 77, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    daemon.create_fork("base", "f");

    let run = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let line = run.stderr.trim_end();
    assert!(
        line.starts_with("pagerctl: ")
            && line.contains("1 fork(s): f")
            && line.ends_with(" (conflict)"),
        "{line}"
    );
    let run = daemon.pagerctl(&["fork", "get", "nope"]);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.trim_end().ends_with(" (not_found)"), "{run:?}");

    // No daemon: the causes joined on the one line.
    let out = Command::new(binary("pagerctl"))
        .args(["--socket", "/nonexistent/control.sock", "status"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("pagerctl: cannot connect to pagerd at /nonexistent/control.sock: ")
            && stderr.trim_end().ends_with(" (unreachable)"),
        "{stderr}"
    );
}

/// A control socket that answers each request as the real daemon at `daemon` does, but only
/// after `delay`: a daemon slower than a client's patience. Serves `calls` connections.
fn slow_proxy(
    daemon: &Path,
    at: &Path,
    delay: Duration,
    calls: usize,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(at).unwrap();
    let daemon = daemon.to_owned();
    std::thread::spawn(move || {
        for _ in 0..calls {
            let (client, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&client).read_line(&mut request).unwrap();
            // The slow daemon at work: the delay is what is being tested, not a wait for an
            // event.
            std::thread::sleep(delay);
            let upstream = UnixStream::connect(&daemon).unwrap();
            (&upstream).write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            BufReader::new(&upstream).read_line(&mut answer).unwrap();
            let _ = (&client).write_all(answer.as_bytes());
        }
    })
}

#[test]
fn the_client_waits_as_long_as_timeout_or_pagerd_timeout_says() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 78, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let proxy = dir.path().join("slow.sock");
    let server = slow_proxy(
        daemon.control_socket(),
        &proxy,
        Duration::from_millis(1500),
        4,
    );
    let pagerctl = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(binary("pagerctl"));
        command
            .arg("--socket")
            .arg(&proxy)
            .args(args)
            .env_remove("PAGERD_TIMEOUT");
        if let Some(seconds) = env {
            command.env("PAGERD_TIMEOUT", seconds);
        }
        command.output().unwrap()
    };

    // Too impatient: unreachable (8), saying which limit ran out.
    let out = pagerctl(&["--timeout", "0.5", "status"], None);
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not answer within 500ms (--timeout, $PAGERD_TIMEOUT)"),
        "{stderr}"
    );
    let out = pagerctl(&["status"], Some("0.5"));
    assert_eq!(out.status.code(), Some(8), "{out:?}");

    // Patient enough: the answer arrives and is printed.
    let out = pagerctl(&["--json", "status"], Some("10"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_of(&out)["pid"], daemon.pid());
    let out = pagerctl(&["--timeout", "10", "snapshot", "ls"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("base"),
        "{out:?}"
    );
    server.join().unwrap();

    // Not a duration: a usage error.
    let out = pagerctl(&["--timeout", "0", "status"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn fork_close_closes_every_id_given_and_reports_each_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 79, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    for id in ["a", "b", "c", "d"] {
        daemon.create_fork("base", id);
    }
    let run = daemon.pagerctl(&["fork", "close", "a", "nope", "b"]);
    assert_eq!(
        run.code,
        Some(i32::from(ErrorCode::NotFound.exit_code())),
        "{run:?}"
    );
    assert_eq!(run.stdout, "closed a\nclosed b\n", "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("nope"), "{run:?}");

    let answers: Vec<Value> = daemon.pagerctl_json(&["fork", "close", "c", "d"]);
    let closed: Vec<&str> = answers.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(closed, ["c", "d"]);
    assert!(daemon.forks().is_empty(), "{:?}", daemon.forks());
    // One id answers as before: the fork itself.
    daemon.create_fork("base", "e");
    let one: ForkInfo = daemon.pagerctl_json(&["fork", "close", "e"]);
    assert_eq!(one.id.as_str(), "e");
}

#[test]
fn fork_ls_says_what_its_numbers_count_and_fork_get_when_the_fork_was_made() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 80, 2, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let socket = daemon.create_fork("base", "f");
    let mut vmm = Vmm::attach(&mem, &socket, &["verify"]);
    vmm.expect("verified");
    vmm.finish();
    let info = daemon.wait_fork("f", ForkState::Ended);
    assert!(info.stats.zero_pages > 0, "{info:?}");

    let run = daemon.pagerctl(&["fork", "ls"]);
    let header = run.stdout.lines().next().unwrap();
    let columns: Vec<&str> = header
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert!(columns.contains(&"ZERO PAGES"), "{header}");
    assert!(!columns.contains(&"ZERO"), "{header}");
    let zero_at = header.find("ZERO PAGES").unwrap();
    let row = run.stdout.lines().find(|l| l.starts_with("f ")).unwrap();
    assert_eq!(
        row[zero_at..].split_whitespace().next(),
        Some(info.stats.zero_pages.to_string().as_str()),
        "{}",
        run.stdout
    );

    let run = daemon.pagerctl(&["fork", "get", "f"]);
    let created = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("  created: "))
        .unwrap_or_else(|| panic!("no creation time: {}", run.stdout));
    let seconds = info.created_unix_ms / 1000;
    let expected = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{seconds}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout);
    assert!(
        created.starts_with(&format!("{} (", expected.trim())),
        "{created}"
    );
    assert!(created.ends_with(" ago)"), "{created}");
}

#[test]
fn a_fork_asked_to_graduate_says_it_records_instead_while_a_recording_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 81, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off", "--record-forks", "0"]);
    assert!(daemon.pagerctl(&["snapshot", "record", "base"]).success());

    let run = daemon.pagerctl(&[
        "fork",
        "create",
        "base",
        "--id",
        "g",
        "--prefetch",
        "graduate",
    ]);
    assert!(run.success(), "{run:?}");
    let socket = PathBuf::from(run.stdout.trim());
    assert!(socket.is_absolute(), "stdout is the socket alone: {run:?}");
    assert!(
        run.stderr.starts_with("pagerctl: note: ")
            && run
                .stderr
                .contains("g will record it instead of graduating"),
        "{run:?}"
    );
    let run = daemon.pagerctl(&["fork", "get", "g"]);
    assert!(
        run.stdout
            .contains("  note: a recording of base's working set wants 1 more fork(s)"),
        "{}",
        run.stdout
    );

    let mut vmm = Vmm::attach(&mem, &socket, &["verify", "hold"]);
    vmm.expect("holding");
    assert!(daemon.wait_fork("g", ForkState::Serving).recording);
    let run = daemon.pagerctl(&["fork", "get", "g"]);
    assert!(
        run.stdout
            .contains("  note: g records the working set of base instead of graduating"),
        "{}",
        run.stdout
    );
    vmm.finish();
    daemon.wait_fork("g", ForkState::Ended);
    let run = daemon.pagerctl(&["fork", "get", "g"]);
    assert!(
        run.stdout
            .contains("  note: g recorded the working set of base instead of graduating"),
        "{}",
        run.stdout
    );

    // With no recording pending, a graduating fork graduates: nothing to say.
    let run = daemon.pagerctl(&[
        "fork",
        "create",
        "base",
        "--id",
        "h",
        "--prefetch",
        "graduate",
    ]);
    assert!(run.success() && run.stderr.is_empty(), "{run:?}");
    assert!(!daemon
        .pagerctl(&["fork", "get", "h"])
        .stdout
        .contains("note:"));
}

#[test]
fn the_readme_states_the_default_of_snapshot_record_as_pagerctl_does() {
    let help = Command::new(binary("pagerctl"))
        .args(["snapshot", "record", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let default = help
        .lines()
        .find(|l| l.contains("--forks"))
        .and_then(|l| l.split("[default: ").nth(1))
        .and_then(|d| d.split(']').next())
        .unwrap_or_else(|| panic!("no default for --forks: {help}"))
        .to_owned();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with("pagerctl snapshot record"))
        .expect("the README shows snapshot record");
    for (n, word) in line.split_whitespace().enumerate() {
        if word == "--forks" {
            let value = line.split_whitespace().nth(n + 1).unwrap();
            assert!(
                value == "N" || value == "N]",
                "an example count reads as the default: {line}"
            );
        }
    }
    assert!(line.contains(&format!("default {default}")), "{line}");
}

#[test]
fn snapshot_add_no_wait_returns_while_pagerd_imports_and_the_import_finishes() {
    let dir = tempfile::tempdir().unwrap();
    // 1 GiB of data: its copy and the copy's fsync take seconds here.
    let big = dir.path().join("big");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253 + 1) as u8).collect();
    for _ in 0..1024 {
        file.write_all(&chunk).unwrap();
    }
    file.into_inner().unwrap().sync_all().unwrap();
    let daemon = Daemon::start(&[], &["--fuse", "off"]);
    let added: Value =
        daemon.pagerctl_json(&["snapshot", "add", "big", big.to_str().unwrap(), "--no-wait"]);
    assert_eq!(added["id"], "big", "{added}");
    assert_eq!(
        added["importing"]["total_bytes"],
        Value::from(1u64 << 30),
        "pagerctl returned while pagerd imports: {added}"
    );
    testkit::wait_until("the import to finish", Duration::from_secs(120), || {
        daemon.snapshot("big").importing.is_none()
    });
    let done = daemon.snapshot("big");
    assert_eq!(done.size, Some(1 << 30), "{done:?}");
    assert!(done.error.is_none(), "{done:?}");
    // Without --no-wait the answer is the finished snapshot.
    let small = write_snapshot(&dir.path().join("small"), 1 << 20, 3, 0, 0);
    let waited: Value =
        daemon.pagerctl_json(&["snapshot", "add", "small", small.to_str().unwrap()]);
    assert!(waited["importing"].is_null(), "{waited}");
}

#[test]
fn json_logs_carry_fields_wire_spellings_and_who_changed_what() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 1 << 20, 5, 0, 0);
    let daemon = Daemon::start(
        &[("base", &mem)],
        &["--fuse", "off", "--log-format", "json"],
    );
    let socket = daemon.create_fork("base", "logged");
    // A handoff without a descriptor is refused with reason `no_fd`.
    let reply = raw_handoff(&socket, b"[]", &[]).expect("a reply");
    assert!(!reply.ok);
    daemon.close_fork("logged");
    let lines: Vec<Value> = daemon
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let find = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    };
    let ready = find("pagerd ready");
    assert_eq!(ready.len(), 1, "{lines:?}");
    assert_eq!(ready[0]["fields"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        ready[0]["fields"]["options"]
            .as_str()
            .is_some_and(|o| o.contains("--log-format json")),
        "{}",
        ready[0]
    );
    let reconciled = find("reconciled the state directory");
    assert_eq!(reconciled.len(), 1, "{lines:?}");
    assert!(
        reconciled[0]["fields"]["snapshots"].is_u64() && reconciled[0]["fields"]["reaped"].is_u64(),
        "numbers, not text: {}",
        reconciled[0]
    );
    assert_eq!(reconciled[0]["fields"]["recovered"], 0);
    let refused = find("handoff refused");
    assert_eq!(refused.len(), 1, "{lines:?}");
    assert_eq!(
        refused[0]["fields"]["reason"], "no_fd",
        "the wire's spelling: {}",
        refused[0]
    );
    let changes: Vec<&Value> = find("control request")
        .into_iter()
        .filter(|l| l["level"] == "INFO")
        .collect();
    let closed = changes
        .iter()
        .find(|l| l["fields"]["op"] == "fork.close")
        .unwrap_or_else(|| panic!("the close is logged at info: {changes:?}"));
    assert_eq!(closed["fields"]["fork"], "logged");
    assert_eq!(closed["fields"]["peer_uid"], 0, "who asked: {closed}");
    assert!(
        changes.iter().all(|l| l["fields"]["op"] != "status"),
        "reads stay at debug: {changes:?}"
    );
}
