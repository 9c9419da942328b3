//! The page cache of snapshot files, for cold-cache runs: dropping a file's cached pages
//! (`fdatasync`, then `posix_fadvise(POSIX_FADV_DONTNEED)`), reading a file into the cache, and
//! measuring how much of a file is cached (`mincore` on a fresh mapping, which asks the page
//! cache, not this process's page tables).
//!
//! A page that some process maps cannot be dropped: pagerd's shared mapping of a snapshot keeps
//! every page it has copied from, which is why a cold run starts a fresh pagerd before dropping.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Writes back and drops the cached pages of `path` (those no process maps).
pub fn drop_file(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // Dirty pages cannot be dropped: write them back first.
    file.sync_data()?;
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open for the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Reads all of `path` once, so that its pages are in the page cache.
pub fn warm_file(path: &Path) -> io::Result<()> {
    std::io::copy(&mut File::open(path)?, &mut std::io::sink()).map(drop)
}

/// Bytes of a file, and how many of them are in the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residency {
    /// Bytes cached.
    pub cached: u64,
    /// Bytes in all.
    pub size: u64,
}

impl Residency {
    /// The cached share, in percent (0 for no bytes).
    pub fn percent(&self) -> f64 {
        if self.size == 0 {
            0.0
        } else {
            self.cached as f64 * 100.0 / self.size as f64
        }
    }
}

impl std::ops::Add for Residency {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            cached: self.cached + other.cached,
            size: self.size + other.size,
        }
    }
}

/// How much of `path` is in the page cache.
pub fn residency(path: &Path) -> io::Result<Residency> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(Residency::default());
    }
    // SAFETY: a read-only shared mapping only handed to mincore; no byte of it is read, so a
    // file changing underneath cannot be observed.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let pages = size.div_ceil(page);
    let mut vec = vec![0u8; usize::try_from(pages).map_err(io::Error::other)?];
    // SAFETY: `map` is a live mapping of `map.len()` bytes and `vec` has one byte per page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let cached_pages = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok(Residency {
        cached: (cached_pages * page).min(size),
        size,
    })
}

/// Every regular file under `dir`, recursively (symlinks are not followed).
pub fn regular_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files.extend(regular_files(&entry.path())?);
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Drops the cached pages of every file in `files`, then measures what is still cached of
/// all of them together.
pub fn drop_all(files: &[PathBuf]) -> io::Result<Residency> {
    for file in files {
        drop_file(file)?;
    }
    files
        .iter()
        .try_fold(Residency::default(), |sum, file| Ok(sum + residency(file)?))
}
