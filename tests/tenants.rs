//! Attacks by a `--group` member, run as a real unprivileged user of the host
//! (`testkit::tenants`) against a real pagerd, each asserting what root and a victim fork
//! still get. See docs/security.md, "Tenants".

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use proto::model::{ForkState, ImportMethod, SnapshotInfo, VmInfo, VmState};
use testkit::firecracker::{self, count, VmReaper};
use testkit::tenants::{tenants, User, GROUP};
use testkit::{binary, skip, wait_until, write_snapshot, CtlRun, Daemon, DEADLINE};

const MIB: u64 = 1 << 20;

/// The program the daemon's process runs now.
fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe")
}

/// A root-owned directory of mode `mode` holding a copy of the pagerd binary (0755).
fn pagerd_copy_in(dir: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    let copy = dir.join("pagerd");
    std::fs::copy(binary("pagerd"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Waits until the daemon answers from a program started after `since`.
fn wait_for_new_program(daemon: &Daemon, since: Instant) {
    wait_until("the new program to answer", DEADLINE, || {
        daemon
            .client()
            .status()
            .is_ok_and(|s| u128::from(s.uptime_ms) <= since.elapsed().as_millis())
    });
}

#[test]
fn a_member_cannot_make_pagerd_execute_a_program_and_root_runs_only_trusted_pagerd_files() {
    let tenants = tenants();
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 31, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fuse", "off", "--group", GROUP]);
    let victim = daemon.attach_holding_vmm("base", "victim", &mem);
    let configured = exe_of(daemon.pid());

    // The member's own programs: a script that would leave a mark and then run the real
    // pagerd (so that nothing would show), and a genuine pagerd that the member owns.
    let member_dir = tenants.member.own_dir(dir.path(), "member");
    let marker = member_dir.join("ran-as-root");
    let script = format!(
        "#!/bin/sh\ntouch {}\nexec {} \"$@\"\n",
        marker.display(),
        binary("pagerd").display()
    );
    let member_script = member_dir.join("x");
    tenants
        .member
        .own_file(&member_script, script.as_bytes(), 0o755);
    let member_pagerd = member_dir.join("pagerd");
    let pagerd_bytes = std::fs::read(binary("pagerd")).unwrap();
    tenants
        .member
        .own_file(&member_pagerd, &pagerd_bytes, 0o755);

    // As the member: refused outright, whatever the binary.
    for args in [
        vec![
            "daemon",
            "upgrade",
            "--binary",
            member_script.to_str().unwrap(),
        ],
        vec![
            "daemon",
            "upgrade",
            "--binary",
            member_pagerd.to_str().unwrap(),
        ],
        vec!["daemon", "upgrade"],
    ] {
        let run = tenants.member.pagerctl(&daemon, &args);
        assert_eq!(run.code, Some(10), "permission_denied: {args:?} {run:?}");
        assert!(run.stderr.contains("only root"), "{run:?}");
    }

    // As root: a file others can change is refused, and so is a file that is not pagerd.
    let group_writable = pagerd_copy_in(&dir.path().join("shared"), 0o775);
    let root_in_members_dir = member_dir.join("root-pagerd");
    std::fs::copy(binary("pagerd"), &root_in_members_dir).unwrap();
    let root_script_dir = dir.path().join("root-script");
    std::fs::create_dir(&root_script_dir).unwrap();
    let root_marker = root_script_dir.join("ran");
    let root_script = root_script_dir.join("pagerd");
    std::fs::write(
        &root_script,
        format!(
            "#!/bin/sh\necho pagerd 9.9\ntouch {}\n",
            root_marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&root_script, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (binary, why) in [
        (&member_script, "owned by uid"),
        (&member_pagerd, "owned by uid"),
        (&root_in_members_dir, "owned by uid"),
        (&group_writable, "writable by others"),
        (&root_script, "not a pagerd binary"),
    ] {
        let run = daemon.pagerctl(&["daemon", "upgrade", "--binary", binary.to_str().unwrap()]);
        assert_eq!(run.code, Some(5), "invalid_argument: {binary:?} {run:?}");
        assert!(run.stderr.contains(why), "{binary:?}: {run:?}");
    }
    assert!(!marker.exists(), "the member's program never ran");
    assert!(!root_marker.exists(), "checking a binary never runs it");
    assert_eq!(exe_of(daemon.pid()), configured);
    let fork = daemon.fork("victim");
    assert_eq!((fork.state, fork.recovered), (ForkState::Serving, 0));

    // A trusted copy: executed by descriptor, the fork taken back.
    let trusted = pagerd_copy_in(&dir.path().join("trusted"), 0o755);
    daemon.upgrade(Some(&trusted));
    assert_eq!(exe_of(daemon.pid()), trusted);
    assert_eq!(daemon.fork("victim").recovered, 1);
    // A plain reload runs the configured program again, not the one-off binary.
    let reloaded = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).unwrap()),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    wait_for_new_program(&daemon, reloaded);
    assert_eq!(exe_of(daemon.pid()), configured);
    let fork = daemon.fork("victim");
    // (`recovered` counts the takeovers of the program answering.)
    assert_eq!((fork.state, fork.recovered), (ForkState::Serving, 1));
    victim.finish();
}

#[test]
fn a_members_file_is_copied_even_when_it_asks_for_a_link_and_its_rewrites_change_nothing() {
    let tenants = tenants();
    let dir = tempfile::tempdir().unwrap();
    let original = write_snapshot(&dir.path().join("original"), 4 * MIB, 77, 0, 0);
    let original_bytes = std::fs::read(&original).unwrap();
    let daemon = Daemon::start(&[], &["--group", GROUP]);
    let member_dir = tenants.member.own_dir(dir.path(), "member");
    let member_file = member_dir.join("mem");
    tenants
        .member
        .own_file(&member_file, &original_bytes, 0o644);
    let run = tenants.member.pagerctl(
        &daemon,
        &[
            "--json",
            "snapshot",
            "add",
            "theirs",
            member_file.to_str().unwrap(),
            "--link",
        ],
    );
    assert!(run.success(), "{run:?}");
    let info: SnapshotInfo = run.json();
    assert_ne!(info.import, Some(ImportMethod::Hardlink), "{info:?}");
    // The member rewrites every page in place and puts the times back.
    let rewrite = format!(
        "dd if=/dev/urandom of={0} bs=1M count=4 conv=notrunc status=none && touch -r {1} {0}",
        member_file.display(),
        original.display()
    );
    let out = tenants
        .member
        .command(Path::new("/bin/sh"))
        .args(["-c", &rewrite])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_ne!(std::fs::read(&member_file).unwrap(), original_bytes);
    // Root's fork and the FUSE view read what was registered, byte for byte.
    assert!(std::fs::read(daemon.fuse_file("theirs")).unwrap() == original_bytes);
    daemon
        .attach_holding_vmm("theirs", "roots-fork", &original)
        .finish();
    assert!(daemon.snapshot("theirs").error.is_none());

    // A file root alone can change, in directories root alone can change, is linked.
    let root_dir = dir.path().join("root-only");
    std::fs::create_dir(&root_dir).unwrap();
    let root_file = root_dir.join("mem");
    std::fs::copy(&original, &root_file).unwrap();
    let run = daemon.pagerctl(&[
        "--json",
        "snapshot",
        "add",
        "roots",
        root_file.to_str().unwrap(),
        "--link",
    ]);
    assert!(run.success(), "{run:?}");
    assert_eq!(
        run.json::<SnapshotInfo>().import,
        Some(ImportMethod::Hardlink)
    );
}

/// `pagerctl ARGS` run by `who` (or root) must end with exit status `code` (10:
/// `permission_denied`, 4: `conflict`, 6: `unavailable`), saying `why`.
fn refused_with(run: &CtlRun, code: i32, why: &str) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert!(run.stderr.contains(why), "expected {why:?}: {run:?}");
}

#[test]
fn members_change_only_their_own_objects_and_nobody_closes_a_vms_fork_under_it() {
    let test = "members_change_only_their_own_objects_and_nobody_closes_a_vms_fork_under_it";
    let tenants = tenants();
    let fixture = match firecracker::fixture() {
        Ok(fixture) => fixture,
        Err(why) => return skip(test, &why),
    };
    let binary = firecracker::binary().expect("the fixture was made with it");
    let daemon = Daemon::start(
        &[],
        &["--firecracker", binary.to_str().unwrap(), "--group", GROUP],
    );
    let _reaper = VmReaper::new(&daemon.state_dir());
    let add = daemon.pagerctl(&[
        "snapshot",
        "add",
        "base",
        fixture.memory.to_str().unwrap(),
        "--vmstate",
        fixture.vmstate.to_str().unwrap(),
        "--vmm",
        "firecracker",
    ]);
    assert!(add.success(), "{add:?}");
    let run = daemon.pagerctl(&["--json", "vm", "start", "base", "--id", "a"]);
    assert!(run.success(), "{run:?}");
    let vm: VmInfo = run.json();
    assert_eq!((vm.state, vm.owner), (VmState::Running, 0));
    let log = vm.console_log.clone();
    wait_until("the guest to check its memory", DEADLINE, || {
        count(&log, "OK") >= 1
    });

    // The VM's fork: a member may not close it (root's), and root closes it only through the VM.
    let member = &tenants.member;
    refused_with(
        &member.pagerctl(&daemon, &["fork", "close", "a"]),
        10,
        "belongs to uid 0",
    );
    refused_with(&daemon.pagerctl(&["fork", "close", "a"]), 4, "stop the VM");
    refused_with(
        &member.pagerctl(&daemon, &["snapshot", "rm", "base"]),
        10,
        "belongs to uid 0",
    );
    // The guest goes on: more checks pass, and the VM and its fork still run.
    let passes = count(&log, "OK");
    wait_until("the guest to keep checking its memory", DEADLINE, || {
        count(&log, "OK") >= passes + 2 || count(&log, "BAD") > 0
    });
    assert_eq!(count(&log, "BAD"), 0);
    assert_eq!(daemon.fork("a").state, ForkState::Serving);

    // A member's own snapshot and fork: its own to change, not another member's.
    let dir = tempfile::tempdir().unwrap();
    let member_dir = member.own_dir(dir.path(), "member");
    let mem = write_snapshot(&member_dir.join("mem"), 4 * MIB, 5, 0, 0);
    std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = member.pagerctl(
        &daemon,
        &["--json", "snapshot", "add", "theirs", mem.to_str().unwrap()],
    );
    assert!(run.success(), "{run:?}");
    assert_eq!(run.json::<SnapshotInfo>().owner, Some(member.uid));
    for fork in ["m1", "m2"] {
        let run = member.pagerctl(
            &daemon,
            &["--json", "fork", "create", "theirs", "--id", fork],
        );
        assert!(run.success(), "{run:?}");
    }
    assert_eq!(daemon.fork("m1").owner, member.uid);
    let other = &tenants.other_member;
    let theirs = format!("belongs to uid {}", member.uid);
    for args in [
        &["fork", "close", "m1"][..],
        &["snapshot", "rm", "theirs"],
        &["snapshot", "record", "theirs"],
        &["snapshot", "clear-working-set", "theirs"],
    ] {
        refused_with(&other.pagerctl(&daemon, args), 10, &theirs);
    }
    assert_eq!(daemon.fork("m1").state, ForkState::Waiting);
    // Reading stays open to every member.
    assert!(other.pagerctl(&daemon, &["fork", "get", "m1"]).success());
    assert!(member.pagerctl(&daemon, &["fork", "close", "m1"]).success());
    assert!(
        daemon.pagerctl(&["fork", "close", "m2"]).success(),
        "root may close anything"
    );
    assert!(member
        .pagerctl(&daemon, &["snapshot", "rm", "theirs"])
        .success());

    let run = daemon.pagerctl(&["--json", "vm", "stop", "a", "--timeout-ms", "5000"]);
    assert!(run.success(), "{run:?}");
    assert_eq!(run.json::<VmInfo>().state, VmState::Exited);
}

#[test]
fn a_member_cannot_take_every_fork_slot_and_root_still_creates_forks() {
    let tenants = tenants();
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MIB, 9, 0, 0);
    let daemon = Daemon::start(
        &[("base", &mem)],
        &[
            "--fuse",
            "off",
            "--group",
            GROUP,
            "--max-forks",
            "40",
            "--max-forks-per-uid",
            "20",
        ],
    );
    let create = |who: Option<&User>, id: &str| {
        let args = ["fork", "create", "base", "--id", id];
        match who {
            Some(user) => user.pagerctl(&daemon, &args),
            None => daemon.pagerctl(&args),
        }
    };
    // Creates `count` forks PREFIX0… as `who` (root: None), then is refused the next with `why`.
    let fill = |who: Option<&User>, prefix: &str, count: usize, why: &str| {
        for n in 0..count {
            let run = create(who, &format!("{prefix}{n}"));
            assert!(run.success(), "fork {prefix}{n}: {run:?}");
        }
        refused_with(&create(who, &format!("{prefix}{count}")), 6, why);
    };
    fill(Some(&tenants.member), "m", 20, "--max-forks-per-uid");
    // 24 forks then: the last 16 of 40 are root's.
    fill(Some(&tenants.other_member), "o", 4, "kept for root");
    fill(None, "r", 16, "--max-forks");
    // Root's forks are served like any other.
    assert!(daemon.pagerctl(&["fork", "close", "r0"]).success());
    daemon.attach_holding_vmm("base", "r0", &mem).finish();
}

/// The daemon's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3) here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sets process `pid`'s limit on open descriptors (soft and hard) to `limit`.
fn limit_descriptors(pid: u32, limit: usize) {
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The lowest descriptor number process `pid` does not use.
fn lowest_free_fd(pid: u32) -> usize {
    let used: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// Descriptors the daemon holds now (without waiting for anything to close).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_connections_from_members_are_bounded_and_out_of_descriptors_nothing_spins() {
    let tenants = tenants();
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 11, 0, 0);
    // Idle handoffs are not timed out during the test: the bound alone must hold them.
    let daemon = Daemon::start(
        &[("base", &mem)],
        &[
            "--fuse",
            "off",
            "--group",
            GROUP,
            "--handoff-timeout-ms",
            "600000",
        ],
    );
    let victim = daemon.attach_holding_vmm("base", "victim", &mem);
    let target = daemon.create_fork("base", "target");
    let second = daemon.create_fork("base", "second");
    let pid = daemon.pid();
    let baseline = daemon.fd_count();

    // 2,000 idle connections from one member to one fork's socket, 500 from another.
    let member = tenants.member.hold_connections(&target, 2000);
    let other = tenants.other_member.hold_connections(&target, 500);
    assert_eq!((member.connected, other.connected), (2000, 500));
    // (The last connects may still wait in the backlog: the daemon reaches the bound soon.)
    wait_until(
        "at most 8 waiting members' connections per socket",
        DEADLINE,
        || open_fds(pid) <= baseline + 8,
    );
    // Root's VMM still attaches to that very fork, and root is answered.
    assert!(daemon.pagerctl(&["status"]).success());
    let vmm = testkit::Vmm::attach(&mem, &target, &["verify"]);
    vmm.finish();
    assert!(daemon.status().healthy);

    // Descriptors run short: members are turned away while 32 are left for root.
    let limit = open_fds(pid) + 48;
    limit_descriptors(pid, limit);
    let socket = daemon.control_socket();
    let control = tenants.member.hold_connections(socket, 40);
    let held_by_members = open_fds(pid);
    assert!(
        held_by_members + 30 <= limit,
        "members never take the last 32: {held_by_members} of {limit}"
    );
    // Now out of descriptors altogether (the limit at the lowest free descriptor number, so
    // that no new one can be had): members still knock.
    let limit = lowest_free_fd(pid);
    let out_of_descriptors = Instant::now();
    limit_descriptors(pid, limit);
    let control2 = tenants.other_member.hold_connections(socket, 40);
    let handoffs = tenants.member.hold_connections(&second, 40);
    assert_eq!(
        (control.connected, control2.connected, handoffs.connected),
        (40, 40, 40),
        "every connect is taken off the backlog, even out of descriptors"
    );
    // A descriptor a daemon thread held for a moment when the limit was set (a directory it
    // lists now and then) is free again below the limit: knock until the control socket is
    // met out of descriptors, the limit put back at the lowest free number each time.
    let mut knocks = Vec::new();
    wait_until(
        "the control socket to be met out of descriptors",
        DEADLINE,
        || {
            if daemon.log().contains("out of descriptors") {
                return true;
            }
            limit_descriptors(pid, lowest_free_fd(pid));
            knocks.push(tenants.other_member.hold_connections(socket, 4));
            false
        },
    );
    // Nothing spins: the daemon does not burn a second of CPU in the next two seconds.
    let before = cpu_ticks(pid);
    let ticks_per_second = 100;
    let spun = testkit::poll_until(std::time::Duration::from_secs(2), || {
        cpu_ticks(pid) - before > ticks_per_second
    });
    assert!(!spun, "the daemon spun: {} ticks", cpu_ticks(pid) - before);
    // Root gets an answer even now (the spare descriptor's room).
    let answer = daemon.client().status();
    assert!(
        !matches!(answer, Err(proto::client::ClientError::Io(_))),
        "root was not answered: {answer:?}"
    );
    let log = daemon.log();
    let lines = log.matches("out of descriptors").count();
    // At most 5 lines per 10 s window of the limiter.
    let windows = out_of_descriptors.elapsed().as_secs() / 10 + 2;
    assert!(
        lines >= 1 && lines as u64 <= 5 * windows,
        "EMFILE was met, and its log lines are rate limited: {lines} in {windows} windows"
    );
    // Once the members hang up, everything is as before and the victim was served all along.
    drop((member, other, control, control2, handoffs));
    wait_until(
        "the daemon to let go of the members' connections",
        DEADLINE,
        || open_fds(pid) <= baseline + 4,
    );
    assert!(daemon.status().healthy);
    let fork = daemon.fork("victim");
    assert_eq!((fork.state, fork.stats.errors), (ForkState::Serving, 0));
    victim.finish();
}

#[test]
fn a_members_huge_sparse_snapshot_and_its_handoffs_cost_memory_for_what_exists() {
    const TIB: u64 = 1 << 40;
    let tenants = tenants();
    let member = &tenants.member;
    let dir = tempfile::tempdir().unwrap();
    let small = write_snapshot(&dir.path().join("small"), 4 * MIB, 21, 0, 0);
    let daemon = Daemon::start(
        &[("small", &small)],
        &[
            "--fuse",
            "off",
            "--group",
            GROUP,
            "--max-snapshot-size",
            "4T",
            "--max-snapshot-bytes-per-uid",
            "16T",
        ],
    );
    // 4 TiB declared, a few pages on disk.
    let member_dir = member.own_dir(dir.path(), "member");
    let sparse = |name: &str, size: u64| {
        let path = member_dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        for at in [0, size / 2, size - 4096] {
            std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], at).unwrap();
        }
        std::os::unix::fs::chown(&path, Some(member.uid), Some(member.gid)).unwrap();
        path
    };
    let huge = sparse("huge", 4 * TIB);
    let rss_before = daemon.status_kb("VmRSS");
    let run = member.pagerctl(
        &daemon,
        &["snapshot", "add", "huge", huge.to_str().unwrap()],
    );
    assert!(run.success(), "{run:?}");
    let rss_registered = daemon.status_kb("VmRSS");
    assert!(
        rss_registered < rss_before + 16 * 1024,
        "registering 4 TiB of holes: {rss_before} → {rss_registered} KiB"
    );
    // Three handoffs of one 4 TiB region each, from the member's own VMMs.
    let vmms: Vec<testkit::Vmm> = (0..3)
        .map(|n| {
            let fork = format!("h{n}");
            let run = member.pagerctl(&daemon, &["fork", "create", "huge", "--id", &fork]);
            assert!(run.success(), "{run:?}");
            let socket = daemon.fork(&fork).handoff_socket;
            let mut command = member.command(&binary("hostile-vmm"));
            command.args([
                "--socket",
                socket.to_str().unwrap(),
                "--size",
                "4096G",
                "handoff",
                "hold",
            ]);
            let mut vmm = testkit::Vmm::spawn_command(command);
            let reply = vmm.expect("reply");
            assert_eq!(reply["reply"]["ok"], true, "{reply}");
            vmm
        })
        .collect();
    let rss_served = daemon.status_kb("VmRSS");
    assert!(
        rss_served < rss_registered + 3 * 4 * 1024,
        "three 4 TiB handoffs: {rss_registered} → {rss_served} KiB"
    );
    // Beyond the budget: refused, nothing kept.
    let larger = sparse("larger", 8 * TIB);
    let run = member.pagerctl(
        &daemon,
        &["snapshot", "add", "larger", larger.to_str().unwrap()],
    );
    refused_with(&run, 6, "--max-snapshot-size");
    assert!(daemon.client().snapshot("larger").is_err());
    // Root's forks are served as before.
    daemon.attach_holding_vmm("small", "roots", &small).finish();
    for vmm in vmms {
        vmm.finish();
    }
}

#[test]
fn slow_scrapers_delay_no_other_scrape_and_are_cut_off() {
    use std::io::{Read, Write};
    let tenants = tenants();
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MIB, 93, 0, 0);
    let addr = testkit::free_loopback_addr();
    let daemon = Daemon::start(
        &[("base", &mem)],
        &["--fuse", "off", "--group", GROUP, "--metrics-addr", &addr],
    );
    // A member trickles a request over 20 connections, a byte a second each.
    let mut slow = tenants.member.slow_clients(&addr, 20);
    // Meanwhile a normal scrape is answered whole, well within the deadline of a request.
    for _ in 0..3 {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: pagerd\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("pagerd_snapshots 1"), "{response}");
    }
    // The slow connections are cut off at the deadline of a request (5 s), not kept.
    let lasted = slow.wait_all_closed();
    assert!(lasted <= 15, "the slow scrapers lasted {lasted} s");
    assert!(daemon.status().healthy);
}

#[test]
fn a_member_that_fills_the_state_disk_hangs_no_attaching_vmm() {
    let tenants = tenants();
    let member = &tenants.member;
    let dir = tempfile::tempdir().unwrap();
    let member_dir = member.own_dir(dir.path(), "member");
    let mem = write_snapshot(&member_dir.join("mem"), 2 * MIB, 41, 0, 0);
    let disk = testkit::SmallTmpfs::mount("8m");
    let state = disk.path().join("state");
    let state_arg = state.to_str().unwrap().to_owned();
    let snapshot_arg = format!("base={}", mem.display());
    let daemon = Daemon::launch(testkit::Launch {
        args: &[
            "--state-dir",
            &state_arg,
            "--fuse",
            "off",
            "--group",
            GROUP,
            "--snapshot",
            &snapshot_arg,
        ],
        cwd: None,
        env: &[],
        state: state.clone(),
        control: state.join("control.sock"),
    });
    let run = member.pagerctl(&daemon, &["fork", "create", "base", "--id", "early"]);
    assert!(run.success(), "{run:?}");
    // The member fills the state disk with copies of its own files until it is refused,
    // smaller and smaller ones.
    for (size, most) in [(2 * MIB, 8), (64 * 1024, 40), (4096, 40)] {
        let file = write_snapshot(&member_dir.join(format!("fill-{size}")), size, 3, 0, 0);
        let filled = (0..most).any(|n| {
            let id = format!("fill-{size}-{n}");
            let run = member.pagerctl(&daemon, &["snapshot", "add", &id, file.to_str().unwrap()]);
            if run.success() {
                return false;
            }
            refused_with(&run, 6, "space");
            true
        });
        assert!(filled, "copies of {size} bytes never filled the disk");
    }
    // A new fork cannot keep room for its record: refused at once, nothing left behind.
    refused_with(
        &daemon.pagerctl(&["fork", "create", "base", "--id", "late"]),
        6,
        "space",
    );
    assert!(daemon.client().fork("late").is_err());
    // The fork created before attaches, is recorded (its room was kept) and served.
    let socket = daemon.fork("early").handoff_socket;
    let mut vmm = testkit::Vmm::attach(&mem, &socket, &["verify", "hold"]);
    vmm.expect("verified");
    vmm.expect("holding");
    daemon.wait_for_recorded_vmm("early");
    let fork = daemon.fork("early");
    assert_eq!((fork.state, fork.record_error), (ForkState::Serving, None));
    vmm.finish();
}

#[test]
fn a_members_import_stalls_nothing_else_and_its_bytes_have_a_quota() {
    let tenants = tenants();
    let member = &tenants.member;
    let dir = tempfile::tempdir().unwrap();
    let small = write_snapshot(&dir.path().join("small"), 4 * MIB, 51, 0, 0);
    let daemon = Daemon::start(
        &[("small", &small)],
        &["--group", GROUP, "--max-snapshot-bytes-per-uid", "600M"],
    );
    let member_dir = member.own_dir(dir.path(), "member");
    // (Random bytes from the kernel: the test kit's pattern is slow to write at this size.)
    let big = member_dir.join("big");
    let out = std::process::Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=512", "status=none"])
        .arg(format!("of={}", big.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::os::unix::fs::chown(&big, Some(member.uid), Some(member.gid)).unwrap();
    // The member's 512 MiB import runs…
    let mut import = member
        .command(&binary("pagerctl"))
        .args(["snapshot", "add", "big", big.to_str().unwrap()])
        .env(proto::defaults::SOCKET_ENV, daemon.control_socket())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut progress = None;
    wait_until("the import to show", DEADLINE, || {
        progress = daemon
            .client()
            .snapshot("big")
            .ok()
            .and_then(|s| s.importing);
        progress.is_some()
    });
    assert_eq!(progress.unwrap().total_bytes, 512 * MIB);
    // …while root creates a fork and opens another snapshot's FUSE file, neither waiting.
    let run = daemon.pagerctl(&["fork", "create", "small", "--id", "meanwhile"]);
    assert!(run.success(), "{run:?}");
    let mut head = vec![0u8; 4096];
    std::fs::File::open(daemon.fuse_file("small"))
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .unwrap();
    assert_eq!(head, std::fs::read(&small).unwrap()[..4096]);
    assert!(
        daemon.client().snapshot("big").unwrap().importing.is_some(),
        "the import was still under way"
    );
    assert!(import.wait().unwrap().success());
    let info = daemon.snapshot("big");
    assert_eq!((info.importing, info.owner), (None, Some(member.uid)));
    // The same 512 MiB again would pass the member's 600 MiB; root has no quota.
    let again = member.pagerctl(&daemon, &["snapshot", "add", "big2", big.to_str().unwrap()]);
    refused_with(&again, 6, "--max-snapshot-bytes-per-uid");
    assert!(daemon.client().snapshot("big2").is_err());
    assert!(daemon
        .pagerctl(&["snapshot", "add", "roots", big.to_str().unwrap()])
        .success());
}
