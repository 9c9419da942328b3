//! No VM freezes when pagerd crashes, restarts or is upgraded: forks keep faulting (paced
//! random reads, every byte checked) while the daemon is SIGKILLed and restarted, or upgraded,
//! many times; each takes its VMM's uffd back and serves again. Processes mapping a memory
//! file through the FUSE view are counted again after a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::model::{ForkListEntry, ForkState};
use serde_json::Value;
use testkit::restore_guest::Firecracker;
use testkit::{wait_until, write_snapshot, Daemon, Vmm, DEADLINE};

/// Forks faulting at once.
const FORKS: usize = 32;
/// Daemon deaths (or upgrades) per test.
const ROUNDS: usize = 20;
/// 4 KiB pages per fork's memory: 1024 pages, read in random order, ~6 ms apart (each VMM
/// keeps faulting for over 6 s, longer than the restarts take).
const MEMORY: u64 = 4 << 20;
const PACE_US: u64 = 6000;
/// Every VMM must have finished this long after the last restart.
const FINISH_DEADLINE: Duration = Duration::from_secs(90);

/// How long a Firecracker guest (emulated at CPL0 here, ~100x slower) may take per step.
const GUEST_DEADLINE: Duration = Duration::from_secs(30);

/// A small xorshift generator: random moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("restart moments seeded with {seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Starts `FORKS` paced VMMs reading every page of `mem` in random order, each checking every
/// byte, and waits until every one is served.
fn start_forks(daemon: &Daemon, mem: &Path) -> Vec<Vmm> {
    daemon.paced_readers(FORKS, mem, PACE_US)
}

/// Waits for every VMM to exit, each having verified every byte.
fn finish_all(vmms: Vec<Vmm>, daemon: &Daemon) {
    let end = Instant::now() + FINISH_DEADLINE;
    for (i, mut vmm) in vmms.into_iter().enumerate() {
        let left = end.saturating_duration_since(Instant::now());
        let verified = vmm.expect_within("verified", left);
        assert_eq!(
            verified["report"]["pages"],
            Value::from(MEMORY / 4096),
            "fork vm{i}: {verified}\n{}",
            daemon.log()
        );
        let (status, events) = vmm.wait_exit();
        assert!(status.success(), "fork vm{i} failed: {events:?}");
    }
}

#[test]
fn thirty_two_forks_keep_faulting_through_twenty_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MEMORY, 77, 5, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let vmms = start_forks(&daemon, &mem);
    let mut rng = Rng::seeded();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        daemon.sigkill();
        // Faults raised while no daemon lives stay queued (or asleep) until it is back.
        std::thread::sleep(Duration::from_millis(rng.below(30)));
        daemon.respawn();
        let status = daemon.status();
        assert_eq!(
            status.forks.detached,
            0,
            "round {round}: a fork was left detached\n{}",
            daemon.log()
        );
    }
    // Forks still running were taken back at the last start (one listing: a fork may end
    // between two requests).
    let forks = daemon.forks();
    let serving: Vec<_> = forks
        .iter()
        .filter_map(|f| match f {
            ForkListEntry::Uffd(info) if info.state == ForkState::Serving => Some(info),
            _ => None,
        })
        .collect();
    let recovered = serving.iter().filter(|info| info.recovered > 0).count();
    let serving = serving.len();
    assert_eq!(recovered, serving, "every fork served now was recovered");
    assert!(
        serving >= FORKS / 2,
        "the forks should still be faulting after the last restart ({serving} are)"
    );
    finish_all(vmms, &daemon);
    // Each VMM's exit ended its fork (or a restart reaped it): nothing is left.
    testkit::wait_until("every fork to end", testkit::DEADLINE, || {
        daemon.forks().iter().all(|f| match f {
            ForkListEntry::Uffd(info) => info.state == ForkState::Ended,
            ForkListEntry::File(_) => true,
        })
    });
}

#[test]
fn thirty_two_forks_keep_faulting_through_twenty_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MEMORY, 79, 5, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let pid = daemon.pid();
    let vmms = start_forks(&daemon, &mem);
    // A control client asking all along: the control socket keeps listening across an
    // upgrade, so no request fails, some are only answered a little later.
    let asking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let client = {
        let (asking, control) = (asking.clone(), daemon.control_socket().to_owned());
        std::thread::spawn(move || {
            let client = proto::client::Client::new(&control);
            let (mut answered, mut failed) = (0, Vec::new());
            while asking.load(std::sync::atomic::Ordering::SeqCst) {
                match client.status() {
                    Ok(_) => answered += 1,
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (answered, failed)
        })
    };
    let mut rng = Rng::seeded();
    let mut longest = Duration::ZERO;
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        longest = longest.max(daemon.upgrade(None));
        let status = daemon.status();
        assert_eq!(status.pid, pid, "the daemon keeps its pid");
        assert_eq!(
            status.forks.detached,
            0,
            "round {round}: a fork was left detached\n{}",
            daemon.log()
        );
    }
    eprintln!("longest upgrade, request to the new program answering: {longest:?}");
    asking.store(false, std::sync::atomic::Ordering::SeqCst);
    let (answered, failed) = client.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} control requests failed during upgrades: {:?}",
        failed.len(),
        answered + failed.len(),
        &failed[..failed.len().min(3)]
    );
    let serving = daemon.status().forks.serving;
    assert!(
        serving >= FORKS / 2,
        "the forks should still be faulting after the last upgrade ({serving} are)"
    );
    finish_all(vmms, &daemon);
}

#[test]
fn vmms_handing_off_during_upgrades_are_served_by_the_new_program() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 1 << 20, 82, 3, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    for round in 0..5 {
        let fork = format!("late{round}");
        let socket = daemon.create_fork("base", &fork);
        let asked = Instant::now();
        daemon.client().upgrade(None).expect("daemon.upgrade");
        // Connects while the old program goes away or the new one starts: the socket keeps
        // listening throughout, and the new program reads the handoff from its backlog.
        let mut vmm = Vmm::attach(&mem, &socket, &["verify"]);
        let verified = vmm.expect("verified");
        assert_eq!(verified["report"]["pages"], Value::from(256), "{verified}");
        let (status, events) = vmm.wait_exit();
        assert!(
            status.success(),
            "round {round}: {events:?}\n{}",
            daemon.log()
        );
        testkit::wait_until("the upgraded daemon", testkit::DEADLINE, || {
            daemon
                .client()
                .status()
                .is_ok_and(|s| u128::from(s.uptime_ms) <= asked.elapsed().as_millis())
        });
    }
}

#[test]
fn an_upgrade_to_something_that_is_not_pagerd_is_refused_and_pagerctl_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 1 << 20, 80, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let vmm = daemon.attach_holding_vmm("base", "vm", &mem);
    let refusal = testkit::refused(
        daemon
            .client()
            .upgrade(Some(std::path::PathBuf::from("/bin/true"))),
    );
    assert_eq!(
        refusal.code,
        proto::control::ErrorCode::InvalidArgument,
        "{refusal:?}"
    );
    let refusal = testkit::refused(daemon.client().upgrade(Some("relative/pagerd".into())));
    assert_eq!(
        refusal.code,
        proto::control::ErrorCode::InvalidArgument,
        "{refusal:?}"
    );
    let run = daemon.pagerctl(&["daemon", "upgrade", "--binary", "/bin/true"]);
    assert_eq!(run.code, Some(5), "invalid_argument: {run:?}");
    assert_eq!(daemon.fork("vm").state, ForkState::Serving);
    assert_eq!(daemon.fork("vm").recovered, 0);
    // The same through pagerctl, to the daemon's own binary: done, and the fork recovered.
    let asked = Instant::now();
    let run = daemon.pagerctl(&["daemon", "upgrade"]);
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("is executing"), "{run:?}");
    testkit::wait_until("the upgraded daemon", testkit::DEADLINE, || {
        daemon.client().status().is_ok_and(|s| {
            u128::from(s.uptime_ms) <= asked.elapsed().as_millis() && s.forks.serving == 1
        })
    });
    assert_eq!(daemon.fork("vm").recovered, 1);
    vmm.finish();
}

#[test]
fn a_fork_recorded_before_uffds_were_kept_is_detached_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 1 << 20, 78, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let vmm = daemon.attach_holding_vmm("base", "old", &mem);
    daemon.sigkill();
    // What an older pagerd wrote: the VMM, but nothing about its uffd.
    let path = daemon.state_dir().join("forks/old.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(record["uffd"]["ino"].is_u64(), "{record}");
    record.as_object_mut().unwrap().remove("uffd");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    daemon.respawn();
    let fork = daemon.fork("old");
    assert_eq!(fork.state, ForkState::Detached, "{fork:?}");
    assert_eq!(
        fork.detached_reason,
        Some(proto::model::DetachedReason::RecordTooOld)
    );
    assert_eq!(daemon.ref_count("base"), Some(1));
    vmm.kill();
}

#[test]
fn a_deferred_delete_across_restarts_waits_for_a_process_that_still_maps_the_memory_file() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 << 20, 81, 4, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "passthrough"]);
    let read_path = daemon.status().fuse.map(|f| f.read_path);
    if read_path != Some(proto::model::ReadPath::Passthrough) {
        testkit::skip(
            "a_deferred_delete_across_restarts_waits_for_a_process_that_still_maps_the_memory_file",
            &format!("FUSE passthrough is not available here (read path {read_path:?})"),
        );
        return;
    }
    let file = daemon.fuse_file("base");
    let mut user = Vmm::spawn(&[
        "--snapshot".to_owned(),
        mem.display().to_string(),
        "--memory-file".to_owned(),
        file.display().to_string(),
        "verify".to_owned(),
        "hold".to_owned(),
    ]);
    user.expect("holding");
    let outcome = daemon.delete_snapshot("base", true);
    assert!(outcome.pending, "{outcome:?}");
    let user_pid = i32::try_from(user.pid()).unwrap();
    // A crash (the mount is left dead), a second one (the mount was detached meanwhile), and an
    // upgrade: each time the process that still maps the file is counted again.
    for round in 0..3 {
        if round < 2 {
            daemon.sigkill();
            daemon.respawn();
        } else {
            daemon.upgrade(None);
        }
        let info = daemon.snapshot("base");
        assert!(info.delete_pending, "round {round}: {info:?}");
        assert_eq!(info.ref_count, Some(1), "round {round}: {info:?}");
        assert_eq!(info.file_users[0].pid, user_pid, "round {round}: {info:?}");
        assert!(daemon.state_dir().join("snapshots/base/memory").exists());
    }
    // The process still reads the snapshot's bytes, then lets go: the delete finishes.
    user.finish();
    testkit::wait_until("the deferred delete to finish", testkit::DEADLINE, || {
        !daemon.state_dir().join("snapshots/base").exists()
    });
}

#[test]
fn a_firecracker_guest_keeps_running_across_a_pagerd_sigkill() {
    const TEST: &str = "a_firecracker_guest_keeps_running_across_a_pagerd_sigkill";
    let Ok(firecracker) = testkit::firecracker::binary() else {
        testkit::skip(
            TEST,
            "no firecracker binary ($FIRECRACKER, PATH, shared/vendor)",
        );
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        testkit::skip(TEST, "no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = match testkit::restore_guest::build_guest(dir.path()) {
        Ok(guest) => guest,
        Err(why) => {
            testkit::skip(TEST, &format!("cannot build the guest: {why}"));
            return;
        }
    };
    let (vmstate, mem) = (dir.path().join("vmstate"), dir.path().join("mem"));
    // Boot, let the guest run a few passes, snapshot it.
    {
        let mut vm = Firecracker::spawn(&firecracker, &dir.path().join("boot.sock"));
        let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, guest.display());
        vm.ok("PUT", "/boot-source", &boot);
        vm.ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#,
        );
        vm.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        let booted = vm.line_within(GUEST_DEADLINE, |l| l.starts_with("pass 3"));
        assert!(booted.is_some(), "the guest did not run: {:?}", vm.seen);
        vm.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
        let create = format!(
            r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            vmstate.display(),
            mem.display()
        );
        vm.ok("PUT", "/snapshot/create", &create);
    }
    // Restore it from pagerd (Uffd backend).
    let mut daemon = Daemon::start(&[("vm", &mem)], &["--fuse", "off"]);
    let socket = daemon.create_fork("vm", "fc");
    let mut vm = Firecracker::spawn(&firecracker, &dir.path().join("restore.sock"));
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
        vmstate.display(),
        socket.display()
    );
    vm.ok("PUT", "/snapshot/load", &load);
    let mut last = 0;
    for _ in 0..5 {
        let (n, ok) = vm
            .next_pass(GUEST_DEADLINE)
            .unwrap_or_else(|| panic!("the restored guest stopped: {:?}", vm.seen));
        assert!(ok, "the guest read wrong memory: {:?}", vm.seen);
        last = n;
    }
    assert_eq!(daemon.fork("fc").state, ForkState::Serving);
    // pagerd dies; the guest soon waits on a fresh page; a new pagerd takes the uffd back.
    let vmm_pid = daemon.fork("fc").vmm_pid.expect("the fork knows its VMM");
    for kill in 0..3 {
        daemon.sigkill();
        wait_until(
            "the guest to wait on a page nobody serves",
            DEADLINE,
            || waits_on_a_userfault(vmm_pid),
        );
        daemon.respawn();
        let fork = daemon.fork("fc");
        assert_eq!(fork.state, ForkState::Serving, "kill {kill}: {fork:?}");
        assert_eq!(fork.recovered, 1, "{fork:?}");
        // New passes, each touching pages never touched before.
        let target = last + 5;
        while last < target {
            let (n, ok) = vm.next_pass(GUEST_DEADLINE).unwrap_or_else(|| {
                panic!(
                    "kill {kill}: the guest froze after pass {last}: {:?}\n{}",
                    &vm.seen[vm.seen.len().saturating_sub(5)..],
                    daemon.log()
                )
            });
            assert!(ok, "the guest read wrong memory: {:?}", vm.seen);
            last = n;
        }
    }
    assert!(daemon.fork("fc").stats.faults > 0);
    drop(vm);
}

/// Whether a thread of process `pid` sleeps in the kernel waiting for a userfaultfd to
/// resolve its fault (its `wchan` is `handle_userfault`).
fn waits_on_a_userfault(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("wchan")).is_ok_and(|w| w.contains("userfault"))
    })
}

/// Bytes the daemon has read with `read`-like calls since it started (`rchar`).
fn bytes_read(daemon: &Daemon) -> u64 {
    let io =
        std::fs::read_to_string(format!("/proc/{}/io", daemon.pid())).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

/// Checks every byte of `mem` through a new fork of `base`.
fn verify_through_a_fork(daemon: &Daemon, mem: &Path, fork: &str) {
    let socket = daemon.create_fork("base", fork);
    let mut vmm = Vmm::attach(mem, &socket, &["verify"]);
    let verified = vmm.expect("verified");
    assert_eq!(
        verified["report"]["pages"],
        Value::from(MIB64 / 4096),
        "{verified}"
    );
    let (status, events) = vmm.wait_exit();
    assert!(status.success(), "{events:?}\n{}", daemon.log());
}

const MIB64: u64 = 64 << 20;

#[test]
fn a_restart_reads_no_snapshot_data_and_a_damaged_zero_map_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    // Data throughout, every 7th page zeros, the last quarter zeros.
    let mem = write_snapshot(&dir.path().join("mem"), MIB64, 7, 7, MIB64 / 4);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let zero_map = daemon.state_dir().join("snapshots/base/zero-map");
    assert!(zero_map.is_file(), "registration stores the zero map");
    let zero_pages = daemon.snapshot("base").zero_pages;

    daemon.respawn();
    let read = bytes_read(&daemon);
    assert!(
        read < MIB64 / 8,
        "a start with a stored zero map read {read} bytes (the snapshot is {MIB64})\n{}",
        daemon.log()
    );
    assert_eq!(daemon.snapshot("base").zero_pages, zero_pages);
    verify_through_a_fork(&daemon, &mem, "after-restart");

    // A damaged map is never used: the file is read again, and the map stored anew.
    let mut bytes = std::fs::read(&zero_map).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&zero_map, &bytes).unwrap();
    daemon.respawn();
    assert!(
        bytes_read(&daemon) >= MIB64 / 2,
        "the data was read again\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("does not describe the memory file"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.snapshot("base").zero_pages, zero_pages);
    assert_ne!(std::fs::read(&zero_map).unwrap(), bytes, "stored anew");
    verify_through_a_fork(&daemon, &mem, "after-damage");
}

#[test]
fn a_forks_counters_go_on_across_upgrades_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 << 20, 9, 5, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let vmm = daemon.attach_holding_vmm("base", "held", &mem);
    let before = daemon.fork("held").stats;
    assert!(before.faults > 0 && before.pages_copied > 0, "{before:?}");

    daemon.upgrade(None);
    let upgraded = daemon.fork("held").stats;
    assert_eq!(daemon.fork("held").recovered, 1);
    for (name, was, now) in [
        ("faults", before.faults, upgraded.faults),
        ("pages_copied", before.pages_copied, upgraded.pages_copied),
        ("bytes_copied", before.bytes_copied, upgraded.bytes_copied),
        ("zero_pages", before.zero_pages, upgraded.zero_pages),
    ] {
        assert!(
            now >= was,
            "{name} went back from {was} to {now} at the upgrade"
        );
    }
    assert!(upgraded.pages_copied > 0);

    daemon.respawn();
    let restarted = daemon.fork("held").stats;
    assert!(
        restarted.pages_copied >= upgraded.pages_copied && restarted.faults >= upgraded.faults,
        "{upgraded:?} → {restarted:?}"
    );
    assert!(
        !daemon.state_dir().join("forks/.counters").exists(),
        "counters are carried over once"
    );
    drop(vmm);
}
