//! The daemon's command line.
//!
//! Snapshots and forks can be given up front (`--snapshot ID=PATH`, `--fork ID=SNAPSHOT`), and
//! forks created later on the control socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::access::Access;
pub use crate::fuse::FuseMode;
use crate::fuse::FuseOptions;
use proto::{ForkId, SnapshotId};

/// pagerd: serves forked microVMs' memory from shared snapshot files over userfaultfd.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// The state directory: snapshots, fork records, handoff sockets and the control socket.
    /// A relative path is made absolute before anything uses it.
    #[arg(long, env = proto::defaults::STATE_DIR_ENV, default_value = proto::defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    /// Control socket path [default: STATE_DIR/control.sock, where `pagerctl` looks too].
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// A group (name or gid) whose members may read guest memory and use the sockets, besides
    /// the daemon's own user and root: the state directory becomes 0750 root:GROUP, copied
    /// memory files and FUSE memory files 0440, the control and handoff sockets 0660. Without
    /// it everything is private to the daemon's user (docs/security.md).
    #[arg(long, visible_alias = "control-group", value_name = "NAME|GID")]
    pub group: Option<String>,
    /// A snapshot to register at start unless it already is, as ID=PATH to its memory file
    /// (copied into the state directory). Repeatable.
    #[arg(long = "snapshot", value_parser = parse_pair::<proto::ids::Snapshot>)]
    pub snapshots: Vec<(SnapshotId, PathBuf)>,
    /// A fork to create at start unless it exists, as ID=SNAPSHOT_ID. Repeatable.
    #[arg(long = "fork", value_parser = parse_fork)]
    pub forks: Vec<(ForkId, SnapshotId)>,
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
    /// The most forks one user other than root and pagerd's own may hold at once; such users
    /// never get the last 16 of `--max-forks` either (kept for root). Beyond it, `unavailable`.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_forks_per_uid: u64,
    /// The largest memory file a snapshot may have, in bytes (suffixes K, M, G, T: 1024-based);
    /// a larger registration is refused with `unavailable`. Bounds what a peer's declared
    /// size can make pagerd do.
    #[arg(long, default_value = "1T", value_parser = parse_size)]
    pub max_snapshot_size: u64,
    /// The most bytes of snapshots (memory files, by size) one user other than root and
    /// pagerd's own may have registered at once (K, M, G, T suffixes); more are refused with
    /// `unavailable`.
    #[arg(long, default_value = "1T", value_parser = parse_size)]
    pub max_snapshot_bytes_per_uid: u64,
    /// What a uffd fork gets installed before its guest asks, unless `fork.create` says:
    /// `working_set` replays the snapshot's recorded working set when its VMM attaches;
    /// `graduate` then fills every other page at low priority and lets the fork go once all
    /// are present (each fork then holds a private copy of all non-zero memory); `off` serves
    /// faults only.
    #[arg(long, default_value = "working_set", value_parser = proto::wire::parse::<proto::prefetch::Prefetch>)]
    pub prefetch: proto::prefetch::Prefetch,
    /// A snapshot without a working set records one from its first this many uffd forks
    /// (pages touched by more than half of them are kept); 0 records only on
    /// `snapshot.record`.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub record_forks: u32,
    /// A recording fork records the pages it touches during its first this many seconds (or
    /// until it ends, if sooner).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub record_secs: u64,
    /// The nice value of a worker thread while it replays working sets (-20 to 19). Replay
    /// pays only if it gets ahead of the forks, which compete with it for the CPU; a worker
    /// serving faults runs at 0, one that only graduates at 19. Needs CAP_SYS_NICE below 0.
    #[arg(long, default_value_t = -19, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub replay_nice: i32,
    /// How long a VMM may take to send its handoff message after connecting, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub handoff_timeout_ms: u64,
    /// How long an idle control connection is kept, in ms.
    #[arg(long, default_value_t = 60_000)]
    pub control_idle_timeout_ms: u64,
    /// The most control connections one uid may hold at once, root and the daemon's own user
    /// excepted (they may use all 256, the last 16 of which are kept for them alone).
    #[arg(long, default_value_t = crate::control::DEFAULT_MAX_CONNECTIONS_PER_UID,
          value_parser = parse_per_uid)]
    pub max_connections_per_uid: usize,
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
    /// Serve Prometheus metrics at this address: HOST:PORT (loopback recommended, e.g.
    /// 127.0.0.1:9464) or unix:/PATH. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<crate::metrics::MetricsAddr>,
    /// The Firecracker binary `vm.start` launches [default: $FIRECRACKER, else `firecracker`
    /// on PATH].
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
    /// The QEMU binary `vm.start` launches for `qemu` bundles [default: $QEMU, else
    /// `qemu-system-x86_64` on PATH].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Run launched Firecracker VMs through this jailer: each chrooted under STATE/jail, as a
    /// uid of its own from --jail-uids and as --group (needed with it).
    #[arg(long, value_name = "PATH", requires = "group")]
    pub jailer: Option<PathBuf>,
    /// The uids jailed VMs run as: FIRST:COUNT.
    #[arg(long, default_value = "900000:1000", value_parser = parse_uid_range)]
    pub jail_uids: (u32, u32),
    /// A launched VM's console log is rotated (copied to console.log.1 and truncated) once it
    /// is larger than this, in KiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub console_log_max_kib: u64,
    /// How long the records of exited and failed VMs are kept (then deleted as by
    /// `vm.delete`, their ids free again): N followed by s, m, h or d; 0 keeps them for ever.
    #[arg(long, default_value = crate::vms::DEFAULT_RETENTION, value_parser = crate::vms::parse_retention)]
    pub vm_retention: Duration,
    /// Log filter (tracing's env-filter syntax, e.g. `info,pagerd=debug`); `RUST_LOG`
    /// overrides it.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Write the manual page and shell completions into this directory, then exit (used by
    /// packaging).
    #[arg(long, hide = true, value_name = "DIR")]
    pub write_docs: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

impl Config {
    /// Makes every path absolute (relative to the current directory), so that no relative path
    /// ever reaches a VMM.
    pub(crate) fn make_paths_absolute(&mut self) -> std::io::Result<()> {
        self.state_dir = std::path::absolute(&self.state_dir)?;
        if let Some(socket) = &mut self.control_socket {
            *socket = std::path::absolute(&*socket)?;
        }
        if let Some(mount) = &mut self.fuse_mount {
            *mount = std::path::absolute(&*mount)?;
        }
        for binary in [&mut self.firecracker, &mut self.qemu]
            .into_iter()
            .flatten()
        {
            *binary = std::path::absolute(&*binary)?;
        }
        Ok(())
    }

    /// The control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| proto::defaults::control_socket(&self.state_dir))
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Where the FUSE view is (or would be) mounted.
    pub(crate) fn fuse_mountpoint(&self) -> PathBuf {
        self.fuse_mount
            .clone()
            .unwrap_or_else(|| self.state_dir.join("fuse"))
    }

    /// How to mount the FUSE view, unless it is off; its modes follow `access`.
    pub(crate) fn fuse_options(&self, access: Access) -> Option<FuseOptions> {
        (self.fuse != FuseMode::Off).then(|| FuseOptions {
            mountpoint: self.fuse_mountpoint(),
            mode: self.fuse,
            threads: self.fuse_threads.unwrap_or_else(|| 2 * self.worker_count()),
            readahead_kib: self.fuse_readahead_kib,
            access,
        })
    }

    /// The handoff timeout.
    pub fn handoff_timeout(&self) -> Duration {
        Duration::from_millis(self.handoff_timeout_ms)
    }
}

fn parse_per_uid(s: &str) -> Result<usize, String> {
    use crate::control::{MAX_CONNECTIONS, RESERVED_CONNECTIONS};
    let most = MAX_CONNECTIONS - RESERVED_CONNECTIONS;
    match s.parse::<usize>() {
        Ok(n) if (1..=most).contains(&n) => Ok(n),
        _ => Err(format!("expected a number from 1 to {most}")),
    }
}

fn parse_pair<K: proto::ids::Kind>(s: &str) -> Result<(proto::Id<K>, PathBuf), String> {
    let (id, rest) = s.split_once('=').ok_or("expected ID=VALUE")?;
    Ok((id.parse().map_err(|e| format!("{e}"))?, PathBuf::from(rest)))
}

fn parse_fork(s: &str) -> Result<(ForkId, SnapshotId), String> {
    let (id, snapshot) = parse_pair(s)?;
    let snapshot = snapshot
        .to_string_lossy()
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok((id, snapshot))
}

/// A uid range `FIRST:COUNT` (none of them root).
fn parse_uid_range(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{text:?} is not FIRST:COUNT (uids, FIRST above 0)");
    let (first, count) = text.split_once(':').ok_or_else(bad)?;
    let first: u32 = first.parse().map_err(|_| bad())?;
    let count: u32 = count.parse().map_err(|_| bad())?;
    if first == 0 || count == 0 || first.checked_add(count).is_none() {
        return Err(bad());
    }
    Ok((first, count))
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (a number, optionally with K, M, G or T)"))?;
    n.checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a size between 1 byte and 16 EiB"))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
