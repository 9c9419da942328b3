//! Real KVM guests on pagerd-served memory: `kvm-vmm` hands its uffd to a real pagerd, then a
//! CPL3 guest checksums every MiB of its memory, so every page reaches the guest through a
//! fault KVM takes from kernel context. The guest's checksums are compared with checksums of
//! the snapshot file computed by the same definition (`test_vmms::kvm::guest`), for one VM, two
//! VMs at once, and a VM that writes to its memory next to siblings that must not see it; and
//! guests whose memory is the FUSE memory file mapped `MAP_PRIVATE` (both read paths).

use std::path::Path;

use proto::model::{EndReason, ForkState};
use test_vmms::kvm::guest;
use testkit::{write_snapshot, Daemon, Vmm};

const MIB: u64 = 1 << 20;
const IMAGE: u64 = 64 * MIB;

/// Starts `kvm-vmm` on `mem`, handing off to `socket`, with extra arguments.
fn start_kvm(mem: &Path, socket: &Path, extra: &[&str]) -> Vmm {
    let mut args = vec![
        "--snapshot".to_owned(),
        mem.display().to_string(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Vmm::spawn_binary("kvm-vmm", &args)
}

/// Waits for the guest's per-MiB checksums.
fn checksums(vmm: &mut Vmm) -> Vec<u64> {
    let event = vmm.expect("checksums");
    event["mib"]
        .as_array()
        .unwrap_or_else(|| panic!("no checksum list in {event}"))
        .iter()
        .map(|v| v.as_u64().expect("checksum is a u64"))
        .collect()
}

/// A 64 MiB snapshot with pseudo-random bytes, every 5th page zero and a zero tail.
fn snapshot(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let mem = write_snapshot(&dir.join("mem"), IMAGE, 0x6b766d, 5, 3 * MIB);
    let bytes = std::fs::read(&mem).expect("read snapshot");
    (mem, bytes)
}

/// Asserts a fork ended because its VMM exited, with every page of the image served and no
/// errors.
fn assert_served_whole_image(daemon: &Daemon, fork: &str) {
    let record = daemon.wait_fork(fork, ForkState::Ended);
    assert_eq!(record.end_reason, Some(EndReason::VmmExited), "{record:?}");
    let stats = &record.stats;
    assert_eq!(
        stats.pages_copied + stats.zero_pages,
        IMAGE / 4096,
        "every page of the image was served by pagerd: {stats:?}"
    );
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.outside_faults, 0, "{stats:?}");
}

/// Compares checksum lists MiB by MiB, naming the first MiB that differs.
fn assert_checksums(who: &str, got: &[u64], expected: &[u64]) {
    assert_eq!(got.len(), expected.len(), "{who}: number of MiB");
    if let Some(mib) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        panic!(
            "{who}: MiB {mib} has checksum {:#018x}, expected {:#018x}",
            got[mib], expected[mib]
        );
    }
}

#[test]
fn guest_checksums_of_a_served_image_match_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mem, bytes) = snapshot(dir.path());
    let expected = guest::checksums(&bytes);
    assert_eq!(expected.len() as u64, IMAGE / MIB);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let socket = daemon.create_fork("base", "vm1");
    let mut vmm = start_kvm(&mem, &socket, &[]);
    vmm.expect("handed_off");
    let got = checksums(&mut vmm);
    assert_checksums("vm1", &got, &expected);
    vmm.finish();
    assert_served_whole_image(&daemon, "vm1");
}

#[test]
fn two_vms_from_one_snapshot_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mem, bytes) = snapshot(dir.path());
    let expected = guest::checksums(&bytes);
    let daemon = Daemon::start(&[("base", &mem)], &[]);
    let sockets = [
        daemon.create_fork("base", "a"),
        daemon.create_fork("base", "b"),
    ];
    // Both start before either is waited for, and each holds its VM until both reported.
    let mut a = start_kvm(&mem, &sockets[0], &["--hold"]);
    let mut b = start_kvm(&mem, &sockets[1], &["--hold"]);
    a.expect("handed_off");
    b.expect("handed_off");
    assert_eq!(
        daemon.wait_fork("a", ForkState::Serving).state,
        ForkState::Serving
    );
    assert_eq!(
        daemon.wait_fork("b", ForkState::Serving).state,
        ForkState::Serving
    );
    let got_a = checksums(&mut a);
    let got_b = checksums(&mut b);
    a.expect("holding");
    b.expect("holding");
    assert_checksums("a", &got_a, &expected);
    assert_checksums("b", &got_b, &expected);
    a.finish();
    b.finish();
    assert_served_whole_image(&daemon, "a");
    assert_served_whole_image(&daemon, "b");
}

#[test]
fn a_vm_sees_its_own_writes_and_siblings_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (mem, bytes) = snapshot(dir.path());
    let write_mib = 8;
    let plain = guest::checksums(&bytes);
    let written = guest::checksums_after_writes(&bytes, write_mib);
    // The pattern changes every MiB it covers and nothing else.
    for mib in 0..plain.len() {
        assert_eq!(
            plain[mib] == written[mib],
            mib as u64 >= write_mib,
            "MiB {mib}"
        );
    }
    let daemon = Daemon::start(&[("base", &mem)], &[]);

    // A sibling reads everything first and stays alive.
    let socket = daemon.create_fork("base", "before");
    let mut before = start_kvm(&mem, &socket, &["--hold"]);
    assert_checksums("before", &checksums(&mut before), &plain);
    before.expect("holding");

    // The writer overwrites its first 8 MiB and reads back its own bytes; it stays alive, so
    // its private copies exist while the next sibling reads.
    let socket = daemon.create_fork("base", "writer");
    let mib_arg = write_mib.to_string();
    let mut writer = start_kvm(&mem, &socket, &["--write-mib", &mib_arg, "--hold"]);
    assert_checksums("writer", &checksums(&mut writer), &written);
    writer.expect("holding");

    // A sibling started while the writer holds its written memory still reads the snapshot.
    let socket = daemon.create_fork("base", "after");
    let mut after = start_kvm(&mem, &socket, &["--hold"]);
    assert_checksums("after", &checksums(&mut after), &plain);
    after.expect("holding");

    // All three were alive together; the snapshot file itself is untouched.
    for fork in ["before", "writer", "after"] {
        assert_eq!(daemon.fork(fork).state, ForkState::Serving, "{fork}");
    }
    before.finish();
    writer.finish();
    after.finish();
    for fork in ["before", "writer", "after"] {
        assert_served_whole_image(&daemon, fork);
    }
    assert!(
        std::fs::read(&mem).expect("reread snapshot") == bytes,
        "the snapshot file changed"
    );
}

#[test]
fn guests_run_on_the_fuse_memory_file_mapped_privately() {
    let dir = tempfile::tempdir().unwrap();
    let (mem, bytes) = snapshot(dir.path());
    let write_mib = 4;
    let plain = guest::checksums(&bytes);
    let written = guest::checksums_after_writes(&bytes, write_mib);
    for mode in ["cached", "passthrough"] {
        let daemon = Daemon::start(&[("base", &mem)], &["--fuse", mode]);
        let file = daemon.fuse_file("base");
        let file_arg = file.display().to_string();
        let start = |extra: &[&str]| {
            let mut args = vec![
                "--snapshot",
                mem.to_str().unwrap(),
                "--memory-file",
                &file_arg,
            ];
            args.extend_from_slice(extra);
            Vmm::spawn_binary("kvm-vmm", &args)
        };
        // A writer and a reader at once: the writer's pages stay its own.
        let mib_arg = write_mib.to_string();
        let mut writer = start(&["--write-mib", &mib_arg, "--hold"]);
        writer.expect("mapped");
        assert_checksums(&format!("{mode} writer"), &checksums(&mut writer), &written);
        writer.expect("holding");
        let mut reader = start(&["--hold"]);
        reader.expect("mapped");
        assert_checksums(&format!("{mode} reader"), &checksums(&mut reader), &plain);
        reader.expect("holding");
        let users = daemon.file_users();
        assert_eq!(
            users.len(),
            2,
            "{mode}: both VMMs hold the memory file: {users:?}"
        );
        writer.finish();
        reader.finish();
        assert!(
            std::fs::read(&file).unwrap() == bytes,
            "{mode}: the memory file changed"
        );
    }
}
