//! Taking a live VMM's uffd back after the daemon restarted (crash, restart or upgrade).
//!
//! ```text
//!  at attach:   fstat(uffd).st_ino ─▶ /proc/PID/fd/N with that inode ─▶ ServedUffd (recorded)
//!  at restart:  VMM alive (pid + start time)? ─▶ pidfd_open ─▶ still that process?
//!               ─▶ pidfd_getfd(N) (else every N of /proc/PID/fd with the inode)
//!               ─▶ anon_inode:[userfaultfd] with the recorded inode? ─▶ the uffd
//!               ─▶ Server::recover: regions validated again, session built,
//!                  UFFDIO_WAKE over every region, served by a worker
//! ```
//!
//! A VMM keeps its uffd for its whole life and never hands it over twice, so the copy the
//! daemon held dies with the daemon but the VMM's own copy does not: `pidfd_getfd(2)` duplicates
//! it again (ptrace rights are needed: root or `CAP_SYS_PTRACE`). A fault the dead daemon read
//! and never answered leaves its thread asleep; waking every registered range makes such
//! threads fault again, now seen by the new daemon. Nothing here depends on the handoff
//! connection (gone with the old daemon) or on who started the VMM.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use proto::handoff::GuestRegionUffdMapping;
use proto::model::DetachedReason;

/// What a served uffd's record holds, as serving needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedUffd {
    /// The uffd's number in the VMM's descriptor table, if found there at attach.
    pub vmm_fd: Option<i32>,
    /// The uffd's inode.
    pub ino: u64,
    /// The negotiated features.
    pub features: u64,
    /// The regions the handoff declared.
    pub regions: Vec<GuestRegionUffdMapping>,
}

/// Why a uffd could not be taken back; the fork stays `detached` for this reason.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The VMM exited (or its pid was reused) while the daemon looked at it.
    #[error("the VMM is gone")]
    VmmGone,
    /// `pidfd_getfd` was refused: the daemon lacks ptrace rights over the VMM.
    #[error("not permitted to take descriptors out of the VMM (needs root or CAP_SYS_PTRACE)")]
    NotPermitted(#[source] io::Error),
    /// No descriptor of the VMM is the recorded uffd.
    #[error("no descriptor of the VMM is the recorded uffd (inode {ino})")]
    NotFound {
        /// The recorded inode.
        ino: u64,
    },
    /// The record does not fit the snapshot, or the snapshot is not served.
    #[error("the recorded regions are no longer valid: {0}")]
    Invalid(String),
    /// Serving could not be set up.
    #[error("cannot set up serving: {0}")]
    Setup(String),
}

impl RecoverError {
    /// The reason a fork shows while detached.
    pub fn reason(&self) -> DetachedReason {
        match self {
            Self::VmmGone | Self::NotFound { .. } => DetachedReason::UffdNotFound,
            Self::NotPermitted(_) => DetachedReason::NotPermitted,
            Self::Invalid(_) => DetachedReason::InvalidRecord,
            Self::Setup(_) => DetachedReason::SetupFailed,
        }
    }
}

const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// The inode of a descriptor (a userfaultfd's own anonymous inode).
pub fn inode_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// Whether `fd`, in this process, is a userfaultfd.
fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|link| link.as_os_str() == UFFD_LINK)
}

/// The `ino:` line of `/proc/PID/fdinfo/FD` (kernels since 5.14 print it).
fn fdinfo_ino(pid: i32, fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("ino:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The descriptors of process `pid` that are the file with inode `ino`: those whose
/// `/proc/PID/fd` link is a userfaultfd whose target has that inode (and whose `fdinfo` says
/// the same inode, where it says one).
fn fds_with_inode(pid: i32, ino: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|link| link.as_os_str() == UFFD_LINK)
                && std::fs::metadata(entry.path()).is_ok_and(|m| m.ino() == ino)
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fdinfo_ino(pid, fd).is_none_or(|i| i == ino))
        .collect()
}

/// The uffd's number in the VMM (`pid`), found by its inode; `None` if the VMM does not hold it
/// (another process may have handed it over) or cannot be inspected.
pub fn vmm_fd_of(pid: i32, ino: u64) -> Option<i32> {
    fds_with_inode(pid, ino).into_iter().min()
}

/// Duplicates the recorded uffd out of the VMM behind `pidfd`: the recorded descriptor number
/// first, then any descriptor with the recorded inode. The copy is checked to be a userfaultfd
/// with that very inode.
pub fn reclaim_uffd(
    pidfd: BorrowedFd<'_>,
    pid: i32,
    vmm_fd: Option<i32>,
    ino: u64,
) -> Result<OwnedFd, RecoverError> {
    let take = |fd: i32| -> Result<Option<OwnedFd>, RecoverError> {
        match rustix::process::pidfd_getfd(pidfd, fd, rustix::process::PidfdGetfdFlags::empty()) {
            Ok(copy) => Ok((is_userfaultfd(copy.as_fd())
                && inode_of(copy.as_fd()).ok() == Some(ino))
            .then_some(copy)),
            Err(rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => Err(
                RecoverError::NotPermitted(io::Error::from_raw_os_error(libc::EPERM)),
            ),
            Err(rustix::io::Errno::SRCH) => Err(RecoverError::VmmGone),
            Err(_) => Ok(None),
        }
    };
    if let Some(fd) = vmm_fd {
        if let Some(copy) = take(fd)? {
            return Ok(copy);
        }
    }
    for fd in fds_with_inode(pid, ino) {
        if Some(fd) != vmm_fd {
            if let Some(copy) = take(fd)? {
                return Ok(copy);
            }
        }
    }
    Err(RecoverError::NotFound { ino })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn userfaultfd() -> OwnedFd {
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(fd >= 0, "userfaultfd: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor this test alone owns.
        unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
    }

    #[test]
    fn a_uffd_is_found_by_its_inode_and_taken_back_through_a_pidfd() {
        let (a, b) = (userfaultfd(), userfaultfd());
        let ino = inode_of(b.as_fd()).unwrap();
        assert_ne!(
            inode_of(a.as_fd()).unwrap(),
            ino,
            "each uffd has its own inode"
        );
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(vmm_fd_of(me, ino), Some(b.as_raw_fd()));
        assert_eq!(fdinfo_ino(me, b.as_raw_fd()), Some(ino));
        let pidfd = crate::sys::pidfd_open(me).unwrap();
        // A wrong recorded number (a's) falls back to the inode scan.
        let copy = reclaim_uffd(pidfd.as_fd(), me, Some(a.as_raw_fd()), ino).unwrap();
        assert_eq!(inode_of(copy.as_fd()).unwrap(), ino);
        drop(b);
        drop(copy);
        assert!(matches!(
            reclaim_uffd(pidfd.as_fd(), me, None, ino),
            Err(RecoverError::NotFound { .. })
        ));
    }
}
