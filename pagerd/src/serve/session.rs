//! One fork being served: its regions, its uffd, and the fault path.
//!
//! ```text
//!  uffd events (batch of up to 64; fds a FORK event carries are closed at once)
//!    PAGEFAULT addr, flags
//!        ├─ WP or MINOR flag: a fault on a present page, which pagerd cannot resolve
//!        │        ─▶ the session ends (unservable_fault)
//!        ├─ outside every declared region ─▶ UFFDIO_POISON (the access gets SIGBUS)
//!        └─ region (binary search) ─▶ page ─▶ run of missing pages of one kind
//!             ├─ data: UFFDIO_COPY from the snapshot's shared mapping
//!             ├─ zero (snapshot page all zeros, or removed): UFFDIO_ZEROPAGE
//!             │        (hugetlbfs has no zero page: copy from a zero buffer)
//!             ├─ EEXIST ─▶ UFFDIO_WAKE (many in a row with nothing filled: livelock, ends)
//!             ├─ EAGAIN/ENOMEM ─▶ deferred, retried after events
//!             ├─ ESRCH ─▶ the VMM is gone: the session ends
//!             └─ anything else (EFAULT: the file shrank …) ─▶ UFFDIO_POISON
//!    POISON fails for good ─▶ the session ends (unservable_fault): never a silent hang
//!    REMOVE start..end ─▶ pages marked removed (read back as zeros), present bits cleared
//! ```
//!
//! A session lives on exactly one worker, so its state needs no lock. The `present` bitmap is
//! advisory: it keeps fault-around runs from colliding with pages already there, but a fault on
//! a page marked present is still served (the kernel says it is missing). A session is built
//! ([`Session::new`]) on the acceptor before the VMM is told its handoff was accepted, so a
//! failure to allocate its state is a refused handoff, never a panic on a worker.

use std::collections::TryReserveError;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_2M, PAGE_SIZE_4K};
use proto::model::EndReason;

use crate::bitmap::Bitmap;
use crate::ratelimit::RateLimiter;
use crate::registry::Fork;
use crate::serve::prefetch::{Phase, Prefetcher};
use crate::serve::record::Recorder;
use crate::serve::uffd::{
    event_fd, FillError, UffdMsg, Userfaultfd, EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMOVE,
    PAGEFAULT_FLAG_MINOR, PAGEFAULT_FLAG_WP,
};
use crate::snapshot::Snapshot;
use crate::stats::bump;
use crate::working_set::merge::Trace;
use crate::working_set::slot::Ticket;
use crate::working_set::WorkingSet;

/// Why a session could not be set up (the handoff is refused with `setup_failed`).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The per-page maps of the regions could not be allocated.
    #[error("cannot allocate page maps for {pages} pages")]
    PageMaps {
        /// Pages in all regions.
        pages: u64,
        /// Why.
        #[source]
        source: TryReserveError,
    },
    /// The zero buffer hugetlbfs regions are filled from could not be mapped.
    #[error("cannot map 2 MiB of zeros for hugetlbfs regions")]
    HugeZeroPage(#[source] std::io::Error),
}

/// What draining the uffd left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Nothing more to read until the uffd is readable again.
    Idle,
    /// The batch budget ran out with events still pending; drain again soon.
    More,
    /// The session is over.
    Ended(EndReason),
}

/// What happened to one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Resolved,
    Deferred,
    End(EndReason),
}

/// Faults answered `EEXIST` in a row, with no page filled or poisoned in between, after which
/// the session is ended as a livelock. A genuine race (a fault queued just before the run that
/// filled its page) costs one `EEXIST` per waiting thread, far below this.
const LIVELOCK_STREAK: u32 = 4096;

/// Counts consecutive `EEXIST` answers; any progress resets it.
#[derive(Debug, Default)]
struct EexistStreak(u32);

impl EexistStreak {
    /// One more fault for a page already there; `true` once it is a livelock.
    fn present(&mut self) -> bool {
        self.0 = self.0.saturating_add(1);
        self.0 >= LIVELOCK_STREAK
    }

    /// A page was filled or poisoned.
    fn progress(&mut self) {
        self.0 = 0;
    }
}

/// One guest memory region and which of its pages are present or removed.
#[derive(Debug)]
struct Region {
    mapping: GuestRegionUffdMapping,
    present: Bitmap,
    removed: Bitmap,
    readahead: Readahead,
}

/// Readahead state of a region, as the kernel keeps for files: a fault that continues the
/// previous run doubles the window (up to the maximum); any other fault starts over at one
/// page. Sequential readers get large copies, scattered ones get only what they touch.
#[derive(Debug, Default)]
struct Readahead {
    /// One past the last page of the previous run.
    stream_end: u64,
    /// Pages the next sequential fault may fill.
    window: u64,
}

impl Readahead {
    fn window_for(&mut self, page: u64, max: u64) -> u64 {
        self.window = if page == self.stream_end && self.window > 0 {
            (self.window * 2).min(max)
        } else {
            1
        };
        self.window
    }
}

/// How a page is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Copied from the snapshot.
    Data,
    /// The zero page.
    Zero,
}

/// How far a run from `page` may reach: a data run to its readahead `window`, a zero run to
/// the next 2 MiB boundary; never past `len` pages.
fn run_limit(page: u64, kind: Fill, window: u64, len: u64) -> u64 {
    match kind {
        // Zero runs cost no memory and `UFFDIO_ZEROPAGE` is cheap: let them reach further.
        Fill::Zero => (page / ZERO_WINDOW_PAGES + 1) * ZERO_WINDOW_PAGES,
        Fill::Data => page + window,
    }
    .min(len)
}

/// The pages of a run: `page` itself, then every following page below `limit` for which
/// `fits` holds, up to the first that does not.
fn run_len(page: u64, limit: u64, fits: impl Fn(u64) -> bool) -> u64 {
    let mut end = page + 1;
    while end < limit && fits(end) {
        end += 1;
    }
    end - page
}

impl Region {
    fn page_of(&self, addr: u64) -> u64 {
        (addr - self.mapping.base_host_virt_addr) / self.mapping.page_size
    }

    fn addr_of(&self, page: u64) -> u64 {
        self.mapping.base_host_virt_addr + page * self.mapping.page_size
    }

    fn file_offset_of(&self, page: u64) -> u64 {
        self.mapping.offset + page * self.mapping.page_size
    }

    fn fill_of(&self, page: u64, snapshot: &Snapshot) -> Fill {
        let zero = self.removed.get(page)
            || (self.mapping.page_size == PAGE_SIZE_4K
                && snapshot.is_zero_page(self.file_offset_of(page)));
        if zero {
            Fill::Zero
        } else {
            Fill::Data
        }
    }
}

/// The address of a read-only, never-touched 2 MiB anonymous mapping: zeros to copy into
/// hugetlbfs pages, which `UFFDIO_ZEROPAGE` does not support. Reading it costs no memory.
/// Mapped once per process, on the first session with 2 MiB regions; an address rather than
/// a pointer so sessions holding it can move between threads.
#[derive(Debug, Clone, Copy)]
struct HugeZeroPage(usize);

impl HugeZeroPage {
    fn get() -> std::io::Result<Self> {
        static ZERO: OnceLock<usize> = OnceLock::new();
        if let Some(&addr) = ZERO.get() {
            return Ok(Self(addr));
        }
        let len = PAGE_SIZE_2M as usize;
        // SAFETY: a fresh private anonymous read-only mapping; never written, and never
        // unmapped once published in `ZERO`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if ZERO.set(addr as usize).is_err() {
            // Another thread published its mapping first; this one was never shared.
            // SAFETY: unmapping our own fresh mapping, which nothing refers to.
            unsafe { libc::munmap(addr, len) };
        }
        Ok(Self(*ZERO.get().expect("published above")))
    }

    fn ptr(self) -> *const u8 {
        self.0 as *const u8
    }
}

/// Tuning of serving.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The most 4 KiB pages one fault may fill: the faulting page and the missing pages after
    /// it, as far as the region's readahead window has grown (runs of zero pages go on to the
    /// next 2 MiB boundary). 1 serves the faulting page only.
    pub fault_around_pages: u64,
    /// How long a worker keeps polling without sleeping after a fault.
    pub spin: Duration,
    /// The most forks the daemon keeps at once (any state); more are refused.
    pub max_forks: usize,
    /// A snapshot without a working set records one from this many forks (0: only on
    /// request).
    pub record_forks: u32,
    /// How long a recording fork records.
    pub record_window: Duration,
    /// The nice value of a worker while it replays working sets.
    pub replay_nice: i32,
}

/// How far a run of zero pages may extend: up to the next 2 MiB boundary.
const ZERO_WINDOW_PAGES: u64 = 512;

/// How many event batches one readiness may drain before other sessions get a turn.
const BATCHES_PER_TURN: usize = 8;

/// A fork being served.
#[derive(Debug)]
pub struct Session {
    fork: Arc<Fork>,
    snapshot: Arc<Snapshot>,
    uffd: Userfaultfd,
    pidfd: Option<OwnedFd>,
    /// Kept open for as long as the VMM runs; the VMM never sends anything more.
    connection: Option<UnixStream>,
    /// Sorted by base address; validated not to overlap.
    regions: Vec<Region>,
    /// Set when a region has 2 MiB pages.
    huge_zero: Option<HugeZeroPage>,
    deferred: Vec<u64>,
    options: ServeOptions,
    eexist: EexistStreak,
    outside_log: RateLimiter,
    error_log: RateLimiter,
    latencies: Vec<u64>,
    /// Installs pages ahead of the guest (working-set replay, graduation).
    prefetcher: Option<Prefetcher>,
    /// Notes first touches while the fork records its snapshot's working set.
    recorder: Option<Recorder>,
    /// A recording whose window has passed, for the worker to hand on.
    finished_recording: Option<(Ticket, Trace)>,
}

impl Session {
    /// A session over validated regions (their file ranges disjoint and inside the snapshot,
    /// so the page maps are bounded by the snapshot's size). Allocation failures are errors.
    pub fn new(
        fork: Arc<Fork>,
        snapshot: Arc<Snapshot>,
        uffd: Userfaultfd,
        pidfd: Option<OwnedFd>,
        mut mappings: Vec<GuestRegionUffdMapping>,
        options: ServeOptions,
    ) -> Result<Self, SetupError> {
        mappings.sort_by_key(|m| m.base_host_virt_addr);
        let pages: u64 = mappings.iter().map(|m| m.size / m.page_size).sum();
        let map = |n| Bitmap::try_new(n).map_err(|source| SetupError::PageMaps { pages, source });
        let mut regions = Vec::new();
        regions
            .try_reserve_exact(mappings.len())
            .map_err(|source| SetupError::PageMaps { pages, source })?;
        for mapping in mappings {
            let n = mapping.size / mapping.page_size;
            regions.push(Region {
                mapping,
                present: map(n)?,
                removed: map(n)?,
                readahead: Readahead::default(),
            });
        }
        let huge_zero = if regions.iter().any(|r| r.mapping.page_size != PAGE_SIZE_4K) {
            Some(HugeZeroPage::get().map_err(SetupError::HugeZeroPage)?)
        } else {
            None
        };
        Ok(Self {
            snapshot,
            fork,
            uffd,
            pidfd,
            connection: None,
            regions,
            huge_zero,
            deferred: Vec::new(),
            options,
            eexist: EexistStreak::default(),
            outside_log: RateLimiter::new(5, Duration::from_secs(10)),
            error_log: RateLimiter::new(5, Duration::from_secs(10)),
            latencies: Vec::with_capacity(64),
            prefetcher: None,
            recorder: None,
            finished_recording: None,
        })
    }

    /// Records the fork's first touches for its snapshot's working set during `window`. A
    /// recording fork does not replay (what it touches must fault to be seen).
    pub fn start_recording(&mut self, ticket: Ticket, window: Duration) {
        let pages = self.snapshot.size() / PAGE_SIZE_4K;
        match Recorder::new(ticket, pages, Instant::now() + window) {
            Some(recorder) => {
                self.recorder = Some(recorder);
                self.fork.set_recording(true);
            }
            None => {
                // Give the place back: another fork records instead.
                self.snapshot.working_set.submit(ticket, Vec::new());
            }
        }
    }

    /// Replays `set` (if any) ahead of the guest, then, with `graduate`, every other page
    /// (only when every region has 4 KiB pages: a graduated fork must need no fault at all).
    pub fn start_prefetch(&mut self, set: Option<Arc<WorkingSet>>, graduate: bool) {
        let graduate = graduate
            && self
                .regions
                .iter()
                .all(|r| r.mapping.page_size == PAGE_SIZE_4K);
        let prefetcher = Prefetcher::new(set, graduate);
        if prefetcher.phase() != Phase::Done {
            self.prefetcher = Some(prefetcher);
        }
    }

    /// The recording to hand on: one whose window has passed, or, with `ending`, whatever was
    /// recorded so far.
    pub fn take_recording(&mut self, ending: bool) -> Option<(Ticket, Trace)> {
        if ending {
            if let Some(recorder) = self.recorder.take() {
                self.finished_recording = Some(recorder.finish());
            }
        }
        let done = self.finished_recording.take();
        if done.is_some() {
            self.fork.set_recording(false);
        }
        done
    }

    /// The snapshot served.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    pub(super) fn prefetcher(&self) -> Option<&Prefetcher> {
        self.prefetcher.as_ref()
    }

    pub(super) fn prefetcher_mut(&mut self) -> Option<&mut Prefetcher> {
        self.prefetcher.as_mut()
    }

    /// Whether two addresses lie in the same region.
    pub(super) fn same_region(&self, a: u64, b: u64) -> bool {
        self.region_index(a).is_some() && self.region_index(a) == self.region_index(b)
    }

    /// The 4 KiB region holding snapshot page `file_page`: its index, the page in it, and how
    /// many pages from there (at most `max`) it still holds.
    pub(super) fn locate_file_page(&self, file_page: u64, max: u64) -> Option<(usize, u64, u64)> {
        let offset = file_page * PAGE_SIZE_4K;
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let m = &r.mapping;
            (m.page_size == PAGE_SIZE_4K && offset >= m.offset && offset < m.offset + m.size).then(
                || {
                    let page = (offset - m.offset) / PAGE_SIZE_4K;
                    (i, page, (r.present.len() - page).min(max))
                },
            )
        })
    }

    /// Snapshot pages from `file_page` to the next 4 KiB region's start (`u64::MAX`: none).
    pub(super) fn pages_to_next_region(&self, file_page: u64) -> u64 {
        let offset = file_page * PAGE_SIZE_4K;
        self.regions
            .iter()
            .filter(|r| r.mapping.page_size == PAGE_SIZE_4K && r.mapping.offset > offset)
            .map(|r| (r.mapping.offset - offset) / PAGE_SIZE_4K)
            .min()
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// In region `ri` from `page` on (`span` pages): the first pages that are present or
    /// given back are skipped; then the missing pages up to `max` of them. Returns the
    /// missing range and how many were skipped.
    pub(super) fn missing_span(
        &self,
        ri: usize,
        page: u64,
        span: u64,
        max: u64,
    ) -> (u64, u64, u64) {
        let r = &self.regions[ri];
        let wanted = |p: u64| !r.present.get(p) && !r.removed.get(p);
        let end = page + span;
        let mut start = page;
        while start < end && !wanted(start) {
            start += 1;
        }
        let mut stop = start;
        while stop < end && stop - start < max && wanted(stop) {
            stop += 1;
        }
        (start, stop, start - page)
    }

    /// The first page from `page` on in region `ri` that is not present.
    pub(super) fn next_missing(&self, ri: usize, page: u64) -> Option<u64> {
        let r = &self.regions[ri];
        (page..r.present.len()).find(|&p| !r.present.get(p))
    }

    /// How page `page` of region `ri` is filled.
    pub(super) fn fill_kind(&self, ri: usize, page: u64) -> Fill {
        self.regions[ri].fill_of(page, &self.snapshot)
    }

    /// One past the last of the missing pages of `kind` from `page` on (at most `max`).
    pub(super) fn run_of(&self, ri: usize, page: u64, kind: Fill, max: u64) -> u64 {
        let r = &self.regions[ri];
        let limit = (page + max.max(1)).min(r.present.len());
        page + run_len(page, limit, |p| {
            !r.present.get(p) && r.fill_of(p, &self.snapshot) == kind
        })
    }

    /// The snapshot's bytes for page `page` of region `ri`.
    pub(super) fn snapshot_ptr(&self, ri: usize, page: u64) -> *const u8 {
        let offset = self.regions[ri].file_offset_of(page) as usize;
        self.snapshot.bytes()[offset..].as_ptr()
    }

    pub(super) fn addr_of(&self, ri: usize, page: u64) -> u64 {
        self.regions[ri].addr_of(page)
    }

    pub(super) fn mark_present(&mut self, ri: usize, start: u64, end: u64) {
        let r = &mut self.regions[ri];
        r.present.fill(start, end.min(r.present.len()), true);
    }

    pub(super) fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Whether every page of every region is present.
    pub(super) fn all_present(&self) -> bool {
        self.regions
            .iter()
            .all(|r| r.present.count_ones() == r.present.len())
    }

    /// Each region's start and length.
    pub(super) fn region_spans(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.mapping.base_host_virt_addr, r.mapping.size))
            .collect()
    }

    /// Reads and drops every event still queued (after the regions were unregistered: a
    /// `REMOVE` whose thread waits for it to be read must not wait forever).
    pub(super) fn discard_events(&self, buf: &mut [UffdMsg]) {
        for _ in 0..BATCHES_PER_TURN * 8 {
            match self.uffd.read_events(buf) {
                Ok(n) if n > 0 => {
                    for msg in &buf[..n] {
                        drop(event_fd(msg));
                    }
                }
                _ => return,
            }
        }
    }

    /// Keeps the VMM's handoff connection open for as long as the session lives.
    pub fn keep_connection(&mut self, connection: UnixStream) {
        self.connection = Some(connection);
    }

    /// The fork served.
    pub fn fork(&self) -> &Arc<Fork> {
        &self.fork
    }

    /// The uffd.
    pub fn uffd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// The pidfd of the VMM, readable once it exits.
    pub fn pidfd(&self) -> Option<&OwnedFd> {
        self.pidfd.as_ref()
    }

    /// Whether faults wait for a retry.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Reads and handles pending events, at most [`BATCHES_PER_TURN`] batches. Never blocks,
    /// whatever the VMM does to the uffd.
    pub fn drain(&mut self, buf: &mut [UffdMsg]) -> Drain {
        for batch in 0..BATCHES_PER_TURN {
            let n = match self.uffd.read_events(buf) {
                Ok(0) => return Drain::Ended(EndReason::UffdGone),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Readiness with nothing to read: someone else read the events (the VMM
                    // may read its own uffd), or a race. Check nobody cleared O_NONBLOCK;
                    // the kernel's error event says so too, this catches it between polls.
                    if batch == 0 && self.uffd.nonblock_cleared() {
                        tracing::warn!(fork = %self.fork.id(),
                            "O_NONBLOCK was cleared on the uffd; ending the session");
                        return Drain::Ended(EndReason::UffdTampered);
                    }
                    return self.after_events(Drain::Idle);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(fork = %self.fork.id(), error = %e, "reading the uffd failed \
                        (EOPNOTSUPP: this kernel cannot read a uffd with RWF_NOWAIT)");
                    return Drain::Ended(EndReason::ReadFailed);
                }
            };
            let batch = &buf[..n];
            // Descriptors come first: whatever happens to the batch, none may leak.
            for msg in batch {
                if let Some(fd) = event_fd(msg) {
                    drop(fd);
                }
            }
            let batch_start = Instant::now();
            for msg in batch {
                if let Fault::End(reason) = self.handle_event(msg, batch_start) {
                    return Drain::Ended(reason);
                }
            }
            self.fork.stats.record_latencies(&self.latencies);
            self.latencies.clear();
            self.check_recording_window(batch_start);
            if let Drain::Ended(reason) = self.after_events(Drain::Idle) {
                return Drain::Ended(reason);
            }
        }
        Drain::More
    }

    fn after_events(&mut self, otherwise: Drain) -> Drain {
        if self.has_deferred() {
            if let Err(reason) = self.retry_deferred() {
                return Drain::Ended(reason);
            }
        }
        otherwise
    }

    fn handle_event(&mut self, msg: &UffdMsg, batch_start: Instant) -> Fault {
        match msg.event {
            EVENT_PAGEFAULT => {
                bump(&self.fork.stats.faults, 1);
                // SAFETY: the kernel filled the `pagefault` member for this event type.
                let (addr, flags) = unsafe { (msg.arg.pagefault.address, msg.arg.pagefault.flags) };
                if flags & (PAGEFAULT_FLAG_WP | PAGEFAULT_FLAG_MINOR) != 0 {
                    bump(&self.fork.stats.errors, 1);
                    tracing::warn!(fork = %self.fork.id(), addr = format_args!("{addr:#x}"),
                        flags = format_args!("{flags:#x}"),
                        "write-protect or minor fault: the VMM registered a mode pagerd does not serve; ending the session");
                    return Fault::End(EndReason::UnservableFault);
                }
                let outcome = self.serve_fault(addr);
                match outcome {
                    Fault::Deferred => self.deferred.push(addr),
                    Fault::Resolved => {
                        let ns = batch_start.elapsed().as_nanos();
                        self.latencies.push(u64::try_from(ns).unwrap_or(u64::MAX));
                    }
                    Fault::End(_) => {}
                }
                outcome
            }
            EVENT_REMOVE => {
                // SAFETY: the kernel filled the `remove` member for this event type.
                let (start, end) = unsafe { (msg.arg.remove.start, msg.arg.remove.end) };
                self.apply_remove(start, end);
                Fault::Resolved
            }
            other => {
                // FORK (its fd already closed), REMAP, UNMAP: features refused at handoff.
                bump(&self.fork.stats.errors, 1);
                if let Some(skipped) = self.error_log.check(Instant::now()) {
                    let fork_event = other == EVENT_FORK;
                    tracing::warn!(fork = %self.fork.id(), event = other, fork_event, skipped,
                        "ignoring unexpected uffd event");
                }
                Fault::Resolved
            }
        }
    }

    /// Retries deferred faults once each; those that still cannot be served stay deferred.
    /// `Err` ends the session.
    pub fn retry_deferred(&mut self) -> Result<(), EndReason> {
        let pending = std::mem::take(&mut self.deferred);
        bump(&self.fork.stats.deferred_retries, pending.len() as u64);
        for addr in pending {
            match self.serve_fault(addr) {
                Fault::Resolved => {}
                Fault::Deferred => self.deferred.push(addr),
                Fault::End(reason) => return Err(reason),
            }
        }
        Ok(())
    }

    fn region_index(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.mapping.end() <= addr);
        (i < self.regions.len() && self.regions[i].mapping.contains(addr)).then_some(i)
    }

    fn serve_fault(&mut self, addr: u64) -> Fault {
        let Some(ri) = self.region_index(addr) else {
            bump(&self.fork.stats.outside_faults, 1);
            if let Some(skipped) = self.outside_log.check(Instant::now()) {
                tracing::warn!(fork = %self.fork.id(), addr = format_args!("{addr:#x}"), skipped,
                    "fault outside every declared region; poisoning the page");
            }
            return self.poison(addr & !(PAGE_SIZE_4K - 1), PAGE_SIZE_4K);
        };
        let page = self.regions[ri].page_of(addr);
        let kind = self.regions[ri].fill_of(page, &self.snapshot);
        let run = self.plan_run(ri, page, kind);
        match self.fill(ri, page, run, kind) {
            Ok(()) => Fault::Resolved,
            Err(e) if e.done > 0 => Fault::Resolved,
            Err(e) if matches!(e.errno, Errno::ENOENT | Errno::EINVAL) && run > 1 => {
                // The run may cross a mapping boundary inside the region: serve the page alone.
                match self.fill(ri, page, 1, kind) {
                    Ok(()) => Fault::Resolved,
                    Err(e) => self.fill_failed(ri, page, e),
                }
            }
            Err(e) => self.fill_failed(ri, page, e),
        }
    }

    /// How many pages from `page` on to fill: missing pages of the same kind, up to the
    /// region's current readahead window (data), or to the next 2 MiB boundary (zeros).
    /// Hugetlbfs regions fill one page at a time.
    fn plan_run(&mut self, ri: usize, page: u64, kind: Fill) -> u64 {
        let max = self.options.fault_around_pages;
        let region = &mut self.regions[ri];
        if max <= 1 || region.mapping.page_size != PAGE_SIZE_4K {
            return 1;
        }
        let window = match kind {
            Fill::Data => region.readahead.window_for(page, max),
            Fill::Zero => 0,
        };
        let limit = run_limit(page, kind, window, region.present.len());
        let region = &self.regions[ri];
        let run = run_len(page, limit, |p| {
            !region.present.get(p) && region.fill_of(p, &self.snapshot) == kind
        });
        self.regions[ri].readahead.stream_end = page + run;
        run
    }

    /// Fills `pages` pages of `kind` from `page` on, updating the present map and counters.
    fn fill(&mut self, ri: usize, page: u64, pages: u64, kind: Fill) -> Result<(), FillError> {
        let region = &self.regions[ri];
        let ps = region.mapping.page_size;
        let dst = region.addr_of(page);
        let len = pages * ps;
        let result = match (kind, self.huge_zero) {
            (Fill::Zero, _) if ps == PAGE_SIZE_4K => self.uffd.zeropage(dst, len),
            // SAFETY: the zero buffer is 2 MiB long and lives forever; hugetlbfs runs are one page.
            (Fill::Zero, Some(zero)) => unsafe { self.uffd.copy(dst, zero.ptr(), len) },
            // Set up with every session that has 2 MiB regions; cannot happen.
            (Fill::Zero, None) => Err(FillError {
                errno: Errno::EINVAL,
                done: 0,
            }),
            (Fill::Data, _) => {
                let src =
                    &self.snapshot.bytes()[region.file_offset_of(page) as usize..][..len as usize];
                // SAFETY: `src` is a live slice of the snapshot mapping, `len` bytes long
                // (validation put every region's file range inside the file).
                unsafe { self.uffd.copy(dst, src.as_ptr(), len) }
            }
        };
        let done = match result {
            Ok(()) => len,
            Err(e) => e.done,
        };
        let done_pages = done / ps;
        let stats = &self.fork.stats;
        match kind {
            Fill::Data => {
                bump(&stats.pages_copied, done_pages);
                bump(&stats.bytes_copied, done);
            }
            Fill::Zero => bump(&stats.zero_pages, done_pages),
        }
        if done_pages > 0 {
            self.eexist.progress();
            self.record(ri, page, done_pages);
        }
        self.regions[ri].present.fill(page, page + done_pages, true);
        result
    }

    /// Notes `pages` pages from `page` of region `ri` as touched, when recording.
    fn record(&mut self, ri: usize, page: u64, pages: u64) {
        let Some(recorder) = &mut self.recorder else {
            return;
        };
        let region = &self.regions[ri];
        if region.mapping.page_size != PAGE_SIZE_4K {
            return;
        }
        let new = recorder.touch(region.file_offset_of(page) / PAGE_SIZE_4K, pages);
        bump(&self.fork.stats.recorded_pages, new);
    }

    /// Hands the recording on once its window has passed.
    fn check_recording_window(&mut self, now: Instant) {
        if self.recorder.as_ref().is_some_and(|r| r.expired(now)) {
            self.finished_recording = self.recorder.take().map(Recorder::finish);
        }
    }

    fn fill_failed(&mut self, ri: usize, page: u64, e: FillError) -> Fault {
        let region = &mut self.regions[ri];
        let (addr, ps) = (region.addr_of(page), region.mapping.page_size);
        match e.errno {
            Errno::EEXIST => {
                region.present.set(page);
                bump(&self.fork.stats.already_present, 1);
                self.already_present(addr, ps)
            }
            Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Fault::Deferred,
            Errno::ESRCH => Fault::End(EndReason::VmmExited),
            errno => {
                // No bytes will ever come for this page (EFAULT: the memory file shrank;
                // EINVAL: the region does not match the mapping …): fail the access loudly.
                bump(&self.fork.stats.errors, 1);
                if let Some(skipped) = self.error_log.check(Instant::now()) {
                    tracing::warn!(fork = %self.fork.id(), addr = format_args!("{addr:#x}"),
                        %errno, skipped, "cannot serve fault; poisoning the page");
                }
                region.present.set(page);
                self.poison(addr, ps)
            }
        }
    }

    /// Answers a fault on a page that is already there: wake its threads. Endless repeats with
    /// nothing filled in between are a livelock.
    fn already_present(&mut self, addr: u64, len: u64) -> Fault {
        if self.eexist.present() {
            tracing::warn!(fork = %self.fork.id(), addr = format_args!("{addr:#x}"),
                streak = LIVELOCK_STREAK,
                "faults keep coming back for pages already present; ending the session");
            return Fault::End(EndReason::Livelock);
        }
        match self.uffd.wake(addr, len) {
            Err(Errno::ESRCH) => Fault::End(EndReason::VmmExited),
            _ => Fault::Resolved,
        }
    }

    /// Poisons `addr..addr+len` so the faulting access gets `SIGBUS` instead of hanging. If
    /// even that is impossible (the range is not registered, or not of that page size), the
    /// session ends: a fault pagerd cannot answer must not hang the VMM in silence.
    fn poison(&mut self, addr: u64, len: u64) -> Fault {
        match self.uffd.poison(addr, len) {
            Ok(()) => {}
            Err(e) if e.done > 0 => {}
            Err(e) => {
                return match e.errno {
                    Errno::EEXIST => self.already_present(addr, len),
                    Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Fault::Deferred,
                    Errno::ESRCH => Fault::End(EndReason::VmmExited),
                    errno => {
                        tracing::warn!(fork = %self.fork.id(), addr = format_args!("{addr:#x}"),
                            %errno, "cannot poison an unservable fault; ending the session");
                        Fault::End(EndReason::UnservableFault)
                    }
                }
            }
        }
        bump(&self.fork.stats.poisoned_pages, 1);
        self.eexist.progress();
        Fault::Resolved
    }

    /// The guest gave `start..end` back: those pages read as zeros from now on.
    fn apply_remove(&mut self, start: u64, end: u64) {
        bump(&self.fork.stats.removes, 1);
        for region in &mut self.regions {
            let (base, ps) = (region.mapping.base_host_virt_addr, region.mapping.page_size);
            let (lo, hi) = (start.max(base), end.min(region.mapping.end()));
            if lo >= hi {
                continue;
            }
            let (first, last) = ((lo - base) / ps, (hi - base).div_ceil(ps));
            region.removed.fill(first, last, true);
            region.present.fill(first, last, false);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped before it served (its handoff failed late) gives its recording
        // place back; a served one handed its trace on when it ended.
        if let Some(recorder) = self.recorder.take() {
            let (ticket, _) = recorder.finish();
            self.snapshot.working_set.submit(ticket, Vec::new());
            self.fork.set_recording(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_doubles_on_a_continuing_fault_and_restarts_otherwise() {
        let mut ra = Readahead::default();
        assert_eq!(ra.window_for(10, 32), 1, "the first fault fills one page");
        ra.stream_end = 11;
        assert_eq!(ra.window_for(11, 32), 2);
        ra.stream_end = 13;
        assert_eq!(ra.window_for(13, 32), 4);
        ra.stream_end = 17;
        let mut page = 17;
        for _ in 0..10 {
            let w = ra.window_for(page, 32);
            page += w;
            ra.stream_end = page;
        }
        assert_eq!(ra.window, 32, "capped at the maximum");
        assert_eq!(ra.window_for(5, 32), 1, "a jump starts over");
        assert_eq!(ra.window_for(7, 1), 1);
    }

    #[test]
    fn runs_stop_at_the_window_the_region_end_or_the_first_misfit() {
        // Data: as far as the window.
        assert_eq!(run_limit(10, Fill::Data, 8, 1000), 18);
        assert_eq!(
            run_limit(10, Fill::Data, 8, 12),
            12,
            "never past the region"
        );
        // Zeros: to the next 2 MiB boundary, whatever the window.
        assert_eq!(run_limit(10, Fill::Zero, 0, 10_000), 512);
        assert_eq!(run_limit(512, Fill::Zero, 0, 10_000), 1024);
        assert_eq!(run_limit(1000, Fill::Zero, 0, 1010), 1010);
        // The faulting page is always in.
        assert_eq!(run_len(5, 6, |_| false), 1);
        assert_eq!(run_len(5, 5, |_| true), 1);
        assert_eq!(run_len(5, 20, |_| true), 15);
        assert_eq!(run_len(5, 20, |p| p != 9), 4);
    }

    #[test]
    fn a_streak_of_eexist_without_progress_is_a_livelock() {
        let mut streak = EexistStreak::default();
        for _ in 1..LIVELOCK_STREAK {
            assert!(!streak.present());
        }
        streak.progress();
        for _ in 1..LIVELOCK_STREAK {
            assert!(!streak.present(), "progress resets the count");
        }
        assert!(streak.present());
    }
}
