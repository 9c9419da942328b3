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
//! The binary is found from an explicit path, then `$FIRECRACKER`, then `PATH`
//! ([`find_binary`]). [`Api`] speaks to the process's API socket with the small client in
//! [`crate::http`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::model::{NetworkOverride, VmBackend};
use serde::Serialize;

/// The environment variable naming the Firecracker binary.
pub const FIRECRACKER_ENV: &str = "FIRECRACKER";

/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a Firecracker call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// No binary was found.
    #[error("no firecracker binary: give --firecracker PATH, set $FIRECRACKER, or put it on PATH")]
    NotFound,
    /// The API socket never answered.
    #[error("the API socket {} did not come up within {timeout:?}", socket.display())]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// How long it was given.
        timeout: Duration,
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

/// The Firecracker binary: `explicit`, else `$FIRECRACKER`, else `firecracker` on `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, FirecrackerError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os(FIRECRACKER_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").ok_or(FirecrackerError::NotFound)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("firecracker"))
        .find(|candidate| candidate.is_file())
        .ok_or(FirecrackerError::NotFound)
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
        let end = Instant::now() + timeout;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() >= end || !alive() {
                return Err(FirecrackerError::NotReady {
                    socket: self.socket.clone(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
        self.call("PUT", "/snapshot/load", request)
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
}
