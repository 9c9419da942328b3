//! Bringing a memory file into the state directory, always from an open descriptor.
//!
//! ```text
//! source: a path, opened once here (O_NOFOLLOW: no symlinks)  ─┐
//!         or a descriptor the client opened and passed        ─┴▶ regular file, open for reading
//!
//! ImportMode::Copy (default)   FICLONE (reflink) where the filesystem can
//!                              else a sparse copy of data only: the source's data extents are
//!                              read a MiB at a time and only pages holding a non-zero byte are
//!                              written (holes and all-zero pages stay holes); the zero map is
//!                              learnt on the way, so the copy is never read again for it
//!                              ─▶ fsync ─▶ 0400 (0440 root:GROUP): pagerd's private file
//! ImportMode::Link             linkat(fd, "", AT_EMPTY_PATH): a second name for the caller's
//!                              inode; its owner and modes are left exactly as they are
//! ```
//!
//! The caller's file is never changed: it is read with explicit offsets (`pread`), and a
//! hole lookup puts the descriptor's offset back.

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
use crate::bitmap::Bitmap;
use crate::snapshot::ZERO_MAP_PAGE;

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

/// What an import did: how the file came in, and, for a byte copy, which 4 KiB pages of it
/// are all zeros.
#[derive(Debug)]
pub struct Imported {
    /// How.
    pub method: ImportMethod,
    /// The zero map learnt while copying (a link or a reflink reads nothing).
    pub zero_map: Option<Bitmap>,
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
) -> io::Result<Imported> {
    match mode {
        ImportMode::Link => {
            link(src, dst)?;
            Ok(Imported {
                method: ImportMethod::Hardlink,
                zero_map: None,
            })
        }
        ImportMode::Copy => {
            let imported = clone_or_copy(src, dst, size, done);
            match imported {
                Ok(imported) => {
                    access.apply(dst, access.memory_mode())?;
                    Ok(imported)
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

fn clone_or_copy(src: &File, dst: &Path, size: u64, done: &AtomicU64) -> io::Result<Imported> {
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(dst)?;
    let imported = if rustix::fs::ioctl_ficlone(&target, src).is_ok() {
        Imported {
            method: ImportMethod::Reflink,
            zero_map: None,
        }
    } else {
        Imported {
            method: ImportMethod::Copy,
            zero_map: Some(copy_data(src, &target, size, done)?),
        }
    };
    target.sync_all()?;
    done.store(size, Ordering::Relaxed);
    Ok(imported)
}

/// Copies the first `size` bytes of `src` (a whole number of 4 KiB pages), writing only pages
/// that hold a non-zero byte: holes and all-zero pages stay holes. Returns the zero map (one
/// bit per page); `done` counts the bytes behind (holes included) as it goes.
pub(crate) fn copy_data(src: &File, dst: &File, size: u64, done: &AtomicU64) -> io::Result<Bitmap> {
    dst.set_len(size)?;
    let pages = size / ZERO_MAP_PAGE;
    let mut zero = Bitmap::try_new(pages).map_err(|_| io::ErrorKind::OutOfMemory)?;
    zero.fill(0, pages, true);
    crate::extents::read_data(src, size, |offset, chunk| {
        done.store(offset, Ordering::Relaxed);
        write_data_pages(dst, chunk, offset, &mut zero)
    })
    .map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => shrank(),
        _ => e,
    })?;
    Ok(zero)
}

/// Writes the runs of pages of `chunk` (at `offset`) that hold a non-zero byte, and clears
/// their bits in the zero map.
fn write_data_pages(dst: &File, chunk: &[u8], offset: u64, zero: &mut Bitmap) -> io::Result<()> {
    let page = ZERO_MAP_PAGE as usize;
    let first_page = offset / ZERO_MAP_PAGE;
    let pages: Vec<bool> = chunk
        .chunks(page)
        .map(|p| !crate::extents::is_zero(p))
        .collect();
    let mut i = 0;
    while i < pages.len() {
        if !pages[i] {
            i += 1;
            continue;
        }
        let run_end = (i..pages.len()).find(|&j| !pages[j]).unwrap_or(pages.len());
        let bytes = &chunk[i * page..(run_end * page).min(chunk.len())];
        dst.write_all_at(bytes, offset + (i * page) as u64)?;
        zero.fill(first_page + i as u64, first_page + run_end as u64, false);
        i = run_end;
    }
    Ok(())
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was copied",
    )
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
        assert_ne!(method.method, ImportMethod::Hardlink);
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
        assert_eq!(method.method, ImportMethod::Hardlink);
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
    fn a_byte_copy_writes_only_pages_with_data_and_learns_the_zero_map() {
        let dir = tempfile::tempdir().unwrap();
        // 4 MiB of data with zero pages inside it: pages 1, 2 and 700..1024.
        let mut bytes = vec![3u8; 4 << 20];
        bytes[4096..3 * 4096].fill(0);
        bytes[700 * 4096..].fill(0);
        bytes[5000] = 0; // a zero byte in a data page changes nothing
        let (src, file, size) = source(dir.path(), &bytes);
        let dst = dir.path().join("dst");
        let target = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .unwrap();
        let zero = copy_data(&file, &target, size, &AtomicU64::new(0)).unwrap();
        drop(target);
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        assert_eq!(zero.count_ones(), 2 + (1024 - 700));
        assert!(zero.get(1) && zero.get(2) && zero.get(700) && zero.get(1023));
        assert!(!zero.get(0) && !zero.get(3) && !zero.get(699));
        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            allocated <= 698 * 4096 + (64 << 10),
            "zero pages are not written: {allocated} bytes allocated"
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
