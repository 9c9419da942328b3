//! Forks get the snapshot's bytes: every page read by a synthetic VMM (which restores memory
//! exactly as Firecracker does) is compared byte for byte with the memory file, for one region,
//! many regions at scattered file offsets, 2 MiB hugetlbfs pages, faults from kernel context,
//! 16 concurrent forks, and pages given back with `MADV_DONTNEED`.

use proto::model::{EndReason, ForkInfo, ForkState};
use serde_json::Value;
use testkit::{write_snapshot, zero_pages_in, Daemon, HugePages, Vmm};

const MIB: u64 = 1 << 20;

fn arg(s: impl Into<String>) -> String {
    s.into()
}

/// Runs one VMM against a fresh fork and returns the fork's record after the VMM exited.
fn serve_one(
    daemon: &Daemon,
    snapshot: &str,
    fork: &str,
    mem: &std::path::Path,
    extra: &[String],
) -> (Vec<Value>, ForkInfo) {
    let socket = daemon.create_fork(snapshot, fork);
    let mut args = vec![
        arg("--snapshot"),
        arg(mem.to_str().unwrap()),
        arg("--socket"),
        arg(socket.to_str().unwrap()),
    ];
    args.extend_from_slice(extra);
    let events = Vmm::spawn(&args).finish();
    let record = daemon.wait_fork(fork, ForkState::Ended);
    assert_eq!(record.end_reason, Some(EndReason::VmmExited), "{record:?}");
    (events, record)
}

fn verified(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["event"] == "verified")
        .map(|e| &e["report"])
        .collect()
}

#[test]
fn one_region_every_page_matches_and_zero_pages_are_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let mem = write_snapshot(&dir.path().join("mem"), size, 1, 3, 4 * MIB);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    for (fork, order) in [("seq", "sequential"), ("rand", "random")] {
        let (events, record) = serve_one(
            &daemon,
            "base",
            fork,
            &mem,
            &[arg("--order"), arg(order), arg("verify")],
        );
        let reports = verified(&events);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0]["pages"], size / 4096);
        let stats = &record.stats;
        let pages = size / 4096;
        let zero = zero_pages_in(&mem);
        assert_eq!(stats.pages_copied + stats.zero_pages, pages, "{stats:?}");
        assert_eq!(
            stats.zero_pages, zero,
            "every all-zero page answered with the zero page: {stats:?}"
        );
        assert_eq!(stats.bytes_copied, (pages - zero) * 4096);
        assert_eq!(stats.errors, 0);
        assert_eq!(stats.outside_faults, 0);
        assert!(stats.faults >= pages / 32, "{stats:?}");
        assert_eq!(stats.latency_ns.count, stats.faults, "{stats:?}");
        let latency = &stats.latency_ns;
        let (p50, p99, max) = (latency.p50, latency.p99, latency.max);
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{latency:?}");
        assert!(
            p99 > 1_000,
            "copying 64 KiB into another process takes more than 1 µs: {latency:?}"
        );
        assert!(record.vmm_pid.unwrap() > 0);
        let features = record.uffd_features.unwrap();
        assert_ne!(features & 0x8, 0, "EVENT_REMOVE negotiated: {features:#x}");
    }
}

#[test]
fn without_fault_around_each_fault_serves_one_page() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 2, 5, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--fault-around", "1"]);
    let (_, record) = serve_one(&daemon, "base", "f", &mem, &[arg("verify")]);
    let stats = &record.stats;
    assert_eq!(stats.faults, 8 * MIB / 4096, "{stats:?}");
    assert_eq!(stats.pages_copied + stats.zero_pages, 8 * MIB / 4096);
}

#[test]
fn many_regions_at_scattered_file_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 64 * MIB, 3, 7, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    // Twelve regions of different sizes, taken from the file out of order and with gaps.
    let regions = [
        "1M@40M", "64K@0", "2M@1M", "4K@8M", "3M@50M", "128K@12M", "1M@13M", "512K@20M", "5M@58M",
        "12K@30M", "1M@33M", "256K@63M",
    ];
    let mut args: Vec<String> = regions
        .iter()
        .flat_map(|r| [arg("--region"), arg(*r)])
        .collect();
    args.extend([
        arg("verify"),
        arg("--order"),
        arg("random"),
        arg("--access"),
        arg("readv"),
    ]);
    args.push(arg("verify"));
    let (events, record) = serve_one(&daemon, "base", "many", &mem, &args);
    let total: u64 = 13 * MIB + 64 * 1024 + 4096 + 128 * 1024 + 512 * 1024 + 12 * 1024 + 256 * 1024;
    for report in verified(&events) {
        assert_eq!(report["bytes"], total);
    }
    let stats = &record.stats;
    assert_eq!(
        stats.pages_copied + stats.zero_pages,
        total / 4096,
        "{stats:?}"
    );
}

#[test]
fn faults_from_kernel_context_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 4, 9, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    for (fork, access) in [("pipe", "pipe"), ("readv", "readv")] {
        let (events, record) = serve_one(
            &daemon,
            "base",
            fork,
            &mem,
            &[
                arg("--access"),
                arg(access),
                arg("--order"),
                arg("random"),
                arg("verify"),
            ],
        );
        assert_eq!(verified(&events)[0]["pages"], 16 * MIB / 4096);
        assert_eq!(record.stats.errors, 0);
    }
}

#[test]
fn hugetlbfs_2mib_pages() {
    let _pages = HugePages::reserve(16);
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 32 * MIB, 5, 0, 2 * MIB);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let args = [
        "--hugepages",
        "--region",
        "8M@0",
        "--region",
        "4M@20M",
        "--region",
        "6M@26M",
        "verify",
        "dontneed:2M:2M",
        "dontneed:16M:2M",
        "verify",
        "--order",
        "random",
        "--access",
        "pipe",
    ]
    .map(arg);
    let (events, record) = serve_one(&daemon, "base", "huge", &mem, &args);
    let reports = verified(&events);
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1]["removed_pages"], 2);
    let stats = &record.stats;
    // 9 huge pages copied, then the two given back come back as zeros.
    assert_eq!(stats.pages_copied, 9, "{stats:?}");
    assert_eq!(stats.zero_pages, 2, "{stats:?}");
    assert_eq!(stats.removes, 2, "{stats:?}");
}

#[test]
fn sixteen_forks_of_one_snapshot_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 6, 4, MIB);
    let daemon = Daemon::start(&[("base", &mem)], &["--workers", "2"]);
    let mut vmms = Vec::new();
    for i in 0..16 {
        let socket = daemon.create_fork("base", &format!("f{i}"));
        let order = if i % 2 == 0 { "random" } else { "sequential" };
        let access = ["user", "pipe", "readv", "user"][i % 4];
        let args = [
            "--snapshot",
            mem.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--order",
            order,
            "--access",
            access,
            "wait",
            "verify",
        ]
        .map(arg);
        let mut vmm = Vmm::spawn(&args);
        vmm.expect("waiting");
        daemon.wait_fork(&format!("f{i}"), ForkState::Serving);
        vmms.push(vmm);
    }
    let status = daemon.status();
    assert_eq!(status.forks.serving, 16, "{status:?}");
    assert_eq!(status.worker_sessions, [8, 8], "{status:?}");
    assert_eq!(daemon.ref_count("base"), Some(16));
    // All sixteen start faulting together.
    for vmm in &mut vmms {
        vmm.resume();
    }
    for (i, vmm) in vmms.into_iter().enumerate() {
        let events = vmm.finish();
        assert_eq!(verified(&events)[0]["pages"], 16 * MIB / 4096, "fork {i}");
    }
    for i in 0..16 {
        let record = daemon.wait_fork(&format!("f{i}"), ForkState::Ended);
        assert_eq!(record.stats.errors, 0);
    }
}

#[test]
fn pages_given_back_read_as_zeros_and_the_rest_keeps_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 7, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let args = [
        // Never touched, then given back: must read zeros, not the snapshot.
        "dontneed:1M:256K",
        "verify",
        // Touched, then given back in two pieces, one unaligned to the fault-around window.
        "dontneed:4M:64K",
        "dontneed:8M:20K",
        "verify",
        "--order",
        "random",
        // Given back again after being zero-filled, and read from kernel context.
        "dontneed:4M:4K",
        "verify:0:16M",
    ]
    .map(arg);
    let (events, record) = serve_one(&daemon, "base", "balloon", &mem, &args);
    let reports = verified(&events);
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0]["removed_pages"], 64);
    assert_eq!(reports[1]["removed_pages"], 64 + 16 + 5);
    assert_eq!(reports[2]["removed_pages"], 64 + 16 + 5);
    let stats = &record.stats;
    assert_eq!(stats.removes, 4, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    // Every page copied once; the given-back pages zero-filled each time they were read.
    assert_eq!(stats.pages_copied, 16 * MIB / 4096 - 64, "{stats:?}");
    assert_eq!(stats.zero_pages, 64 + (16 + 5) + 1, "{stats:?}");
}
