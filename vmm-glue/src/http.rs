//! An HTTP/1.1 client over a Unix socket for a hypervisor's API (Firecracker): hyper's
//! client connection on a single-threaded tokio runtime that lives for the call. One request
//! per connection, a JSON body, and the whole answer read within one deadline.
//!
//! ```text
//! connect(socket) ─▶ http1::handshake ─▶ PUT /snapshot/load {…} ─▶ 204 (or 400 {"fault_message"})
//! └──────────────────────────── all within `timeout` ───────────────────────────┘
//! ```

use std::io;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The largest answer read (Firecracker's are a few hundred bytes).
const MAX_RESPONSE: usize = 1024 * 1024;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Response {
    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends `method path` with an optional JSON `body` to the server on `socket` and reads its
/// answer, the whole exchange bounded by `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .map_err(io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    runtime.block_on(async {
        match tokio::time::timeout(timeout, exchange(socket, request)).await {
            Ok(answer) => answer,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole answer within {timeout:?}"),
            )),
        }
    })
}

/// Connects, sends `request` and reads the answer.
async fn exchange(socket: &Path, request: hyper::Request<Full<Bytes>>) -> io::Result<Response> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    // The connection is driven beside the request; it ends when the answer is read.
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-connection server on a fresh socket: it reads a request until `until` appears,
    /// writes `answer`, and returns what it read.
    fn serve_once(
        answer: &'static [u8],
        until: &'static [u8],
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = vec![0u8; 4096];
            let mut len = 0;
            while !got[..len].windows(until.len()).any(|w| w == until) {
                let n = conn.read(&mut got[len..]).unwrap();
                assert_ne!(n, 0, "the client closed early");
                len += n;
            }
            conn.write_all(answer).unwrap();
            String::from_utf8_lossy(&got[..len]).into_owned()
        });
        (dir, path, server)
    }

    #[test]
    fn sends_a_json_request_and_reads_the_answer_by_length() {
        let (_dir, path, server) = serve_once(
            b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"fault\":\"x\"}",
            b"{\"a\":1}",
        );
        let r = request(
            &path,
            "PUT",
            "/x",
            Some("{\"a\":1}"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (400, "{\"fault\":\"x\"}"));
        assert!(!r.is_success());
        let sent = server.join().unwrap();
        assert!(sent.starts_with("PUT /x HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.to_ascii_lowercase().contains("content-length: 7\r\n"),
            "{sent}"
        );
    }

    #[test]
    fn an_empty_answer_is_a_success_without_body() {
        let (_dir, path, server) = serve_once(
            b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n",
            b"\r\n\r\n{}",
        );
        let r = request(&path, "PATCH", "/vm", Some("{}"), Duration::from_secs(5)).unwrap();
        assert!(r.is_success());
        assert!(r.body.is_empty());
        server.join().unwrap();
    }

    #[test]
    fn a_cut_or_malformed_answer_is_an_error() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..],
            &b"garbage\r\n\r\n"[..],
        ] {
            let answer: &'static [u8] = answer;
            let (_dir, path, server) = serve_once(answer, b"{}");
            let r = request(&path, "PUT", "/x", Some("{}"), Duration::from_secs(5));
            assert!(r.is_err(), "{answer:?} gave {r:?}");
            server.join().unwrap();
        }
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let error = request(&path, "GET", "/", None, Duration::from_millis(200)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = request(
            &dir.path().join("none.sock"),
            "GET",
            "/",
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
    }
}
