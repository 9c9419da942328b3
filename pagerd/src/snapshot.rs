//! A snapshot: an immutable memory file, mapped once, read-only and shared, by the daemon.
//!
//! Every fork of the snapshot is served from this one mapping, so one copy of the file in the
//! page cache feeds them all. When the snapshot is opened pagerd also records which 4 KiB pages
//! of the file are all zeros: those are answered with `UFFDIO_ZEROPAGE` (the kernel's shared
//! zero page) instead of a copy.
//!
//! ```text
//!   mapping (PROT_READ, MAP_SHARED) ──▶ only ever a source for the kernel: UFFDIO_COPY
//!   descriptor (O_NOFOLLOW)         ──▶ every read pagerd makes itself: pread
//!                                       (zero-page scan, FUSE cached reads, change checks)
//! ```
//!
//! A file truncated behind pagerd's back (a linked file whose owner broke the link contract)
//! is then a short read, an error, for pagerd, and `EFAULT` for `UFFDIO_COPY`; never a SIGBUS.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::{Mmap, MmapOptions};

use crate::bitmap::Bitmap;
use crate::memory::{CopySource, FileOffset, FilePage, MemorySource};
use crate::working_set::slot::Slot;
use proto::SnapshotId;

/// The granularity of the zero-page map.
pub const ZERO_MAP_PAGE: u64 = 4096;

/// Why a memory file cannot be a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened or inspected.
    #[error("cannot open memory file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty or not a whole number of 4 KiB pages.
    #[error("memory file {path} is {size} bytes; it must be a non-zero multiple of 4096")]
    BadSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file could not be read (it may have shrunk while it was read).
    #[error("cannot read memory file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be mapped.
    #[error("cannot map memory file {path}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An immutable memory file and what pagerd knows about it.
#[derive(Debug)]
pub struct Snapshot {
    id: SnapshotId,
    file: File,
    map: Mmap,
    zero_pages: Bitmap,
    /// Whether the zero pages were found by reading the file (not known beforehand).
    zero_pages_scanned: bool,
    created: SystemTime,
    /// Its recorded working set and any recording in progress.
    pub working_set: Slot,
}

impl Snapshot {
    /// Opens `path` (not following a symlink), maps it read-only and records its zero pages:
    /// those `stored` knows for the open file and its number of 4 KiB pages, else found by
    /// reading the file.
    pub fn open(
        id: SnapshotId,
        path: &Path,
        stored: impl FnOnce(&File, u64) -> Option<Bitmap>,
    ) -> Result<Self, SnapshotError> {
        let open_err = |source| SnapshotError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let size = meta.len();
        if size == 0 || size % ZERO_MAP_PAGE != 0 {
            return Err(SnapshotError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        // SAFETY: memmap2 requires that the mapped file not change while mapped, because Rust
        // code reading the map would see bytes change under a shared reference, or be killed
        // by SIGBUS past a truncated end. That holds here because:
        // - the mapping is read-only, and pagerd never writes the file;
        // - nobody else writes it either: it is pagerd's private copy (mode 0400/0440, in a
        //   0700/0750 state directory, written completely before this point), or, with
        //   `ImportMode::Link`, the caller's file, whose owner promised never to write it
        //   again (the documented link contract) — a promise the change checks enforce: the
        //   snapshot is marked damaged and no new forks are made;
        // - pagerd's own code never reads the map: `bytes` is only handed to the kernel as a
        //   `UFFDIO_COPY` source (which answers EFAULT, not a signal, past a truncated end),
        //   and every read of pagerd's own goes through `pread` on `file` (`read_at`).
        let map =
            unsafe { MmapOptions::new().map(&file) }.map_err(|source| SnapshotError::Map {
                path: path.to_owned(),
                source,
            })?;
        let known = stored(&file, size / ZERO_MAP_PAGE);
        let zero_pages_scanned = known.is_none();
        let zero_pages = match known {
            Some(map) => map,
            None => find_zero_pages(&file, size).map_err(|source| SnapshotError::Read {
                path: path.to_owned(),
                source,
            })?,
        };
        Ok(Self {
            id,
            file,
            map,
            zero_pages,
            zero_pages_scanned,
            created: meta.modified().unwrap_or_else(|_| SystemTime::now()),
            working_set: Slot::default(),
        })
    }

    /// The snapshot's id.
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// Size of the memory file in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// When the memory file was written.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The open memory file, for `fstat` and `pread`.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Up to `len` bytes at `offset`, cut at the snapshot's size; `pread` on the file, so a
    /// file that shrank behind pagerd's back is an error (`UnexpectedEof`), not a signal.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let size = self.size();
        let start = offset.min(size);
        let end = start.saturating_add(len as u64).min(size);
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(usize::MAX)];
        self.file.read_exact_at(&mut buf, start)?;
        Ok(buf)
    }

    /// Which 4 KiB pages of the file are all zeros.
    pub fn zero_map(&self) -> &Bitmap {
        &self.zero_pages
    }

    /// Whether opening it read the file to find its zero pages.
    pub fn zero_pages_scanned(&self) -> bool {
        self.zero_pages_scanned
    }

    /// How many 4 KiB pages of the file are all zeros.
    pub fn zero_page_count(&self) -> u64 {
        self.zero_pages.count_ones()
    }
}

/// The snapshot as the source of its forks' memory. The mapping is handed to the kernel only
/// (as [`CopySource`]s): pagerd's own code must not read it, and reads with
/// [`Snapshot::read_at`].
impl MemorySource for Snapshot {
    fn size(&self) -> u64 {
        Snapshot::size(self)
    }

    fn is_zero_page(&self, page: FilePage) -> bool {
        self.zero_pages.get(page.0)
    }

    fn copy_source(&self, at: FileOffset, len: u64) -> Option<CopySource<'_>> {
        let start = usize::try_from(at.0).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.map.get(start..end).map(CopySource::new)
    }
}

/// The all-zero 4 KiB pages of the first `size` bytes of `file`: holes without reading them,
/// data extents with `pread` (an error if the file is shorter than `size`).
fn find_zero_pages(file: &File, size: u64) -> io::Result<Bitmap> {
    let pages = size / ZERO_MAP_PAGE;
    let mut map = Bitmap::new(pages);
    map.fill(0, pages, true);
    crate::extents::read_data(file, size, |offset, bytes| {
        for (i, page) in (offset / ZERO_MAP_PAGE..).zip(bytes.chunks(ZERO_MAP_PAGE as usize)) {
            if !crate::extents::is_zero(page) {
                map.fill(i, i + 1, false);
            }
        }
        Ok(())
    })?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_are_zero_pages() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4 << 20).unwrap();
        file.as_file()
            .write_all_at(&[9u8; 10], (2 << 20) + 4095)
            .unwrap();
        let snap = Snapshot::open("s".parse().unwrap(), file.path(), |_, _| None).unwrap();
        assert_eq!(snap.zero_page_count(), 1024 - 2);
        let zero = |offset: u64| snap.is_zero_page(FileOffset(offset).page());
        assert!(!zero(2 << 20) && !zero((2 << 20) + 4096));
        assert!(zero((2 << 20) + 8192) && zero((2 << 20) - 4096));
    }

    #[test]
    fn a_symlink_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), [0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("f"), dir.path().join("l")).unwrap();
        assert!(Snapshot::open("s".parse().unwrap(), &dir.path().join("l"), |_, _| None).is_err());
    }

    #[test]
    fn records_zero_pages_and_rejects_bad_sizes() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[4096 + 17] = 1;
        bytes[3 * 4096] = 9;
        file.write_all(&bytes).unwrap();
        let snap = Snapshot::open("s".parse().unwrap(), file.path(), |_, _| None).unwrap();
        assert_eq!(snap.size(), 4 * 4096);
        let zero = |page: u64| snap.is_zero_page(FilePage(page));
        assert!(zero(0) && zero(2));
        assert!(!zero(1) && !zero(3));
        assert_eq!(snap.zero_page_count(), 2);
        assert_eq!(
            snap.copy_source(FileOffset(0), 4 * 4096).unwrap().len(),
            4 * 4096
        );
        assert!(
            snap.copy_source(FileOffset(4096), 4 * 4096).is_none(),
            "past the end"
        );
        assert_eq!(snap.read_at(4096 + 17, 2).unwrap(), [1, 0]);
        assert_eq!(snap.read_at(3 * 4096, 1 << 20).unwrap().len(), 4096);
        assert!(snap.read_at(1 << 30, 10).unwrap().is_empty());

        // A file that shrinks behind the snapshot's back is an error, not a signal.
        file.as_file().set_len(4096).unwrap();
        let err = snap.read_at(2 * 4096, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        file.as_file().set_len(4 * 4096).unwrap();
        file.as_file().write_all_at(&bytes, 0).unwrap();

        file.as_file().write_all_at(b"odd", 4 * 4096).unwrap();
        let err = Snapshot::open("s".parse().unwrap(), file.path(), |_, _| None).unwrap_err();
        assert!(matches!(err, SnapshotError::BadSize { size, .. } if size == 4 * 4096 + 3));
    }
}
