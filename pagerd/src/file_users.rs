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
//!
//! A restarted daemon has no handles, but processes may still map memory files opened from
//! an earlier daemon's mount (passthrough mappings outlive it). At start, [`find_mappers`]
//! reads every `/proc/<pid>/maps` for mappings named like a memory file — on the mount
//! (`MOUNT/snapshots/<id>/memory`), on a mount detached since (`/snapshots/<id>/memory`), or
//! in the state directory itself — and each such process is counted again as `mapped`
//! ([`FileUsers::adopt`]), keyed by the device and inode its maps show.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use proto::model::{FileUserInfo, FileUserState};
use proto::SnapshotId;

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

/// One line of `/proc/<pid>/maps`: the mapped file's key and path, if it maps a file.
fn parse_maps_line(line: &str) -> Option<(FileKey, &str)> {
    // start-end perms offset major:minor inode [path]
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let (major, minor) = fields[3].split_once(':')?;
    let key = FileKey {
        major: u64::from_str_radix(major, 16).ok()?,
        minor: u64::from_str_radix(minor, 16).ok()?,
        inode: fields[4].parse().ok()?,
    };
    let path = rest.trim_start();
    (key.inode != 0 && !path.is_empty()).then_some((key, path))
}

/// A process found mapping a memory file at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapper {
    /// The snapshot whose memory file it maps.
    pub snapshot: SnapshotId,
    /// The process.
    pub pid: i32,
    /// The mapped file as its maps show it.
    pub file: FileKey,
}

/// Which snapshot a mapped path is the memory file of, given where memory files live
/// (`roots`: the mount point, the state directory, and `/` for a detached mount).
fn snapshot_of_path(
    path: &str,
    roots: &[PathBuf],
    snapshots: &BTreeSet<SnapshotId>,
) -> Option<SnapshotId> {
    let path = Path::new(path.strip_suffix(" (deleted)").unwrap_or(path));
    roots.iter().find_map(|root| {
        let rel = path.strip_prefix(root.join("snapshots")).ok()?;
        let mut parts = rel.components();
        let id: SnapshotId = parts.next()?.as_os_str().to_str()?.parse().ok()?;
        let file = parts.next()?.as_os_str();
        (file == crate::store::MEMORY_FILE && parts.next().is_none() && snapshots.contains(&id))
            .then_some(id)
    })
}

/// Every process (other than this one) that maps the memory file of one of `snapshots` under
/// `roots`, once per process and snapshot.
pub fn find_mappers(roots: &[PathBuf], snapshots: &BTreeSet<SnapshotId>) -> Vec<Mapper> {
    let me = std::process::id();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in proc.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid) == Ok(me) {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let mut seen = BTreeSet::new();
        for (file, path) in maps.lines().filter_map(parse_maps_line) {
            if let Some(snapshot) = snapshot_of_path(path, roots, snapshots) {
                if seen.insert(snapshot.clone()) {
                    found.push(Mapper {
                        snapshot,
                        pid,
                        file,
                    });
                }
            }
        }
    }
    found
}

/// Whether process `pid` maps the file `key`. `None` when its maps cannot be read.
fn process_maps(pid: i32, key: FileKey) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some(maps.lines().any(|line| key.matches_maps_line(line)))
}

#[derive(Debug, Clone)]
struct FileUser {
    snapshot: SnapshotId,
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
    pub fn open(&self, snapshot: SnapshotId, pid: i32, file: Option<FileKey>) -> u64 {
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

    /// Counts again a process that maps a memory file opened before this daemon started (it
    /// has no handle: it stays `mapped` until it lets go). Returns the handle.
    pub fn adopt(&self, mapper: Mapper) -> u64 {
        let handle = self.handles.fetch_add(1, Ordering::Relaxed) + 1;
        let user = FileUser {
            snapshot: mapper.snapshot,
            pid: mapper.pid,
            process: VmmIdentity::of(mapper.pid),
            file: Some(mapper.file),
            state: FileUserState::Mapped,
            opened: SystemTime::now(),
        };
        self.lock().insert(handle, user);
        handle
    }

    /// The kernel released `handle`. Returns the snapshot if that ended the reference (it
    /// stays, as `mapped`, while a passthrough mapping outlives the handle).
    pub fn release(&self, handle: u64) -> Option<SnapshotId> {
        let mut users = self.lock();
        let user = users.get_mut(&handle)?;
        if user.still_maps() {
            user.state = FileUserState::Mapped;
            return None;
        }
        users.remove(&handle).map(|u| u.snapshot)
    }

    /// Drops `mapped` users whose process no longer maps the file; returns their snapshots.
    pub fn prune(&self) -> Vec<SnapshotId> {
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
    pub fn referencing(&self, snapshot: &SnapshotId) -> Vec<FileUserInfo> {
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
    fn memory_files_are_recognised_on_the_mount_a_detached_mount_and_the_state_directory() {
        let line = "7f7c8199a000-7f7c81a9a000 rw-p 00000000 00:27 17                         /tmp/s/fuse/snapshots/base/memory";
        let (key, path) = parse_maps_line(line).unwrap();
        assert_eq!((key.major, key.minor, key.inode), (0, 0x27, 17));
        let roots = [
            PathBuf::from("/tmp/s/fuse"),
            PathBuf::from("/tmp/s"),
            PathBuf::from("/"),
        ];
        let snapshots: BTreeSet<SnapshotId> = ["base".parse().unwrap()].into();
        let base = Some("base".parse().unwrap());
        assert_eq!(snapshot_of_path(path, &roots, &snapshots), base);
        assert_eq!(
            snapshot_of_path("/snapshots/base/memory", &roots, &snapshots),
            base
        );
        assert_eq!(
            snapshot_of_path("/tmp/s/snapshots/base/memory (deleted)", &roots, &snapshots),
            base
        );
        assert_eq!(
            snapshot_of_path("/snapshots/other/memory", &roots, &snapshots),
            None
        );
        assert_eq!(
            snapshot_of_path("/snapshots/base/memoryx", &roots, &snapshots),
            None
        );
        assert_eq!(
            snapshot_of_path("/usr/lib/libc.so.6", &roots, &snapshots),
            None
        );
        assert!(parse_maps_line("7f00-7f10 rw-p 00000000 00:00 0").is_none());
        assert!(parse_maps_line("7f00-7f10 rw-p 00000000 00:00 0    [heap]").is_none());
    }

    #[test]
    fn a_user_ends_at_release_unless_its_process_still_maps_the_file() {
        let users = FileUsers::default();
        let snapshot: SnapshotId = "s".parse().unwrap();
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
