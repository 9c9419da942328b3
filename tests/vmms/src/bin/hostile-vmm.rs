//! `hostile-vmm`: a VMM that hands pagerd a uffd set up the ways a hostile or broken VMM could
//! set one up, then misbehaves on command. One JSON event per line on stdout, like
//! `synthetic-vmm`.
//!
//! ```text
//! hostile-vmm --socket fork.sock --size 1M [--features 0x8 | --no-api]
//!     [--register missing,wp,minor] [--shmem | --hugetlb] [--declared-page-size 2M]
//!     [--prepopulate PAGES] [--undeclared-tail 64K] [--file-offset 0]
//!     handoff clear-nonblock read:0 touch:8K wp:0:4K write:0 wait hold
//! ```
//!
//! Memory is one region, 2 MiB aligned: private anonymous (default), a `memfd` mapped shared
//! whose pages are already in its page cache (`--shmem`: accesses are minor faults), or
//! hugetlbfs (`--hugetlb`). `--prepopulate` writes the first pages before registering, so they
//! are present when pagerd is asked for them. Steps: `handoff` (connect and send the region and
//! the uffd; prints pagerd's reply), `clear-nonblock` (clears `O_NONBLOCK` on the shared uffd),
//! `read:OFF` (read one byte, then print `read`), `touch:OFF` / `write:OFF` (read or write one
//! byte from a thread of its own, so the steps go on while it waits; prints `touched` /
//! `written` if the access ever returns), `wp:OFF:LEN` (`UFFDIO_WRITEPROTECT`), `wait` (one line
//! of stdin), `hold` (until stdin closes). An access pagerd poisons kills the process with
//! `SIGBUS`.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_2M, PAGE_SIZE_4K};
use serde_json::json;
use test_vmms::events::{emit, exit_status};
use test_vmms::sizes::{parse_range, parse_size};
use userfaultfd_sys as raw;

mod ioctl {
    use userfaultfd_sys::{
        uffdio_api, uffdio_register, uffdio_writeprotect, _UFFDIO_API, _UFFDIO_REGISTER,
        _UFFDIO_WRITEPROTECT, UFFDIO,
    };
    nix::ioctl_readwrite!(api, UFFDIO, _UFFDIO_API, uffdio_api);
    nix::ioctl_readwrite!(register, UFFDIO, _UFFDIO_REGISTER, uffdio_register);
    nix::ioctl_readwrite!(
        writeprotect,
        UFFDIO,
        _UFFDIO_WRITEPROTECT,
        uffdio_writeprotect
    );
}

/// A VMM that sets up its uffd in ways pagerd must survive.
#[derive(Debug, Parser)]
struct Args {
    /// pagerd's handoff socket.
    #[arg(long)]
    socket: PathBuf,
    /// Size of the declared region.
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    size: u64,
    /// Where the region starts in the snapshot memory file.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    file_offset: u64,
    /// Features to negotiate with UFFDIO_API (a bit mask; default UFFD_FEATURE_EVENT_REMOVE).
    #[arg(long, value_parser = parse_size, default_value = "8")]
    features: u64,
    /// Do not call UFFDIO_API at all.
    #[arg(long)]
    no_api: bool,
    /// Registration modes, comma separated: missing, wp, minor; or none.
    #[arg(long, default_value = "missing")]
    register: String,
    /// Guest memory is a memfd mapped MAP_SHARED whose pages are already in its page cache.
    #[arg(long, conflicts_with = "hugetlb")]
    shmem: bool,
    /// Guest memory is 2 MiB hugetlbfs pages.
    #[arg(long)]
    hugetlb: bool,
    /// The page size the handoff declares [default: the memory's].
    #[arg(long, value_parser = parse_size)]
    declared_page_size: Option<u64>,
    /// Write this many pages of the region before registering it.
    #[arg(long, default_value_t = 0)]
    prepopulate: u64,
    /// Bytes mapped and registered after the region but not declared.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    undeclared_tail: u64,
    /// The steps.
    steps: Vec<String>,
}

type Error = Box<dyn std::error::Error>;

fn errno<T>(what: &str, r: nix::Result<T>) -> Result<T, Error> {
    r.map_err(|e| format!("{what}: {e}").into())
}

/// The mapped guest memory: `len` bytes at `addr` (the region plus its undeclared tail).
struct Memory {
    addr: usize,
    page_size: u64,
}

fn map_memory(args: &Args, len: u64) -> Result<Memory, Error> {
    let page_size = if args.hugetlb {
        PAGE_SIZE_2M
    } else {
        PAGE_SIZE_4K
    };
    let len_usize = usize::try_from(len)?;
    let (flags, fd) = if args.shmem {
        let fd = errno(
            "memfd_create",
            nix::sys::memfd::memfd_create("hostile", nix::sys::memfd::MFdFlags::empty()),
        )?;
        errno(
            "ftruncate",
            nix::unistd::ftruncate(&fd, i64::try_from(len)?),
        )?;
        // Fill the page cache, not this mapping: every first access is a minor fault.
        let page = vec![0x5au8; PAGE_SIZE_4K as usize];
        for off in (0..len).step_by(PAGE_SIZE_4K as usize) {
            errno(
                "pwrite",
                nix::sys::uio::pwrite(&fd, &page, i64::try_from(off)?),
            )?;
        }
        (libc::MAP_SHARED, Some(fd))
    } else if args.hugetlb {
        (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            None,
        )
    } else {
        (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
        )
    };
    // Reserve 2 MiB more address space than needed, so the region can start 2 MiB aligned
    // (a 2 MiB declared page size needs that whatever the memory is).
    let slack = PAGE_SIZE_2M as usize;
    // SAFETY: a fresh reservation at an address the kernel picks; it aliases nothing.
    let reserve = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_usize + slack,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserve == libc::MAP_FAILED {
        return Err(format!("reserve: {}", std::io::Error::last_os_error()).into());
    }
    let aligned = (reserve as usize).next_multiple_of(slack);
    let raw_fd = fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
    // SAFETY: replaces part of our own reservation (MAP_FIXED inside it), so nothing else
    // is mapped over.
    let addr = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            raw_fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()).into());
    }
    Ok(Memory {
        addr: addr as usize,
        page_size,
    })
}

fn new_uffd(args: &Args) -> Result<OwnedFd, Error> {
    // Without privilege (and `vm.unprivileged_userfaultfd` 0, the default) only a uffd that
    // reports user-mode faults alone may be had; this VMM only faults in user mode.
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    let user_mode_only = if nix::unistd::geteuid().is_root() {
        0
    } else {
        UFFD_USER_MODE_ONLY
    };
    // SAFETY: the userfaultfd syscall takes flags and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::c_long::from(libc::O_CLOEXEC | libc::O_NONBLOCK | user_mode_only),
        )
    };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
    if !args.no_api {
        let mut api = raw::uffdio_api {
            api: raw::UFFD_API,
            features: args.features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid `uffdio_api`.
        errno("UFFDIO_API", unsafe {
            ioctl::api(uffd.as_raw_fd(), &mut api)
        })?;
    }
    Ok(uffd)
}

fn register(uffd: &OwnedFd, addr: usize, len: u64, modes: &str) -> Result<(), Error> {
    if modes == "none" {
        return Ok(());
    }
    let mut mode = 0;
    for m in modes.split(',') {
        mode |= match m {
            "missing" => raw::UFFDIO_REGISTER_MODE_MISSING,
            "wp" => raw::UFFDIO_REGISTER_MODE_WP,
            "minor" => 1 << 2,
            other => return Err(format!("unknown register mode `{other}`").into()),
        };
    }
    let mut reg = raw::uffdio_register {
        range: raw::uffdio_range {
            start: addr as u64,
            len,
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: `reg` is a valid `uffdio_register` over our own mapping.
    errno("UFFDIO_REGISTER", unsafe {
        ioctl::register(uffd.as_raw_fd(), &mut reg)
    })?;
    Ok(())
}

fn run(args: Args) -> Result<(), Error> {
    let total = args.size + args.undeclared_tail;
    let memory = map_memory(&args, total)?;
    for page in 0..args.prepopulate {
        let at = memory.addr + usize::try_from(page * PAGE_SIZE_4K)?;
        // SAFETY: inside our own writable mapping, before any uffd covers it.
        unsafe { (at as *mut u8).write_volatile(1) };
    }
    let uffd = new_uffd(&args)?;
    register(&uffd, memory.addr, total, &args.register)?;
    let region = GuestRegionUffdMapping {
        base_host_virt_addr: memory.addr as u64,
        size: args.size,
        offset: args.file_offset,
        page_size: args.declared_page_size.unwrap_or(memory.page_size),
    };
    emit(json!({"event": "ready", "pid": std::process::id(), "base": memory.addr}));
    let mut connection: Option<UnixStream> = None;
    let stdin = std::io::stdin();
    for step in &args.steps {
        match step.split_once(':').unwrap_or((step, "")) {
            ("handoff", _) => {
                let stream = UnixStream::connect(&args.socket)?;
                proto::fdpass::send_handoff(&stream, &[region], uffd.as_fd())?;
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line)?;
                let reply: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| json!({"unparsed": line}));
                emit(json!({"event": "reply", "reply": reply}));
                connection = Some(stream);
            }
            ("clear-nonblock", _) => {
                let flags = errno("F_GETFL", nix::fcntl::fcntl(&uffd, nix::fcntl::F_GETFL))?;
                let flags =
                    nix::fcntl::OFlag::from_bits_retain(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
                errno(
                    "F_SETFL",
                    nix::fcntl::fcntl(&uffd, nix::fcntl::F_SETFL(flags)),
                )?;
                emit(json!({"event": "nonblock_cleared"}));
            }
            ("read", off) => {
                let off = parse_size(off)?;
                if off >= total {
                    return Err(format!("offset {off:#x} is outside guest memory").into());
                }
                let at = memory.addr + usize::try_from(off)?;
                // SAFETY: `at` is inside our own mapping.
                std::hint::black_box(unsafe { (at as *const u8).read_volatile() });
                emit(json!({"event": "read", "offset": off}));
            }
            (access @ ("touch" | "write"), off) => {
                let off = parse_size(off)?;
                if off >= total {
                    return Err(format!("offset {off:#x} is outside guest memory").into());
                }
                let at = memory.addr + usize::try_from(off)?;
                let write = access == "write";
                std::thread::spawn(move || {
                    // SAFETY: `at` is inside our own mapping, which lives until exit.
                    unsafe {
                        if write {
                            (at as *mut u8).write_volatile(2);
                        } else {
                            std::hint::black_box((at as *const u8).read_volatile());
                        }
                    }
                    let event = if write { "written" } else { "touched" };
                    emit(json!({"event": event, "offset": off}));
                });
                emit(json!({"event": "accessing", "offset": off, "write": write}));
            }
            ("wp", range) => {
                let (off, len) = parse_range(range)?;
                let mut wp = raw::uffdio_writeprotect {
                    range: raw::uffdio_range {
                        start: memory.addr as u64 + off,
                        len,
                    },
                    mode: 1, // UFFDIO_WRITEPROTECT_MODE_WP
                };
                // SAFETY: `wp` is a valid `uffdio_writeprotect` over our own registered range.
                errno("UFFDIO_WRITEPROTECT", unsafe {
                    ioctl::writeprotect(uffd.as_raw_fd(), &mut wp)
                })?;
                emit(json!({"event": "protected", "offset": off, "len": len}));
            }
            ("wait", _) => {
                emit(json!({"event": "waiting"}));
                stdin.lock().read_line(&mut String::new())?;
            }
            ("hold", _) => {
                emit(json!({"event": "holding"}));
                std::io::copy(&mut stdin.lock(), &mut std::io::sink())?;
            }
            (other, _) => return Err(format!("unknown step `{other}`").into()),
        }
    }
    drop(connection);
    Ok(())
}

fn main() -> ExitCode {
    exit_status("hostile-vmm", run(Args::parse()))
}
