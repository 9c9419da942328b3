//! One fork being served: its regions, its uffd, and the fault path.
//!
//! ```text
//!  uffd events (batch of up to 64)
//!    PAGEFAULT addr ─▶ region (binary search) ─▶ page ─▶ run of missing pages of one kind
//!        ├─ data: UFFDIO_COPY from the snapshot's shared mapping
//!        ├─ zero (snapshot page all zeros, or removed): UFFDIO_ZEROPAGE
//!        │        (hugetlbfs has no zero page: copy from a zero buffer)
//!        ├─ EEXIST ─▶ UFFDIO_WAKE        ├─ EAGAIN ─▶ deferred, retried after events
//!        └─ ESRCH ─▶ the VMM is gone: the session ends
//!    REMOVE start..end ─▶ pages marked removed (read back as zeros), present bits cleared
//! ```
//!
//! A session lives on exactly one worker, so its state needs no lock. The `present` bitmap is
//! advisory: it keeps fault-around runs from colliding with pages already there, but a fault on
//! a page marked present is still served (the kernel says it is missing).

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
use crate::serve::uffd::{FillError, UffdMsg, Userfaultfd, EVENT_PAGEFAULT, EVENT_REMOVE};
use crate::snapshot::Snapshot;
use crate::stats::bump;

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
    Gone,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Data,
    Zero,
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

/// A read-only, never-touched 2 MiB anonymous mapping: zeros to copy into hugetlbfs pages,
/// which `UFFDIO_ZEROPAGE` does not support. Reading it costs no memory.
fn huge_zero_page() -> *const u8 {
    static ZERO: OnceLock<usize> = OnceLock::new();
    let addr = *ZERO.get_or_init(|| {
        // SAFETY: a fresh private anonymous read-only mapping; never written, never unmapped.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE_2M as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "cannot map 2 MiB of zeros");
        addr as usize
    });
    addr as *const u8
}

/// Tuning of the fault path.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The most 4 KiB pages one fault may fill: the faulting page and the missing pages after
    /// it, as far as the region's readahead window has grown (runs of zero pages go on to the
    /// next 2 MiB boundary). 1 serves the faulting page only.
    pub fault_around_pages: u64,
    /// How long a worker keeps polling without sleeping after a fault.
    pub spin: Duration,
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
    _connection: UnixStream,
    /// Sorted by base address; validated not to overlap.
    regions: Vec<Region>,
    deferred: Vec<u64>,
    options: ServeOptions,
    outside_log: RateLimiter,
    error_log: RateLimiter,
    latencies: Vec<u64>,
}

impl Session {
    /// A session over validated regions.
    pub fn new(
        fork: Arc<Fork>,
        snapshot: Arc<Snapshot>,
        uffd: Userfaultfd,
        pidfd: Option<OwnedFd>,
        connection: UnixStream,
        mut mappings: Vec<GuestRegionUffdMapping>,
        options: ServeOptions,
    ) -> Self {
        mappings.sort_by_key(|m| m.base_host_virt_addr);
        let regions = mappings
            .into_iter()
            .map(|mapping| {
                let pages = mapping.size / mapping.page_size;
                Region {
                    mapping,
                    present: Bitmap::new(pages),
                    removed: Bitmap::new(pages),
                    readahead: Readahead::default(),
                }
            })
            .collect();
        Self {
            snapshot,
            fork,
            uffd,
            pidfd,
            _connection: connection,
            regions,
            deferred: Vec::new(),
            options,
            outside_log: RateLimiter::new(5, Duration::from_secs(10)),
            error_log: RateLimiter::new(5, Duration::from_secs(10)),
            latencies: Vec::with_capacity(64),
        }
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

    /// Reads and handles pending events, at most [`BATCHES_PER_TURN`] batches.
    pub fn drain(&mut self, buf: &mut [UffdMsg]) -> Drain {
        for _ in 0..BATCHES_PER_TURN {
            let n = match self.uffd.read_events(buf) {
                Ok(0) => return Drain::Ended(EndReason::UffdGone),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return self.after_events(Drain::Idle)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(fork = %self.fork.id(), error = %e, "reading the uffd failed");
                    return Drain::Ended(EndReason::ReadFailed);
                }
            };
            let batch_start = Instant::now();
            for msg in &buf[..n] {
                if self.handle_event(msg, batch_start) == Fault::Gone {
                    return Drain::Ended(EndReason::VmmExited);
                }
            }
            self.fork.stats.record_latencies(&self.latencies);
            self.latencies.clear();
            if let Drain::Ended(reason) = self.after_events(Drain::Idle) {
                return Drain::Ended(reason);
            }
        }
        Drain::More
    }

    fn after_events(&mut self, otherwise: Drain) -> Drain {
        if self.has_deferred() && !self.retry_deferred() {
            return Drain::Ended(EndReason::VmmExited);
        }
        otherwise
    }

    fn handle_event(&mut self, msg: &UffdMsg, batch_start: Instant) -> Fault {
        match msg.event {
            EVENT_PAGEFAULT => {
                bump(&self.fork.stats.faults, 1);
                // SAFETY: the kernel filled the `pagefault` member for this event type.
                let addr = unsafe { msg.arg.pagefault.address };
                let outcome = self.serve_fault(addr);
                match outcome {
                    Fault::Deferred => self.deferred.push(addr),
                    Fault::Resolved => {
                        let ns = batch_start.elapsed().as_nanos();
                        self.latencies.push(u64::try_from(ns).unwrap_or(u64::MAX));
                    }
                    Fault::Gone => {}
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
                bump(&self.fork.stats.errors, 1);
                if let Some(skipped) = self.error_log.check(Instant::now()) {
                    tracing::warn!(fork = %self.fork.id(), event = other, skipped, "ignoring unexpected uffd event");
                }
                Fault::Resolved
            }
        }
    }

    /// Retries deferred faults once each; those that still cannot be served stay deferred.
    /// `false` means the VMM is gone.
    pub fn retry_deferred(&mut self) -> bool {
        let pending = std::mem::take(&mut self.deferred);
        bump(&self.fork.stats.deferred_retries, pending.len() as u64);
        for addr in pending {
            match self.serve_fault(addr) {
                Fault::Resolved => {}
                Fault::Deferred => self.deferred.push(addr),
                Fault::Gone => return false,
            }
        }
        true
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
                    "fault outside every declared region; not served");
            }
            return Fault::Resolved;
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
        let end_limit = match kind {
            // Zero runs cost no memory and `UFFDIO_ZEROPAGE` is cheap: let them reach further.
            Fill::Zero => (page / ZERO_WINDOW_PAGES + 1) * ZERO_WINDOW_PAGES,
            Fill::Data => page + region.readahead.window_for(page, max),
        }
        .min(region.present.len());
        let mut end = page + 1;
        while end < end_limit
            && !region.present.get(end)
            && region.fill_of(end, &self.snapshot) == kind
        {
            end += 1;
        }
        region.readahead.stream_end = end;
        end - page
    }

    /// Fills `pages` pages of `kind` from `page` on, updating the present map and counters.
    fn fill(&mut self, ri: usize, page: u64, pages: u64, kind: Fill) -> Result<(), FillError> {
        let region = &self.regions[ri];
        let ps = region.mapping.page_size;
        let dst = region.addr_of(page);
        let len = pages * ps;
        let result = match kind {
            Fill::Zero if ps == PAGE_SIZE_4K => self.uffd.zeropage(dst, len),
            // SAFETY: the zero buffer is 2 MiB long and lives forever; hugetlbfs runs are one page.
            Fill::Zero => unsafe { self.uffd.copy(dst, huge_zero_page(), len) },
            Fill::Data => {
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
        self.regions[ri].present.fill(page, page + done_pages, true);
        result
    }

    fn fill_failed(&mut self, ri: usize, page: u64, e: FillError) -> Fault {
        let region = &mut self.regions[ri];
        match e.errno {
            Errno::EEXIST => {
                region.present.set(page);
                bump(&self.fork.stats.already_present, 1);
                let (addr, ps) = (region.addr_of(page), region.mapping.page_size);
                match self.uffd.wake(addr, ps) {
                    Err(Errno::ESRCH) => Fault::Gone,
                    _ => Fault::Resolved,
                }
            }
            Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Fault::Deferred,
            Errno::ESRCH => Fault::Gone,
            errno => {
                bump(&self.fork.stats.errors, 1);
                if let Some(skipped) = self.error_log.check(Instant::now()) {
                    tracing::warn!(fork = %self.fork.id(), addr = format_args!("{:#x}", region.addr_of(page)),
                        %errno, skipped, "cannot serve fault");
                }
                Fault::Resolved
            }
        }
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
