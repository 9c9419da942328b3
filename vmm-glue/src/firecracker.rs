//! Firecracker, started from a snapshot with its memory served by pagerd.
//!
//! ```text
//! firecracker --api-sock VMDIR/api.sock --id ID --log-path VMDIR/firecracker.log --level Warning
//!   stdout (the guest's COM1) ─▶ VMDIR/console.log
//! PUT /snapshot/load {"snapshot_path": VMSTATE,
//!                     "mem_backend": {"backend_type": "Uffd", "backend_path": HANDOFF_SOCKET}
//!                                  | {"backend_type": "File", "backend_path": FUSE_MEMORY_FILE},
//!                     "resume_vm": true, "network_overrides": [...], "vsock_override": {...}}
//! snapshot: PATCH /vm Paused ─▶ PUT /snapshot/create Full ─▶ [PATCH /vm Resumed]
//! ```
//!
//! [`Firecracker`] is its [`Hypervisor`]: the binary is found from an explicit path, then
//! `$FIRECRACKER`, then `PATH` ([`BINARY`]). [`Api`] speaks to the process's API socket with the
//! small client in [`crate::http`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use proto::model::{NetworkOverride, VmBackend, VmmKind};
use serde::Serialize;

use crate::binary::BinaryLookup;
use crate::hypervisor::{Capabilities, Hypervisor, HypervisorError, Launch, Restore, Snapshots};
use crate::ready::NotReady;

/// The API path that restores a snapshot.
const SNAPSHOT_LOAD: &str = "/snapshot/load";

/// The environment variable naming the Firecracker binary.
pub const FIRECRACKER_ENV: &str = "FIRECRACKER";

/// Where the Firecracker binary is looked for.
pub const BINARY: BinaryLookup = BinaryLookup {
    display_name: "firecracker",
    option: "--firecracker",
    env: FIRECRACKER_ENV,
    file_name: "firecracker",
};

/// Its log, in the VM's directory.
const LOG_FILE: &str = "firecracker.log";

/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a Firecracker call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// The API socket never answered.
    #[error("the API socket {} did not come up within {timeout:?}", socket.display())]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// How long it was given.
        timeout: Duration,
    },
    /// The process ended before its API socket answered.
    #[error("the process ended before its API socket {} came up", socket.display())]
    Ended {
        /// The socket.
        socket: PathBuf,
    },
    /// Talking to the API failed.
    #[error("{method} {path} failed")]
    Io {
        /// The method.
        method: &'static str,
        /// The path.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The API refused the request.
    #[error("{method} {path} answered {status}: {body}")]
    Refused {
        /// The method.
        method: &'static str,
        /// The path.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// Firecracker's explanation.
        body: String,
    },
}

impl FirecrackerError {
    /// Whether Firecracker refused the snapshot it was asked to load as bad input (`400` to
    /// `PUT /snapshot/load`: an unreadable or incompatible vmstate, a memory file that does
    /// not fit it), rather than failing itself.
    pub fn rejected_snapshot(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                method: "PUT",
                path: SNAPSHOT_LOAD,
                status: 400,
                ..
            }
        )
    }
}

/// The command starting a Firecracker process that waits on `api_socket` for a snapshot load.
/// Its log (warnings and worse) goes to `log_path`, which must exist; the caller wires
/// stdout (the guest console) and stderr.
pub fn command(binary: &Path, id: &str, api_socket: &Path, log_path: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--api-sock")
        .arg(api_socket)
        .arg("--id")
        .arg(id)
        .arg("--log-path")
        .arg(log_path)
        .arg("--level")
        .arg("Warning");
    cmd
}

#[derive(Debug, Serialize)]
struct MemBackend<'a> {
    backend_type: &'static str,
    backend_path: &'a Path,
}

#[derive(Debug, Serialize)]
struct VsockOverride<'a> {
    uds_path: &'a Path,
}

/// The body of `PUT /snapshot/load`.
#[derive(Debug, Serialize)]
pub struct LoadRequest<'a> {
    snapshot_path: &'a Path,
    mem_backend: MemBackend<'a>,
    resume_vm: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    network_overrides: &'a [NetworkOverride],
    #[serde(skip_serializing_if = "Option::is_none")]
    vsock_override: Option<VsockOverride<'a>>,
}

impl<'a> LoadRequest<'a> {
    /// Loads `vmstate` with memory from `memory`: a fork's handoff socket (`Uffd`) or a file
    /// to map (`File`), resumed at once.
    pub fn new(
        vmstate: &'a Path,
        backend: VmBackend,
        memory: &'a Path,
        network_overrides: &'a [NetworkOverride],
        vsock: Option<&'a Path>,
    ) -> Self {
        let backend_type = match backend {
            VmBackend::Uffd => "Uffd",
            VmBackend::File => "File",
        };
        Self {
            snapshot_path: vmstate,
            mem_backend: MemBackend {
                backend_type,
                backend_path: memory,
            },
            resume_vm: true,
            network_overrides,
            vsock_override: vsock.map(|uds_path| VsockOverride { uds_path }),
        }
    }
}

/// A Firecracker process's API.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    /// The API on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// Waits until the socket accepts connections, for at most `timeout`; `alive` is asked
    /// between attempts and ends the wait early when the process is gone.
    pub fn wait_ready(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<(), FirecrackerError> {
        let socket = self.socket.clone();
        crate::ready::wait_accepting(&self.socket, timeout, &mut alive).map_err(|e| match e {
            NotReady::Ended => FirecrackerError::Ended { socket },
            NotReady::TimedOut(_) => FirecrackerError::NotReady { socket, timeout },
        })
    }

    fn call(
        &self,
        method: &'static str,
        path: &'static str,
        body: &impl Serialize,
    ) -> Result<(), FirecrackerError> {
        let body = serde_json::to_string(body).map_err(|e| FirecrackerError::Io {
            method,
            path,
            source: io::Error::other(e),
        })?;
        let response = crate::http::request(&self.socket, method, path, Some(&body), API_TIMEOUT)
            .map_err(|source| FirecrackerError::Io {
            method,
            path,
            source,
        })?;
        if response.is_success() {
            Ok(())
        } else {
            Err(FirecrackerError::Refused {
                method,
                path,
                status: response.status,
                body: response.body,
            })
        }
    }

    /// `PUT /snapshot/load`.
    pub fn load(&self, request: &LoadRequest<'_>) -> Result<(), FirecrackerError> {
        self.call("PUT", SNAPSHOT_LOAD, request)
    }

    /// `PATCH /vm {"state":"Paused"}`.
    pub fn pause(&self) -> Result<(), FirecrackerError> {
        self.call("PATCH", "/vm", &serde_json::json!({"state": "Paused"}))
    }

    /// `PATCH /vm {"state":"Resumed"}`.
    pub fn resume(&self) -> Result<(), FirecrackerError> {
        self.call("PATCH", "/vm", &serde_json::json!({"state": "Resumed"}))
    }

    /// `PUT /snapshot/create` of a full snapshot: device state to `vmstate`, memory to
    /// `memory` (the VM must be paused).
    pub fn create_snapshot(&self, vmstate: &Path, memory: &Path) -> Result<(), FirecrackerError> {
        self.call(
            "PUT",
            "/snapshot/create",
            &serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": vmstate,
                "mem_file_path": memory,
            }),
        )
    }
}

/// Firecracker as pagerd launches it: restored with `PUT /snapshot/load`, memory from a
/// fork's handoff socket or a memory file, snapshotted over its API.
#[derive(Debug, Clone, Copy, Default)]
pub struct Firecracker;

impl Hypervisor for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn binary(&self) -> &'static BinaryLookup {
        &BINARY
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            uffd_backend: true,
            device_overrides: true,
            jailer: true,
        }
    }

    fn control_socket_name(&self) -> &'static str {
        "api.sock"
    }

    fn log_file_name(&self) -> Option<&'static str> {
        Some(LOG_FILE)
    }

    fn command(&self, launch: &Launch<'_>) -> Command {
        command(
            launch.binary,
            launch.id,
            launch.control_socket,
            &launch.dir.join(LOG_FILE),
        )
    }

    fn wait_ready(
        &self,
        socket: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), HypervisorError> {
        Ok(Api::new(socket).wait_ready(timeout, alive)?)
    }

    fn restore(&self, socket: &Path, restore: &Restore<'_>) -> Result<(), HypervisorError> {
        let load = LoadRequest::new(
            restore.vmstate,
            restore.backend,
            restore.memory,
            restore.network_overrides,
            restore.vsock,
        );
        Ok(Api::new(socket).load(&load)?)
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }
}

impl Snapshots for Firecracker {
    fn pause(&self, socket: &Path) -> Result<(), HypervisorError> {
        Ok(Api::new(socket).pause()?)
    }

    fn create(&self, socket: &Path, vmstate: &Path, memory: &Path) -> Result<(), HypervisorError> {
        Ok(Api::new(socket).create_snapshot(vmstate, memory)?)
    }

    fn resume(&self, socket: &Path) -> Result<(), HypervisorError> {
        Ok(Api::new(socket).resume()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_requests_name_the_backend_and_the_overrides() {
        let taps = [NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap7".into(),
        }];
        let r = LoadRequest::new(
            Path::new("/s/vmstate"),
            VmBackend::Uffd,
            Path::new("/s/f.sock"),
            &taps,
            Some(Path::new("/v.sock")),
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "/s/f.sock"},
                "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
                "vsock_override": {"uds_path": "/v.sock"},
            })
        );
        let r = LoadRequest::new(
            Path::new("/s/vmstate"),
            VmBackend::File,
            Path::new("/m"),
            &[],
            None,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mem_backend"]["backend_type"], "File");
        assert!(v.get("network_overrides").is_none() && v.get("vsock_override").is_none());
    }

    #[test]
    fn the_command_line_names_the_api_socket_and_the_log_in_the_vm_directory() {
        let launch = Launch {
            binary: Path::new("/opt/firecracker"),
            id: "a",
            dir: Path::new("/state/vms/a"),
            control_socket: Path::new("/state/vms/a/api.sock"),
            memory: Path::new("/state/sockets/a.sock"),
            memory_size: 1 << 20,
        };
        let command = Firecracker.command(&launch);
        assert_eq!(command.get_program(), "/opt/firecracker");
        let args: Vec<_> = command.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--api-sock",
                "/state/vms/a/api.sock",
                "--id",
                "a",
                "--log-path",
                "/state/vms/a/firecracker.log",
                "--level",
                "Warning"
            ]
        );
    }

    /// An API server on `socket` answering `answers` requests in turn (status, body) and
    /// returning each request's method, path and JSON body.
    fn fake_api(
        socket: &Path,
        answers: Vec<(u16, &'static str)>,
    ) -> std::thread::JoinHandle<Vec<(String, serde_json::Value)>> {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                let text = loop {
                    let n = conn.read(&mut chunk).unwrap();
                    assert_ne!(n, 0, "the client closed mid-request");
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, sent)) = text.split_once("\r\n\r\n") {
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if sent.len() >= length {
                            break text;
                        }
                    }
                };
                let (head, sent) = text.split_once("\r\n\r\n").unwrap();
                let request_line = head.lines().next().unwrap();
                let mut words = request_line.split(' ');
                let call = format!("{} {}", words.next().unwrap(), words.next().unwrap());
                seen.push((call, serde_json::from_str(sent).unwrap()));
                let answer = format!(
                    "HTTP/1.1 {status} \r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn a_restore_loads_the_snapshot_with_the_fork_as_memory_backend() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let server = fake_api(&socket, vec![(204, "")]);
        let restore = Restore {
            vmstate: Path::new("/s/vmstate"),
            backend: VmBackend::Uffd,
            memory: Path::new("/state/sockets/a.sock"),
            network_overrides: &[],
            vsock: None,
        };
        Firecracker.restore(&socket, &restore).unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "PUT /snapshot/load");
        assert_eq!(
            seen[0].1["mem_backend"],
            serde_json::json!({"backend_type": "Uffd", "backend_path": "/state/sockets/a.sock"})
        );
        assert_eq!(seen[0].1["snapshot_path"], "/s/vmstate");
    }

    #[test]
    fn a_refused_load_carries_firecrackers_answer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let server = fake_api(&socket, vec![(400, r#"{"fault_message":"bad"}"#)]);
        let restore = Restore {
            vmstate: Path::new("/s/vmstate"),
            backend: VmBackend::File,
            memory: Path::new("/m"),
            network_overrides: &[],
            vsock: None,
        };
        let error = Firecracker.restore(&socket, &restore).unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(
                &error,
                HypervisorError::Firecracker(FirecrackerError::Refused { status: 400, body, .. })
                    if body.contains("bad")
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_snapshot_pauses_creates_and_resumes_over_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let server = fake_api(&socket, vec![(204, ""), (204, ""), (204, "")]);
        let snapshots = Firecracker.snapshots().unwrap();
        snapshots.pause(&socket).unwrap();
        snapshots
            .create(&socket, Path::new("/o/vmstate"), Path::new("/o/memory"))
            .unwrap();
        snapshots.resume(&socket).unwrap();
        let seen = server.join().unwrap();
        let calls: Vec<_> = seen.iter().map(|(call, _)| call.as_str()).collect();
        assert_eq!(calls, ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]);
        assert_eq!(seen[0].1, serde_json::json!({"state": "Paused"}));
        assert_eq!(
            seen[1].1,
            serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": "/o/vmstate",
                "mem_file_path": "/o/memory",
            })
        );
        assert_eq!(seen[2].1, serde_json::json!({"state": "Resumed"}));
    }

    #[test]
    fn waiting_ends_when_the_process_is_gone_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let error = Firecracker
            .wait_ready(&socket, Duration::from_secs(60), &mut || false)
            .unwrap_err();
        assert!(
            matches!(
                error,
                HypervisorError::Firecracker(FirecrackerError::Ended { .. })
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "the process ended before its API socket {} came up",
                socket.display()
            )
        );
        let error = Firecracker
            .wait_ready(&socket, Duration::ZERO, &mut || true)
            .unwrap_err();
        assert!(
            matches!(
                error,
                HypervisorError::Firecracker(FirecrackerError::NotReady { .. })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn only_a_refused_load_is_a_rejected_snapshot() {
        let refused = |method, path, status| FirecrackerError::Refused {
            method,
            path,
            status,
            body: String::new(),
        };
        assert!(refused("PUT", "/snapshot/load", 400).rejected_snapshot());
        assert!(!refused("PUT", "/snapshot/load", 500).rejected_snapshot());
        assert!(!refused("PUT", "/snapshot/create", 400).rejected_snapshot());
        assert!(!refused("PATCH", "/vm", 400).rejected_snapshot());
        let ended = FirecrackerError::Ended {
            socket: PathBuf::from("/a"),
        };
        assert!(!ended.rejected_snapshot());
    }
}
