//! pagerd keeps serving through hostile handoffs, VMMs that die mid-fault and faults it
//! cannot serve (poisoned: the VMM gets SIGBUS), and frees what a dead session held.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use proto::control::{ErrorCode, ForkClose, ForkGet};
use proto::handoff::{GuestRegionUffdMapping, HandoffRefusal};
use proto::model::{EndReason, ForkState, RefusalReason};
use serde_json::{json, Value};
use testkit::{
    borrow_all, dev_null, id, new_uffd, raw_handoff, read_reply, wait_until, write_snapshot,
    Daemon, Vmm, DEADLINE,
};

const MIB: u64 = 1 << 20;

/// A VMM that verifies the first half of the snapshot, then waits to verify the second half.
fn healthy_vmm(daemon: &Daemon, mem: &std::path::Path, fork: &str) -> Vmm {
    let socket = daemon.create_fork("base", fork);
    let mut vmm = Vmm::attach(
        mem,
        &socket,
        &["--order", "random", "verify:0:8M", "wait", "verify:8M:8M"],
    );
    vmm.expect("verified");
    vmm.expect("waiting");
    daemon.wait_fork(fork, ForkState::Serving);
    vmm
}

fn finish_healthy(vmm: Vmm) {
    let mut vmm = vmm;
    vmm.resume();
    let events = vmm.finish();
    let second = events
        .iter()
        .filter(|e| e["event"] == "verified")
        .nth(1)
        .expect("second verify");
    assert_eq!(second["report"]["bytes"], 8 * MIB);
}

#[test]
fn a_vmm_killed_mid_fault_is_reaped_and_nothing_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 11, 5, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let healthy = healthy_vmm(&daemon, &mem, "healthy");
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());
    for round in 0..3 {
        let fork = format!("victim{round}");
        let socket = daemon.create_fork("base", &fork);
        let mut vmm = Vmm::attach(&mem, &socket, &["churn"]);
        vmm.expect("churning");
        let faults_then = daemon.fork(&fork).stats.faults;
        wait_until("the victim to keep faulting", DEADLINE, || {
            daemon.fork(&fork).stats.faults > faults_then
        });
        vmm.kill();
        let record = daemon.wait_fork(&fork, ForkState::Ended);
        assert_eq!(record.end_reason, Some(EndReason::VmmExited), "{record:?}");
        let status = daemon.status();
        assert_eq!(
            status.forks.serving, 1,
            "only the healthy fork is served: {status:?}"
        );
        let sessions: usize = status.worker_sessions.iter().sum();
        assert_eq!(sessions, 1, "{status:?}");
        daemon.close_fork(&fork);
        assert_eq!(
            daemon.error_code(ForkGet { fork: id(&fork) }),
            ErrorCode::NotFound
        );
    }
    daemon.wait_for_fd_count(fds_before, &listing_before);
    finish_healthy(healthy);
}

/// The refusal in a handoff reply (panics if there is no reply or it is not a refusal).
fn refusal(reply: Option<proto::handoff::HandoffReply>) -> HandoffRefusal {
    let reply = reply.expect("a reply");
    assert!(!reply.ok, "{reply:?}");
    reply.error.expect("a refusal")
}

/// A well-formed one-region message for a 16 MiB snapshot.
fn region_json(base: u64, size: u64, offset: u64, page_size: u64) -> Value {
    json!({"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page_size})
}

#[test]
fn malformed_handoffs_are_refused_while_a_healthy_fork_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 12, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--handoff-timeout-ms", "1500"]);
    let healthy = healthy_vmm(&daemon, &mem, "healthy");
    let target = daemon.create_fork("base", "target");
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());

    let base = 0x7f00_0000_0000_u64;
    // A message as a VMM sends it: only the descriptors that come with it are wrong.
    let good = proto::handoff::encode(&[GuestRegionUffdMapping {
        base_host_virt_addr: base,
        size: MIB,
        offset: 0,
        page_size: 4096,
    }]);
    let json_of = |v: Value| v.to_string().into_bytes();
    let uffd = || vec![new_uffd()];
    use RefusalReason as R;
    let cases: Vec<(RefusalReason, Vec<u8>, Vec<std::os::fd::OwnedFd>)> = vec![
        (R::NoFd, good.clone(), vec![]),
        (R::SeveralFds, good.clone(), vec![new_uffd(), dev_null()]),
        (
            R::SeveralFds,
            good.clone(),
            vec![new_uffd(), new_uffd(), new_uffd(), dev_null(), dev_null()],
        ),
        (R::NotUserfaultfd, good.clone(), vec![dev_null()]),
        (R::InvalidJson, b"{nope".to_vec(), uffd()),
        (
            R::InvalidJson,
            json_of(json!([{"base_host_virt_addr": "x", "size": 1, "offset": 0}])),
            uffd(),
        ),
        (R::InvalidJson, json_of(json!({"regions": []})), uffd()),
        (R::NoRegions, b"[]".to_vec(), uffd()),
        (
            R::Unaligned,
            json_of(json!([region_json(base, MIB + 1, 0, 4096)])),
            uffd(),
        ),
        (
            R::Unaligned,
            json_of(json!([region_json(base + 512, MIB, 0, 4096)])),
            uffd(),
        ),
        (
            R::Unaligned,
            json_of(json!([region_json(base, MIB, 100, 4096)])),
            uffd(),
        ),
        (
            R::Unaligned,
            json_of(json!([region_json(base, MIB, 0, 2 * MIB)])),
            uffd(),
        ),
        (
            R::UnsupportedPageSize,
            json_of(json!([region_json(base, MIB, 0, 8192)])),
            uffd(),
        ),
        (
            R::UnsupportedPageSize,
            json_of(json!([region_json(base, MIB, 0, 0)])),
            uffd(),
        ),
        (
            R::Overlap,
            json_of(json!([
                region_json(base, 2 * MIB, 0, 4096),
                region_json(base + MIB, MIB, 4 * MIB, 4096)
            ])),
            uffd(),
        ),
        (
            R::PastEndOfFile,
            json_of(json!([region_json(base, 2 * MIB, 15 * MIB, 4096)])),
            uffd(),
        ),
        (
            R::Overflow,
            json_of(json!([region_json(u64::MAX - 4095, 8192, 0, 4096)])),
            uffd(),
        ),
        (
            R::EmptyRegion,
            json_of(json!([region_json(base, 0, 0, 4096)])),
            uffd(),
        ),
        (
            R::PageSizeMismatch,
            json_of(
                json!([{"base_host_virt_addr": base, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 4}]),
            ),
            uffd(),
        ),
        (
            R::TooLarge,
            [b"[".as_slice(), &vec![b' '; 2 * MIB as usize]].concat(),
            uffd(),
        ),
    ];
    for (reason, bytes, fds) in &cases {
        let reply = raw_handoff(&target, bytes, &borrow_all(fds))
            .unwrap_or_else(|| panic!("no reply for {reason:?}"));
        assert!(!reply.ok, "{reason:?}: {reply:?}");
        assert_eq!(reply.fork, None, "{reply:?}");
        let error = reply.error.expect("a refusal");
        assert_eq!(error.reason, *reason, "{error:?}");
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
        let record = daemon.fork("target");
        assert_eq!(
            record.state,
            ForkState::Waiting,
            "a refused handoff leaves the fork waiting"
        );
        let last = record.last_handoff_error.expect("the refusal is kept");
        assert_eq!(last.reason, *reason);
        assert_eq!(last.message, error.message);
    }

    // A client that connects and closes without a word, and one that says nothing at all.
    let quitter = UnixStream::connect(&target).unwrap();
    quitter.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(refusal(read_reply(&quitter)).reason, R::Incomplete);
    let silent = UnixStream::connect(&target).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(refusal(read_reply(&silent)).reason, R::TimedOut);
    // A message split across writes, its fd on the first: still refused for its content only.
    let split = UnixStream::connect(&target).unwrap();
    let msg = json_of(json!([region_json(base, MIB, 16 * MIB, 4096)]));
    let fd = new_uffd();
    proto::fdpass::send_with_fds(&split, &msg[..10], &[fd.as_fd()]).unwrap();
    (&split).write_all(&msg[10..]).unwrap();
    assert_eq!(refusal(read_reply(&split)).reason, R::PastEndOfFile);
    drop((quitter, silent, split));

    // Every descriptor that came with a refused handoff was closed.
    daemon.wait_for_fd_count(fds_before, &listing_before);
    finish_healthy(healthy);

    // The target fork was not harmed: a real VMM can still use it.
    let vmm = Vmm::attach(&mem, &target, &["verify"]);
    let events = vmm.finish();
    assert!(events.iter().any(|e| e["event"] == "verified"));
    assert_eq!(daemon.wait_fork("target", ForkState::Ended).stats.errors, 0);
}

#[test]
fn a_fault_outside_every_declared_region_is_counted_and_poisoned() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 16 * MIB, 13, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let socket = daemon.create_fork("base", "sly");
    let mut vmm = Vmm::attach(
        &mem,
        &socket,
        &[
            "--region",
            "4M@0",
            "--undeclared-tail",
            "64K",
            "verify",
            "touch-outside",
            "hold",
        ],
    );
    vmm.expect("verified");
    // pagerd has no bytes for that page: it poisons it, and the access kills the VMM with
    // SIGBUS instead of hanging it.
    let (status, events) = vmm.wait_exit();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGBUS),
        "{status:?}; {events:?}"
    );
    let record = daemon.wait_fork("sly", ForkState::Ended);
    assert_eq!(record.end_reason, Some(EndReason::VmmExited), "{record:?}");
    assert_eq!(record.stats.outside_faults, 1, "{record:?}");
    assert_eq!(record.stats.poisoned_pages, 1, "{record:?}");
    assert_eq!(record.stats.errors, 0, "{record:?}");
}

#[test]
fn one_vmm_per_fork_and_closing_a_serving_fork_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 14, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let (fds_before, listing_before) = (daemon.fd_count(), daemon.fd_listing());
    let socket = daemon.create_fork("base", "solo");
    let mut vmm = Vmm::attach(&mem, &socket, &["verify", "hold"]);
    vmm.expect("holding");
    daemon.wait_fork("solo", ForkState::Serving);
    // A second VMM cannot take over: it is told so, and its uffd is closed.
    let second = new_uffd();
    let message = json!([region_json(0x7f00_0000_0000, MIB, 0, 4096)]).to_string();
    let reply = raw_handoff(&socket, message.as_bytes(), &[second.as_fd()]).unwrap();
    let refusal = reply.error.expect("refused");
    assert_eq!(refusal.reason, RefusalReason::AlreadyServing, "{refusal:?}");
    drop(second);
    let closed = daemon.close_fork("solo");
    assert_eq!(closed.id, id("solo"));
    assert_eq!(
        daemon.error_code(ForkClose { fork: id("solo") }),
        ErrorCode::NotFound
    );
    daemon.wait_for_fd_count(fds_before, &listing_before);
    vmm.kill();
}
