//! Processes that hold a snapshot's memory file open or mapped on the FUSE mount. Each one is a
//! reference, like a fork: while any exists, the snapshot cannot be deleted.
//!
//! A user begins when the kernel opens the file for a process (FUSE `open`, with the caller's
//! pid) and ends when the kernel releases that handle: the last descriptor closed and the last
//! mapping gone, which also happens when the process is killed.
//!
//! With FUSE passthrough the kernel points a new mapping at the backing file itself, so the
//! handle is released as soon as the descriptor is closed even though the process still maps
//! the memory. Such a user is kept, as `mapped`, for as long as its process (the same process:
//! pid and start time) still maps the file: `/proc/<pid>/maps` names the file the process
//! opened (the mount's device and the memory file's inode) even for passthrough mappings.
//! That is checked every time references are counted, and the daemon prunes users that let go
//! every second (finishing deletes that waited for them). Counting fails closed: a process
//! whose maps cannot be read is still counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use proto::model::{FileUserInfo, FileUserState};
use proto::Id;

use crate::registry::unix_ms;
use crate::store::VmmIdentity;

/// A file's identity: device (major, minor) and inode, as `/proc/<pid>/maps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    /// Device major number.
    pub major: u64,
    /// Device minor number.
    pub minor: u64,
    /// Inode number.
    pub inode: u64,
}

impl FileKey {
    /// Whether one line of `/proc/<pid>/maps` maps this file.
    fn matches_maps_line(&self, line: &str) -> bool {
        // start-end perms offset major:minor inode [path]
        let mut fields = line.split_ascii_whitespace().skip(3);
        let (Some(dev), Some(inode)) = (fields.next(), fields.next()) else {
            return false;
        };
        let Some((major, minor)) = dev.split_once(':') else {
            return false;
        };
        u64::from_str_radix(major, 16) == Ok(self.major)
            && u64::from_str_radix(minor, 16) == Ok(self.minor)
            && inode.parse() == Ok(self.inode)
    }
}

/// Whether process `pid` maps the file `key`. `None` when its maps cannot be read.
fn process_maps(pid: i32, key: FileKey) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some(maps.lines().any(|line| key.matches_maps_line(line)))
}

#[derive(Debug, Clone)]
struct FileUser {
    snapshot: Id,
    pid: i32,
    process: Option<VmmIdentity>,
    file: Option<FileKey>,
    state: FileUserState,
    opened: SystemTime,
}

impl FileUser {
    /// Whether a `mapped` user still maps the file. Unknown counts as yes (fail closed).
    fn still_maps(&self) -> bool {
        let (Some(process), Some(key)) = (self.process, self.file) else {
            return false;
        };
        if !process.is_alive() {
            return false;
        }
        process_maps(process.pid, key).unwrap_or(true)
    }
}

/// Every file user of the daemon.
#[derive(Debug, Default)]
pub struct FileUsers {
    users: Mutex<BTreeMap<u64, FileUser>>,
    /// Handles given out so far (handles start at 1).
    handles: AtomicU64,
}

impl FileUsers {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, FileUser>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that process `pid` opened `snapshot`'s memory file; returns the handle. `file`
    /// identifies the memory file in `/proc/<pid>/maps` (needed for passthrough users).
    pub fn open(&self, snapshot: Id, pid: i32, file: Option<FileKey>) -> u64 {
        let handle = self.handles.fetch_add(1, Ordering::Relaxed) + 1;
        let user = FileUser {
            snapshot,
            pid,
            process: VmmIdentity::of(pid),
            file,
            state: FileUserState::Open,
            opened: SystemTime::now(),
        };
        self.lock().insert(handle, user);
        handle
    }

    /// The kernel released `handle`. Returns the snapshot if that ended the reference (it
    /// stays, as `mapped`, while a passthrough mapping outlives the handle).
    pub fn release(&self, handle: u64) -> Option<Id> {
        let mut users = self.lock();
        let user = users.get_mut(&handle)?;
        if user.still_maps() {
            user.state = FileUserState::Mapped;
            return None;
        }
        users.remove(&handle).map(|u| u.snapshot)
    }

    /// Drops `mapped` users whose process no longer maps the file; returns their snapshots.
    pub fn prune(&self) -> Vec<Id> {
        let mut users = self.lock();
        let gone: Vec<u64> = users
            .iter()
            .filter(|(_, u)| u.state == FileUserState::Mapped && !u.still_maps())
            .map(|(h, _)| *h)
            .collect();
        gone.iter()
            .filter_map(|h| users.remove(h).map(|u| u.snapshot))
            .collect()
    }

    /// Whether any user is held only by a mapping (and so must be checked now and then).
    pub fn any_mapped(&self) -> bool {
        self.lock()
            .values()
            .any(|u| u.state == FileUserState::Mapped)
    }

    /// Every user, by handle; `mapped` users whose process let go are left out (they are
    /// removed by [`prune`](Self::prune), which reports them so pending deletes can finish).
    pub fn list(&self) -> Vec<FileUserInfo> {
        self.lock()
            .iter()
            .filter(|(_, u)| u.state == FileUserState::Open || u.still_maps())
            .map(|(handle, u)| FileUserInfo {
                id: format!("file-{handle}"),
                snapshot: u.snapshot.clone(),
                pid: u.pid,
                state: u.state,
                opened_unix_ms: unix_ms(u.opened),
            })
            .collect()
    }

    /// The users of one snapshot.
    pub fn referencing(&self, snapshot: &Id) -> Vec<FileUserInfo> {
        let mut users = self.list();
        users.retain(|u| &u.snapshot == snapshot);
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_line_names_device_and_inode() {
        let key = FileKey {
            major: 0xfd,
            minor: 0,
            inode: 1234,
        };
        assert!(key.matches_maps_line(
            "7f00-7f10 r--p 00000000 fd:00 1234                       /var/lib/pagerd/m"
        ));
        assert!(!key.matches_maps_line("7f00-7f10 r--p 00000000 fd:01 1234 /x"));
        assert!(!key.matches_maps_line("7f00-7f10 r--p 00000000 fd:00 12345 /x"));
        assert!(!key.matches_maps_line("7f00-7f10 rw-p 00000000 00:00 0"));
        assert!(!key.matches_maps_line("garbage"));
    }

    #[test]
    fn a_user_ends_at_release_unless_its_process_still_maps_the_file() {
        let users = FileUsers::default();
        let snapshot: Id = "s".parse().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let h = users.open(snapshot.clone(), me, None);
        assert_eq!(users.referencing(&snapshot).len(), 1);
        assert_eq!(users.release(h), Some(snapshot.clone()));
        assert!(users.referencing(&snapshot).is_empty());

        // This process maps its own executable: a "passthrough" user of it stays mapped.
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let key = FileKey {
            major: nix::sys::stat::major(std::os::unix::fs::MetadataExt::dev(&exe)),
            minor: nix::sys::stat::minor(std::os::unix::fs::MetadataExt::dev(&exe)),
            inode: std::os::unix::fs::MetadataExt::ino(&exe),
        };
        let h = users.open(snapshot.clone(), me, Some(key));
        assert_eq!(users.release(h), None);
        assert_eq!(users.referencing(&snapshot)[0].state, FileUserState::Mapped);
        assert!(users.any_mapped());
        assert!(users.prune().is_empty());
    }
}
