//! What one scrape answers: a registry built afresh from the daemon's state.
//!
//! ```text
//!   process_*            ◀── /proc/self (process.rs)
//!   pagerd_build_info    ◀── the crate's version
//!   pagerd_* totals      ◀── lifecycle: counters summed over forks, closed ones included
//!   pagerd_* gauges      ◀── lifecycle: forks, snapshots, users; vms: launched VMs by state
//!   pagerd_* by reason   ◀── stats::DAEMON (refusals, endings, control requests, imports, …)
//!   pagerd_fault_latency ◀── stats::FAULT_LATENCY, rebucketed (LatencyMetric)
//! ```
//!
//! Every family with labels has its series from the start, at zero: fixed label sets are
//! listed here or in `stats`; per-worker and per-snapshot series exist as workers and
//! snapshots do.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use proto::model::{ForkState, VmState};

use super::process::ProcessStats;
use super::Sources;
use crate::stats::{LatencyHistogram, DAEMON, FAULT_LATENCY};

/// One label's name and value.
type Labels = Vec<(&'static str, String)>;

fn label(name: &'static str, value: impl ToString) -> Labels {
    vec![(name, value.to_string())]
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    registry.register(name, help, ConstCounter::new(value));
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: usize) {
    registry.register(name, help, ConstGauge::new(value));
}

/// A gauge per label value.
fn gauges(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label_name: &'static str,
    values: impl IntoIterator<Item = (String, usize)>,
) {
    let family: Family<Labels, Gauge> = Family::default();
    for (value, n) in values {
        family
            .get_or_create(&label(label_name, value))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register(name, help, family);
}

/// Upper bounds of the fault-latency buckets: 1 µs, doubling, 22 of them (to about 2 s).
fn latency_bounds_ns() -> Vec<u64> {
    (0..22).map(|k| 1_000u64 << k).collect()
}

/// The daemon's fault latencies as a Prometheus histogram, from the log-linear histogram the
/// workers fill (one lock per batch of faults, none per sample), encoded as the library
/// encodes its own `Histogram`: finite bounds, then the `+Inf` bucket.
#[derive(Debug)]
struct LatencyMetric(LatencyHistogram);

impl EncodeMetric for LatencyMetric {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = latency_bounds_ns();
        let (counts, sum_ns, count) = self.0.rebucket(&bounds);
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The whole registry, read off the daemon now.
pub(super) fn registry(sources: &Sources) -> Result<Registry, Box<dyn std::error::Error>> {
    let mut root = Registry::default();
    ProcessStats::read()?.register(&mut root);
    let registry = root.sub_registry_with_prefix("pagerd");
    registry.register(
        "build",
        "The running program's version",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    totals(registry, sources);
    DAEMON.register(registry);
    let latency = FAULT_LATENCY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    registry.register_with_unit(
        "fault_latency",
        "Time from reading a fault to the ioctl that resolved it",
        Unit::Seconds,
        LatencyMetric(latency),
    );
    state(registry, sources)?;
    Ok(root)
}

/// The serving counters, summed over every fork since the daemon started.
fn totals(registry: &mut Registry, sources: &Sources) {
    let totals = sources.lifecycle.reports().stats().totals;
    for (name, help, value) in [
        (
            "faults",
            "Page-fault events read from forks' uffds",
            totals.faults,
        ),
        (
            "pages_copied",
            "Pages filled with snapshot bytes (UFFDIO_COPY)",
            totals.pages_copied,
        ),
        (
            "bytes_copied",
            "Bytes filled with snapshot bytes",
            totals.bytes_copied,
        ),
        (
            "zero_pages",
            "Pages filled with the zero page",
            totals.zero_pages,
        ),
        (
            "removes",
            "UFFD_EVENT_REMOVE events applied (pages given back)",
            totals.removes,
        ),
        (
            "deferred_retries",
            "Faults retried after EAGAIN",
            totals.deferred_retries,
        ),
        (
            "already_present",
            "Faults on pages already present, answered with a wake",
            totals.already_present,
        ),
        (
            "replayed_pages",
            "Pages installed ahead of the guest by working-set replay",
            totals.replayed_pages,
        ),
        (
            "graduated_pages",
            "Pages installed ahead of the guest by graduation",
            totals.graduated_pages,
        ),
        (
            "prefetch_skipped",
            "Pages prefetch found present or given back, and left alone",
            totals.prefetch_skipped,
        ),
        (
            "recorded_pages",
            "First touches recorded into working sets",
            totals.recorded_pages,
        ),
    ] {
        counter(registry, name, help, value);
    }
    let errors: Family<Labels, Counter> = Family::default();
    for (kind, n) in [
        ("outside_regions", totals.outside_faults),
        ("poisoned", totals.poisoned_pages),
        ("other", totals.errors),
    ] {
        errors.get_or_create(&label("kind", kind)).inc_by(n);
    }
    registry.register(
        "fault_errors",
        "Faults that could not be served as asked, by kind",
        errors,
    );
}

/// What exists now: forks, VMs, workers, snapshots, users, health.
fn state(registry: &mut Registry, sources: &Sources) -> Result<(), Box<dyn std::error::Error>> {
    let lifecycle = &sources.lifecycle;
    let status = lifecycle.reports().status()?;
    let forks = &status.forks;
    gauges(
        registry,
        "forks",
        "Forks by state",
        "state",
        ForkState::ALL.iter().map(|&state| {
            let n = match state {
                ForkState::Waiting => forks.waiting,
                ForkState::Serving => forks.serving,
                ForkState::Ended => forks.ended,
                ForkState::Detached => forks.detached,
            };
            (state.to_string(), n)
        }),
    );
    let vms = sources.vms.counts();
    gauges(
        registry,
        "vms",
        "Launched VMs by state",
        "state",
        VmState::ALL.iter().map(|&state| {
            let n = match state {
                VmState::Starting => vms.starting,
                VmState::Running => vms.running,
                VmState::Exited => vms.exited,
                VmState::Failed => vms.failed,
            };
            (state.to_string(), n)
        }),
    );
    gauges(
        registry,
        "worker_sessions",
        "Sessions each worker thread serves",
        "worker",
        status
            .worker_sessions
            .iter()
            .enumerate()
            .map(|(worker, n)| (worker.to_string(), *n)),
    );
    gauge(registry, "snapshots", "Snapshots served", status.snapshots);
    gauge(
        registry,
        "damaged_snapshots",
        "Snapshots kept but not served",
        status.damaged_snapshots.len(),
    );
    gauge(
        registry,
        "unreadable_fork_records",
        "Fork records that cannot be read",
        status.unreadable_fork_records.len(),
    );
    gauge(
        registry,
        "file_users",
        "Processes holding memory files on the FUSE mount",
        status.fuse.as_ref().map_or(0, |f| f.file_users),
    );
    gauge(
        registry,
        "healthy",
        "1 when no snapshot is damaged and every fork record reads",
        usize::from(status.healthy),
    );
    if let Some(fds) = status.open_fds {
        gauge(registry, "open_fds", "Descriptors the daemon holds", fds);
    }
    // One series per snapshot: bounded by the snapshots an operator registers.
    gauges(
        registry,
        "snapshot_references",
        "Forks and file users referencing each snapshot",
        "snapshot",
        lifecycle
            .snapshots()?
            .into_iter()
            .filter_map(|s| s.ref_count.map(|refs| (s.id.to_string(), refs))),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn fault_latency_ends_with_an_infinite_bucket_holding_every_sample() {
        let mut latencies = LatencyHistogram::default();
        for ns in [800, 3_000, 3_000, 5_000_000_000] {
            latencies.record(ns);
        }
        let mut registry = Registry::default();
        registry.register_with_unit(
            "fault_latency",
            "Latency",
            Unit::Seconds,
            LatencyMetric(latencies),
        );
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let buckets: Vec<&str> = text.lines().filter(|l| l.contains("_bucket")).collect();
        assert_eq!(buckets.len(), 23, "{text}");
        assert_eq!(
            buckets[0],
            r#"fault_latency_seconds_bucket{le="0.000001"} 1"#
        );
        assert_eq!(
            buckets[2],
            r#"fault_latency_seconds_bucket{le="0.000004"} 3"#
        );
        assert_eq!(
            buckets[21],
            r#"fault_latency_seconds_bucket{le="2.097152"} 3"#
        );
        assert_eq!(buckets[22], r#"fault_latency_seconds_bucket{le="+Inf"} 4"#);
        assert!(text.contains("fault_latency_seconds_count 4\n"), "{text}");
    }
}
