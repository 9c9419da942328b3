//! VMs pagerd launches: real Firecracker processes restored from a snapshot of a tiny guest
//! (`testkit::firecracker`), driven through `pagerctl vm …`. Every clone's guest checks the
//! 8 MiB it filled before the snapshot and reports `OK` on its console (COM1, Firecracker's
//! stdout, which pagerd keeps in the VM's console log); a `BAD` line would mean wrong memory.
//!
//! QEMU clones (TCG) map the FUSE memory file privately and take their device state from a
//! migration stream saved with `x-ignore-shared`.
//!
//! Skipped (and counted as such) where Firecracker, `/dev/kvm`, QEMU >= 8.2 or `cc` is missing.

use std::sync::Mutex;
use std::time::Duration;

use proto::model::{EndReason, ForkState, SnapshotInfo, VmBackend, VmInfo, VmState, VmmKind};
use proto::prefetch::Prefetch;
use testkit::firecracker::{self, count, wait_ok, Fixture, VmReaper};
use testkit::qemu;
use testkit::{skip, wait_until, Daemon, DEADLINE};

/// The guests are busy loops: one test at a time keeps a 2-core machine usable.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A daemon that can launch Firecracker, with the fixture registered as snapshot `base`;
/// `None` (the test reported as skipped) where VMs cannot run here.
fn setup(test: &str) -> Option<(Daemon, Fixture)> {
    let fixture = match firecracker::fixture() {
        Ok(fixture) => fixture,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let binary = firecracker::binary().expect("the fixture was made with it");
    let daemon = Daemon::start(&[], &["--firecracker", &binary.display().to_string()]);
    let info: SnapshotInfo = ctl_json(
        &daemon,
        &[
            "snapshot",
            "add",
            "base",
            &fixture.memory.display().to_string(),
            "--vmstate",
            &fixture.vmstate.display().to_string(),
            "--vmm",
            "firecracker",
        ],
    );
    let vmstate = info.vmstate.expect("the snapshot keeps its vmstate");
    assert_eq!(vmstate.vmm, VmmKind::Firecracker);
    assert_eq!(
        std::fs::read(&vmstate.path).unwrap(),
        std::fs::read(&fixture.vmstate).unwrap(),
        "the vmstate is copied in"
    );
    Some((daemon, fixture))
}

/// Runs `pagerctl --json ARGS`, which must succeed, and decodes its answer.
fn ctl_json<T: serde::de::DeserializeOwned>(daemon: &Daemon, args: &[&str]) -> T {
    daemon.pagerctl_json(args)
}

fn start_vm(daemon: &Daemon, snapshot: &str, id: &str, backend: VmBackend) -> VmInfo {
    let vm: VmInfo = ctl_json(
        daemon,
        &[
            "vm",
            "start",
            snapshot,
            "--id",
            id,
            "--backend",
            backend.as_str(),
        ],
    );
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    assert!(vm.pid.is_some());
    match backend {
        VmBackend::Uffd => assert_eq!(vm.fork.as_ref().map(|f| f.as_str()), Some(id)),
        VmBackend::File => assert!(vm.memory_file.is_some() && vm.fork.is_none()),
    }
    vm
}
fn stop(daemon: &Daemon, id: &str) -> VmInfo {
    let vm: VmInfo = ctl_json(daemon, &["vm", "stop", id, "--timeout-ms", "5000"]);
    assert_eq!(vm.state, VmState::Exited, "{vm:?}");
    assert_ne!(vm.exit_signal, Some(9), "SIGTERM stops it: {vm:?}");
    vm
}

#[test]
fn eight_clones_of_one_snapshot_check_their_memory_on_each_backend() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "eight_clones_of_one_snapshot_check_their_memory_on_each_backend";
    let Some((daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    for backend in [VmBackend::Uffd, VmBackend::File] {
        let vms: Vec<VmInfo> = (0..8)
            .map(|i| start_vm(&daemon, "base", &format!("{backend}-{i}"), backend))
            .collect();
        for vm in &vms {
            wait_ok(vm, 1);
            let got: VmInfo = ctl_json(&daemon, &["vm", "get", vm.id.as_str()]);
            assert_eq!(
                (got.state, got.pid, got.backend),
                (VmState::Running, vm.pid, backend)
            );
            assert!(got.api_socket.starts_with(daemon.state_dir().join("vms")));
            if backend == VmBackend::Uffd {
                assert_eq!(daemon.fork(vm.id.as_str()).state, ForkState::Serving);
            }
        }
        let listed: Vec<VmInfo> = ctl_json(&daemon, &["vm", "ls"]);
        assert_eq!(
            listed
                .iter()
                .filter(|v| v.backend == backend && v.state == VmState::Running)
                .count(),
            8
        );
        let refused = daemon.pagerctl(&["snapshot", "rm", "base"]);
        assert_eq!(refused.code, Some(4), "{refused:?}");
        assert!(
            refused.stderr.contains(&format!("{backend}-0")),
            "the conflict names the VMs: {refused:?}"
        );
        assert_eq!(daemon.snapshot("base").vms.len(), 8);
        assert_eq!(daemon.status().vms.running, 8);
        for vm in &vms {
            stop(&daemon, vm.id.as_str());
        }
    }
    assert!(daemon.snapshot("base").vms.is_empty());
    wait_until("the last clone to let go of the snapshot", DEADLINE, || {
        daemon.pagerctl(&["snapshot", "rm", "base"]).success()
    });
}

#[test]
fn a_snapshot_of_a_running_clone_is_a_new_parent() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_snapshot_of_a_running_clone_is_a_new_parent";
    let Some((daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let parent = start_vm(&daemon, "base", "parent", VmBackend::Uffd);
    wait_ok(&parent, 1);
    let child: SnapshotInfo = ctl_json(
        &daemon,
        &["vm", "snapshot", "parent", "--id", "child", "--resume"],
    );
    assert_eq!(child.vmstate.map(|v| v.vmm), Some(VmmKind::Firecracker));
    let passes = count(&parent.console_log, "OK");
    wait_ok(&parent, passes + 1);
    let clones = [
        start_vm(&daemon, "child", "child-uffd", VmBackend::Uffd),
        start_vm(&daemon, "child", "child-file", VmBackend::File),
    ];
    for vm in &clones {
        wait_ok(vm, 1);
    }
    let refused = daemon.pagerctl(&["snapshot", "rm", "child"]);
    assert_eq!(refused.code, Some(4), "{refused:?}");
    // Without --resume the VM stays paused (Firecracker says so on its API).
    let _: SnapshotInfo = ctl_json(&daemon, &["vm", "snapshot", "parent", "--id", "child2"]);
    let state = vmm_glue::http::request(
        &parent.api_socket,
        "GET",
        "/",
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(state.body.contains("\"Paused\""), "{state:?}");
    let refused = daemon.pagerctl(&["vm", "snapshot", "parent", "--id", "child2"]);
    assert_eq!(refused.code, Some(4), "the id is taken: {refused:?}");
    for id in ["child-uffd", "child-file", "parent"] {
        stop(&daemon, id);
    }
}

#[test]
fn snapshots_without_vmm_state_are_not_started_and_unreadable_vm_records_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mem = testkit::write_snapshot(&dir.path().join("mem"), 1 << 20, 3, 0, 0);
    let daemon = Daemon::start(&[("plain", &mem)], &[]);
    assert!(daemon.snapshot("plain").vmstate.is_none());
    let refused = daemon.pagerctl(&["vm", "start", "plain"]);
    assert_eq!(refused.code, Some(5), "{refused:?}");
    assert!(refused.stderr.contains("--vmstate"), "{refused:?}");
    let missing = daemon.pagerctl(&["vm", "get", "nope"]);
    assert_eq!(missing.code, Some(3), "{missing:?}");
    let broken = daemon.state_dir().join("vms/broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("vm.json"), b"{\"id\":").unwrap();
    let refused = daemon.pagerctl(&["snapshot", "rm", "plain"]);
    assert_eq!(refused.code, Some(7), "counting fails closed: {refused:?}");
    assert!(refused.stderr.contains("vms/broken/vm.json"), "{refused:?}");
    std::fs::remove_dir_all(&broken).unwrap();
    let rm = daemon.pagerctl(&["snapshot", "rm", "plain"]);
    assert!(rm.success(), "{rm:?}");
}

#[test]
fn a_killed_vmm_leaves_its_vm_exited_and_its_references_released() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_killed_vmm_leaves_its_vm_exited_and_its_references_released";
    let Some((daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let vm = start_vm(&daemon, "base", "victim", VmBackend::Uffd);
    wait_ok(&vm, 1);
    let pid = nix::unistd::Pid::from_raw(vm.pid.expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let gone: VmInfo = ctl_json(
        &daemon,
        &["vm", "wait", "victim", "exited", "--timeout-ms", "10000"],
    );
    assert_eq!(gone.state, VmState::Exited);
    assert_eq!(gone.exit_signal, Some(9), "{gone:?}");
    let fork = daemon.pagerctl(&["fork", "get", "victim"]);
    assert_eq!(fork.code, Some(3), "the fork ended and went: {fork:?}");
    let base = daemon.snapshot("base");
    assert_eq!(base.ref_count, Some(0), "{base:?}");
    assert!(base.vms.is_empty() && base.forks == Some(Vec::new()));
    let rm = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert!(rm.success(), "{rm:?}");
}

#[test]
fn vms_outlive_a_pagerd_restart_and_are_still_listed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "vms_outlive_a_pagerd_restart_and_are_still_listed";
    let Some((mut daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let vms = [
        start_vm(&daemon, "base", "u", VmBackend::Uffd),
        start_vm(&daemon, "base", "f", VmBackend::File),
    ];
    for vm in &vms {
        wait_ok(vm, 1);
    }
    daemon.respawn();
    let listed: Vec<VmInfo> = ctl_json(&daemon, &["vm", "ls"]);
    for vm in &vms {
        let now = listed.iter().find(|v| v.id == vm.id).expect("still listed");
        assert_eq!((now.state, now.pid), (VmState::Running, vm.pid), "{now:?}");
    }
    // The file-backed guest keeps checking its memory (the FUSE mapping outlives the daemon).
    let passes = count(&vms[1].console_log, "OK");
    wait_ok(&vms[1], passes + 2);
    let refused = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert_eq!(
        refused.code,
        Some(4),
        "live VM records still hold the snapshot: {refused:?}"
    );
    for vm in &vms {
        let stopped = stop(&daemon, vm.id.as_str());
        assert_eq!(stopped.exit_code, None, "not pagerd's child any more");
    }
    wait_until("the snapshot to be free", Duration::from_secs(30), || {
        daemon.pagerctl(&["snapshot", "rm", "base"]).success()
    });
}

#[test]
fn qemu_clones_map_the_fuse_file_and_resume_from_a_migration_stream() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "qemu_clones_map_the_fuse_file_and_resume_from_a_migration_stream";
    let fixture = match qemu::fixture() {
        Ok(fixture) => fixture,
        Err(why) => return skip(test, &why),
    };
    let binary = qemu::available().expect("the fixture was made with it");
    let daemon = Daemon::start(&[], &["--qemu", &binary.display().to_string()]);
    let _reaper = VmReaper::new(&daemon.state_dir());
    let info: SnapshotInfo = ctl_json(
        &daemon,
        &[
            "snapshot",
            "add",
            "q",
            &fixture.memory.display().to_string(),
            "--vmstate",
            &fixture.vmstate.display().to_string(),
            "--vmm",
            "qemu",
        ],
    );
    assert_eq!(info.vmstate.map(|v| v.vmm), Some(VmmKind::Qemu));
    let refused = daemon.pagerctl(&["vm", "start", "q", "--id", "q-uffd"]);
    assert_eq!(
        refused.code,
        Some(5),
        "QEMU clones use the file backend: {refused:?}"
    );
    let vms: Vec<VmInfo> = (0..4)
        .map(|i| start_vm(&daemon, "q", &format!("q-{i}"), VmBackend::File))
        .collect();
    for vm in &vms {
        assert_eq!(vm.vmm, VmmKind::Qemu);
        wait_ok(vm, 1);
    }
    let refused = daemon.pagerctl(&["snapshot", "rm", "q"]);
    assert_eq!(refused.code, Some(4), "{refused:?}");
    let refused = daemon.pagerctl(&["vm", "snapshot", "q-0", "--id", "q2"]);
    assert_eq!(refused.code, Some(5), "not for QEMU yet: {refused:?}");
    for vm in &vms {
        stop(&daemon, vm.id.as_str());
    }
    wait_until("the clones to let go of the snapshot", DEADLINE, || {
        daemon.pagerctl(&["snapshot", "rm", "q"]).success()
    });
}

#[test]
fn a_graduated_clone_runs_on_without_pagerd() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_graduated_clone_runs_on_without_pagerd";
    let Some((mut daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let vm: VmInfo = ctl_json(
        &daemon,
        &[
            "vm",
            "start",
            "base",
            "--id",
            "grad",
            "--backend",
            "uffd",
            "--prefetch",
            "graduate",
        ],
    );
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    wait_ok(&vm, 1);
    // Every page of the guest's memory is installed; pagerd lets the fork go while the VM runs.
    wait_until("the clone's fork to graduate", DEADLINE, || {
        daemon.fork("grad").end_reason == Some(EndReason::Graduated)
    });
    let fork = daemon.fork("grad");
    assert_eq!(fork.prefetch, Prefetch::Graduate);
    let memory = std::fs::metadata(daemon.state_dir().join("snapshots/base/memory"))
        .unwrap()
        .len();
    let s = &fork.stats;
    assert_eq!(
        s.pages_copied + s.zero_pages + s.graduated_pages + s.replayed_pages,
        memory / 4096,
        "every page installed once: {s:?}"
    );
    let running: VmInfo = ctl_json(&daemon, &["vm", "get", "grad"]);
    assert_eq!(running.state, VmState::Running);
    // The guest goes on checking its memory with pagerd gone.
    let before = count(&vm.console_log, "OK");
    daemon.sigkill();
    wait_ok(&vm, before + 2);
}
