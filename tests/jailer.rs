//! Firecracker clones launched through its jailer (`pagerd --jailer`): each chrooted under
//! `STATE/jail`, running as a uid of its own from `--jail-uids` and as `--group`, with its
//! vmstate and memory (handoff socket or memory file) hard-linked into the chroot. Every
//! clone's guest checks the 8 MiB it filled before the snapshot and prints `OK` on its console
//! (kept outside the chroot). Skipped (and counted) where Firecracker, its jailer, `/dev/kvm`
//! or `cc` is missing.

use std::path::Path;

use proto::model::{ForkState, SnapshotInfo, VmInfo, VmState};
use testkit::firecracker::{self, count, wait_ok, Fixture, VmReaper};
use testkit::tenants::{tenants, GROUP};
use testkit::{skip, wait_until, Daemon, DEADLINE};

/// A daemon launching jailed Firecracker VMs, with the fixture registered as `base`.
fn setup(test: &str) -> Option<(Daemon, Fixture)> {
    let fixture = match firecracker::fixture() {
        Ok(fixture) => fixture,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let (jailer, binary) = match firecracker::jailer() {
        Ok(found) => found,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    tenants();
    let daemon = Daemon::start(
        &[],
        &[
            "--firecracker",
            binary.to_str().unwrap(),
            "--jailer",
            jailer.to_str().unwrap(),
            "--group",
            GROUP,
        ],
    );
    ctl_json::<SnapshotInfo>(
        &daemon,
        &[
            "snapshot",
            "add",
            "base",
            fixture.memory.to_str().unwrap(),
            "--vmstate",
            fixture.vmstate.to_str().unwrap(),
            "--vmm",
            "firecracker",
        ],
    );
    Some((daemon, fixture))
}

/// Runs `pagerctl --json ARGS`, which must succeed, and decodes its answer.
fn ctl_json<T: serde::de::DeserializeOwned>(daemon: &Daemon, args: &[&str]) -> T {
    daemon.pagerctl_json(args)
}

/// A `Uid:`/`Gid:` line of `/proc/PID/status`: real, effective, saved, filesystem.
fn ids(pid: i32, field: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Checks that `vm` runs jailed: as its uid and the group, in its chroot.
fn assert_jailed(vm: &VmInfo) {
    let jail = vm.jail.as_ref().expect("a jailed VM says so");
    let pid = vm.pid.expect("a pid");
    assert_eq!(ids(pid, "Uid:"), [jail.uid; 4], "VM {}", vm.id);
    assert_eq!(ids(pid, "Gid:"), [tenants().gid; 4], "VM {}", vm.id);
    assert_ne!(jail.uid, 0);
    // Its root (pivoted to, in a mount namespace of its own) is the jail's directory.
    use std::os::unix::fs::MetadataExt;
    let seen = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let root = std::fs::metadata(&jail.root).unwrap();
    assert_eq!(
        (seen.dev(), seen.ino()),
        (root.dev(), root.ino()),
        "VM {} is chrooted",
        vm.id
    );
    assert!(Path::new(&format!("/proc/{pid}/root/vmstate")).exists());
    assert!(vm.api_socket.starts_with(&jail.root));
    assert!(
        !vm.console_log.starts_with(&jail.root),
        "the console stays outside"
    );
}

#[test]
fn jailed_clones_check_their_memory_survive_a_restart_and_snapshot() {
    let test = "jailed_clones_check_their_memory_survive_a_restart_and_snapshot";
    let Some((mut daemon, _fixture)) = setup(test) else {
        return;
    };
    let _reaper = VmReaper::new(&daemon.state_dir());
    let start = |daemon: &Daemon, snapshot: &str, id: &str, backend: &str| -> VmInfo {
        let vm: VmInfo = ctl_json(
            daemon,
            &["vm", "start", snapshot, "--id", id, "--backend", backend],
        );
        assert_eq!(vm.state, VmState::Running, "{vm:?}");
        vm
    };
    let a = start(&daemon, "base", "a", "uffd");
    let b = start(&daemon, "base", "b", "file");
    for vm in [&a, &b] {
        wait_ok(vm, 1);
        assert_jailed(vm);
    }
    assert_ne!(a.jail.as_ref().unwrap().uid, b.jail.as_ref().unwrap().uid);

    // pagerd is SIGKILLed and started again: it takes the jailed VMM's uffd back.
    daemon.sigkill();
    daemon.respawn();
    let fork = daemon.fork("a");
    assert_eq!(
        (fork.state, fork.recovered),
        (ForkState::Serving, 1),
        "{fork:?}"
    );
    let passes = count(&a.console_log, "OK");
    wait_ok(&a, passes + 2);

    // A snapshot of the jailed clone is a new parent; its own jailed clone checks its memory.
    let child: SnapshotInfo =
        ctl_json(&daemon, &["vm", "snapshot", "a", "--id", "a-1", "--resume"]);
    assert!(child.vmstate.is_some());
    let c = start(&daemon, "a-1", "c", "uffd");
    wait_ok(&c, 1);
    assert_jailed(&c);

    // Stopped, each VM's jail is gone; nothing else of the snapshot is.
    for vm in [&a, &b, &c] {
        let stopped: VmInfo = ctl_json(
            &daemon,
            &["vm", "stop", vm.id.as_str(), "--timeout-ms", "5000"],
        );
        assert_eq!(stopped.state, VmState::Exited);
        let dir = vm.jail.as_ref().unwrap().root.parent().unwrap().to_owned();
        // (Removed by whoever follows the VM's end: the supervisor, just after.)
        wait_until(
            &format!("{} to be removed", dir.display()),
            DEADLINE,
            || !Path::new(&dir).exists(),
        );
    }
    assert!(daemon.snapshot("base").path.exists());
}
