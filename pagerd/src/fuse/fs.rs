//! The read-only filesystem: `/snapshots/<id>/memory` for every snapshot that may be forked.
//!
//! - `open` of a memory file is a reference ([`MemoryFiles::open_memory_file`]), taken under the
//!   lifecycle lock so it cannot race a delete; `release` ends it. Opening for writing, or a
//!   snapshot pending deletion, is refused.
//! - Reads are answered with `pread` on the snapshot's file ([`Snapshot::read_at`]), as large
//!   as the kernel asks; a file that shrank behind pagerd's back (a broken link contract)
//!   answers `EIO`, never a SIGBUS. Files are opened with keep-cache, so a page read once
//!   stays in the page cache for every later fork; a snapshot's working set is pushed into
//!   that cache when its file is first opened ([`super::warm`]).
//! - Modes and group come from the access policy: memory files 0400 (0440 with a group),
//!   directories 0500 (0550); the mount's `default_permissions` has the kernel enforce them.
//! - With passthrough the kernel reads and maps the backing file in the state directory itself
//!   and pagerd only sees `open` and `release`. One backing id per snapshot is shared by all
//!   its open handles.
//! - Nothing here changes anything: the mount is read-only, so the kernel answers `EROFS` to
//!   every mutation before it reaches this filesystem; opening for writing is refused here too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use proto::model::ReadPath;

use super::inodes::{Inodes, Node, ROOT, SNAPSHOTS};
use super::warm::Warmer;
use crate::access::Access;
use crate::file_users::FileKey;
use crate::lifecycle::{MemoryFiles, SNAPSHOTS_DIR};
use crate::snapshot::Snapshot;
use crate::store::MEMORY_FILE;

/// How long the kernel may trust names and attributes. Memory files never change, but a
/// deleted and re-registered snapshot must be looked up again soon.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;

/// A memory file open in some process.
#[derive(Debug)]
struct OpenFile {
    snapshot: Arc<Snapshot>,
    /// Held while the handle is open, so every handle of a snapshot shares one backing id.
    _backing: Option<Arc<BackingId>>,
}

/// The filesystem.
#[derive(Debug)]
pub struct MemoryFs {
    files: Arc<dyn MemoryFiles>,
    inodes: Inodes,
    wanted: ReadPath,
    /// Whether passthrough was granted by the kernel at `init`.
    passthrough: Arc<AtomicBool>,
    /// The mount's device (major, minor), as `/proc/<pid>/maps` shows it for mappings.
    device: Arc<OnceLock<(u64, u64)>>,
    open: Mutex<HashMap<u64, OpenFile>>,
    /// Passthrough backing ids by memory-file inode (inodes are per snapshot instance), alive
    /// while some open handle holds one.
    backings: Mutex<HashMap<u64, Weak<BackingId>>>,
    uid: u32,
    gid: u32,
    file_mode: u16,
    dir_mode: u16,
    /// Pushes working sets into memory files' page caches (cached path).
    warmer: Arc<Warmer>,
}

impl MemoryFs {
    /// A filesystem over the lifecycle's snapshots; `passthrough` reports what the kernel
    /// granted.
    pub fn new(
        files: Arc<dyn MemoryFiles>,
        wanted: ReadPath,
        passthrough: Arc<AtomicBool>,
        device: Arc<OnceLock<(u64, u64)>>,
        access: Access,
        warmer: Arc<Warmer>,
    ) -> Self {
        let mode = |m: u32| u16::try_from(m & 0o7777).unwrap_or(0);
        Self {
            device,
            files,
            inodes: Inodes::new(),
            wanted,
            passthrough,
            open: Mutex::new(HashMap::new()),
            backings: Mutex::new(HashMap::new()),
            uid: access.uid(),
            gid: access.gid(),
            file_mode: mode(access.memory_mode()),
            dir_mode: mode(access.read_only_dir_mode()),
            warmer,
        }
    }

    fn open_files(&self) -> MutexGuard<'_, HashMap<u64, OpenFile>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, ino: u64, node: &Node) -> Option<FileAttr> {
        let (kind, perm, nlink, size, time) = match node {
            Node::Root | Node::Snapshots => (
                FileType::Directory,
                self.dir_mode,
                2,
                0,
                SystemTime::UNIX_EPOCH,
            ),
            Node::SnapshotDir(s) => {
                let s = s.upgrade()?;
                (FileType::Directory, self.dir_mode, 2, 0, s.created())
            }
            Node::Memory(s) => {
                let s = s.upgrade()?;
                (
                    FileType::RegularFile,
                    self.file_mode,
                    1,
                    s.size(),
                    s.created(),
                )
            }
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    fn reply_entry(&self, ino: u64, reply: ReplyEntry) {
        match self.inodes.node(ino).and_then(|n| self.attr(ino, &n)) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// The backing id of a snapshot's memory file, registering the file with the kernel when
    /// no open handle holds one.
    fn backing_for(
        &self,
        ino: u64,
        snapshot: &Snapshot,
        reply: &ReplyOpen,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut backings = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = backings.get(&ino).and_then(Weak::upgrade) {
            return Ok(id);
        }
        // The snapshot's own descriptor: the very file that was checked, not a path
        // looked up again.
        let id = Arc::new(reply.open_backing(snapshot.file().try_clone()?)?);
        backings.insert(ino, Arc::downgrade(&id));
        backings.retain(|_, id| id.strong_count() > 0);
        Ok(id)
    }

    fn open_memory(&self, req: &Request, ino: u64, snapshot: Arc<Snapshot>, reply: ReplyOpen) {
        let pid = i32::try_from(req.pid()).map_or(0, crate::sys::thread_group_of);
        // Mappings show the file the process opened (this mount's inode), passthrough or not.
        let key = self.device.get().map(|&(major, minor)| FileKey {
            major,
            minor,
            inode: ino,
        });
        let handle = match self.files.open_memory_file(&snapshot, pid, key) {
            Ok(h) => h,
            Err(e) => {
                tracing::info!(snapshot = %snapshot.id(), pid, reason = %e, "memory file open refused");
                return reply.error(Errno::ENOENT);
            }
        };
        let backing = if self.passthrough.load(Ordering::Relaxed) {
            match self.backing_for(ino, &snapshot, &reply) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::error!(snapshot = %snapshot.id(), error = %e, "cannot register the backing file for passthrough");
                    self.files.release_memory_file(handle);
                    return reply.error(Errno::EIO);
                }
            }
        } else {
            None
        };
        if backing.is_none() {
            if let Some(set) = snapshot.working_set.current() {
                self.warmer.warm(ino, snapshot.id().as_str(), set);
            }
        }
        let fh = FileHandle(handle);
        // Known before the kernel learns the handle, so its release can never come first.
        self.open_files().insert(
            handle,
            OpenFile {
                snapshot,
                _backing: backing.clone(),
            },
        );
        match &backing {
            // The kernel refuses cache flags with passthrough: the backing file's page cache
            // is the one every fork shares.
            Some(id) => reply.opened_passthrough(fh, FopenFlags::empty(), id),
            None => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
        }
    }
}

fn is_write(flags: OpenFlags) -> bool {
    flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0
}

impl Filesystem for MemoryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for the largest readahead the kernel offers (it caps what it offered).
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        if self.wanted == ReadPath::Passthrough {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            self.passthrough.store(granted, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = match (self.inodes.node(parent.0), name.to_str()) {
            (Some(Node::Root), Some(SNAPSHOTS_DIR)) => Some(SNAPSHOTS),
            (Some(Node::Snapshots), Some(id)) => id
                .parse()
                .ok()
                .and_then(|id| self.files.openable_snapshot(&id))
                .map(|s| self.inodes.snapshot_dir(&s)),
            (Some(Node::SnapshotDir(s)), Some(MEMORY_FILE)) => {
                s.upgrade().map(|s| self.inodes.snapshot_dir(&s) + 1)
            }
            _ => None,
        };
        match ino {
            Some(ino) => self.reply_entry(ino, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inodes.node(ino.0).and_then(|n| self.attr(ino.0, &n)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.inodes.node(ino.0) {
            Some(Node::Memory(s)) => {
                if is_write(flags) {
                    return reply.error(Errno::EROFS);
                }
                match s.upgrade() {
                    Some(s) => self.open_memory(req, ino.0, s, reply),
                    None => reply.error(Errno::ENOENT),
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(snapshot) = self.open_files().get(&fh.0).map(|f| f.snapshot.clone()) else {
            return reply.error(Errno::EBADF);
        };
        match snapshot.read_at(offset, size as usize) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => {
                tracing::warn!(snapshot = %snapshot.id(), offset, size, error = %e, "memory file read failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let removed = self.open_files().remove(&fh.0);
        if removed.is_some() {
            self.files.release_memory_file(fh.0);
        }
        // Dropping the handle's backing id here, after the reference is recorded as ended.
        drop(removed);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        match self.inodes.node(ino.0) {
            Some(Node::Root) => {
                entries.push((SNAPSHOTS, FileType::Directory, SNAPSHOTS_DIR.into()))
            }
            Some(Node::Snapshots) => {
                entries[1].0 = ROOT;
                for s in self.files.openable_snapshots() {
                    let dir = self.inodes.snapshot_dir(&s);
                    entries.push((dir, FileType::Directory, s.id().to_string()));
                }
            }
            Some(Node::SnapshotDir(s)) => {
                entries[1].0 = SNAPSHOTS;
                if s.upgrade().is_some() {
                    entries.push((ino.0 + 1, FileType::RegularFile, MEMORY_FILE.into()));
                }
            }
            Some(Node::Memory(_)) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let snapshots = self.files.openable_snapshots();
        let bytes: u64 = snapshots.iter().map(|s| s.size()).sum();
        let files = snapshots.len() as u64 * 2 + 2;
        reply.statfs(bytes / u64::from(BLOCK), 0, 0, files, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Memory files are not terminals or devices (`isatty` asks).
        reply.error(Errno::ENOTTY);
    }
}
