//! `kvm-vmm`: a tiny KVM VMM whose guest memory is served by pagerd. It maps the snapshot's
//! memory like Firecracker (one region, `MAP_PRIVATE|MAP_ANONYMOUS`, registered with a uffd),
//! hands the uffd to the page server, then runs a one-vCPU guest that checksums every MiB of
//! its memory (optionally after overwriting its first N MiB with a pattern) and prints the
//! checksums, one JSON line per event on stdout.
//!
//! ```text
//! kvm-vmm --snapshot mem.bin --socket fork.sock [--write-mib N] [--hold]
//! {"event":"handed_off","pid":1234}
//! {"event":"checksums","mib":[...]}
//! ```
//!
//! With `--hold` it then prints `{"event":"holding"}` and keeps the VM (and so its memory and
//! its fork) alive until stdin is closed. Errors print `{"event":"error","message":...}` and
//! exit with status 1. The guest and its checksum are described in `vmm_glue::kvm::guest`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_glue::events::{emit, exit_status};
use vmm_glue::kvm::guest::CHECKSUM_CHUNK;
use vmm_glue::kvm::ChecksumVm;
use vmm_glue::synthetic::{GuestMemory, RegionSpec};

/// Runs a KVM guest that checksums its pagerd-served memory.
#[derive(Debug, Parser)]
struct Args {
    /// The snapshot memory file (its size must be a whole number of MiB).
    #[arg(long)]
    snapshot: PathBuf,
    /// The page server's handoff socket.
    #[arg(long)]
    socket: PathBuf,
    /// Overwrite the first N MiB with the write pattern before checksumming.
    #[arg(long, default_value_t = 0)]
    write_mib: u64,
    /// After printing the checksums, keep the VM alive until stdin closes.
    #[arg(long)]
    hold: bool,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let size = std::fs::metadata(&args.snapshot)?.len();
    if size == 0 || size % CHECKSUM_CHUNK != 0 {
        return Err(
            format!("the snapshot's size ({size} bytes) is not a whole number of MiB").into(),
        );
    }
    let layout = [RegionSpec {
        size,
        file_offset: 0,
    }];
    let memory = GuestMemory::map_for_uffd(&args.snapshot, &layout, false, 0)?;
    let mut vm = ChecksumVm::new(&memory, args.write_mib)?;
    let _connection = memory.hand_off(&args.socket)?;
    emit(serde_json::json!({"event": "handed_off", "pid": std::process::id()}));
    let sums = vm.run()?;
    emit(serde_json::json!({"event": "checksums", "mib": sums}));
    if args.hold {
        emit(serde_json::json!({"event": "holding"}));
        std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_status("kvm-vmm", run(Args::parse()))
}
