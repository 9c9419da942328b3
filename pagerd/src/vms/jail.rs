//! Firecracker through its jailer: each clone chrooted under `STATE/jail`, running as a uid of
//! its own from `--jail-uids` and as pagerd's `--group`, which lets it read the vmstate and
//! memory files and reach its handoff socket, and nothing else.
//!
//! ```text
//!  jailer --id ID --exec-file FIRECRACKER --uid U --gid GROUP --chroot-base-dir STATE/jail
//!         -- --api-sock /run/firecracker.socket
//!    ─▶ STATE/jail/<binary name>/ID/root/ (the chroot; the API socket at root/run/…)
//!  file backend, before the jailer runs: root/memory, a read-only bind mount of the
//!    snapshot's memory file (the jailer's recursive bind of root carries it into the jail)
//!  pagerd hard-links into root/: vmstate, and the fork's handoff socket (uffd)
//!    ─▶ PUT /snapshot/load with those in-chroot paths
//!  exit ─▶ root/memory unmounted ─▶ STATE/jail/<binary name>/ID removed (links only)
//! ```
//!
//! Hard links need the state directory's filesystem, which the chroot is on. The memory file
//! is bind mounted rather than linked: a new name would change its inode's change time, which
//! pagerd watches to notice a changed snapshot. The console (the jailed process's stdout)
//! stays outside the chroot, in the VM's directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use proto::model::JailInfo;
use proto::VmId;

/// The API socket's path inside the chroot.
pub(super) const API_SOCKET: &str = "/run/firecracker.socket";

/// How VMs are jailed (`--jailer`, `--jail-uids`, `--group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JailOptions {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// The first uid jailed VMs run as.
    pub first_uid: u32,
    /// How many uids, from `first_uid` on.
    pub uids: u32,
    /// The group they run as (pagerd's `--group`).
    pub gid: u32,
    /// Where the chroots are made (`STATE/jail`).
    pub base: PathBuf,
}

impl JailOptions {
    /// The jail of VM `id` run from `binary`: a uid not in `in_use`, and its chroot.
    pub fn jail(&self, binary: &Path, id: &VmId, in_use: &BTreeSet<u32>) -> Option<JailInfo> {
        let uid = (0..self.uids)
            .filter_map(|n| self.first_uid.checked_add(n))
            .find(|uid| !in_use.contains(uid))?;
        let name = binary.file_name()?;
        Some(JailInfo {
            uid,
            gid: self.gid,
            root: self.base.join(name).join(id.as_str()).join("root"),
        })
    }

    /// The command that starts `binary` jailed as `jail`.
    pub fn command(&self, binary: &Path, id: &VmId, jail: &JailInfo) -> Command {
        let base = jail
            .root
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap_or(&self.base);
        let mut command = Command::new(&self.jailer);
        command
            .arg("--id")
            .arg(id.as_str())
            .arg("--exec-file")
            .arg(binary)
            .arg("--uid")
            .arg(jail.uid.to_string())
            .arg("--gid")
            .arg(jail.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(base)
            .arg("--")
            .arg("--api-sock")
            .arg(API_SOCKET);
        command
    }
}

/// The API socket of a jailed VM, seen from outside.
pub(super) fn api_socket(jail: &JailInfo) -> PathBuf {
    inside(jail, Path::new(API_SOCKET))
}

/// Where `path` (absolute, as the jailed process sees it) is seen from outside.
pub(super) fn inside(jail: &JailInfo, path: &Path) -> PathBuf {
    jail.root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes `file` visible inside the jail as `/name` (a hard link); returns the in-chroot path.
pub(super) fn link_into(jail: &JailInfo, file: &Path, name: &str) -> std::io::Result<PathBuf> {
    let at = Path::new("/").join(name);
    let outside = inside(jail, &at);
    match std::fs::remove_file(&outside) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::hard_link(file, &outside)?;
    Ok(at)
}

/// Makes `memory` visible inside the jail as `/memory`, read-only, before the jailer runs
/// (a bind mount made afterwards would not reach the jail's mount namespace); returns the
/// in-chroot path.
pub(super) fn mount_memory(jail: &JailInfo, memory: &Path) -> std::io::Result<PathBuf> {
    use nix::mount::{mount, MsFlags};
    let at = Path::new("/memory");
    let outside = inside(jail, at);
    std::fs::create_dir_all(&jail.root)?;
    std::fs::File::create(&outside)?;
    let none: Option<&str> = None;
    mount(Some(memory), &outside, none, MsFlags::MS_BIND, none)?;
    let read_only = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(none, &outside, none, read_only, none) {
        let _ = nix::mount::umount2(&outside, nix::mount::MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(at.to_owned())
}

/// A directory inside the jail the jailed process may write (`/name`), for snapshots; returns
/// the in-chroot path.
pub(super) fn writable_dir(jail: &JailInfo, name: &str) -> std::io::Result<PathBuf> {
    let at = Path::new("/").join(name);
    let outside = inside(jail, &at);
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir(&outside)?;
    std::os::unix::fs::chown(&outside, Some(jail.uid), Some(jail.gid))?;
    Ok(at)
}

/// Removes a jail (the chroot and the jailer's directory around it): links only, the
/// originals stay.
pub(super) fn remove(jail: &JailInfo) {
    let memory = inside(jail, Path::new("/memory"));
    if memory.exists() {
        // A bind mount, if the file backend made one (EINVAL: a plain file).
        let _ = nix::mount::umount2(&memory, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Some(dir) = jail.root.parent() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(jail = %dir.display(), error = %e, "cannot remove a VM's jail");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> JailOptions {
        JailOptions {
            jailer: "/usr/bin/jailer".into(),
            first_uid: 900_000,
            uids: 3,
            gid: 999,
            base: "/var/lib/pagerd/jail".into(),
        }
    }

    #[test]
    fn each_vm_gets_a_free_uid_and_a_chroot_of_its_own() {
        let id: VmId = "a".parse().unwrap();
        let fc = Path::new("/opt/fc/firecracker");
        let jail = options().jail(fc, &id, &BTreeSet::from([900_000])).unwrap();
        assert_eq!(jail.uid, 900_001);
        assert_eq!(jail.gid, 999);
        assert_eq!(
            jail.root,
            Path::new("/var/lib/pagerd/jail/firecracker/a/root")
        );
        assert_eq!(
            api_socket(&jail),
            Path::new("/var/lib/pagerd/jail/firecracker/a/root/run/firecracker.socket")
        );
        let all = BTreeSet::from([900_000, 900_001, 900_002]);
        assert!(
            options().jail(fc, &id, &all).is_none(),
            "the range is used up"
        );
    }

    #[test]
    fn the_jailer_is_told_the_uid_the_group_and_the_base() {
        let id: VmId = "a".parse().unwrap();
        let fc = Path::new("/opt/fc/firecracker");
        let jail = options().jail(fc, &id, &BTreeSet::new()).unwrap();
        let command = options().command(fc, &id, &jail);
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--id",
                "a",
                "--exec-file",
                "/opt/fc/firecracker",
                "--uid",
                "900000",
                "--gid",
                "999",
                "--chroot-base-dir",
                "/var/lib/pagerd/jail",
                "--",
                "--api-sock",
                "/run/firecracker.socket"
            ]
        );
    }
}
