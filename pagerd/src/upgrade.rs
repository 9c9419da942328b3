//! Planned upgrade in place: the daemon replaces its own program with `exec`, keeping its pid,
//! and the new program takes every live fork back exactly as after a crash.
//!
//! ```text
//!  daemon.upgrade {binary} (root and pagerd's user only) ─▶ binary opened once and checked:
//!    absolute; it and every directory above it writable by root alone ([`crate::trusted`]);
//!    executable; its ELF section `.pagerd_version` says pagerd (read, never run)
//!    ─▶ answered {pid, binary} ─▶ once the answer is written: SIGUSR2 to the daemon itself
//!       (a SIGUSR2 from outside, e.g. systemd's ExecReload, upgrades to the daemon's
//!       configured program: the one it was started from, never an earlier `--binary`)
//!  main thread: handoff sockets and control socket stop being accepted on, but keep
//!    listening ─▶ FUSE view unmounted (detached while files are held) ─▶ serving stopped
//!    (records kept; uffds closed on pagerd's side only) ─▶ FD_CLOEXEC cleared on the sockets
//!    ─▶ execve(/proc/self/fd/N: the very file checked, same arguments, environment +
//!       PAGERD_CONTROL_FD, PAGERD_HANDOFF_FDS, PAGERD_PROGRAM): same pid, so a supervisor
//!       keeps tracking it
//!  new program: inherited sockets adopted (each checked to listen at its path) ─▶ reconcile:
//!    pidfd_getfd takes each uffd back, wakes every region, serves (`serve::recover`) ─▶ FUSE
//!    mounted again ─▶ answers what waited in the sockets' backlogs
//! ```
//!
//! Should the new program fail to start, `execve` returns and the daemon runs its own program
//! again (`/proc/self/exe`, which works even if the file was replaced on disk): the forks are
//! recovered by the old program instead, and the failure is logged.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
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

/// Names, for the program an upgrade executes, the daemon's configured program (the one it was
/// first started from), which a later plain reload runs again.
const PROGRAM_ENV: &str = "PAGERD_PROGRAM";

/// The ELF section in which a pagerd binary names itself ([`crate::VERSION_NOTE`]).
pub const VERSION_SECTION: &str = ".pagerd_version";

/// The signal that asks the daemon to upgrade itself.
pub(crate) const UPGRADE_SIGNAL: Signal = Signal::SIGUSR2;

/// Why an upgrade was refused (the daemon keeps running as it is).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeError {
    /// The binary path is not absolute.
    #[error("the binary path {0} must be absolute")]
    NotAbsolute(PathBuf),
    /// Someone other than root could change the binary (or a directory above it).
    #[error("refusing to execute a program others can change")]
    Untrusted(#[source] crate::trusted::Untrusted),
    /// The binary is not an executable regular file.
    #[error("{0} is not an executable file")]
    NotExecutable(PathBuf),
    /// The binary's ELF section `.pagerd_version` is missing or does not name pagerd.
    #[error("{path} is not a pagerd binary: {why}")]
    NotPagerd {
        /// The binary.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// An upgrade is already under way.
    #[error("an upgrade is already under way")]
    InProgress,
}

/// A program checked for an upgrade, open: the file executed is the file checked.
#[derive(Debug)]
pub(crate) struct Program {
    /// Where it was found (canonical).
    pub path: PathBuf,
    file: File,
}

/// An upgrade being asked for, shared by the control socket and the main thread.
#[derive(Debug)]
pub(crate) struct Upgrade {
    requested: Mutex<Option<Program>>,
    /// The daemon's configured program: the one a plain reload executes.
    configured: PathBuf,
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

/// The daemon's configured program: as named by the program an upgrade replaced, or else this
/// process's own. Call before any thread starts (it removes the variable from the environment).
pub(crate) fn configured_program() -> PathBuf {
    match std::env::var_os(PROGRAM_ENV) {
        Some(path) => {
            std::env::remove_var(PROGRAM_ENV);
            PathBuf::from(path)
        }
        None => own_binary(),
    }
}

impl Upgrade {
    /// An upgrade whose plain reload executes `configured`.
    pub fn new(configured: PathBuf) -> Self {
        Self {
            requested: Mutex::new(None),
            configured,
        }
    }

    /// Checks `binary` (default: the configured program) and records it, open, as the program
    /// to run next; returns its path. [`start`](Self::start) then sets the upgrade off.
    pub fn request(&self, binary: Option<PathBuf>) -> Result<PathBuf, UpgradeError> {
        let program = open_program(&binary.unwrap_or_else(|| self.configured.clone()))?;
        let path = program.path.clone();
        let mut requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        if requested.is_some() {
            return Err(UpgradeError::InProgress);
        }
        *requested = Some(program);
        Ok(path)
    }

    /// Asks the main thread to carry out the requested upgrade (a signal to the daemon
    /// itself); called once the requester has its answer.
    pub fn start(&self) {
        if let Err(e) = nix::sys::signal::kill(nix::unistd::getpid(), UPGRADE_SIGNAL) {
            tracing::error!(error = %e, "cannot signal the daemon to upgrade");
            self.clear();
        }
    }

    /// The program to run next: the one asked for, or (a bare signal from outside) the
    /// configured one, checked now.
    pub fn take_program(&self) -> Result<Program, UpgradeError> {
        let requested = self
            .requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match requested {
            Some(program) => Ok(program),
            None => open_program(&self.configured),
        }
    }

    /// The configured program (handed to the next program, for its own plain reloads).
    pub fn configured(&self) -> &Path {
        &self.configured
    }

    /// Forgets a request that could not be carried out.
    pub fn clear(&self) {
        *self.requested.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Opens `binary` once and checks that root may execute it: absolute, it and every directory
/// above it changeable by root alone, executable, and named pagerd by its ELF section. The
/// file is read, never run.
fn open_program(binary: &Path) -> Result<Program, UpgradeError> {
    if !binary.is_absolute() {
        return Err(UpgradeError::NotAbsolute(binary.to_owned()));
    }
    let (path, file) = crate::trusted::open_trusted(binary).map_err(UpgradeError::Untrusted)?;
    let executable = file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        return Err(UpgradeError::NotExecutable(path));
    }
    if let Err(why) = version_note(&object::ReadCache::new(&file)) {
        return Err(UpgradeError::NotPagerd { path, why });
    }
    Ok(Program { path, file })
}

/// The version a pagerd binary names in its ELF section [`VERSION_SECTION`], or why `elf`
/// has none. Only the headers and that section are read.
pub(crate) fn version_note<'a, R: object::ReadRef<'a>>(elf: R) -> Result<String, String> {
    use object::{Object, ObjectSection};
    let parsed = object::File::parse(elf).map_err(|e| format!("not an ELF file ({e})"))?;
    let section = parsed
        .section_by_name(VERSION_SECTION)
        .ok_or_else(|| format!("no {VERSION_SECTION} section"))?;
    let data = section.data().map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(data)
        .map_err(|_| format!("{VERSION_SECTION} is not text"))?
        .trim_end_matches('\0');
    match text.strip_prefix("pagerd ") {
        Some(version) if !version.is_empty() => Ok(version.to_owned()),
        _ => Err(format!("{VERSION_SECTION} says {text:?}")),
    }
}

/// Replaces this process with `program` (by its open descriptor: the file checked is the file
/// executed), given the daemon's own arguments and, when there is one, the listening control
/// socket; `configured` is what the next program's plain reload runs. Returns only if neither
/// `program` nor, failing that, the daemon's own program could be executed.
pub(crate) fn exec(
    program: &Program,
    configured: &Path,
    control: Option<UnixListener>,
    handoffs: Vec<(proto::ForkId, UnixListener)>,
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
        command.env(PROGRAM_ENV, configured);
        command
    };
    let binary = &program.path;
    tracing::info!(binary = %binary.display(), "upgrading: executing the new program in place");
    // `/proc/self/fd/N` is the open file itself, whatever its path names now (fexecve).
    let by_descriptor = PathBuf::from(format!("/proc/self/fd/{}", program.file.as_raw_fd()));
    let error = command(&by_descriptor).arg0(binary).exec();
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
) -> std::collections::BTreeMap<proto::ForkId, UnixListener> {
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
            let id: proto::ForkId = id.parse().ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_elf_file_with_the_version_section_is_pagerd() {
        assert!(version_note(&b"#!/bin/sh\ntouch /pwned\n"[..])
            .unwrap_err()
            .contains("not an ELF file"));
        let true_binary = std::fs::read("/bin/true").unwrap();
        assert!(version_note(&true_binary[..])
            .unwrap_err()
            .contains("no .pagerd_version section"));
    }

    #[test]
    fn a_relative_or_untrusted_program_is_refused_before_anything_is_read() {
        assert!(matches!(
            open_program(Path::new("pagerd")),
            Err(UpgradeError::NotAbsolute(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("pagerd");
        std::fs::write(&program, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(
            open_program(&program),
            Err(UpgradeError::Untrusted(_))
        ));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            open_program(&program),
            Err(UpgradeError::NotPagerd { .. })
        ));
    }
}
