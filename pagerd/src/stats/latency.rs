//! The fault-latency histogram: log-linear buckets (each power of two split in 16), about
//! 4 KiB, written once per batch of fault events, and [`FAULT_LATENCY`], every fault of the
//! daemon, which the metrics rebucket into a Prometheus histogram at scrape time.

use std::sync::{LazyLock, Mutex};

use proto::model::LatencyReport;

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

    pub(super) fn report(&self) -> LatencyReport {
        LatencyReport {
            count: self.total,
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            max: self.max,
        }
    }
}

/// Every fault latency the daemon measured, for the metrics' histogram.
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
