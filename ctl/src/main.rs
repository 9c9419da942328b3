//! `pagerctl`: the command-line client of pagerd's control socket.
//!
//! Every subcommand is one request; the answer is printed for people (default) or as the
//! daemon's JSON (`--json`). Exit status: 0 on success, 2 for a usage error, 3 to 7 for the
//! daemon's error codes (`not_found`, `conflict`, `invalid_argument`, `unavailable`,
//! `internal`; 5 also for a file that cannot be opened here), 8 when the daemon cannot be
//! reached, 9 when `status` finds it unhealthy. Errors
//! go to stderr as a numbered chain, or with `--json` to stdout as `{"error": {...}}`.

mod render;
mod table;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto::client::{Client, ClientError};
use proto::control::ErrorCode;
use proto::model::ForkState;
use serde::Serialize;
use serde_json::Value;

/// Exit status when the daemon cannot be reached or answers nonsense.
const EXIT_UNREACHABLE: u8 = 8;
/// Exit status of `status` when the daemon is unhealthy.
const EXIT_UNHEALTHY: u8 = 9;

/// Manage pagerd's snapshots and forks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// pagerd's state directory; the control socket is STATE_DIR/control.sock unless
    /// --socket says otherwise.
    #[arg(
        long,
        env = proto::defaults::STATE_DIR_ENV,
        default_value = proto::defaults::STATE_DIR,
        global = true
    )]
    state_dir: PathBuf,
    /// The control socket [default: STATE_DIR/control.sock].
    #[arg(long, env = proto::defaults::SOCKET_ENV, global = true)]
    socket: Option<PathBuf>,
    /// Print the daemon's JSON instead of text (errors too, on stdout).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon health, version and counts; exits 9 when it is unhealthy.
    Status,
    /// Serving counters summed over every fork.
    Stats,
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Forks.
    #[command(subcommand)]
    Fork(ForkCommand),
    /// The daemon itself.
    #[command(subcommand)]
    Daemon(DaemonCommand),
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Replace the daemon's program in place (same pid) without losing a fork: serving pauses
    /// while the new program starts and takes every live VMM's uffd back. Control requests
    /// fail (the socket is gone) for that moment.
    Upgrade {
        /// The new pagerd binary (absolute, or relative to the current directory)
        /// [default: the binary the daemon was started from].
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Register a memory file as a snapshot: copied into the state directory (a reflink where
    /// the filesystem can) and never modified afterwards. The file is opened here and passed
    /// to pagerd as a descriptor, so only files this user can read can be registered.
    Add {
        /// Snapshot id.
        id: String,
        /// The memory file (relative paths are taken from the current directory; a symlink is
        /// refused: pass its target).
        path: PathBuf,
        /// Link the file instead of copying it (same filesystem as pagerd's state directory).
        /// The file must then never be written, truncated or replaced in place again while
        /// the snapshot exists: forks read it at any time. pagerd leaves its owner and modes
        /// alone and watches its size and times; a change (chmod, chown and adding or removing
        /// names included) marks the snapshot damaged and no new forks of it are made.
        #[arg(long)]
        link: bool,
    },
    /// Delete a snapshot; refused while forks reference it, unless deferred.
    Rm {
        /// Snapshot id.
        id: String,
        /// If forks reference it, delete it when the last one ends.
        #[arg(long)]
        defer: bool,
        /// Delete a damaged snapshot (still refused while forks or processes use it).
        #[arg(long)]
        force: bool,
    },
    /// List snapshots.
    Ls,
    /// Show one snapshot.
    Get {
        /// Snapshot id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ForkCommand {
    /// Create a fork of a snapshot and print the handoff socket to give its VMM.
    Create {
        /// Snapshot id.
        snapshot: String,
        /// Fork id [default: generated].
        #[arg(long)]
        id: Option<String>,
    },
    /// List forks and processes holding memory files.
    Ls,
    /// Show one fork with its counters, end reason and last refused handoff.
    Get {
        /// Fork id.
        id: String,
    },
    /// Wait until a fork reaches a state (`serving` is also satisfied by `ended`).
    Wait {
        /// Fork id.
        id: String,
        /// The state to wait for: waiting, serving, ended or detached.
        state: ForkState,
        /// How long to wait at most, in ms.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Stop serving a fork and forget it.
    Close {
        /// Fork id.
        id: String,
    },
}

/// What a command printed and how it ends.
struct Outcome {
    json: Value,
    text: String,
    exit: u8,
}

fn done<T: Serialize>(result: &T, text: String) -> Outcome {
    Outcome {
        json: serde_json::to_value(result).unwrap_or(Value::Null),
        text,
        exit: 0,
    }
}

fn run(cli: &Cli) -> Result<Outcome, ClientError> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| proto::defaults::control_socket(&cli.state_dir));
    let client = Client::new(&socket);
    Ok(match &cli.command {
        Command::Status => {
            let r = client.status()?;
            let mut outcome = done(&r, render::status(&r));
            if !r.healthy {
                outcome.exit = EXIT_UNHEALTHY;
            }
            outcome
        }
        Command::Stats => {
            let r = client.stats()?;
            done(&r, render::stats(&r))
        }
        Command::Snapshot(SnapshotCommand::Add { id, path, link }) => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let r = client.register_snapshot(id, &path, *link)?;
            done(&r, render::snapshot_table(std::slice::from_ref(&r)))
        }
        Command::Snapshot(SnapshotCommand::Rm { id, defer, force }) => {
            let r = client.delete_snapshot(id, *defer, *force)?;
            done(&r, render::deleted(&r))
        }
        Command::Snapshot(SnapshotCommand::Ls) => {
            let r = client.snapshots()?;
            done(&r, render::snapshot_table(&r))
        }
        Command::Snapshot(SnapshotCommand::Get { id }) => {
            let r = client.snapshot(id)?;
            done(&r, render::snapshot_table(std::slice::from_ref(&r)))
        }
        Command::Fork(ForkCommand::Create { snapshot, id }) => {
            let r = client.create_fork(snapshot, id.as_deref())?;
            done(&r, format!("{}\n", r.handoff_socket.display()))
        }
        Command::Fork(ForkCommand::Ls) => {
            let r = client.forks()?;
            done(&r, render::fork_table(&r))
        }
        Command::Fork(ForkCommand::Get { id }) => {
            let r = client.fork(id)?;
            done(&r, render::fork(&r))
        }
        Command::Fork(ForkCommand::Wait {
            id,
            state,
            timeout_ms,
        }) => {
            let r = client.wait_fork(id, *state, Duration::from_millis(*timeout_ms))?;
            done(&r, render::fork(&r))
        }
        Command::Fork(ForkCommand::Close { id }) => {
            let r = client.close_fork(id)?;
            done(&r, format!("closed {}\n", r.id))
        }
        Command::Daemon(DaemonCommand::Upgrade { binary }) => {
            let binary = binary
                .as_ref()
                .map(|b| std::path::absolute(b).unwrap_or_else(|_| b.clone()));
            let r = client.upgrade(binary)?;
            done(
                &r,
                format!(
                    "pagerd {} (pid {}) is executing {}\n",
                    r.version,
                    r.pid,
                    r.binary.display()
                ),
            )
        }
    })
}

/// The error code a failed call stands for: the daemon's, `invalid_argument` for a file that
/// cannot be opened here, or none when the daemon could not be reached.
fn error_code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Open { .. } => Some(ErrorCode::InvalidArgument),
        other => other.code(),
    }
}

/// The exit status for a failed call.
fn exit_code(e: &ClientError) -> u8 {
    error_code(e).map_or(EXIT_UNREACHABLE, ErrorCode::exit_code)
}

/// Prints a failed call: the numbered chain on stderr, or JSON on stdout.
fn report(e: &ClientError, json: bool) {
    if json {
        let error = match e {
            ClientError::Refused(refusal) => serde_json::to_value(refusal).unwrap_or(Value::Null),
            other => serde_json::json!({
                "code": error_code(other).map_or("unreachable", ErrorCode::as_str),
                "message": chain(other).join(": "),
            }),
        };
        println!("{}", serde_json::json!({ "error": error }));
        return;
    }
    eprintln!("pagerctl: error");
    for (n, cause) in chain(e).iter().enumerate() {
        eprintln!("  {n}: {cause}");
    }
}

fn chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut source = Some(e);
    while let Some(cause) = source {
        out.push(cause.to_string());
        source = cause.source();
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(outcome) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome.json).unwrap_or_default()
                );
            } else {
                print!("{}", outcome.text);
            }
            ExitCode::from(outcome.exit)
        }
        Err(e) => {
            report(&e, cli.json);
            ExitCode::from(exit_code(&e))
        }
    }
}
