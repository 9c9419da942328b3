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
//! runs. Every metric is listed in `docs/operations.md`.
//!
//! HTTP is hyper's (HTTP/1.1) on a single-threaded tokio runtime of the metrics thread: many
//! connections are served at once (at most [`MAX_CONNECTIONS`]; more are closed at once), and
//! each has [`REQUEST_DEADLINE`] to send its request head and be answered, so a scraper that
//! sends a byte now and then delays nobody and is cut off.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::lifecycle::Lifecycle;
use crate::stats::{LatencyHistogram, DAEMON, FAULT_LATENCY};

/// How long one connection may take to send its request head and be answered.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

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
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
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
            MetricsAddr::Tcp(host_port) => Listener::Tcp(std::net::TcpListener::bind(host_port)?),
            MetricsAddr::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path)?;
                }
                Listener::Unix(std::os::unix::net::UnixListener::bind(path)?)
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l) => l.set_nonblocking(true)?,
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("pagerd-metrics".into())
            .spawn(move || runtime.block_on(serve(listener, lifecycle)))?;
        Ok(Self { _thread: thread })
    }
}

/// Accepts connections for ever, each served by a task of its own.
async fn serve(listener: Listener, lifecycle: Arc<Lifecycle>) {
    let listener = match listener {
        Listener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Accepting::Tcp),
        Listener::Unix(l) => tokio::net::UnixListener::from_std(l).map(Accepting::Unix),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot serve the listening socket");
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    let mut failures = crate::ratelimit::RateLimiter::new(5, Duration::from_secs(10));
    loop {
        let accepted = match &listener {
            Accepting::Tcp(l) => l.accept().await.map(|(s, _)| Connection::Tcp(s)),
            Accepting::Unix(l) => l.accept().await.map(|(s, _)| Connection::Unix(s)),
        };
        let connection = match accepted {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = failures.check(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "metrics accept failed");
                }
                // Out of descriptors, say: wait for some to be freed rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (lifecycle, open) = (lifecycle.clone(), open.clone());
        tokio::spawn(async move {
            let served = match connection {
                Connection::Tcp(s) => answer(TokioIo::new(s), lifecycle).await,
                Connection::Unix(s) => answer(TokioIo::new(s), lifecycle).await,
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics scrape failed");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

enum Accepting {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Serves one connection's one request within [`REQUEST_DEADLINE`].
async fn answer<I>(io: I, lifecycle: Arc<Lifecycle>) -> Result<(), Box<dyn std::error::Error>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(&request, &lifecycle);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_DEADLINE)
        .keep_alive(false)
        .serve_connection(io, service);
    tokio::time::timeout(REQUEST_DEADLINE, connection).await??;
    Ok(())
}

/// The answer to one request: the exposition for `GET /metrics`.
fn respond(
    request: &Request<hyper::body::Incoming>,
    lifecycle: &Lifecycle,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
            match exposition(lifecycle) {
                Ok(body) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                "GET /metrics\n".to_owned(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
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
    let totals = lifecycle.reports().stats().totals;
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

    let status = lifecycle.reports().status()?;
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
