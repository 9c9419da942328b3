//! VMs pagerd launches: real Firecracker processes restored from a snapshot of a tiny guest
//! (`testkit::firecracker`), driven through `pagerctl vm …`. Every clone's guest checks the
//! 8 MiB it filled before the snapshot and reports `OK` on its console (COM1, Firecracker's
//! stdout, which pagerd keeps in the VM's console log); a `BAD` line would mean wrong memory.
//!
//! QEMU clones (TCG) map the FUSE memory file privately and take their device state from a
//! migration stream saved with `x-ignore-shared`.
//!
//! Failed starts: a real Firecracker refusing a corrupt vmstate, a stand-in hypervisor (a
//! shell script) that exits at once, and a missing binary, each reported with its cause; ended
//! VMs deleted (`vm rm`, and past `--vm-retention`), their ids then free, and never by a
//! `--group` member that does not own them.
//!
//! Skipped (and counted as such) where Firecracker, `/dev/kvm`, QEMU >= 8.2 or `cc` is missing.

use std::sync::Mutex;
use std::time::Duration;

use proto::control::ErrorCode;
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
    let info = add_bundle(&daemon, "base", &fixture.memory, &fixture.vmstate);
    let vmstate = info.vmstate.expect("the snapshot keeps its vmstate");
    assert_eq!(vmstate.vmm, VmmKind::Firecracker);
    assert_eq!(
        std::fs::read(&vmstate.path).unwrap(),
        std::fs::read(&fixture.vmstate).unwrap(),
        "the vmstate is copied in"
    );
    Some((daemon, fixture))
}

/// Registers `memory` with the Firecracker `vmstate` as snapshot `id` (`pagerctl snapshot add`).
fn add_bundle(
    daemon: &Daemon,
    id: &str,
    memory: &std::path::Path,
    vmstate: &std::path::Path,
) -> SnapshotInfo {
    ctl_json(
        daemon,
        &[
            "snapshot",
            "add",
            id,
            memory.to_str().unwrap(),
            "--vmstate",
            vmstate.to_str().unwrap(),
            "--vmm",
            "firecracker",
        ],
    )
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
/// The exit status `pagerctl` ends with for `code`.
fn exit(code: ErrorCode) -> Option<i32> {
    Some(i32::from(code.exit_code()))
}

/// A daemon whose "Firecracker" is `binary` (extra `args` too), with snapshot `base`: a small
/// memory file and a vmstate that no hypervisor reads.
fn daemon_with_hypervisor(binary: &std::path::Path, args: &[&str]) -> Daemon {
    let mut all = vec!["--firecracker", binary.to_str().unwrap()];
    all.extend_from_slice(args);
    let daemon = Daemon::start(&[], &all);
    let memory = testkit::write_snapshot(&daemon.scratch().join("memory"), 1 << 20, 5, 0, 0);
    let vmstate = daemon.scratch().join("vmstate");
    std::fs::write(&vmstate, b"device state").unwrap();
    add_bundle(&daemon, "base", &memory, &vmstate);
    daemon
}

/// A stand-in hypervisor: a shell script in `dir` that runs `body`.
fn script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-firecracker");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `pagerctl vm rm ID`, which must succeed: the VM and its directory are gone. Returns the VM
/// as it was.
fn delete(daemon: &Daemon, id: &str) -> VmInfo {
    let deleted: VmInfo = ctl_json(daemon, &["vm", "rm", id]);
    assert_eq!(deleted.id.as_str(), id);
    assert!(!daemon.state_dir().join("vms").join(id).exists());
    let missing = daemon.pagerctl(&["vm", "get", id]);
    assert_eq!(missing.code, exit(ErrorCode::NotFound), "{missing:?}");
    deleted
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

#[test]
fn a_hypervisor_that_exits_at_once_is_reported_with_its_exit_code_and_last_output() {
    let dir = tempfile::tempdir().unwrap();
    let binary = script(
        dir.path(),
        "echo 'Firecracker v0 starting'; echo 'Error: KVM is not usable here' >&2; exit 3",
    );
    let daemon = daemon_with_hypervisor(&binary, &[]);
    let refused = daemon.pagerctl(&["vm", "start", "base", "--id", "a"]);
    assert_eq!(refused.code, exit(ErrorCode::Internal), "{refused:?}");
    let last = "Firecracker v0 starting\nError: KVM is not usable here";
    assert!(
        refused
            .stderr
            .contains("the process ended before its API socket")
            && refused.stderr.contains(&format!(
                "the hypervisor exited with code 3; its last output:\n{last}"
            )),
        "the cause, not a timeout: {refused:?}"
    );
    let vm: VmInfo = ctl_json(&daemon, &["vm", "get", "a"]);
    assert_eq!(vm.state, VmState::Failed);
    assert_eq!((vm.exit_code, vm.exit_signal), (Some(3), None), "{vm:?}");
    assert_eq!(vm.last_output.as_deref(), Some(last));
    assert!(
        vm.reason.as_deref().is_some_and(|r| r.ends_with(last)),
        "{vm:?}"
    );
    let fork = daemon.pagerctl(&["fork", "get", "a"]);
    assert_eq!(
        fork.code,
        exit(ErrorCode::NotFound),
        "its fork went: {fork:?}"
    );

    // Deleted, its id is free: the same start fails the same way, not as a taken id.
    assert_eq!(delete(&daemon, "a").state, VmState::Failed);
    let again = daemon.pagerctl(&["vm", "start", "base", "--id", "a"]);
    assert_eq!(again.code, exit(ErrorCode::Internal), "{again:?}");
    assert!(again.stderr.contains("exited with code 3"), "{again:?}");
    let rm = daemon.pagerctl(&["vm", "rm", "a", "nope"]);
    assert_eq!(rm.code, exit(ErrorCode::NotFound), "{rm:?}");
    assert!(rm.stdout.contains("deleted a"), "{rm:?}");
    assert!(rm.stderr.contains("no VM `nope`"), "{rm:?}");
    assert!(!daemon.state_dir().join("vms/a").exists());
}

#[test]
fn a_missing_hypervisor_binary_is_unavailable_and_names_the_daemon_option() {
    let daemon = daemon_with_hypervisor(std::path::Path::new("/nonexistent/firecracker"), &[]);
    let refused = daemon.pagerctl(&["vm", "start", "base", "--id", "a"]);
    assert_eq!(refused.code, exit(ErrorCode::Unavailable), "{refused:?}");
    assert!(
        refused.stderr.contains(
            "no firecracker binary at /nonexistent/firecracker, which pagerd's daemon option \
             --firecracker names"
        ),
        "{refused:?}"
    );
    let vms: Vec<VmInfo> = ctl_json(&daemon, &["vm", "ls"]);
    assert!(vms.is_empty(), "nothing was started: {vms:?}");
    wait_until("the daemon to log the missing binary", DEADLINE, || {
        daemon.log().contains("no hypervisor binary")
    });
}

#[test]
fn ended_vm_records_are_deleted_once_past_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let binary = script(dir.path(), "exit 3");
    let daemon = daemon_with_hypervisor(&binary, &["--vm-retention", "1s"]);
    let refused = daemon.pagerctl(&["vm", "start", "base", "--id", "short-lived"]);
    assert_eq!(refused.code, exit(ErrorCode::Internal), "{refused:?}");
    wait_until("the failed VM's record to go", DEADLINE, || {
        daemon.pagerctl(&["vm", "get", "short-lived"]).code == exit(ErrorCode::NotFound)
    });
    assert!(!daemon.state_dir().join("vms/short-lived").exists());
    wait_until("the daemon to log the deletion", DEADLINE, || {
        daemon
            .log()
            .contains("VM record past --vm-retention deleted")
    });
}

#[test]
fn a_corrupt_vmstate_is_the_callers_bad_input_and_firecrackers_words_are_kept() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_corrupt_vmstate_is_the_callers_bad_input_and_firecrackers_words_are_kept";
    let Some((daemon, fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let mut vmstate = std::fs::read(&fixture.vmstate).unwrap();
    vmstate.truncate(vmstate.len() / 2);
    let corrupt = daemon.scratch().join("corrupt-vmstate");
    std::fs::write(&corrupt, &vmstate).unwrap();
    add_bundle(&daemon, "corrupt", &fixture.memory, &corrupt);
    let refused = daemon.pagerctl(&["vm", "start", "corrupt", "--id", "bad"]);
    assert_eq!(
        refused.code,
        exit(ErrorCode::InvalidArgument),
        "{refused:?}"
    );
    assert!(
        refused.stderr.contains("PUT /snapshot/load answered 400"),
        "{refused:?}"
    );
    let vm: VmInfo = ctl_json(&daemon, &["vm", "get", "bad"]);
    assert_eq!(vm.state, VmState::Failed);
    assert_eq!(
        vm.exit_code,
        Some(1),
        "Firecracker exits after a refused load: {vm:?}"
    );
    let console = std::fs::read_to_string(&vm.console_log).unwrap();
    let output = vm.last_output.clone().expect("Firecracker said why");
    assert!(
        console.trim_end().ends_with(&output),
        "the end of {console:?} is {output:?}"
    );
    assert!(
        vm.reason.as_deref().is_some_and(|r| r.ends_with(&output)),
        "{vm:?}"
    );
    assert_eq!(delete(&daemon, "bad").state, VmState::Failed);
}

#[test]
fn a_running_vm_cannot_be_deleted_and_an_exited_one_frees_its_id() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_running_vm_cannot_be_deleted_and_an_exited_one_frees_its_id";
    let Some((daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let first = start_vm(&daemon, "base", "again", VmBackend::Uffd);
    wait_ok(&first, 1);
    let refused = daemon.pagerctl(&["vm", "rm", "again"]);
    assert_eq!(refused.code, exit(ErrorCode::Conflict), "{refused:?}");
    assert!(refused.stderr.contains("stop it first"), "{refused:?}");
    let still: VmInfo = ctl_json(&daemon, &["vm", "get", "again"]);
    assert_eq!(still.state, VmState::Running);
    stop(&daemon, "again");
    let taken = daemon.pagerctl(&["vm", "start", "base", "--id", "again"]);
    assert_eq!(
        taken.code,
        exit(ErrorCode::Conflict),
        "an exited VM keeps its id: {taken:?}"
    );
    assert_eq!(delete(&daemon, "again").state, VmState::Exited);
    let second = start_vm(&daemon, "base", "again", VmBackend::Uffd);
    assert_ne!(second.pid, first.pid);
    wait_ok(&second, 1);
    assert_eq!(
        count(&second.console_log, "READY"),
        0,
        "a fresh console log"
    );
    stop(&daemon, "again");
}

#[test]
fn a_group_member_cannot_delete_a_vm_it_does_not_own() {
    let tenants = testkit::tenants::tenants();
    let dir = tempfile::tempdir().unwrap();
    let binary = script(dir.path(), "exit 3");
    let daemon = daemon_with_hypervisor(&binary, &["--group", testkit::tenants::GROUP]);
    let failed = daemon.pagerctl(&["vm", "start", "base", "--id", "roots"]);
    assert_eq!(failed.code, exit(ErrorCode::Internal), "{failed:?}");
    let refused = tenants.member.pagerctl(&daemon, &["vm", "rm", "roots"]);
    assert_eq!(
        refused.code,
        exit(ErrorCode::PermissionDenied),
        "{refused:?}"
    );
    assert!(refused.stderr.contains("belongs to uid 0"), "{refused:?}");
    let kept: VmInfo = ctl_json(&daemon, &["vm", "get", "roots"]);
    assert_eq!(kept.state, VmState::Failed);
    assert!(daemon.state_dir().join("vms/roots/vm.json").exists());
    assert_eq!(delete(&daemon, "roots").owner, 0);
}
