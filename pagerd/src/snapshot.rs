//! A snapshot: an immutable memory file, mapped once, read-only and shared, by the daemon.
//!
//! Every fork of the snapshot is served from this one mapping, so one copy of the file in the
//! page cache feeds them all. When the snapshot is opened pagerd also records which 4 KiB pages
//! of the file are all zeros: those are answered with `UFFDIO_ZEROPAGE` (the kernel's shared
//! zero page) instead of a copy.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::{Mmap, MmapOptions};

use crate::bitmap::Bitmap;
use proto::Id;

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
    id: Id,
    path: PathBuf,
    map: Mmap,
    zero_pages: Bitmap,
    created: SystemTime,
}

impl Snapshot {
    /// Maps `path` read-only and records its zero pages.
    pub fn open(id: Id, path: &Path) -> Result<Self, SnapshotError> {
        let open_err = |source| SnapshotError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = meta.len();
        if size == 0 || size % ZERO_MAP_PAGE != 0 {
            return Err(SnapshotError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        // SAFETY: pagerd never writes a registered memory file and maps it read-only; the
        // bytes are only read (as `UFFDIO_COPY` sources and here).
        let map =
            unsafe { MmapOptions::new().map(&file) }.map_err(|source| SnapshotError::Map {
                path: path.to_owned(),
                source,
            })?;
        let zero_pages = find_zero_pages(&map);
        Ok(Self {
            id,
            path: path.to_owned(),
            map,
            zero_pages,
            created: meta.modified().unwrap_or_else(|_| SystemTime::now()),
        })
    }

    /// The snapshot's id.
    pub fn id(&self) -> &Id {
        &self.id
    }

    /// The memory file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the memory file in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// When the memory file was written.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The memory file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Whether the 4 KiB page at `file_offset` is all zeros.
    pub fn is_zero_page(&self, file_offset: u64) -> bool {
        self.zero_pages.get(file_offset / ZERO_MAP_PAGE)
    }

    /// How many 4 KiB pages of the file are all zeros.
    pub fn zero_page_count(&self) -> u64 {
        self.zero_pages.count_ones()
    }
}

fn find_zero_pages(bytes: &[u8]) -> Bitmap {
    static ZERO: [u8; ZERO_MAP_PAGE as usize] = [0; ZERO_MAP_PAGE as usize];
    let mut map = Bitmap::new(bytes.len() as u64 / ZERO_MAP_PAGE);
    for (i, page) in bytes.chunks_exact(ZERO_MAP_PAGE as usize).enumerate() {
        if page == ZERO {
            map.set(i as u64);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn records_zero_pages_and_rejects_bad_sizes() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[4096 + 17] = 1;
        bytes[3 * 4096] = 9;
        file.write_all(&bytes).unwrap();
        let snap = Snapshot::open("s".parse().unwrap(), file.path()).unwrap();
        assert_eq!(snap.size(), 4 * 4096);
        assert!(snap.is_zero_page(0) && snap.is_zero_page(2 * 4096));
        assert!(!snap.is_zero_page(4096) && !snap.is_zero_page(3 * 4096));
        assert_eq!(snap.zero_page_count(), 2);
        assert_eq!(snap.bytes(), &bytes[..]);

        file.write_all(b"odd").unwrap();
        let err = Snapshot::open("s".parse().unwrap(), file.path()).unwrap_err();
        assert!(matches!(err, SnapshotError::BadSize { size, .. } if size == 4 * 4096 + 3));
    }
}
