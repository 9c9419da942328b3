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
//! including nested ones where KVM guests at CPL0 are emulated.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "QEMU";
/// The binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How long a QMP exchange or an incoming migration may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a QEMU call failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// No binary was found.
    #[error("no QEMU binary: give --qemu PATH, set $QEMU, or put qemu-system-x86_64 on PATH")]
    NotFound,
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

/// The QEMU binary: `explicit`, else `$QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, QemuError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os(QEMU_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").ok_or(QemuError::NotFound)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| candidate.is_file())
        .ok_or(QemuError::NotFound)
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
}
