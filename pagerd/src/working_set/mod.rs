//! Working sets: which pages a snapshot's forks touch, learned once and installed ahead of the
//! guest in every later fork (REAP-style prefetch).
//!
//! ```text
//!  recording fork ──first touches──▶ Trace ─┐
//!  recording fork ──first touches──▶ Trace ─┴▶ merge (majority, mean order) ─▶ Plan (runs)
//!      ─▶ file beside the snapshot (header, run table, the pages' contents contiguous)
//!      ─▶ WorkingSet (mapped) ─▶ every new fork's session replays it
//! ```
//!
//! - [`merge`]: traces of several forks into one ordered set.
//! - [`plan`]: the set as runs, in rough first-touch order.
//! - [`file`]: the stored format, checked whole when loaded.
//! - [`slot`]: each snapshot's current set and the recording in progress.
//!
//! Nothing here knows about uffds or sessions: serving reads a [`WorkingSet`]'s runs and data.

pub mod file;
pub mod merge;
pub mod plan;
pub mod slot;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use proto::prefetch::WorkingSetInfo;

use crate::store::atomic::{fsync_dir, temp_name};
pub use plan::{Plan, Run};

/// Bytes per read when the contents are brought into the page cache.
const LOAD_CHUNK: usize = 4 << 20;

/// The file name of a snapshot's working set, in its directory.
pub const FILE_NAME: &str = "working-set";

/// A stored working set, mapped: the runs to install and their contents.
#[derive(Debug)]
pub struct WorkingSet {
    info: WorkingSetInfo,
    runs: Vec<Run>,
    /// Byte offset in `map` of each run's contents (zero runs: unused).
    data_at: Vec<u64>,
    /// The whole file; absent when the set holds zero pages only.
    map: Option<Mmap>,
    /// The file, for reading its contents into the page cache.
    file: Arc<File>,
    /// Set while a thread reads the contents into the page cache.
    loading: Arc<AtomicBool>,
    /// Where the data starts in the file, and how long it is.
    data_offset: u64,
    data_bytes: u64,
    /// CRC-32 of each [`file::BLOCK`] of data, as stored.
    sums: Vec<u32>,
    /// Per block: [`UNCHECKED`], [`GOOD`] or [`BAD`].
    checked: Vec<AtomicU8>,
    /// Set once a damaged block was logged.
    damage_logged: AtomicBool,
}

/// A block not checked yet.
const UNCHECKED: u8 = 0;
/// A block whose contents match its sum.
const GOOD: u8 = 1;
/// A block whose contents do not match its sum: never installed.
const BAD: u8 = 2;

impl WorkingSet {
    /// Writes the set `plan` of a snapshot of `snapshot_size` bytes to a temp file in `dir`,
    /// with contents from `read(offset, len)`, synced; [`Pending::commit`] puts it in place.
    pub fn write(
        dir: &Path,
        plan: &Plan,
        snapshot_size: u64,
        forks_recorded: u32,
        recorded_unix_ms: u64,
        read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
    ) -> io::Result<Pending> {
        let header = file::header_for(plan, snapshot_size, forks_recorded, recorded_unix_ms);
        let temp = dir.join(temp_name(FILE_NAME));
        let pending = Pending {
            temp,
            dir: dir.to_owned(),
            snapshot_size,
        };
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pending.temp)?;
        file::write(&out, plan, &header, read)?;
        out.sync_all()?;
        Ok(pending)
    }

    /// Loads the set stored at `path` for a snapshot of `snapshot_size` bytes; `None` if there
    /// is none. A file that fails any check is an error (`InvalidData`), never half used.
    pub fn load(path: &Path, snapshot_size: u64) -> io::Result<Option<Self>> {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let file::Contents { header, runs, sums } = file::read(&file, snapshot_size)?;
        let mut data_at = Vec::with_capacity(runs.len());
        let mut at = header.data_offset;
        for run in &runs {
            data_at.push(at);
            if !run.zero {
                at += u64::from(run.pages) * file::PAGE;
            }
        }
        let map = map_file(&file, header.file_size(), header.pages > header.zero_pages)?;
        let info = WorkingSetInfo {
            version: file::VERSION,
            pages: header.pages,
            zero_pages: header.zero_pages,
            runs: header.runs,
            file_bytes: header.file_size(),
            forks_recorded: header.forks_recorded,
            recorded_unix_ms: header.recorded_unix_ms,
        };
        Ok(Some(Self {
            info,
            runs,
            data_at,
            map,
            file: Arc::new(file),
            loading: Arc::new(AtomicBool::new(false)),
            data_offset: header.data_offset,
            data_bytes: header.data_bytes(),
            damage_logged: AtomicBool::new(false),
            checked: sums.iter().map(|_| AtomicU8::new(UNCHECKED)).collect(),
            sums,
        }))
    }

    /// Whether every data block `bytes` (a slice of this set's data) touches matches its
    /// stored sum. Each block is summed once, the first time it is asked about (it is in the
    /// page cache by then: replay installs only resident data); the answer is kept.
    pub fn verify(&self, bytes: &[u8]) -> bool {
        let Some(map) = &self.map else {
            return false;
        };
        let data_end = self.data_offset + self.data_bytes;
        let Some(start) = (bytes.as_ptr() as usize)
            .checked_sub(map.as_ptr() as usize)
            .map(|s| s as u64)
            .filter(|&s| s >= self.data_offset && s + bytes.len() as u64 <= data_end)
        else {
            return false;
        };
        let first = (start - self.data_offset) / file::BLOCK;
        let last = (start + bytes.len() as u64 - self.data_offset).div_ceil(file::BLOCK);
        (first..last).all(|block| self.block_matches(map, block))
    }

    /// Sums block `block` once and says whether it matches.
    fn block_matches(&self, map: &Mmap, block: u64) -> bool {
        let Some(state) = self.checked.get(block as usize) else {
            return false;
        };
        match state.load(Ordering::Acquire) {
            GOOD => return true,
            BAD => return false,
            _ => {}
        }
        let from = self.data_offset + block * file::BLOCK;
        let to = (from + file::BLOCK).min(self.data_offset + self.data_bytes);
        let matches = usize::try_from(from)
            .ok()
            .zip(usize::try_from(to).ok())
            .and_then(|(from, to)| map.get(from..to))
            .is_some_and(|data| crc32fast::hash(data) == self.sums[block as usize]);
        state.store(if matches { GOOD } else { BAD }, Ordering::Release);
        matches
    }

    /// `true` the first time it is called: whether damage should be logged now.
    pub fn log_damage_once(&self) -> bool {
        !self.damage_logged.swap(true, Ordering::AcqRel)
    }

    /// How many data blocks were found not to match their sums so far.
    pub fn bad_blocks(&self) -> usize {
        self.checked
            .iter()
            .filter(|s| s.load(Ordering::Acquire) == BAD)
            .count()
    }

    /// What `snapshot.get` shows.
    pub fn info(&self) -> &WorkingSetInfo {
        &self.info
    }

    /// The runs, in replay order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The contents of `pages` pages of data run `run` from its page `skip` on.
    pub fn data(&self, run: usize, skip: u64, pages: u64) -> Option<&[u8]> {
        let map = self.map.as_ref()?;
        let start = usize::try_from(self.data_at[run] + skip * file::PAGE).ok()?;
        let len = usize::try_from(pages * file::PAGE).ok()?;
        map.get(start..start.checked_add(len)?)
    }

    /// Whether every page of `bytes` (a slice of this set's data) is in the page cache, so
    /// copying from it cannot wait for the disk.
    pub fn resident(&self, bytes: &[u8]) -> bool {
        self.resident_prefix(bytes, bytes.len()) >= bytes.len()
    }

    /// How many bytes from the start of `bytes` (a slice of this set's data, page aligned) on
    /// are in the page cache, looking at most `window` bytes past its start (past its end too,
    /// up to the end of the file): one `mincore` answers for many runs.
    pub fn resident_prefix(&self, bytes: &[u8], window: usize) -> usize {
        let Some(map) = &self.map else {
            return 0;
        };
        let start = (bytes.as_ptr() as usize).saturating_sub(map.as_ptr() as usize);
        let len = window.max(bytes.len()).min(map.len().saturating_sub(start));
        let page = file::PAGE as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `start..start+len` lies in this set's live mapping and starts at a page
        // boundary (runs' contents are page aligned); `vec` has one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(start) as *mut libc::c_void,
                len,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return 0;
        }
        vec.iter().take_while(|v| *v & 1 != 0).count() * page
    }

    /// Whether the first contents to replay are in the page cache.
    pub fn head_resident(&self) -> bool {
        let Some(map) = &self.map else {
            return true;
        };
        let start = self.data_at.first().copied().unwrap_or(0) as usize;
        let len = (map.len() - start).min(LOAD_CHUNK);
        self.resident(&map[start..start + len])
    }

    /// Reads the contents into the page cache from a background thread, in large sequential
    /// reads, unless one is already at it: a cold start costs one pass over the file, and no
    /// worker ever waits for the disk.
    pub fn read_ahead(&self) {
        if self.map.is_none() || self.loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let (file, loading) = (self.file.clone(), self.loading.clone());
        let start = self.data_at.first().copied().unwrap_or(0);
        let end = self.info.file_bytes;
        let spawned = std::thread::Builder::new()
            .name("pagerd-ws-load".into())
            .spawn(move || {
                let mut buf = vec![0u8; LOAD_CHUNK];
                let mut at = start;
                while at < end {
                    match file.read_at(&mut buf, at) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => at += n as u64,
                    }
                }
                loading.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.loading.store(false, Ordering::Release);
        }
    }
}

/// A working set written to a temp file, not yet in place; dropped, it is removed.
#[derive(Debug)]
pub struct Pending {
    temp: PathBuf,
    dir: PathBuf,
    snapshot_size: u64,
}

impl Pending {
    /// Renames the file into place (replacing any older set), makes that durable, and maps it.
    pub fn commit(self) -> io::Result<WorkingSet> {
        let path = self.dir.join(FILE_NAME);
        std::fs::rename(&self.temp, &path)?;
        fsync_dir(&self.dir)?;
        WorkingSet::load(&path, self.snapshot_size)?
            .ok_or_else(|| io::Error::other("the working set vanished after it was written"))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // After a commit the temp name no longer exists.
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Maps `file` (`size` bytes) read-only and shared, when it has data.
fn map_file(file: &File, size: u64, has_data: bool) -> io::Result<Option<Mmap>> {
    if !has_data {
        return Ok(None);
    }
    let len = usize::try_from(size).map_err(io::Error::other)?;
    // SAFETY: working-set files are written once (temp file, renamed into place) and never
    // modified; only the daemon's user can write the state directory. A file shrunk behind
    // the daemon's back is copied from only by UFFDIO_COPY, which answers EFAULT instead of
    // raising SIGBUS, and by `resident`, which reads nothing.
    let map = unsafe { MmapOptions::new().len(len).map(file)? };
    Ok(Some(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_sets_load_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 4096) as u8 + 1).collect();
        let size = snapshot.len() as u64;
        let plan = Plan::new(&[5, 6, 7, 40, 2, 63], |p| p == 40);
        let read = |off: u64, len: usize| Ok(snapshot[off as usize..][..len].to_vec());
        let set = WorkingSet::write(dir.path(), &plan, size, 2, 1234, read)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(set.info().pages, 6);
        assert_eq!(set.info().zero_pages, 1);
        assert_eq!(set.info().forks_recorded, 2);
        assert_eq!(set.runs(), &plan.runs[..]);
        for (i, run) in set.runs().iter().enumerate().filter(|(_, r)| !r.zero) {
            let data = set.data(i, 0, u64::from(run.pages)).unwrap();
            let at = (run.page * 4096) as usize;
            assert_eq!(data, &snapshot[at..at + data.len()], "run {run:?}");
        }
        let path = dir.path().join(FILE_NAME);
        assert!(WorkingSet::load(&path, size).unwrap().is_some());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left");
        let abandoned = WorkingSet::write(dir.path(), &plan, size, 1, 1, read).unwrap();
        drop(abandoned);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "an abandoned write leaves nothing");
        let err = WorkingSet::load(&path, size + 4096).unwrap_err();
        assert!(err.to_string().contains("snapshot of"), "{err}");
        // A flipped byte in the run table, and a truncated file, are refused.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = WorkingSet::load(&path, size).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        bytes[4096] ^= 1;
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).unwrap();
        let err = WorkingSet::load(&path, size).unwrap_err();
        assert!(err.to_string().contains("header says"), "{err}");
        assert!(WorkingSet::load(&dir.path().join("none"), size)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_flipped_data_byte_fails_its_block_only() {
        let dir = tempfile::tempdir().unwrap();
        // 64 pages: 4 blocks of 16 pages, every page of data.
        let snapshot: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let size = snapshot.len() as u64;
        let touched: Vec<u64> = (0..64).collect();
        let plan = Plan::new(&touched, |_| false);
        let read = |off: u64, len: usize| Ok(snapshot[off as usize..][..len].to_vec());
        let path = dir.path().join(FILE_NAME);
        WorkingSet::write(dir.path(), &plan, size, 1, 1, read)
            .unwrap()
            .commit()
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let set = WorkingSet::load(&path, size).unwrap().unwrap();
        let data_at = set.data_offset as usize;
        // Page 20 lies in block 1.
        bytes[data_at + 20 * 4096 + 7] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let set = WorkingSet::load(&path, size).unwrap().unwrap();
        let run = set.runs().iter().position(|r| r.page == 0).unwrap();
        let page = |p: u64| set.data(run, p, 1).unwrap();
        assert!(set.verify(page(0)) && set.verify(page(15)));
        assert!(!set.verify(page(16)) && !set.verify(page(20)) && !set.verify(page(31)));
        assert!(set.verify(page(32)) && set.verify(page(63)));
        assert!(
            !set.verify(set.data(run, 10, 10).unwrap()),
            "a span over a bad block"
        );
        assert_eq!(set.bad_blocks(), 1);
        assert!(set.log_damage_once() && !set.log_damage_once());
    }
}
