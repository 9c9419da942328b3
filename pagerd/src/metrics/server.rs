//! The metrics' HTTP server: hyper (HTTP/1.1) on a single-threaded tokio runtime of the
//! metrics thread. Many connections are served at once (at most [`MAX_CONNECTIONS`]; more are
//! closed at once), and each has [`REQUEST_DEADLINE`] to send its request head and be
//! answered, so a scraper that sends a byte now and then delays nobody and is cut off.
//!
//! ```text
//!   GET /metrics (Accept) ─▶ exposition::registry(sources) ─▶ Format::negotiate ─▶ 200, text
//!   anything else         ─▶ 404
//! ```

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::exposition;
use super::format::Format;
use super::{MetricsAddr, Sources};

/// How long one connection may take to send its request head and be answered.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

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
    /// Binds `addr` and starts answering scrapes from `sources`.
    pub(crate) fn start(addr: &MetricsAddr, sources: Arc<Sources>) -> io::Result<Self> {
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
            .spawn(move || runtime.block_on(serve(listener, sources)))?;
        Ok(Self { _thread: thread })
    }
}

/// Accepts connections for ever, each served by a task of its own.
async fn serve(listener: Listener, sources: Arc<Sources>) {
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
        let (sources, open) = (sources.clone(), open.clone());
        tokio::spawn(async move {
            let served = match connection {
                Connection::Tcp(s) => answer(TokioIo::new(s), sources).await,
                Connection::Unix(s) => answer(TokioIo::new(s), sources).await,
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
async fn answer<I>(io: I, sources: Arc<Sources>) -> Result<(), Box<dyn std::error::Error>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(&request, &sources);
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

/// The answer to one request: the exposition for `GET /metrics`, in the format asked for.
fn respond(request: &Request<hyper::body::Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.method() == hyper::Method::GET
        && request.uri().path() == "/metrics"
    {
        let accept = request
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let format = Format::negotiate(accept);
        let body = exposition::registry(sources).and_then(|registry| Ok(format.encode(&registry)?));
        match body {
            Ok(body) => (StatusCode::OK, format.content_type(), body),
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
