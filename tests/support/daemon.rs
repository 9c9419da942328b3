//! A real pagerd process for a test: started on its own state directory, driven through its
//! control socket and `pagerctl`, restarted, upgraded and killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use proto::client::Client;
use proto::control::{
    Call, ControlError, ErrorCode, ForkClose, ForkCreate, ForkGet, ForkList, Request, Response,
    SnapshotDelete, SnapshotGet, SnapshotList, Status,
};
use proto::model::{
    DeleteOutcome, FileUserInfo, ForkInfo, ForkListEntry, ForkState, SnapshotInfo, StatusReport,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    binary, id, line_channel, poll_until, proc_status_kb, refused, wait_until, Vmm, DEADLINE,
};

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

    /// Sends a request and decodes its answer; panics (with the daemon's log) if it
    /// is refused.
    pub fn call<C: Call + std::fmt::Debug + Clone>(&self, call: C) -> C::Answer {
        self.client
            .call(call.clone())
            .unwrap_or_else(|e| panic!("{call:?} failed: {e:?}\n{}", self.log()))
    }

    /// The daemon's refusal of `request` (panics if it succeeds).
    pub fn refusal(&self, request: impl Into<Request>) -> ControlError {
        refused(self.client.call_value(&request.into()))
    }

    /// The error code `request` is refused with (panics if it succeeds).
    pub fn error_code(&self, request: impl Into<Request>) -> ErrorCode {
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

    /// Runs `pagerctl --json ARGS`, which must succeed, and decodes its answer.
    pub fn pagerctl_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run = self.pagerctl(&all);
        assert!(run.success(), "pagerctl {args:?} failed: {run:?}");
        run.json()
    }

    /// Daemon health and counts.
    pub fn status(&self) -> StatusReport {
        self.call(Status {})
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
        self.call(SnapshotDelete {
            snapshot: id(snapshot),
            defer,
            force: false,
        })
    }

    /// One snapshot.
    pub fn snapshot(&self, snapshot: &str) -> SnapshotInfo {
        self.call(SnapshotGet {
            snapshot: id(snapshot),
        })
    }

    /// Every snapshot.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.call(SnapshotList {})
    }

    /// A snapshot's reference count (`None` when the daemon cannot know it).
    pub fn ref_count(&self, snapshot: &str) -> Option<usize> {
        self.snapshot(snapshot).ref_count
    }

    /// Every fork and every process holding a memory file.
    pub fn forks(&self) -> Vec<ForkListEntry> {
        self.call(ForkList {})
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
        let info: ForkInfo = self.call(ForkCreate {
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
        self.call(ForkGet { fork: id(fork) })
    }

    /// Waits (server side) until the fork reaches `state`, and returns its record.
    pub fn wait_fork(&self, fork: &str, state: ForkState) -> ForkInfo {
        self.client
            .wait_fork(fork, state, DEADLINE)
            .unwrap_or_else(|e| panic!("fork {fork} never reached {state}: {e:?}\n{}", self.log()))
    }

    /// Stops serving a fork and forgets it.
    pub fn close_fork(&self, fork: &str) -> ForkInfo {
        self.call(ForkClose { fork: id(fork) })
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
