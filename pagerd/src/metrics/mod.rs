//! Prometheus metrics at `--metrics-addr` (`HOST:PORT`, or `unix:PATH`), answered to
//! `GET /metrics` in the text format the scraper asks for: OpenMetrics 1.0.0, or the classic
//! text format 0.0.4 (`format.rs`).
//!
//! ```text
//!   scraper ──GET /metrics──▶ server.rs (hyper, metrics thread)
//!                              └─▶ exposition.rs: a registry built afresh
//!                                   ├─ process.rs: process_* from /proc/self
//!                                   ├─ lifecycle: totals, forks, snapshots, users; vms: VMs
//!                                   └─ stats::DAEMON (by op, code, reason, method),
//!                                      stats::FAULT_LATENCY (log-linear, rebucketed)
//! ```
//!
//! Nothing here is updated on the fault path except the latency histogram (once per batch of
//! events, in `stats`). Counters count since the daemon started, forks closed since included,
//! so they never go down while it runs; every family with labels has its series at zero from
//! the start. Every metric is listed in `docs/operations.md`.

mod exposition;
mod format;
mod process;
mod server;

use std::path::PathBuf;
use std::sync::Arc;

pub(crate) use server::MetricsServer;
pub use server::{MAX_CONNECTIONS, REQUEST_DEADLINE};

use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::stats::{VmStartFailure, DAEMON};
use crate::vms::{VmError, Vms};

/// What a scrape reads.
#[derive(Debug)]
pub(crate) struct Sources {
    /// Snapshots, forks and their counters.
    pub lifecycle: Arc<Lifecycle>,
    /// Launched VMs.
    pub vms: Arc<Vms>,
}

/// Counts a failed `vm.start` by its reason.
pub(crate) fn vm_start_failed(error: &VmError) {
    let reason = match error {
        VmError::Lifecycle(LifecycleError::NotFound { .. }) => VmStartFailure::NoSnapshot,
        VmError::NoVmState(_) => VmStartFailure::NoVmState,
        VmError::Unsupported { .. } => VmStartFailure::Unsupported,
        VmError::NoFuse => VmStartFailure::NoFuse,
        VmError::NoBinary(_) => VmStartFailure::NoBinary,
        VmError::NoJailUid => VmStartFailure::NoJailUid,
        VmError::Exists(_) => VmStartFailure::Exists,
        VmError::StartFailed { .. } | VmError::StartRejected { .. } => VmStartFailure::LaunchFailed,
        VmError::NotFound(_)
        | VmError::WrongState { .. }
        | VmError::Live { .. }
        | VmError::Api { .. }
        | VmError::Qmp { .. }
        | VmError::WaitTimedOut { .. }
        | VmError::Io { .. }
        | VmError::Lifecycle(_)
        | VmError::Store(_) => VmStartFailure::Other,
    };
    DAEMON.vm_start_failed(reason);
}

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
