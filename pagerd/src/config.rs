//! The daemon's command line.
//!
//! Snapshots and forks can be given up front (`--snapshot ID=PATH`, `--fork ID=SNAPSHOT`), and
//! forks created later on the control socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::fuse::{FuseMode, FuseOptions};
use crate::ids::Id;

/// pagerd: serves forked microVMs' memory from shared snapshot files over userfaultfd.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// The state directory: snapshots, fork records, handoff sockets and the control socket.
    #[arg(long, default_value = "/var/lib/pagerd")]
    pub state_dir: PathBuf,
    /// Control socket path [default: STATE_DIR/control.sock].
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// A group (name or gid) whose members may also use the control socket, besides the
    /// daemon's own user and root.
    #[arg(long)]
    pub control_group: Option<String>,
    /// A snapshot to register at start unless it already is, as ID=PATH to its memory file.
    /// Repeatable.
    #[arg(long = "snapshot", value_parser = parse_pair)]
    pub snapshots: Vec<(Id, PathBuf)>,
    /// A fork to create at start unless it exists, as ID=SNAPSHOT_ID. Repeatable.
    #[arg(long = "fork", value_parser = parse_fork)]
    pub forks: Vec<(Id, Id)>,
    /// Worker threads serving faults [default: the number of cores].
    #[arg(long)]
    pub workers: Option<usize>,
    /// The most pages one fault may fill. A fault that continues the previous one's run
    /// doubles the run (1, 2, 4, … up to this); any other fault fills its own page only, so
    /// scattered readers get only what they touch. Runs of zero pages always reach the next
    /// 2 MiB boundary. 1 disables readahead.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub fault_around: u64,
    /// After serving a fault, a worker keeps polling without sleeping for this many µs, since
    /// the next fault of the same VMM usually follows at once. 0 always sleeps.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub spin_us: u64,
    /// The most forks the daemon keeps at once, in any state (an ended fork counts until it is
    /// closed); `fork.create` beyond it is refused with `unavailable`.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_forks: u64,
    /// How long a VMM may take to send its handoff message after connecting, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_timeout_ms: u64,
    /// How long an idle control connection is kept, in ms.
    #[arg(long, default_value_t = 60_000)]
    pub control_idle_timeout_ms: u64,
    /// The FUSE view of memory files for VMMs that can only map a file: `auto` offers
    /// passthrough where the kernel has it, else `cached`; `off` mounts nothing.
    #[arg(long, value_enum, default_value = "auto")]
    pub fuse: FuseMode,
    /// Where to mount the FUSE view [default: STATE_DIR/fuse].
    #[arg(long)]
    pub fuse_mount: Option<PathBuf>,
    /// Threads answering FUSE requests [default: twice the number of cores].
    #[arg(long)]
    pub fuse_threads: Option<usize>,
    /// Readahead of the FUSE mount in KiB (how much one cached-path page fault reads at once).
    /// 0 keeps the kernel's default.
    #[arg(long, default_value_t = 1024)]
    pub fuse_readahead_kib: u32,
    /// Log filter (tracing's env-filter syntax), also read from PAGERD_LOG.
    #[arg(long, default_value = "info")]
    pub log: String,
}

impl Config {
    /// The control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("control.sock"))
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// How to mount the FUSE view, unless it is off.
    pub fn fuse_options(&self) -> Option<FuseOptions> {
        (self.fuse != FuseMode::Off).then(|| FuseOptions {
            mountpoint: self
                .fuse_mount
                .clone()
                .unwrap_or_else(|| self.state_dir.join("fuse")),
            mode: self.fuse,
            threads: self.fuse_threads.unwrap_or_else(|| 2 * self.worker_count()),
            readahead_kib: self.fuse_readahead_kib,
        })
    }

    /// The handoff timeout.
    pub fn handoff_timeout(&self) -> Duration {
        Duration::from_millis(self.handoff_timeout_ms)
    }
}

fn parse_pair(s: &str) -> Result<(Id, PathBuf), String> {
    let (id, rest) = s.split_once('=').ok_or("expected ID=VALUE")?;
    Ok((id.parse().map_err(|e| format!("{e}"))?, PathBuf::from(rest)))
}

fn parse_fork(s: &str) -> Result<(Id, Id), String> {
    let (id, snapshot) = parse_pair(s)?;
    let snapshot = snapshot
        .to_string_lossy()
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok((id, snapshot))
}
