//! The daemon's in-memory view of snapshots and forks, and what each fork is doing.
//!
//! A fork moves `waiting` (its handoff socket is listening) → `serving` (a VMM handed over
//! its uffd and a worker serves it) → `ended` (the VMM exited, or the fork was closed). Every
//! state change notifies one condition variable, so callers can wait for a state with a
//! deadline instead of polling.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use proto::model::{ForkInfo, ForkState, ForkStatsReport, HandoffErrorInfo};
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId};

pub use crate::fork_state::{ForkPhase, ForkStatus, ImpossibleTransition, Serving, Transition};
use crate::snapshot::Snapshot;
use crate::stats::ForkStats;

/// One fork of a snapshot.
#[derive(Debug)]
pub struct Fork {
    id: ForkId,
    snapshot: SnapshotId,
    /// The uid that created it.
    owner: u32,
    handoff_socket: PathBuf,
    created: SystemTime,
    prefetch: Prefetch,
    /// Set while its session records first touches into the snapshot's working set.
    recording: AtomicBool,
    status: Mutex<ForkStatus>,
    /// Serving counters.
    pub stats: ForkStats,
}

impl Fork {
    /// The fork's id.
    pub fn id(&self) -> &ForkId {
        &self.id
    }

    /// The snapshot it forks.
    pub fn snapshot(&self) -> &SnapshotId {
        &self.snapshot
    }

    /// The uid that created it.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// When it was created.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The socket its VMM must connect to.
    pub fn handoff_socket(&self) -> &PathBuf {
        &self.handoff_socket
    }

    /// What is installed before its guest asks.
    pub fn prefetch(&self) -> Prefetch {
        self.prefetch
    }

    /// Marks whether its session records the snapshot's working set.
    pub fn set_recording(&self, recording: bool) {
        self.recording.store(recording, Relaxed);
    }

    /// A copy of the fork's status.
    pub fn status(&self) -> ForkStatus {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, ForkStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A description for the control socket.
    pub fn info(&self) -> ForkInfo {
        let st = self.status();
        let phase = st.phase;
        ForkInfo {
            id: self.id.clone(),
            snapshot: self.snapshot.clone(),
            owner: self.owner,
            state: phase.state(),
            handoff_socket: self.handoff_socket.clone(),
            vmm_pid: phase.vmm_pid(),
            uffd_features: phase.served().map(|s| s.uffd_features),
            worker: phase.worker(),
            end_reason: phase.end_reason(),
            detached_reason: phase.detached_reason(),
            recovered: st.recovered,
            record_error: st.record_error,
            last_handoff_error: st.last_handoff_error,
            created_unix_ms: unix_ms(self.created),
            prefetch: self.prefetch,
            recording: self.recording.load(Relaxed),
            stats: self.stats.report(),
        }
    }
}

/// What a fork is made of when it enters the registry.
#[derive(Debug, Clone)]
pub struct NewFork {
    /// Its id.
    pub id: ForkId,
    /// The snapshot it forks.
    pub snapshot: SnapshotId,
    /// The uid that created it.
    pub owner: u32,
    /// Where its VMM hands over its uffd.
    pub handoff_socket: PathBuf,
    /// When it was created.
    pub created: SystemTime,
    /// What it prefetches.
    pub prefetch: Prefetch,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No snapshot by that id.
    #[error("no snapshot `{0}`")]
    NoSnapshot(SnapshotId),
    /// No fork by that id.
    #[error("no fork `{0}`")]
    NoFork(ForkId),
    /// The id is taken.
    #[error("{kind} `{id}` already exists")]
    Exists {
        /// "snapshot" or "fork".
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The wait ran out.
    #[error("fork `{fork}` did not reach state {want:?} within {timeout_ms} ms (it is {now:?})")]
    WaitTimedOut {
        /// The fork.
        fork: ForkId,
        /// The state waited for.
        want: ForkState,
        /// The state it is in.
        now: ForkState,
        /// The time allowed.
        timeout_ms: u64,
    },
}

/// All snapshots and forks of the daemon.
#[derive(Debug, Default)]
pub struct Registry {
    snapshots: Mutex<BTreeMap<SnapshotId, Arc<Snapshot>>>,
    forks: Mutex<BTreeMap<ForkId, Arc<Fork>>>,
    /// The summed counters of every fork forgotten since the daemon started, so that totals
    /// never go down.
    retired: Mutex<ForkStatsReport>,
    changed: Condvar,
    /// Paired with `changed`; holds nothing.
    change_lock: Mutex<()>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a snapshot.
    pub fn add_snapshot(&self, snapshot: Snapshot) -> Result<Arc<Snapshot>, RegistryError> {
        let mut map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(snapshot.id()) {
            return Err(RegistryError::Exists {
                kind: "snapshot",
                id: snapshot.id().to_string(),
            });
        }
        let snapshot = Arc::new(snapshot);
        map.insert(snapshot.id().clone(), snapshot.clone());
        Ok(snapshot)
    }

    /// A snapshot by id.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<Arc<Snapshot>, RegistryError> {
        let map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NoSnapshot(id.clone()))
    }

    /// Every snapshot, by id.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        let map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Forgets a snapshot.
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Option<Arc<Snapshot>> {
        let mut map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id)
    }

    /// Adds a fork in `phase` (`Waiting` for a new fork).
    pub fn add_fork(&self, new: NewFork, phase: ForkPhase) -> Result<Arc<Fork>, RegistryError> {
        let NewFork {
            id,
            snapshot,
            owner,
            handoff_socket,
            created,
            prefetch,
        } = new;
        let mut map = self.forks.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            return Err(RegistryError::Exists {
                kind: "fork",
                id: id.to_string(),
            });
        }
        let fork = Arc::new(Fork {
            id: id.clone(),
            snapshot,
            owner,
            handoff_socket,
            created,
            prefetch,
            recording: AtomicBool::new(false),
            status: Mutex::new(ForkStatus::new(phase)),
            stats: ForkStats::default(),
        });
        map.insert(id, fork.clone());
        drop(map);
        self.notify();
        Ok(fork)
    }

    /// A fork by id.
    pub fn fork(&self, id: &ForkId) -> Result<Arc<Fork>, RegistryError> {
        let map = self.forks.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NoFork(id.clone()))
    }

    /// Every fork, by id.
    pub fn forks(&self) -> Vec<Arc<Fork>> {
        let map = self.forks.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Forgets a fork.
    pub fn remove_fork(&self, id: &ForkId) -> Result<Arc<Fork>, RegistryError> {
        let mut map = self.forks.lock().unwrap_or_else(|p| p.into_inner());
        let fork = map
            .remove(id)
            .ok_or_else(|| RegistryError::NoFork(id.clone()))?;
        drop(map);
        *self.retired.lock().unwrap_or_else(|p| p.into_inner()) += &fork.stats.report();
        self.notify();
        Ok(fork)
    }

    /// Counters summed over every fork since the daemon started: the forks it knows and those
    /// it forgot.
    pub fn totals(&self) -> ForkStatsReport {
        let mut total = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for fork in self.forks() {
            total += &fork.stats.report();
        }
        total
    }

    /// Moves a fork to its next phase and wakes every waiter; an impossible move changes
    /// nothing and is an error.
    pub fn transition(
        &self,
        fork: &Fork,
        transition: Transition,
    ) -> Result<(), ImpossibleTransition> {
        fork.lock().apply(transition)?;
        self.notify();
        Ok(())
    }

    /// Notes a handoff refused on the fork's socket.
    pub fn handoff_refused(&self, fork: &Fork, error: HandoffErrorInfo) {
        fork.lock().last_handoff_error = Some(error);
        self.notify();
    }

    /// Notes that the fork's attached VMM could not be recorded.
    pub fn record_failed(&self, fork: &Fork, why: String) {
        fork.lock().record_error = Some(why);
        self.notify();
    }

    fn notify(&self) {
        let _guard = self.change_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Waits until the fork is in `want` (or has gone past it), for at most `timeout`.
    pub fn wait_for_state(
        &self,
        id: &ForkId,
        want: ForkState,
        timeout: Duration,
    ) -> Result<Arc<Fork>, RegistryError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.change_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let fork = self.fork(id)?;
            let now = fork.status().phase.state();
            let past_serving = matches!(now, ForkState::Ended | ForkState::Detached);
            if now == want || (want == ForkState::Serving && past_serving) {
                return Ok(fork);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RegistryError::WaitTimedOut {
                    fork: id.clone(),
                    want,
                    now,
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<K: proto::ids::Kind>(s: &str) -> proto::Id<K> {
        s.parse().unwrap()
    }

    fn new_fork(fork: &str) -> NewFork {
        NewFork {
            id: id(fork),
            snapshot: id("base"),
            owner: 0,
            handoff_socket: PathBuf::from(format!("/nonexistent/{fork}.sock")),
            created: SystemTime::now(),
            prefetch: Prefetch::default(),
        }
    }

    #[test]
    fn forks_are_added_once_found_and_removed_once() {
        let registry = Registry::new();
        let fork = registry
            .add_fork(new_fork("f1"), ForkPhase::Waiting)
            .unwrap();
        assert_eq!(fork.snapshot(), &id("base"));
        assert!(Arc::ptr_eq(&registry.fork(&id("f1")).unwrap(), &fork));
        assert!(matches!(
            registry.add_fork(new_fork("f1"), ForkPhase::Waiting),
            Err(RegistryError::Exists { kind: "fork", .. })
        ));
        assert!(matches!(
            registry.fork(&id("f2")),
            Err(RegistryError::NoFork(_))
        ));
        assert!(Arc::ptr_eq(
            &registry.remove_fork(&id("f1")).unwrap(),
            &fork
        ));
        assert!(registry.fork(&id("f1")).is_err());
        assert!(matches!(
            registry.remove_fork(&id("f1")),
            Err(RegistryError::NoFork(_))
        ));
        assert!(registry.forks().is_empty() && registry.snapshots().is_empty());
        assert!(matches!(
            registry.snapshot(&id("base")),
            Err(RegistryError::NoSnapshot(_))
        ));
    }

    #[test]
    fn totals_never_go_down_when_a_fork_is_forgotten() {
        let registry = Registry::new();
        let f1 = registry
            .add_fork(new_fork("f1"), ForkPhase::Waiting)
            .unwrap();
        let f2 = registry
            .add_fork(new_fork("f2"), ForkPhase::Waiting)
            .unwrap();
        crate::stats::bump(&f1.stats.faults, 5);
        crate::stats::bump(&f2.stats.pages_copied, 3);
        assert_eq!(registry.totals().faults, 5);
        registry.remove_fork(&id("f1")).unwrap();
        crate::stats::bump(&f1.stats.faults, 100);
        let totals = registry.totals();
        assert_eq!(
            (totals.faults, totals.pages_copied),
            (5, 3),
            "a forgotten fork counts as it was when it went, once"
        );
        registry.remove_fork(&id("f2")).unwrap();
        assert_eq!(registry.totals().pages_copied, 3);
    }

    #[test]
    fn a_wait_returns_at_once_when_the_state_is_there_and_times_out_when_it_never_comes() {
        let registry = Registry::new();
        registry
            .add_fork(new_fork("f1"), ForkPhase::Waiting)
            .unwrap();
        let waited = registry
            .wait_for_state(&id("f1"), ForkState::Waiting, Duration::from_secs(60))
            .unwrap();
        assert_eq!(waited.id(), &id("f1"));
        match registry.wait_for_state(&id("f1"), ForkState::Serving, Duration::from_millis(20)) {
            Err(RegistryError::WaitTimedOut {
                want: ForkState::Serving,
                now: ForkState::Waiting,
                timeout_ms: 20,
                ..
            }) => {}
            other => panic!("a wait for a state that never comes: {other:?}"),
        }
        assert!(matches!(
            registry.wait_for_state(&id("f9"), ForkState::Waiting, Duration::ZERO),
            Err(RegistryError::NoFork(_))
        ));
        registry
            .add_fork(
                new_fork("ended"),
                ForkPhase::Ended {
                    reason: proto::model::EndReason::Closed,
                    served: None,
                    vmm_pid: None,
                },
            )
            .unwrap();
        let past = registry
            .wait_for_state(&id("ended"), ForkState::Serving, Duration::ZERO)
            .unwrap();
        assert_eq!(past.id(), &id("ended"), "an ended fork is past serving");
    }
}
