//! Prefetch: installing a fork's pages before its guest asks.
//!
//! ```text
//!  Replay     the snapshot's working set, run by run (rough first-touch order): each run's
//!             missing pages in one UFFDIO_COPY (contents from the working-set file) or
//!             UFFDIO_ZEROPAGE, DONTWAKE, then one UFFDIO_WAKE per step
//!  Graduate   (optional) then every other missing page, region by region, in runs of up to
//!             2 MiB; once every page is present the regions are unregistered from the uffd
//!             and the session ends `graduated`
//!  Done       nothing more to install
//! ```
//!
//! The worker asks for a step only when it has no fault to serve, with a small budget, so a
//! fault waits at most one step behind prefetch; replay steps of every session come before any
//! graduation step. Pages already present (`EEXIST`: the guest got there first, possibly
//! writing) and pages the guest gave back (`REMOVE`) are left alone, so guest writes are never
//! overwritten. A step never reads the disk on the worker: a run whose contents are not in the
//! page cache waits (a background thread reads the set's file in large sequential reads)
//! while the worker serves faults. Each phase is a variant holding exactly its own cursor.

use std::sync::Arc;

use nix::errno::Errno;
use proto::model::EndReason;
use proto::{ForkId, SnapshotId};

use super::memory::{Filled, ForkMemory};
use super::region::Fill;
use super::uffd::{PageInstaller, Wake};
use crate::memory::{CopySource, FilePage, VmmAddr};
use crate::stats::{bump, ForkStats};
use crate::working_set::slot::Slot;
use crate::working_set::WorkingSet;

/// Most pages one step installs.
pub const STEP_PAGES: u64 = 256;
/// Most ioctls one step makes.
const STEP_IOCTLS: u32 = 32;
/// How far ahead one residency check of a set's contents looks (4 MiB).
const RESIDENCY_WINDOW: usize = 4 << 20;
/// Longest run graduation installs with one ioctl (2 MiB).
const GRADUATE_RUN: u64 = 512;

/// What prefetch does next, with the cursor of that phase.
#[derive(Debug)]
pub enum Prefetcher {
    /// Installing the working set; then graduating, if asked.
    Replay {
        /// Where replay stands.
        replay: Replay,
        /// Whether graduation follows.
        then_graduate: bool,
    },
    /// Installing everything else.
    Graduate(Graduation),
    /// Finished (or given up).
    Done,
}

/// Where replay of a working set stands.
#[derive(Debug)]
pub struct Replay {
    set: Arc<WorkingSet>,
    /// The next run of the set, and how many of its pages are behind us.
    run: usize,
    run_done: u64,
    /// The set's contents up to this address were in the page cache when last looked at.
    resident_until: usize,
}

/// Where graduation stands: a region and a page in it.
#[derive(Debug, Default)]
pub struct Graduation {
    region: usize,
    page: u64,
    /// Pages installed in the current pass (a pass with none cannot finish).
    pass_installed: u64,
}

/// What prefetch is doing, for the worker's scheduling.
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

/// Whose prefetch this is, where it is counted, and where a damaged set is reported.
pub struct PrefetchContext<'a> {
    /// The fork, for the log.
    pub fork: &'a ForkId,
    /// Its snapshot, for the log.
    pub snapshot: &'a SnapshotId,
    /// Its counters.
    pub stats: &'a ForkStats,
    /// The snapshot's working-set slot, where damage is reported.
    pub working_set: &'a Slot,
}

impl Prefetcher {
    /// Replays `set` (if any), then graduates if asked.
    pub fn new(set: Option<Arc<WorkingSet>>, graduate: bool) -> Self {
        match (set, graduate) {
            (Some(set), then_graduate) => Self::Replay {
                replay: Replay {
                    set,
                    run: 0,
                    run_done: 0,
                    resident_until: 0,
                },
                then_graduate,
            },
            (None, true) => Self::Graduate(Graduation::default()),
            (None, false) => Self::Done,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self {
            Self::Replay { .. } => Phase::Replay,
            Self::Graduate(_) => Phase::Graduate,
            Self::Done => Phase::Done,
        }
    }

    /// Installs up to [`STEP_PAGES`] pages ahead of the guest.
    pub fn step<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        cx: &PrefetchContext<'_>,
    ) -> Step {
        let mut wake = WakeSpan::default();
        let outcome = match self {
            Self::Replay {
                replay,
                then_graduate,
            } => match replay.step(memory, &mut wake, cx) {
                PhaseStep::Step(step) => step,
                PhaseStep::Finished => {
                    *self = if *then_graduate {
                        Self::Graduate(Graduation::default())
                    } else {
                        Self::Done
                    };
                    Step::More
                }
                PhaseStep::GiveUp => {
                    *self = Self::Done;
                    Step::Done
                }
            },
            Self::Graduate(graduation) => match graduation.step(memory, &mut wake, cx) {
                PhaseStep::Step(step) => step,
                PhaseStep::Finished => {
                    *self = Self::Done;
                    finish_graduation(memory, cx)
                }
                PhaseStep::GiveUp => {
                    *self = Self::Done;
                    Step::Done
                }
            },
            Self::Done => Step::Done,
        };
        if let Err(reason) = wake.flush(memory) {
            return Step::Ended(reason);
        }
        outcome
    }
}

/// How one phase's step went.
enum PhaseStep {
    /// The step's outcome; the phase goes on.
    Step(Step),
    /// The phase is complete.
    Finished,
    /// Prefetch cannot go on for this fork (logged).
    GiveUp,
}

impl Replay {
    fn step<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        wake: &mut WakeSpan,
        cx: &PrefetchContext<'_>,
    ) -> PhaseStep {
        let set = self.set.clone();
        let (mut pages, mut ioctls) = (0u64, 0u32);
        while pages < STEP_PAGES && ioctls < STEP_IOCTLS {
            let Some(run) = set.runs().get(self.run).copied() else {
                return PhaseStep::Finished;
            };
            let (run_index, done) = (self.run, self.run_done);
            let first = FilePage(run.page + done);
            let left = u64::from(run.pages) - done;
            let Some((ri, rpage, span)) = memory.regions().locate_file_page(first, left) else {
                // Not in this fork's memory: skip to where a region starts, or the run's end.
                let skip = memory.regions().pages_to_next_region(first).min(left);
                self.advance(run.pages, skip);
                continue;
            };
            let (start, end, skipped) =
                memory
                    .regions()
                    .missing_span(ri, rpage, span, STEP_PAGES - pages);
            bump(&cx.stats.prefetch_skipped, skipped);
            if start == end {
                self.advance(run.pages, span);
                continue;
            }
            let filled = if run.zero {
                memory.fill(ri, start, end - start, Fill::Zero, Wake::Later)
            } else {
                let skip = done + (start - rpage);
                let Some(bytes) = set.data(run_index, skip, end - start) else {
                    tracing::warn!(fork = %cx.fork, "the working set has no contents for a run; replay stopped");
                    return PhaseStep::Finished;
                };
                if !self.known_resident(bytes) {
                    if pages == 0 {
                        set.read_ahead();
                        return PhaseStep::Step(Step::Waiting);
                    }
                    break;
                }
                if !set.verify(bytes) {
                    // Never installed: these pages fault and are served from the snapshot.
                    report_damaged_set(&set, cx);
                    self.advance(run.pages, end - rpage);
                    continue;
                }
                memory.fill_from(ri, start, CopySource::new(bytes), Wake::Later)
            };
            ioctls += 1;
            let (n, skipped) = match settle(
                memory,
                filled,
                ri,
                start,
                &cx.stats.replayed_pages,
                wake,
                cx,
            ) {
                Ok(done) => done,
                Err(step) => return step,
            };
            pages += n;
            self.advance(run.pages, start - rpage + n + skipped);
        }
        PhaseStep::Step(Step::More)
    }

    /// `by` more pages of the current run (of `run_pages`) are behind us.
    fn advance(&mut self, run_pages: u32, by: u64) {
        self.run_done += by;
        if self.run_done >= u64::from(run_pages) {
            self.run += 1;
            self.run_done = 0;
        }
    }

    /// Whether `bytes` of the set are in the page cache: known from an earlier look, or one
    /// `mincore` over the next [`RESIDENCY_WINDOW`] bytes (the contents of the runs that
    /// follow are contiguous in the file).
    fn known_resident(&mut self, bytes: &[u8]) -> bool {
        let end = bytes.as_ptr() as usize + bytes.len();
        if end <= self.resident_until {
            return true;
        }
        let resident = self.set.resident_prefix(bytes, RESIDENCY_WINDOW);
        self.resident_until = bytes.as_ptr() as usize + resident;
        resident >= bytes.len()
    }
}

impl Graduation {
    fn step<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        wake: &mut WakeSpan,
        cx: &PrefetchContext<'_>,
    ) -> PhaseStep {
        let (mut pages, mut ioctls) = (0u64, 0u32);
        while pages < STEP_PAGES && ioctls < STEP_IOCTLS {
            if self.region >= memory.regions().len() {
                // A pass is over: done if every page is there, else go round again (pages
                // given back meanwhile), unless the pass achieved nothing.
                let achieved = std::mem::take(&mut self.pass_installed);
                (self.region, self.page) = (0, 0);
                if memory.regions().all_present() {
                    return PhaseStep::Finished;
                }
                if achieved == 0 {
                    return PhaseStep::GiveUp;
                }
                continue;
            }
            let ri = self.region;
            let Some(first) = memory.regions().next_missing(ri, self.page) else {
                (self.region, self.page) = (ri + 1, 0);
                continue;
            };
            let kind = memory.fill_kind(ri, first);
            let end = memory.regions().run_of(
                ri,
                first,
                kind,
                GRADUATE_RUN.min(STEP_PAGES - pages),
                memory.source(),
            );
            ioctls += 1;
            let filled = memory.fill(ri, first, end - first, kind, Wake::Later);
            let (n, skipped) = match settle(
                memory,
                filled,
                ri,
                first,
                &cx.stats.graduated_pages,
                wake,
                cx,
            ) {
                Ok(done) => done,
                Err(step) => return step,
            };
            pages += n;
            self.page = first + n + skipped;
            self.pass_installed += n;
        }
        PhaseStep::Step(Step::More)
    }
}

/// Counts what an install did and queues the wake of its pages; `Err` is the step's end: the
/// VMM's address space is busy (`Waiting`), the VMM is gone, or prefetch gives up.
fn settle<U: PageInstaller>(
    memory: &mut ForkMemory<U>,
    filled: Filled,
    ri: usize,
    start: u64,
    installed: &std::sync::atomic::AtomicU64,
    wake: &mut WakeSpan,
    cx: &PrefetchContext<'_>,
) -> Result<(u64, u64), PhaseStep> {
    let n = filled.pages;
    let skipped = match filled.result {
        Ok(()) => 0,
        Err(e) => match e.errno {
            Errno::EEXIST => {
                // The guest got to this page first (and may have written it): keep it.
                memory
                    .regions_mut()
                    .mark_present(ri, start + n, start + n + 1);
                1
            }
            _ if n > 0 => 0,
            Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => {
                return Err(PhaseStep::Step(Step::Waiting))
            }
            Errno::ESRCH => return Err(PhaseStep::Step(Step::Ended(EndReason::VmmExited))),
            errno => {
                let addr = memory.regions().addr_of(ri, start);
                tracing::warn!(fork = %cx.fork, %errno, %addr,
                    "prefetch cannot install pages; the fork is served on demand from here");
                return Err(PhaseStep::GiveUp);
            }
        },
    };
    bump(installed, n);
    bump(&cx.stats.prefetch_skipped, skipped);
    if n > 0 {
        let regions = memory.regions();
        let (a, b) = (regions.addr_of(ri, start), regions.addr_of(ri, start + n));
        wake.add(memory, a, b)
            .map_err(|reason| PhaseStep::Step(Step::Ended(reason)))?;
    }
    Ok((n, skipped))
}

/// Reports contents of the working set that do not match their sums (on the snapshot's
/// `working_set_error`, and in the log).
fn report_damaged_set(set: &WorkingSet, cx: &PrefetchContext<'_>) {
    let why = format!(
        "{} block(s) of the working set's contents do not match their checksums; those \
         pages are served from the snapshot instead (clear or record the set again)",
        set.bad_blocks()
    );
    if set.log_damage_once() {
        tracing::error!(fork = %cx.fork, snapshot = %cx.snapshot, %why, "damaged working set");
    }
    cx.working_set.set_error(why);
}

/// Every page is present: unregisters every region (the kernel serves them from now on;
/// waiting threads are woken) and ends the session.
fn finish_graduation<U: PageInstaller>(memory: &ForkMemory<U>, cx: &PrefetchContext<'_>) -> Step {
    match memory.unregister_all() {
        Ok(()) => Step::Ended(EndReason::Graduated),
        Err(Errno::ESRCH) => Step::Ended(EndReason::VmmExited),
        Err(errno) => {
            tracing::warn!(fork = %cx.fork, %errno,
                "cannot unregister a graduated fork's memory; it stays served");
            Step::Done
        }
    }
}

/// Threads to wake after a step: one span per region.
#[derive(Debug, Default)]
struct WakeSpan {
    span: Option<(VmmAddr, VmmAddr)>,
}

impl WakeSpan {
    fn add<U: PageInstaller>(
        &mut self,
        memory: &ForkMemory<U>,
        start: VmmAddr,
        end: VmmAddr,
    ) -> Result<(), EndReason> {
        match &mut self.span {
            Some((lo, hi)) if memory.regions().same_region(*lo, start) => {
                *lo = (*lo).min(start);
                *hi = (*hi).max(end);
                Ok(())
            }
            _ => {
                self.flush(memory)?;
                self.span = Some((start, end));
                Ok(())
            }
        }
    }

    fn flush<U: PageInstaller>(&mut self, memory: &ForkMemory<U>) -> Result<(), EndReason> {
        if let Some((lo, hi)) = self.span.take() {
            if memory.wake(lo, hi.offset_from(lo)) == Err(Errno::ESRCH) {
                return Err(EndReason::VmmExited);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_vmm::{test_memory, Call, Page};
    use super::*;
    use crate::memory::PAGE_4K;
    use crate::working_set::Plan;

    const BASE: u64 = 0x10000;

    fn page(i: u64) -> u64 {
        BASE + i * PAGE_4K
    }

    struct Fixture {
        fork: ForkId,
        snapshot: SnapshotId,
        stats: ForkStats,
        slot: Slot,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                fork: "f".parse().unwrap(),
                snapshot: "s".parse().unwrap(),
                stats: ForkStats::default(),
                slot: Slot::default(),
            }
        }

        fn cx(&self) -> PrefetchContext<'_> {
            PrefetchContext {
                fork: &self.fork,
                snapshot: &self.snapshot,
                stats: &self.stats,
                working_set: &self.slot,
            }
        }
    }

    /// Steps until prefetch says something other than `More`.
    fn run<U: PageInstaller>(
        p: &mut Prefetcher,
        memory: &mut ForkMemory<U>,
        cx: &PrefetchContext<'_>,
    ) -> Step {
        for _ in 0..1000 {
            match p.step(memory, cx) {
                Step::More => {}
                other => return other,
            }
        }
        panic!("prefetch never finished");
    }

    /// A stored working set of the test memory's `pages` (page `i` holds byte `i + 1`).
    fn stored_set(
        dir: &std::path::Path,
        pages: &[u64],
        zero: &[u64],
        size: u64,
    ) -> Arc<WorkingSet> {
        let plan = Plan::new(pages, |p| zero.contains(&p));
        let pending = WorkingSet::write(dir, &plan, size, 1, 0, |offset, len| {
            let first = offset / PAGE_4K;
            Ok((0..len as u64 / PAGE_4K)
                .flat_map(|i| {
                    let p = first + i;
                    let fill = if zero.contains(&p) { 0 } else { (p + 1) as u8 };
                    std::iter::repeat_n(fill, PAGE_4K as usize)
                })
                .collect())
        })
        .unwrap();
        Arc::new(pending.commit().unwrap())
    }

    #[test]
    fn nothing_asked_is_done_at_once() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut p = Prefetcher::new(None, false);
        assert_eq!(p.phase(), Phase::Done);
        assert_eq!(p.step(&mut memory, &f.cx()), Step::Done);
        assert!(memory.installer().calls.borrow().is_empty());
    }

    #[test]
    fn graduation_installs_every_missing_page_keeps_the_guests_and_hands_the_memory_back() {
        let mut memory = test_memory(1200, &[100, 101]);
        let f = Fixture::new();
        // The guest already has page 7 (and wrote it).
        memory
            .installer()
            .pages
            .borrow_mut()
            .insert(page(7), Page::Zero);
        let mut p = Prefetcher::new(None, true);
        assert_eq!(p.phase(), Phase::Graduate);
        assert_eq!(
            run(&mut p, &mut memory, &f.cx()),
            Step::Ended(EndReason::Graduated)
        );
        assert_eq!(p.phase(), Phase::Done);
        let vmm = memory.installer();
        assert_eq!(
            vmm.page(page(7)),
            Some(Page::Zero),
            "the guest's page is kept"
        );
        assert_eq!(vmm.page(page(100)), Some(Page::Zero));
        assert_eq!(vmm.page(page(1199)), Some(Page::Data((1200 % 256) as u8)));
        assert_eq!(vmm.pages.borrow().len(), 1200);
        assert_eq!(vmm.count(Call::Unregister), 1);
        assert!(
            vmm.calls.borrow().iter().all(|c| c.3 != Some(Wake::Yes)),
            "installs never wake one by one"
        );
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get(&f.stats.graduated_pages), 1199);
        assert_eq!(get(&f.stats.prefetch_skipped), 1);
    }

    #[test]
    fn a_busy_vmm_makes_prefetch_wait_and_a_gone_one_ends_it() {
        let mut memory = test_memory(16, &[]);
        let f = Fixture::new();
        let mut p = Prefetcher::new(None, true);
        memory.installer().fail_next(Call::Copy, Errno::EAGAIN, 0);
        assert_eq!(p.step(&mut memory, &f.cx()), Step::Waiting);
        memory.installer().fail_next(Call::Copy, Errno::ESRCH, 0);
        assert_eq!(
            p.step(&mut memory, &f.cx()),
            Step::Ended(EndReason::VmmExited)
        );
        // Any other error: prefetch gives up, the fork is served on demand.
        let mut p = Prefetcher::new(None, true);
        memory.installer().fail_next(Call::Copy, Errno::EINVAL, 0);
        assert_eq!(p.step(&mut memory, &f.cx()), Step::Done);
        assert_eq!(p.phase(), Phase::Done);
    }

    #[test]
    fn a_graduated_fork_whose_memory_cannot_be_handed_back_stays_served() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut p = Prefetcher::new(None, true);
        memory
            .installer()
            .fail_next(Call::Unregister, Errno::EINVAL, 0);
        assert_eq!(run(&mut p, &mut memory, &f.cx()), Step::Done);
        assert_eq!(memory.installer().pages.borrow().len(), 4);
    }

    #[test]
    fn replay_installs_the_sets_pages_from_its_file_then_graduates_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let set = stored_set(dir.path(), &[9, 3, 4, 12, 13], &[12, 13], 32 * PAGE_4K);
        let mut memory = test_memory(32, &[12, 13]);
        let f = Fixture::new();
        let mut p = Prefetcher::new(Some(set.clone()), false);
        assert_eq!(p.phase(), Phase::Replay);
        // The set's file is fresh in the page cache: nothing waits for the disk.
        assert_eq!(run(&mut p, &mut memory, &f.cx()), Step::Done);
        let vmm = memory.installer();
        for i in [3, 4, 9] {
            assert_eq!(vmm.page(page(i)), Some(Page::Data((i + 1) as u8)));
        }
        assert_eq!(vmm.page(page(12)), Some(Page::Zero));
        assert_eq!(vmm.pages.borrow().len(), 5, "only the set");
        assert!(vmm.count(Call::Wake) >= 1, "one wake per step");

        let mut memory = test_memory(32, &[12, 13]);
        let mut p = Prefetcher::new(Some(set), true);
        assert_eq!(
            run(&mut p, &mut memory, &f.cx()),
            Step::Ended(EndReason::Graduated)
        );
        assert_eq!(memory.installer().pages.borrow().len(), 32);
    }

    #[test]
    fn damaged_contents_of_a_set_are_never_installed_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let set = stored_set(dir.path(), &[1, 2], &[], 8 * PAGE_4K);
        // Break the stored contents of the set behind its back.
        let path = dir.path().join(crate::working_set::FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // The data ends where the one block sum (4 bytes) starts.
        let last_data_byte = bytes.len() - 4 - 1;
        bytes[last_data_byte] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let set = {
            drop(set);
            Arc::new(WorkingSet::load(&path, 8 * PAGE_4K).unwrap().unwrap())
        };
        let mut memory = test_memory(8, &[]);
        let f = Fixture::new();
        let mut p = Prefetcher::new(Some(set), false);
        assert_eq!(run(&mut p, &mut memory, &f.cx()), Step::Done);
        assert!(
            memory.installer().pages.borrow().is_empty(),
            "nothing damaged installed"
        );
        let (_, _, error) = f.slot.info();
        assert!(error.is_some_and(|e| e.contains("do not match their checksums")));
    }
}
