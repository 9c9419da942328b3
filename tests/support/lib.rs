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

pub mod firecracker;

pub mod qemu;
pub mod restore_guest;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proto::client::{Client, ClientError};
use proto::control::{ControlError, ErrorCode, Request, Response};
use proto::handoff::HandoffReply;
use proto::model::{
    DeleteOutcome, FileUserInfo, ForkInfo, ForkListEntry, ForkState, SnapshotInfo, StatusReport,
};
use proto::Id;
use serde::de::DeserializeOwned;
use serde_json::Value;

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
fn line_channel(out: impl Read + Send + 'static) -> Receiver<String> {
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

/// A snapshot or fork id (panics if `text` is not a valid one), for building [`Request`]s.
pub fn id(text: &str) -> Id {
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

/// What a `pagerctl` run did.
#[derive(Debug, Clone)]
pub struct CtlRun {
    /// Its exit status code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl CtlRun {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Its stdout (with `--json`) decoded as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("pagerctl printed no JSON ({e}): {self:?}"))
    }
}

/// A pagerd started with a command line and environment of a test's choosing
/// ([`Daemon::launch`]).
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The whole command line.
    pub args: &'a [&'a str],
    /// The working directory (the test's own when `None`).
    pub cwd: Option<&'a Path>,
    /// Environment variables to set.
    pub env: &'a [(&'a str, &'a str)],
    /// Where the state directory will be.
    pub state: PathBuf,
    /// Where the control socket will be.
    pub control: PathBuf,
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

/// A running pagerd process with its own state directory.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    state: PathBuf,
    control: PathBuf,
    client: Client,
    args: Vec<String>,
}

impl Daemon {
    /// Starts pagerd with `snapshots` (id, memory file) registered and extra command-line
    /// `args`, and waits until it says it is ready.
    pub fn start(snapshots: &[(&str, &Path)], args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pagerd-test")
            .tempdir()
            .expect("tempdir");
        let control = dir.path().join("control.sock");
        let mut all: Vec<String> = vec![
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
            "--control-socket".into(),
            control.display().to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        for (id, path) in snapshots {
            all.push("--snapshot".into());
            all.push(format!("{id}={}", path.display()));
        }
        let child = Self::spawn_ready(&dir, &all);
        Self {
            child,
            state: dir.path().join("state"),
            dir,
            client: Client::new(&control),
            control,
            args: all,
        }
    }

    /// Starts pagerd on a given state directory and control socket (the log and scratch space
    /// stay in a temp directory of their own).
    pub fn start_with_state(state: &Path, control: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pagerd-test")
            .tempdir()
            .expect("tempdir");
        let args: Vec<String> = vec![
            "--state-dir".into(),
            state.display().to_string(),
            "--control-socket".into(),
            control.display().to_string(),
        ];
        let child = Self::spawn_ready(&dir, &args);
        Self {
            child,
            dir,
            state: state.to_owned(),
            control: control.to_owned(),
            client: Client::new(control),
            args,
        }
    }

    /// Starts pagerd with exactly the command line, working directory and environment a test
    /// chooses (no `--state-dir` or `--control-socket` is added; `PAGERD_*` variables are not
    /// inherited), and waits until it says it is ready.
    pub fn launch(launch: Launch<'_>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pagerd-test")
            .tempdir()
            .expect("tempdir");
        let args: Vec<String> = launch.args.iter().map(|a| (*a).to_owned()).collect();
        let mut command = Command::new(binary("pagerd"));
        command
            .env_remove(proto::defaults::STATE_DIR_ENV)
            .env_remove(proto::defaults::SOCKET_ENV)
            .env("RUST_LOG", "info")
            .envs(launch.env.iter().copied());
        if let Some(cwd) = launch.cwd {
            command.current_dir(cwd);
        }
        let child = Self::spawn_command_ready(&dir, command.args(&args));
        Self {
            child,
            dir,
            client: Client::new(&launch.control),
            state: launch.state,
            control: launch.control,
            args,
        }
    }

    fn spawn_ready(dir: &tempfile::TempDir, args: &[String]) -> Child {
        Self::spawn_command_ready(
            dir,
            Command::new(binary("pagerd"))
                .args(args)
                .env("RUST_LOG", "info"),
        )
    }

    fn spawn_command_ready(dir: &tempfile::TempDir, command: &mut Command) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("pagerd.log"))
            .expect("log file");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn pagerd");
        let lines = line_channel(child.stdout.take().expect("stdout"));
        match lines.recv_timeout(DEADLINE) {
            Ok(line) if line.starts_with("pagerd ready") => child,
            other => {
                let status = child.try_wait();
                let log =
                    std::fs::read_to_string(dir.path().join("pagerd.log")).unwrap_or_default();
                panic!("pagerd did not start ({other:?}, {status:?}):\n{log}");
            }
        }
    }

    /// SIGKILLs the daemon and reaps it (its state directory stays).
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the daemon again on the same state directory, with the same arguments.
    pub fn respawn(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
        self.child = Self::spawn_ready(&self.dir, &self.args);
    }

    /// Asks the daemon to upgrade itself in place (`daemon.upgrade`, to `binary` or its own
    /// program) and waits until the new program answers; returns how long control requests
    /// went unanswered.
    pub fn upgrade(&self, binary: Option<&Path>) -> Duration {
        let asked = Instant::now();
        let started = self
            .client
            .upgrade(binary.map(Path::to_owned))
            .unwrap_or_else(|e| panic!("daemon.upgrade refused: {e:?}\n{}", self.log()));
        assert_eq!(started.pid, self.pid(), "the daemon keeps its pid");
        // The new program is the one whose uptime began after the request.
        wait_until("the upgraded daemon to answer", DEADLINE, || {
            self.client.status().is_ok_and(|s| {
                u128::from(s.uptime_ms) <= asked.elapsed().as_millis() && s.pid == self.pid()
            })
        });
        asked.elapsed()
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    /// Where the daemon mounts its FUSE view of memory files (the default).
    pub fn fuse_mount(&self) -> PathBuf {
        self.state.join("fuse")
    }

    /// A snapshot's memory file on the FUSE mount.
    pub fn fuse_file(&self, snapshot: &str) -> PathBuf {
        self.fuse_mount()
            .join("snapshots")
            .join(snapshot)
            .join("memory")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pagerd.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as the daemon.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// The control socket.
    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The typed client of this daemon's control socket.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends one request line as given (malformed or hostile on purpose) and returns the
    /// response line as JSON.
    pub fn raw_request(&self, line: &str) -> Value {
        let mut stream = UnixStream::connect(&self.control).expect("connect control socket");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        writeln!(stream, "{line}").expect("send request");
        let mut reader = BufReader::new(&stream);
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("read response");
        // Hang up and wait for the daemon to close its end too, so its descriptor count
        // no longer includes this connection when the caller looks.
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("read to end");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad response {reply:?}: {e}"))
    }

    /// [`raw_request`](Self::raw_request), its answer decoded as a response envelope.
    pub fn raw_response(&self, line: &str) -> Response {
        let reply = self.raw_request(line);
        serde_json::from_value(reply.clone())
            .unwrap_or_else(|e| panic!("not a response envelope ({e}): {reply}"))
    }

    /// Sends a request and decodes its result as `T`; panics (with the daemon's log) if it
    /// is refused.
    pub fn call<T: DeserializeOwned>(&self, request: &Request) -> T {
        self.client
            .call(request)
            .unwrap_or_else(|e| panic!("{request:?} failed: {e:?}\n{}", self.log()))
    }

    /// The daemon's refusal of `request` (panics if it succeeds).
    pub fn refusal(&self, request: &Request) -> ControlError {
        refused(self.client.call_value(request))
    }

    /// The error code `request` is refused with (panics if it succeeds).
    pub fn error_code(&self, request: &Request) -> ErrorCode {
        self.refusal(request).code
    }

    /// Runs `pagerctl` against this daemon.
    pub fn pagerctl(&self, args: &[&str]) -> CtlRun {
        let out = Command::new(binary("pagerctl"))
            .args(args)
            .env(proto::defaults::SOCKET_ENV, &self.control)
            .env_remove(proto::defaults::STATE_DIR_ENV)
            .output()
            .expect("run pagerctl");
        CtlRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Daemon health and counts.
    pub fn status(&self) -> StatusReport {
        self.call(&Request::Status {})
    }

    /// Registers a memory file as snapshot `snapshot` (a copy), passing it as a descriptor
    /// as `pagerctl` does.
    pub fn register_snapshot(&self, snapshot: &str, path: &Path) -> SnapshotInfo {
        self.client
            .register_snapshot(snapshot, path, false)
            .unwrap_or_else(|e| panic!("register {snapshot}: {e:?}\n{}", self.log()))
    }

    /// Deletes snapshot `snapshot` (when its last reference ends, with `defer`).
    pub fn delete_snapshot(&self, snapshot: &str, defer: bool) -> DeleteOutcome {
        self.call(&Request::SnapshotDelete {
            snapshot: id(snapshot),
            defer,
            force: false,
        })
    }

    /// One snapshot.
    pub fn snapshot(&self, snapshot: &str) -> SnapshotInfo {
        self.call(&Request::SnapshotGet {
            snapshot: id(snapshot),
        })
    }

    /// Every snapshot.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.call(&Request::SnapshotList {})
    }

    /// A snapshot's reference count (`None` when the daemon cannot know it).
    pub fn ref_count(&self, snapshot: &str) -> Option<usize> {
        self.snapshot(snapshot).ref_count
    }

    /// Every fork and every process holding a memory file.
    pub fn forks(&self) -> Vec<ForkListEntry> {
        self.call(&Request::ForkList {})
    }

    /// The processes holding memory files on the FUSE mount, from `fork.list`.
    pub fn file_users(&self) -> Vec<FileUserInfo> {
        self.forks()
            .into_iter()
            .filter_map(|entry| match entry {
                ForkListEntry::File(user) => Some(user),
                ForkListEntry::Uffd(_) => None,
            })
            .collect()
    }

    /// Creates fork `fork` of `snapshot` (the daemon's default prefetch) and returns its
    /// handoff socket.
    pub fn create_fork(&self, snapshot: &str, fork: &str) -> PathBuf {
        self.create_fork_with(snapshot, fork, None)
    }

    /// Creates fork `fork` of `snapshot` with `prefetch` and returns its handoff socket.
    pub fn create_fork_with(
        &self,
        snapshot: &str,
        fork: &str,
        prefetch: Option<proto::prefetch::Prefetch>,
    ) -> PathBuf {
        let info: ForkInfo = self.call(&Request::ForkCreate {
            snapshot: id(snapshot),
            fork: Some(id(fork)),
            prefetch,
        });
        assert_eq!(info.state, ForkState::Waiting, "{info:?}");
        assert_eq!(info.id.as_str(), fork, "{info:?}");
        info.handoff_socket
    }

    /// Creates fork `fork` of `snapshot` and attaches a VMM that reads all of `mem` and then
    /// holds its memory until told to finish; returns once the fork is served.
    pub fn attach_holding_vmm(&self, snapshot: &str, fork: &str, mem: &Path) -> Vmm {
        let socket = self.create_fork(snapshot, fork);
        let mut vmm = Vmm::attach(mem, &socket, &["verify", "hold"]);
        vmm.expect("verified");
        vmm.expect("holding");
        assert_eq!(
            self.wait_fork(fork, ForkState::Serving).state,
            ForkState::Serving
        );
        self.wait_for_recorded_vmm(fork);
        vmm
    }

    /// Waits until the lifecycle thread has written the VMM's identity into fork `fork`'s
    /// record (it does so off the serving path, just after the fork starts serving), so that
    /// a restart from here on knows the fork's VMM.
    pub fn wait_for_recorded_vmm(&self, fork: &str) {
        let path = self.state.join("forks").join(format!("{fork}.json"));
        wait_until(
            &format!("fork {fork}'s record to name its VMM"),
            DEADLINE,
            || {
                std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|r| r["vmm"].is_object())
            },
        );
    }

    /// Creates forks `vm0`… of `base` and on each a synthetic VMM that reads every page of
    /// `mem` once, in its own random order, `pace_us` apart, checking every byte (the restart
    /// tests and benchmark); returns once every VMM is up.
    pub fn paced_readers(&self, count: usize, mem: &Path, pace_us: u64) -> Vec<Vmm> {
        (0..count)
            .map(|i| {
                let socket = self.create_fork("base", &format!("vm{i}"));
                let (seed, pace) = ((i + 1).to_string(), pace_us.to_string());
                let mut vmm = Vmm::attach(
                    mem,
                    &socket,
                    &[
                        "--order",
                        "random",
                        "--seed",
                        &seed,
                        "--pace-us",
                        &pace,
                        "verify",
                    ],
                );
                vmm.expect("ready");
                vmm
            })
            .collect()
    }

    /// A fork's record.
    pub fn fork(&self, fork: &str) -> ForkInfo {
        self.call(&Request::ForkGet { fork: id(fork) })
    }

    /// Waits (server side) until the fork reaches `state`, and returns its record.
    pub fn wait_fork(&self, fork: &str, state: ForkState) -> ForkInfo {
        self.client
            .wait_fork(fork, state, DEADLINE)
            .unwrap_or_else(|e| panic!("fork {fork} never reached {state}: {e:?}\n{}", self.log()))
    }

    /// Stops serving a fork and forgets it.
    pub fn close_fork(&self, fork: &str) -> ForkInfo {
        self.call(&Request::ForkClose { fork: id(fork) })
    }

    /// Control connections the daemon has accepted and not yet closed (the client hangs up
    /// after each answer; the daemon closes its end a moment later).
    pub fn control_connections(&self) -> usize {
        let table = std::fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
        let path = self.control.to_string_lossy();
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // Num RefCount Protocol Flags Type St Inode Path; the listener has
                // __SO_ACCEPTCON (0x10000) in its flags.
                fields.len() == 8 && fields[7] == path && fields[3] != "00010000"
            })
            .count()
    }
    /// Open descriptors of the daemon process, counted once it has closed every control
    /// connection (so that the answer to a request just made is not counted).
    pub fn fd_count(&self) -> usize {
        wait_until(
            "the daemon to close its control connections",
            DEADLINE,
            || self.control_connections() == 0,
        );
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("daemon fd dir")
            .count()
    }

    /// Waits until the daemon has exactly `expected` descriptors open, or panics listing them.
    pub fn wait_for_fd_count(&self, expected: usize, before: &str) {
        let reached = poll_until(DEADLINE, || self.fd_count() == expected);
        assert!(
            reached,
            "the daemon holds {} descriptors, expected {expected}.\nbefore:\n{before}\nnow:\n{}",
            self.fd_count(),
            self.fd_listing()
        );
    }

    /// The daemon's open descriptors and what they point to, for failure messages.
    pub fn fd_listing(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) {
            for entry in dir.flatten() {
                let target = std::fs::read_link(entry.path()).unwrap_or_default();
                out.push_str(&format!(
                    "{} -> {}\n",
                    entry.file_name().to_string_lossy(),
                    target.display()
                ));
            }
        }
        out
    }

    /// A `/proc/<pid>/status` field of the daemon in kB (e.g. `VmRSS`).
    pub fn status_kb(&self, field: &str) -> u64 {
        proc_status_kb(self.pid(), field)
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    /// Stops the daemon with SIGTERM and returns its exit status, or `None` if it has not
    /// exited within `deadline` (it is then SIGKILLed).
    pub fn stop_within(mut self, deadline: Duration) -> Option<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let mut status = None;
        poll_until(deadline, || {
            status = self.child.try_wait().expect("wait pagerd");
            status.is_some()
        });
        if status.is_none() {
            self.sigkill();
        }
        status
    }

    fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait pagerd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- pagerd descriptors ----\n{}", self.fd_listing());
        }
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
        // A daemon killed last leaves its FUSE mount behind (a restart would replace it).
        let _ = nix::mount::umount2(&self.fuse_mount(), nix::mount::MntFlags::MNT_DETACH);
        if std::thread::panicking() {
            eprintln!("---- pagerd log ----\n{}", self.log());
        }
    }
}

/// A `/proc/<pid>/status` field in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A running synthetic VMM.
pub struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every event printed so far.
    pub events: Vec<Value>,
}

impl Vmm {
    /// Runs `synthetic-vmm` with these arguments.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::spawn_binary("synthetic-vmm", args)
    }

    /// Runs another VMM binary of the workspace (e.g. `kvm-vmm`) that prints one JSON event
    /// per line.
    pub fn spawn_binary<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Self {
        let mut child = Command::new(binary(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let lines = line_channel(child.stdout.take().expect("stdout"));
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            events: Vec::new(),
        }
    }

    /// Runs `synthetic-vmm` on memory file `mem`, handing off to `socket`, with these steps
    /// (and options).
    pub fn attach(mem: &Path, socket: &Path, steps: &[&str]) -> Self {
        let mut args = vec![
            "--snapshot".to_owned(),
            mem.display().to_string(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ];
        args.extend(steps.iter().map(|s| (*s).to_owned()));
        Self::spawn(&args)
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next event named `name` (failing on an `error` event or exit).
    pub fn expect(&mut self, name: &str) -> Value {
        self.expect_within(name, DEADLINE)
    }

    /// [`expect`](Self::expect) with a deadline of its own.
    pub fn expect_within(&mut self, name: &str, deadline: Duration) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no `{name}` event in time; saw {:?}", self.events)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "VMM exited ({status:?}) before `{name}`; saw {:?}",
                        self.events
                    )
                }
            };
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"));
            self.events.push(event.clone());
            if event["event"] == name {
                return event;
            }
            assert_ne!(event["event"], "error", "VMM failed: {event}");
        }
    }

    /// Lets a `wait` step continue.
    pub fn resume(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin).expect("write to VMM");
        stdin.flush().expect("flush");
    }

    /// Closes stdin (ends a `hold` step) without waiting for the VMM.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Closes stdin (ends a `hold` step) and waits for the VMM to exit successfully.
    pub fn finish(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        while let Ok(line) = self.lines.recv_timeout(DEADLINE) {
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"));
            self.events.push(event);
        }
        let status = self.child.wait().expect("wait VMM");
        assert!(
            status.success(),
            "VMM failed ({status}); events {:?}",
            self.events
        );
        std::mem::take(&mut self.events)
    }

    /// Waits (at most [`DEADLINE`]) for the VMM to exit on its own, whatever its status, and
    /// returns the status and every event it printed. Leaves stdin open: a VMM that exits only
    /// when its `hold` step ends must be told with [`close_stdin`](Self::close_stdin) first.
    pub fn wait_exit(mut self) -> (ExitStatus, Vec<Value>) {
        let mut status = None;
        let exited = poll_until(DEADLINE, || {
            status = self.child.try_wait().expect("wait VMM");
            status.is_some()
        });
        assert!(exited, "the VMM did not exit; events {:?}", self.events);
        // Its stdout closed with it: this ends once the last line is read.
        while let Ok(line) = self.lines.recv_timeout(DEADLINE) {
            if let Ok(event) = serde_json::from_str(&line) {
                self.events.push(event);
            }
        }
        let status = status.expect("exited");
        (status, std::mem::take(&mut self.events))
    }

    /// SIGKILLs the VMM and reaps it.
    pub fn kill(mut self) {
        self.child.kill().expect("kill VMM");
        self.child.wait().expect("reap VMM");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh userfaultfd (nothing registered), to attach to hand-made handoffs.
pub fn new_uffd() -> OwnedFd {
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .expect("create uffd");
    // `Uffd::into_raw_fd` (0.9) still closes the fd on drop, so take a duplicate instead.
    uffd.as_fd().try_clone_to_owned().expect("dup uffd")
}

/// Connects to a handoff socket, sends `bytes` with `fds`, and returns pagerd's reply
/// (`None` if it closed the connection without one).
pub fn raw_handoff(socket: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Option<HandoffReply> {
    let stream = UnixStream::connect(socket).expect("connect handoff socket");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    // pagerd may close the connection before reading everything (too-large messages).
    let _ = proto::fdpass::send_with_fds(&stream, bytes, fds);
    read_reply(&stream)
}

/// Reads pagerd's one reply line from a handoff connection (`None` if it closed the
/// connection without one).
pub fn read_reply(stream: &UnixStream) -> Option<HandoffReply> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}")))
        }
    }
}

/// An open file to pass as an extra or wrong descriptor.
pub fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("open /dev/null")
        .into()
}

/// Borrows a list of owned fds.
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

/// 2 MiB hugetlbfs pages reserved through `/proc/sys/vm/nr_hugepages`, given back on drop.
pub struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_nr_hugepages() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("nr_hugepages is a number")
}

impl HugePages {
    /// Adds `count` pages to the pool; panics if the kernel could not reserve them all.
    pub fn reserve(count: u64) -> Self {
        let before = read_nr_hugepages();
        std::fs::write(NR_HUGEPAGES, (before + count).to_string()).expect("write nr_hugepages");
        let now = read_nr_hugepages();
        let guard = Self { before };
        assert!(
            now >= before + count,
            "only {now} hugepages could be reserved (wanted {})",
            before + count
        );
        guard
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// The KiB of `path`'s own page cache, from `cachestat(2)`: the pages cached for that file
/// and no other (a FUSE memory file served by passthrough has none of its own: its pages are
/// the backing file's).
pub fn cached_kib(path: &Path) -> u64 {
    /// `struct cachestat_range`.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat`.
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// `cachestat`'s number in the generic syscall table, which x86-64 shares.
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).unwrap();
    // The whole file (a length of 0 runs to its end).
    let range = Range { off: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of the kernel's layout,
    // on a descriptor this function owns.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat({}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
    stat.nr_cache * page / 1024
}

/// A tmpfs mounted for one test, unmounted on drop.
pub struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on a new temp directory.
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self(dir)
    }
}

impl SmallTmpfs {
    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}
