//! The lifecycle's decisions, on a state directory in a temporary directory and small memory
//! files: references and deferred deletes, quotas, owners, damaged snapshots, working-set
//! recordings, and not found.
//! No VMM ever connects, so nothing here needs userfaultfd, FUSE or KVM.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use proto::control::{ControlError, ErrorCode};
use proto::model::ForkState;
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId};

use super::{Lifecycle, LifecycleError, RecordJournal, SnapshotLimits};
use crate::access::Access;
use crate::owners::{may_change, ForkQuota, ForkQuotaError, ROOT};
use crate::registry::Registry;
use crate::serve::session::ServeOptions;
use crate::serve::{ForkEvent, ServeError, Server};
use crate::store::damage::Damage;
use crate::store::import::{ImportMode, Source};
use crate::store::Store;

const PAGE: u64 = 4096;

/// A uid that is neither root nor the daemon's own: held to every quota.
fn member() -> u32 {
    if nix::unistd::geteuid().as_raw() == 65534 {
        65533
    } else {
        65534
    }
}

fn id<K: proto::ids::Kind>(s: &str) -> proto::Id<K> {
    s.parse().unwrap()
}

/// A lifecycle over a fresh state directory, with one worker and no VMM.
struct Fixture {
    lifecycle: Lifecycle,
    state: PathBuf,
    files: tempfile::TempDir,
    _state: tempfile::TempDir,
    _events: mpsc::Receiver<ForkEvent>,
}

impl Fixture {
    fn new(limits: SnapshotLimits, fork_quota: ForkQuota) -> Self {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open_with(state.path(), Access::new(None)).unwrap();
        let registry = Arc::new(Registry::new());
        let (events, inbox) = mpsc::channel();
        let options = ServeOptions {
            fault_around_pages: 1,
            spin: Duration::ZERO,
            fork_quota,
            record_forks: 0,
            record_window: Duration::from_secs(1),
            replay_nice: 0,
        };
        let journal = Arc::new(RecordJournal::new(store.clone()));
        let server = Server::start(
            registry.clone(),
            events,
            journal,
            1,
            options,
            Duration::from_secs(1),
        )
        .unwrap();
        let lifecycle = Lifecycle::new(store, registry, server, Prefetch::default(), limits);
        Self {
            lifecycle,
            state: state.path().to_owned(),
            files: tempfile::tempdir().unwrap(),
            _state: state,
            _events: inbox,
        }
    }

    fn roomy() -> Self {
        Self::new(
            SnapshotLimits {
                max_size: 1 << 30,
                per_uid_bytes: 1 << 30,
            },
            ForkQuota {
                max: 64,
                per_uid: 64,
            },
        )
    }

    /// A memory file of `pages` non-zero pages, outside the state directory.
    fn memory_file(&self, name: &str, pages: u64) -> PathBuf {
        let path = self.files.path().join(name);
        std::fs::write(&path, vec![0x5a; usize::try_from(pages * PAGE).unwrap()]).unwrap();
        path
    }

    fn register(&self, snapshot: &str, pages: u64, owner: u32) -> Result<(), LifecycleError> {
        let path = self.memory_file(snapshot, pages);
        let source = Source::open(&path).unwrap();
        self.lifecycle
            .register_snapshot(id(snapshot), source, ImportMode::Copy, None, owner)
            .map(|info| assert_eq!(info.size, Some(pages * PAGE)))
    }

    fn fork(&self, fork: &str, snapshot: &str, owner: u32) -> Result<(), LifecycleError> {
        self.lifecycle
            .create_fork(Some(id(fork)), &id(snapshot), None, owner)
            .map(|info| assert_eq!(info.state, ForkState::Waiting))
    }

    fn fork_record(&self, fork: &str) -> PathBuf {
        self.state.join("forks").join(format!("{fork}.json"))
    }

    fn snapshot_dir(&self, snapshot: &str) -> PathBuf {
        self.state.join("snapshots").join(snapshot)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.lifecycle.shutdown(false);
    }
}

fn code(e: LifecycleError) -> ErrorCode {
    ControlError::from(e).code
}

#[test]
fn a_referenced_snapshot_is_deleted_only_after_its_last_fork_closes() {
    let fx = Fixture::roomy();
    let lc = &fx.lifecycle;
    fx.register("base", 2, ROOT).unwrap();
    fx.fork("f1", "base", ROOT).unwrap();
    fx.fork("f2", "base", ROOT).unwrap();
    assert!(fx.fork_record("f1").exists(), "the record is on disk");

    let info = lc.snapshot(&id("base")).unwrap();
    assert_eq!(info.ref_count, Some(2));
    assert_eq!(info.forks, Some(vec![id("f1"), id("f2")]));

    match lc.delete_snapshot(&id("base"), false, false) {
        Err(e @ LifecycleError::InUse { .. }) => {
            let LifecycleError::InUse { ref forks, .. } = e else {
                unreachable!()
            };
            assert_eq!(forks, &vec![id("f1"), id("f2")]);
            assert_eq!(code(e), ErrorCode::Conflict);
        }
        other => panic!("a referenced snapshot was not refused: {other:?}"),
    }

    let deferred = lc.delete_snapshot(&id("base"), true, false).unwrap();
    assert!(deferred.pending && !deferred.deleted);
    match lc.create_fork(Some(id("f3")), &id("base"), None, ROOT) {
        Err(e @ LifecycleError::DeletePending(_)) => assert_eq!(code(e), ErrorCode::Conflict),
        other => panic!("a fork of a snapshot pending deletion: {other:?}"),
    }

    lc.close_fork(&id("f1")).unwrap();
    assert!(!fx.fork_record("f1").exists());
    let info = lc.snapshot(&id("base")).unwrap();
    assert!(info.delete_pending);
    assert_eq!(info.ref_count, Some(1));

    lc.close_fork(&id("f2")).unwrap();
    assert!(matches!(
        lc.snapshot(&id("base")),
        Err(LifecycleError::NotFound {
            kind: "snapshot",
            ..
        })
    ));
    assert!(
        !fx.snapshot_dir("base").exists(),
        "the last close deleted it"
    );
}

#[test]
fn an_unreferenced_snapshot_is_deleted_at_once_and_ids_are_not_taken_twice() {
    let fx = Fixture::roomy();
    let lc = &fx.lifecycle;
    fx.register("base", 1, ROOT).unwrap();
    match fx.register("base", 1, ROOT) {
        Err(e @ LifecycleError::Exists { .. }) => assert_eq!(code(e), ErrorCode::Conflict),
        other => panic!("a second snapshot `base`: {other:?}"),
    }
    fx.fork("f1", "base", ROOT).unwrap();
    match fx.fork("f1", "base", ROOT) {
        Err(e @ LifecycleError::Exists { kind: "fork", .. }) => {
            assert_eq!(code(e), ErrorCode::Conflict)
        }
        other => panic!("a second fork `f1`: {other:?}"),
    }
    lc.close_fork(&id("f1")).unwrap();
    let deleted = lc.delete_snapshot(&id("base"), false, false).unwrap();
    assert!(deleted.deleted && !deleted.pending);
    assert!(lc.snapshots().unwrap().is_empty());
}

#[test]
fn a_member_is_held_to_its_fork_quota_and_an_operator_is_not() {
    let fx = Fixture::new(
        SnapshotLimits {
            max_size: 1 << 30,
            per_uid_bytes: 1 << 30,
        },
        ForkQuota { max: 4, per_uid: 1 },
    );
    let m = member();
    fx.register("base", 1, ROOT).unwrap();
    fx.fork("m1", "base", m).unwrap();
    match fx.fork("m2", "base", m) {
        Err(e @ LifecycleError::Serve(ServeError::TooManyForks(ForkQuotaError::PerUid { .. }))) => {
            assert_eq!(code(e), ErrorCode::Unavailable)
        }
        other => panic!("a member's second fork: {other:?}"),
    }
    fx.fork("r1", "base", ROOT).unwrap();
    fx.fork("r2", "base", ROOT).unwrap();
    fx.fork("r3", "base", ROOT).unwrap();
    match fx.fork("r4", "base", ROOT) {
        Err(LifecycleError::Serve(ServeError::TooManyForks(ForkQuotaError::Full { max: 4 }))) => {}
        other => panic!("a fifth fork of at most four: {other:?}"),
    }
    assert!(!fx.fork_record("m2").exists() && !fx.fork_record("r4").exists());
}

#[test]
fn a_member_is_held_to_its_snapshot_bytes_and_to_the_largest_size() {
    let fx = Fixture::new(
        SnapshotLimits {
            max_size: 4 * PAGE,
            per_uid_bytes: 3 * PAGE,
        },
        ForkQuota {
            max: 64,
            per_uid: 64,
        },
    );
    let m = member();
    fx.register("small", 2, m).unwrap();
    match fx.register("more", 2, m) {
        Err(
            e @ LifecycleError::Quota {
                used: 8192,
                size: 8192,
                quota: 12288,
                ..
            },
        ) => assert_eq!(code(e), ErrorCode::Unavailable),
        other => panic!("a member past its bytes: {other:?}"),
    }
    fx.register("one", 1, m).unwrap();
    fx.register("root", 4, ROOT).unwrap();
    match fx.register("huge", 5, ROOT) {
        Err(LifecycleError::TooLarge { size: 20480, .. }) => {}
        other => panic!("a file past --max-snapshot-size: {other:?}"),
    }
    fx.lifecycle
        .delete_snapshot(&id("small"), false, false)
        .unwrap();
    fx.register("more", 2, m).unwrap();
}

#[test]
fn owners_are_recorded_and_only_they_and_operators_may_change() {
    let fx = Fixture::roomy();
    let lc = &fx.lifecycle;
    let m = member();
    fx.register("mine", 1, m).unwrap();
    fx.fork("f", "mine", m).unwrap();
    let snapshot_owner = lc.snapshot_owner(&id("mine")).unwrap();
    let fork_owner = lc.fork_owner(&id("f")).unwrap();
    assert_eq!((snapshot_owner, fork_owner), (m, m));
    assert_eq!(lc.snapshot(&id("mine")).unwrap().owner, Some(m));
    assert!(may_change(Some(m), fork_owner));
    assert!(!may_change(Some(m + 1), fork_owner));
    assert!(may_change(Some(ROOT), snapshot_owner));
}

#[test]
fn a_damaged_snapshot_refuses_forks_and_goes_only_with_a_forced_delete() {
    let fx = Fixture::roomy();
    let lc = &fx.lifecycle;
    fx.register("base", 1, ROOT).unwrap();
    lc.check_snapshot_files();
    assert_eq!(lc.snapshot(&id("base")).unwrap().error, None);

    // The copy in the state directory is touched: its modification time moves.
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.snapshot_dir("base").join("memory"))
        .unwrap();
    memory
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(7))
        .unwrap();
    lc.check_snapshot_files();

    match fx.fork("f", "base", ROOT) {
        Err(LifecycleError::Broken {
            damage: Damage::Changed(ref changes),
            ..
        }) => assert!(changes.to_string().contains("→7.000000000"), "{changes}"),
        other => panic!("a fork of a damaged snapshot: {other:?}"),
    }
    let error = lc.snapshot(&id("base")).unwrap().error.unwrap();
    assert!(
        error.starts_with("memory file changed after registration (mtime "),
        "{error}"
    );
    assert_eq!(lc.health().unwrap().damaged_snapshots, vec![id("base")]);
    assert!(!lc.reports().status().unwrap().healthy);

    match lc.delete_snapshot(&id("base"), true, false) {
        Err(e @ LifecycleError::BrokenNeedsForce { .. }) => {
            assert!(e.to_string().ends_with("; only a forced delete removes it"));
            assert_eq!(code(e), ErrorCode::Internal);
        }
        other => panic!("an unforced delete of a damaged snapshot: {other:?}"),
    }
    assert!(
        lc.delete_snapshot(&id("base"), false, true)
            .unwrap()
            .deleted
    );
    assert!(!fx.snapshot_dir("base").exists());
}

#[test]
fn whatever_is_missing_is_one_not_found() {
    let fx = Fixture::roomy();
    let lc = &fx.lifecycle;
    let (snapshot, fork): (SnapshotId, ForkId) = (id("none"), id("none"));
    let missing: Vec<LifecycleError> = vec![
        lc.snapshot(&snapshot).unwrap_err(),
        lc.snapshot_owner(&snapshot).unwrap_err(),
        lc.delete_snapshot(&snapshot, true, true).unwrap_err(),
        lc.create_fork(None, &snapshot, None, ROOT).unwrap_err(),
        lc.working_sets().record(&snapshot, 1).unwrap_err(),
        lc.working_sets().clear(&snapshot).unwrap_err(),
        lc.fork_owner(&fork).unwrap_err(),
        lc.close_fork(&fork).unwrap_err(),
        lc.reports().fork(&fork).unwrap_err(),
        lc.wait_fork(&fork, ForkState::Serving, Duration::ZERO)
            .unwrap_err(),
    ];
    for (i, e) in missing.into_iter().enumerate() {
        assert!(
            matches!(e, LifecycleError::NotFound { ref id, .. } if id == "none"),
            "case {i}: {e:?}"
        );
        let message = e.to_string();
        assert!(
            message == "no snapshot `none`" || message == "no fork `none`",
            "{message}"
        );
        assert_eq!(code(e), ErrorCode::NotFound, "case {i}");
    }
}

#[test]
fn a_recording_is_armed_only_on_a_forkable_snapshot_and_any_snapshot_clears() {
    let fx = Fixture::roomy();
    let sets = fx.lifecycle.working_sets();
    fx.register("base", 1, ROOT).unwrap();
    let armed = sets.record(&id("base"), 2).unwrap();
    assert_eq!(armed.recording.map(|r| r.forks_wanted), Some(2));
    let cleared = sets.clear(&id("base")).unwrap();
    assert!(cleared.recording.is_none() && cleared.working_set.is_none());

    fx.fork("f", "base", ROOT).unwrap();
    fx.lifecycle
        .delete_snapshot(&id("base"), true, false)
        .unwrap();
    match sets.record(&id("base"), 1) {
        Err(e @ LifecycleError::DeletePending(_)) => assert_eq!(code(e), ErrorCode::Conflict),
        other => panic!("a recording of a snapshot on its way out: {other:?}"),
    }
    assert!(sets.clear(&id("base")).unwrap().delete_pending);
}
