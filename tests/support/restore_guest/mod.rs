//! A Firecracker VM that keeps touching memory it never touched before: its tiny guest
//! (`guest.c`), built with the system `cc`, and one Firecracker process driven through its API
//! (`vmm_glue::http`), its console read line by line. The restart tests restore it from
//! pagerd and watch it keep running. (The binary comes from [`crate::firecracker::binary`].)
//!
//! ```text
//! Firecracker::spawn(api.sock) ─▶ api("PUT", "/boot-source", …) … ─▶ next_pass(deadline)
//!   stdout = the guest's COM1 lines ("ready", "pass N") and Firecracker's own log lines
//! ```

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// Builds the guest ELF into `dir` with the system C compiler; `Err` says why not.
pub fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    crate::compile_guest(
        dir,
        "guest.c",
        include_str!("guest.c"),
        "guest",
        &[
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
        ],
    )
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
        let answer = vmm_glue::http::request(&self.api, method, path, Some(body), super::DEADLINE)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (answer.status, answer.body)
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
