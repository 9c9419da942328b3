//! `ctl`: the command-line client of pagerd's control socket.
//!
//! Every subcommand is one request; the answer is printed as a table (default) or as the
//! daemon's JSON (`--json`). On failure the error chain goes to stderr, numbered, and the exit
//! status is 1.

mod client;
mod table;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use client::Client;
use serde_json::{json, Value};

/// Manage pagerd's snapshots and forks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The control socket.
    #[arg(
        long,
        env = "PAGERD_SOCKET",
        default_value = "/run/pagerd/control.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print the daemon's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon health, version and counts.
    Status,
    /// Serving counters summed over every fork.
    Stats,
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Forks.
    #[command(subcommand)]
    Fork(ForkCommand),
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
    Show {
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
    /// List forks.
    Ls,
    /// Show one fork with its counters.
    Show {
        /// Fork id.
        id: String,
    },
    /// Wait until a fork reaches a state (`serving` is also satisfied by `ended`).
    Wait {
        /// Fork id.
        id: String,
        /// The state to wait for.
        #[arg(value_parser = ["waiting", "serving", "ended", "detached"])]
        state: String,
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

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fork_rows(forks: &[Value]) -> String {
    let rows: Vec<Vec<String>> = forks
        .iter()
        .map(|f| {
            let s = &f["stats"];
            let pid = if f["kind"] == "file" {
                &f["pid"]
            } else {
                &f["vmm_pid"]
            };
            vec![
                text(&f["id"]),
                text(&f["kind"]),
                text(&f["snapshot"]),
                text(&f["state"]),
                text(pid),
                text(&s["faults"]),
                text(&s["pages_copied"]),
                text(&s["zero_pages"]),
                text(&s["latency_ns"]["p99"]),
                text(&f["handoff_socket"]),
            ]
        })
        .collect();
    table::render(
        &[
            "ID", "KIND", "SNAPSHOT", "STATE", "PID", "FAULTS", "COPIED", "ZERO", "P99_NS",
            "SOCKET",
        ],
        &rows,
    )
}

fn snapshot_rows(snapshots: &[Value]) -> String {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                text(&s["id"]),
                text(&s["size"]),
                text(&s["zero_pages"]),
                s["ref_count"]
                    .as_u64()
                    .map_or("?".into(), |n| n.to_string()),
                if s["delete_pending"] == Value::Bool(true) {
                    "delete-pending".into()
                } else {
                    text(&s["error"])
                },
                text(&s["path"]),
            ]
        })
        .collect();
    table::render(&["ID", "SIZE", "ZERO_PAGES", "REFS", "NOTE", "PATH"], &rows)
}

/// Opens a memory file to pass to pagerd, refusing a symlink as pagerd does.
fn open_memory_file(path: &std::path::Path) -> Result<std::fs::File, client::ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|source| {
            let source = if source.raw_os_error() == Some(nix::libc::ELOOP) {
                std::io::Error::new(source.kind(), "is a symlink; pass the target")
            } else {
                source
            };
            client::ClientError::Open {
                path: path.to_owned(),
                source,
            }
        })
}

fn run(cli: &Cli) -> Result<String, client::ClientError> {
    let client = Client::new(&cli.socket);
    let call = |op: &str, args: Value| client.request(op, args, Duration::ZERO);
    let (result, human) = match &cli.command {
        Command::Status => {
            let r = call("status", Value::Null)?;
            let h = format!(
                "pagerd {} (pid {}), up {} ms, {} workers, {}\nsnapshots: {}\nforks: {} waiting, {} serving, {} detached, {} ended\n",
                text(&r["version"]),
                text(&r["pid"]),
                text(&r["uptime_ms"]),
                text(&r["workers"]),
                if r["healthy"] == Value::Bool(true) { "healthy" } else { "UNHEALTHY (see --json)" },
                text(&r["snapshots"]),
                text(&r["forks"]["waiting"]),
                text(&r["forks"]["serving"]),
                text(&r["forks"]["detached"]),
                text(&r["forks"]["ended"]),
            );
            (r, h)
        }
        Command::Stats => {
            let r = call("stats", Value::Null)?;
            let t = &r["totals"];
            let h = format!(
                "forks: {}\nfaults: {}\npages copied: {} ({} bytes)\nzero pages: {}\nremoves: {}\nerrors: {}\n",
                text(&r["forks"]),
                text(&t["faults"]),
                text(&t["pages_copied"]),
                text(&t["bytes_copied"]),
                text(&t["zero_pages"]),
                text(&t["removes"]),
                text(&t["errors"]),
            );
            (r, h)
        }
        Command::Snapshot(SnapshotCommand::Add { id, path, link }) => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let file = open_memory_file(&path)?;
            let args = json!({"snapshot": id, "path": path, "fd": true, "link": link});
            let r = client.request_with_fd(
                "snapshot.register",
                args,
                Some(file.as_fd()),
                Duration::ZERO,
            )?;
            let h = snapshot_rows(std::slice::from_ref(&r));
            (r, h)
        }
        Command::Snapshot(SnapshotCommand::Rm { id, defer, force }) => {
            let r = call(
                "snapshot.delete",
                json!({"snapshot": id, "defer": defer, "force": force}),
            )?;
            let h = if r["deleted"] == Value::Bool(true) {
                format!("deleted {id}\n")
            } else {
                format!(
                    "{id} will be deleted when its forks end: {} (and processes holding its memory file: {})\n",
                    text(&r["forks"]),
                    text(&r["file_users"])
                )
            };
            (r, h)
        }
        Command::Snapshot(SnapshotCommand::Ls) => {
            let r = call("snapshot.list", Value::Null)?;
            let h = snapshot_rows(r.as_array().map_or(&[], Vec::as_slice));
            (r, h)
        }
        Command::Snapshot(SnapshotCommand::Show { id }) => {
            let r = call("snapshot.get", json!({"snapshot": id}))?;
            let h = snapshot_rows(std::slice::from_ref(&r));
            (r, h)
        }
        Command::Fork(ForkCommand::Create { snapshot, id }) => {
            let mut args = json!({"snapshot": snapshot});
            if let Some(id) = id {
                args["fork"] = json!(id);
            }
            let r = call("fork.create", args)?;
            let h = format!("{}\n", text(&r["handoff_socket"]));
            (r, h)
        }
        Command::Fork(ForkCommand::Ls) => {
            let r = call("fork.list", Value::Null)?;
            let h = fork_rows(r.as_array().map_or(&[], Vec::as_slice));
            (r, h)
        }
        Command::Fork(ForkCommand::Show { id }) => {
            let r = call("fork.get", json!({"fork": id}))?;
            let h = fork_rows(std::slice::from_ref(&r));
            (r, h)
        }
        Command::Fork(ForkCommand::Wait {
            id,
            state,
            timeout_ms,
        }) => {
            let args = json!({"fork": id, "state": state, "timeout_ms": timeout_ms});
            let r = client.request("fork.wait", args, Duration::from_millis(*timeout_ms))?;
            let h = fork_rows(std::slice::from_ref(&r));
            (r, h)
        }
        Command::Fork(ForkCommand::Close { id }) => {
            let r = call("fork.close", json!({"fork": id}))?;
            let h = format!("closed {}\n", text(&r["id"]));
            (r, h)
        }
    };
    Ok(if cli.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        )
    } else {
        human
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ctl: error");
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            let mut n = 0;
            while let Some(cause) = source {
                eprintln!("  {n}: {cause}");
                source = cause.source();
                n += 1;
            }
            ExitCode::FAILURE
        }
    }
}
