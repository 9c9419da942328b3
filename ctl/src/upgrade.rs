//! `pagerctl daemon upgrade`: asks the daemon to execute its new program in place, then waits
//! until that program serves and says which version it is.
//!
//! ```text
//! daemon.upgrade ─▶ {pid, binary, old version}
//!   ─▶ status, again and again until the deadline: answered by the same pid with an uptime
//!      shorter than the time since the request (the new program started after it)
//!   ─▶ {pid, binary, previous version, version, took_ms}
//! ```
//!
//! Requests made meanwhile wait in the control socket's backlog and are answered by the new
//! program; a status the old program answers (before it stops accepting) does not count.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::client::{Client, ClientError};
use serde::Serialize;

/// How often the status is asked while waiting.
const POLL: Duration = Duration::from_millis(20);

/// A finished upgrade.
#[derive(Debug, Serialize)]
pub(crate) struct Upgraded {
    /// The daemon's pid, the same before and after.
    pub pid: u32,
    /// The program it executed.
    pub binary: PathBuf,
    /// The version that answered the request.
    pub previous_version: String,
    /// The version serving now.
    pub version: String,
    /// From the request to the first answer of the new program, ms.
    pub took_ms: u64,
}

impl Upgraded {
    /// What people read.
    pub(crate) fn text(&self) -> String {
        format!(
            "pagerd {} (pid {}) is executing {}\npagerd {} serves (pid {}, {} ms)\n",
            self.previous_version,
            self.pid,
            self.binary.display(),
            self.version,
            self.pid,
            self.took_ms
        )
    }
}

/// Upgrades the daemon and waits at most `deadline` for its new program to serve.
pub(crate) fn run(
    client: &Client,
    binary: Option<PathBuf>,
    deadline: Duration,
) -> Result<Upgraded, ClientError> {
    let asked = Instant::now();
    let started = client.upgrade(binary)?;
    loop {
        match client.status() {
            Ok(status)
                if status.pid == started.pid
                    && u128::from(status.uptime_ms) <= asked.elapsed().as_millis() =>
            {
                return Ok(Upgraded {
                    pid: status.pid,
                    binary: started.binary,
                    previous_version: started.version,
                    version: status.version,
                    took_ms: u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            // The old program, before it stopped accepting; or the socket between programs.
            Ok(_) | Err(ClientError::Connect { .. } | ClientError::Io(_)) => {}
            Err(other) => return Err(other),
        }
        if asked.elapsed() >= deadline {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "pid {} did not serve with a new program within {} ms of the upgrade",
                    started.pid,
                    deadline.as_millis()
                ),
            )));
        }
        std::thread::sleep(POLL);
    }
}
