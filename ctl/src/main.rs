//! `pagerctl`: the command-line client of pagerd's control socket.
//!
//! Every subcommand is one request; the answer is printed for people (default) or as the
//! daemon's JSON (`--json`). Exit status: 0 on success, 2 for a usage error, 3 to 7 for the
//! daemon's error codes (`not_found`, `conflict`, `invalid_argument`, `unavailable`,
//! `internal`; 5 also for a file that cannot be opened here), 8 when the daemon cannot be
//! reached, 9 when `status` finds it unhealthy. An error is one line on stderr,
//! `pagerctl: MESSAGE (CODE)`, or with `--json` goes to stdout as `{"error": {...}}`.

mod completions;
mod each;
mod failure;
mod import;
mod manual;
mod notes;
mod render;
mod table;
mod top;
mod units;
mod upgrade;
mod values;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory, Parser, Subcommand};
use proto::client::{Client, ClientError};
use proto::control::{SnapshotExport, SnapshotImport, VmDelete};
use proto::model::{ForkState, NetworkOverride, VmBackend, VmState, VmmKind};
use proto::prefetch::Prefetch;
use proto::{ForkId, SnapshotId, VmId};
use serde::Serialize;
use serde_json::Value;

/// Exit status of `status` when the daemon is unhealthy.
const EXIT_UNHEALTHY: u8 = 9;
/// The environment variable that sets `--timeout`.
const TIMEOUT_ENV: &str = "PAGERD_TIMEOUT";

/// A positive number of seconds, as `--timeout` takes it.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let seconds: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("the timeout must be more than 0 seconds".into());
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// Manage pagerd's snapshots and forks.
#[derive(Debug, Parser)]
#[command(name = "pagerctl", version, about)]
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
    /// How long to wait for the daemon's answer to a call, in seconds (fractions allowed);
    /// `fork wait`, `vm wait` and `vm stop` add their own timeout to it.
    #[arg(
        long,
        env = TIMEOUT_ENV,
        default_value = "30",
        value_name = "SECONDS",
        value_parser = parse_seconds,
        global = true
    )]
    timeout: Duration,
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
    /// A live view of forks, file users and VMs, the busiest forks first; fits the
    /// terminal, `q` quits. Writing to a pipe or a file it prints plain frames.
    Top {
        /// How often to refresh, in ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many frames [default: until `q`, or interrupted].
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (pagerctl.1 and one per subcommand) into a directory (used by
    /// packaging).
    #[command(hide = true)]
    Man {
        /// The directory.
        dir: PathBuf,
    },
    /// VMs pagerd launches from snapshots and supervises.
    #[command(subcommand)]
    Vm(VmCommand),
    /// The daemon itself.
    #[command(subcommand)]
    Daemon(DaemonCommand),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Start a hypervisor restored from a snapshot saved with its device state (--vmstate),
    /// its memory served by pagerd.
    Start {
        /// Snapshot id.
        snapshot: SnapshotId,
        /// VM id [default: generated].
        #[arg(long)]
        id: Option<VmId>,
        /// Where guest memory comes from: `uffd` (a fork pagerd serves page by page) or
        /// `file` (pagerd's FUSE memory file, mapped privately).
        #[arg(long, default_value = "uffd", value_parser = values::one_of::<VmBackend>())]
        backend: VmBackend,
        /// Give the snapshot's network interface IFACE the host tap device TAPDEV in this
        /// clone. Repeatable.
        #[arg(long = "tap", value_name = "IFACE=TAPDEV", value_parser = parse_tap)]
        taps: Vec<NetworkOverride>,
        /// The vsock Unix socket path for this clone.
        #[arg(long)]
        vsock: Option<PathBuf>,
        /// What its uffd fork gets installed before the guest asks: off, working_set,
        /// graduate [default: the daemon's --prefetch].
        #[arg(long, value_parser = values::one_of::<Prefetch>())]
        prefetch: Option<Prefetch>,
    },
    /// List VMs.
    Ls,
    /// Show one VM: state, hypervisor pid, fork, backend, API socket and console log.
    Get {
        /// VM id.
        id: VmId,
    },
    /// Stop a VM: SIGTERM, then SIGKILL after the timeout.
    Stop {
        /// VM id.
        id: VmId,
        /// How long to wait after SIGTERM before SIGKILL, in ms.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Wait until a VM reaches a state (or a later one).
    Wait {
        /// VM id.
        id: VmId,
        /// starting, running, exited or failed.
        #[arg(value_parser = values::one_of::<VmState>())]
        state: VmState,
        /// How long to wait at most, in ms.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Delete exited or failed VMs: their records and directories (console logs included);
    /// their ids are free again. A running VM is refused: stop it first. Every id is tried;
    /// the exit status is the first failure's.
    Rm {
        /// VM ids.
        #[arg(required = true)]
        ids: Vec<VmId>,
    },
    /// Save a running VM as a new snapshot (pause, full snapshot, register), then leave it
    /// paused unless --resume.
    Snapshot {
        /// VM id.
        id: VmId,
        /// The new snapshot's id.
        #[arg(long = "id", value_name = "NEW")]
        new: SnapshotId,
        /// Resume the VM afterwards.
        #[arg(long)]
        resume: bool,
    },
}

fn parse_tap(s: &str) -> Result<NetworkOverride, String> {
    let (iface, tap) = s.split_once('=').ok_or("expected IFACE=TAPDEV")?;
    if iface.is_empty() || tap.is_empty() {
        return Err("expected IFACE=TAPDEV".into());
    }
    Ok(NetworkOverride {
        iface_id: iface.into(),
        host_dev_name: tap.into(),
    })
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Replace the daemon's program in place (same pid) without losing a fork, then wait until
    /// the new program serves and print its version. Serving pauses while the new program
    /// starts and takes every live VMM's uffd back; control requests made meanwhile wait and
    /// are answered by the new program (none fails).
    Upgrade {
        /// The new pagerd binary (absolute, or relative to the current directory)
        /// [default: the binary the daemon was started from].
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long to wait for the new program to serve, in ms (exit 8 if it does not).
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Register a memory file as a snapshot: copied into the state directory (a reflink where
    /// the filesystem can) and never modified afterwards. The file is opened here and passed
    /// to pagerd as a descriptor, so only files this user can read can be registered.
    Add {
        /// Snapshot id.
        id: SnapshotId,
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
        /// The hypervisor's device state saved with the memory (copied in, mode as the
        /// memory's), so `pagerctl vm start` can restore it. Needs --vmm.
        #[arg(long, requires = "vmm")]
        vmstate: Option<PathBuf>,
        /// The hypervisor --vmstate is for: firecracker or qemu.
        #[arg(long, requires = "vmstate", value_parser = values::one_of::<VmmKind>())]
        vmm: Option<VmmKind>,
        /// Return as soon as pagerd has the snapshot (`importing`), not when its copy is done:
        /// pagerd finishes the import by itself (`snapshot get` shows its progress).
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a snapshot; refused while forks reference it, unless deferred.
    Rm {
        /// Snapshot id.
        id: SnapshotId,
        /// If forks reference it, delete it when the last one ends.
        #[arg(long)]
        defer: bool,
        /// Delete a damaged snapshot (still refused while forks or processes use it).
        #[arg(long)]
        force: bool,
    },
    /// List snapshots.
    Ls,
    /// Show one snapshot, with its working set.
    Get {
        /// Snapshot id.
        id: SnapshotId,
    },
    /// Record the snapshot's working set from its next uffd forks (the pages touched by more
    /// than half of them, in rough first-touch order); the new set replaces the stored one.
    Record {
        /// Snapshot id.
        id: SnapshotId,
        /// How many forks to record (1 to 16).
        #[arg(long, default_value_t = 1)]
        forks: u32,
    },
    /// Delete the snapshot's stored working set (forks are served on demand until a new one
    /// is recorded).
    ClearWorkingSet {
        /// Snapshot id.
        id: SnapshotId,
    },
    /// Write a snapshot to a directory (created if missing, holding no export yet): its
    /// memory (only pages holding data), device state and working set, with a manifest of
    /// their digests. A backup that `snapshot import` restores, here or on another host.
    /// Root and pagerd's own user only.
    Export {
        /// Snapshot id.
        id: SnapshotId,
        /// The directory.
        dir: PathBuf,
    },
    /// Register the snapshot exported to a directory, once every file matches its digest.
    /// Root and pagerd's own user only.
    Import {
        /// The directory `snapshot export` wrote.
        dir: PathBuf,
        /// The new snapshot's id [default: the id it was exported as].
        #[arg(long)]
        id: Option<SnapshotId>,
    },
}

#[derive(Debug, Subcommand)]
enum ForkCommand {
    /// Create a fork of a snapshot and print the handoff socket to give its VMM.
    Create {
        /// Snapshot id.
        snapshot: SnapshotId,
        /// Fork id [default: generated].
        #[arg(long)]
        id: Option<ForkId>,
        /// What to install before the guest asks: off, working_set (the snapshot's recorded
        /// working set), graduate (then every other page, after which the fork needs nothing
        /// more from pagerd) [default: the daemon's --prefetch].
        #[arg(long, value_parser = values::one_of::<Prefetch>())]
        prefetch: Option<Prefetch>,
    },
    /// List forks and processes holding memory files.
    Ls,
    /// Show one fork with its counters, end reason and last refused handoff.
    Get {
        /// Fork id.
        id: ForkId,
    },
    /// Wait until a fork reaches a state (`serving` is also satisfied by `ended`).
    Wait {
        /// Fork id.
        id: ForkId,
        /// The state to wait for: waiting, serving, ended or detached.
        #[arg(value_parser = values::one_of::<ForkState>())]
        state: ForkState,
        /// How long to wait at most, in ms.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Stop serving forks and forget them. Every id is tried; the exit status is the first
    /// failure's.
    Close {
        /// Fork ids.
        #[arg(required = true)]
        ids: Vec<ForkId>,
    },
}

/// What a command printed and how it ends.
struct Outcome {
    json: Value,
    text: String,
    exit: u8,
    /// A remark for the person, printed on stderr whatever the format.
    note: Option<String>,
}

/// `path` made absolute against the current directory (the daemon resolves nothing).
fn absolute(path: &std::path::Path) -> Result<PathBuf, ClientError> {
    std::path::absolute(path).map_err(|source| ClientError::Open {
        path: path.to_owned(),
        source,
    })
}

fn done<T: Serialize>(result: &T, text: String) -> Outcome {
    Outcome {
        json: serde_json::to_value(result).unwrap_or(Value::Null),
        text,
        exit: 0,
        note: None,
    }
}

/// Writes the manual page or a completion script; these need no daemon.
fn local(command: &Command) -> Option<std::io::Result<()>> {
    match command {
        Command::Completions { shell } => Some(completions::write(
            *shell,
            Cli::command(),
            &mut std::io::stdout(),
        )),
        Command::Man { dir } => Some(manual::write_pages(Cli::command(), dir).map(drop)),
        _ => None,
    }
}

fn run(cli: &Cli) -> Result<Outcome, ClientError> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| proto::defaults::control_socket(&cli.state_dir));
    let client = Client::new(&socket).with_timeout(cli.timeout);
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
        Command::Snapshot(SnapshotCommand::Add {
            id,
            path,
            link,
            vmstate,
            vmm,
            no_wait,
        }) => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let bundle = vmstate
                .as_ref()
                .zip(*vmm)
                .map(|(v, vmm)| (std::path::absolute(v).unwrap_or_else(|_| v.clone()), vmm));
            let (registrar, registered, link) = (client.clone(), id.clone(), *link);
            let register = move || match bundle {
                Some((vmstate, vmm)) => {
                    registrar.register_bundle(&registered, &path, &vmstate, vmm, link)
                }
                None => registrar.register_snapshot(&registered, &path, link),
            };
            // An id already taken is refused by the registration itself, not shown as added.
            let r = if client.snapshot(id).is_ok() {
                register()?
            } else {
                let show = !cli.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
                import::watch(&client, id, *no_wait, show, register)?
            };
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
            done(&r, render::snapshot(&r))
        }
        Command::Snapshot(SnapshotCommand::Record { id, forks }) => {
            let r = client.record_working_set(id, Some(*forks))?;
            done(&r, render::snapshot(&r))
        }
        Command::Snapshot(SnapshotCommand::ClearWorkingSet { id }) => {
            let r = client.clear_working_set(id)?;
            done(&r, render::snapshot(&r))
        }
        Command::Snapshot(SnapshotCommand::Export { id, dir }) => {
            let r = client.call(SnapshotExport {
                snapshot: id.clone(),
                dir: absolute(dir)?,
            })?;
            let text = format!(
                "exported {} to {} ({} bytes of memory, blake3 {}{}{})",
                r.snapshot,
                r.dir.display(),
                r.size,
                r.blake3,
                if r.vmstate { ", device state" } else { "" },
                if r.working_set { ", working set" } else { "" },
            );
            done(&r, text)
        }
        Command::Snapshot(SnapshotCommand::Import { dir, id }) => {
            let r = client.call(SnapshotImport {
                dir: absolute(dir)?,
                snapshot: id.clone(),
            })?;
            done(&r, render::snapshot(&r))
        }
        Command::Fork(ForkCommand::Create {
            snapshot,
            id,
            prefetch,
        }) => {
            let r =
                client.create_fork_with(snapshot, id.as_ref().map(ForkId::as_str), *prefetch)?;
            let mut outcome = done(&r, format!("{}\n", r.handoff_socket.display()));
            outcome.note = notes::graduation(&client, &r);
            outcome
        }
        Command::Fork(ForkCommand::Ls) => {
            let r = client.forks()?;
            done(&r, render::fork_table(&r))
        }
        Command::Fork(ForkCommand::Get { id }) => {
            let r = client.fork(id)?;
            let note = notes::graduation(&client, &r);
            done(&r, render::fork(&r, note.as_deref(), SystemTime::now()))
        }
        Command::Fork(ForkCommand::Wait {
            id,
            state,
            timeout_ms,
        }) => {
            let r = client.wait_fork(id, *state, Duration::from_millis(*timeout_ms))?;
            let note = notes::graduation(&client, &r);
            done(&r, render::fork(&r, note.as_deref(), SystemTime::now()))
        }
        Command::Fork(ForkCommand::Close { ids }) => each::id(
            ids,
            |id| client.close_fork(id),
            |fork| format!("closed {}\n", fork.id),
            &cli.report(),
        )?,
        Command::Top {
            interval_ms,
            iterations,
        } => {
            let interval = Duration::from_millis(*interval_ms);
            match top::run(&client, interval, *iterations, &cli.report()) {
                Ok(()) => done(&Value::Null, String::new()),
                Err(top::Error::Daemon(e)) => return Err(e),
                Err(top::Error::Terminal(e)) => {
                    eprintln!("pagerctl: cannot drive the terminal: {e}");
                    let mut outcome = done(&Value::Null, String::new());
                    outcome.exit = 1;
                    outcome
                }
            }
        }
        Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("answered without the daemon")
        }
        Command::Vm(VmCommand::Start {
            snapshot,
            id,
            backend,
            taps,
            vsock,
            prefetch,
        }) => {
            let vsock = vsock
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
            let r = client.start_vm_with(
                snapshot,
                id.as_ref().map(VmId::as_str),
                *backend,
                taps.clone(),
                vsock,
                *prefetch,
            )?;
            done(&r, render::vm(&r))
        }
        Command::Vm(VmCommand::Ls) => {
            let r = client.vms()?;
            done(&r, render::vm_table(&r))
        }
        Command::Vm(VmCommand::Get { id }) => {
            let r = client.vm(id)?;
            done(&r, render::vm(&r))
        }
        Command::Vm(VmCommand::Stop { id, timeout_ms }) => {
            let r = client.stop_vm(id, Some(Duration::from_millis(*timeout_ms)))?;
            done(&r, render::vm(&r))
        }
        Command::Vm(VmCommand::Wait {
            id,
            state,
            timeout_ms,
        }) => {
            let r = client.wait_vm(id, *state, Duration::from_millis(*timeout_ms))?;
            done(&r, render::vm(&r))
        }
        Command::Vm(VmCommand::Rm { ids }) => each::id(
            ids,
            |id| proto::client::parse_id(id).and_then(|vm| client.call(VmDelete { vm })),
            |vm| format!("deleted {}\n", vm.id),
            &cli.report(),
        )?,
        Command::Vm(VmCommand::Snapshot { id, new, resume }) => {
            let r = client.snapshot_vm(id, new, *resume)?;
            done(&r, render::snapshot_table(std::slice::from_ref(&r)))
        }
        Command::Daemon(DaemonCommand::Upgrade { binary, timeout_ms }) => {
            let binary = binary
                .as_ref()
                .map(|b| std::path::absolute(b).unwrap_or_else(|_| b.clone()));
            let r = upgrade::run(&client, binary, Duration::from_millis(*timeout_ms))?;
            done(&r, r.text())
        }
    })
}

impl Cli {
    /// How this invocation reports a failed call.
    fn report(&self) -> failure::Report {
        failure::Report {
            json: self.json,
            timeout: self.timeout,
        }
    }
}

/// Writes to stdout; a reader that went away early (`pagerctl … | grep -q`) is not an error.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(result) = local(&cli.command) {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pagerctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(outcome) => {
            if cli.json && !outcome.json.is_null() {
                let json = serde_json::to_string_pretty(&outcome.json).unwrap_or_default();
                emit(&format!("{json}\n"));
            } else {
                emit(&outcome.text);
            }
            if let Some(note) = outcome.note {
                eprintln!("pagerctl: note: {note}");
            }
            ExitCode::from(outcome.exit)
        }
        Err(e) => {
            cli.report().print(&e);
            ExitCode::from(failure::exit_code(&e))
        }
    }
}
