//! When a worker may spin: only while a core is left for every VMM that is faulting.
//!
//! After a fault a worker polls without sleeping for `--spin-us`, because the same VMM's next
//! fault usually follows within microseconds and waking a sleeping thread is the dearest part
//! of a round trip on a virtualized host. That pays only while the spinning worker does not
//! take a core a VMM needs. So each worker publishes how many of its sessions faulted in the
//! last [`ACTIVE_WINDOW`], and a worker spins only if those VMMs plus the workers serving them
//! fit in the machine's cores. One busy VMM on a 2-core host: spin. Thirty-two: never (with
//! spinning, their page reads' p99 was 1.5–2x worse on this 2-core host, `docs/design.md`).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A session counts as active for this long after its last fault.
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(10);

/// What every worker shares to decide whether to spin.
#[derive(Debug)]
pub struct SpinBudget {
    /// Per worker: its sessions that faulted within the window.
    active: Vec<AtomicUsize>,
    cores: usize,
}

impl SpinBudget {
    /// A budget for `workers` workers on `cores` cores.
    pub fn new(workers: usize, cores: usize) -> Self {
        Self {
            active: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            cores: cores.max(1),
        }
    }

    /// Worker `worker` has `active` sessions that faulted recently.
    pub fn publish(&self, worker: usize, active: usize) {
        if let Some(slot) = self.active.get(worker) {
            if slot.load(Relaxed) != active {
                slot.store(active, Relaxed);
            }
        }
    }

    /// Whether the faulting VMMs and the workers serving them leave room for spinning.
    pub fn may_spin(&self) -> bool {
        let (mut vmms, mut workers) = (0, 0);
        for slot in &self.active {
            let n = slot.load(Relaxed);
            vmms += n;
            workers += usize::from(n > 0);
        }
        vmms + workers <= self.cores
    }
}

/// A worker's sessions that faulted recently.
#[derive(Debug, Default)]
pub struct ActiveSessions {
    last_fault: Vec<(usize, Instant)>,
}

impl ActiveSessions {
    /// Session `key` faulted at `now`.
    pub fn faulted(&mut self, key: usize, now: Instant) {
        match self.last_fault.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = now,
            None => self.last_fault.push((key, now)),
        }
    }

    /// Forgets sessions quiet for longer than the window (and ended ones); how many remain.
    pub fn count(&mut self, now: Instant) -> usize {
        self.last_fault
            .retain(|(_, t)| now.saturating_duration_since(*t) < ACTIVE_WINDOW);
        self.last_fault.len()
    }

    /// Whether no session counts as active.
    pub fn is_empty(&self) -> bool {
        self.last_fault.is_empty()
    }

    /// Session `key` ended.
    pub fn forget(&mut self, key: usize) {
        self.last_fault.retain(|(k, _)| *k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_needs_a_core_for_every_faulting_vmm_and_its_worker() {
        let budget = SpinBudget::new(2, 2);
        assert!(budget.may_spin(), "nothing faults");
        budget.publish(0, 1);
        assert!(budget.may_spin(), "one VMM and its worker fit two cores");
        budget.publish(1, 1);
        assert!(!budget.may_spin(), "two VMMs and two workers do not");
        budget.publish(1, 0);
        budget.publish(0, 16);
        assert!(!budget.may_spin());
    }

    #[test]
    fn sessions_stop_counting_after_the_window() {
        let mut active = ActiveSessions::default();
        let t = Instant::now();
        active.faulted(1, t);
        active.faulted(2, t);
        active.faulted(1, t);
        assert_eq!(active.count(t), 2);
        active.forget(2);
        assert_eq!(active.count(t), 1);
        assert_eq!(active.count(t + ACTIVE_WINDOW), 0);
    }
}
