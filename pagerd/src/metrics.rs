//! Prometheus metrics: the OpenMetrics text exposition at `--metrics-addr` (`HOST:PORT`, or
//! `unix:PATH`), answered to `GET /metrics`.
//!
//! ```text
//!   scraper ──GET /metrics──▶ metrics thread ──▶ lifecycle: totals, forks, snapshots, users
//!                                            └──▶ stats::DAEMON (refusals, endings),
//!                                                 stats::FAULT_LATENCY (log-linear, rebucketed)
//! ```
//!
//! Every scrape builds the exposition afresh from the lifecycle, so nothing here is updated on
//! the fault path except the latency histogram (once per batch of events, in `stats`). Counters
//! count since the daemon started, forks closed since included, so they never go down while it
//! runs. One connection is answered at a time, each with a short timeout: a stuck scraper
//! delays only other scrapers. Every metric is listed in `docs/operations.md`.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::lifecycle::Lifecycle;
use crate::stats::{LatencyHistogram, DAEMON, FAULT_LATENCY};

/// How long one scrape may take to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of a request read.
const MAX_REQUEST: usize = 8 * 1024;

/// Where the metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address (loopback recommended).
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err("a unix: metrics address needs an absolute path".into()),
            None if s.contains(':') => Ok(Self::Tcp(s.to_owned())),
            None => Err("expected HOST:PORT or unix:/PATH".into()),
        }
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(host_port) => f.write_str(host_port),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The metrics thread.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    _thread: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and starts answering scrapes from `lifecycle`.
    pub fn start(addr: &MetricsAddr, lifecycle: Arc<Lifecycle>) -> io::Result<Self> {
        let listener = match addr {
            MetricsAddr::Tcp(host_port) => Listener::Tcp(TcpListener::bind(host_port)?),
            MetricsAddr::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path)?;
                }
                Listener::Unix(UnixListener::bind(path)?)
            }
        };
        let thread = std::thread::Builder::new()
            .name("pagerd-metrics".into())
            .spawn(move || serve(&listener, &lifecycle))?;
        Ok(Self { _thread: thread })
    }
}

fn serve(listener: &Listener, lifecycle: &Lifecycle) {
    loop {
        let result = match listener {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
                s.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
                answer(s, lifecycle)
            }),
            Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
                s.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
                answer(s, lifecycle)
            }),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "metrics scrape failed");
        }
    }
}

/// Reads one HTTP request head and answers it.
fn answer(mut stream: impl Read + Write, lifecycle: &Lifecycle) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, content_type, body) = if line.starts_with(b"GET /metrics ") {
        match exposition(lifecycle) {
            Ok(body) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "text/plain", "GET /metrics\n".to_owned())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

type Labels = Vec<(String, String)>;

fn label(name: &str, value: impl ToString) -> Labels {
    vec![(name.to_owned(), value.to_string())]
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: usize) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// The wire name of a serialisable enum (`"vmm_exited"`).
fn name_of(value: impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The whole exposition, read off the lifecycle now.
/// Upper bounds of the fault-latency buckets: 1 µs, doubling, 22 of them (to about 2 s).
fn latency_bounds_ns() -> Vec<u64> {
    (0..22).map(|k| 1_000u64 << k).collect()
}

/// The daemon's fault latencies as a Prometheus histogram, from the log-linear histogram the
/// workers fill (one lock per batch of faults, none per sample).
#[derive(Debug)]
struct LatencyMetric(LatencyHistogram);

impl EncodeMetric for LatencyMetric {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = latency_bounds_ns();
        let (counts, sum_ns, count) = self.0.rebucket(&bounds);
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain([f64::MAX])
            .zip(counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn exposition(lifecycle: &Lifecycle) -> Result<String, Box<dyn std::error::Error>> {
    let mut registry = Registry::with_prefix("pagerd");
    let totals = lifecycle.stats().totals;
    counter(
        &mut registry,
        "faults",
        "Page-fault events read from forks' uffds",
        totals.faults,
    );
    counter(
        &mut registry,
        "pages_copied",
        "Pages filled with snapshot bytes (UFFDIO_COPY)",
        totals.pages_copied,
    );
    counter(
        &mut registry,
        "bytes_copied",
        "Bytes filled with snapshot bytes",
        totals.bytes_copied,
    );
    counter(
        &mut registry,
        "zero_pages",
        "Pages filled with the zero page",
        totals.zero_pages,
    );
    counter(
        &mut registry,
        "removes",
        "UFFD_EVENT_REMOVE events applied (pages given back)",
        totals.removes,
    );
    counter(
        &mut registry,
        "deferred_retries",
        "Faults retried after EAGAIN",
        totals.deferred_retries,
    );
    counter(
        &mut registry,
        "already_present",
        "Faults on pages already present, answered with a wake",
        totals.already_present,
    );
    counter(
        &mut registry,
        "replayed_pages",
        "Pages installed ahead of the guest by working-set replay",
        totals.replayed_pages,
    );
    counter(
        &mut registry,
        "graduated_pages",
        "Pages installed ahead of the guest by graduation",
        totals.graduated_pages,
    );
    counter(
        &mut registry,
        "prefetch_skipped",
        "Pages prefetch found present or given back, and left alone",
        totals.prefetch_skipped,
    );
    counter(
        &mut registry,
        "recorded_pages",
        "First touches recorded into working sets",
        totals.recorded_pages,
    );
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
    let refusals: Family<Labels, Counter> = Family::default();
    for (reason, n) in DAEMON.refusals() {
        refusals
            .get_or_create(&label("reason", name_of(reason)))
            .inc_by(n);
    }
    registry.register("handoff_refusals", "Handoffs refused, by reason", refusals);
    let endings: Family<Labels, Counter> = Family::default();
    for (reason, n) in DAEMON.endings() {
        endings
            .get_or_create(&label("reason", name_of(reason)))
            .inc_by(n);
    }
    registry.register("sessions_ended", "Fork sessions ended, by reason", endings);
    let latency = FAULT_LATENCY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    registry.register(
        "fault_latency_seconds",
        "Time from reading a fault to the ioctl that resolved it",
        LatencyMetric(latency),
    );

    let status = lifecycle.status()?;
    let forks: Family<Labels, Gauge> = Family::default();
    for (state, n) in [
        ("waiting", status.forks.waiting),
        ("serving", status.forks.serving),
        ("ended", status.forks.ended),
        ("detached", status.forks.detached),
    ] {
        forks
            .get_or_create(&label("state", state))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("forks", "Forks by state", forks);
    let vms: Family<Labels, Gauge> = Family::default();
    for (state, n) in [
        ("starting", status.vms.starting),
        ("running", status.vms.running),
        ("exited", status.vms.exited),
        ("failed", status.vms.failed),
    ] {
        vms.get_or_create(&label("state", state))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("vms", "Launched VMs by state", vms);
    let sessions: Family<Labels, Gauge> = Family::default();
    for (worker, n) in status.worker_sessions.iter().enumerate() {
        sessions
            .get_or_create(&label("worker", worker))
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    registry.register(
        "worker_sessions",
        "Sessions each worker thread serves",
        sessions,
    );
    gauge(
        &mut registry,
        "snapshots",
        "Snapshots served",
        status.snapshots,
    );
    gauge(
        &mut registry,
        "damaged_snapshots",
        "Snapshots kept but not served",
        status.damaged_snapshots.len(),
    );
    gauge(
        &mut registry,
        "unreadable_fork_records",
        "Fork records that cannot be read",
        status.unreadable_fork_records.len(),
    );
    gauge(
        &mut registry,
        "file_users",
        "Processes holding memory files on the FUSE mount",
        status.fuse.as_ref().map_or(0, |f| f.file_users),
    );
    gauge(
        &mut registry,
        "healthy",
        "1 when no snapshot is damaged and every fork record reads",
        usize::from(status.healthy),
    );
    if let Some(fds) = status.open_fds {
        gauge(
            &mut registry,
            "open_fds",
            "Descriptors the daemon holds",
            fds,
        );
    }
    // One series per snapshot: bounded by the snapshots an operator registers.
    let references: Family<Labels, Gauge> = Family::default();
    for snapshot in lifecycle.snapshots()? {
        if let Some(refs) = snapshot.ref_count {
            references
                .get_or_create(&label("snapshot", &snapshot.id))
                .set(i64::try_from(refs).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        "snapshot_references",
        "Forks and file users referencing each snapshot",
        references,
    );

    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_tcp_or_absolute_unix_paths() {
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9464".into()))
        );
        assert_eq!(
            "unix:/run/pagerd/metrics.sock".parse(),
            Ok(MetricsAddr::Unix("/run/pagerd/metrics.sock".into()))
        );
        assert!("unix:relative".parse::<MetricsAddr>().is_err());
        assert!("9464".parse::<MetricsAddr>().is_err());
    }
}
