//! Firecracker, for tests against the real VMM: finding its binary, building the tiny guest
//! (`guest.c`), and driving its API over its Unix socket with plain HTTP/1.1.
//!
//! ```text
//! Firecracker::spawn(api.sock) ─▶ api("PUT", "/boot-source", …) … ─▶ next_pass(deadline)
//!   stdout = the guest's COM1 lines ("ready", "pass N") and Firecracker's own log lines
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The Firecracker binary: `$FIRECRACKER`, then `firecracker` on `PATH`, then the copy vendored
/// beside the repository (`shared/vendor/firecracker/`).
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FIRECRACKER") {
        return Some(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&paths)
            .map(|dir| dir.join("firecracker"))
            .find(|p| p.is_file())
        {
            return Some(found);
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        manifest.join("../../shared/vendor/firecracker/firecracker"),
        manifest.join("../shared/vendor/firecracker/firecracker"),
        PathBuf::from("/work/shared/vendor/firecracker/firecracker"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Builds the guest ELF into `dir` with the system C compiler; `Err` says why not.
pub fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    let source = dir.join("guest.c");
    std::fs::write(&source, include_str!("guest.c")).map_err(|e| e.to_string())?;
    let elf = dir.join("guest");
    let output = Command::new("cc")
        .args([
            "-O1",
            "-DDELAY=20000",
            "-ffreestanding",
            "-mgeneral-regs-only",
            "-fno-pic",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-fno-stack-protector",
            "-Wl,-Ttext=0x200000",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&elf)
        .arg(&source)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(elf)
}

/// A running Firecracker process.
pub struct Firecracker {
    child: Child,
    api: PathBuf,
    lines: Receiver<String>,
    /// Every line of its stdout read so far.
    pub seen: Vec<String>,
}

impl Firecracker {
    /// Starts `binary` with its API on `api` and waits for the socket.
    pub fn spawn(binary: &Path, api: &Path) -> Self {
        let mut child = Command::new(binary)
            .arg("--api-sock")
            .arg(api)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn firecracker");
        let lines = super::line_channel(child.stdout.take().expect("stdout"));
        super::wait_until("Firecracker's API socket", super::DEADLINE, || {
            UnixStream::connect(api).is_ok()
        });
        Self {
            child,
            api: api.to_owned(),
            lines,
            seen: Vec::new(),
        }
    }

    /// One API request (`body` is JSON); returns the HTTP status and the response body.
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.api).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(super::DEADLINE))
            .expect("timeout");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write the request");
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).expect("header");
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// [`api`](Self::api), which must succeed (2xx).
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (status, answer) = self.api(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path} {body}: {status} {answer}"
        );
    }

    /// Waits for a stdout line for which `want` holds; `None` if the deadline passes first.
    pub fn line_within(
        &mut self,
        deadline: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if want(&line) {
                return Some(line);
            }
        }
    }

    /// The next "pass N" line of the guest within `deadline`: `Some((N, ok))`.
    pub fn next_pass(&mut self, deadline: Duration) -> Option<(u64, bool)> {
        let line = self.line_within(deadline, |l| l.starts_with("pass "))?;
        let ok = !line.contains("BAD");
        let n = line.rsplit(' ').next()?.trim().parse().ok()?;
        Some((n, ok))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
