//! Bringing a memory file into the state directory, always from an open descriptor.
//!
//! ```text
//! source: a path, opened once here (O_NOFOLLOW: no symlinks)  ─┐
//!         or a descriptor the client opened and passed        ─┴▶ regular file, open for reading
//!
//! ImportMode::Copy (default)   FICLONE (reflink) where the filesystem can
//!                              else a sparse copy: data extents by copy_file_range, holes stay
//!                              ─▶ fsync ─▶ 0400 (0440 root:GROUP): pagerd's private file
//! ImportMode::Link             linkat(fd, "", AT_EMPTY_PATH): a second name for the caller's
//!                              inode; its owner and modes are left exactly as they are
//! ```
//!
//! The caller's file is never changed: it is read with explicit offsets (`copy_file_range`,
//! `pread`), and a hole lookup puts the descriptor's offset back.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, AT_FDCWD};
pub use proto::model::ImportMethod;

use crate::access::Access;

/// How a memory file is brought in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImportMode {
    /// pagerd's own copy: a reflink where the filesystem supports it (instant, no extra
    /// space), else a byte copy. Whatever happens to the caller's file afterwards, the
    /// snapshot keeps the bytes it had at registration.
    #[default]
    Copy,
    /// A hard link to the caller's file: no copy, but the snapshot *is* that file. The file
    /// must never be written, truncated, or replaced in place again, for as long as the
    /// snapshot exists: forks read it at any time. It must be on the state directory's
    /// filesystem. pagerd leaves its owner and modes alone and watches its size and times: a
    /// change marks the snapshot damaged and no new forks of it are made (forks already
    /// running may see the new bytes). `chmod`, `chown` and adding or removing names of the
    /// file count as changes too.
    Link,
}

/// Why a file cannot be a snapshot's source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path names a symlink.
    #[error("is a symlink; pass the target")]
    Symlink,
    /// Not a regular file.
    #[error("not a regular file")]
    NotRegular,
    /// A descriptor that cannot be read (write-only or `O_PATH`).
    #[error("the descriptor is not open for reading")]
    NotReadable,
    /// Opening or inspecting it failed.
    #[error("cannot open it")]
    Open(#[source] io::Error),
}

/// A memory file to register: open, checked, and named for the record.
#[derive(Debug)]
pub struct Source {
    /// The open file.
    pub file: File,
    /// Its metadata when it was checked.
    pub meta: std::fs::Metadata,
    /// Its name, for the record and for messages (not used to open anything).
    pub name: PathBuf,
}

impl Source {
    /// Opens the file at `path` ([`open_source`]).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let (file, meta) = open_source(path)?;
        Ok(Self {
            file,
            meta,
            name: path.to_owned(),
        })
    }

    /// Takes a descriptor a client opened and passed ([`check_source`]); `name` is what the
    /// client calls it, or else what `/proc/self/fd` shows.
    pub fn from_fd(fd: OwnedFd, name: Option<PathBuf>) -> Result<Self, SourceError> {
        let file = File::from(fd);
        let meta = check_source(&file)?;
        let name = name.unwrap_or_else(|| {
            std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .unwrap_or_else(|_| PathBuf::from("(descriptor)"))
        });
        Ok(Self { file, meta, name })
    }
}

/// Opens the file at `path` for reading, refusing a symlink in its last component and
/// anything but a regular file. Opening does not block (a FIFO is refused, not waited on).
pub fn open_source(path: &Path) -> Result<(File, std::fs::Metadata), SourceError> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(SourceError::Symlink),
        Err(e) => return Err(SourceError::Open(e)),
    };
    let meta = check_source(&file)?;
    Ok((file, meta))
}

/// Checks that a descriptor (opened by pagerd or passed by a client) is a regular file open
/// for reading; returns its metadata.
pub fn check_source(file: &File) -> Result<std::fs::Metadata, SourceError> {
    let flags = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| SourceError::Open(e.into()))?;
    let flags = OFlag::from_bits_truncate(flags);
    let access = flags & OFlag::O_ACCMODE;
    if flags.contains(OFlag::O_PATH) || !(access == OFlag::O_RDONLY || access == OFlag::O_RDWR) {
        return Err(SourceError::NotReadable);
    }
    let meta = file.metadata().map_err(SourceError::Open)?;
    if !meta.is_file() {
        return Err(SourceError::NotRegular);
    }
    Ok(meta)
}

/// Brings `src` (a checked source of `size` bytes) in as `dst`, which must not exist. A copy
/// gets `access`'s memory-file mode and group; a link is left as it is.
pub fn import(
    src: &File,
    dst: &Path,
    size: u64,
    mode: ImportMode,
    access: &Access,
    done: &AtomicU64,
) -> io::Result<ImportMethod> {
    match mode {
        ImportMode::Link => {
            link(src, dst)?;
            Ok(ImportMethod::Hardlink)
        }
        ImportMode::Copy => {
            let method = clone_or_copy(src, dst, size, done);
            match method {
                Ok(method) => {
                    access.apply(dst, access.memory_mode())?;
                    Ok(method)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(dst);
                    Err(e)
                }
            }
        }
    }
}

/// `linkat(src, "", dst, AT_EMPTY_PATH)`, which needs `CAP_DAC_READ_SEARCH`; without it,
/// through `/proc/self/fd`.
fn link(src: &File, dst: &Path) -> io::Result<()> {
    match nix::unistd::linkat(src, "", AT_FDCWD, dst, AtFlags::AT_EMPTY_PATH) {
        Err(Errno::ENOENT) => {
            let proc_path = format!("/proc/self/fd/{}", src.as_raw_fd());
            nix::unistd::linkat(
                AT_FDCWD,
                proc_path.as_str(),
                AT_FDCWD,
                dst,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        }
        other => other,
    }
    .map_err(io::Error::from)
}

fn clone_or_copy(src: &File, dst: &Path, size: u64, done: &AtomicU64) -> io::Result<ImportMethod> {
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(dst)?;
    let method = if rustix::fs::ioctl_ficlone(&target, src).is_ok() {
        ImportMethod::Reflink
    } else {
        copy_sparse(src, &target, size, done)?;
        ImportMethod::Copy
    };
    target.sync_all()?;
    done.store(size, Ordering::Relaxed);
    Ok(method)
}

/// Copies the first `size` bytes of `src`, leaving holes where `src` has them; `done`
/// counts the bytes behind (holes included) as it goes.
fn copy_sparse(src: &File, dst: &File, size: u64, done: &AtomicU64) -> io::Result<()> {
    dst.set_len(size)?;
    for extent in crate::extents::data_extents(src, size)? {
        done.store(extent.start, Ordering::Relaxed);
        copy_range(src, dst, extent.start, extent.end, done)?;
    }
    Ok(())
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was copied",
    )
}

/// Copies bytes `start..end` in the kernel (`copy_file_range`), or through a buffer where
/// the kernel cannot (across some filesystems).
fn copy_range(src: &File, dst: &File, start: u64, end: u64, done: &AtomicU64) -> io::Result<()> {
    use rustix::io::Errno as E;
    let mut offset = start;
    while offset < end {
        // 64 MiB a call: progress shows, and a call never runs long.
        let len = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(64 << 20);
        let (mut off_in, mut off_out) = (offset, offset);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), len) {
            Ok(0) => return Err(shrank()),
            Ok(n) => {
                offset += n as u64;
                done.store(offset, Ordering::Relaxed);
            }
            Err(E::INTR) => {}
            Err(E::XDEV | E::INVAL | E::NOSYS | E::OPNOTSUPP) => {
                return copy_range_buffered(src, dst, offset, end, done);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// [`copy_range`] through a buffer; all-zero chunks are not written (they stay holes).
fn copy_range_buffered(
    src: &File,
    dst: &File,
    start: u64,
    end: u64,
    done: &AtomicU64,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = start;
    while offset < end {
        let want = usize::try_from((end - offset).min(CHUNK)).unwrap_or(buf.len());
        let n = match src.read_at(&mut buf[..want], offset) {
            Ok(0) => return Err(shrank()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset)?;
        }
        offset += n as u64;
        done.store(offset, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn source(dir: &Path, bytes: &[u8]) -> (std::path::PathBuf, File, u64) {
        let path = dir.join("src");
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (file, meta) = open_source(&path).unwrap();
        (path, file, meta.len())
    }

    #[test]
    fn a_copy_is_private_and_read_only_and_the_source_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (src, file, size) = source(dir.path(), &[7u8; 8192]);
        let dst = dir.path().join("dst");
        let method = import(
            &file,
            &dst,
            size,
            ImportMode::Copy,
            &Access::default(),
            &Default::default(),
        )
        .unwrap();
        assert_ne!(method, ImportMethod::Hardlink);
        assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 8192]);
        let (src_meta, dst_meta) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(&dst).unwrap(),
        );
        assert_ne!(src_meta.ino(), dst_meta.ino());
        assert_eq!(dst_meta.mode() & 0o7777, 0o400);
        assert_eq!(src_meta.mode() & 0o7777, 0o640, "the source keeps its mode");
        // Overwriting the source does not reach the copy.
        std::fs::write(&src, [1u8; 8192]).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn a_link_shares_the_inode_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (src, file, size) = source(dir.path(), &[3u8; 4096]);
        let dst = dir.path().join("dst");
        let method = import(
            &file,
            &dst,
            size,
            ImportMode::Link,
            &Access::default(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(method, ImportMethod::Hardlink);
        let (src_meta, dst_meta) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(&dst).unwrap(),
        );
        assert_eq!(src_meta.ino(), dst_meta.ino());
        assert_eq!(
            src_meta.mode() & 0o7777,
            0o640,
            "the shared inode keeps its mode"
        );
    }

    #[test]
    fn copies_keep_holes_and_cross_filesystems() {
        let src_dir = tempfile::tempdir().unwrap();
        let path = src_dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[5u8; 4096], 4 << 20).unwrap();
        drop(file);
        let (file, meta) = open_source(&path).unwrap();
        for dst_dir in [
            tempfile::tempdir().unwrap(),
            tempfile::tempdir_in("/dev/shm").unwrap(),
        ] {
            let dst = dst_dir.path().join("dst");
            import(
                &file,
                &dst,
                meta.len(),
                ImportMode::Copy,
                &Access::default(),
                &Default::default(),
            )
            .unwrap();
            let copied = std::fs::read(&dst).unwrap();
            assert_eq!(copied, std::fs::read(&path).unwrap());
            let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
            assert!(allocated < 1 << 20, "holes stay holes: {allocated} bytes");
        }
    }

    #[test]
    fn symlinks_directories_and_write_only_descriptors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _, _) = source(dir.path(), &[1u8; 4096]);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let err = open_source(&link).unwrap_err();
        assert_eq!(err.to_string(), "is a symlink; pass the target");
        assert!(matches!(
            open_source(dir.path()),
            Err(SourceError::NotRegular)
        ));
        let write_only = OpenOptions::new().write(true).open(&src).unwrap();
        assert!(matches!(
            check_source(&write_only),
            Err(SourceError::NotReadable)
        ));
        let o_path = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_PATH.bits())
            .open(&src)
            .unwrap();
        assert!(matches!(
            check_source(&o_path),
            Err(SourceError::NotReadable)
        ));
    }
}
