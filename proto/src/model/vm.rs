//! Launched VMs: which hypervisor, how a clone gets its memory, its states, and what
//! `vm.get` answers.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ids::{ForkId, SnapshotId, VmId};

/// Which hypervisor a snapshot's device state is for, and which one a VM runs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum VmmKind {
    /// Firecracker (`PUT /snapshot/load`).
    Firecracker,
    /// QEMU (an incoming migration stream).
    Qemu,
}

impl VmmKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A snapshot's hypervisor state file, kept beside its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateInfo {
    /// The hypervisor it is for.
    pub vmm: VmmKind,
    /// The file in the state directory.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// How a launched VM gets its guest memory from pagerd.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum VmBackend {
    /// A fork: the VMM hands its userfaultfd to pagerd, which serves every page.
    #[default]
    Uffd,
    /// The VMM maps the snapshot's memory file on pagerd's FUSE view (`MAP_PRIVATE`).
    File,
}

impl VmBackend {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where a launched VM is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum VmState {
    /// The hypervisor process was started and is being restored.
    Starting,
    /// The snapshot was loaded and the hypervisor runs.
    Running,
    /// The hypervisor process exited (its status, when pagerd was its parent).
    Exited,
    /// Starting it failed (the reason says why); no process is left.
    Failed,
}

impl VmState {
    /// Every state, in life order.
    pub const ALL: &'static [Self] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether the hypervisor process may still be alive.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Starting | Self::Running)
    }
}

/// A network interface of the snapshot given another host tap device in one clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface id in the snapshot.
    pub iface_id: String,
    /// The host tap device this clone uses.
    pub host_dev_name: String,
}

/// A jailed VM's confinement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailInfo {
    /// The uid it runs as.
    pub uid: u32,
    /// The group it runs as.
    pub gid: u32,
    /// Its chroot, seen from outside.
    pub root: PathBuf,
}

/// A launched VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM id.
    pub id: VmId,
    /// The snapshot it was restored from.
    pub snapshot: SnapshotId,
    /// The uid that started it (root for VMs started before owners were kept).
    #[serde(default)]
    pub owner: u32,
    /// The hypervisor.
    pub vmm: VmmKind,
    /// How it gets its memory.
    pub backend: VmBackend,
    /// State.
    pub state: VmState,
    /// The hypervisor's pid (once started).
    pub pid: Option<i32>,
    /// The fork serving its memory (uffd backend).
    pub fork: Option<ForkId>,
    /// The memory file it maps (file backend).
    pub memory_file: Option<PathBuf>,
    /// The hypervisor's API socket.
    pub api_socket: PathBuf,
    /// The guest console (the hypervisor's stdout), capped in size.
    pub console_log: PathBuf,
    /// Tap devices given to this clone.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock socket given to this clone.
    pub vsock: Option<PathBuf>,
    /// Exit code, when it exited (or ended by itself while starting) and pagerd was its
    /// parent.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when it did and pagerd was its parent.
    pub exit_signal: Option<i32>,
    /// Why starting it failed.
    pub reason: Option<String>,
    /// The last lines (at most 20, 4 KiB) of its console log, when it ended by itself while
    /// starting: the hypervisor's own words about why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_output: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// When it became `exited` or `failed`, ms since the Unix epoch (absent in records of
    /// VMs that ended before it was kept); `--vm-retention` counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// Where and as whom it runs jailed (Firecracker started through its jailer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_the_newer_fields_still_parse_and_absent_ones_are_not_written() {
        let old = serde_json::json!({
            "id": "a", "snapshot": "s", "vmm": "firecracker", "backend": "uffd",
            "state": "failed", "pid": null, "fork": null, "memory_file": null,
            "api_socket": "/v/a/api.sock", "console_log": "/v/a/console.log",
            "vsock": null, "exit_code": null, "exit_signal": null, "reason": "why",
            "created_unix_ms": 1,
        });
        let mut info: VmInfo = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(
            (info.last_output.as_ref(), info.ended_unix_ms),
            (None, None)
        );
        let written = serde_json::to_value(&info).unwrap();
        assert!(written.get("last_output").is_none() && written.get("ended_unix_ms").is_none());
        info.last_output = Some("Error: bad vmstate".into());
        info.ended_unix_ms = Some(2);
        let again: VmInfo = serde_json::from_value(serde_json::to_value(&info).unwrap()).unwrap();
        assert_eq!(again, info);
    }
}
