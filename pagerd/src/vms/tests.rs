//! VM supervision's decisions, over a stand-in for the lifecycle and a real state directory:
//! what a start refuses before creating anything, what a failed start leaves behind, and how
//! records move between states on stop, wait, exit, snapshot, reconciliation, deletion and
//! retention. No hypervisor runs: the ones started here are `true`, which exits at once, and
//! shell scripts that say something and exit.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::model::{ForkInfo, SnapshotInfo, VmBackend, VmInfo, VmState, VmmKind};
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId, VmId};

use super::{Slot, StartRequest, VmError, VmHost, VmOptions, Vms};
use crate::access::Access;
use crate::lifecycle::LifecycleError;
use crate::store::vms::VmRecord;
use crate::store::Store;

fn id<K: proto::ids::Kind>(s: &str) -> proto::Id<K> {
    s.parse().unwrap()
}

/// A snapshot as the lifecycle reports it: its memory file, its FUSE view's file if mounted,
/// and its hypervisor state if it has one.
pub(super) fn snapshot(fuse_file: Option<&str>, vmm: Option<VmmKind>) -> SnapshotInfo {
    let vmstate = vmm.map(
        |vmm| serde_json::json!({"vmm": vmm, "path": "/state/snapshots/s/vmstate", "size": 1}),
    );
    serde_json::from_value(serde_json::json!({
        "id": "s",
        "path": "/state/snapshots/s/memory",
        "size": 4096,
        "created_unix_ms": null,
        "source": null,
        "import": null,
        "delete_pending": false,
        "zero_pages": null,
        "ref_count": null,
        "forks": null,
        "file_users": [],
        "fuse_file": fuse_file,
        "unreadable_fork_records": [],
        "error": null,
        "vmstate": vmstate,
    }))
    .unwrap()
}

/// The lifecycle, reduced to what `vms` asks of it, remembering the calls.
#[derive(Debug, Default)]
struct FakeHost {
    snapshots: BTreeMap<SnapshotId, SnapshotInfo>,
    created_forks: Mutex<Vec<ForkId>>,
    closed_forks: Mutex<Vec<ForkId>>,
    released: Mutex<Vec<SnapshotId>>,
}

impl VmHost for FakeHost {
    fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, LifecycleError> {
        self.snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| LifecycleError::NotFound {
                kind: "snapshot",
                id: id.to_string(),
            })
    }

    fn create_fork(
        &self,
        id: ForkId,
        snapshot: &SnapshotId,
        _prefetch: Option<Prefetch>,
        owner: u32,
    ) -> Result<ForkInfo, LifecycleError> {
        self.created_forks.lock().unwrap().push(id.clone());
        Ok(serde_json::from_value(serde_json::json!({
            "id": id,
            "snapshot": snapshot,
            "owner": owner,
            "state": "waiting",
            "handoff_socket": format!("/state/sockets/{id}.sock"),
            "vmm_pid": null,
            "uffd_features": null,
            "worker": null,
            "end_reason": null,
            "last_handoff_error": null,
            "created_unix_ms": 0,
            "stats": proto::model::ForkStatsReport::default(),
        }))
        .unwrap())
    }

    fn close_fork(&self, id: &ForkId) -> Result<ForkInfo, LifecycleError> {
        self.closed_forks.lock().unwrap().push(id.clone());
        Err(LifecycleError::NotFound {
            kind: "fork",
            id: id.to_string(),
        })
    }

    fn register(
        &self,
        _id: SnapshotId,
        _memory: &Path,
        _vmstate: &Path,
        _vmm: VmmKind,
        _owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError> {
        panic!("no snapshot is registered in these tests")
    }

    fn released(&self, snapshot: &SnapshotId) {
        self.released.lock().unwrap().push(snapshot.clone());
    }
}

/// VM supervision over `host` in a fresh state directory, hypervisor binaries `binary`.
struct Fixture {
    _dir: tempfile::TempDir,
    host: Arc<FakeHost>,
    store: Store,
    vms: Arc<Vms>,
}

impl Fixture {
    fn new(snapshot_info: SnapshotInfo, binary: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("state"), Access::default()).unwrap();
        let host = Arc::new(FakeHost {
            snapshots: BTreeMap::from([(id("s"), snapshot_info)]),
            ..FakeHost::default()
        });
        let options = VmOptions {
            firecracker: Some(binary.to_owned()),
            qemu: Some(binary.to_owned()),
            console_cap: 1 << 20,
            jail: None,
            retention: None,
        };
        let vms = Vms::new(host.clone(), store.clone(), options);
        Self {
            _dir: dir,
            host,
            store,
            vms,
        }
    }

    /// A VM record in `state`, written and in the table.
    fn insert(&self, vm: &str, vmm: VmmKind, state: VmState, fork: Option<&str>) -> VmId {
        let vm = id(vm);
        let dir = self.store.create_vm_dir(&vm).unwrap();
        let record = VmRecord {
            info: VmInfo {
                id: vm.clone(),
                snapshot: id("s"),
                owner: 0,
                vmm,
                backend: VmBackend::Uffd,
                state,
                pid: None,
                fork: fork.map(id),
                memory_file: None,
                api_socket: dir.join("api.sock"),
                console_log: dir.join("console.log"),
                network_overrides: Vec::new(),
                vsock: None,
                exit_code: None,
                exit_signal: None,
                reason: None,
                last_output: None,
                created_unix_ms: 0,
                ended_unix_ms: None,
                jail: None,
            },
            start_time: None,
        };
        self.store.write_vm(&record).unwrap();
        self.vms.lock().insert(
            vm.clone(),
            Slot {
                record,
                pidfd: None,
            },
        );
        vm
    }

    /// Starts a VM that must fail to start, and returns the reason it failed for.
    fn failed_start(&self, request: StartRequest) -> String {
        let vm = request.call.vm.clone();
        match self.vms.start(request) {
            Err(VmError::StartFailed { vm: failed, reason }) => {
                assert_eq!(Some(failed), vm);
                reason
            }
            other => panic!("{other:?}"),
        }
    }

    fn on_disk(&self, vm: &VmId) -> VmInfo {
        let scan = self.store.scan_vms().unwrap();
        scan.records
            .into_iter()
            .find(|r| &r.info.id == vm)
            .expect("a record on disk")
            .info
    }
}

fn start(vm: &str, backend: VmBackend) -> StartRequest {
    StartRequest {
        call: proto::control::VmStart {
            snapshot: id("s"),
            vm: Some(id(vm)),
            backend,
            network_overrides: Vec::new(),
            vsock: None,
            prefetch: None,
        },
        owner: 1000,
    }
}

fn exits_at_once() -> PathBuf {
    vmm_glue::find_binary(
        &vmm_glue::BinaryLookup {
            display_name: "true",
            option: "--none",
            env: "PAGERD_TEST_NO_SUCH_VARIABLE",
            file_name: "true",
        },
        None,
    )
    .expect("`true` on PATH")
}

#[test]
fn a_snapshot_without_hypervisor_state_starts_nothing() {
    let f = Fixture::new(snapshot(Some("/fuse/s"), None), &exits_at_once());
    let error = f.vms.start(start("a", VmBackend::File)).unwrap_err();
    assert!(matches!(error, VmError::NoVmState(s) if s == id("s")));
    assert!(f.vms.list().is_empty());
    assert!(!f.store.vm_dir(&id("a")).exists());
}

#[test]
fn a_refused_request_creates_no_vm_and_no_fork() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s"), Some(VmmKind::Qemu)),
        &exits_at_once(),
    );
    let error = f.vms.start(start("a", VmBackend::Uffd)).unwrap_err();
    assert!(
        matches!(
            error,
            VmError::Unsupported {
                vmm: VmmKind::Qemu,
                ..
            }
        ),
        "{error}"
    );
    assert!(f.vms.list().is_empty());
    assert!(!f.store.vm_dir(&id("a")).exists());
    assert!(f.host.created_forks.lock().unwrap().is_empty());
}

#[test]
fn the_file_backend_without_the_fuse_view_is_refused() {
    let f = Fixture::new(snapshot(None, Some(VmmKind::Firecracker)), &exits_at_once());
    let error = f.vms.start(start("a", VmBackend::File)).unwrap_err();
    assert!(matches!(error, VmError::NoFuse), "{error}");
    assert!(f.vms.list().is_empty());
}

/// A stand-in hypervisor: a shell script in `dir` running `body`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_missing_binary_starts_nothing_and_names_the_daemon_option() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s"), Some(VmmKind::Firecracker)),
        Path::new("/nonexistent/firecracker"),
    );
    let error = f.vms.start(start("a", VmBackend::Uffd)).unwrap_err();
    assert!(matches!(error, VmError::NoBinary(_)), "{error}");
    assert_eq!(
        error.to_string(),
        "cannot launch: no firecracker binary at /nonexistent/firecracker, which pagerd's \
         daemon option --firecracker names; restart pagerd with --firecracker PATH naming the \
         binary"
    );
    assert!(f.vms.list().is_empty());
    assert!(!f.store.vm_dir(&id("a")).exists());
    assert!(f.host.created_forks.lock().unwrap().is_empty());
}

#[test]
fn a_binary_that_cannot_run_fails_the_vm_and_gives_back_its_fork() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("firecracker");
    std::fs::write(&binary, b"not a program").unwrap();
    let f = Fixture::new(
        snapshot(Some("/fuse/s"), Some(VmmKind::Firecracker)),
        &binary,
    );
    let reason = f.failed_start(start("a", VmBackend::Uffd));
    let vm = id("a");
    assert!(
        reason.starts_with(&format!("cannot start {}", binary.display())),
        "{reason}"
    );
    let info = f.vms.get(&vm).unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert_eq!(info.reason.as_deref(), Some(reason.as_str()));
    assert_eq!(
        info.fork,
        Some(id("a")),
        "a uffd VM gets a fork named like it"
    );
    assert_eq!(info.pid, None);
    assert_eq!((info.exit_code, info.last_output), (None, None));
    assert!(info.ended_unix_ms.is_some());
    assert_eq!(info.api_socket, f.store.vm_dir(&vm).join("api.sock"));
    assert_eq!(*f.host.closed_forks.lock().unwrap(), [id("a")]);
    assert_eq!(*f.host.released.lock().unwrap(), [id("s")]);
    assert_eq!(f.on_disk(&vm).state, VmState::Failed);
    assert_eq!(f.vms.counts().failed, 1);
    assert_eq!(
        f.vms.vm_of_fork(&id("a")),
        None,
        "a failed VM holds no fork"
    );
}

#[test]
fn a_hypervisor_that_exits_at_once_is_reported_with_its_code_and_last_words() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (1..=25).map(|n| format!("echo boot line {n}; ")).collect();
    let binary = script(
        dir.path(),
        "firecracker",
        &format!("{lines}echo 'Error: cannot open /dev/kvm' >&2; exit 3"),
    );
    let f = Fixture::new(
        snapshot(Some("/fuse/s/memory"), Some(VmmKind::Firecracker)),
        &binary,
    );
    let vm = id("a");
    let error = f.vms.start(start("a", VmBackend::Uffd)).unwrap_err();
    let VmError::StartFailed { reason, .. } = &error else {
        panic!("a hypervisor's own failure is not the caller's: {error:?}");
    };
    let mut last: Vec<String> = (7..=25).map(|n| format!("boot line {n}")).collect();
    last.push("Error: cannot open /dev/kvm".into());
    let last = last.join("\n");
    let socket = f.store.vm_dir(&vm).join("api.sock");
    assert_eq!(
        *reason,
        format!(
            "VM `a`: the process ended before its API socket {} came up; the hypervisor \
             exited with code 3; its last output:\n{last}",
            socket.display()
        )
    );
    for info in [f.vms.get(&vm).unwrap(), f.on_disk(&vm)] {
        assert_eq!(info.state, VmState::Failed);
        assert_eq!((info.exit_code, info.exit_signal), (Some(3), None));
        assert_eq!(info.last_output.as_deref(), Some(last.as_str()));
        assert_eq!(info.reason.as_ref(), Some(reason));
    }
    assert_eq!(*f.host.closed_forks.lock().unwrap(), [id("a")]);

    let killed = script(dir.path(), "crashes", "echo dying; kill -SEGV $$");
    let f = Fixture::new(
        snapshot(Some("/fuse/s/memory"), Some(VmmKind::Qemu)),
        &killed,
    );
    let reason = f.failed_start(start("b", VmBackend::File));
    assert!(
        reason.ends_with("the hypervisor was killed by signal 11; its last output:\ndying"),
        "{reason}"
    );
    assert!(
        reason.starts_with("VM `b`: QEMU ended before its QMP socket"),
        "{reason}"
    );
    let info = f.vms.get(&id("b")).unwrap();
    assert_eq!((info.exit_code, info.exit_signal), (None, Some(11)));
}

#[test]
fn deleting_refuses_a_live_vm_and_frees_the_id_of_an_ended_one() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s/memory"), Some(VmmKind::Firecracker)),
        &exits_at_once(),
    );
    for (vm, state) in [("a", VmState::Starting), ("b", VmState::Running)] {
        let vm = f.insert(vm, VmmKind::Firecracker, state, None);
        let error = f.vms.delete(&vm).unwrap_err();
        assert!(
            matches!(error, VmError::Live { state: s, .. } if s == state),
            "{error}"
        );
        assert!(f.vms.get(&vm).is_ok() && f.store.vm_dir(&vm).join("vm.json").exists());
    }
    assert!(matches!(f.vms.delete(&id("c")), Err(VmError::NotFound(_))));

    // A start that fails leaves a failed VM; deleting it frees its id for the next start.
    f.failed_start(start("d", VmBackend::File));
    let dir = f.store.vm_dir(&id("d"));
    assert!(dir.join("console.log").exists());
    let deleted = f.vms.delete(&id("d")).unwrap();
    assert_eq!(deleted.state, VmState::Failed);
    assert!(!dir.exists());
    assert!(matches!(f.vms.get(&id("d")), Err(VmError::NotFound(_))));
    let names: Vec<_> = std::fs::read_dir(f.store.vms_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "only a and b are left: {names:?}");
    f.failed_start(start("d", VmBackend::File));
    assert_eq!(f.vms.get(&id("d")).unwrap().state, VmState::Failed);
}

#[test]
fn records_past_their_retention_are_deleted_and_live_ones_kept() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let day = 86_400_000;
    let now = 10 * day;
    let ended = |vm: &str, state, ended_at: u64| {
        let vm = f.insert(vm, VmmKind::Firecracker, state, None);
        f.vms
            .update(&vm, |slot| slot.record.info.ended_unix_ms = Some(ended_at))
            .unwrap();
        vm
    };
    let old = ended("old", VmState::Exited, now - 2 * day);
    let failed = ended("failed", VmState::Failed, now - 2 * day);
    let recent = ended("recent", VmState::Exited, now - day / 2);
    let running = f.insert("running", VmmKind::Firecracker, VmState::Running, None);
    let vms = Vms::new(
        f.host.clone(),
        f.store.clone(),
        VmOptions {
            retention: Some(Duration::from_secs(86_400)),
            ..f.vms.options.clone()
        },
    );
    for slot in f.vms.lock().values() {
        vms.lock().insert(
            slot.record.info.id.clone(),
            Slot {
                record: slot.record.clone(),
                pidfd: None,
            },
        );
    }
    let mut reported = std::collections::BTreeSet::new();
    let mut removed = vms.remove_expired(now, &mut reported);
    removed.sort();
    assert_eq!(removed, [failed.clone(), old.clone()]);
    assert!(reported.is_empty());
    for gone in [&old, &failed] {
        assert!(!f.store.vm_dir(gone).exists());
        assert!(vms.get(gone).is_err());
    }
    for kept in [&recent, &running] {
        assert!(f.store.vm_dir(kept).join("vm.json").exists());
        assert!(vms.get(kept).is_ok());
    }
    assert!(vms.remove_expired(now, &mut reported).is_empty());
}

#[test]
fn a_qemu_that_exits_before_its_qmp_socket_is_up_fails_the_vm() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s/memory"), Some(VmmKind::Qemu)),
        &exits_at_once(),
    );
    let reason = f.failed_start(start("a", VmBackend::File));
    assert!(
        reason.starts_with("VM `a`: QEMU ended before its QMP socket"),
        "{reason}"
    );
    assert!(
        reason.ends_with("; the hypervisor exited with code 0; it wrote nothing on its console"),
        "{reason}"
    );
    let info = f.vms.get(&id("a")).unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert!(info.pid.is_some(), "it was started: its pid is recorded");
    assert_eq!(info.memory_file, Some(PathBuf::from("/fuse/s/memory")));
    assert_eq!(info.fork, None);
    assert_eq!(info.api_socket, f.store.vm_dir(&id("a")).join("qmp.sock"));
    assert!(f.host.created_forks.lock().unwrap().is_empty());
    assert_eq!(*f.host.released.lock().unwrap(), [id("s")]);
    assert!(
        !f.store.vm_dir(&id("a")).join("firecracker.log").exists(),
        "QEMU keeps no log of its own"
    );
}

#[test]
fn a_firecracker_that_exits_before_its_api_is_up_fails_the_vm() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s/memory"), Some(VmmKind::Firecracker)),
        &exits_at_once(),
    );
    let reason = f.failed_start(start("a", VmBackend::File));
    assert!(
        reason.starts_with("VM `a`: the process ended before its API socket"),
        "{reason}"
    );
    assert_eq!(f.vms.get(&id("a")).unwrap().exit_code, Some(0));
    assert!(f.store.vm_dir(&id("a")).join("firecracker.log").exists());
    assert_eq!(f.vms.get(&id("a")).unwrap().state, VmState::Failed);
}

#[test]
fn an_id_in_use_is_refused() {
    let f = Fixture::new(
        snapshot(Some("/fuse/s"), Some(VmmKind::Firecracker)),
        &exits_at_once(),
    );
    f.insert("a", VmmKind::Firecracker, VmState::Failed, None);
    let error = f.vms.start(start("a", VmBackend::File)).unwrap_err();
    assert!(matches!(error, VmError::Exists(vm) if vm == id("a")));
    assert!(f.host.released.lock().unwrap().is_empty());
}

#[test]
fn a_starting_vm_cannot_be_stopped_and_an_ended_one_stops_as_it_is() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let starting = f.insert("a", VmmKind::Firecracker, VmState::Starting, None);
    let error = f.vms.stop(&starting, Duration::ZERO).unwrap_err();
    assert!(matches!(
        error,
        VmError::WrongState {
            state: VmState::Starting,
            ..
        }
    ));
    let failed = f.insert("b", VmmKind::Firecracker, VmState::Failed, None);
    assert_eq!(
        f.vms.stop(&failed, Duration::ZERO).unwrap().state,
        VmState::Failed
    );
    assert!(matches!(
        f.vms.stop(&id("c"), Duration::ZERO),
        Err(VmError::NotFound(_))
    ));
}

#[test]
fn waiting_is_for_a_state_or_any_later_one() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let starting = f.insert("a", VmmKind::Firecracker, VmState::Starting, None);
    let error = f
        .vms
        .wait(&starting, VmState::Running, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(
        error,
        VmError::WaitTimedOut {
            state: VmState::Running,
            ..
        }
    ));
    assert_eq!(
        f.vms
            .wait(&starting, VmState::Starting, Duration::ZERO)
            .unwrap()
            .state,
        VmState::Starting
    );
    let failed = f.insert("b", VmmKind::Firecracker, VmState::Failed, None);
    for state in [VmState::Starting, VmState::Running, VmState::Exited] {
        assert_eq!(
            f.vms.wait(&failed, state, Duration::ZERO).unwrap().state,
            VmState::Failed
        );
    }
    let exited = f.insert("c", VmmKind::Firecracker, VmState::Exited, None);
    assert!(f
        .vms
        .wait(&exited, VmState::Failed, Duration::ZERO)
        .is_err());
}

#[test]
fn an_exit_ends_a_live_vm_and_gives_back_its_fork() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let running = f.insert("a", VmmKind::Firecracker, VmState::Running, Some("a"));
    assert_eq!(f.vms.vm_of_fork(&id("a")), Some(running.clone()));
    f.vms
        .exited(&running, Some(std::process::ExitStatus::from_raw(3 << 8)));
    let info = f.vms.get(&running).unwrap();
    assert_eq!(info.state, VmState::Exited);
    assert_eq!((info.exit_code, info.exit_signal), (Some(3), None));
    assert_eq!(f.on_disk(&running).state, VmState::Exited);
    assert_eq!(*f.host.closed_forks.lock().unwrap(), [id("a")]);
    assert_eq!(*f.host.released.lock().unwrap(), [id("s")]);
    assert_eq!(f.vms.vm_of_fork(&id("a")), None);

    let failed = f.insert("b", VmmKind::Firecracker, VmState::Failed, None);
    f.vms
        .exited(&failed, Some(std::process::ExitStatus::from_raw(9)));
    let info = f.vms.get(&failed).unwrap();
    assert_eq!(info.state, VmState::Failed, "a failed VM stays failed");
    assert_eq!(info.exit_signal, Some(9));
}

#[test]
fn counts_are_by_state() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    f.insert("a", VmmKind::Firecracker, VmState::Starting, None);
    f.insert("b", VmmKind::Qemu, VmState::Running, None);
    f.insert("c", VmmKind::Firecracker, VmState::Running, None);
    f.insert("d", VmmKind::Firecracker, VmState::Exited, None);
    let counts = f.vms.counts();
    assert_eq!(
        (
            counts.starting,
            counts.running,
            counts.exited,
            counts.failed
        ),
        (1, 2, 1, 0)
    );
}

#[test]
fn only_a_running_vm_of_a_hypervisor_that_snapshots_can_be_snapshotted() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let qemu = f.insert("a", VmmKind::Qemu, VmState::Running, None);
    let error = f.vms.snapshot(&qemu, id("new"), true).unwrap_err();
    assert!(
        matches!(
            error,
            VmError::Unsupported {
                vmm: VmmKind::Qemu,
                operation: "vm.snapshot"
            }
        ),
        "{error}"
    );
    let starting = f.insert("b", VmmKind::Firecracker, VmState::Starting, None);
    let error = f.vms.snapshot(&starting, id("new"), true).unwrap_err();
    assert!(matches!(error, VmError::WrongState { .. }), "{error}");
    let error = f.vms.snapshot(&id("b"), id("s"), true).unwrap_err();
    assert!(matches!(error, VmError::WrongState { .. }), "{error}");
}

#[test]
fn a_firecracker_snapshot_to_an_existing_id_is_refused_before_pausing() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let running = f.insert("a", VmmKind::Firecracker, VmState::Running, None);
    let error = f.vms.snapshot(&running, id("s"), true).unwrap_err();
    assert!(
        matches!(error, VmError::Lifecycle(LifecycleError::Exists { .. })),
        "{error}"
    );
}

#[test]
fn reconciling_fails_half_started_vms_and_ends_vanished_ones() {
    let f = Fixture::new(snapshot(None, None), &exits_at_once());
    let starting = f.insert("a", VmmKind::Firecracker, VmState::Starting, None);
    let vanished = f.insert("b", VmmKind::Qemu, VmState::Running, Some("b"));
    let exited = f.insert("c", VmmKind::Firecracker, VmState::Exited, None);
    // A daemon starting afresh over the same state directory.
    let vms = Vms::new(f.host.clone(), f.store.clone(), f.vms.options.clone());
    let report = vms.reconcile().unwrap();
    assert_eq!(report.failed, [id("a")]);
    assert_eq!(report.exited, [id("b")]);
    assert!(report.running.is_empty());
    assert_eq!(vms.get(&starting).unwrap().state, VmState::Failed);
    assert_eq!(
        f.on_disk(&starting).reason.as_deref(),
        Some("pagerd restarted while it was starting")
    );
    assert_eq!(vms.get(&vanished).unwrap().state, VmState::Exited);
    assert_eq!(vms.get(&exited).unwrap().state, VmState::Exited);
    assert_eq!(*f.host.closed_forks.lock().unwrap(), [id("b")]);
    assert_eq!(*f.host.released.lock().unwrap(), [id("s"), id("s")]);
}
