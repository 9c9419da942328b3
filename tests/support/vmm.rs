//! A test VMM process (`synthetic-vmm`, `hostile-vmm`, `kvm-vmm`) and the JSON events it
//! prints, one per step.

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{binary, line_channel, poll_until, DEADLINE};

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
        let mut command = Command::new(binary(name));
        command.args(args);
        Self::spawn_command(command)
    }

    /// Runs a VMM as `command` says (e.g. as another user, through `setpriv`).
    pub fn spawn_command(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
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

    /// Runs `synthetic-vmm` with `file` (a memory file on pagerd's FUSE mount) mapped
    /// `MAP_PRIVATE` as guest memory, checked against `original`, with these steps.
    pub fn map_file(original: &Path, file: &Path, steps: &[&str]) -> Self {
        let mut args = vec![
            "--snapshot".to_owned(),
            original.display().to_string(),
            "--memory-file".to_owned(),
            file.display().to_string(),
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
