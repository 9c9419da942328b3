//! Per-fork serving counters and the fault-latency histogram.
//!
//! Counters are `AtomicU64`s written with `Relaxed` ordering by the fork's one worker and read
//! by anyone. Latency is measured inside the daemon: from the moment a batch of fault events is
//! read off the uffd to the moment the `UFFDIO_COPY`/`ZEROPAGE`/`WAKE`/`POISON` that resolves
//! the fault returns, in nanoseconds. It is kept in a small log-linear histogram
//! ([`LatencyHistogram`], about 4 KiB) that is only allocated on a fork's first recorded fault
//! and written once per batch of events (one uncontended lock), so an idle fork costs a few
//! hundred bytes and a daemon with thousands of forks stays small.
//!
//! [`DAEMON`] and [`FAULT_LATENCY`] count for the whole daemon what no fork keeps: handoffs
//! refused and sessions ended by reason, and every fault's latency, for the metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};

use proto::model::{EndReason, ForkStatsReport, LatencyReport, RefusalReason};

/// The largest latency the histogram tells apart (60 s); longer ones count as 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Values below `2^SUB_BITS+1` get a bucket each; above, every power of two is split into
/// `2^SUB_BITS` buckets, so a reported value is within 1/16 (6.25%) of the recorded one.
const SUB_BITS: u32 = 4;
const SUB_BUCKETS: u64 = 1 << SUB_BITS;
/// Values below this are exact.
const LINEAR_LIMIT: u64 = 2 * SUB_BUCKETS;
/// Buckets needed up to [`MAX_LATENCY_NS`].
const BUCKETS: usize = bucket_of(MAX_LATENCY_NS) + 1;
// The counts stay near 4 KiB.
const _: () = assert!(BUCKETS * 8 <= 4096 + 256);

/// The bucket holding `v` (`v <= MAX_LATENCY_NS`).
const fn bucket_of(v: u64) -> usize {
    if v < LINEAR_LIMIT {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let sub = (v >> (exp - SUB_BITS)) & (SUB_BUCKETS - 1);
    (LINEAR_LIMIT + (exp - SUB_BITS - 1) as u64 * SUB_BUCKETS + sub) as usize
}

/// The largest value that falls in bucket `i`.
const fn bucket_top(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR_LIMIT {
        return i;
    }
    let exp = (i - LINEAR_LIMIT) / SUB_BUCKETS + SUB_BITS as u64 + 1;
    let sub = (i - LINEAR_LIMIT) % SUB_BUCKETS;
    let width = 1 << (exp - SUB_BITS as u64);
    (1 << exp) + (sub + 1) * width - 1
}

/// Fault latencies in log-linear buckets: `count` per bucket, plus the exact maximum.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max: u64,
    /// Sum of the recorded values (saturating).
    sum: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

impl LatencyHistogram {
    /// Records one latency; values past 60 s count as 60 s, 0 as 1.
    pub fn record(&mut self, ns: u64) {
        let v = ns.clamp(1, MAX_LATENCY_NS);
        self.counts[bucket_of(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
        self.sum = self.sum.saturating_add(v);
    }

    /// Counts per bound of `bounds` (ascending, in ns; a value lands in the first bound not
    /// below its bucket's top, or past the last), sum and count: a Prometheus histogram with
    /// bucket edges within 6.25% of the recorded values.
    pub fn rebucket(&self, bounds: &[u64]) -> (Vec<u64>, u64, u64) {
        let mut out = vec![0u64; bounds.len() + 1];
        for (i, &n) in self.counts.iter().enumerate().filter(|(_, &n)| n > 0) {
            let top = bucket_top(i);
            let at = bounds.partition_point(|&b| b < top);
            out[at] += n;
        }
        (out, self.sum, self.total)
    }

    /// The value below which a `q` fraction of the recorded latencies lie (the top of the
    /// bucket holding that rank, never above the largest recorded); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // The rank of the sample wanted, 1-based: ceil(q * total), at least 1.
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_top(i).min(self.max);
            }
        }
        self.max
    }

    fn report(&self) -> LatencyReport {
        LatencyReport {
            count: self.total,
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            max: self.max,
        }
    }
}

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

/// Counters of the whole daemon since it started, for metrics: what no single fork keeps.
#[derive(Debug, Default)]
pub(crate) struct DaemonCounters {
    refusals: Mutex<BTreeMap<RefusalReason, u64>>,
    endings: Mutex<BTreeMap<EndReason, u64>>,
}

impl DaemonCounters {
    /// A handoff was refused.
    pub fn refused(&self, reason: RefusalReason) {
        *self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// A session ended.
    pub fn ended(&self, reason: EndReason) {
        *self
            .endings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Handoffs refused, by reason.
    pub fn refusals(&self) -> BTreeMap<RefusalReason, u64> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sessions ended, by reason.
    pub fn endings(&self) -> BTreeMap<EndReason, u64> {
        self.endings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The daemon's counters.
pub(crate) static DAEMON: LazyLock<DaemonCounters> = LazyLock::new(DaemonCounters::default);

/// Every fault latency the daemon measured, for the metrics' histogram (seconds).
pub(crate) static FAULT_LATENCY: LazyLock<Mutex<LatencyHistogram>> =
    LazyLock::new(|| Mutex::new(LatencyHistogram::default()));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebucketing_keeps_every_sample_and_the_sum() {
        let mut h = LatencyHistogram::default();
        for ns in [500, 900, 1_500, 3_000, 3_000, 10_000_000_000] {
            h.record(ns);
        }
        let bounds = [1_000, 2_000, 4_000];
        let (counts, sum, count) = h.rebucket(&bounds);
        assert_eq!(counts, vec![2, 1, 2, 1], "≤1 µs, ≤2 µs, ≤4 µs, beyond");
        assert_eq!(count, 6);
        assert_eq!(sum, 500 + 900 + 1_500 + 6_000 + 10_000_000_000);
    }

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

    #[test]
    fn buckets_cover_the_range_in_order_within_a_sixteenth() {
        assert_eq!(BUCKETS, bucket_of(MAX_LATENCY_NS) + 1);
        let mut last = 0;
        let mut v = 1u64;
        while v <= MAX_LATENCY_NS {
            let b = bucket_of(v);
            assert!(b >= last, "bucket order at {v}");
            last = b;
            let top = bucket_top(b);
            assert!(top >= v, "{v} above its bucket's top {top}");
            assert!(top - v <= v / 16, "{v} reported as {top}");
            if b > 0 {
                assert!(bucket_top(b - 1) < v, "{v} also fits bucket {}", b - 1);
            }
            v = v + v / 7 + 1;
        }
    }

    #[test]
    fn quantiles_and_clamping() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=100 {
            h.record(v * 1_000);
        }
        let p50 = h.quantile(0.5);
        assert!((50_000..=50_000 + 50_000 / 16).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((99_000..=100_000).contains(&p99), "{p99}");
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.quantile(0.0), 1);
        assert_eq!(h.quantile(1.0), MAX_LATENCY_NS);
        assert_eq!(h.max, MAX_LATENCY_NS);
    }
}
