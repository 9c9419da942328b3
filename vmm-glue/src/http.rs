//! A minimal HTTP/1.1 client over a Unix socket, enough for a hypervisor's API (Firecracker):
//! one request per connection, a JSON body sized by `Content-Length`, and the answer read
//! until the server closes or its `Content-Length` is complete.
//!
//! ```text
//! PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n
//! Content-Length: 97\r\nConnection: close\r\n\r\n{…}
//! ◀ HTTP/1.1 204 \r\n…\r\n\r\n
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The largest answer read (Firecracker's are a few hundred bytes).
const MAX_RESPONSE: u64 = 1024 * 1024;

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
/// answer, each step bounded by `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    read_response(&mut stream)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads one response: the head up to the blank line, then `Content-Length` bytes (or until
/// the server closes when it sends none).
fn read_response(stream: &mut impl Read) -> io::Result<Response> {
    let mut stream = stream.take(MAX_RESPONSE);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(invalid("the server closed before a whole response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid("malformed status line"))?;
    let length = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = buf[head_end + 4..].to_vec();
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(invalid("the server closed before the whole body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        // 1xx, 204 and 304 have no body; anything else without a length ends at close.
        None if status == 204 || status == 304 || status < 200 => body.clear(),
        None => {
            stream.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bodies_by_length_and_empty_answers() {
        let mut ok = &b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"fault\":\"x\"}trailing"[..];
        let r = read_response(&mut ok).unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, "{\"fault\":\"x\"}");
        let mut empty = &b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n"[..];
        let r = read_response(&mut empty).unwrap();
        assert!(r.is_success());
        assert!(r.body.is_empty());
        let mut cut = &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..];
        assert!(read_response(&mut cut).is_err());
        let mut junk = &b"garbage\r\n\r\n"[..];
        assert!(read_response(&mut junk).is_err());
    }

    #[test]
    fn talks_to_a_unix_socket_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = vec![0u8; 4096];
            let mut len = 0;
            while find(&got[..len], b"{\"a\":1}").is_none() {
                len += conn.read(&mut got[len..]).unwrap();
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            String::from_utf8_lossy(&got[..len]).into_owned()
        });
        let r = request(
            &path,
            "PUT",
            "/x",
            Some("{\"a\":1}"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let sent = server.join().unwrap();
        assert!(sent.starts_with("PUT /x HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("Content-Length: 7\r\n"), "{sent}");
    }
}
