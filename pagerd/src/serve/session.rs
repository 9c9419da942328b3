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
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_4K};
use proto::model::EndReason;

use crate::bitmap::Bitmap;
use crate::ratelimit::RateLimiter;
use crate::registry::Fork;
use crate::serve::prefetch::{Phase, Prefetcher};
use crate::serve::record::Recorder;
use crate::serve::region::{run_len, run_limit, Fill, HugeZeroPage, Readahead, Region, Regions};
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

/// Tuning of serving.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The most 4 KiB pages one fault may fill: the faulting page and the missing pages after
    /// it, as far as the region's readahead window has grown (runs of zero pages go on to the
    /// next 2 MiB boundary). 1 serves the faulting page only.
    pub fault_around_pages: u64,
    /// How long a worker keeps polling without sleeping after a fault.
    pub spin: Duration,
    /// The most forks the daemon keeps at once (any state), in all and per user; more are
    /// refused.
    pub fork_quota: crate::owners::ForkQuota,
    /// A snapshot without a working set records one from this many forks (0: only on
    /// request).
    pub record_forks: u32,
    /// How long a recording fork records.
    pub record_window: Duration,
    /// The nice value of a worker while it replays working sets.
    pub replay_nice: i32,
}

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
    regions: Regions,
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
        let regions = Regions(regions);
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

    /// Its regions.
    pub(super) fn regions(&self) -> &Regions {
        &self.regions
    }

    /// Its regions, to mark pages present.
    pub(super) fn regions_mut(&mut self) -> &mut Regions {
        &mut self.regions
    }

    pub(super) fn prefetcher(&self) -> Option<&Prefetcher> {
        self.prefetcher.as_ref()
    }

    pub(super) fn prefetcher_mut(&mut self) -> Option<&mut Prefetcher> {
        self.prefetcher.as_mut()
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
        self.regions.index_of(addr)
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
        for region in self.regions.iter_mut() {
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
