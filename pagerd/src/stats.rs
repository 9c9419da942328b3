//! Per-fork serving counters and the fault-latency histogram.
//!
//! Counters are `AtomicU64`s written with `Relaxed` ordering by the fork's one worker and read
//! by anyone. The histogram is written once per batch of events (one uncontended lock), not
//! once per fault. Latency is measured inside the daemon: from the moment a batch of fault
//! events is read off the uffd to the moment the `UFFDIO_COPY`/`ZEROPAGE`/`WAKE` that
//! resolves the fault returns, in nanoseconds.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use proto::model::{ForkStatsReport, LatencyReport};

/// The largest latency the histogram tells apart (60 s); longer ones count as 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Live counters of one fork.
#[derive(Debug)]
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
    /// Faults that could not be served for another reason.
    pub errors: AtomicU64,
    latency_ns: Mutex<Histogram<u64>>,
}

impl Default for ForkStats {
    fn default() -> Self {
        Self {
            faults: AtomicU64::new(0),
            pages_copied: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            deferred_retries: AtomicU64::new(0),
            outside_faults: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            // Fixed bounds: `saturating_record` clamps to the histogram's current top, and an
            // auto-resizing histogram starts with a top of about 2 µs.
            latency_ns: Mutex::new(
                Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

/// Adds `n` to a counter.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl ForkStats {
    /// Records fault latencies measured during one batch.
    pub fn record_latencies(&self, samples_ns: &[u64]) {
        if samples_ns.is_empty() {
            return;
        }
        let mut hist = self.latency_ns.lock().unwrap_or_else(|p| p.into_inner());
        for &ns in samples_ns {
            hist.saturating_record(ns.max(1));
        }
    }

    /// Copies the counters.
    pub fn report(&self) -> ForkStatsReport {
        let hist = self.latency_ns.lock().unwrap_or_else(|p| p.into_inner());
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
            poisoned_pages: 0,
            errors: load(&self.errors),
            latency_ns: LatencyReport {
                count: hist.len(),
                p50: hist.value_at_quantile(0.5),
                p99: hist.value_at_quantile(0.99),
                max: hist.max(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_report_reflects_recorded_samples() {
        let stats = ForkStats::default();
        stats.record_latencies(&[1_000, 2_000, 3_000, 50_000]);
        let r = stats.report().latency_ns;
        assert_eq!(r.count, 4);
        assert!((1_990..=2_010).contains(&r.p50), "{r:?}");
        assert!(
            (49_900..=50_100).contains(&r.p99) && r.max >= 50_000,
            "{r:?}"
        );
    }
}
