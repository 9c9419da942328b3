//! Snapshot and fork lifecycle over the control socket and through `ctl`: reference counts
//! derived from fork records, deletes refused while forks live, deferred deletes, and counts
//! that fail closed when a record cannot be read.

use std::path::Path;

use serde_json::{json, Value};
use testkit::{wait_until, write_snapshot, Daemon, DEADLINE};

const MIB: u64 = 1 << 20;

fn ref_count(daemon: &Daemon, snapshot: &str) -> Value {
    daemon
        .request("snapshot.get", json!({"snapshot": snapshot}))
        .unwrap()["ref_count"]
        .clone()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn full_lifecycle_through_ctl_and_the_raw_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 21, 4, MIB);
    let daemon = Daemon::start(&[], &[]);

    let (ok, out, err) = daemon.ctl(&["--json", "snapshot", "add", "base", mem.to_str().unwrap()]);
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["size"], 8 * MIB);
    assert_eq!(info["ref_count"], 0);
    assert_ne!(info["import"], "hardlink", "copied (or cloned) by default");
    let stored = daemon.state_dir().join("snapshots/base/memory");
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&mem).unwrap()
    );

    let mut vmms = Vec::new();
    for fork in ["a", "b", "c"] {
        vmms.push(daemon.attach_holding_vmm("base", fork, &mem));
    }
    let info = daemon
        .request("snapshot.get", json!({"snapshot": "base"}))
        .unwrap();
    assert_eq!(info["ref_count"], 3);
    assert_eq!(info["forks"], json!(["a", "b", "c"]));
    assert_eq!(
        dir_names(&daemon.state_dir().join("forks")),
        ["a.json", "b.json", "c.json"]
    );

    // Delete is refused, naming the forks, through both clients.
    let err = daemon
        .request("snapshot.delete", json!({"snapshot": "base"}))
        .unwrap_err();
    assert_eq!(err.code, "conflict");
    for fork in ["a", "b", "c"] {
        assert!(err.message.contains(fork), "{}", err.message);
    }
    let (ok, _, stderr) = daemon.ctl(&["snapshot", "rm", "base"]);
    assert!(!ok);
    assert!(
        stderr.contains("conflict") && stderr.contains("a, b, c"),
        "{stderr}"
    );

    // Close them one by one, watching the count fall.
    for (fork, left) in [("a", 2), ("b", 1), ("c", 0)] {
        let (ok, out, err) = daemon.ctl(&["fork", "close", fork]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), format!("closed {fork}"));
        assert_eq!(ref_count(&daemon, "base"), left);
    }
    for vmm in vmms {
        vmm.kill();
    }

    let (ok, out, err) = daemon.ctl(&["snapshot", "rm", "base"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deleted base");
    assert_eq!(
        daemon.error_code("snapshot.get", json!({"snapshot": "base"})),
        "not_found"
    );
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
    assert_eq!(ref_count(&daemon, "base"), 1);
    vmm.finish();
    assert_eq!(
        daemon.wait_fork("brief", "ended")["end_reason"],
        "vmm_exited"
    );
    wait_until("the ended fork's record to go", DEADLINE, || {
        ref_count(&daemon, "base") == 0
    });
    // The ended fork stays visible, with its counters, until it is closed.
    assert!(daemon.fork("brief")["stats"]["faults"].as_u64().unwrap() > 0);
    daemon
        .request("snapshot.delete", json!({"snapshot": "base"}))
        .unwrap();
}

#[test]
fn deferred_delete_waits_for_the_last_fork_and_allows_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 23, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let first = daemon.attach_holding_vmm("base", "first", &mem);
    let second = daemon.attach_holding_vmm("base", "second", &mem);

    let outcome = daemon
        .request(
            "snapshot.delete",
            json!({"snapshot": "base", "defer": true}),
        )
        .unwrap();
    assert_eq!(
        outcome,
        json!({"id": "base", "deleted": false, "pending": true, "forks": ["first", "second"], "file_users": []})
    );
    let info = daemon
        .request("snapshot.get", json!({"snapshot": "base"}))
        .unwrap();
    assert_eq!(info["delete_pending"], true);
    let err = daemon
        .request("fork.create", json!({"snapshot": "base", "fork": "late"}))
        .unwrap_err();
    assert_eq!(err.code, "conflict", "{err:?}");

    // The first VMM exits: one reference left, the snapshot stays.
    first.finish();
    daemon.wait_fork("first", "ended");
    wait_until("the first fork's reference to go", DEADLINE, || {
        ref_count(&daemon, "base") == 1
    });
    assert!(daemon.state_dir().join("snapshots/base/memory").exists());
    // The second fork is closed while its VMM still runs: that was the last reference.
    daemon
        .request("fork.close", json!({"fork": "second"}))
        .unwrap();
    assert_eq!(
        daemon.error_code("snapshot.get", json!({"snapshot": "base"})),
        "not_found"
    );
    assert!(!daemon.state_dir().join("snapshots/base").exists());
    second.kill();
}

#[test]
fn deferred_delete_finishes_at_restart_when_the_vmm_died_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 24, 0, 0);
    let mut daemon = Daemon::start(&[], &[]);
    daemon
        .request(
            "snapshot.register",
            json!({"snapshot": "base", "path": mem}),
        )
        .unwrap();
    daemon
        .request(
            "snapshot.register",
            json!({"snapshot": "kept", "path": mem}),
        )
        .unwrap();
    let vmm = daemon.attach_holding_vmm("base", "gone", &mem);
    let alive = daemon.attach_holding_vmm("kept", "alive", &mem);
    daemon.create_fork("kept", "idle");
    daemon
        .request(
            "snapshot.delete",
            json!({"snapshot": "base", "defer": true}),
        )
        .unwrap();

    daemon.sigkill();
    vmm.kill();
    daemon.respawn();
    // Its VMM is gone: reaped, and the deferred delete is done.
    assert_eq!(
        daemon.error_code("fork.get", json!({"fork": "gone"})),
        "not_found"
    );
    assert_eq!(
        daemon.error_code("snapshot.get", json!({"snapshot": "base"})),
        "not_found"
    );
    assert!(!daemon.state_dir().join("forks/gone.json").exists());
    // Its VMM outlived the daemon: detached, still a reference.
    assert_eq!(daemon.fork("alive")["state"], "detached");
    assert_eq!(daemon.fork("alive")["vmm_pid"], alive.pid());
    // It never had a VMM: waiting again, on a fresh socket.
    let idle = daemon.fork("idle");
    assert_eq!(idle["state"], "waiting");
    assert!(Path::new(idle["handoff_socket"].as_str().unwrap()).exists());
    assert_eq!(ref_count(&daemon, "kept"), 2);
    assert_eq!(
        daemon.error_code("snapshot.delete", json!({"snapshot": "kept"})),
        "conflict"
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
        let err = daemon
            .request("snapshot.delete", json!({"snapshot": snapshot}))
            .unwrap_err();
        assert_eq!(err.code, "internal");
        assert!(
            err.message.contains(broken.to_str().unwrap()),
            "{}",
            err.message
        );
        let info = daemon
            .request("snapshot.get", json!({"snapshot": snapshot}))
            .unwrap();
        assert_eq!(info["ref_count"], Value::Null, "counts are unknown: {info}");
        assert_eq!(info["unreadable_fork_records"], json!([broken]));
    }
    assert_eq!(
        daemon
            .request("snapshot.list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let status = daemon.request("status", Value::Null).unwrap();
    assert_eq!(status["healthy"], false);

    // A restart keeps the record and keeps failing closed; so does a deferred delete.
    daemon.respawn();
    assert!(broken.exists());
    let err = daemon
        .request(
            "snapshot.delete",
            json!({"snapshot": "other", "defer": true}),
        )
        .unwrap_err();
    assert_eq!(err.code, "internal");

    std::fs::remove_file(&broken).unwrap();
    assert_eq!(
        daemon
            .request("snapshot.delete", json!({"snapshot": "other"}))
            .unwrap()["deleted"],
        true
    );
    assert_eq!(ref_count(&daemon, "base"), 1);
}

#[test]
fn registration_checks_its_path_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MIB, 26, 0, 0);
    std::fs::write(dir.path().join("odd"), vec![1u8; 5000]).unwrap();
    let daemon = Daemon::start(&[], &[]);
    let cases = [
        (
            json!({"snapshot": "s", "path": "relative/mem"}),
            "invalid_argument",
        ),
        (
            json!({"snapshot": "s", "path": dir.path().join("missing")}),
            "invalid_argument",
        ),
        (
            json!({"snapshot": "s", "path": dir.path()}),
            "invalid_argument",
        ),
        (
            json!({"snapshot": "s", "path": dir.path().join("odd")}),
            "invalid_argument",
        ),
        (
            json!({"snapshot": "../../etc", "path": mem}),
            "invalid_argument",
        ),
        (
            json!({"snapshot": "s", "path": mem, "extra": 1}),
            "invalid_argument",
        ),
    ];
    for (args, code) in cases {
        assert_eq!(
            daemon
                .request("snapshot.register", args.clone())
                .unwrap_err()
                .code,
            code,
            "{args}"
        );
    }
    daemon
        .request("snapshot.register", json!({"snapshot": "s", "path": mem}))
        .unwrap();
    assert_eq!(
        daemon.error_code("snapshot.register", json!({"snapshot": "s", "path": mem})),
        "conflict"
    );
    assert_eq!(
        daemon.error_code("fork.create", json!({"snapshot": "nope"})),
        "not_found"
    );
    let generated = daemon
        .request("fork.create", json!({"snapshot": "s"}))
        .unwrap();
    assert!(generated["id"].as_str().unwrap().starts_with("fork-"));
    assert_eq!(dir_names(&daemon.state_dir().join("snapshots")), ["s"]);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_refuses_the_registration_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = write_snapshot(&dir.path().join("small"), 256 * 1024, 27, 0, 0);
    let big = write_snapshot(&dir.path().join("big"), 4 * MIB, 28, 0, 0);
    let disk = SmallTmpfs::mount("1m");
    let state = disk.0.path().join("state");
    let control = dir.path().join("control.sock");
    let daemon = Daemon::start_with_state(&state, &control);

    // On another filesystem: copied, and it fits.
    let info = daemon
        .request(
            "snapshot.register",
            json!({"snapshot": "small", "path": small}),
        )
        .unwrap();
    assert_ne!(info["import"], "hardlink");
    let vmm = daemon.attach_holding_vmm("small", "vm", &small);

    let err = daemon
        .request("snapshot.register", json!({"snapshot": "big", "path": big}))
        .unwrap_err();
    assert_eq!(err.code, "unavailable", "{err:?}");
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
    assert_eq!(
        daemon.error_code("snapshot.get", json!({"snapshot": "big"})),
        "not_found"
    );
    assert_eq!(ref_count(&daemon, "small"), 1);
    vmm.finish();
    assert_eq!(daemon.wait_fork("vm", "ended")["stats"]["errors"], 0);
    drop(daemon);
}
