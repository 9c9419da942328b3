//! `naive-handler`: the baseline page server, Firecracker's example on-demand handler's
//! algorithm written for this repo. One process per VM: it maps the memory file
//! `MAP_PRIVATE|MAP_POPULATE` (reading all of it up front), accepts one handoff, then in one
//! thread `poll`s the uffd and serves each fault with one 4 KiB `UFFDIO_COPY`. It exits when the
//! VMM hangs up.
//!
//! `naive-handler --socket PATH --snapshot FILE` (prints `listening` once ready).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::fdpass::HandoffReceiver;
use userfaultfd::{Event, Uffd};

/// A one-VM, one-thread, one-page-per-fault page server.
#[derive(Debug, Parser)]
struct Args {
    /// Where to listen for the handoff.
    #[arg(long)]
    socket: PathBuf,
    /// The snapshot memory file.
    #[arg(long)]
    snapshot: PathBuf,
}

const PAGE: usize = 4096;

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let file = File::open(&args.snapshot)?;
    // SAFETY: a private read-only mapping of a file nobody writes; only read from.
    let memory = unsafe {
        memmap2::MmapOptions::new()
            .populate()
            .map_copy_read_only(&file)?
    };
    let listener = UnixListener::bind(&args.socket)?;
    println!("listening");
    std::io::stdout().flush()?;
    let (stream, _) = listener.accept()?;
    stream.set_nonblocking(true)?;
    let mut receiver = HandoffReceiver::new();
    let handoff = loop {
        if let Some(h) = receiver.poll(&stream)? {
            break h;
        }
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::NONE)?;
    };
    let regions = handoff.regions;
    // SAFETY: the descriptor was just received and is owned by nothing else.
    let uffd = unsafe { Uffd::from_raw_fd(handoff.uffd.into_raw_fd()) };
    loop {
        let mut fds = [
            PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        ];
        poll(&mut fds, PollTimeout::NONE)?;
        if fds[1]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLIN))
        {
            return Ok(());
        }
        let Some(Event::Pagefault { addr, .. }) = uffd.read_event()? else {
            continue;
        };
        let addr = addr as u64 & !(PAGE as u64 - 1);
        let Some(region) = regions.iter().find(|r| r.contains(addr)) else {
            continue;
        };
        let offset = (region.offset + addr - region.base_host_virt_addr) as usize;
        let src = memory[offset..offset + PAGE].as_ptr();
        // SAFETY: `src` points at one page of the live mapping; the kernel checks `addr`.
        match unsafe { uffd.copy(src.cast(), addr as *mut libc::c_void, PAGE, true) } {
            Ok(_) => {}
            // The crate speaks an older nix: compare the raw errno.
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                uffd.wake(addr as *mut libc::c_void, PAGE)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("naive-handler: {e}");
            ExitCode::FAILURE
        }
    }
}
