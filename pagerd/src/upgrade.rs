//! Planned upgrade in place: the daemon replaces its own program with `exec`, keeping its pid,
//! and the new program takes every live fork back exactly as after a crash.
//!
//! ```text
//!  daemon.upgrade {binary} ─▶ binary checked (absolute, executable, `--version` says pagerd)
//!    ─▶ answered {pid, binary} ─▶ once the answer is written: SIGUSR2 to the daemon itself
//!       (a SIGUSR2 from outside, e.g. systemd's ExecReload, upgrades to the daemon's own file)
//!  main thread: handoff sockets and control socket stop being accepted on, but keep
//!    listening ─▶ FUSE view unmounted (detached while files are held) ─▶ serving stopped
//!    (records kept; uffds closed on pagerd's side only) ─▶ FD_CLOEXEC cleared on the sockets
//!    ─▶ execve(binary, same arguments, environment + PAGERD_CONTROL_FD, PAGERD_HANDOFF_FDS):
//!       same pid, so a supervisor keeps tracking it
//!  new program: inherited sockets adopted (each checked to listen at its path) ─▶ reconcile:
//!    pidfd_getfd takes each uffd back, wakes every region, serves (`serve::recover`) ─▶ FUSE
//!    mounted again ─▶ answers what waited in the sockets' backlogs
//! ```
//!
//! Should the new program fail to start, `execve` returns and the daemon runs its own program
//! again (`/proc/self/exe`, which works even if the file was replaced on disk): the forks are
//! recovered by the old program instead, and the failure is logged.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::signal::Signal;

/// Names, for the program an upgrade executes, the descriptor of the still-listening control
/// socket (connections waiting in its backlog are answered by the new program).
const CONTROL_FD_ENV: &str = "PAGERD_CONTROL_FD";

/// Names, for the program an upgrade executes, the forks' handoff sockets, still listening:
/// `ID=FD,ID=FD…`.
const HANDOFF_FDS_ENV: &str = "PAGERD_HANDOFF_FDS";

/// The signal that asks the daemon to upgrade itself.
pub(crate) const UPGRADE_SIGNAL: Signal = Signal::SIGUSR2;

/// Why an upgrade was refused (the daemon keeps running as it is).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeError {
    /// The binary path is not absolute.
    #[error("the binary path {0} must be absolute")]
    NotAbsolute(PathBuf),
    /// The binary is not an executable regular file.
    #[error("{0} is not an executable file")]
    NotExecutable(PathBuf),
    /// Running `BINARY --version` failed or did not name pagerd.
    #[error("{path} --version did not answer as pagerd does: {why}")]
    NotPagerd {
        /// The binary.
        path: PathBuf,
        /// What it did.
        why: String,
    },
    /// An upgrade is already under way.
    #[error("an upgrade is already under way")]
    InProgress,
}

/// An upgrade being asked for, shared by the control socket and the main thread.
#[derive(Debug)]
pub(crate) struct Upgrade {
    requested: Mutex<Option<PathBuf>>,
    default_binary: PathBuf,
}

/// The program this process runs, as a path (without the ` (deleted)` the kernel appends
/// once the file was replaced on disk, which is what a package upgrade does).
fn own_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let text = exe.as_os_str().to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

impl Default for Upgrade {
    fn default() -> Self {
        Self {
            requested: Mutex::new(None),
            default_binary: own_binary(),
        }
    }
}

impl Upgrade {
    /// Checks `binary` (default: the one the daemon was started from) and records it as the
    /// program to run next; returns it. [`start`](Self::start) then sets the upgrade off.
    pub fn request(&self, binary: Option<PathBuf>) -> Result<PathBuf, UpgradeError> {
        let binary = binary.unwrap_or_else(|| self.default_binary.clone());
        check_binary(&binary)?;
        let mut requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        if requested.is_some() {
            return Err(UpgradeError::InProgress);
        }
        *requested = Some(binary.clone());
        Ok(binary)
    }

    /// Asks the main thread to carry out the requested upgrade (a signal to the daemon
    /// itself); called once the requester has its answer.
    pub fn start(&self) {
        if let Err(e) = nix::sys::signal::kill(nix::unistd::getpid(), UPGRADE_SIGNAL) {
            tracing::error!(error = %e, "cannot signal the daemon to upgrade");
            self.clear();
        }
    }

    /// The binary to run next: the one asked for, or (a bare signal from outside) the
    /// daemon's own, checked.
    pub fn binary(&self) -> Result<PathBuf, UpgradeError> {
        let requested = self
            .requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match requested {
            Some(binary) => Ok(binary),
            None => {
                check_binary(&self.default_binary)?;
                Ok(self.default_binary.clone())
            }
        }
    }

    /// Forgets a request that could not be carried out.
    pub fn clear(&self) {
        *self.requested.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Whether `binary` looks like a pagerd that runs: absolute, executable, and its
/// `--version` starts with `pagerd`.
fn check_binary(binary: &Path) -> Result<(), UpgradeError> {
    if !binary.is_absolute() {
        return Err(UpgradeError::NotAbsolute(binary.to_owned()));
    }
    let executable =
        std::fs::metadata(binary).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        return Err(UpgradeError::NotExecutable(binary.to_owned()));
    }
    let not_pagerd = |why: String| UpgradeError::NotPagerd {
        path: binary.to_owned(),
        why,
    };
    let output = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| not_pagerd(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stdout.starts_with("pagerd") {
        return Err(not_pagerd(format!(
            "exit {}, printed {:?}",
            output.status,
            stdout.trim()
        )));
    }
    Ok(())
}

/// Replaces this process with `binary`, given the daemon's own arguments and, when there is
/// one, the listening control socket. Returns only if neither `binary` nor, failing that, the
/// daemon's own program could be executed.
pub(crate) fn exec(
    binary: &Path,
    control: Option<UnixListener>,
    handoffs: Vec<(proto::Id, UnixListener)>,
) -> io::Error {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let control_fd = control.and_then(keep_across_exec);
    let handoff_fds: Vec<String> = handoffs
        .into_iter()
        .filter_map(|(id, listener)| keep_across_exec(listener).map(|fd| format!("{id}={fd}")))
        .collect();
    let command = |program: &Path| {
        let mut command = std::process::Command::new(program);
        command.args(&args);
        if let Some(fd) = control_fd {
            command.env(CONTROL_FD_ENV, fd.to_string());
        }
        if !handoff_fds.is_empty() {
            command.env(HANDOFF_FDS_ENV, handoff_fds.join(","));
        }
        command
    };
    tracing::info!(binary = %binary.display(), "upgrading: executing the new program in place");
    let error = command(binary).exec();
    tracing::error!(binary = %binary.display(), error = %error,
        "cannot execute the new program; running the old one again");
    command(Path::new("/proc/self/exe"))
        .arg0(std::env::args_os().next().unwrap_or_default())
        .exec()
}

/// Lets a listening socket survive `execve` (clears `FD_CLOEXEC`); its number, or `None`
/// (the socket is closed, and the next program binds it afresh).
fn keep_across_exec(listener: UnixListener) -> Option<RawFd> {
    let fd = OwnedFd::from(listener);
    match nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    ) {
        Ok(_) => Some(fd.into_raw_fd()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand a socket over; the next program binds it again");
            None
        }
    }
}

/// Takes ownership of descriptor `fd`, named in the environment by the program this one
/// replaced, if it is a socket listening at `path`.
fn adopt_listener(fd: RawFd, path: &Path) -> Option<UnixListener> {
    if fd <= 2 {
        return None;
    }
    // SAFETY: F_GETFD only reads the descriptor table entry of `fd`, open or not.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    let listening = |fd: std::os::fd::BorrowedFd<'_>| {
        let bound = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
        )
        .ok()
        .and_then(|addr| addr.path().map(Path::to_owned));
        bound.as_deref() == Some(path)
            && nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                .unwrap_or(false)
    };
    // SAFETY: `fd` is open (checked above) and borrowed only for these two queries.
    if !listening(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }) {
        tracing::warn!(fd, path = %path.display(), "an inherited descriptor is not a socket listening there; ignored");
        return None;
    }
    // SAFETY: the previous program handed this descriptor to this process alone, naming it in
    // an environment variable that the caller removed; nothing else here knows or owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(UnixListener::from(owned))
}

/// The forks' handoff sockets the program this one replaced handed over, each checked to be
/// listening at `sockets_dir/ID.sock`. Call before any thread starts (it edits the
/// environment).
pub(crate) fn inherited_handoffs(
    sockets_dir: &Path,
) -> std::collections::BTreeMap<proto::Id, UnixListener> {
    let Some(value) = std::env::var_os(HANDOFF_FDS_ENV) else {
        return Default::default();
    };
    std::env::remove_var(HANDOFF_FDS_ENV);
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|entry| {
            let (id, fd) = entry.split_once('=')?;
            let id: proto::Id = id.parse().ok()?;
            let fd: RawFd = fd.parse().ok()?;
            let listener = adopt_listener(fd, &sockets_dir.join(format!("{id}.sock")))?;
            Some((id, listener))
        })
        .collect()
}

/// The control socket the program this one replaced handed over, if the environment names
/// one and it is a socket listening at `path`. Call before any thread starts (it removes the
/// variable from the environment, so that no child inherits it).
pub(crate) fn inherited_control(path: &Path) -> Option<UnixListener> {
    let value = std::env::var_os(CONTROL_FD_ENV)?;
    std::env::remove_var(CONTROL_FD_ENV);
    adopt_listener(value.to_str()?.parse().ok()?, path)
}
