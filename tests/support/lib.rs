//! testkit: what the end-to-end tests and benches need to drive a real pagerd.
//!
//! - [`binary`] builds (once per test process) and finds the workspace's binaries, so tests
//!   never run stale ones.
//! - [`write_snapshot`] writes a memory file with a known pattern and zero areas.
//! - [`Daemon`] runs a real `pagerd` process and talks to its control socket through
//!   [`proto::client::Client`]: typed helpers that panic on a refusal ([`Daemon::fork`],
//!   [`Daemon::snapshot`], …), [`Daemon::refusal`] / [`Daemon::error_code`] for requests that
//!   must be refused, and [`Daemon::raw_request`] for hand-made (hostile) lines.
//! - [`Daemon::pagerctl`] runs the CLI against it and returns its exit code and output.
//! - [`Vmm`] runs a `synthetic-vmm` (or `hostile-vmm`, `kvm-vmm`) process and reads the events
//!   it prints.
//! - [`firecracker`]: the Firecracker binary (and its example uffd handler, a benchmark
//!   baseline), a tiny guest and a snapshot of it (the fixture),
//!   console logs, and [`firecracker::VmReaper`] for the VMs pagerd launched; [`qemu`]: the
//!   same for QEMU (a PVH guest and a bundle saved with `x-ignore-shared`).
//! - [`raw_handoff`] sends arbitrary (hostile) handoff messages and reads pagerd's
//!   [`HandoffReply`]; [`HugePages`] reserves and gives back 2 MiB pages.
//! - [`restore_guest`]: a Firecracker guest that keeps touching new memory, for restarts.
//! - [`cached_kib`] (a file's own page cache) and [`SmallTmpfs`] (a disk to fill).
//! - [`tenants`]: real users of the host (a group's members and an outsider), for attacks
//!   run as an unprivileged member.
//! - [`Tmux`]: a command at a real terminal of a given size, its screen read and keys typed.
//! - [`http_get`]: one HTTP GET over any stream; [`prometheus`]: a real Prometheus server
//!   scraping a daemon, and `promtool check metrics`.
//!
//! This file keeps what every part shares (binaries, waiting, snapshots, skips); `daemon.rs`,
//! `vmm.rs`, `handoff.rs` and `host.rs` hold the rest, re-exported here.

mod daemon;
pub mod firecracker;
mod handoff;
mod host;
mod http;
pub mod prometheus;
pub mod qemu;
pub mod restore_guest;
pub mod tenants;
mod tmux;
mod vmm;

pub use daemon::{CtlRun, Daemon, Launch};
pub use handoff::{borrow_all, dev_null, new_uffd, raw_handoff, read_reply};
pub use host::{cached_kib, HugePages, SmallTmpfs};
pub use http::{http_get, HttpAnswer};
pub use tmux::Tmux;
pub use vmm::{proc_status_kb, Vmm};

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proto::client::ClientError;
use proto::control::ControlError;
use proto::Id;

/// How long tests wait for anything before failing.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding the running program's sibling binaries (next to a test's `deps/`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Builds the workspace's binaries once per process, when the program runs under cargo
/// (`cargo test`, `cargo run`), so that tests never run stale ones.
fn build_once(dir: &Path) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "pagerd",
            "-p",
            "pagerd-test-vmms",
            "-p",
            "pagerd-ctl",
            "-p",
            "pagerd-benches",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
}

/// The file `name` in the first directory of `$PATH` that has one.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The path of one of pagerd's binaries (`pagerd`, `pagerctl`, `synthetic-vmm`, `kvm-vmm`,
/// `hostile-vmm`, `naive-handler`).
///
/// Under cargo they are built first (once per process) and taken from the build directory.
/// Installed, with no workspace around, they are looked for in `$PAGERD_BIN_DIR`, beside the
/// running program, then on `PATH`.
pub fn binary(name: &str) -> PathBuf {
    if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
        let dir = bin_dir();
        build_once(&dir);
        let path = dir.join(name);
        assert!(path.exists(), "{} was not built", path.display());
        return path;
    }
    std::env::var_os("PAGERD_BIN_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([bin_dir()])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .or_else(|| on_path(name))
        .unwrap_or_else(|| {
            panic!("`{name}` is not in $PAGERD_BIN_DIR, beside this program, or on PATH")
        })
}

/// Checks `cond` every few milliseconds until it holds (`true`) or `deadline` passes
/// (`false`). For conditions that no event announces, such as a daemon's descriptor count.
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `cond` holds, for at most `deadline`; panics naming `what` if it never does.
pub fn wait_until(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    assert!(poll_until(deadline, cond), "timed out waiting for {what}");
}

/// Writes a memory file of `size` bytes: pseudo-random bytes from `seed`, with every
/// `zero_every`-th 4 KiB page all zeros (0 = none) and the last `zero_tail` bytes zero.
pub fn write_snapshot(
    path: &Path,
    size: u64,
    seed: u64,
    zero_every: u64,
    zero_tail: u64,
) -> PathBuf {
    let mut bytes = vec![0u8; usize::try_from(size).expect("size fits")];
    let mut x = seed | 1;
    for chunk in bytes.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    if zero_every > 0 {
        for page in bytes.chunks_exact_mut(4096).step_by(zero_every as usize) {
            page.fill(0);
        }
    }
    let tail = bytes.len() - usize::try_from(zero_tail).expect("tail fits");
    bytes[tail..].fill(0);
    std::fs::write(path, &bytes).expect("write snapshot");
    path.to_owned()
}

/// How many 4 KiB pages of a file are all zeros.
pub fn zero_pages_in(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read snapshot");
    bytes
        .chunks_exact(4096)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as u64
}

/// Reads lines from a child's stdout on a thread, as a channel.
pub(crate) fn line_channel(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Compiles a freestanding test guest: writes `source` as `dir/name` and links it with the
/// system `cc`, with `flags` before the output, into `dir/elf`; `Err` says why it could not.
pub fn compile_guest(
    dir: &Path,
    name: &str,
    source: &str,
    elf: &str,
    flags: &[&str],
) -> Result<PathBuf, String> {
    let (source_path, elf) = (dir.join(name), dir.join(elf));
    std::fs::write(&source_path, source).map_err(|e| e.to_string())?;
    let out = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&elf)
        .arg(&source_path)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc {flags:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(elf)
}

/// An id of any kind (panics if `text` is not a valid one), for building requests.
pub fn id<K: proto::ids::Kind>(text: &str) -> Id<K> {
    text.parse()
        .unwrap_or_else(|e| panic!("`{text}` is not an id: {e}"))
}

/// The daemon's refusal of a call that was expected to fail (panics if it succeeded or never
/// reached the daemon).
pub fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ControlError {
    match result {
        Ok(answer) => panic!("the request was expected to be refused but answered {answer:?}"),
        Err(ClientError::Refused(e)) => e,
        Err(e) => panic!("the request never got an answer: {e:?}"),
    }
}

/// A free TCP address on loopback (`127.0.0.1:PORT`): bound by the caller, released, then
/// to be given to a daemon.
pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("its address")
        .port();
    format!("127.0.0.1:{port}")
}

/// Reports that a test could not run here, and why: loudly on stderr, and as a line in the
/// file `$PAGERD_TEST_SKIPS` names (the test script counts them in its summary). The caller
/// returns right after.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os("PAGERD_TEST_SKIPS") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}: {why}");
        }
    }
}
