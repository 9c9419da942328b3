//! The raw userfaultfd calls of the fault path, gathered in one place.
//!
//! pagerd never calls `UFFDIO_API` or `UFFDIO_REGISTER`: the VMM already did. It reads events
//! in batches and resolves faults with `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and `UFFDIO_WAKE`. The
//! `userfaultfd` crate's safe wrappers allocate per read and garble a negative `copy` count,
//! so the hot path calls the ioctls it exposes in `userfaultfd::raw` directly.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use userfaultfd_sys as raw;

pub use userfaultfd_sys::uffd_msg as UffdMsg;

mod ioctl {
    use userfaultfd_sys::{
        uffdio_copy, uffdio_range, uffdio_zeropage, _UFFDIO_COPY, _UFFDIO_WAKE, _UFFDIO_ZEROPAGE,
        UFFDIO,
    };
    nix::ioctl_readwrite!(copy, UFFDIO, _UFFDIO_COPY, uffdio_copy);
    nix::ioctl_readwrite!(zeropage, UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage);
    nix::ioctl_read!(wake, UFFDIO, _UFFDIO_WAKE, uffdio_range);
}

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = raw::UFFD_EVENT_PAGEFAULT;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = raw::UFFD_EVENT_REMOVE;
/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = raw::UFFD_FEATURE_EVENT_REMOVE;

/// A fill that stopped early: the error and how many bytes were filled before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillError {
    /// Why it stopped.
    pub errno: Errno,
    /// Bytes filled (and woken) before it stopped.
    pub done: u64,
}

/// A VMM's userfaultfd as handed over.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

/// An all-zero `uffd_msg`, to size read buffers.
pub fn empty_msg() -> UffdMsg {
    // SAFETY: `uffd_msg` is plain old data (integers and unions of integers); all-zero bytes
    // are a valid value.
    unsafe { std::mem::zeroed() }
}

impl Userfaultfd {
    /// Takes ownership of a handed-over uffd and makes sure reads never block the worker.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self { fd })
    }

    /// The features the VMM negotiated, from `/proc/self/fdinfo` (`API:\t<api>:<features>:…`).
    pub fn features(&self) -> Option<u64> {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd())).ok()?;
        let api = info.lines().find_map(|l| l.strip_prefix("API:"))?;
        let features = api.trim().split(':').nth(1)?;
        u64::from_str_radix(features, 16).ok()
    }

    /// Reads as many events as fit in `buf`. `Ok(0)` means the uffd has hung up;
    /// `WouldBlock` means no event is pending.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is valid for `bytes` bytes of writes, and any bytes are a valid
        // `uffd_msg`; the kernel writes whole messages only.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs() / std::mem::size_of::<UffdMsg>())
    }

    /// Copies `len` bytes from `src` to the VMM's `dst` and wakes the faulting threads.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the duration of the call.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<(), FillError> {
        let mut arg = raw::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `arg` is a valid `uffdio_copy`; the caller vouches for `src`; `dst` is in the
        // VMM's address space, which the kernel checks against the registered ranges.
        let rc = unsafe { ioctl::copy(self.fd.as_raw_fd(), &mut arg) };
        fill_result(rc, arg.copy)
    }

    /// Maps the zero page over the VMM's `dst..dst+len` and wakes the faulting threads.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<(), FillError> {
        let mut arg = raw::uffdio_zeropage {
            range: raw::uffdio_range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `arg` is a valid `uffdio_zeropage`; only the VMM's memory is touched.
        let rc = unsafe { ioctl::zeropage(self.fd.as_raw_fd(), &mut arg) };
        fill_result(rc, arg.zeropage)
    }

    /// Wakes threads waiting on `dst..dst+len`.
    pub fn wake(&self, dst: u64, len: u64) -> Result<(), Errno> {
        let mut range = raw::uffdio_range { start: dst, len };
        // SAFETY: `range` is a valid `uffdio_range`; waking touches no memory.
        unsafe { ioctl::wake(self.fd.as_raw_fd(), &mut range) }.map(drop)
    }
}

fn fill_result(rc: nix::Result<i32>, count: i64) -> Result<(), FillError> {
    match rc {
        Ok(_) => Ok(()),
        Err(errno) => Err(FillError {
            errno,
            done: u64::try_from(count).unwrap_or(0),
        }),
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
