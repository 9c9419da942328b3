//! Which session's prefetch goes next on a worker: the first in line that replays a working
//! set and is not waiting for the disk, else the first that is not waiting; after its step it
//! goes to the back of the line (right away, or once its disk wait is over).

use std::time::{Duration, Instant};

use super::prefetch::Phase;

/// Sessions with pages to install ahead of their guests, in turn order.
#[derive(Debug, Default)]
pub(super) struct PrefetchQueue {
    turns: Vec<Turn>,
}

/// A session in line, and when it may go on if it waits for the disk.
#[derive(Debug, Clone, Copy)]
struct Turn {
    key: usize,
    retry_at: Option<Instant>,
}

impl PrefetchQueue {
    /// Puts session `key` at the back of the line, to go on at `retry_at` (or now).
    pub(super) fn push(&mut self, key: usize, retry_at: Option<Instant>) {
        self.turns.push(Turn { key, retry_at });
    }

    /// Takes session `key` out of the line.
    pub(super) fn remove(&mut self, key: usize) {
        self.turns.retain(|t| t.key != key);
    }

    /// Whether no session is in line.
    pub(super) fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether a session in line is in `phase` (by `phase_of` its key).
    pub(super) fn any_in(&self, phase: Phase, phase_of: impl Fn(usize) -> Phase) -> bool {
        self.turns.iter().any(|t| phase_of(t.key) == phase)
    }

    /// How long until some session may go on at `now`: zero if one may now, `None` if none
    /// is in line.
    pub(super) fn wait(&self, now: Instant) -> Option<Duration> {
        self.turns
            .iter()
            .map(|t| {
                t.retry_at
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
            })
            .min()
    }

    /// Takes the next session out of the line: the first ready one that replays, else the
    /// first ready one.
    pub(super) fn next(
        &mut self,
        now: Instant,
        phase_of: impl Fn(usize) -> Phase,
    ) -> Option<usize> {
        let ready = |t: &Turn| t.retry_at.is_none_or(|at| at <= now);
        let pick = self
            .turns
            .iter()
            .position(|t| ready(t) && phase_of(t.key) == Phase::Replay)
            .or_else(|| self.turns.iter().position(ready))?;
        Some(self.turns.remove(pick).key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_goes_before_graduation_and_turns_rotate() {
        let now = Instant::now();
        let phase = |key: usize| {
            if key >= 10 {
                Phase::Replay
            } else {
                Phase::Graduate
            }
        };
        let mut q = PrefetchQueue::default();
        for key in [1, 2, 10, 11] {
            q.push(key, None);
        }
        assert!(q.any_in(Phase::Replay, phase));
        assert_eq!(q.next(now, phase), Some(10));
        q.push(10, None);
        assert_eq!(q.next(now, phase), Some(11), "the one that went is behind");
        q.push(11, None);
        q.remove(10);
        q.remove(11);
        assert!(!q.any_in(Phase::Replay, phase));
        assert_eq!(q.next(now, phase), Some(1));
        q.push(1, None);
        assert_eq!(q.next(now, phase), Some(2));
    }

    #[test]
    fn a_session_waiting_for_the_disk_is_skipped_until_its_time() {
        let now = Instant::now();
        let later = now + Duration::from_millis(5);
        let phase = |_| Phase::Replay;
        let mut q = PrefetchQueue::default();
        assert_eq!(q.wait(now), None, "nobody in line");
        q.push(1, Some(later));
        assert_eq!(q.wait(now), Some(Duration::from_millis(5)));
        assert_eq!(q.next(now, phase), None, "not yet");
        q.push(2, None);
        assert_eq!(q.wait(now), Some(Duration::ZERO));
        assert_eq!(q.next(now, phase), Some(2));
        assert_eq!(q.next(later, phase), Some(1));
        assert!(q.is_empty());
    }
}
