//! The `pagerd` binary: parses the command line and runs the daemon.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = pagerd::config::Config::parse();
    pagerd::daemon::init_logging(&config.log);
    match pagerd::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagerd: {}", pagerd::errors::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
