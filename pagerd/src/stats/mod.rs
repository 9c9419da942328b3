//! Serving counters: each fork's own, and the daemon's.
//!
//! ```text
//!   worker ──bump──▶ ForkStats (AtomicU64s, one fork) ──────────▶ pagerctl stats, metrics
//!          ──batch──▶ ForkStats' latency ────────────────────────▶ pagerctl stats, metrics
//!                   └▶ FAULT_LATENCY (every fork) ────────────────▶ metrics
//!   acceptor, workers, control, lifecycle, daemon ──▶ DAEMON ────▶ metrics
//! ```
//!
//! A fork's counters are `AtomicU64`s written with `Relaxed` ordering by the fork's one worker
//! and read by anyone. Latency is measured inside the daemon: from the moment a batch of fault
//! events is read off the uffd to the moment the `UFFDIO_COPY`/`ZEROPAGE`/`WAKE`/`POISON` that
//! resolves the fault returns, in nanoseconds. It is kept in a small log-linear histogram
//! ([`LatencyHistogram`], `latency.rs`, about 4 KiB) that is only allocated on a fork's first
//! recorded fault and written once per batch of events (one uncontended lock), so an idle fork
//! costs a few hundred bytes and a daemon with thousands of forks stays small.
//!
//! [`DAEMON`] (`daemon.rs`) and [`FAULT_LATENCY`] count for the whole daemon what no fork
//! keeps, for the metrics: handoffs refused and sessions ended by reason, control requests,
//! imports, VM start failures, start-up, and every fault's latency.

mod daemon;
mod latency;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use proto::model::ForkStatsReport;

pub(crate) use daemon::{control_op, VmStartFailure, DAEMON};
pub use latency::LatencyHistogram;
pub(crate) use latency::FAULT_LATENCY;

/// Live counters of one fork.
#[derive(Debug, Default)]
pub struct ForkStats {
    /// Page-fault events read.
    pub faults: AtomicU64,
    /// Pages filled by copying snapshot bytes.
    pub pages_copied: AtomicU64,
    /// Bytes filled by copying snapshot bytes.
    pub bytes_copied: AtomicU64,
    /// Pages filled with the zero page (or zeros, for hugetlbfs).
    pub zero_pages: AtomicU64,
    /// Faults on pages that were already present (`EEXIST`), answered with a wake.
    pub already_present: AtomicU64,
    /// `UFFD_EVENT_REMOVE` events applied.
    pub removes: AtomicU64,
    /// Faults retried after `EAGAIN`.
    pub deferred_retries: AtomicU64,
    /// Faults outside every region the VMM declared.
    pub outside_faults: AtomicU64,
    /// Pages poisoned (`UFFDIO_POISON`) because pagerd had no bytes for them: the access
    /// gets `SIGBUS`.
    pub poisoned_pages: AtomicU64,
    /// Faults that could not be served for another reason.
    pub errors: AtomicU64,
    /// Pages installed by working-set replay.
    pub replayed_pages: AtomicU64,
    /// Pages installed by graduation.
    pub graduated_pages: AtomicU64,
    /// Pages replay or graduation found present or given back, and left alone.
    pub prefetch_skipped: AtomicU64,
    /// First touches recorded into a working set.
    pub recorded_pages: AtomicU64,
    /// Allocated on the first recorded latency.
    latency_ns: Mutex<Option<LatencyHistogram>>,
}

/// Adds `n` to a counter.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl ForkStats {
    /// Adds counters a previous program of the daemon kept for this fork (the latency summary
    /// is this program's own).
    pub fn carry_over(&self, previous: &ForkStatsReport) {
        let add = |c: &AtomicU64, n: u64| bump(c, n);
        add(&self.faults, previous.faults);
        add(&self.pages_copied, previous.pages_copied);
        add(&self.bytes_copied, previous.bytes_copied);
        add(&self.zero_pages, previous.zero_pages);
        add(&self.already_present, previous.already_present);
        add(&self.removes, previous.removes);
        add(&self.deferred_retries, previous.deferred_retries);
        add(&self.outside_faults, previous.outside_faults);
        add(&self.poisoned_pages, previous.poisoned_pages);
        add(&self.errors, previous.errors);
        add(&self.replayed_pages, previous.replayed_pages);
        add(&self.graduated_pages, previous.graduated_pages);
        add(&self.prefetch_skipped, previous.prefetch_skipped);
        add(&self.recorded_pages, previous.recorded_pages);
    }

    /// Records fault latencies measured during one batch.
    pub fn record_latencies(&self, samples_ns: &[u64]) {
        if samples_ns.is_empty() {
            return;
        }
        let mut hist = self.latency_ns.lock().unwrap_or_else(|p| p.into_inner());
        let hist = hist.get_or_insert_with(LatencyHistogram::default);
        for &ns in samples_ns {
            hist.record(ns);
        }
        // One more uncontended lock per batch (the other worker's batches aside), none per
        // sample.
        let mut all = FAULT_LATENCY.lock().unwrap_or_else(|p| p.into_inner());
        for &ns in samples_ns {
            all.record(ns);
        }
    }

    /// Copies the counters.
    pub fn report(&self) -> ForkStatsReport {
        let latency_ns = self
            .latency_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(LatencyHistogram::report)
            .unwrap_or_default();
        let load = |c: &AtomicU64| c.load(Relaxed);
        ForkStatsReport {
            faults: load(&self.faults),
            pages_copied: load(&self.pages_copied),
            bytes_copied: load(&self.bytes_copied),
            zero_pages: load(&self.zero_pages),
            already_present: load(&self.already_present),
            removes: load(&self.removes),
            deferred_retries: load(&self.deferred_retries),
            outside_faults: load(&self.outside_faults),
            poisoned_pages: load(&self.poisoned_pages),
            errors: load(&self.errors),
            replayed_pages: load(&self.replayed_pages),
            graduated_pages: load(&self.graduated_pages),
            prefetch_skipped: load(&self.prefetch_skipped),
            recorded_pages: load(&self.recorded_pages),
            latency_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::model::LatencyReport;

    use super::*;

    #[test]
    fn latency_report_reflects_recorded_samples() {
        let stats = ForkStats::default();
        assert_eq!(stats.report().latency_ns, LatencyReport::default());
        stats.record_latencies(&[1_000, 2_000, 3_000, 50_000]);
        let r = stats.report().latency_ns;
        assert_eq!(r.count, 4);
        assert_eq!(r.max, 50_000);
        assert!((2_000..=2_000 + 2_000 / 16).contains(&r.p50), "{r:?}");
        assert_eq!(r.p99, 50_000, "the top bucket is capped at the maximum");
    }

    #[test]
    fn an_idle_fork_allocates_no_histogram() {
        let stats = ForkStats::default();
        let _ = stats.report();
        assert!(stats.latency_ns.lock().unwrap().is_none());
        assert!(std::mem::size_of::<ForkStats>() < 256);
    }
}
