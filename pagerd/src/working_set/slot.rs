//! One snapshot's working set and the recording in progress, behind one lock.
//!
//! ```text
//!   arm (snapshot.record, or automatic: no set yet) ─▶ wanted = N
//!   a fork attaches ─▶ claim: wanted-1, recording+1 ─▶ its session records first touches
//!   its trace comes back ─▶ submit: recording-1, trace kept (an empty one re-opens a place)
//!   wanted = recording = 0 ─▶ the traces go to be merged and stored ─▶ set(new set)
//! ```
//!
//! Every recording has a generation; clearing or re-arming starts a new one, and traces of
//! an older generation are dropped, so a cleared set never comes back from a late trace.

use std::sync::{Arc, Mutex, MutexGuard};

use proto::prefetch::{RecordingInfo, WorkingSetInfo};

use super::merge::Trace;
use super::WorkingSet;

/// Which recording a session's trace belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Debug)]
struct Recording {
    generation: u64,
    wanted: u32,
    recording: u32,
    traces: Vec<Trace>,
    automatic: bool,
}

#[derive(Debug, Default)]
struct State {
    current: Option<Arc<WorkingSet>>,
    recording: Option<Recording>,
    generation: u64,
    /// Why the stored set could not be loaded or written, until a new one is stored.
    error: Option<String>,
}

/// A snapshot's working set.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<State>,
}

/// Traces ready to merge: the recording they complete.
#[derive(Debug)]
pub struct Complete {
    /// The traces.
    pub traces: Vec<Trace>,
    /// Which recording.
    pub ticket: Ticket,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The set new forks replay, if any.
    pub fn current(&self) -> Option<Arc<WorkingSet>> {
        self.lock().current.clone()
    }

    /// Installs a stored set (or none), ending any error.
    pub fn set(&self, set: Option<Arc<WorkingSet>>) {
        let mut state = self.lock();
        state.current = set;
        state.error = None;
    }

    /// Records why the set could not be loaded or stored.
    pub fn set_error(&self, error: String) {
        self.lock().error = Some(error);
    }

    /// Records the next `forks` forks, replacing any recording in progress.
    pub fn arm(&self, forks: u32) {
        let mut state = self.lock();
        state.generation += 1;
        state.recording = Some(Recording {
            generation: state.generation,
            wanted: forks,
            recording: 0,
            traces: Vec::new(),
            automatic: false,
        });
    }

    /// Forgets the set and any recording.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.current = None;
        state.recording = None;
        state.error = None;
    }

    /// Whether an attaching fork records: yes while a recording wants forks; a snapshot with
    /// no set and no recording starts one of `auto_forks` forks by itself (0: never).
    pub fn claim(&self, auto_forks: u32) -> Option<Ticket> {
        let mut state = self.lock();
        if state.recording.is_none() && state.current.is_none() && auto_forks > 0 {
            state.generation += 1;
            state.recording = Some(Recording {
                generation: state.generation,
                wanted: auto_forks,
                recording: 0,
                traces: Vec::new(),
                automatic: true,
            });
        }
        let recording = state.recording.as_mut()?;
        if recording.wanted == 0 {
            return None;
        }
        recording.wanted -= 1;
        recording.recording += 1;
        Some(Ticket(recording.generation))
    }

    /// A recording fork's trace. Returns the traces once the recording has all it wants.
    pub fn submit(&self, ticket: Ticket, trace: Trace) -> Option<Complete> {
        let mut state = self.lock();
        let recording = state.recording.as_mut()?;
        if recording.generation != ticket.0 {
            return None;
        }
        recording.recording = recording.recording.saturating_sub(1);
        if trace.is_empty() {
            // A fork that touched nothing (its VMM died at once) teaches nothing: another
            // fork takes its place.
            recording.wanted += 1;
            return None;
        }
        recording.traces.push(trace);
        if recording.wanted > 0 || recording.recording > 0 {
            return None;
        }
        let done = state.recording.take()?;
        Some(Complete {
            traces: done.traces,
            ticket,
        })
    }

    /// Whether `ticket`'s recording is still the latest one (nothing cleared or re-armed it
    /// since), so its merged set may be installed.
    pub fn is_latest(&self, ticket: Ticket) -> bool {
        self.lock().generation == ticket.0
    }

    /// What `snapshot.get` shows: the set, the recording, and any error.
    pub fn info(
        &self,
    ) -> (
        Option<WorkingSetInfo>,
        Option<RecordingInfo>,
        Option<String>,
    ) {
        let state = self.lock();
        let recording = state.recording.as_ref().map(|r| RecordingInfo {
            forks_wanted: r.wanted,
            forks_recording: r.recording,
            forks_done: r.traces.len() as u32,
            automatic: r.automatic,
        });
        (
            state.current.as_ref().map(|s| s.info().clone()),
            recording,
            state.error.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_completes_with_its_last_trace_and_ignores_stale_ones() {
        let slot = Slot::default();
        assert!(slot.claim(0).is_none(), "no automatic recording when off");
        let a = slot.claim(2).expect("automatic recording");
        let b = slot.claim(2).expect("second place");
        assert!(slot.claim(2).is_none(), "only two forks record");
        assert!(
            slot.submit(a, vec![]).is_none(),
            "an empty trace re-opens a place"
        );
        let c = slot.claim(2).expect("the re-opened place");
        assert!(slot.submit(b, vec![1, 2]).is_none());
        let done = slot.submit(c, vec![2, 3]).expect("complete");
        assert_eq!(done.traces, vec![vec![1, 2], vec![2, 3]]);
        assert!(slot.is_latest(done.ticket));

        slot.arm(1);
        let d = slot.claim(2).unwrap();
        slot.clear();
        assert!(
            slot.submit(d, vec![9]).is_none(),
            "cleared: the trace is stale"
        );
        assert!(!slot.is_latest(d));
        let (set, recording, error) = slot.info();
        assert!(set.is_none() && error.is_none());
        assert!(recording.is_none());
    }
}
