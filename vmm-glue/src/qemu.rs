//! QEMU, restored from a migration stream with its RAM mapped from pagerd's FUSE view.
//!
//! ```text
//! source (makes the bundle): RAM = memory-backend-file,mem-path=MEMORY,share=on
//!   QMP stop ─▶ migrate-set-capabilities x-ignore-shared ─▶ migrate file:VMSTATE
//!   (shared, file-backed RAM is left out of the stream: MEMORY is the snapshot's memory)
//! clone:  qemu-system-x86_64 [machine] -object memory-backend-file,id=mem,
//!           mem-path=FUSE_FILE,share=off,readonly=on,rom=off -incoming defer -qmp unix:QMP
//!   QMP migrate-set-capabilities x-ignore-shared ─▶ migrate-incoming file:VMSTATE
//!   ─▶ query-migrate until completed ─▶ cont
//! ```
//!
//! `share=off,readonly=on,rom=off` (QEMU >= 8.2) opens the file read-only and maps it
//! `MAP_PRIVATE` as writable RAM: unwritten pages come from the (shared) page cache, writes
//! stay in the clone. The machine ([`machine_args`]) must be the same on both sides, so the
//! bundle's maker and pagerd take it from here. TCG is used: it works on every host,
//! including nested ones where KVM guests at CPL0 are emulated. [`Qemu`] is its
//! [`Hypervisor`]: clones from the FUSE view only, no per-clone devices, no `vm.snapshot`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::model::VmmKind;
use serde_json::{json, Value};

use crate::binary::BinaryLookup;
use crate::hypervisor::{Capabilities, Hypervisor, HypervisorError, Launch, Restore, Snapshots};
use crate::ready::NotReady;

/// The environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "QEMU";
/// The binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Where the QEMU binary is looked for.
pub const BINARY: BinaryLookup = BinaryLookup {
    display_name: "QEMU",
    option: "--qemu",
    env: QEMU_ENV,
    file_name: QEMU_BINARY,
};

/// How long a QMP exchange or an incoming migration may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a QEMU call failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The QMP socket never accepted a connection.
    #[error("cannot reach QEMU's QMP socket {}", socket.display())]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// The last attempt's error.
        #[source]
        source: std::io::Error,
    },
    /// The process ended before its QMP socket answered.
    #[error("QEMU ended before its QMP socket {} came up", socket.display())]
    Ended {
        /// The socket.
        socket: PathBuf,
    },
    /// Talking to QMP failed.
    #[error("QMP on {}", socket.display())]
    Io {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QMP answered an error.
    #[error("QMP {command} failed: {message}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's explanation.
        message: String,
    },
    /// The incoming migration failed or did not finish.
    #[error("the incoming migration ended as {0}")]
    Migration(String),
}

impl QemuError {
    /// Whether QEMU refused the device state it was asked to restore as bad input: the
    /// incoming migration ended `failed` (a QEMU that exits on it instead is reported by its
    /// exit status and output).
    pub fn rejected_snapshot(&self) -> bool {
        matches!(self, Self::Migration(status) if status.starts_with("failed"))
    }
}

/// How guest RAM maps the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamMapping {
    /// `share=on`: the source VM writes its RAM into the file (making a bundle).
    Shared,
    /// `share=off,readonly=on,rom=off`: a clone maps the file privately.
    Private,
}

/// A path in a QEMU option value (commas doubled).
fn option_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The machine every bundle is made with and restored into: `pc` under TCG, RAM the
/// `size`-byte file `memory`, no default devices, COM1 on stdout, QMP on `qmp`.
pub fn machine_args(memory: &Path, size: u64, mapping: RamMapping, qmp: &Path) -> Vec<String> {
    let sharing = match mapping {
        RamMapping::Shared => "share=on",
        RamMapping::Private => "share=off,readonly=on,rom=off",
    };
    vec![
        "-machine".into(),
        "pc,accel=tcg,memory-backend=mem".into(),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={size},mem-path={},{sharing}",
            option_path(memory)
        ),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", option_path(qmp)),
    ]
}

/// The arguments of a clone waiting for its device state (`-incoming defer`).
pub fn clone_args(memory: &Path, size: u64, qmp: &Path) -> Vec<String> {
    let mut args = machine_args(memory, size, RamMapping::Private, qmp);
    args.extend(["-incoming".into(), "defer".into()]);
    args
}

/// A QMP connection, capabilities negotiated.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QMP on `socket` and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path) -> Result<Self, QemuError> {
        let io = |source| QemuError::Io {
            socket: socket.to_owned(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Self {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QemuError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QemuError::Io {
                socket: self.socket.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QemuError::Io {
            socket: self.socket.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Runs one command and returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let line = json!({"execute": command, "arguments": arguments}).to_string() + "\n";
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QemuError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        loop {
            let mut answer = self.read()?;
            if let Some(value) = answer.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = answer.get("error") {
                return Err(QemuError::Refused {
                    command: command.into(),
                    message: error["desc"].as_str().unwrap_or("?").into(),
                });
            }
        }
    }

    /// Turns on `x-ignore-shared` (RAM in shared files is not in the stream).
    pub fn ignore_shared(&mut self) -> Result<(), QemuError> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        )
        .map(drop)
    }

    /// Waits until the current migration (either way) has completed.
    pub fn wait_migration(&mut self) -> Result<(), QemuError> {
        let end = Instant::now() + QMP_TIMEOUT;
        loop {
            let state = self.execute("query-migrate", json!({}))?;
            match state["status"].as_str() {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = state["error-desc"].as_str().unwrap_or("");
                    return Err(QemuError::Migration(format!("{status} {why}")));
                }
                status if Instant::now() >= end => {
                    return Err(QemuError::Migration(format!(
                        "{} after {QMP_TIMEOUT:?}",
                        status.unwrap_or("unknown")
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Saves the paused VM's device state to `vmstate` (RAM in the shared file excluded).
    pub fn save(&mut self, vmstate: &Path) -> Result<(), QemuError> {
        self.execute("stop", json!({}))?;
        self.ignore_shared()?;
        let uri = format!("file:{}", vmstate.display());
        self.execute("migrate", json!({ "uri": uri }))?;
        self.wait_migration()
    }

    /// Restores a clone started with [`clone_args`] from `vmstate` and lets it run.
    pub fn restore(&mut self, vmstate: &Path) -> Result<(), QemuError> {
        self.ignore_shared()?;
        let uri = format!("file:{}", vmstate.display());
        self.execute("migrate-incoming", json!({ "uri": uri }))?;
        self.wait_migration()?;
        self.execute("cont", json!({})).map(drop)
    }
}

/// QEMU as pagerd launches it: RAM the FUSE memory file, mapped privately, on the command
/// line; device state restored over QMP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qemu;

impl Hypervisor for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn binary(&self) -> &'static BinaryLookup {
        &BINARY
    }

    fn capabilities(&self) -> Capabilities {
        // It takes its memory from the FUSE view only; no per-clone devices yet.
        Capabilities {
            uffd_backend: false,
            device_overrides: false,
            jailer: false,
        }
    }

    fn control_socket_name(&self) -> &'static str {
        "qmp.sock"
    }

    fn log_file_name(&self) -> Option<&'static str> {
        None
    }

    fn command(&self, launch: &Launch<'_>) -> Command {
        let mut command = Command::new(launch.binary);
        command.args(clone_args(
            launch.memory,
            launch.memory_size,
            launch.control_socket,
        ));
        command
    }

    fn wait_ready(
        &self,
        socket: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), HypervisorError> {
        let socket = socket.to_owned();
        crate::ready::wait_accepting(&socket, timeout, alive).map_err(|e| {
            HypervisorError::Qemu(match e {
                NotReady::Ended => QemuError::Ended { socket },
                NotReady::TimedOut(source) => QemuError::NotReady { socket, source },
            })
        })
    }

    /// The memory is on the command line already; only the device state comes over QMP.
    fn restore(&self, socket: &Path, restore: &Restore<'_>) -> Result<(), HypervisorError> {
        Ok(Qmp::connect(socket)?.restore(restore.vmstate)?)
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        // A clone's RAM is private, which `x-ignore-shared` does not leave out of the stream.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_map_the_file_privately_and_wait_for_their_state() {
        let args = clone_args(
            Path::new("/s/a,b/memory"),
            1 << 25,
            Path::new("/v/qmp.sock"),
        );
        let text = args.join(" ");
        assert!(text.contains(
            "memory-backend-file,id=mem,size=33554432,mem-path=/s/a,,b/memory,share=off,readonly=on,rom=off"
        ), "{text}");
        assert!(text.ends_with("-incoming defer"), "{text}");
        assert!(
            text.contains("unix:/v/qmp.sock,server=on,wait=off"),
            "{text}"
        );
        let source = machine_args(Path::new("/m"), 4096, RamMapping::Shared, Path::new("/q"));
        assert!(source.join(" ").contains("mem-path=/m,share=on"));
    }

    #[test]
    fn a_clone_maps_the_snapshots_file_and_listens_on_its_qmp_socket() {
        let launch = Launch {
            binary: Path::new("/usr/bin/qemu-system-x86_64"),
            id: "a",
            dir: Path::new("/state/vms/a"),
            control_socket: Path::new("/state/vms/a/qmp.sock"),
            memory: Path::new("/fuse/snapshots/s/memory"),
            memory_size: 4096,
        };
        let command = Qemu.command(&launch);
        assert_eq!(command.get_program(), "/usr/bin/qemu-system-x86_64");
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            clone_args(
                Path::new("/fuse/snapshots/s/memory"),
                4096,
                Path::new("/state/vms/a/qmp.sock")
            )
        );
        assert!(args
            .iter()
            .any(|a| a.contains("mem-path=/fuse/snapshots/s/memory,share=off")));
    }

    #[test]
    fn a_restore_negotiates_migrates_in_waits_and_continues() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut writer = conn.try_clone().unwrap();
            let mut reader = BufReader::new(conn);
            writer.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut commands = Vec::new();
            let mut queried = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    return commands;
                }
                let request: Value = serde_json::from_str(&line).unwrap();
                let command = request["execute"].as_str().unwrap().to_owned();
                let answer = match command.as_str() {
                    // Still running once, then done; an event in between is skipped.
                    "query-migrate" if queried == 0 => {
                        queried += 1;
                        "{\"event\": \"MIGRATION\"}\n{\"return\": {\"status\": \"active\"}}\n"
                    }
                    "query-migrate" => "{\"return\": {\"status\": \"completed\"}}\n",
                    _ => "{\"return\": {}}\n",
                };
                commands.push((command, request["arguments"].clone()));
                writer.write_all(answer.as_bytes()).unwrap();
            }
        });
        let restore = Restore {
            vmstate: Path::new("/s/vmstate"),
            backend: proto::model::VmBackend::File,
            memory: Path::new("/fuse/memory"),
            network_overrides: &[],
            vsock: None,
        };
        Qemu.restore(&socket, &restore).unwrap();
        let commands = server.join().unwrap();
        let names: Vec<_> = commands.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "migrate-set-capabilities",
                "migrate-incoming",
                "query-migrate",
                "query-migrate",
                "cont"
            ]
        );
        assert_eq!(commands[2].1, json!({"uri": "file:/s/vmstate"}));
        assert_eq!(
            commands[1].1["capabilities"][0],
            json!({"capability": "x-ignore-shared", "state": true})
        );
    }

    #[test]
    fn a_socket_that_never_comes_up_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let error = Qemu
            .wait_ready(&socket, Duration::from_secs(60), &mut || false)
            .unwrap_err();
        assert!(
            matches!(error, HypervisorError::Qemu(QemuError::Ended { .. })),
            "{error:?}"
        );
        let error = Qemu
            .wait_ready(&socket, Duration::ZERO, &mut || true)
            .unwrap_err();
        assert!(
            matches!(error, HypervisorError::Qemu(QemuError::NotReady { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn a_failed_incoming_migration_is_a_rejected_snapshot() {
        assert!(QemuError::Migration("failed bad stream".into()).rejected_snapshot());
        assert!(!QemuError::Migration("active after 30s".into()).rejected_snapshot());
        let ended = QemuError::Ended {
            socket: PathBuf::from("/q"),
        };
        assert!(!ended.rejected_snapshot());
    }
}
