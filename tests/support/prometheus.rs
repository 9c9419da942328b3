//! A real Prometheus server (Debian's `prometheus` package) scraping one target, and
//! `promtool check metrics`, for tests of what operators will run against pagerd.
//!
//! ```text
//!   Prometheus::start(target) ─▶ TMP/prometheus.yml (scrape TARGET/metrics every 1 s)
//!                             ─▶ prometheus --web.listen-address 127.0.0.1:FREE
//!                                          --storage.tsdb.path TMP/data  (log: TMP/log)
//!                             ─▶ waits for /-/ready
//!   query(promql)             ─▶ GET /api/v1/query: one value per series (NaN as NaN)
//!   drop                      ─▶ SIGKILL, reaped; TMP removed
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::{free_loopback_addr, http_get, on_path, poll_until, DEADLINE};

/// A Prometheus server of the test's own.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`HOST:PORT`, at `/metrics`) every second, and
    /// waits until it is ready; `Err` says why it cannot run here.
    pub fn start(target: &str) -> Result<Self, String> {
        let binary = on_path("prometheus")
            .ok_or("`prometheus` is not installed (apt-get install prometheus)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  \
                 evaluation_interval: 1s\nscrape_configs:\n  - job_name: pagerd\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("log")).map_err(|e| e.to_string())?;
        let addr = free_loopback_addr();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start prometheus: {e}"))?;
        let mut prometheus = Self { child, addr, dir };
        let ready = poll_until(DEADLINE, || {
            prometheus
                .get("/-/ready")
                .is_some_and(|(status, _)| status == 200)
                || prometheus.exited()
        });
        assert!(
            ready && !prometheus.exited(),
            "prometheus did not become ready:\n{}",
            prometheus.log()
        );
        Ok(prometheus)
    }

    /// The value of each series instant query `promql` returns now.
    pub fn query(&self, promql: &str) -> Vec<f64> {
        let path = format!("/api/v1/query?query={}", percent_encoded(promql));
        let (status, body) = self
            .get(&path)
            .unwrap_or_else(|| panic!("prometheus does not answer:\n{}", self.log()));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {status} {body:?}: {e}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: no result vector in {answer}"))
            .iter()
            .map(|series| {
                series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: no value in {series}"))
            })
            .collect()
    }

    /// Polls `promql` until `accept` takes its values, within [`DEADLINE`], and returns
    /// them; panics naming `what` with the last values and Prometheus' log if it never does.
    pub fn wait_for(&self, what: &str, promql: &str, accept: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let mut last = Vec::new();
        let reached = poll_until(DEADLINE, || {
            last = self.query(promql);
            accept(&last)
        });
        assert!(
            reached,
            "timed out waiting for {what}: `{promql}` is {last:?}\n{}",
            self.log()
        );
        last
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let stream = TcpStream::connect(&self.addr).ok()?;
        let answer = http_get(stream, path, &[]).ok()?;
        Some((answer.status, answer.body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool`, if installed.
pub fn promtool() -> Result<PathBuf, String> {
    on_path("promtool")
        .ok_or_else(|| "`promtool` is not installed (apt-get install prometheus)".into())
}

/// What `promtool check metrics` says of `exposition` (fed on its stdin): `Ok` when it finds
/// nothing wrong, else its complaints.
pub fn promtool_check_metrics(promtool: &Path, exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(exposition.as_bytes())
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `text` as a URL query value.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
