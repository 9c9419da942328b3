//! `fc-fixture`: makes the tiny Firecracker guest's snapshot that demos and benchmarks launch
//! VMs from, and copies its memory file and device state into `--out`.
//!
//! ```text
//! fc-fixture --out DIR      # prints {"memory": "DIR/memory", "vmstate": "DIR/vmstate"}
//! ```
//!
//! The guest fills 8 MiB of its memory, then checks it in a loop, printing `OK` on its serial
//! console after each pass (`testkit::firecracker`). Firecracker comes from `$FIRECRACKER`,
//! `PATH`, or the vendored binaries beside the workspace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Makes the guest snapshot.
#[derive(Debug, Parser)]
struct Args {
    /// Where the memory file and device state go.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fixture = match testkit::firecracker::fixture() {
        Ok(f) => f,
        Err(why) => {
            eprintln!("fc-fixture: cannot make the guest snapshot: {why}");
            return ExitCode::FAILURE;
        }
    };
    let (memory, vmstate) = (args.out.join("memory"), args.out.join("vmstate"));
    let copied = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::copy(&fixture.memory, &memory))
        .and_then(|_| std::fs::copy(&fixture.vmstate, &vmstate));
    if let Err(e) = copied {
        eprintln!(
            "fc-fixture: cannot copy the snapshot into {}: {e}",
            args.out.display()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        serde_json::json!({"memory": memory, "vmstate": vmstate})
    );
    ExitCode::SUCCESS
}
