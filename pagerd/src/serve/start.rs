//! How a newly attached fork starts: recording its snapshot's working set, or replaying the
//! recorded one (then graduating, if asked), or on demand only.
//!
//! Recording comes first: a recording fork must fault to be seen, so it replays nothing. A
//! fork that asked to graduate records only when a recording was asked for; a fork whose
//! VMM has 2 MiB pages anywhere does not graduate (a graduated fork must need no fault at
//! all, and only 4 KiB regions are installed ahead of the guest).

use std::sync::Arc;

use proto::prefetch::Prefetch;

use crate::working_set::slot::{Slot, Ticket};
use crate::working_set::WorkingSet;

/// What a new session does besides serving faults.
#[derive(Debug)]
pub enum Start {
    /// Records the snapshot's working set with this place in the recording.
    Record(Ticket),
    /// Replays `set` (if any), then graduates with `graduate`.
    Prefetch {
        /// The set to replay.
        set: Option<Arc<WorkingSet>>,
        /// Whether every other page follows.
        graduate: bool,
    },
}

/// How a fork asking for `prefetch` starts on a snapshot whose working set is in `slot`,
/// when snapshots without a set record one from `record_forks` forks (0: only on request).
pub fn choose(prefetch: Prefetch, slot: &Slot, record_forks: u32, small_pages_only: bool) -> Start {
    let auto_record = match prefetch {
        Prefetch::Graduate => 0,
        _ => record_forks,
    };
    if let Some(ticket) = slot.claim(auto_record) {
        return Start::Record(ticket);
    }
    Start::Prefetch {
        set: prefetch.replays().then(|| slot.current()).flatten(),
        graduate: prefetch == Prefetch::Graduate && small_pages_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(start: &Start) -> bool {
        matches!(start, Start::Record(_))
    }

    #[test]
    fn a_snapshot_without_a_set_records_from_the_first_forks_then_they_run_on_demand() {
        let slot = Slot::default();
        assert!(record(&choose(Prefetch::WorkingSet, &slot, 2, true)));
        assert!(record(&choose(Prefetch::WorkingSet, &slot, 2, true)));
        let third = choose(Prefetch::WorkingSet, &slot, 2, true);
        assert!(
            matches!(
                third,
                Start::Prefetch {
                    set: None,
                    graduate: false
                }
            ),
            "{third:?}"
        );
        // Recording off: nothing is recorded unless asked.
        let slot = Slot::default();
        assert!(!record(&choose(Prefetch::WorkingSet, &slot, 0, true)));
        slot.arm(1);
        assert!(record(&choose(Prefetch::WorkingSet, &slot, 0, true)));
    }

    #[test]
    fn graduation_records_only_on_request_and_needs_small_pages() {
        let slot = Slot::default();
        let start = choose(Prefetch::Graduate, &slot, 4, true);
        assert!(
            matches!(
                start,
                Start::Prefetch {
                    set: None,
                    graduate: true
                }
            ),
            "{start:?}"
        );
        let start = choose(Prefetch::Graduate, &slot, 4, false);
        assert!(
            matches!(
                start,
                Start::Prefetch {
                    graduate: false,
                    ..
                }
            ),
            "{start:?}"
        );
        slot.arm(1);
        assert!(record(&choose(Prefetch::Graduate, &slot, 0, true)));
        let start = choose(Prefetch::Off, &Slot::default(), 0, true);
        assert!(
            matches!(
                start,
                Start::Prefetch {
                    set: None,
                    graduate: false
                }
            ),
            "{start:?}"
        );
    }
}
