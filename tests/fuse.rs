//! The FUSE fallback against a real pagerd and a real FUSE mount: VMMs (synthetic ones, and a
//! KVM guest in `kvm.rs`) map a snapshot's memory file `MAP_PRIVATE` from the mount, in both
//! read paths (`cached`: pagerd answers reads; `passthrough`: the kernel maps the backing
//! file). Checked: bytes, private writes, sharing (PSS and page cache), references that block
//! deletes until the kernel releases them (also on SIGKILL), read-only answers, sizes, and the
//! mount's life across shutdown, crash and restart.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use proto::control::{ErrorCode, SnapshotDelete, SnapshotRegister};
use proto::model::ReadPath;
use testkit::{binary, cached_kib, id, wait_until, write_snapshot, Daemon, Vmm};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(30);
const MODES: [ReadPath; 2] = [ReadPath::Cached, ReadPath::Passthrough];

/// pagerd's `--fuse` value for a read path.
fn flag(mode: ReadPath) -> &'static str {
    match mode {
        ReadPath::Cached => "cached",
        ReadPath::Passthrough => "passthrough",
    }
}

/// Starts pagerd with one snapshot and the FUSE view in `mode`; checks the mode took.
fn daemon_with(snapshots: &[(&str, &Path)], mode: ReadPath) -> Daemon {
    let daemon = Daemon::start(snapshots, &["--fuse", flag(mode)]);
    let status = daemon.status();
    let fuse = status
        .fuse
        .as_ref()
        .unwrap_or_else(|| panic!("not mounted: {status:?}"));
    assert_eq!(fuse.read_path, mode, "{status:?}");
    assert_eq!(fuse.mountpoint, daemon.fuse_mount(), "{status:?}");
    daemon
}

/// A synthetic VMM whose guest memory is `file` mapped `MAP_PRIVATE`, checked against `original`.
fn file_vmm(original: &Path, file: &Path, steps: &[&str]) -> Vmm {
    let mut args = vec![
        "--snapshot".to_owned(),
        original.display().to_string(),
        "--memory-file".to_owned(),
        file.display().to_string(),
    ];
    args.extend(steps.iter().map(|s| (*s).to_owned()));
    Vmm::spawn(&args)
}

/// How many mounts sit exactly at `path` (stacked ones count each).
fn mounts_at(path: &Path) -> usize {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(path.as_ref()))
        .count()
}

#[test]
fn eight_forks_map_the_memory_file_privately_and_keep_their_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 0xf05e, 7, MIB);
    let original = std::fs::read(&mem).unwrap();
    for mode in MODES {
        let daemon = daemon_with(&[("s", &mem)], mode);
        let file = daemon.fuse_file("s");
        let mut vmms: Vec<Vmm> = (1..=8)
            .map(|tag| {
                file_vmm(
                    &mem,
                    &file,
                    &[
                        "verify",
                        &format!("stamp:{tag}"),
                        "verify",
                        "wait",
                        "verify",
                        "hold",
                    ],
                )
            })
            .collect();
        for vmm in &mut vmms {
            let report = vmm.expect("verified");
            assert_eq!(
                report["report"]["pages"],
                16 * MIB / 4096,
                "{mode:?}: {report}"
            );
            vmm.expect("stamped");
            vmm.expect("verified");
            vmm.expect("waiting");
        }
        // Every fork has written its own tag into every page; each still reads only its own.
        for vmm in &mut vmms {
            vmm.resume();
            vmm.expect("verified");
        }
        let users = daemon.file_users();
        assert_eq!(users.len(), 8, "{mode:?}: {users:?}");
        let mut pids: Vec<i64> = users.iter().map(|u| i64::from(u.pid)).collect();
        let mut expected: Vec<i64> = vmms.iter().map(|v| i64::from(v.pid())).collect();
        pids.sort_unstable();
        expected.sort_unstable();
        assert_eq!(pids, expected, "{mode:?}: file users are the VMM processes");
        assert!(
            users.iter().all(|u| u.snapshot == id("s")),
            "{mode:?}: {users:?}"
        );

        // Nobody else sees those writes: the mount, the state directory and the source.
        assert!(
            std::fs::read(&file).unwrap() == original,
            "{mode:?}: FUSE file changed"
        );
        let backing = daemon.state_dir().join("snapshots/s/memory");
        assert!(
            std::fs::read(backing).unwrap() == original,
            "{mode:?}: backing file changed"
        );
        assert!(
            std::fs::read(&mem).unwrap() == original,
            "{mode:?}: source changed"
        );
        // A fork started after all those writes reads the snapshot's bytes.
        let mut late = file_vmm(&mem, &file, &["verify"]);
        late.expect("verified");
        late.finish();
        for vmm in vmms {
            vmm.finish();
        }
        wait_until("file users released", DEADLINE, || {
            daemon.file_users().is_empty()
        });
    }
}

/// `Rss` and `Pss` of a process, in KiB, from `/proc/<pid>/smaps_rollup`.
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup:\n{rollup}"))
    };
    (field("Rss:"), field("Pss:"))
}

#[test]
fn eight_readers_share_one_copy_of_the_pages() {
    const SIZE: u64 = 256 * MIB;
    const READERS: u64 = 8;
    let size_kib = SIZE / 1024;
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), SIZE, 0x5a4e, 0, 0);
    for mode in MODES {
        let daemon = daemon_with(&[("s", &mem)], mode);
        let file = daemon.fuse_file("s");
        let backing = daemon.state_dir().join("snapshots/s/memory");
        // Where the readers' pages can be cached: the memory file's own page cache (cached
        // read path) and the backing file's (passthrough, and pagerd's own mapping). Counting
        // only these two files' pages keeps whatever else the machine does out of the figure.
        // pagerd's copy of the backing file is in the cache before any reader starts.
        std::io::copy(
            &mut std::fs::File::open(&backing).unwrap(),
            &mut std::io::sink(),
        )
        .unwrap();
        let snapshot_cache_kib = || cached_kib(&file) + cached_kib(&backing);
        let cache_before = snapshot_cache_kib();
        let mut readers: Vec<Vmm> = (0..READERS)
            .map(|_| file_vmm(&mem, &file, &["touch", "wait", "verify", "hold"]))
            .collect();
        for r in &mut readers {
            assert_eq!(r.expect("touched")["pages"], SIZE / 4096);
            r.expect("waiting");
        }
        let grown = snapshot_cache_kib().saturating_sub(cache_before);
        for r in &readers {
            let (rss, pss) = rss_pss_kib(r.pid());
            assert!(
                rss >= size_kib,
                "{mode:?}: every page is resident: rss {rss} KiB"
            );
            // The file's pages are split between the readers (and, with passthrough, pagerd's
            // own mapping of the same file): each carries about an eighth.
            assert!(
                pss * 6 < rss && pss * 10 > rss,
                "{mode:?}: pss {pss} KiB should be about 1/{READERS} of rss {rss} KiB"
            );
        }
        assert!(
            grown * 4 < size_kib * 5,
            "{mode:?}: the snapshot's page cache grew by {grown} KiB for {READERS} readers of \
             {size_kib} KiB: more than one copy"
        );
        // And the shared pages are the snapshot's bytes.
        for r in &mut readers {
            r.resume();
            r.expect("verified");
        }
        for r in readers {
            r.finish();
        }
    }
}

#[test]
fn a_memory_file_held_by_a_process_blocks_deletes_until_the_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 0xde1, 3, 0);
    for mode in MODES {
        let daemon = daemon_with(&[("s", &mem)], mode);
        let file = daemon.fuse_file("s");
        // The VMM maps the file and closes its descriptor, as VMMs do.
        let mut vmm = file_vmm(&mem, &file, &["verify", "hold"]);
        vmm.expect("verified");
        let users = daemon.file_users();
        assert_eq!(users.len(), 1, "{mode:?}: {users:?}");
        assert_eq!(
            users[0].pid,
            i32::try_from(vmm.pid()).unwrap(),
            "{mode:?}: {users:?}"
        );
        assert_eq!(users[0].snapshot, id("s"));
        let info = daemon.snapshot("s");
        assert_eq!(info.ref_count, Some(1), "{mode:?}: {info:?}");
        assert_eq!(info.fuse_file.as_ref(), Some(&file), "{mode:?}: {info:?}");
        assert_eq!(info.file_users, users, "{mode:?}: {info:?}");

        let err = daemon.refusal(SnapshotDelete {
            snapshot: id("s"),
            defer: false,
            force: false,
        });
        assert_eq!(err.code, ErrorCode::Conflict, "{mode:?}: {err:?}");
        assert!(
            err.message.contains(&format!("pid {}", vmm.pid())),
            "{mode:?}: the refusal names the process: {}",
            err.message
        );
        let run = daemon.pagerctl(&["fork", "ls"]);
        assert!(
            run.success()
                && run.stdout.contains("file")
                && run.stdout.contains(&vmm.pid().to_string()),
            "{run:?}"
        );
        assert!(file.exists(), "{mode:?}: refused delete left the file");

        vmm.kill();
        wait_until("the killed VMM's reference to end", DEADLINE, || {
            daemon.file_users().is_empty()
        });
        let deleted = daemon.delete_snapshot("s", false);
        assert!(deleted.deleted, "{mode:?}: {deleted:?}");
        wait_until("the deleted snapshot to leave the mount", DEADLINE, || {
            !file.exists()
        });
    }
}

#[test]
fn a_deferred_delete_waits_for_file_users_and_hides_the_file_from_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 0xdef, 0, 0);
    for mode in MODES {
        let daemon = daemon_with(&[("s", &mem)], mode);
        let file = daemon.fuse_file("s");
        let mut vmm = file_vmm(&mem, &file, &["verify", "wait", "verify"]);
        vmm.expect("verified");
        vmm.expect("waiting");
        let outcome = daemon.delete_snapshot("s", true);
        assert!(outcome.pending, "{mode:?}: {outcome:?}");
        assert_eq!(outcome.file_users.len(), 1);
        // No new users of a snapshot on its way out.
        wait_until("the pending snapshot to leave the mount", DEADLINE, || {
            std::fs::File::open(&file).is_err()
        });
        // The one holding it still reads every byte, then exits.
        vmm.resume();
        vmm.expect("verified");
        vmm.finish();
        wait_until("the deferred delete to finish", DEADLINE, || {
            daemon
                .client()
                .snapshot("s")
                .is_err_and(|e| e.code() == Some(ErrorCode::NotFound))
        });
        assert!(!daemon.state_dir().join("snapshots/s").exists());
    }
}

fn raw_errno(result: std::io::Result<impl Sized>) -> i32 {
    match result {
        Ok(_) => panic!("expected the operation to fail"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

#[test]
fn the_mount_is_read_only_lists_every_snapshot_and_shows_exact_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let small = write_snapshot(&dir.path().join("small"), 4 * MIB, 1, 0, 0);
    let odd = write_snapshot(&dir.path().join("odd"), 12 * MIB + 8192, 2, 5, 4096);
    let original = std::fs::read(&odd).unwrap();
    for mode in MODES {
        let daemon = daemon_with(&[("small", &small), ("odd", &odd)], mode);
        let root = daemon.fuse_mount().join("snapshots");
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["odd", "small"], "{mode:?}");
        for (id, source) in [("small", &small), ("odd", &odd)] {
            let want = std::fs::metadata(source).unwrap().len();
            let out = Command::new("ls")
                .args(["-ln", &daemon.fuse_file(id).display().to_string()])
                .output()
                .unwrap();
            let line = String::from_utf8_lossy(&out.stdout);
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields[0], "-r--------", "{mode:?}: {line}");
            assert_eq!(fields[4], want.to_string(), "{mode:?}: ls -l size: {line}");
        }

        // Reads at any offset and length return the snapshot's bytes.
        let file = std::fs::File::open(daemon.fuse_file("odd")).unwrap();
        for (offset, len) in [
            (0, 4096),
            (4095, 10_000),
            (5 * MIB + 17, 3 * MIB),
            (12 * MIB, 8192),
        ] {
            let len = usize::try_from(len).unwrap();
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).unwrap();
            let start = usize::try_from(offset).unwrap();
            assert!(
                buf == original[start..start + len],
                "{mode:?}: read at {offset}+{len}"
            );
        }
        let mut past_end = [0u8; 16];
        assert_eq!(
            file.read_at(&mut past_end, original.len() as u64).unwrap(),
            0
        );

        // Nothing can change it.
        let mem = daemon.fuse_file("odd");
        let erofs = libc::EROFS;
        let open_rw = std::fs::OpenOptions::new().write(true).open(&mem);
        assert_eq!(raw_errno(open_rw), erofs, "{mode:?}: open for writing");
        let truncate = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&mem);
        assert_eq!(raw_errno(truncate), erofs, "{mode:?}: truncate");
        assert_eq!(
            raw_errno(std::fs::write(root.join("new"), b"x")),
            erofs,
            "{mode:?}: create"
        );
        assert_eq!(
            raw_errno(std::fs::create_dir(root.join("d"))),
            erofs,
            "{mode:?}: mkdir"
        );
        assert_eq!(
            raw_errno(std::fs::remove_file(&mem)),
            erofs,
            "{mode:?}: unlink"
        );
        let renamed = std::fs::rename(&mem, mem.with_file_name("other"));
        assert_eq!(raw_errno(renamed), erofs, "{mode:?}: rename");
        let perms = std::os::unix::fs::PermissionsExt::from_mode(0o666);
        assert_eq!(
            raw_errno(std::fs::set_permissions(&mem, perms)),
            erofs,
            "{mode:?}: chmod"
        );
        let truncated = nix::unistd::truncate(&mem, 0).map_err(std::io::Error::from);
        assert_eq!(raw_errno(truncated), erofs, "{mode:?}: truncate(2)");
        assert!(
            std::fs::read(&mem).unwrap() == original,
            "{mode:?}: unchanged"
        );
        assert_eq!(
            std::fs::metadata(&mem).unwrap().len(),
            original.len() as u64
        );
    }
}

#[test]
fn the_mount_goes_at_shutdown_and_comes_back_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 9, 0, 0);
    let original = std::fs::read(&mem).unwrap();
    let mut daemon = Daemon::start(&[("s", &mem)], &[]);
    let mount = daemon.fuse_mount();
    assert_eq!(mounts_at(&mount), 1);
    assert!(std::fs::read(daemon.fuse_file("s")).unwrap() == original);

    // A second daemon on the same state directory is refused (it would own the mount too).
    let second = Command::new(binary("pagerd"))
        .arg("--state-dir")
        .arg(daemon.state_dir())
        .arg("--control-socket")
        .arg(dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another pagerd"), "{stderr}");
    assert!(std::fs::read(daemon.fuse_file("s")).unwrap() == original);

    // A crash leaves a dead mount behind …
    daemon.sigkill();
    let dead = std::fs::read_dir(mount.join("snapshots"));
    assert_eq!(raw_errno(dead), libc::ENOTCONN, "a dead daemon's mount");
    // … which the next start replaces.
    daemon.respawn();
    assert!(std::fs::read(daemon.fuse_file("s")).unwrap() == original);
    assert_eq!(
        mounts_at(&mount),
        1,
        "the stale mount was replaced, not stacked under"
    );
    assert!(daemon.log().contains("detached a stale FUSE mount"));

    // A clean shutdown removes the mount.
    assert!(daemon.stop().success());
    assert_eq!(mounts_at(&mount), 0);
}

#[test]
fn registering_a_file_from_the_mount_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 4, 0, 0);
    let daemon = Daemon::start(&[("s", &mem)], &[]);
    let looped: PathBuf = daemon.fuse_file("s");
    let err = daemon.refusal(SnapshotRegister {
        snapshot: id("again"),
        path: Some(looped),
        fd: false,
        link: false,
        vmstate: None,
        vmm: None,
    });
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    assert!(err.message.contains("FUSE"), "{}", err.message);
    // The daemon still answers and serves.
    assert!(std::fs::read(daemon.fuse_file("s")).unwrap() == std::fs::read(&mem).unwrap());
}

#[test]
fn a_passthrough_fork_keeps_its_memory_when_the_daemon_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 0xdead, 4, 0);
    let mut daemon = daemon_with(&[("s", &mem)], ReadPath::Passthrough);
    // Mapped, not a single page read yet.
    let mut vmm = file_vmm(&mem, &daemon.fuse_file("s"), &["wait", "verify"]);
    vmm.expect("waiting");
    daemon.sigkill();
    // Every page still reads the snapshot's bytes: the kernel maps the backing file itself.
    vmm.resume();
    let report = vmm.expect("verified");
    assert_eq!(report["report"]["pages"], 8 * MIB / 4096);
    vmm.finish();
}
