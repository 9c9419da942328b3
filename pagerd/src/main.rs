//! The `pagerd` binary: parses the command line and runs the daemon.

use std::process::ExitCode;

use clap::Parser;

/// This file's name as a pagerd binary, read by an upgrade before it executes the file.
#[used]
#[link_section = ".pagerd_version"]
static VERSION_NOTE: [u8; pagerd::VERSION_NOTE.len()] = note_bytes(pagerd::VERSION_NOTE);

/// `text` as an array, for a static.
const fn note_bytes<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

fn main() -> ExitCode {
    // A reference the linker sees, so that it keeps the section.
    std::hint::black_box(&VERSION_NOTE);
    match pagerd::run(pagerd::config::Config::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagerd: {e}");
            ExitCode::FAILURE
        }
    }
}
