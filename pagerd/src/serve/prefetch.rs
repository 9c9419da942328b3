//! Prefetch: installing a fork's pages before its guest asks.
//!
//! ```text
//!  replay     the snapshot's working set, run by run (rough first-touch order): each run's
//!             missing pages in one UFFDIO_COPY (contents from the working-set file) or
//!             UFFDIO_ZEROPAGE, DONTWAKE, then one UFFDIO_WAKE per step
//!  graduate   (optional) then every other missing page, region by region, in runs of up to
//!             2 MiB; once every page is present the regions are unregistered from the uffd
//!             and the session ends `graduated`
//! ```
//!
//! The worker calls [`Session::prefetch_step`] only when it has no fault to serve, with a
//! small budget, so a fault waits at most one step behind prefetch; replay steps of every
//! session come before any graduation step. Pages already present (`EEXIST`: the guest got
//! there first, possibly writing) and pages the guest gave back (`REMOVE`) are left alone, so
//! guest writes are never overwritten. A step never reads the disk on the worker: a run whose
//! contents are not in the page cache waits (a background thread reads the set's file in
//! large sequential reads) while the worker serves faults.

use std::sync::Arc;

use nix::errno::Errno;
use proto::handoff::PAGE_SIZE_4K;
use proto::model::EndReason;

use super::region::Fill;
use super::session::Session;
use super::uffd::{empty_msg, FillError, Wake};
use crate::stats::bump;
use crate::working_set::WorkingSet;

/// Most pages one step installs.
pub const STEP_PAGES: u64 = 256;
/// Most ioctls one step makes.
const STEP_IOCTLS: u32 = 32;
/// How far ahead one residency check of a set's contents looks (4 MiB).
const RESIDENCY_WINDOW: usize = 4 << 20;
/// Longest run graduation installs with one ioctl (2 MiB).
const GRADUATE_RUN: u64 = 512;

/// Where a session's prefetch stands.
#[derive(Debug)]
pub struct Prefetcher {
    set: Option<Arc<WorkingSet>>,
    /// The next run of the set, and how many of its pages are behind us.
    run: usize,
    run_done: u64,
    graduate: bool,
    /// Graduation's cursor: region index and page in it.
    region: usize,
    page: u64,
    /// Pages graduation installed in its current pass (a pass with none cannot finish).
    pass_installed: u64,
    /// The set's contents up to this address were in the page cache when last looked at.
    resident_until: usize,
    phase: Phase,
}

/// What prefetch is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Installing the working set.
    Replay,
    /// Installing everything else.
    Graduate,
    /// Finished (or given up).
    Done,
}

/// What one step left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More to do.
    More,
    /// The next contents are still being read from disk: try again a little later.
    Waiting,
    /// Nothing more to do.
    Done,
    /// The session is over (graduated, or the VMM is gone).
    Ended(EndReason),
}

impl Prefetcher {
    /// Replays `set` (if any), then graduates if asked.
    pub fn new(set: Option<Arc<WorkingSet>>, graduate: bool) -> Self {
        let phase = match (&set, graduate) {
            (Some(_), _) => Phase::Replay,
            (None, true) => Phase::Graduate,
            (None, false) => Phase::Done,
        };
        Self {
            set,
            run: 0,
            run_done: 0,
            graduate,
            region: 0,
            page: 0,
            pass_installed: 0,
            resident_until: 0,
            phase,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    fn replay_done(&mut self) {
        self.phase = if self.graduate {
            Phase::Graduate
        } else {
            Phase::Done
        };
    }
}

/// Threads to wake after a step: one span per region.
#[derive(Debug, Default)]
struct WakeSpan {
    span: Option<(u64, u64)>,
}

impl WakeSpan {
    fn add(&mut self, session: &Session, start: u64, end: u64) -> Result<(), EndReason> {
        match &mut self.span {
            Some((lo, hi)) if session.regions().same_region(*lo, start) => {
                *lo = (*lo).min(start);
                *hi = (*hi).max(end);
                Ok(())
            }
            _ => {
                self.flush(session)?;
                self.span = Some((start, end));
                Ok(())
            }
        }
    }

    fn flush(&mut self, session: &Session) -> Result<(), EndReason> {
        if let Some((lo, hi)) = self.span.take() {
            if session.uffd().wake(lo, hi - lo) == Err(Errno::ESRCH) {
                return Err(EndReason::VmmExited);
            }
        }
        Ok(())
    }
}

/// Which counter an install adds to.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Replayed,
    Graduated,
}

/// How one prefetch ioctl went.
enum Installed {
    /// `n` pages installed, then `skipped` pages were found present.
    Pages { n: u64, skipped: u64 },
    /// Try again later (`EAGAIN`: the VMM's memory map is changing).
    Later,
    /// The session is over.
    End(EndReason),
    /// Prefetch cannot go on for this fork (logged).
    GiveUp,
}

impl Session {
    /// Whether prefetch has work, and which phase.
    pub fn prefetch_phase(&self) -> Phase {
        self.prefetcher().map_or(Phase::Done, Prefetcher::phase)
    }

    /// Installs up to [`STEP_PAGES`] pages ahead of the guest.
    pub fn prefetch_step(&mut self) -> Step {
        let mut wake = WakeSpan::default();
        let step = match self.prefetch_phase() {
            Phase::Replay => self.replay_step(&mut wake),
            Phase::Graduate => self.graduate_step(&mut wake),
            Phase::Done => Step::Done,
        };
        if let Err(reason) = wake.flush(self) {
            return Step::Ended(reason);
        }
        match step {
            Step::Done if self.prefetch_phase() == Phase::Graduate => Step::More,
            Step::Done if self.graduated() => self.finish_graduation(),
            other => other,
        }
    }

    fn replay_step(&mut self, wake: &mut WakeSpan) -> Step {
        let (mut pages, mut ioctls) = (0u64, 0u32);
        while pages < STEP_PAGES && ioctls < STEP_IOCTLS {
            let p = self.prefetcher_mut().expect("replaying");
            let set = p.set.clone().expect("replay has a set");
            let Some(run) = set.runs().get(p.run).copied() else {
                p.replay_done();
                return Step::More;
            };
            let (run_index, done) = (p.run, p.run_done);
            let first = run.page + done;
            let left = u64::from(run.pages) - done;
            let advance = |s: &mut Session, by: u64| {
                let p = s.prefetcher_mut().expect("replaying");
                p.run_done += by;
                if p.run_done >= u64::from(run.pages) {
                    p.run += 1;
                    p.run_done = 0;
                }
            };
            let Some((ri, rpage, span)) = self.regions().locate_file_page(first, left) else {
                // Not in this fork's memory: skip to where a region starts, or the run's end.
                let skip = self.regions().pages_to_next_region(first).min(left);
                advance(self, skip);
                continue;
            };
            let (start, end, skipped) =
                self.regions()
                    .missing_span(ri, rpage, span, STEP_PAGES - pages);
            bump(&self.fork().stats.prefetch_skipped, skipped);
            if start == end {
                advance(self, span);
                continue;
            }
            let kind = if run.zero { Fill::Zero } else { Fill::Data };
            let src = match kind {
                Fill::Zero => None,
                Fill::Data => {
                    let skip = done + (start - rpage);
                    let Some(bytes) = set.data(run_index, skip, end - start) else {
                        tracing::warn!(fork = %self.fork().id(), "the working set has no contents for a run; replay stopped");
                        self.prefetcher_mut().expect("replaying").replay_done();
                        return Step::More;
                    };
                    if !self.known_resident(&set, bytes) {
                        if pages == 0 {
                            set.read_ahead();
                            return Step::Waiting;
                        }
                        break;
                    }
                    if !set.verify(bytes) {
                        // Never installed: these pages fault and are served from the snapshot.
                        self.report_damaged_set(&set);
                        advance(self, end - rpage);
                        continue;
                    }
                    Some(bytes.as_ptr())
                }
            };
            ioctls += 1;
            let installed = self.install(ri, start, end, kind, src);
            let (n, skipped) = match self.settle(installed, ri, start, Counter::Replayed, wake) {
                Ok(done) => done,
                Err(step) => return step,
            };
            pages += n;
            advance(self, start - rpage + n + skipped);
        }
        Step::More
    }

    fn graduate_step(&mut self, wake: &mut WakeSpan) -> Step {
        let (mut pages, mut ioctls) = (0u64, 0u32);
        while pages < STEP_PAGES && ioctls < STEP_IOCTLS {
            let p = self.prefetcher_mut().expect("graduating");
            let (ri, page) = (p.region, p.page);
            if ri >= self.regions().len() {
                // A pass is over: done if every page is there, else go round again (pages
                // given back meanwhile), unless the pass achieved nothing.
                let p = self.prefetcher_mut().expect("graduating");
                let achieved = std::mem::take(&mut p.pass_installed);
                (p.region, p.page) = (0, 0);
                if self.graduated() || achieved == 0 {
                    self.prefetcher_mut().expect("graduating").phase = Phase::Done;
                    return Step::Done;
                }
                continue;
            }
            let Some(first) = self.regions().next_missing(ri, page) else {
                let p = self.prefetcher_mut().expect("graduating");
                (p.region, p.page) = (ri + 1, 0);
                continue;
            };
            let kind = self.regions().fill_kind(ri, first, self.snapshot());
            let end = self.regions().run_of(
                ri,
                first,
                kind,
                GRADUATE_RUN.min(STEP_PAGES - pages),
                self.snapshot(),
            );
            let src = match kind {
                Fill::Zero => None,
                Fill::Data => Some(self.regions().snapshot_ptr(ri, first, self.snapshot())),
            };
            ioctls += 1;
            let installed = self.install(ri, first, end, kind, src);
            let (n, skipped) = match self.settle(installed, ri, first, Counter::Graduated, wake) {
                Ok(done) => done,
                Err(step) => return step,
            };
            pages += n;
            let p = self.prefetcher_mut().expect("graduating");
            p.page = first + n + skipped;
            p.pass_installed += n;
        }
        Step::More
    }

    /// Counts what an install did and queues the wake of its pages; `Err` is the step's end:
    /// the disk or the VMM's address space is busy (`Waiting`), the VMM is gone, or prefetch
    /// gives up for this fork.
    fn settle(
        &mut self,
        installed: Installed,
        ri: usize,
        start: u64,
        counter: Counter,
        wake: &mut WakeSpan,
    ) -> Result<(u64, u64), Step> {
        match installed {
            Installed::Pages { n, skipped } => {
                let stats = &self.fork().stats;
                let installed = match counter {
                    Counter::Replayed => &stats.replayed_pages,
                    Counter::Graduated => &stats.graduated_pages,
                };
                bump(installed, n);
                bump(&stats.prefetch_skipped, skipped);
                if n > 0 {
                    let regions = self.regions();
                    let (a, b) = (regions.addr_of(ri, start), regions.addr_of(ri, start + n));
                    wake.add(self, a, b).map_err(Step::Ended)?;
                }
                Ok((n, skipped))
            }
            Installed::Later => Err(Step::Waiting),
            Installed::End(reason) => Err(Step::Ended(reason)),
            Installed::GiveUp => {
                self.prefetcher_mut().expect("prefetching").phase = Phase::Done;
                Err(Step::Done)
            }
        }
    }

    /// Installs pages `start..end` of region `ri` (all missing when planned) without waking
    /// anyone, from `src` (data) or as zero pages.
    fn install(
        &mut self,
        ri: usize,
        start: u64,
        end: u64,
        kind: Fill,
        src: Option<*const u8>,
    ) -> Installed {
        let dst = self.regions().addr_of(ri, start);
        let len = (end - start) * PAGE_SIZE_4K;
        let result = match (kind, src) {
            (Fill::Zero, _) => self.uffd().zeropage_with(dst, len, Wake::Later),
            // SAFETY: `src` points at `len` bytes of a live mapping the session holds (the
            // working set's file, or the snapshot's), checked by the caller to be in range.
            (Fill::Data, Some(src)) => unsafe { self.uffd().copy_with(dst, src, len, Wake::Later) },
            (Fill::Data, None) => Err(FillError {
                errno: Errno::EINVAL,
                done: 0,
            }),
        };
        let n = match &result {
            Ok(()) => end - start,
            Err(e) => e.done / PAGE_SIZE_4K,
        };
        self.regions_mut().mark_present(ri, start, start + n);
        match result {
            Ok(()) => Installed::Pages { n, skipped: 0 },
            Err(e) => match e.errno {
                Errno::EEXIST => {
                    // The guest got to this page first (and may have written it): keep it.
                    self.regions_mut()
                        .mark_present(ri, start + n, start + n + 1);
                    Installed::Pages { n, skipped: 1 }
                }
                _ if n > 0 => Installed::Pages { n, skipped: 0 },
                Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Installed::Later,
                Errno::ESRCH => Installed::End(EndReason::VmmExited),
                errno => {
                    tracing::warn!(fork = %self.fork().id(), %errno,
                        addr = format_args!("{dst:#x}"),
                        "prefetch cannot install pages; the fork is served on demand from here");
                    Installed::GiveUp
                }
            },
        }
    }

    /// Whether `bytes` of `set` are in the page cache: known from an earlier look, or one
    /// `mincore` over the next [`RESIDENCY_WINDOW`] bytes (the contents of the runs that
    /// follow are contiguous in the file).
    /// Reports contents of the working set that do not match their sums (on the snapshot's
    /// `working_set_error`, and in the log).
    fn report_damaged_set(&self, set: &WorkingSet) {
        let why = format!(
            "{} block(s) of the working set's contents do not match their checksums; those \
             pages are served from the snapshot instead (clear or record the set again)",
            set.bad_blocks()
        );
        if set.log_damage_once() {
            tracing::error!(fork = %self.fork().id(), snapshot = %self.fork().snapshot(), %why,
                "damaged working set");
        }
        self.snapshot().working_set.set_error(why);
    }

    fn known_resident(&mut self, set: &WorkingSet, bytes: &[u8]) -> bool {
        let end = bytes.as_ptr() as usize + bytes.len();
        let p = self.prefetcher_mut().expect("replaying");
        if end <= p.resident_until {
            return true;
        }
        let resident = set.resident_prefix(bytes, RESIDENCY_WINDOW);
        p.resident_until = bytes.as_ptr() as usize + resident;
        resident >= bytes.len()
    }

    /// Every region is 4 KiB pages and every page present: nothing can fault any more.
    fn graduated(&self) -> bool {
        self.prefetcher().is_some_and(|p| p.graduate) && self.regions().all_present()
    }

    /// Unregisters every region (the kernel serves them from now on; waiting threads are
    /// woken) and ends the session. Events queued before are read and dropped, so no thread
    /// waits for pagerd to read them.
    fn finish_graduation(&mut self) -> Step {
        for (start, len) in self.regions().region_spans() {
            match self.uffd().unregister(start, len) {
                Ok(()) => {}
                Err(Errno::ESRCH) => return Step::Ended(EndReason::VmmExited),
                Err(errno) => {
                    tracing::warn!(fork = %self.fork().id(), %errno,
                        "cannot unregister a graduated fork's memory; it stays served");
                    self.prefetcher_mut().expect("graduating").graduate = false;
                    return Step::Done;
                }
            }
        }
        let mut buf = vec![empty_msg(); 64];
        self.discard_events(&mut buf);
        Step::Ended(EndReason::Graduated)
    }
}
