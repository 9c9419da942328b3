//! A synthetic VMM: guest memory restored exactly as Firecracker restores it, checked byte for
//! byte against the snapshot memory file.
//!
//! [`GuestMemory::map_for_uffd`] maps each region `MAP_PRIVATE|MAP_ANONYMOUS` (plus
//! `MAP_HUGETLB|MAP_HUGE_2MB` for 2 MiB pages), opens a userfaultfd with `O_CLOEXEC|O_NONBLOCK`
//! and `UFFD_FEATURE_EVENT_REMOVE`, not user-mode-only, registers every region MISSING, and
//! [`GuestMemory::hand_off`] connects to the page server and sends the regions plus the uffd.
//! [`GuestMemory::map_file`] is the other backend, Firecracker's `File`: a `MAP_PRIVATE`
//! mapping of the memory file itself, which benches use as the page-cache floor.
//!
//! Guest offsets number the bytes of all regions laid end to end, in region order; each region
//! also has a file offset, where its bytes start in the memory file. [`GuestMemory::verify`]
//! reads guest pages in sequential or random order, from user mode or from kernel context (a
//! `write` into a pipe, or `process_vm_readv`, as KVM's accesses are), and compares each with
//! the file, or with zeros where the guest gave pages back with `MADV_DONTNEED`. It counts the
//! page faults its reading loop took ([`VerifyReport::faults`]);
//! [`GuestMemory::comparison_faults`] tells how many of them the comparisons cost, so that
//! guest memory's own faults can be compared between ways of serving it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_2M, PAGE_SIZE_4K};

/// Where a region's bytes live: its length and its start in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Length in bytes (a multiple of the page size).
    pub size: u64,
    /// Start of the region's bytes in the memory file.
    pub file_offset: u64,
}

/// Which pages [`GuestMemory::verify`] visits, and in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessOrder {
    /// The first pages of the range, in order: 0, 1, 2, …
    Sequential,
    /// Pages picked at random (by the plan's seed), in random order.
    Random,
    /// The hot set: pages picked at random by one fixed seed, so every fork reads the same
    /// pages (in its own random order).
    Hot,
}

/// The seed that picks the hot set; the same in every process.
const HOT_SET_SEED: u64 = 0x407_5e7;

/// What a verification pass reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessPlan {
    /// Which pages, in which order.
    pub order: AccessOrder,
    /// How many of the range's pages, in percent (1 to 100): the working set.
    pub percent: u64,
    /// Seeds the random choices and orders (give forks different seeds).
    pub seed: u64,
}

impl AccessPlan {
    /// Every page, in `order`, with the default seed.
    pub fn all(order: AccessOrder) -> Self {
        Self {
            order,
            percent: 100,
            seed: 0x5eed,
        }
    }

    /// The pages of `range` (page indexes) this plan reads, in reading order.
    pub fn pages(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        let mut pages: Vec<u64> = range.collect();
        let keep = (pages.len() as u64 * self.percent.clamp(1, 100)).div_ceil(100) as usize;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(self.seed);
        match self.order {
            AccessOrder::Sequential => pages.truncate(keep),
            AccessOrder::Random => {
                pages.shuffle(&mut rng);
                pages.truncate(keep);
            }
            AccessOrder::Hot => {
                pages.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(HOT_SET_SEED));
                pages.truncate(keep);
                pages.shuffle(&mut rng);
            }
        }
        pages
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one machine.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// How guest memory is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessPath {
    /// Plain loads from this process (user-mode faults).
    User,
    /// `write(pipe, guest, len)`: the kernel reads guest memory, faulting from kernel context.
    Pipe,
    /// `process_vm_readv` on this process: remote access through the kernel.
    Readv,
}

/// What one verification pass saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Pages read and compared.
    pub pages: u64,
    /// Bytes read and compared.
    pub bytes: u64,
    /// Pages expected to be zero because they were given back.
    pub removed_pages: u64,
    /// Time spent reading and comparing, in nanoseconds.
    pub elapsed_ns: u64,
    /// When the first page had been read ([`monotonic_ns`]).
    pub first_page_ns: u64,
    /// When the last page had been read ([`monotonic_ns`]).
    pub done_ns: u64,
    /// Time to read one page (its first touch is the fault), in nanoseconds.
    pub read_latency_ns: ReadLatency,
    /// This process's private anonymous memory when the pass ended (`RssAnon`), in KiB: what
    /// the fork's memory costs beyond pages it shares.
    pub rss_anon_kib: u64,
    /// Page faults (minor and major, from `getrusage(RUSAGE_THREAD)`) the reading loop took:
    /// guest memory's and those of the comparisons' mapping of the snapshot alike (see
    /// [`GuestMemory::comparison_faults`]).
    pub faults: u64,
}

/// Page faults, minor and major, the calling thread has taken so far.
pub fn thread_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage overwrites it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid, exclusive out-pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(usage.ru_minflt + usage.ru_majflt).unwrap_or(0)
}

/// A `/proc/self/status` field in KiB (0 if absent).
fn self_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Summary of per-page read times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ReadLatency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Slowest.
    pub max: u64,
}

/// A page whose content differs from what the snapshot says.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest offset {guest_offset:#x} (file offset {file_offset:#x}) differs from the {expected}"
)]
pub struct Mismatch {
    /// The page's guest offset.
    pub guest_offset: u64,
    /// The page's offset in the memory file.
    pub file_offset: u64,
    /// What the page should have held: "snapshot" or "zeros".
    pub expected: &'static str,
}

/// Errors from reading guest memory.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The page did not hold the expected bytes.
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    /// The kernel refused the access.
    #[error("reading guest memory through the kernel failed")]
    Io(#[from] io::Error),
}

/// One mapped region.
#[derive(Debug)]
struct MappedRegion {
    addr: usize,
    spec: RegionSpec,
    guest_offset: u64,
    /// Registered but not declared in the handoff (to provoke faults outside every region).
    undeclared_tail: u64,
}

/// Resident and proportional memory of guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Resident KiB.
    pub rss_kib: u64,
    /// Proportional KiB: each shared page counts 1/n in each of its n mappers.
    pub pss_kib: u64,
}

/// Guest memory of a synthetic VMM.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<MappedRegion>,
    page_size: u64,
    uffd: Option<Uffd>,
    /// The memory file, mapped read-only: what every page should hold.
    expected: Mmap,
    /// Its path (for a fresh mapping: [`GuestMemory::comparison_faults`]).
    snapshot: PathBuf,
    /// One flag per page: given back with `MADV_DONTNEED`, so it must read as zeros.
    removed: Vec<bool>,
    /// Written by this VMM into the first 8 bytes of every page, once `stamp` ran.
    stamp: Option<u64>,
    /// How long `verify` sleeps before each page (paced readers keep faulting for a while).
    pace: Duration,
}

fn map_anonymous(len: u64, hugepages: bool) -> io::Result<usize> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if hugepages {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses; it aliases nothing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(addr as usize)
}

fn open_expected(snapshot: &Path) -> io::Result<Mmap> {
    let file = File::open(snapshot)?;
    // SAFETY: snapshot memory files are immutable once written (pagerd's rule 1); the mapping
    // is read-only and only compared against.
    unsafe { Mmap::map(&file) }
}

impl GuestMemory {
    /// Maps regions as Firecracker's Uffd backend does and registers them with a new uffd.
    /// `undeclared_tail` extra bytes are mapped and registered after the last region but left
    /// out of [`mappings`](Self::mappings): a hostile VMM's memory that pagerd was never told of.
    pub fn map_for_uffd(
        snapshot: &Path,
        layout: &[RegionSpec],
        hugepages: bool,
        undeclared_tail: u64,
    ) -> io::Result<Self> {
        let page_size = if hugepages {
            PAGE_SIZE_2M
        } else {
            PAGE_SIZE_4K
        };
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .map_err(io::Error::other)?;
        let mut regions = Vec::with_capacity(layout.len());
        let mut guest_offset = 0;
        for (i, spec) in layout.iter().enumerate() {
            let tail = if i + 1 == layout.len() {
                undeclared_tail
            } else {
                0
            };
            let addr = map_anonymous(spec.size + tail, hugepages)?;
            uffd.register_with_mode(
                addr as *mut libc::c_void,
                (spec.size + tail) as usize,
                RegisterMode::MISSING,
            )
            .map_err(io::Error::other)?;
            regions.push(MappedRegion {
                addr,
                spec: *spec,
                guest_offset,
                undeclared_tail: tail,
            });
            guest_offset += spec.size;
        }
        Self::assemble(snapshot, regions, page_size, Some(uffd))
    }

    /// Maps `memory_file` `MAP_PRIVATE` (Firecracker's `File` backend), one mapping per
    /// region at the region's file offset, and closes it (the mappings keep it). No uffd: the
    /// page cache serves every fault. Pages are checked against `snapshot`, which may be
    /// the same file or the original of a copy (a page server's FUSE file, say).
    pub fn map_file(
        snapshot: &Path,
        memory_file: &Path,
        layout: &[RegionSpec],
    ) -> io::Result<Self> {
        let file = File::open(memory_file)?;
        let mut regions = Vec::with_capacity(layout.len());
        let mut guest_offset = 0;
        for spec in layout {
            let offset = libc::off_t::try_from(spec.file_offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: a new private mapping of a file we opened; writes stay in this process.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    spec.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            regions.push(MappedRegion {
                addr: addr as usize,
                spec: *spec,
                guest_offset,
                undeclared_tail: 0,
            });
            guest_offset += spec.size;
        }
        Self::assemble(snapshot, regions, PAGE_SIZE_4K, None)
    }

    /// Copies `memory_file` into anonymous memory first, as platforms did before sharing
    /// snapshots: every fork pays for a full copy before it runs. Pages are checked against
    /// `snapshot` (the same file, or another copy of it).
    pub fn copy_file(
        snapshot: &Path,
        memory_file: &Path,
        layout: &[RegionSpec],
    ) -> io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let file = File::open(memory_file)?;
        let mut regions = Vec::with_capacity(layout.len());
        let mut guest_offset = 0;
        for spec in layout {
            let addr = map_anonymous(spec.size, false)?;
            // SAFETY: a fresh private mapping of `spec.size` bytes that nothing else uses.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, spec.size as usize) };
            file.read_exact_at(bytes, spec.file_offset)?;
            regions.push(MappedRegion {
                addr,
                spec: *spec,
                guest_offset,
                undeclared_tail: 0,
            });
            guest_offset += spec.size;
        }
        Self::assemble(snapshot, regions, PAGE_SIZE_4K, None)
    }

    fn assemble(
        snapshot: &Path,
        regions: Vec<MappedRegion>,
        page_size: u64,
        uffd: Option<Uffd>,
    ) -> io::Result<Self> {
        let expected = open_expected(snapshot)?;
        let total: u64 = regions.iter().map(|r| r.spec.size).sum();
        for r in &regions {
            if r.spec.file_offset + r.spec.size > expected.len() as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a region runs past the end of the memory file",
                ));
            }
        }
        Ok(Self {
            regions,
            page_size,
            uffd,
            expected,
            snapshot: snapshot.to_owned(),
            removed: vec![false; (total / page_size) as usize],
            stamp: None,
            pace: Duration::ZERO,
        })
    }

    /// Makes `verify` sleep `pace` before each page it reads (not counted in its latencies).
    pub fn set_pace(&mut self, pace: Duration) {
        self.pace = pace;
    }

    /// The regions as the handoff message describes them.
    pub fn mappings(&self) -> Vec<GuestRegionUffdMapping> {
        self.regions
            .iter()
            .map(|r| GuestRegionUffdMapping {
                base_host_virt_addr: r.addr as u64,
                size: r.spec.size,
                offset: r.spec.file_offset,
                page_size: self.page_size,
            })
            .collect()
    }

    /// The guest's page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Total guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.spec.size).sum()
    }

    /// Connects to the page server's socket and hands over the regions and the uffd. The
    /// returned stream must be kept open for as long as the guest runs.
    pub fn hand_off(&self, socket: &Path) -> io::Result<UnixStream> {
        let uffd = self.uffd.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "file-backed guest memory has no uffd",
            )
        })?;
        vmm_glue::hand_off(socket, &self.mappings(), uffd.as_fd())
    }

    /// The region holding a guest offset, and the offset within it.
    fn locate(&self, guest_offset: u64) -> (&MappedRegion, u64) {
        let i = self
            .regions
            .partition_point(|r| r.guest_offset + r.spec.size <= guest_offset);
        let r = &self.regions[i];
        (r, guest_offset - r.guest_offset)
    }

    /// Gives a guest range back with `MADV_DONTNEED` (the balloon's way); it must read as
    /// zeros from then on.
    pub fn dont_need(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        let ps = self.page_size;
        if guest_offset % ps != 0 || len % ps != 0 || guest_offset + len > self.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range not page aligned or out of bounds",
            ));
        }
        let mut at = guest_offset;
        while at < guest_offset + len {
            let (region, within) = self.locate(at);
            let n = (region.spec.size - within).min(guest_offset + len - at);
            let addr = region.addr + within as usize;
            // SAFETY: the range lies inside one of our own anonymous mappings; its contents
            // are simply discarded.
            let rc = unsafe {
                libc::madvise(addr as *mut libc::c_void, n as usize, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            at += n;
        }
        for page in guest_offset / ps..(guest_offset + len) / ps {
            self.removed[page as usize] = true;
        }
        Ok(())
    }

    /// What guest memory costs right now, from `/proc/self/smaps`: resident KiB and the
    /// proportional share (pages shared with other processes split between them).
    pub fn footprint(&self) -> io::Result<Footprint> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut footprint = Footprint::default();
        let mut in_guest = false;
        for line in smaps.lines() {
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    in_guest = self
                        .regions
                        .iter()
                        .any(|r| start < r.addr + r.spec.size as usize && r.addr < end);
                    continue;
                }
            }
            if !in_guest {
                continue;
            }
            let kib = || -> u64 {
                line.split_ascii_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            match first {
                "Rss:" => footprint.rss_kib += kib(),
                "Pss:" => footprint.pss_kib += kib(),
                _ => {}
            }
        }
        Ok(footprint)
    }

    /// Writes `tag` into the first 8 bytes of every page: this VMM's own writes, which its
    /// copy-on-write memory must keep to itself. Later `verify`s expect them.
    pub fn stamp(&mut self, tag: u64) -> io::Result<()> {
        let ps = self.page_size;
        for page in 0..self.size() / ps {
            let (region, within) = self.locate(page * ps);
            let addr = (region.addr + within as usize) as *mut u64;
            // SAFETY: `addr` is the start of a page inside one of this VMM's own writable
            // mappings (page aligned, so aligned for u64); nothing else writes them.
            unsafe { addr.write_volatile(tag) };
        }
        self.stamp = Some(tag);
        Ok(())
    }

    /// Reads one byte of every page `plan` picks without comparing anything, so that only
    /// guest memory (not the snapshot it is checked against) becomes resident. Returns the
    /// pages touched.
    pub fn touch(&self, plan: &AccessPlan) -> u64 {
        let ps = self.page_size;
        let pages = plan.pages(0..self.size() / ps);
        for &page in &pages {
            let (region, within) = self.locate(page * ps);
            let addr = (region.addr + within as usize) as *const u8;
            // SAFETY: `addr` is inside one of this VMM's own mappings.
            std::hint::black_box(unsafe { addr.read_volatile() });
        }
        pages.len() as u64
    }

    /// Reads every page (or the pages of one guest range) in `order` through `path` and
    /// compares each with the snapshot, or zeros for pages given back.
    pub fn verify(
        &self,
        range: Option<(u64, u64)>,
        plan: &AccessPlan,
        path: AccessPath,
    ) -> Result<VerifyReport, VerifyError> {
        let ps = self.page_size;
        let (start, len) = range.unwrap_or((0, self.size()));
        let pages = plan.pages(start / ps..(start + len).div_ceil(ps));
        let mut reader = PageReader::new(path, ps as usize)?;
        let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("valid histogram bounds");
        let faults_before = thread_faults();
        let started = Instant::now();
        let mut first_page_ns = 0;
        let mut removed_pages = 0;
        for &page in &pages {
            let guest_offset = page * ps;
            let (region, within) = self.locate(guest_offset);
            let file_offset = region.spec.file_offset + within;
            let removed = self.removed[page as usize];
            removed_pages += u64::from(removed);
            if !self.pace.is_zero() {
                std::thread::sleep(self.pace);
            }
            let before = Instant::now();
            let got = reader.read(region.addr + within as usize)?;
            latency.saturating_record(duration_ns(before.elapsed()).max(1));
            if first_page_ns == 0 {
                first_page_ns = monotonic_ns();
            }
            let (head, tail) = got.split_at(8);
            let ok_head = match self.stamp {
                Some(tag) => head == tag.to_ne_bytes(),
                None if removed => head.iter().all(|&b| b == 0),
                None => head == &self.expected[file_offset as usize..file_offset as usize + 8],
            };
            let ok = ok_head
                && if removed {
                    tail.iter().all(|&b| b == 0)
                } else {
                    tail == &self.expected[file_offset as usize + 8..(file_offset + ps) as usize]
                };
            if !ok {
                return Err(Mismatch {
                    guest_offset,
                    file_offset,
                    expected: if removed { "zeros" } else { "snapshot" },
                }
                .into());
            }
        }
        Ok(VerifyReport {
            pages: pages.len() as u64,
            bytes: pages.len() as u64 * ps,
            removed_pages,
            elapsed_ns: duration_ns(started.elapsed()),
            first_page_ns,
            done_ns: monotonic_ns(),
            read_latency_ns: ReadLatency {
                p50: latency.value_at_quantile(0.5),
                p99: latency.value_at_quantile(0.99),
                max: latency.max(),
            },
            rss_anon_kib: self_status_kib("RssAnon"),
            faults: thread_faults().saturating_sub(faults_before),
        })
    }

    /// The page faults that reading the snapshot pages `verify(range, plan, …)` compares
    /// against costs through a fresh mapping of the snapshot, in the same order: the share of
    /// that pass's [`VerifyReport::faults`] that its comparisons took, so that the rest is guest
    /// memory's own. Exact for the first `verify` of a process when the snapshot file is
    /// wholly in the page cache (fault-around then maps the same pages in the same order both
    /// times); otherwise an estimate.
    pub fn comparison_faults(
        &self,
        range: Option<(u64, u64)>,
        plan: &AccessPlan,
    ) -> io::Result<u64> {
        let ps = self.page_size;
        let fresh = open_expected(&self.snapshot)?;
        let (start, len) = range.unwrap_or((0, self.size()));
        let pages = plan.pages(start / ps..(start + len).div_ceil(ps));
        let before = thread_faults();
        for &page in &pages {
            let (region, within) = self.locate(page * ps);
            std::hint::black_box(fresh[(region.spec.file_offset + within) as usize]);
        }
        Ok(thread_faults().saturating_sub(before))
    }

    /// Touches every page, then gives all of them back, forever: a guest that keeps faulting.
    /// `after_first_round` runs once, when the first round of faults has been served.
    pub fn churn(&mut self, mut after_first_round: impl FnMut()) -> io::Result<()> {
        let size = self.size();
        let mut first = true;
        loop {
            for r in &self.regions {
                for at in (0..r.spec.size).step_by(self.page_size as usize) {
                    // SAFETY: `at` is inside our own mapping of `r.spec.size` bytes.
                    unsafe { std::ptr::read_volatile((r.addr + at as usize) as *const u8) };
                }
            }
            if first {
                after_first_round();
                first = false;
            }
            self.dont_need(0, size)?;
        }
    }

    /// Reads one byte in the registered but undeclared tail, from a thread of its own. No page
    /// server has bytes for it: pagerd poisons the page, so the process dies of `SIGBUS`
    /// (another page server might leave the thread blocked until the process exits).
    pub fn touch_undeclared_tail(&self) -> io::Result<()> {
        let last = self.regions.last().expect("guest memory has regions");
        if last.undeclared_tail == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no undeclared tail was mapped",
            ));
        }
        let addr = last.addr + last.spec.size as usize;
        std::thread::spawn(move || {
            // SAFETY: `addr` is the first byte of the mapped, registered tail.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: unmapping our own mapping once, when nothing borrows it any more.
            unsafe {
                libc::munmap(
                    r.addr as *mut libc::c_void,
                    (r.spec.size + r.undeclared_tail) as usize,
                )
            };
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads guest pages by one [`AccessPath`] into a reusable buffer.
struct PageReader {
    path: AccessPath,
    page: usize,
    buf: Vec<u8>,
    pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
}

/// How much one pipe write carries (the default pipe capacity).
const PIPE_CHUNK: usize = 64 * 1024;

impl PageReader {
    fn new(path: AccessPath, page: usize) -> io::Result<Self> {
        let pipe = if path == AccessPath::Pipe {
            Some(nix::unistd::pipe().map_err(io::Error::from)?)
        } else {
            None
        };
        Ok(Self {
            path,
            page,
            buf: vec![0; page],
            pipe,
        })
    }

    fn read(&mut self, addr: usize) -> io::Result<&[u8]> {
        match self.path {
            AccessPath::User => {
                // Touch the page here, so a caller timing `read` times the fault.
                // SAFETY: `addr` is the first byte of one page of our own guest mapping.
                unsafe { std::ptr::read_volatile(addr as *const u8) };
                // SAFETY: `addr..addr + page` is one page of our own guest mapping, which
                // outlives the borrow of `self`.
                Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, self.page) })
            }
            AccessPath::Pipe => {
                let (rd, wr) = self.pipe.as_ref().expect("pipe reader has a pipe");
                for at in (0..self.page).step_by(PIPE_CHUNK) {
                    let n = PIPE_CHUNK.min(self.page - at);
                    // SAFETY: the kernel reads `n` bytes of our guest mapping; a missing page
                    // faults in kernel context and is served through the uffd.
                    let w = unsafe {
                        libc::write(wr.as_raw_fd(), (addr + at) as *const libc::c_void, n)
                    };
                    if usize::try_from(w).ok() != Some(n) {
                        return Err(io::Error::last_os_error());
                    }
                    nix::unistd::read(rd, &mut self.buf[at..at + n]).map_err(io::Error::from)?;
                }
                Ok(&self.buf)
            }
            AccessPath::Readv => {
                let local = libc::iovec {
                    iov_base: self.buf.as_mut_ptr().cast(),
                    iov_len: self.page,
                };
                let remote = libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: self.page,
                };
                // SAFETY: both iovecs describe memory we own for their full length.
                let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
                if usize::try_from(n).ok() != Some(self.page) {
                    return Err(io::Error::last_os_error());
                }
                Ok(&self.buf)
            }
        }
    }
}
