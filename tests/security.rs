//! Who can read guest memory, and what can change a snapshot, against a real pagerd: other
//! users (run through `setpriv` as uid 65534 and others) are kept out of the state directory,
//! the FUSE view and every socket unless they are in `--group`; a group member registers only
//! files it can read itself; a linked memory file that changes is noticed and its snapshot
//! refuses new forks, while a copied one is immune; a truncated file never kills the daemon;
//! the caller's file keeps its mode; symlinks are refused. See docs/security.md.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use proto::control::{
    request_line, ErrorCode, ForkCreate, Response, SnapshotGet, SnapshotRegister,
};
use proto::model::{ForkState, ImportMethod, SnapshotInfo};
use serde_json::Value;
use testkit::{binary, id, refused, wait_until, write_snapshot, Daemon, DEADLINE};

const MIB: u64 = 1 << 20;
/// `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;
/// A user in no group pagerd knows.
const STRANGER: u32 = 65533;

/// Runs `program` as `uid` with primary group `gid` and no supplementary groups.
fn run_as(uid: u32, gid: u32, program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .args(args)
        .env("PAGERD_SOCKET", "/nonexistent")
        .output()
        .expect("run setpriv")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` failed for lack of permission.
fn assert_denied(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what} should have been refused");
    assert!(
        stderr(out).contains("Permission denied"),
        "{what}: {}",
        stderr(out)
    );
}

/// Connects to the Unix socket at `socket` as `uid`/`gid` and, if `line` is given, sends it
/// and prints the answer line. (perl, so that nothing of pagerd's is needed on that side.)
fn connect_as(uid: u32, gid: u32, socket: &Path, line: Option<&str>) -> Output {
    let script = r#"
        use IO::Socket::UNIX;
        my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!\n";
        if (@ARGV > 1) { print $s "$ARGV[1]\n"; my $answer = <$s>; print $answer; }
    "#;
    let socket = socket.display().to_string();
    let mut args = vec!["-e", script, socket.as_str()];
    args.extend(line);
    run_as(uid, gid, Path::new("/usr/bin/perl"), &args)
}

/// Lets other users through the test's temp directory, so that only pagerd's own modes decide.
fn open_up(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn mode_of(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

/// `pagerctl` run by root against `daemon`; panics on failure.
fn pagerctl_ok(daemon: &Daemon, args: &[&str]) -> SnapshotInfo {
    let mut all = vec!["--json"];
    all.extend(args);
    let run = daemon.pagerctl(&all);
    assert!(run.success(), "pagerctl {args:?}: {run:?}");
    run.json()
}

/// A root-run `snapshot.register` by path alone (no descriptor).
fn register_by_path(snapshot: &str, path: &Path) -> SnapshotRegister {
    SnapshotRegister {
        snapshot: id(snapshot),
        path: Some(path.to_owned()),
        fd: false,
        link: false,
        vmstate: None,
        vmm: None,
    }
}

#[test]
fn without_a_group_only_root_reads_memory_or_connects() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 51, 3, 0);
    let daemon = Daemon::start(&[("s", &mem)], &[]);
    open_up(daemon.scratch());
    let fork_socket = daemon.create_fork("s", "f");
    let state = daemon.state_dir();
    let memory = state.join("snapshots/s/memory");
    assert_eq!(mode_of(&state), (0o700, 0, 0));
    assert_eq!(mode_of(&state.join("snapshots/s")), (0o700, 0, 0));
    assert_eq!(mode_of(&memory), (0o400, 0, 0));
    assert_eq!(mode_of(&state.join("forks/f.json")).0, 0o600);
    assert_eq!(mode_of(&fork_socket).0, 0o600);
    assert_eq!(mode_of(daemon.control_socket()).0, 0o600);
    assert_eq!(mode_of(&daemon.fuse_file("s")), (0o400, 0, 0));
    assert_eq!(mode_of(&daemon.fuse_mount()).0, 0o500);

    let cat = Path::new("/bin/cat");
    for uid in [NOBODY, STRANGER] {
        let memory_file = memory.display().to_string();
        assert_denied(
            &run_as(uid, uid, cat, &[&memory_file]),
            "reading the state dir's memory file",
        );
        let fuse_file = daemon.fuse_file("s").display().to_string();
        assert_denied(
            &run_as(uid, uid, cat, &[&fuse_file]),
            "reading the FUSE memory file",
        );
        let state_dir = state.display().to_string();
        assert_denied(
            &run_as(uid, uid, Path::new("/bin/ls"), &[&state_dir]),
            "listing the state dir",
        );
        assert_denied(
            &connect_as(uid, uid, daemon.control_socket(), None),
            "connecting to the control socket",
        );
        assert_denied(
            &connect_as(uid, uid, &fork_socket, None),
            "connecting to a fork socket",
        );
    }
    // Root still can, and the fork is still waiting for its VMM.
    assert!(std::fs::read(daemon.fuse_file("s")).unwrap() == std::fs::read(&mem).unwrap());
    assert_eq!(daemon.fork("f").state, ForkState::Waiting);
}

#[test]
fn a_group_member_reads_memory_and_connects_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 52, 5, 0);
    let group = NOBODY.to_string();
    let mut daemon = Daemon::start(&[("s", &mem)], &["--group", &group]);
    open_up(daemon.scratch());
    let fork_socket = daemon.create_fork("s", "f");
    let state = daemon.state_dir();
    assert_eq!(mode_of(&state), (0o750, 0, NOBODY));
    assert_eq!(
        mode_of(&state.join("snapshots/s/memory")),
        (0o440, 0, NOBODY)
    );
    assert_eq!(mode_of(&fork_socket), (0o660, 0, NOBODY));
    assert_eq!(mode_of(daemon.control_socket()), (0o660, 0, NOBODY));
    assert_eq!(mode_of(&daemon.fuse_file("s")), (0o440, 0, NOBODY));
    assert_eq!(
        mode_of(&state.join("forks/f.json")).0,
        0o600,
        "records stay root's"
    );

    // A member reads the memory file on the mount, byte for byte, and uses both sockets.
    let fuse_file = daemon.fuse_file("s").display().to_string();
    let out = run_as(NOBODY, NOBODY, Path::new("/bin/cat"), &[&fuse_file]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == std::fs::read(&mem).unwrap());
    let ctl = binary("pagerctl");
    let socket = daemon.control_socket().display().to_string();
    let out = run_as(
        NOBODY,
        NOBODY,
        &ctl,
        &["--socket", &socket, "--json", "status"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = connect_as(NOBODY, NOBODY, &fork_socket, None);
    assert!(out.status.success(), "{}", stderr(&out));
    // Someone outside the group gets nothing.
    assert_denied(
        &run_as(STRANGER, STRANGER, Path::new("/bin/cat"), &[&fuse_file]),
        "a stranger reading",
    );
    assert_denied(
        &connect_as(STRANGER, STRANGER, daemon.control_socket(), None),
        "a stranger connecting",
    );

    // An older state directory, too wide and without recorded identities, is brought to the
    // policy at the next start.
    let snapshot_dir = state.join("snapshots/s");
    let meta_path = snapshot_dir.join("snapshot.json");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("file");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    for (path, mode) in [
        (&state, 0o777),
        (&snapshot_dir, 0o777),
        (&snapshot_dir.join("memory"), 0o644),
        (&meta_path, 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    daemon.respawn();
    assert_eq!(mode_of(&state), (0o750, 0, NOBODY));
    assert_eq!(mode_of(&snapshot_dir), (0o750, 0, NOBODY));
    assert_eq!(mode_of(&snapshot_dir.join("memory")), (0o440, 0, NOBODY));
    assert_eq!(mode_of(&meta_path).0, 0o600);
    let info = daemon.snapshot("s");
    assert_eq!(info.error, None, "{info:?}");
    assert!(info.file.is_some(), "identity recorded again: {info:?}");
    assert!(daemon.status().healthy);
}

#[test]
fn a_group_member_registers_only_files_it_can_read() {
    let dir = tempfile::tempdir().unwrap();
    open_up(dir.path());
    let secret_dir = dir.path().join("root-only");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = write_snapshot(&secret_dir.join("secret.mem"), MIB, 53, 0, 0);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let readable = write_snapshot(&dir.path().join("mine.mem"), MIB, 54, 0, 0);
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let group = NOBODY.to_string();
    let daemon = Daemon::start(&[], &["--group", &group]);
    open_up(daemon.scratch());

    // By path, the member is told to pass a descriptor, whether or not it could read the file.
    for path in [&secret, &readable] {
        let line = request_line(&Value::Null, &register_by_path("x", path).into());
        let out = connect_as(NOBODY, NOBODY, daemon.control_socket(), Some(&line));
        assert!(out.status.success(), "{}", stderr(&out));
        let answer: Response = serde_json::from_slice(&out.stdout).unwrap();
        let error = answer.error.expect("refused");
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
        let message = error.message;
        assert!(
            message.contains("pass the file as a descriptor"),
            "{message}"
        );
    }
    // `pagerctl` passes a descriptor: the root-only file cannot even be opened …
    let ctl = binary("pagerctl");
    let socket = daemon.control_socket().display().to_string();
    let add = |path: &Path| {
        let path = path.display().to_string();
        run_as(
            NOBODY,
            NOBODY,
            &ctl,
            &["--socket", &socket, "--json", "snapshot", "add", "x", &path],
        )
    };
    let out = add(&secret);
    assert_eq!(
        out.status.code(),
        Some(ErrorCode::InvalidArgument.exit_code().into())
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["error"]["code"], "invalid_argument", "{printed}");
    assert!(
        printed["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Permission denied")),
        "{printed}"
    );
    assert_eq!(
        daemon.error_code(SnapshotGet { snapshot: id("x") }),
        ErrorCode::NotFound
    );
    // … and a file the member can read is registered from its descriptor.
    let out = add(&readable);
    assert!(out.status.success(), "{}", stderr(&out));
    let info = daemon.snapshot("x");
    assert_eq!(info.source.as_deref(), Some(readable.as_path()), "{info:?}");
    assert!(std::fs::read(daemon.fuse_file("x")).unwrap() == std::fs::read(&readable).unwrap());
    // Root may still register by path.
    daemon.call(register_by_path("y", &secret));
}

#[test]
fn a_changed_linked_file_is_noticed_and_refuses_new_forks() {
    let dir = tempfile::tempdir().unwrap();
    let source = write_snapshot(&dir.path().join("source.img"), 4 * MIB, 55, 0, 0);
    let other = write_snapshot(&dir.path().join("other.img"), 4 * MIB, 56, 0, 0);
    let daemon = Daemon::start(&[], &[]);
    let path = source.display().to_string();
    let info = pagerctl_ok(&daemon, &["snapshot", "add", "--link", "linked", &path]);
    assert_eq!(info.import, Some(ImportMethod::Hardlink), "{info:?}");
    assert_eq!(
        std::fs::metadata(&source).unwrap().ino(),
        std::fs::metadata(daemon.state_dir().join("snapshots/linked/memory"))
            .unwrap()
            .ino()
    );
    daemon.create_fork("linked", "before");

    let status = Command::new("cp")
        .arg(&other)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("the change to be noticed", DEADLINE, || {
        daemon.snapshot("linked").error.is_some()
    });
    let why = daemon.snapshot("linked").error.unwrap();
    assert!(
        why.starts_with("memory file changed after registration (") && why.contains("mtime"),
        "{why}"
    );
    let status = daemon.status();
    assert!(!status.healthy, "{status:?}");
    assert_eq!(status.damaged_snapshots, [id("linked")]);
    let err = refused(daemon.client().create_fork("linked", Some("after")));
    assert_eq!(err.code, ErrorCode::Internal, "{err:?}");
    assert!(
        err.message
            .contains("memory file changed after registration"),
        "{}",
        err.message
    );
    assert!(
        File::open(daemon.fuse_file("linked")).is_err(),
        "gone from the mount"
    );

    // Only a forced delete removes it, and only once nothing references it.
    let err = refused(daemon.client().delete_snapshot("linked", false, false));
    assert!(err.message.contains("forced delete"), "{err:?}");
    let err = refused(daemon.client().delete_snapshot("linked", false, true));
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");
    daemon.close_fork("before");
    let run = daemon.pagerctl(&["snapshot", "rm", "--force", "linked"]);
    assert!(run.success(), "{run:?}");
    assert_eq!(run.stdout.trim(), "deleted linked");
    assert!(daemon.status().healthy);
    assert!(source.exists(), "the caller's file stays");
}

#[test]
fn a_copied_snapshot_keeps_its_bytes_when_the_source_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let source = write_snapshot(&dir.path().join("source.img"), 4 * MIB, 57, 4, 0);
    let original = dir.path().join("original.img");
    std::fs::copy(&source, &original).unwrap();
    let other = write_snapshot(&dir.path().join("other.img"), 4 * MIB, 58, 0, 0);
    let daemon = Daemon::start(&[], &[]);
    let info = pagerctl_ok(
        &daemon,
        &["snapshot", "add", "copied", &source.display().to_string()],
    );
    assert_ne!(info.import, Some(ImportMethod::Hardlink), "{info:?}");

    let status = Command::new("cp")
        .arg(&other)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success());
    // A new fork (which checks the file first) reads the bytes registered.
    let vmm = daemon.attach_holding_vmm("copied", "f", &original);
    vmm.finish();
    assert!(
        std::fs::read(daemon.fuse_file("copied")).unwrap() == std::fs::read(&original).unwrap()
    );
    assert_eq!(daemon.snapshot("copied").error, None);
}

#[test]
fn a_truncated_linked_file_answers_eio_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let source = write_snapshot(&dir.path().join("source.img"), 4 * MIB, 59, 0, 0);
    let other = write_snapshot(&dir.path().join("other.img"), 4 * MIB, 60, 3, 0);
    let daemon = Daemon::start(&[("other", &other)], &["--fuse", "cached"]);
    let path = source.display().to_string();
    pagerctl_ok(&daemon, &["snapshot", "add", "--link", "linked", &path]);
    let held = File::open(daemon.fuse_file("linked")).unwrap();

    File::options()
        .write(true)
        .open(&source)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = held.read_exact_at(&mut buf, 2 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    wait_until("the truncation to be noticed", DEADLINE, || {
        daemon.snapshot("linked").error.is_some()
    });
    let why = daemon.snapshot("linked").error.unwrap();
    assert!(why.contains(&format!("size {}→4096", 4 * MIB)), "{why}");
    assert_eq!(
        daemon.error_code(ForkCreate {
            snapshot: id("linked"),
            fork: None,
            prefetch: None,
        }),
        ErrorCode::Internal
    );

    // The daemon lives on, and the other snapshot is served both ways.
    assert_eq!(daemon.status().pid, daemon.pid());
    assert!(std::fs::read(daemon.fuse_file("other")).unwrap() == std::fs::read(&other).unwrap());
    let vmm = daemon.attach_holding_vmm("other", "f", &other);
    vmm.finish();
    drop(held);
}

#[test]
fn registration_leaves_the_source_mode_alone_and_refuses_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let source = write_snapshot(&dir.path().join("source.img"), MIB, 61, 0, 0);
    // Writable by root alone (anything wider is copied, not linked), but not the usual 0644.
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o604)).unwrap();
    let before = mode_of(&source);
    let daemon = Daemon::start(&[("cmdline", &source)], &[]);
    let path = source.display().to_string();
    pagerctl_ok(&daemon, &["snapshot", "add", "copy", &path]);
    pagerctl_ok(&daemon, &["snapshot", "add", "--link", "link", &path]);
    daemon.call(register_by_path("bypath", &source));
    assert_eq!(mode_of(&source), before, "the caller's file keeps its mode");
    assert_eq!(
        mode_of(&daemon.state_dir().join("snapshots/link/memory")).0,
        0o604,
        "a linked file is the caller's: its mode is left alone"
    );

    let link: PathBuf = dir.path().join("link.img");
    std::os::unix::fs::symlink(&source, &link).unwrap();
    let err = daemon.refusal(register_by_path("viasymlink", &link));
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    assert!(
        err.message.contains("is a symlink; pass the target"),
        "{}",
        err.message
    );
    let run = daemon.pagerctl(&["snapshot", "add", "viasymlink", &link.display().to_string()]);
    assert!(!run.success());
    assert!(
        run.stderr.contains("is a symlink; pass the target"),
        "{run:?}"
    );
    // Linking the same file twice would change what the first link watches.
    let run = daemon.pagerctl(&["snapshot", "add", "--link", "again", &path]);
    assert_eq!(
        run.code,
        Some(ErrorCode::InvalidArgument.exit_code().into()),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("already linked as snapshot `link`"),
        "{run:?}"
    );
}

#[test]
fn a_group_member_lists_vms_but_cannot_start_stop_or_snapshot_them() {
    let group = NOBODY.to_string();
    let daemon = Daemon::start(&[], &["--group", &group]);
    open_up(daemon.scratch());
    let ask = |line: &str| -> Response {
        let out = connect_as(NOBODY, NOBODY, daemon.control_socket(), Some(line));
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for line in [
        r#"{"v":1,"op":"vm.start","snapshot":"base","vsock":"/etc/owned"}"#,
        r#"{"v":1,"op":"vm.stop","vm":"a"}"#,
        r#"{"v":1,"op":"vm.snapshot","vm":"a","snapshot":"b"}"#,
    ] {
        let error = ask(line).error.expect("refused");
        assert_eq!(error.code, ErrorCode::PermissionDenied, "{line}: {error:?}");
        assert!(error.message.contains("only root"), "{error:?}");
    }
    let listed = ask(r#"{"v":1,"op":"vm.list"}"#);
    assert!(listed.ok, "{listed:?}");
    assert!(!Path::new("/etc/owned").exists());
}
