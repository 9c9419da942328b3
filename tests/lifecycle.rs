//! Snapshot and fork lifecycle over the control socket and through `pagerctl`: reference
//! counts derived from fork records, deletes refused while forks live, deferred deletes, and
//! counts that fail closed when a record cannot be read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use proto::control::{
    request_line, ControlError, ErrorCode, ForkCreate, ForkGet, Request, SnapshotDelete,
    SnapshotGet, SnapshotRegister,
};
use proto::model::{DeleteOutcome, EndReason, ForkInfo, ForkState, ImportMethod, SnapshotInfo};
use serde_json::Value;
use testkit::{id, wait_until, write_snapshot, Daemon, SmallTmpfs, DEADLINE};

const MIB: u64 = 1 << 20;

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn snapshot_get(snapshot: &str) -> SnapshotGet {
    SnapshotGet {
        snapshot: id(snapshot),
    }
}

fn snapshot_delete(snapshot: &str, defer: bool) -> SnapshotDelete {
    SnapshotDelete {
        snapshot: id(snapshot),
        defer,
        force: false,
    }
}

fn register(snapshot: &str, path: impl Into<PathBuf>) -> SnapshotRegister {
    SnapshotRegister {
        snapshot: id(snapshot),
        path: Some(path.into()),
        fd: false,
        link: false,
        vmstate: None,
        vmm: None,
    }
}

/// `pagerctl --json`'s answer to a refused request.
#[derive(Debug, serde::Deserialize)]
struct CtlError {
    error: ControlError,
}

#[test]
fn full_lifecycle_through_pagerctl_and_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 21, 4, MIB);
    let daemon = Daemon::start(&[], &[]);

    let run = daemon.pagerctl(&["--json", "snapshot", "add", "base", mem.to_str().unwrap()]);
    assert!(run.success(), "{run:?}");
    let info: SnapshotInfo = run.json();
    assert_eq!(info.size, Some(8 * MIB));
    assert_eq!(info.ref_count, Some(0));
    assert!(!info.delete_pending);
    assert_ne!(
        info.import,
        Some(ImportMethod::Hardlink),
        "copied (or cloned) by default"
    );
    let stored = daemon.state_dir().join("snapshots/base/memory");
    assert_eq!(info.path, stored);
    // pagerctl prints what the daemon reports, and the import it reports is what happened to
    // the file: a hardlink shares the source's inode, a copy or reflink does not.
    assert_eq!(daemon.snapshot("base"), info);
    let same_inode =
        std::fs::metadata(&stored).unwrap().ino() == std::fs::metadata(&mem).unwrap().ino();
    match info.import {
        Some(ImportMethod::Hardlink) => assert!(same_inode, "{info:?}"),
        Some(ImportMethod::Copy | ImportMethod::Reflink) => assert!(!same_inode, "{info:?}"),
        None => panic!("no import method reported: {info:?}"),
    }
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&mem).unwrap()
    );

    let mut vmms = Vec::new();
    for fork in ["a", "b", "c"] {
        vmms.push(daemon.attach_holding_vmm("base", fork, &mem));
    }
    let info = daemon.snapshot("base");
    assert_eq!(info.ref_count, Some(3));
    assert_eq!(info.forks, Some(vec![id("a"), id("b"), id("c")]));
    assert_eq!(
        dir_names(&daemon.state_dir().join("forks")),
        ["a.json", "b.json", "c.json"]
    );
    let run = daemon.pagerctl(&["--json", "snapshot", "get", "base"]);
    assert!(run.success(), "{run:?}");
    assert_eq!(run.json::<SnapshotInfo>().ref_count, Some(3));
    let run = daemon.pagerctl(&["--json", "fork", "get", "b"]);
    assert!(run.success(), "{run:?}");
    let fork: ForkInfo = run.json();
    assert_eq!((fork.id, fork.state), (id("b"), ForkState::Serving));

    // Delete is refused, naming the forks, through both clients.
    let err = daemon.refusal(snapshot_delete("base", false));
    assert_eq!(err.code, ErrorCode::Conflict);
    for fork in ["a", "b", "c"] {
        assert!(err.message.contains(fork), "{}", err.message);
    }
    let run = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert_eq!(run.code, Some(4), "a conflict exits with 4: {run:?}");
    assert!(
        run.stderr.contains("conflict") && run.stderr.contains("a, b, c"),
        "{run:?}"
    );
    let run = daemon.pagerctl(&["--json", "snapshot", "rm", "base"]);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert_eq!(run.json::<CtlError>().error, err);

    // Close them one by one, watching the count fall.
    for (fork, left) in [("a", 2), ("b", 1), ("c", 0)] {
        let run = daemon.pagerctl(&["fork", "close", fork]);
        assert!(run.success(), "{run:?}");
        assert_eq!(run.stdout.trim(), format!("closed {fork}"));
        assert_eq!(daemon.ref_count("base"), Some(left));
    }
    for vmm in vmms {
        vmm.kill();
    }

    let run = daemon.pagerctl(&["snapshot", "rm", "base"]);
    assert!(run.success(), "{run:?}");
    assert_eq!(run.stdout.trim(), "deleted base");
    assert_eq!(daemon.error_code(snapshot_get("base")), ErrorCode::NotFound);
    let run = daemon.pagerctl(&["snapshot", "get", "base"]);
    assert_eq!(run.code, Some(3), "not found exits with 3: {run:?}");
    assert!(!daemon.state_dir().join("snapshots/base").exists());
    assert!(dir_names(&daemon.state_dir().join("snapshots")).is_empty());
    assert!(dir_names(&daemon.state_dir().join("forks")).is_empty());
    assert!(dir_names(&daemon.state_dir().join("sockets")).is_empty());
}

#[test]
fn a_fork_whose_vmm_exits_releases_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 22, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let vmm = daemon.attach_holding_vmm("base", "brief", &mem);
    assert_eq!(daemon.ref_count("base"), Some(1));
    vmm.finish();
    assert_eq!(
        daemon.wait_fork("brief", ForkState::Ended).end_reason,
        Some(EndReason::VmmExited)
    );
    wait_until("the ended fork's record to go", DEADLINE, || {
        daemon.ref_count("base") == Some(0)
    });
    // The ended fork stays visible, with its counters, until it is closed.
    assert!(daemon.fork("brief").stats.faults > 0);
    daemon.delete_snapshot("base", false);
}

#[test]
fn deferred_delete_waits_for_the_last_fork_and_allows_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 23, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let first = daemon.attach_holding_vmm("base", "first", &mem);
    let second = daemon.attach_holding_vmm("base", "second", &mem);

    let outcome = daemon.delete_snapshot("base", true);
    assert_eq!(
        outcome,
        DeleteOutcome {
            id: id("base"),
            deleted: false,
            pending: true,
            forks: vec![id("first"), id("second")],
            file_users: vec![],
        }
    );
    assert!(daemon.snapshot("base").delete_pending);
    let err = daemon.refusal(ForkCreate {
        snapshot: id("base"),
        fork: Some(id("late")),
        prefetch: None,
    });
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");

    // The first VMM exits: one reference left, the snapshot stays.
    first.finish();
    daemon.wait_fork("first", ForkState::Ended);
    wait_until("the first fork's reference to go", DEADLINE, || {
        daemon.ref_count("base") == Some(1)
    });
    assert!(daemon.state_dir().join("snapshots/base/memory").exists());
    // The second fork is closed while its VMM still runs: that was the last reference.
    daemon.close_fork("second");
    assert_eq!(daemon.error_code(snapshot_get("base")), ErrorCode::NotFound);
    assert!(!daemon.state_dir().join("snapshots/base").exists());
    second.kill();
}

#[test]
fn deferred_delete_finishes_at_restart_when_the_vmm_died_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 24, 0, 0);
    let mut daemon = Daemon::start(&[], &[]);
    daemon.register_snapshot("base", &mem);
    daemon.register_snapshot("kept", &mem);
    let vmm = daemon.attach_holding_vmm("base", "gone", &mem);
    let alive = daemon.attach_holding_vmm("kept", "alive", &mem);
    daemon.create_fork("kept", "idle");
    daemon.delete_snapshot("base", true);

    daemon.sigkill();
    vmm.kill();
    daemon.respawn();
    // Its VMM is gone: reaped, and the deferred delete is done.
    assert_eq!(
        daemon.error_code(ForkGet { fork: id("gone") }),
        ErrorCode::NotFound
    );
    assert_eq!(daemon.error_code(snapshot_get("base")), ErrorCode::NotFound);
    assert!(!daemon.state_dir().join("forks/gone.json").exists());
    // Its VMM outlived the daemon: its uffd was taken back, it is served again and still a
    // reference.
    let recovered = daemon.fork("alive");
    assert_eq!(recovered.state, ForkState::Serving, "{recovered:?}");
    assert_eq!(recovered.recovered, 1);
    assert_eq!(recovered.vmm_pid, Some(i32::try_from(alive.pid()).unwrap()));
    // It never had a VMM: waiting again, on a fresh socket.
    let idle = daemon.fork("idle");
    assert_eq!(idle.state, ForkState::Waiting);
    assert!(idle.handoff_socket.exists());
    assert_eq!(daemon.ref_count("kept"), Some(2));
    assert_eq!(
        daemon.error_code(snapshot_delete("kept", false)),
        ErrorCode::Conflict
    );
    alive.kill();
}

#[test]
fn an_unreadable_fork_record_makes_deletes_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 25, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem), ("other", &mem)], &[]);
    daemon.create_fork("base", "good");
    let broken = daemon.state_dir().join("forks/broken.json");
    std::fs::write(&broken, br#"{"id":"broken","snapshot":"oth"#).unwrap();

    for snapshot in ["base", "other"] {
        let err = daemon.refusal(snapshot_delete(snapshot, false));
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.message.contains(broken.to_str().unwrap()),
            "{}",
            err.message
        );
        let info = daemon.snapshot(snapshot);
        assert_eq!(info.ref_count, None, "counts are unknown: {info:?}");
        assert_eq!(info.unreadable_fork_records, std::slice::from_ref(&broken));
    }
    assert_eq!(daemon.snapshots().len(), 2);
    assert!(!daemon.status().healthy);

    // A restart keeps the record and keeps failing closed; so does a deferred delete.
    daemon.respawn();
    assert!(broken.exists());
    let err = daemon.refusal(snapshot_delete("other", true));
    assert_eq!(err.code, ErrorCode::Internal);

    std::fs::remove_file(&broken).unwrap();
    assert!(daemon.delete_snapshot("other", false).deleted);
    assert_eq!(daemon.ref_count("base"), Some(1));
}

/// `request` as a line, with `field` set to `value` by hand: what a typed client cannot send.
fn tampered(request: impl Into<Request>, field: &str, value: Value) -> String {
    let mut line: Value =
        serde_json::from_str(&request_line(&Value::from(1), &request.into())).unwrap();
    line[field] = value;
    line.to_string()
}

#[test]
fn registration_checks_its_path_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MIB, 26, 0, 0);
    std::fs::write(dir.path().join("odd"), vec![1u8; 5000]).unwrap();
    let daemon = Daemon::start(&[], &[]);
    let paths = [
        PathBuf::from("relative/mem"),
        dir.path().join("missing"),
        dir.path().to_owned(),
        dir.path().join("odd"),
    ];
    for path in paths {
        assert_eq!(
            daemon.error_code(register("s", &path)),
            ErrorCode::InvalidArgument,
            "{path:?}"
        );
    }
    // An id and a field no typed client can send, by hand.
    let hostile = [
        tampered(register("s", &mem), "snapshot", Value::from("../../etc")),
        tampered(register("s", &mem), "extra", Value::from(1)),
    ];
    for line in hostile {
        let refusal = daemon.raw_response(&line).into_result().unwrap_err();
        assert_eq!(refusal.code, ErrorCode::InvalidArgument, "{line}");
    }
    daemon.register_snapshot("s", &mem);
    assert_eq!(daemon.error_code(register("s", &mem)), ErrorCode::Conflict);
    assert_eq!(
        daemon.error_code(ForkCreate {
            snapshot: id("nope"),
            fork: None,
            prefetch: None,
        }),
        ErrorCode::NotFound
    );
    let generated: ForkInfo = daemon.call(ForkCreate {
        snapshot: id("s"),
        fork: None,
        prefetch: None,
    });
    assert!(generated.id.as_str().starts_with("fork-"));
    assert_eq!(dir_names(&daemon.state_dir().join("snapshots")), ["s"]);
}

#[test]
fn a_full_disk_refuses_the_registration_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = write_snapshot(&dir.path().join("small"), 256 * 1024, 27, 0, 0);
    let big = write_snapshot(&dir.path().join("big"), 4 * MIB, 28, 0, 0);
    let disk = SmallTmpfs::mount("1m");
    let state = disk.path().join("state");
    let control = dir.path().join("control.sock");
    let daemon = Daemon::start_with_state(&state, &control);

    // On another filesystem: copied, and it fits.
    let info = daemon.register_snapshot("small", &small);
    assert_ne!(info.import, Some(ImportMethod::Hardlink));
    let vmm = daemon.attach_holding_vmm("small", "vm", &small);

    let err = daemon.refusal(register("big", &big));
    assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
    assert!(
        err.message.to_lowercase().contains("space"),
        "{}",
        err.message
    );
    assert_eq!(
        dir_names(&state.join("snapshots")),
        ["small"],
        "nothing half-written is left"
    );
    assert_eq!(daemon.error_code(snapshot_get("big")), ErrorCode::NotFound);
    assert_eq!(daemon.ref_count("small"), Some(1));
    vmm.finish();
    assert_eq!(daemon.wait_fork("vm", ForkState::Ended).stats.errors, 0);
    drop(daemon);
}
