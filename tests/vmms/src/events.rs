//! The event lines VMM binaries print: one JSON object per line on stdout, flushed at once
//! so that a driver reading the pipe sees each event when it happens.

use std::io::Write;
use std::process::ExitCode;

/// Prints one event line.
pub fn emit(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Turns a binary's result into its exit status: on error, an `error` event, the message on
/// stderr (prefixed with the binary's `name`) and status 1.
pub fn exit_status(name: &str, result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(serde_json::json!({"event": "error", "message": e.to_string()}));
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
