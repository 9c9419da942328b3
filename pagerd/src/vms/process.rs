//! Hypervisor processes: started in a session of their own (so they outlive a pagerd restart
//! and no terminal signal reaches them), followed by pidfd, stopped by signal. A process not
//! yet known to run its guest is held by [`HalfStarted`], which kills it if the start fails.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use crate::store::VmmIdentity;

/// A started hypervisor: its pidfd, identity and, when pagerd started it, the child handle
/// that collects its exit status.
#[derive(Debug)]
pub(crate) struct Process {
    /// The pidfd.
    pub pidfd: OwnedFd,
    /// pid + start time.
    pub identity: VmmIdentity,
    /// Present when this daemon is the parent.
    pub child: Option<Child>,
}

impl Process {
    /// Kills it (SIGKILL through the pidfd), waits up to `timeout` for it to be gone, and
    /// collects its exit status when this daemon is its parent.
    pub(crate) fn kill(mut self, timeout: Duration) {
        let _ = signal(&self.pidfd, Signal::KILL);
        wait_exit(&self.pidfd, Some(timeout));
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
        }
    }
}

/// A hypervisor spawned for a VM that is not running yet: dropped before [`Self::running`],
/// it is killed, so no step of a failed start leaves it behind.
#[derive(Debug)]
pub(crate) struct HalfStarted {
    process: Option<Process>,
    kill_timeout: Duration,
}

impl HalfStarted {
    /// Holds `process`; a kill waits up to `kill_timeout` for it to be gone.
    pub(crate) fn new(process: Process, kill_timeout: Duration) -> Self {
        Self {
            process: Some(process),
            kill_timeout,
        }
    }

    /// The process held.
    pub(crate) fn process(&self) -> &Process {
        self.process
            .as_ref()
            .expect("a HalfStarted holds its process until running or dropped")
    }

    /// Waits up to `grace` for the process to end by itself (a hypervisor whose start failed
    /// often exits, saying why); if it did, collects and returns its exit status.
    pub(crate) fn ended(&mut self, grace: Duration) -> Option<ExitStatus> {
        let process = self.process.as_mut()?;
        if !wait_exit(&process.pidfd, Some(grace)) {
            return None;
        }
        process.child.as_mut()?.wait().ok()
    }

    /// The start succeeded: the process is the caller's to follow.
    pub(crate) fn running(mut self) -> Process {
        self.process
            .take()
            .expect("a HalfStarted holds its process until running or dropped")
    }
}

impl Drop for HalfStarted {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill(self.kill_timeout);
        }
    }
}

/// Starts `command` in a new session with stdin from `/dev/null` and stdout and stderr into
/// `console` (a file opened for appending).
pub(crate) fn spawn(mut command: Command, console: &File) -> io::Result<Process> {
    command
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console.try_clone()?);
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2)
    // and sigprocmask(2) (through pthread_sigmask), which are async-signal-safe, allocate
    // nothing and touch no lock of the parent.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            // The daemon blocks SIGTERM and SIGINT in every thread (it waits for them with
            // sigwait); a blocked mask survives exec, and the hypervisor must see them.
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(io::Error::from)?;
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    let opened = Pid::from_raw(pid)
        .ok_or_else(|| io::Error::other("pid 0"))
        .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(io::Error::from));
    let identity = VmmIdentity::of(pid);
    match (opened, identity) {
        (Ok(pidfd), Some(identity)) => Ok(Process {
            pidfd,
            identity,
            child: Some(child),
        }),
        (opened, _) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(opened
                .err()
                .unwrap_or_else(|| io::Error::other("the process vanished at once")))
        }
    }
}

/// Takes up a hypervisor a previous daemon started: a pidfd of `identity`'s pid, if that very
/// process (same start time) still lives.
pub(crate) fn adopt(identity: VmmIdentity) -> Option<Process> {
    let pid = Pid::from_raw(identity.pid)?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).ok()?;
    // Checked after opening the pidfd: if it is still the same process now, the pidfd is its.
    identity.is_alive().then_some(Process {
        pidfd,
        identity,
        child: None,
    })
}

/// Waits until the process behind `pidfd` exits, or `timeout` passes (`None`: forever).
/// Returns whether it exited.
pub(crate) fn wait_exit(pidfd: &OwnedFd, timeout: Option<Duration>) -> bool {
    let timeout =
        timeout.map(|t| nix::poll::PollTimeout::try_from(t).unwrap_or(nix::poll::PollTimeout::MAX));
    loop {
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, timeout.unwrap_or(nix::poll::PollTimeout::NONE)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Sends `signal` through the pidfd (never to a recycled pid).
pub(crate) fn signal(pidfd: &OwnedFd, signal: Signal) -> io::Result<()> {
    pidfd_send_signal(pidfd, signal).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_has_its_own_session_and_is_followed_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let console = File::options()
            .create(true)
            .append(true)
            .open(dir.path().join("c"))
            .unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi; exec sleep 30"]);
        let mut p = spawn(cmd, &console).unwrap();
        let pid = Pid::from_raw(p.identity.pid).unwrap();
        assert_eq!(rustix::process::getsid(Some(pid)).unwrap(), pid);
        assert!(adopt(p.identity).is_some());
        assert!(!wait_exit(&p.pidfd, Some(Duration::from_millis(10))));
        // Its output first: a kill before the shell's `echo` would leave the console empty.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(dir.path().join("c")).unwrap() != "hi\n"
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        signal(&p.pidfd, Signal::KILL).unwrap();
        assert!(wait_exit(&p.pidfd, Some(Duration::from_secs(10))));
        let status = p.child.take().unwrap().wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(adopt(p.identity).is_none());
        let text = std::fs::read_to_string(dir.path().join("c")).unwrap();
        assert_eq!(text, "hi\n");
    }

    fn sleeper(dir: &std::path::Path) -> Process {
        let console = File::create(dir.join("console")).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        spawn(cmd, &console).unwrap()
    }

    #[test]
    fn a_half_started_process_dropped_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let process = sleeper(dir.path());
        let identity = process.identity;
        let pidfd = process.pidfd.try_clone().unwrap();
        let guard = HalfStarted::new(process, Duration::from_secs(10));
        assert_eq!(guard.process().identity, identity);
        drop(guard);
        assert!(
            wait_exit(&pidfd, Some(Duration::ZERO)),
            "killed by the drop"
        );
        assert!(adopt(identity).is_none(), "reaped, not a zombie");
    }

    #[test]
    fn a_half_started_process_that_ends_by_itself_gives_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let console = File::create(dir.path().join("console")).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let mut guard = HalfStarted::new(spawn(cmd, &console).unwrap(), Duration::from_secs(10));
        let status = guard.ended(Duration::from_secs(10)).expect("it exits");
        assert_eq!(status.code(), Some(3));
        drop(guard);

        let mut guard = HalfStarted::new(sleeper(dir.path()), Duration::from_secs(10));
        assert_eq!(guard.ended(Duration::ZERO), None, "still running");
        let identity = guard.process().identity;
        drop(guard);
        assert!(adopt(identity).is_none(), "killed by the drop");
    }

    #[test]
    fn a_half_started_process_that_runs_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let guard = HalfStarted::new(sleeper(dir.path()), Duration::from_secs(10));
        let process = guard.running();
        assert!(
            !wait_exit(&process.pidfd, Some(Duration::ZERO)),
            "still running"
        );
        let identity = process.identity;
        process.kill(Duration::from_secs(10));
        assert!(adopt(identity).is_none());
    }
}
