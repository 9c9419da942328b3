//! Who may read guest memory: the modes and group of everything pagerd creates.
//!
//! A snapshot's memory file holds every secret its VM had, so by default only the daemon's
//! user (root) can read it, by any path. One group can be granted more (`--group`): its
//! members may read memory files and connect to the sockets, and nothing else.
//!
//! ```text
//!                                  no group            --group G
//! STATE/ and its directories       0700 root:root      0750 root:G
//! snapshots/<id>/memory (copied)   0400 root:root      0440 root:G
//! snapshots/<id>/memory (--link)   the caller's file: its owner and modes, never changed
//! records (*.json), lock           0600 root           0600 root
//! sockets/<id>.sock (handoff)      0600 root           0660 root:G
//! control socket                   0600 root           0660 root:G
//! FUSE: directories, mount root    0500 root           0550 root:G
//! FUSE: memory files               0400 root           0440 root:G
//! ```
//!
//! "root" is the daemon's effective user. The daemon sets its umask to 077 before it creates
//! anything ([`restrict_umask`]), so nothing is ever wider than this table, even between its
//! creation and the `chmod` that sets its final mode. Existing state directories are brought
//! to these modes at start. `docs/security.md` states the model these modes implement.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The access policy: which group, if any, shares access with the daemon's user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    group: Option<u32>,
}

impl Access {
    /// Only the daemon's user (`None`), or that user and members of group `group`.
    pub fn new(group: Option<u32>) -> Self {
        Self { group }
    }

    /// Directories of the state directory: 0700, or 0750 with a group.
    pub fn dir_mode(&self) -> u32 {
        self.pick(0o700, 0o750)
    }

    /// Memory files pagerd owns (copies): 0400, or 0440 with a group.
    pub fn memory_mode(&self) -> u32 {
        self.pick(0o400, 0o440)
    }

    /// Sockets (control and handoff): 0600, or 0660 with a group.
    pub fn socket_mode(&self) -> u32 {
        self.pick(0o600, 0o660)
    }

    /// Directories of the read-only FUSE view: 0500, or 0550 with a group.
    pub fn read_only_dir_mode(&self) -> u32 {
        self.pick(0o500, 0o550)
    }

    /// Records and the lock file: 0600 whatever the group.
    pub fn record_mode(&self) -> u32 {
        0o600
    }

    /// The owning user: the daemon's effective user.
    pub fn uid(&self) -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    /// The owning group: the configured one, else the daemon's effective group.
    pub fn gid(&self) -> u32 {
        self.group
            .unwrap_or_else(|| nix::unistd::getegid().as_raw())
    }

    fn pick(&self, owner_only: u32, with_group: u32) -> u32 {
        if self.group.is_some() {
            with_group
        } else {
            owner_only
        }
    }

    /// Gives `path` the daemon's user, this policy's group and `mode`, unless it has them
    /// already (a `chmod` changes the inode's ctime even when the mode stays). Never follows a
    /// symlink: one found is an error. Returns whether something changed.
    pub fn apply(&self, path: &Path, mode: u32) -> io::Result<bool> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a symlink", path.display()),
            ));
        }
        let (uid, gid) = (self.uid(), self.gid());
        let mut changed = false;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
            changed = true;
        }
        // chown clears set-id bits, so compare against the mode as it was.
        if meta.mode() & 0o7777 != mode || changed {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            changed = true;
        }
        Ok(changed)
    }

    /// [`apply`](Self::apply) for a socket just bound at `path`.
    pub fn apply_socket(&self, path: &Path) -> io::Result<()> {
        self.apply(path, self.socket_mode()).map(drop)
    }
}

/// Sets the process umask to 077: whatever the daemon creates starts out private to its
/// user, and is widened only by an explicit `chmod` to a mode of the table above.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Gives a socket just bound at `path` the group access of the directory it is in: 0660
/// with the directory's group when the directory lets its group in (`g+x`, as the state
/// directory's do when a group is configured), else 0600. Handoff sockets are bound in the
/// state directory's `sockets/`, so they follow the policy without being told it.
pub fn restrict_socket_like_its_directory(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir)?;
    let group = (meta.mode() & 0o010 != 0).then_some(meta.gid());
    Access::new(group).apply_socket(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_the_group() {
        let private = Access::new(None);
        assert_eq!(
            (
                private.dir_mode(),
                private.memory_mode(),
                private.socket_mode(),
                private.read_only_dir_mode()
            ),
            (0o700, 0o400, 0o600, 0o500)
        );
        let shared = Access::new(Some(65534));
        assert_eq!(
            (
                shared.dir_mode(),
                shared.memory_mode(),
                shared.socket_mode(),
                shared.read_only_dir_mode()
            ),
            (0o750, 0o440, 0o660, 0o550)
        );
        assert_eq!(shared.gid(), 65534);
        assert_eq!(shared.record_mode(), 0o600);
    }

    #[test]
    fn apply_sets_mode_and_group_once_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let access = Access::new(None);
        assert!(access.apply(&file, 0o400).unwrap());
        assert!(
            !access.apply(&file, 0o400).unwrap(),
            "nothing left to change"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o400);
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(access.apply(&link, 0o400).is_err());
    }

    #[test]
    fn a_socket_takes_its_directorys_group_access() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        restrict_socket_like_its_directory(&sock).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
        std::os::unix::fs::chown(dir.path(), None, Some(65534)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        restrict_socket_like_its_directory(&sock).unwrap();
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 65534));
    }
}
