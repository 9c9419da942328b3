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
//! With `--memory-file PATH` instead of `--socket`, guest memory is that file mapped
//! `MAP_PRIVATE` (Firecracker's `File` backend, e.g. pagerd's FUSE memory file) and the first
//! event is `{"event":"mapped","pid":1234}`.
//!
//! With `--hold` it then prints `{"event":"holding"}` and keeps the VM (and so its memory and
//! its fork) alive until stdin is closed. Errors print `{"event":"error","message":...}` and
//! exit with status 1. The guest and its checksum are described in `test_vmms::kvm::guest`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use test_vmms::events::{emit, exit_status};
use test_vmms::kvm::guest::CHECKSUM_CHUNK;
use test_vmms::kvm::ChecksumVm;
use test_vmms::synthetic::{GuestMemory, RegionSpec};

/// Runs a KVM guest that checksums its pagerd-served memory.
#[derive(Debug, Parser)]
struct Args {
    /// The snapshot memory file (its size must be a whole number of MiB).
    #[arg(long)]
    snapshot: PathBuf,
    /// The page server's handoff socket.
    #[arg(
        long,
        required_unless_present = "memory_file",
        conflicts_with = "memory_file"
    )]
    socket: Option<PathBuf>,
    /// Guest memory is this file mapped MAP_PRIVATE (no uffd, no page server socket).
    #[arg(long)]
    memory_file: Option<PathBuf>,
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
    let mut _connection = None;
    let mut vm;
    let memory;
    if let Some(file) = &args.memory_file {
        memory = GuestMemory::map_file(&args.snapshot, file, &layout)?;
        vm = ChecksumVm::new(&memory, args.write_mib)?;
        emit(serde_json::json!({"event": "mapped", "pid": std::process::id()}));
    } else {
        let socket = args
            .socket
            .as_deref()
            .ok_or("--socket or --memory-file is required")?;
        memory = GuestMemory::map_for_uffd(&args.snapshot, &layout, false, 0)?;
        vm = ChecksumVm::new(&memory, args.write_mib)?;
        _connection = Some(memory.hand_off(socket)?);
        emit(serde_json::json!({"event": "handed_off", "pid": std::process::id()}));
    }
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
