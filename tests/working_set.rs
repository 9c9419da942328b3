//! Working sets: recorded from a snapshot's first forks, stored beside it, replayed into new
//! forks before their guests ask, and graduation (every page installed, then pagerd lets go).
//! Every fork is a synthetic VMM that checks every byte it reads against the snapshot.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use proto::model::{EndReason, ForkInfo, ForkState};
use proto::prefetch::Prefetch;
use serde_json::Value;
use testkit::{cached_kib, wait_until, write_snapshot, zero_pages_in, Daemon, SmallTmpfs, Vmm};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs a synthetic VMM on a new fork of `base` with `prefetch`, `args` and `steps`, to its
/// end; returns its events and the fork's record.
fn run_fork(
    daemon: &Daemon,
    fork: &str,
    prefetch: Option<Prefetch>,
    mem: &Path,
    args: &[&str],
    steps: &[&str],
) -> (Vec<Value>, ForkInfo) {
    let socket = daemon.create_fork_with("base", fork, prefetch);
    let mut all = vec![
        "--snapshot",
        mem.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    all.extend_from_slice(steps);
    let events = Vmm::spawn(&all).finish();
    (events, daemon.wait_fork(fork, ForkState::Ended))
}

fn verified_pages(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| e["event"] == "verified")
        .map(|e| e["report"]["pages"].as_u64().unwrap())
        .sum()
}

fn wait_for_working_set(daemon: &Daemon) -> proto::prefetch::WorkingSetInfo {
    let mut found = None;
    wait_until("the working set to be stored", DEADLINE, || {
        found = daemon.snapshot("base").working_set;
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn the_first_forks_record_a_set_that_later_forks_get_before_they_fault() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 11, 0, 0);
    // The daemon's defaults: the first two forks record, later forks replay.
    let daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "2"]);
    let hot = ["--order", "hot", "--percent", "10"];
    let hot_pages = (size / 4096 * 10).div_ceil(100);
    let mut recorded_faults = 0;
    for (fork, seed) in [("rec1", "1"), ("rec2", "2")] {
        let mut args = hot.to_vec();
        args.extend(["--seed", seed]);
        let (events, info) = run_fork(&daemon, fork, None, &mem, &args, &["verify"]);
        assert_eq!(verified_pages(&events), hot_pages);
        assert_eq!(
            info.stats.replayed_pages, 0,
            "a recording fork replays nothing"
        );
        assert!(info.stats.recorded_pages >= hot_pages, "{:?}", info.stats);
        recorded_faults += info.stats.faults;
    }
    let set = wait_for_working_set(&daemon);
    assert_eq!(set.forks_recorded, 2);
    assert!(
        set.pages >= hot_pages && set.pages <= hot_pages + hot_pages / 10,
        "both forks read the same {hot_pages} pages; the set holds {}",
        set.pages
    );
    assert!(set.runs <= set.pages);
    let file = daemon.state_dir().join("snapshots/base/working-set");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), set.file_bytes);
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "guest memory is private"
    );
    assert!(daemon.snapshot("base").recording.is_none());

    // A fork that waits until its set is in, then reads: (almost) no faults.
    let socket = daemon.create_fork("base", "warm");
    let mut args = vec!["--snapshot", mem.to_str().unwrap(), "--socket"];
    args.push(socket.to_str().unwrap());
    args.extend(hot);
    args.extend(["--seed", "3", "wait", "verify"]);
    let mut vmm = Vmm::spawn(&args);
    vmm.expect("waiting");
    wait_until("the set to be replayed", DEADLINE, || {
        daemon.fork("warm").stats.replayed_pages >= hot_pages
    });
    vmm.resume();
    let events = vmm.finish();
    assert_eq!(verified_pages(&events), hot_pages);
    let info = daemon.wait_fork("warm", ForkState::Ended);
    assert_eq!(info.prefetch, Prefetch::WorkingSet);
    assert_eq!(info.stats.replayed_pages, set.pages, "{:?}", info.stats);
    assert!(
        info.stats.faults * 100 <= recorded_faults / 2,
        "a replayed fork faults at most 1% as often as a recording one: {} vs {}",
        info.stats.faults,
        recorded_faults / 2
    );

    // A fork that reads at once races replay: every byte is still right, every page is
    // installed exactly once (by replay or by its fault).
    let mut args = hot.to_vec();
    args.extend(["--seed", "4"]);
    let (events, info) = run_fork(&daemon, "racing", None, &mem, &args, &["verify"]);
    assert_eq!(verified_pages(&events), hot_pages);
    let s = &info.stats;
    assert!(s.replayed_pages > 0, "{s:?}");
    assert_eq!(s.errors, 0);

    // Prefetch off: on demand, as before.
    let (_, info) = run_fork(
        &daemon,
        "cold",
        Some(Prefetch::Off),
        &mem,
        &hot,
        &["verify"],
    );
    assert_eq!(info.stats.replayed_pages, 0);
    assert!(info.stats.faults >= hot_pages / 2, "{:?}", info.stats);

    // The set survives a restart, and is shown by pagerctl.
    let mut daemon = daemon;
    daemon.respawn();
    assert_eq!(daemon.snapshot("base").working_set, Some(set.clone()));
    let out = daemon.pagerctl(&["snapshot", "get", "base"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("working set: {} pages", set.pages)),
        "{}",
        out.stdout
    );
    let (_, info) = run_fork(&daemon, "after-restart", None, &mem, &hot, &["verify"]);
    assert_eq!(
        info.stats.replayed_pages + info.stats.prefetch_skipped,
        set.pages
    );

    // Cleared: the file goes, forks are served on demand (and, by default, record anew).
    let cleared = daemon.client().clear_working_set("base").unwrap();
    assert!(cleared.working_set.is_none());
    assert!(!file.exists());
    // The daemon's totals count what prefetch did.
    let out = daemon.pagerctl(&["stats"]);
    assert!(out.success(), "{}", out.stderr);
    let totals = daemon.client().stats().unwrap().totals;
    assert!(
        totals.replayed_pages + totals.prefetch_skipped >= set.pages,
        "since the restart one fork replayed the set: {totals:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "prefetched: {} pages replayed",
            totals.replayed_pages
        )),
        "{}",
        out.stdout
    );
    // Deleted with its snapshot.
    daemon.client().record_working_set("base", Some(1)).unwrap();
    let (_, info) = run_fork(&daemon, "again", None, &mem, &hot, &["verify"]);
    assert!(info.recording || info.stats.recorded_pages > 0, "{info:?}");
    wait_for_working_set(&daemon);
    assert!(file.exists());
    // Ended forks hold no reference: the snapshot goes, and its set with it.
    daemon.delete_snapshot("base", false);
    assert!(!file.exists());
}

#[test]
fn replay_keeps_guest_writes_and_pages_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 12, 0, 16 * MIB);
    let daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "0"]);
    // The whole snapshot is the working set.
    daemon.client().record_working_set("base", Some(1)).unwrap();
    run_fork(&daemon, "rec", None, &mem, &[], &["verify"]);
    let set = wait_for_working_set(&daemon);
    assert_eq!(set.pages, size / 4096);
    assert_eq!(set.zero_pages, zero_pages_in(&mem));

    // The guest writes every page while replay runs: every write stays (a later verify
    // expects the stamp), and every page is installed exactly once.
    let (events, info) = run_fork(&daemon, "writer", None, &mem, &[], &["stamp:77", "verify"]);
    assert_eq!(verified_pages(&events), size / 4096);
    let s = &info.stats;
    assert_eq!(
        s.replayed_pages + s.pages_copied + s.zero_pages,
        size / 4096,
        "{s:?}"
    );
    assert!(s.replayed_pages > 0);

    // The guest gives memory back while replay runs: those pages read as zeros afterwards.
    let (events, info) = run_fork(
        &daemon,
        "balloon",
        None,
        &mem,
        &[],
        &["dontneed:0:96M", "verify", "dontneed:32M:64M", "verify"],
    );
    assert_eq!(verified_pages(&events), 2 * size / 4096);
    assert!(info.stats.removes >= 2, "{:?}", info.stats);
    assert_eq!(info.stats.errors, 0);
}

#[test]
fn a_graduated_fork_needs_pagerd_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 13, 0, 8 * MIB);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "0"]);
    daemon.client().record_working_set("base", Some(1)).unwrap();
    let hot = ["--order", "hot", "--percent", "10"];
    run_fork(&daemon, "rec", None, &mem, &hot, &["verify"]);
    let set = wait_for_working_set(&daemon);

    let socket = daemon.create_fork_with("base", "grad", Some(Prefetch::Graduate));
    let mut args = vec!["--snapshot", mem.to_str().unwrap(), "--socket"];
    args.push(socket.to_str().unwrap());
    args.extend(["wait", "verify", "wait", "dontneed:0:4M", "verify", "hold"]);
    let mut vmm = Vmm::spawn(&args);
    vmm.expect("waiting");
    let info = daemon.wait_fork("grad", ForkState::Ended);
    assert_eq!(info.end_reason, Some(EndReason::Graduated), "{info:?}");
    let s = &info.stats;
    assert_eq!(s.faults, 0, "nothing faulted: {s:?}");
    assert_eq!(s.replayed_pages, set.pages, "{s:?}");
    assert_eq!(s.replayed_pages + s.graduated_pages, size / 4096, "{s:?}");
    // Its reference is released with its session.
    wait_until("the graduated fork's reference to go", DEADLINE, || {
        daemon.ref_count("base") == Some(0)
    });

    // pagerd is gone: the guest still reads every byte, and memory it gives back reads as
    // zeros (the kernel's, no longer a uffd's).
    daemon.sigkill();
    vmm.resume();
    assert_eq!(vmm.expect("verified")["report"]["pages"], size / 4096);
    vmm.expect("waiting");
    vmm.resume();
    let report = vmm.expect("verified")["report"].clone();
    assert_eq!(report["removed_pages"], 1024, "{report}");
    vmm.expect("holding");
    vmm.close_stdin();
    let (status, _) = vmm.wait_exit();
    assert!(status.success());
}

#[test]
fn an_unusable_stored_set_is_reported_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 14, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "1"]);
    let hot = ["--order", "hot", "--percent", "10"];
    run_fork(&daemon, "rec", None, &mem, &hot, &["verify"]);
    let set = wait_for_working_set(&daemon);
    let file = daemon.state_dir().join("snapshots/base/working-set");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4100] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    daemon.respawn();
    let info = daemon.snapshot("base");
    assert!(info.working_set.is_none());
    let why = info.working_set_error.expect("the damage is reported");
    assert!(why.contains("checksum"), "{why}");
    // The next fork is served on demand, records, and its set replaces the damaged file.
    let (events, fork) = run_fork(&daemon, "next", None, &mem, &hot, &["verify"]);
    assert_eq!(
        verified_pages(&events),
        (16 * MIB / 4096 * 10).div_ceil(100)
    );
    assert_eq!(fork.stats.replayed_pages, 0);
    let new = wait_for_working_set(&daemon);
    assert_eq!(new.pages, set.pages);
    assert!(daemon.snapshot("base").working_set_error.is_none());
}

#[test]
fn recording_requests_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 15, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let client = daemon.client();
    for forks in [0, 17] {
        let err = client.record_working_set("base", Some(forks)).unwrap_err();
        assert_eq!(
            err.code(),
            Some(proto::control::ErrorCode::InvalidArgument),
            "{err:?}"
        );
    }
    let err = client.record_working_set("nope", Some(1)).unwrap_err();
    assert_eq!(err.code(), Some(proto::control::ErrorCode::NotFound));
    let info = client.record_working_set("base", Some(3)).unwrap();
    let recording = info.recording.expect("armed");
    assert_eq!(recording.forks_wanted, 3);
    assert!(!recording.automatic);
    let out = daemon.pagerctl(&["snapshot", "record", "base", "--forks", "2"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("recording: 2 fork(s) to come"),
        "{}",
        out.stdout
    );
    let out = daemon.pagerctl(&["snapshot", "clear-working-set", "base"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(daemon.snapshot("base").recording.is_none());
    let out = daemon.pagerctl(&["fork", "create", "base", "--prefetch", "sometimes"]);
    assert_eq!(out.code, Some(2), "a usage error: {}", out.stderr);
    let out = daemon.pagerctl(&[
        "fork",
        "create",
        "base",
        "--id",
        "g",
        "--prefetch",
        "graduate",
    ]);
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(daemon.fork("g").prefetch, Prefetch::Graduate);
}

#[test]
fn the_cached_memory_file_starts_warm_with_the_working_set() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 16, 0, 0);
    let daemon = Daemon::start(
        &[("base", &mem)],
        &["--fuse", "cached", "--record-forks", "0"],
    );
    daemon.client().record_working_set("base", Some(1)).unwrap();
    let hot = ["--order", "hot", "--percent", "10"];
    run_fork(&daemon, "rec", None, &mem, &hot, &["verify"]);
    let set = wait_for_working_set(&daemon);
    let file = daemon.fuse_file("base");
    // The first open pushes the set into the file's page cache (nothing reads the file: an
    // open reads nothing, and cachestat only counts).
    let held = std::fs::File::open(&file).unwrap();
    let want_kib = (set.pages - set.zero_pages) * 4;
    wait_until(
        "the working set in the memory file's cache",
        DEADLINE,
        || cached_kib(&file) >= want_kib,
    );
    // A fork mapping the file reads its hot pages, every byte right.
    let mut args = vec!["--snapshot", mem.to_str().unwrap(), "--memory-file"];
    args.push(file.to_str().unwrap());
    args.extend(hot);
    args.push("verify");
    let events = Vmm::spawn(&args).finish();
    assert_eq!(verified_pages(&events), (size / 4096 * 10).div_ceil(100));
    drop(held);
}

/// Drops the page cache of `path` (pages nobody maps).
fn drop_cache(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

#[test]
fn a_set_not_in_the_page_cache_is_read_ahead_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 17, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "1"]);
    run_fork(
        &daemon,
        "rec",
        None,
        &mem,
        &["--order", "random"],
        &["verify"],
    );
    let set = wait_for_working_set(&daemon);
    // A new daemon maps the set without reading it; then its contents leave the cache.
    daemon.respawn();
    let file = daemon.state_dir().join("snapshots/base/working-set");
    drop_cache(&file);
    drop_cache(&daemon.state_dir().join("snapshots/base/memory"));
    assert!(
        cached_kib(&file) < set.file_bytes / 1024 / 4,
        "the set is out of the page cache: {} KiB cached",
        cached_kib(&file)
    );
    let socket = daemon.create_fork("base", "cold");
    let mut args = vec!["--snapshot", mem.to_str().unwrap(), "--socket"];
    args.push(socket.to_str().unwrap());
    args.extend(["--order", "random", "wait", "verify"]);
    let mut vmm = Vmm::spawn(&args);
    vmm.expect("waiting");
    wait_until("the cold set to be replayed", DEADLINE, || {
        daemon.fork("cold").stats.replayed_pages >= set.pages
    });
    vmm.resume();
    assert_eq!(verified_pages(&vmm.finish()), size / 4096);
    let info = daemon.wait_fork("cold", ForkState::Ended);
    assert_eq!(info.stats.faults, 0, "{:?}", info.stats);
}

#[test]
fn a_full_disk_loses_the_working_set_not_the_forks() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 18, 0, 0);
    // Room for the snapshot's copy, not for a set of all its pages beside it.
    let disk = SmallTmpfs::mount("6m");
    let state = disk.path().join("state");
    let daemon = Daemon::start_with_state(&state, &dir.path().join("control.sock"));
    daemon.register_snapshot("base", &mem);
    daemon.client().record_working_set("base", Some(1)).unwrap();
    let (events, _) = run_fork(&daemon, "rec", None, &mem, &[], &["verify"]);
    assert_eq!(verified_pages(&events), size / 4096);
    let mut why = None;
    wait_until("the failed store to be reported", DEADLINE, || {
        why = daemon.snapshot("base").working_set_error;
        why.is_some()
    });
    let why = why.unwrap();
    assert!(why.to_lowercase().contains("space"), "{why}");
    let info = daemon.snapshot("base");
    assert!(info.working_set.is_none(), "{info:?}");
    let mut names: Vec<String> = std::fs::read_dir(state.join("snapshots/base"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["memory", "snapshot.json", "zero-map"],
        "no half-written set is left"
    );
    // Forks go on being served, every byte right.
    let (events, fork) = run_fork(&daemon, "next", None, &mem, &[], &["verify"]);
    assert_eq!(verified_pages(&events), size / 4096);
    assert_eq!(fork.stats.errors, 0);
    drop(daemon);
}

#[test]
fn damaged_contents_are_never_installed_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 15, 0, 0);
    let mut daemon = Daemon::start(&[("base", &mem)], &["--record-forks", "1"]);
    let hot = ["--order", "hot", "--percent", "10"];
    run_fork(&daemon, "rec", None, &mem, &hot, &["verify"]);
    let set = wait_for_working_set(&daemon);
    // One flipped bit in the first stored page: the header, run table and sums still match.
    let file = daemon.state_dir().join("snapshots/base/working-set");
    let mut bytes = std::fs::read(&file).unwrap();
    let data_offset = u64::from_le_bytes(bytes[72..80].try_into().unwrap()) as usize;
    bytes[data_offset + 100] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    daemon.respawn();
    assert_eq!(daemon.snapshot("base").working_set, Some(set.clone()));
    // The replaying fork reads every page it touches byte for byte as the snapshot has it.
    let (events, fork) = run_fork(&daemon, "next", None, &mem, &hot, &["verify"]);
    assert_eq!(
        verified_pages(&events),
        (16 * MIB / 4096 * 10).div_ceil(100)
    );
    let skipped_block = 16;
    assert!(
        fork.stats.replayed_pages > 0
            && fork.stats.replayed_pages + fork.stats.prefetch_skipped + skipped_block
                >= set.pages - set.zero_pages
            && fork.stats.replayed_pages < set.pages,
        "the damaged block alone is left to faults: {:?} of {set:?}",
        fork.stats
    );
    let why = daemon
        .snapshot("base")
        .working_set_error
        .expect("the damage is reported");
    assert!(why.contains("do not match their checksums"), "{why}");
}
