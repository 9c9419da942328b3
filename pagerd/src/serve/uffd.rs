//! The raw userfaultfd calls of the fault path, gathered in one place.
//!
//! pagerd never calls `UFFDIO_API` or `UFFDIO_REGISTER`: the VMM already did. It reads events
//! in batches and resolves faults with `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`, and
//! `UFFDIO_POISON` for faults it has no bytes for. Prefetch installs pages with the
//! `DONTWAKE` modes (one wake per batch), and a graduated fork's memory is handed back to the
//! kernel with `UFFDIO_UNREGISTER`. The `userfaultfd` crate's safe wrappers
//! allocate per read and garble a negative `copy` count, and `userfaultfd-sys` 0.6 predates
//! `UFFDIO_POISON`, so the hot path calls the ioctls directly.
//!
//! The uffd's open file description is shared with the VMM, which can change its flags at any
//! moment (clear `O_NONBLOCK`) or read events itself between pagerd's `poll` and `read`. So
//! events are read with `preadv2(…, RWF_NOWAIT)`, which never sleeps whatever the flags say;
//! a plain `read` would block the worker, and every fork on it, forever.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use userfaultfd_sys as raw;

use crate::memory::{CopySource, VmmAddr};

pub use userfaultfd_sys::uffd_msg as UffdMsg;

/// `struct uffdio_poison` (Linux 6.6), which `userfaultfd-sys` 0.6 lacks.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct UffdioPoison {
    range: raw::uffdio_range,
    mode: u64,
    /// Bytes poisoned, or a negative errno.
    updated: i64,
}

/// The ioctl number of `UFFDIO_POISON`: `_IOWR(UFFDIO, 0x08, struct uffdio_poison)`.
const UFFDIO_POISON_NR: u8 = 0x08;

mod ioctl {
    use super::{UffdioPoison, UFFDIO_POISON_NR};
    use userfaultfd_sys::{
        uffdio_copy, uffdio_range, uffdio_zeropage, _UFFDIO_COPY, _UFFDIO_UNREGISTER, _UFFDIO_WAKE,
        _UFFDIO_ZEROPAGE, UFFDIO,
    };
    nix::ioctl_readwrite!(copy, UFFDIO, _UFFDIO_COPY, uffdio_copy);
    nix::ioctl_readwrite!(zeropage, UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage);
    nix::ioctl_read!(wake, UFFDIO, _UFFDIO_WAKE, uffdio_range);
    nix::ioctl_read!(unregister, UFFDIO, _UFFDIO_UNREGISTER, uffdio_range);
    nix::ioctl_readwrite!(poison, UFFDIO, UFFDIO_POISON_NR, UffdioPoison);
}

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = raw::UFFD_EVENT_PAGEFAULT;
/// `UFFD_EVENT_FORK`: carries a new uffd (for the VMM's child), installed in the reader.
pub const EVENT_FORK: u8 = raw::UFFD_EVENT_FORK;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = raw::UFFD_EVENT_REMOVE;

/// A write-protect fault: the page is present, pagerd cannot resolve it.
pub const PAGEFAULT_FLAG_WP: u64 = raw::UFFD_PAGEFAULT_FLAG_WP;
/// A minor fault: the page is in the page cache, only `UFFDIO_CONTINUE` resolves it.
pub const PAGEFAULT_FLAG_MINOR: u64 = raw::UFFD_PAGEFAULT_FLAG_MINOR;

/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = raw::UFFD_FEATURE_EVENT_REMOVE;
/// Set by the kernel in a uffd's features once `UFFDIO_API` has succeeded
/// (`UFFD_FEATURE_INITIALIZED`, shown in `fdinfo`).
pub const FEATURE_INITIALIZED: u64 = 1 << 31;
/// The features pagerd serves: what Firecracker negotiates (`EVENT_REMOVE`) plus those that
/// change neither which events arrive nor how a fault must be answered (`MISSING_HUGETLBFS`
/// and `MISSING_SHMEM` only announce what MISSING mode covers, `THREAD_ID` adds a field,
/// `EXACT_ADDRESS` stops the kernel from rounding fault addresses, which pagerd does itself).
/// Everything else is refused: `EVENT_FORK` (a new uffd per `fork()` of the VMM),
/// `EVENT_REMAP`/`EVENT_UNMAP` (regions moving under pagerd), `PAGEFAULT_FLAG_WP` and the
/// `WP_*`/`MINOR_*` features (faults on present pages), `SIGBUS` (no faults at all), and
/// whatever newer kernels add.
pub const SERVED_FEATURES: u64 = raw::UFFD_FEATURE_EVENT_REMOVE
    | raw::UFFD_FEATURE_MISSING_HUGETLBFS
    | raw::UFFD_FEATURE_MISSING_SHMEM
    | raw::UFFD_FEATURE_THREAD_ID
    | raw::UFFD_FEATURE_EXACT_ADDRESS
    | FEATURE_INITIALIZED;

/// The negotiated features pagerd does not serve (0: all fine). A uffd whose `UFFDIO_API`
/// never ran reports no features at all; its `INITIALIZED` bit counts as missing.
pub fn unsupported_features(features: u64) -> u64 {
    (features & !SERVED_FEATURES) | (!features & FEATURE_INITIALIZED)
}

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

/// The descriptor an event carries, now owned by the caller (closed when dropped): a
/// `UFFD_EVENT_FORK` installs the child's new uffd in the process that reads the event.
pub fn event_fd(msg: &UffdMsg) -> Option<OwnedFd> {
    if msg.event != EVENT_FORK {
        return None;
    }
    // SAFETY: the kernel filled the `fork` member for this event type.
    let ufd = unsafe { msg.arg.fork.ufd };
    let ufd = i32::try_from(ufd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: reading a fork event installed `ufd` in this process for the reader alone;
    // nothing else knows the number, so it is wrapped exactly once.
    Some(unsafe { OwnedFd::from_raw_fd(ufd) })
}

/// The features field of a uffd's `fdinfo` (`API:\t<api>:<features>:<ioctls>`).
fn parse_fdinfo_features(info: &str) -> Option<u64> {
    let api = info.lines().find_map(|l| l.strip_prefix("API:"))?;
    let features = api.trim().split(':').nth(1)?;
    u64::from_str_radix(features, 16).ok()
}

impl Userfaultfd {
    /// Takes ownership of a handed-over uffd and sets `O_NONBLOCK` on it (without it the
    /// kernel's `poll` reports only `EPOLLERR`; reads never block either way).
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self { fd })
    }

    /// The features the VMM negotiated, from `/proc/self/fdinfo`.
    pub fn features(&self) -> Option<u64> {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd())).ok()?;
        parse_fdinfo_features(&info)
    }

    /// Whether someone cleared `O_NONBLOCK` on the (shared) open file description: the VMM
    /// tampering with it. `true` too if the flags cannot be read.
    pub fn nonblock_cleared(&self) -> bool {
        nix::fcntl::fcntl(&self.fd, nix::fcntl::FcntlArg::F_GETFL).map_or(true, |flags| {
            !nix::fcntl::OFlag::from_bits_retain(flags).contains(nix::fcntl::OFlag::O_NONBLOCK)
        })
    }

    /// Reads as many events as fit in `buf`, never sleeping. `Ok(0)` means the uffd has hung
    /// up; `WouldBlock` means no event is pending.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: std::mem::size_of_val(buf),
        };
        // SAFETY: `iov` describes `buf`, valid for writes of its whole length, and any bytes
        // are a valid `uffd_msg`; the kernel writes whole messages only. Offset -1 reads at
        // the current position (a uffd has none), and `RWF_NOWAIT` makes the kernel return
        // `EAGAIN` instead of sleeping, whatever `O_NONBLOCK` says.
        let n = unsafe { libc::preadv2(self.fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs() / std::mem::size_of::<UffdMsg>())
    }
}

/// The calls that install pages into a fork and wake its threads: all the fault path and
/// prefetch do to a VMM's memory, so their policies can be tested against a fake.
pub trait PageInstaller {
    /// Copies `src` to the VMM's `dst` (and as many bytes on), waking the range's threads or
    /// not.
    fn copy(&self, dst: VmmAddr, src: CopySource<'_>, wake: Wake) -> Result<(), FillError>;

    /// Maps the zero page over the VMM's `dst..dst+len`.
    fn zeropage(&self, dst: VmmAddr, len: u64, wake: Wake) -> Result<(), FillError>;

    /// Poisons the VMM's `dst..dst+len` and wakes the faulting threads: any access there gets
    /// `SIGBUS` instead of waiting for a page that will never come.
    fn poison(&self, dst: VmmAddr, len: u64) -> Result<(), FillError>;

    /// Wakes threads waiting on `dst..dst+len`.
    fn wake(&self, dst: VmmAddr, len: u64) -> Result<(), Errno>;

    /// Unregisters the VMM's `start..start+len` from the uffd: from now on the kernel serves
    /// faults there itself (a missing anonymous page reads as zeros) and raises no events.
    /// Threads waiting on the range are woken.
    fn unregister(&self, start: VmmAddr, len: u64) -> Result<(), Errno>;
}

impl PageInstaller for Userfaultfd {
    fn copy(&self, dst: VmmAddr, src: CopySource<'_>, wake: Wake) -> Result<(), FillError> {
        let mut arg = raw::uffdio_copy {
            dst: dst.0,
            src: src.as_ptr() as u64,
            len: src.len(),
            mode: wake.mode(raw::UFFDIO_COPY_MODE_DONTWAKE),
            copy: 0,
        };
        // SAFETY: `arg` is a valid `uffdio_copy`. Its source is `src`, a borrowed slice valid
        // for reads of `len` bytes for the whole call. Its destination lies in the address
        // space of the process that created the uffd, a VMM: a uffd acts only on its
        // creator's memory and pagerd never creates one, so nothing pagerd's own code uses is
        // written; the kernel checks `dst` against the ranges the VMM registered.
        let rc = unsafe { ioctl::copy(self.fd.as_raw_fd(), &mut arg) };
        fill_result(rc, arg.copy)
    }

    fn zeropage(&self, dst: VmmAddr, len: u64, wake: Wake) -> Result<(), FillError> {
        let mut arg = raw::uffdio_zeropage {
            range: raw::uffdio_range { start: dst.0, len },
            mode: wake.mode(raw::UFFDIO_ZEROPAGE_MODE_DONTWAKE),
            zeropage: 0,
        };
        // SAFETY: `arg` is a valid `uffdio_zeropage`; only the VMM's memory is touched.
        let rc = unsafe { ioctl::zeropage(self.fd.as_raw_fd(), &mut arg) };
        fill_result(rc, arg.zeropage)
    }

    fn poison(&self, dst: VmmAddr, len: u64) -> Result<(), FillError> {
        let mut arg = UffdioPoison {
            range: raw::uffdio_range { start: dst.0, len },
            mode: 0,
            updated: 0,
        };
        // SAFETY: `arg` is a valid `uffdio_poison` (the kernel's layout, checked in the tests);
        // only the VMM's page tables are touched.
        let rc = unsafe { ioctl::poison(self.fd.as_raw_fd(), &mut arg) };
        fill_result(rc, arg.updated)
    }

    fn wake(&self, dst: VmmAddr, len: u64) -> Result<(), Errno> {
        let mut range = raw::uffdio_range { start: dst.0, len };
        // SAFETY: `range` is a valid `uffdio_range`; waking touches no memory.
        unsafe { ioctl::wake(self.fd.as_raw_fd(), &mut range) }.map(drop)
    }

    fn unregister(&self, start: VmmAddr, len: u64) -> Result<(), Errno> {
        let mut range = raw::uffdio_range {
            start: start.0,
            len,
        };
        // SAFETY: `range` is a valid `uffdio_range`; the kernel acts on the uffd's own mm.
        unsafe { ioctl::unregister(self.fd.as_raw_fd(), &mut range) }.map(drop)
    }
}

/// Whether a fill wakes the threads waiting on its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Wake them (a fault's answer).
    Yes,
    /// Leave them; one `UFFDIO_WAKE` follows a batch (prefetch).
    Later,
}

impl Wake {
    fn mode(self, dontwake: u64) -> u64 {
        match self {
            Wake::Yes => 0,
            Wake::Later => dontwake,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_ioctl_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<UffdioPoison>(), 32);
        // _IOWR(0xAA, 0x08, 32 bytes), as <linux/userfaultfd.h> defines UFFDIO_POISON.
        let nr = nix::request_code_readwrite!(
            raw::UFFDIO,
            UFFDIO_POISON_NR,
            std::mem::size_of::<UffdioPoison>()
        );
        assert_eq!(nr as u64, 0xc020_aa08);
    }

    #[test]
    fn reads_features_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\npending:\t0\ntotal:\t0\n\
                    API:\taa:80000008:80000000000001ff\n";
        assert_eq!(parse_fdinfo_features(info), Some(0x8000_0008));
        assert_eq!(parse_fdinfo_features("pos:\t0\n"), None);
    }

    #[test]
    fn only_firecrackers_features_and_harmless_ones_are_served() {
        let firecracker = FEATURE_INITIALIZED | FEATURE_EVENT_REMOVE;
        assert_eq!(unsupported_features(firecracker), 0);
        assert_eq!(unsupported_features(FEATURE_INITIALIZED), 0);
        assert_eq!(
            unsupported_features(firecracker | raw::UFFD_FEATURE_THREAD_ID),
            0
        );
        for bad in [
            raw::UFFD_FEATURE_EVENT_FORK,
            raw::UFFD_FEATURE_EVENT_REMAP,
            raw::UFFD_FEATURE_EVENT_UNMAP,
            raw::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            raw::UFFD_FEATURE_MINOR_SHMEM,
            raw::UFFD_FEATURE_SIGBUS,
            1 << 16, // UFFD_FEATURE_MOVE, newer than the bindings
        ] {
            assert_eq!(unsupported_features(firecracker | bad), bad, "{bad:#x}");
        }
        // No UFFDIO_API at all.
        assert_eq!(unsupported_features(0), FEATURE_INITIALIZED);
    }

    #[test]
    fn a_fork_event_hands_its_descriptor_to_the_caller() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let raw_fd = std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(file));
        let mut msg = empty_msg();
        msg.event = EVENT_FORK;
        msg.arg.fork.ufd = u32::try_from(raw_fd).unwrap();
        let owned = event_fd(&msg).expect("a fork event carries a descriptor");
        assert_eq!(owned.as_raw_fd(), raw_fd);
        msg.event = EVENT_REMOVE;
        assert!(event_fd(&msg).is_none());
    }
}
