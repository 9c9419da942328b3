//! Backups that restore: `snapshot export` writes a snapshot (memory, device state, working
//! set, digests) to a directory, and `snapshot import` registers it, on the same daemon or
//! another state directory, only if every file matches its digest.

use std::os::unix::fs::FileExt;

use proto::control::{ErrorCode, SnapshotExport, SnapshotImport};
use proto::model::SnapshotInfo;
use serde_json::Value;
use testkit::{id, write_snapshot, Daemon, Vmm};

const SIZE: u64 = 8 << 20;

/// A fork of `snapshot` on `daemon` whose VMM checks every byte against `mem`.
fn verify_fork(daemon: &Daemon, snapshot: &str, fork: &str, mem: &std::path::Path) {
    let socket = daemon.create_fork(snapshot, fork);
    let mut vmm = Vmm::attach(mem, &socket, &["verify"]);
    let verified = vmm.expect("verified");
    assert_eq!(
        verified["report"]["pages"],
        Value::from(SIZE / 4096),
        "{verified}"
    );
    let (status, events) = vmm.wait_exit();
    assert!(status.success(), "{events:?}\n{}", daemon.log());
}

#[test]
fn an_exported_snapshot_restores_on_another_state_directory_and_forks_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), SIZE, 11, 5, SIZE / 2);
    let first = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    // A recorded working set goes with it.
    first.client().record_working_set("base", Some(1)).unwrap();
    verify_fork(&first, "base", "recorder", &mem);
    testkit::wait_until("the working set to be stored", testkit::DEADLINE, || {
        first.snapshot("base").working_set.is_some()
    });
    let backup = dir.path().join("backup");
    let exported = first.call(SnapshotExport {
        snapshot: id("base"),
        dir: backup.clone(),
    });
    assert_eq!(exported.size, SIZE);
    assert!(exported.working_set, "{exported:?}");
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(backup.join("memory")).unwrap())
            * 512;
    assert!(
        allocated <= SIZE / 2 + (1 << 20),
        "only data is written: {allocated} bytes"
    );
    // A second export into the same directory is refused: nothing is overwritten.
    let again = first.refusal(SnapshotExport {
        snapshot: id("base"),
        dir: backup.clone(),
    });
    assert_eq!(again.code, ErrorCode::InvalidArgument, "{again:?}");

    let second = Daemon::start(&[], &["--fuse", "off"]);
    let restored: SnapshotInfo = second.call(SnapshotImport {
        dir: backup.clone(),
        snapshot: Some(id("restored")),
    });
    assert_eq!(restored.size, Some(SIZE));
    assert_eq!(restored.zero_pages, first.snapshot("base").zero_pages);
    assert_eq!(
        restored.working_set.as_ref().map(|w| w.pages),
        first.snapshot("base").working_set.as_ref().map(|w| w.pages),
        "the working set came along"
    );
    verify_fork(&second, "restored", "after-restore", &mem);

    // One flipped byte in the backup's memory: refused, and nothing registered.
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(backup.join("memory"))
        .unwrap();
    memory.write_all_at(&[0x5a], 4096 + 17).unwrap();
    let refused = second.refusal(SnapshotImport {
        dir: backup,
        snapshot: Some(id("damaged")),
    });
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
    assert!(refused.message.contains("digest"), "{}", refused.message);
    assert!(second
        .snapshots()
        .iter()
        .all(|s| s.id.as_str() != "damaged"));
}

#[test]
fn pagerctl_exports_and_imports() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), SIZE, 12, 3, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off"]);
    let backup = dir.path().join("backup");
    let backup_arg = backup.to_str().unwrap();
    let out = daemon.pagerctl(&["snapshot", "export", "base", backup_arg]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.starts_with("exported base to "),
        "{}",
        out.stdout
    );
    let imported: SnapshotInfo =
        daemon.pagerctl_json(&["snapshot", "import", backup_arg, "--id", "copy"]);
    assert_eq!(imported.id.as_str(), "copy");
    verify_fork(&daemon, "copy", "of-copy", &mem);
    // Ids are checked by pagerctl before anything is sent.
    let bad = daemon.pagerctl(&["snapshot", "import", backup_arg, "--id", "../etc"]);
    assert_eq!(bad.code, Some(2), "{bad:?}");
}
