//! Descriptors of many kinds, to pass where pagerd expects one userfaultfd, or none.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::rng::Rng;

/// What a passed descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A fresh userfaultfd, nothing registered.
    Uffd,
    /// `/dev/null`.
    DevNull,
    /// A pipe's read end.
    PipeRead,
    /// A pipe's write end.
    PipeWrite,
    /// One end of a Unix socket pair.
    Socket,
    /// An empty memfd.
    MemFd,
    /// An eventfd.
    EventFd,
    /// An epoll instance.
    Epoll,
    /// A directory.
    Directory,
    /// An `O_PATH` descriptor of a memory file (names it without being able to read it).
    OPath,
    /// A 4 KiB memory file, open for reading (a registration that can succeed).
    SmallFile,
    /// The same file, write-only.
    WriteOnly,
}

impl FdKind {
    /// Every kind.
    pub const ALL: [FdKind; 12] = [
        FdKind::Uffd,
        FdKind::DevNull,
        FdKind::PipeRead,
        FdKind::PipeWrite,
        FdKind::Socket,
        FdKind::MemFd,
        FdKind::EventFd,
        FdKind::Epoll,
        FdKind::Directory,
        FdKind::OPath,
        FdKind::SmallFile,
        FdKind::WriteOnly,
    ];
}

/// Makes descriptors of every kind; files live in a scratch directory.
#[derive(Debug)]
pub struct FdFactory {
    dir: PathBuf,
    small: PathBuf,
}

/// A descriptor from a `libc` call that returns one, or the error.
fn owned(ret: RawFd) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ret` is a descriptor the kernel just opened for this process and nothing else
    // owns; it is wrapped once.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

impl FdFactory {
    /// A factory whose files are in `dir`; `small` is a 4 KiB memory file.
    pub fn new(dir: &Path, small: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            small: small.to_owned(),
        }
    }

    /// One descriptor of `kind`.
    pub fn make(&self, kind: FdKind) -> io::Result<OwnedFd> {
        Ok(match kind {
            FdKind::Uffd => testkit::new_uffd(),
            FdKind::DevNull => File::open("/dev/null")?.into(),
            FdKind::PipeRead => nix::unistd::pipe()?.0,
            FdKind::PipeWrite => nix::unistd::pipe()?.1,
            FdKind::Socket => UnixStream::pair()?.0.into(),
            // SAFETY: a plain system call with a NUL-terminated name; the result is checked.
            FdKind::MemFd => owned(unsafe { libc::memfd_create(c"wire-fuzz".as_ptr(), 0) })?,
            // SAFETY: a plain system call without pointers; the result is checked.
            FdKind::EventFd => owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?,
            // SAFETY: a plain system call without pointers; the result is checked.
            FdKind::Epoll => owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?,
            FdKind::Directory => File::open(&self.dir)?.into(),
            FdKind::OPath => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(&self.small)?
                .into(),
            FdKind::SmallFile => File::open(&self.small)?.into(),
            FdKind::WriteOnly => std::fs::OpenOptions::new()
                .write(true)
                .open(&self.small)?
                .into(),
        })
    }

    /// `count` descriptors of random kinds (`uffd_percent` of them userfaultfds).
    pub fn random(
        &self,
        rng: &mut Rng,
        count: usize,
        uffd_percent: u64,
    ) -> io::Result<(Vec<FdKind>, Vec<OwnedFd>)> {
        let kinds: Vec<FdKind> = (0..count)
            .map(|_| {
                if rng.chance(uffd_percent) {
                    FdKind::Uffd
                } else {
                    *rng.pick(&FdKind::ALL)
                }
            })
            .collect();
        let fds = kinds
            .iter()
            .map(|&k| self.make(k))
            .collect::<io::Result<_>>()?;
        Ok((kinds, fds))
    }
}
