//! pagerd against VMMs that attack it through their uffd or their handoff. Every attack runs
//! beside a victim: a synthetic VMM of another snapshot, served by the same (only) worker, that
//! verifies a fresh range of its memory byte for byte whenever asked. It must keep making
//! progress before, during and after each attack.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::control::{ErrorCode, ForkGet};
use proto::handoff::HandoffReply;
use proto::model::{EndReason, ForkInfo, ForkState, RefusalReason};
use serde_json::{json, Value};
use testkit::{
    borrow_all, dev_null, id, new_uffd, raw_handoff, refused, write_snapshot, Daemon, HugePages,
    Vmm, DEADLINE,
};

const MIB: u64 = 1 << 20;
/// What the victim verifies per round.
const CHUNK: u64 = 256 * 1024;
/// The victim's memory file: room for 64 rounds.
const VICTIM_SIZE: u64 = 16 * MIB;

/// A healthy VMM on the same worker as the attacker.
struct Victim {
    vmm: Vmm,
    socket: PathBuf,
    faults: u64,
}

impl Victim {
    /// Forks snapshot `victim` as fork `victim` and attaches a VMM that verifies its first
    /// range, then one more range per [`progress`](Self::progress).
    fn start(daemon: &Daemon, mem: &Path) -> Self {
        let socket = daemon.create_fork("victim", "victim");
        let steps: Vec<String> = (0..VICTIM_SIZE / CHUNK)
            .flat_map(|i| [format!("verify:{}:{CHUNK}", i * CHUNK), "wait".to_owned()])
            .collect();
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        let mut vmm = Vmm::attach(mem, &socket, &steps);
        vmm.expect("verified");
        vmm.expect("waiting");
        let record = daemon.wait_fork("victim", ForkState::Serving);
        assert_eq!(record.state, ForkState::Serving, "{record:?}");
        let faults = record.stats.faults;
        assert!(faults > 0);
        // Descriptor counts taken next are settled once the VMM is in the fork's record.
        daemon.wait_for_recorded_vmm("victim");
        Self {
            vmm,
            socket,
            faults,
        }
    }

    /// The victim reads and checks a range it never touched: pagerd must serve its faults now.
    fn progress(&mut self, daemon: &Daemon) {
        self.vmm.resume();
        let verified = self.vmm.expect("verified");
        assert_eq!(verified["report"]["bytes"], CHUNK, "{verified}");
        self.vmm.expect("waiting");
        let record = daemon.fork("victim");
        assert_eq!(record.state, ForkState::Serving, "{record:?}");
        let faults = record.stats.faults;
        assert!(
            faults > self.faults,
            "the victim's faults were served: {record:?}"
        );
        assert_eq!(record.stats.errors, 0, "{record:?}");
        self.faults = faults;
    }
}

/// A daemon with one worker and two snapshots: `victim` (16 MiB) and `base` (`base_size`).
fn setup(dir: &Path, base_size: u64, args: &[&str]) -> (Daemon, Victim, PathBuf) {
    let victim_mem = write_snapshot(&dir.join("victim"), VICTIM_SIZE, 31, 0, 0);
    let base = write_snapshot(&dir.join("base"), base_size, 32, 0, 0);
    let mut all = vec!["--workers", "1"];
    all.extend_from_slice(args);
    let daemon = Daemon::start(&[("victim", &victim_mem), ("base", &base)], &all);
    let victim = Victim::start(&daemon, &victim_mem);
    (daemon, victim, base)
}

/// Runs `hostile-vmm` against `socket` with these options and steps.
fn hostile(socket: &Path, args: &[&str]) -> Vmm {
    let mut all = vec!["--socket".to_owned(), socket.display().to_string()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    Vmm::spawn_binary("hostile-vmm", &all)
}

/// Creates fork `fork` of `base` and starts a hostile VMM on it with `args`, whose handoff
/// pagerd accepts.
fn attach_hostile(daemon: &Daemon, fork: &str, args: &[&str]) -> Vmm {
    let socket = daemon.create_fork("base", fork);
    let mut vmm = hostile(&socket, args);
    let reply = reply(&mut vmm);
    assert!(reply.ok, "{fork}: {reply:?}");
    vmm
}

/// Waits for fork `fork`'s session to end, checks it ended for `reason`, and returns it.
fn ended(daemon: &Daemon, fork: &str, reason: EndReason) -> ForkInfo {
    let record = daemon.wait_fork(fork, ForkState::Ended);
    assert_eq!(record.end_reason, Some(reason), "{record:?}");
    record
}

/// The reply pagerd gave the hostile VMM's handoff.
fn reply(vmm: &mut Vmm) -> HandoffReply {
    serde_json::from_value(vmm.expect("reply")["reply"].clone()).expect("a handoff reply")
}

#[test]
fn a_vmm_that_clears_o_nonblock_on_its_uffd_is_cut_off_and_the_worker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    // Clearing O_NONBLOCK on its copy clears it on pagerd's too (one open file description);
    // the next fault then wakes the worker, and a plain read() would block it for good.
    let mut vmm = attach_hostile(
        &daemon,
        "hostile",
        &[
            "--size",
            "1M",
            "handoff",
            "clear-nonblock",
            "touch:0",
            "hold",
        ],
    );
    vmm.expect("nonblock_cleared");
    vmm.expect("accessing");
    ended(&daemon, "hostile", EndReason::UffdTampered);
    victim.progress(&daemon);
    victim.progress(&daemon);

    let started = Instant::now();
    daemon.close_fork("hostile");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "fork.close took {took:?}");
    victim.progress(&daemon);
    vmm.kill();
    victim.progress(&daemon);

    // SIGTERM still stops the daemon: no worker is stuck.
    let status = daemon.stop_within(DEADLINE);
    assert!(
        status.is_some_and(|s| s.success()),
        "pagerd did not stop cleanly: {status:?}"
    );
}

#[test]
fn handoffs_with_many_descriptors_leave_none_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    let target = daemon.create_fork("base", "target");
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());
    let message = json!([{"base_host_virt_addr": 0x7f00_0000_0000_u64, "size": MIB,
        "offset": 0, "page_size": 4096}])
    .to_string();
    for round in 0..200 {
        let fds: Vec<OwnedFd> = std::iter::once(new_uffd())
            .chain((0..19).map(|_| dev_null()))
            .collect();
        let reply = raw_handoff(&target, message.as_bytes(), &borrow_all(&fds))
            .unwrap_or_else(|| panic!("no reply in round {round}"));
        assert_eq!(
            reply.error.as_ref().map(|e| e.reason),
            Some(RefusalReason::SeveralFds),
            "{reply:?}"
        );
        assert!(
            reply
                .error
                .as_ref()
                .is_some_and(|e| e.message.contains("carried 20 file descriptors")),
            "every fd sent was received: {reply:?}"
        );
        if round % 50 == 49 {
            victim.progress(&daemon);
        }
    }
    daemon.wait_for_fd_count(fds_before, &listing_before);
    assert_eq!(daemon.fork("target").state, ForkState::Waiting);
    victim.progress(&daemon);
}

#[test]
fn a_uffd_with_features_pagerd_does_not_serve_is_refused_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, base) = setup(dir.path(), 4 * MIB, &[]);
    let target = daemon.create_fork("base", "target");
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());
    const EVENT_REMOVE: u64 = 0x8;
    let cases: Vec<(&str, Vec<String>)> = [
        ("EVENT_FORK", 0x2),
        ("EVENT_REMAP", 0x4),
        ("EVENT_UNMAP", 0x40),
        ("PAGEFAULT_FLAG_WP", 0x1),
        ("SIGBUS", 0x80),
        ("MINOR_SHMEM", 0x400),
    ]
    .into_iter()
    .map(|(name, bit)| {
        let features = format!("{:#x}", bit | EVENT_REMOVE);
        (name, vec!["--features".to_owned(), features])
    })
    .chain([(
        "no UFFDIO_API",
        vec![
            "--no-api".to_owned(),
            "--register".to_owned(),
            "none".to_owned(),
        ],
    )])
    .collect();
    for (name, options) in &cases {
        let mut args: Vec<&str> = options.iter().map(String::as_str).collect();
        args.extend(["--size", "1M", "handoff", "hold"]);
        let mut vmm = hostile(&target, &args);
        let reply = reply(&mut vmm);
        assert!(!reply.ok, "{name}: {reply:?}");
        assert_eq!(
            reply.error.as_ref().map(|e| e.reason),
            Some(RefusalReason::UnsupportedFeatures),
            "{name}: {reply:?}"
        );
        assert_eq!(
            reply.error.as_ref().map(|e| e.code),
            Some(ErrorCode::InvalidArgument),
            "{name}"
        );
        let record = daemon.fork("target");
        assert_eq!(record.state, ForkState::Waiting, "{name}: {record:?}");
        assert_eq!(
            record.last_handoff_error.as_ref().map(|e| e.reason),
            Some(RefusalReason::UnsupportedFeatures)
        );
        vmm.kill();
        victim.progress(&daemon);
    }
    daemon.wait_for_fd_count(fds_before, &listing_before);
    // The fork still takes a VMM that negotiates what Firecracker does.
    let vmm = Vmm::attach(&base, &target, &["verify"]);
    assert!(vmm.finish().iter().any(|e| e["event"] == "verified"));
    victim.progress(&daemon);
}

#[test]
fn write_protect_and_minor_faults_end_their_session_as_unservable() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);

    // Registered MISSING|WP: the first touch is served; a write to the page once it is
    // write-protected is a WP fault, which no copy can resolve (EEXIST, wake, fault again).
    let mut vmm = attach_hostile(
        &daemon,
        "wp",
        &[
            "--size",
            "1M",
            "--register",
            "missing,wp",
            "handoff",
            "read:0",
            "wait",
            "wp:0:4K",
            "write:0",
            "hold",
        ],
    );
    vmm.expect("read");
    vmm.expect("waiting");
    victim.progress(&daemon);
    vmm.resume();
    vmm.expect("protected");
    ended(&daemon, "wp", EndReason::UnservableFault);
    victim.progress(&daemon);
    vmm.kill();

    // Registered MINOR over shared memory whose pages are in the page cache: a minor fault,
    // which only UFFDIO_CONTINUE resolves.
    let vmm = attach_hostile(
        &daemon,
        "minor",
        &[
            "--size",
            "1M",
            "--shmem",
            "--register",
            "minor",
            "handoff",
            "touch:4K",
            "hold",
        ],
    );
    let record = ended(&daemon, "minor", EndReason::UnservableFault);
    assert_eq!(record.stats.faults, 1, "{record:?}");
    victim.progress(&daemon);
    vmm.kill();
    victim.progress(&daemon);
}

#[test]
fn a_fault_that_keeps_coming_back_for_a_present_page_is_ended_as_a_livelock() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    // The handoff declares one 2 MiB page over plain 4 KiB memory whose first page is already
    // there: every fault in it is answered with a 2 MiB copy that fails with EEXIST at once,
    // the wake sends the thread back to the same missing page, forever.
    let mut vmm = attach_hostile(
        &daemon,
        "loop",
        &[
            "--size",
            "2M",
            "--declared-page-size",
            "2M",
            "--prepopulate",
            "1",
            "handoff",
            "touch:8K",
            "hold",
        ],
    );
    vmm.expect("accessing");
    victim.progress(&daemon);
    let record = ended(&daemon, "loop", EndReason::Livelock);
    assert!(record.stats.already_present >= 4096, "{record:?}");
    victim.progress(&daemon);
    vmm.kill();
}

#[test]
fn forks_are_capped_by_max_forks_and_an_idle_fork_costs_little() {
    const MAX: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let max = MAX.to_string();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &["--max-forks", &max]);
    let (rss_before, data_before) = (daemon.status_kb("VmRSS"), daemon.status_kb("VmData"));
    // The victim is one fork already.
    for i in 1..MAX {
        daemon.create_fork("base", &format!("idle{i}"));
    }
    let (rss_after, data_after) = (daemon.status_kb("VmRSS"), daemon.status_kb("VmData"));
    let n = MAX - 1;
    let rss_per_fork = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    let data_per_fork = data_after.saturating_sub(data_before) as f64 / n as f64;
    eprintln!(
        "{n} idle forks: RSS {rss_before} -> {rss_after} KiB ({rss_per_fork:.1} KiB per fork), \
         VmData {data_before} -> {data_after} KiB ({data_per_fork:.1} KiB per fork)"
    );
    // A full-range latency histogram per fork alone was 218 KiB of allocation.
    assert!(
        data_per_fork < 64.0,
        "an idle fork allocates {data_per_fork:.1} KiB"
    );
    victim.progress(&daemon);

    let refused = refused(daemon.client().create_fork("base", Some("one-too-many")));
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
    assert!(refused.message.contains("max-forks"), "{refused:?}");
    assert_eq!(
        daemon.error_code(ForkGet {
            fork: id("one-too-many")
        }),
        ErrorCode::NotFound
    );
    daemon.close_fork("idle1");
    daemon.create_fork("base", "one-too-many");
    victim.progress(&daemon);
}

#[test]
fn a_second_vmm_on_a_served_fork_is_told_already_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());
    let message = json!([{"base_host_virt_addr": 0x7f00_0000_0000_u64, "size": MIB,
        "offset": 0, "page_size": 4096}])
    .to_string();
    for _ in 0..5 {
        let uffd = new_uffd();
        let reply = raw_handoff(&victim.socket, message.as_bytes(), &borrow_all(&[uffd]))
            .expect("a reply, not a reset");
        assert!(!reply.ok, "{reply:?}");
        assert_eq!(
            reply.error.as_ref().map(|e| e.reason),
            Some(RefusalReason::AlreadyServing),
            "{reply:?}"
        );
        assert_eq!(
            reply.error.as_ref().map(|e| e.code),
            Some(ErrorCode::Conflict),
            "{reply:?}"
        );
        victim.progress(&daemon);
    }
    daemon.wait_for_fd_count(fds_before, &listing_before);
    let record = daemon.fork("victim");
    assert_eq!(record.state, ForkState::Serving, "{record:?}");
    assert_eq!(
        record.last_handoff_error.as_ref().map(|e| e.reason),
        Some(RefusalReason::AlreadyServing)
    );
}

/// Waits for a hostile VMM to be killed by `SIGBUS` (a poisoned page), not to hang.
fn expect_sigbus(vmm: Vmm) {
    let (status, events) = vmm.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "{status:?}; events {events:?}"
    );
}

#[test]
fn a_fault_outside_every_declared_region_gets_sigbus_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    let mut vmm = attach_hostile(
        &daemon,
        "sly",
        &[
            "--size",
            "1M",
            "--undeclared-tail",
            "64K",
            "handoff",
            "read:0",
            "wait",
            "touch:1M",
            "hold",
        ],
    );
    vmm.expect("read");
    vmm.expect("waiting");
    victim.progress(&daemon);
    vmm.resume();
    expect_sigbus(vmm);
    let record = ended(&daemon, "sly", EndReason::VmmExited);
    assert_eq!(record.stats.outside_faults, 1, "{record:?}");
    assert_eq!(record.stats.poisoned_pages, 1, "{record:?}");
    victim.progress(&daemon);
}

#[test]
fn a_page_that_can_no_longer_be_read_from_the_snapshot_is_poisoned() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    let mut vmm = attach_hostile(
        &daemon,
        "shrunk",
        &[
            "--size", "4M", "handoff", "read:0", "wait", "touch:3M", "hold",
        ],
    );
    vmm.expect("read");
    vmm.expect("waiting");
    // Nothing should ever change a registered memory file, but if it shrinks, copies from the
    // lost part fail with EFAULT for good.
    let memory = daemon.state_dir().join("snapshots/base/memory");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    vmm.resume();
    expect_sigbus(vmm);
    let record = daemon.wait_fork("shrunk", ForkState::Ended);
    assert_eq!(record.stats.poisoned_pages, 1, "{record:?}");
    assert_eq!(record.stats.errors, 1, "{record:?}");
    assert_eq!(record.end_reason, Some(EndReason::VmmExited), "{record:?}");
    victim.progress(&daemon);
}

#[test]
fn a_fault_that_can_be_neither_filled_nor_poisoned_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 4 * MIB, &[]);
    let _pages = HugePages::reserve(1);
    // 2 MiB hugetlbfs memory declared as 4 KiB pages: neither a 4 KiB copy nor a 4 KiB poison
    // fits a huge page (EINVAL), so nothing can answer the fault.
    let vmm = attach_hostile(
        &daemon,
        "misfit",
        &[
            "--size",
            "2M",
            "--hugetlb",
            "--declared-page-size",
            "4K",
            "handoff",
            "touch:0",
            "hold",
        ],
    );
    let record = ended(&daemon, "misfit", EndReason::UnservableFault);
    assert_eq!(record.stats.poisoned_pages, 0, "{record:?}");
    victim.progress(&daemon);
    vmm.kill();
    victim.progress(&daemon);
}

#[test]
fn regions_that_overlap_in_the_file_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut victim, _) = setup(dir.path(), 16 * MIB, &[]);
    let target = daemon.create_fork("base", "target");
    let rss_before = daemon.status_kb("VmRSS");
    // Just under 1 MiB of JSON: 4096 regions, each the whole 16 MiB file. Served, that would
    // be 64 GiB of guest memory and its page maps, from a 16 MiB snapshot.
    let regions: Vec<Value> = (0..4096u64)
        .map(|i| {
            json!({"base_host_virt_addr": 0x1000_0000_0000_u64 + i * 16 * MIB,
                   "size": 16 * MIB, "offset": 0, "page_size": 4096})
        })
        .collect();
    let message = Value::Array(regions).to_string();
    assert!(message.len() < 1 << 20);
    let uffd = new_uffd();
    let reply = raw_handoff(&target, message.as_bytes(), &borrow_all(&[uffd])).unwrap();
    assert_eq!(
        reply.error.as_ref().map(|e| e.reason),
        Some(RefusalReason::FileOverlap),
        "{reply:?}"
    );
    assert_eq!(
        reply.error.as_ref().map(|e| e.code),
        Some(ErrorCode::InvalidArgument),
        "{reply:?}"
    );
    victim.progress(&daemon);
    let rss_after = daemon.status_kb("VmRSS");
    eprintln!("RSS around the refused handoff: {rss_before} -> {rss_after} KiB");
    assert_eq!(daemon.fork("target").state, ForkState::Waiting);
}
