//! The `pagerd` binary: parses the command line and runs the daemon.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match pagerd::run(pagerd::config::Config::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagerd: {e}");
            ExitCode::FAILURE
        }
    }
}
