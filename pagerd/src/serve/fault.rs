//! On-demand faults: which pages one fault fills, and what each answer of the kernel means.
//!
//! ```text
//!   fault at addr
//!     ├─ outside every declared region ─▶ poison the page (the access gets SIGBUS)
//!     └─ region (binary search) ─▶ page ─▶ run of missing pages of one kind
//!          ├─ data: copied from the source, as far as the region's readahead window
//!          ├─ zero (all-zero page in the source, or given back): the zero page, as far as
//!          │        the next 2 MiB boundary (hugetlbfs: copied from a zero buffer)
//!          ├─ EEXIST ─▶ wake (many in a row with nothing filled: livelock, the session ends)
//!          ├─ EAGAIN/ENOMEM ─▶ deferred, retried after events
//!          ├─ ESRCH ─▶ the VMM is gone: the session ends
//!          └─ anything else (EFAULT: the file shrank …) ─▶ poison
//!   poison fails for good ─▶ the session ends (unservable_fault): never a silent hang
//! ```
//!
//! The policy knows the fork's memory only through [`ForkMemory`], so it runs against a fake
//! installer in the unit tests below.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use proto::model::EndReason;
use proto::ForkId;

use super::memory::ForkMemory;
use super::record::Recorder;
use super::region::{run_len, run_limit, Fill};
use super::uffd::{FillError, PageInstaller, Wake};
use crate::memory::{VmmAddr, PAGE_4K};
use crate::ratelimit::RateLimiter;
use crate::stats::{bump, ForkStats};

/// What happened to one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// Answered (filled, woken or poisoned).
    Resolved,
    /// To be retried after other events.
    Deferred,
    /// The session is over.
    End(EndReason),
}

/// Faults answered `EEXIST` in a row, with no page filled or poisoned in between, after which
/// the session is ended as a livelock. A genuine race (a fault queued just before the run that
/// filled its page) costs one `EEXIST` per waiting thread, far below this.
pub(super) const LIVELOCK_STREAK: u32 = 4096;

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

/// Whose faults these are, where they are counted, and who notes first touches.
pub(super) struct FaultContext<'a> {
    /// The fork, for the log.
    pub fork: &'a ForkId,
    /// Its counters.
    pub stats: &'a ForkStats,
    /// Set while it records its snapshot's working set.
    pub recorder: Option<&'a mut Recorder>,
}

/// The on-demand fault policy of one fork.
#[derive(Debug)]
pub(super) struct OnDemand {
    fault_around_pages: u64,
    eexist: EexistStreak,
    deferred: Vec<VmmAddr>,
    outside_log: RateLimiter,
    error_log: RateLimiter,
}

impl OnDemand {
    /// A fault fills at most `fault_around_pages` 4 KiB pages.
    pub(super) fn new(fault_around_pages: u64) -> Self {
        Self {
            fault_around_pages,
            eexist: EexistStreak::default(),
            deferred: Vec::new(),
            outside_log: RateLimiter::new(5, Duration::from_secs(10)),
            error_log: RateLimiter::new(5, Duration::from_secs(10)),
        }
    }

    /// Whether faults wait for a retry.
    pub(super) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Serves the fault at `addr`; a deferred one is kept for [`Self::retry_deferred`].
    pub(super) fn fault<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        addr: VmmAddr,
        cx: &mut FaultContext<'_>,
    ) -> Fault {
        let outcome = self.serve(memory, addr, cx);
        if outcome == Fault::Deferred {
            self.deferred.push(addr);
        }
        outcome
    }

    /// Retries deferred faults once each; those that still cannot be served stay deferred.
    /// `Err` ends the session.
    pub(super) fn retry_deferred<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        cx: &mut FaultContext<'_>,
    ) -> Result<(), EndReason> {
        let pending = std::mem::take(&mut self.deferred);
        bump(&cx.stats.deferred_retries, pending.len() as u64);
        for addr in pending {
            match self.serve(memory, addr, cx) {
                Fault::Resolved => {}
                Fault::Deferred => self.deferred.push(addr),
                Fault::End(reason) => return Err(reason),
            }
        }
        Ok(())
    }

    fn serve<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        addr: VmmAddr,
        cx: &mut FaultContext<'_>,
    ) -> Fault {
        let Some(ri) = memory.regions().index_of(addr) else {
            bump(&cx.stats.outside_faults, 1);
            if let Some(skipped) = self.outside_log.check(Instant::now()) {
                tracing::warn!(fork = %cx.fork, %addr, skipped,
                    "fault outside every declared region; poisoning the page");
            }
            return self.poison(memory, addr.page_start(PAGE_4K), PAGE_4K, cx);
        };
        let page = memory.regions()[ri].page_of(addr);
        let kind = memory.fill_kind(ri, page);
        let run = self.plan_run(memory, ri, page, kind);
        match self.fill(memory, ri, page, run, kind, cx) {
            Ok(()) => Fault::Resolved,
            Err(e) if e.done > 0 => Fault::Resolved,
            Err(e) if matches!(e.errno, Errno::ENOENT | Errno::EINVAL) && run > 1 => {
                // The run may cross a mapping boundary inside the region: serve the page alone.
                match self.fill(memory, ri, page, 1, kind, cx) {
                    Ok(()) => Fault::Resolved,
                    Err(e) => self.fill_failed(memory, ri, page, e, cx),
                }
            }
            Err(e) => self.fill_failed(memory, ri, page, e, cx),
        }
    }

    /// How many pages from `page` on to fill: missing pages of the same kind, up to the
    /// region's current readahead window (data), or to the next 2 MiB boundary (zeros).
    /// Hugetlbfs regions fill one page at a time.
    fn plan_run<U: PageInstaller>(
        &self,
        memory: &mut ForkMemory<U>,
        ri: usize,
        page: u64,
        kind: Fill,
    ) -> u64 {
        let max = self.fault_around_pages;
        let region = &mut memory.regions_mut()[ri];
        if max <= 1 || !region.small_pages() {
            return 1;
        }
        let window = match kind {
            Fill::Data => region.readahead.window_for(page, max),
            Fill::Zero => 0,
        };
        let limit = run_limit(page, kind, window, region.present.len());
        let run = {
            let region = &memory.regions()[ri];
            let source = memory.source();
            run_len(page, limit, |p| {
                !region.present.get(p) && region.fill_of(p, source) == kind
            })
        };
        memory.regions_mut()[ri].readahead.stream_end = page + run;
        run
    }

    /// Fills `pages` pages of `kind` from `page` on, counting them and noting first touches.
    fn fill<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        ri: usize,
        page: u64,
        pages: u64,
        kind: Fill,
        cx: &mut FaultContext<'_>,
    ) -> Result<(), FillError> {
        let filled = memory.fill(ri, page, pages, kind, Wake::Yes);
        match kind {
            Fill::Data => {
                bump(&cx.stats.pages_copied, filled.pages);
                bump(&cx.stats.bytes_copied, filled.bytes);
            }
            Fill::Zero => bump(&cx.stats.zero_pages, filled.pages),
        }
        if filled.pages > 0 {
            self.eexist.progress();
            let region = &memory.regions()[ri];
            if let (Some(recorder), true) = (cx.recorder.as_deref_mut(), region.small_pages()) {
                let first = region.file_offset_of(page).page();
                bump(
                    &cx.stats.recorded_pages,
                    recorder.touch(first.0, filled.pages),
                );
            }
        }
        filled.result
    }

    fn fill_failed<U: PageInstaller>(
        &mut self,
        memory: &mut ForkMemory<U>,
        ri: usize,
        page: u64,
        e: FillError,
        cx: &mut FaultContext<'_>,
    ) -> Fault {
        let region = &memory.regions()[ri];
        let (addr, ps) = (region.addr_of(page), region.page_size());
        match e.errno {
            Errno::EEXIST => {
                memory.regions_mut().mark_present(ri, page, page + 1);
                bump(&cx.stats.already_present, 1);
                self.already_present(memory, addr, ps, cx)
            }
            Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Fault::Deferred,
            Errno::ESRCH => Fault::End(EndReason::VmmExited),
            errno => {
                // No bytes will ever come for this page (EFAULT: the memory file shrank;
                // EINVAL: the region does not match the mapping …): fail the access loudly.
                bump(&cx.stats.errors, 1);
                if let Some(skipped) = self.error_log.check(Instant::now()) {
                    tracing::warn!(fork = %cx.fork, %addr, %errno, skipped,
                        "cannot serve fault; poisoning the page");
                }
                memory.regions_mut().mark_present(ri, page, page + 1);
                self.poison(memory, addr, ps, cx)
            }
        }
    }

    /// Answers a fault on a page that is already there: wake its threads. Endless repeats with
    /// nothing filled in between are a livelock.
    fn already_present<U: PageInstaller>(
        &mut self,
        memory: &ForkMemory<U>,
        addr: VmmAddr,
        len: u64,
        cx: &FaultContext<'_>,
    ) -> Fault {
        if self.eexist.present() {
            tracing::warn!(fork = %cx.fork, %addr, streak = LIVELOCK_STREAK,
                "faults keep coming back for pages already present; ending the session");
            return Fault::End(EndReason::Livelock);
        }
        match memory.wake(addr, len) {
            Err(Errno::ESRCH) => Fault::End(EndReason::VmmExited),
            _ => Fault::Resolved,
        }
    }

    /// Poisons `addr..addr+len` so the faulting access gets `SIGBUS` instead of hanging. If
    /// even that is impossible (the range is not registered, or not of that page size), the
    /// session ends: a fault pagerd cannot answer must not hang the VMM in silence.
    fn poison<U: PageInstaller>(
        &mut self,
        memory: &ForkMemory<U>,
        addr: VmmAddr,
        len: u64,
        cx: &FaultContext<'_>,
    ) -> Fault {
        match memory.poison(addr, len) {
            Ok(()) => {}
            Err(e) if e.done > 0 => {}
            Err(e) => {
                return match e.errno {
                    Errno::EEXIST => self.already_present(memory, addr, len, cx),
                    Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR => Fault::Deferred,
                    Errno::ESRCH => Fault::End(EndReason::VmmExited),
                    errno => {
                        tracing::warn!(fork = %cx.fork, %addr, %errno,
                            "cannot poison an unservable fault; ending the session");
                        Fault::End(EndReason::UnservableFault)
                    }
                }
            }
        }
        bump(&cx.stats.poisoned_pages, 1);
        self.eexist.progress();
        Fault::Resolved
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_vmm::{test_memory, Call, Page};
    use super::*;
    use crate::working_set::slot::Slot;

    const BASE: u64 = 0x10000;

    fn page(i: u64) -> u64 {
        BASE + i * PAGE_4K
    }

    fn data(i: u64) -> Page {
        Page::Data((i + 1) as u8)
    }

    struct Fixture {
        id: ForkId,
        stats: ForkStats,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                id: "f".parse().unwrap(),
                stats: ForkStats::default(),
            }
        }

        fn cx(&self) -> FaultContext<'_> {
            FaultContext {
                fork: &self.id,
                stats: &self.stats,
                recorder: None,
            }
        }
    }

    fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_fault_copies_its_page_and_sequential_faults_grow_the_run() {
        let mut memory = test_memory(64, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(16);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(3) + 5), &mut f.cx()),
            Fault::Resolved
        );
        assert_eq!(
            memory.installer().page(page(3)),
            Some(data(3)),
            "the source's bytes"
        );
        assert_eq!(
            memory.installer().page(page(4)),
            None,
            "a first fault fills one page"
        );
        // Each fault that continues the stream doubles the window: 2, 4, 8, then 16 at most.
        for (at, run) in [(4, 2), (6, 4), (10, 8), (18, 16), (34, 16)] {
            policy.fault(&mut memory, VmmAddr(page(at)), &mut f.cx());
            for i in at..at + run {
                assert_eq!(memory.installer().page(page(i)), Some(data(i)), "page {i}");
            }
            assert_eq!(
                memory.installer().page(page(at + run)),
                None,
                "run from {at} is {run}"
            );
        }
        assert_eq!(get(&f.stats.pages_copied), 1 + 2 + 4 + 8 + 16 + 16);
        assert_eq!(
            get(&f.stats.bytes_copied),
            get(&f.stats.pages_copied) * PAGE_4K
        );
        assert_eq!(get(&f.stats.zero_pages), 0);
    }

    #[test]
    fn zero_pages_are_mapped_not_copied_and_a_run_stops_at_a_kind_change() {
        let mut memory = test_memory(8, &[2, 3, 4, 6]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(16);
        policy.fault(&mut memory, VmmAddr(page(2)), &mut f.cx());
        for i in 2..5 {
            assert_eq!(memory.installer().page(page(i)), Some(Page::Zero));
        }
        assert_eq!(memory.installer().page(page(5)), None, "page 5 holds data");
        assert_eq!(get(&f.stats.zero_pages), 3);
        assert_eq!(get(&f.stats.pages_copied), 0);
        // A page given back reads as zeros, whatever the source holds.
        memory.remove(VmmAddr(page(0)), VmmAddr(page(1)));
        policy.fault(&mut memory, VmmAddr(page(0)), &mut f.cx());
        assert_eq!(memory.installer().page(page(0)), Some(Page::Zero));
    }

    #[test]
    fn a_fault_outside_every_region_is_poisoned() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(1);
        let outcome = policy.fault(&mut memory, VmmAddr(page(10) + 9), &mut f.cx());
        assert_eq!(outcome, Fault::Resolved);
        assert_eq!(memory.installer().page(page(10)), Some(Page::Poison));
        assert_eq!(get(&f.stats.outside_faults), 1);
        assert_eq!(get(&f.stats.poisoned_pages), 1);
    }

    #[test]
    fn a_page_already_there_is_woken_and_endless_repeats_are_a_livelock() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(1);
        policy.fault(&mut memory, VmmAddr(page(1)), &mut f.cx());
        for _ in 1..LIVELOCK_STREAK {
            assert_eq!(
                policy.fault(&mut memory, VmmAddr(page(1)), &mut f.cx()),
                Fault::Resolved
            );
        }
        assert_eq!(
            memory.installer().count(Call::Wake),
            LIVELOCK_STREAK as usize - 1
        );
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(1)), &mut f.cx()),
            Fault::End(EndReason::Livelock)
        );
        assert_eq!(get(&f.stats.already_present), u64::from(LIVELOCK_STREAK));
    }

    #[test]
    fn a_busy_address_space_defers_the_fault_until_a_retry_serves_it() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(1);
        memory.installer().fail_next(Call::Copy, Errno::EAGAIN, 0);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(2)), &mut f.cx()),
            Fault::Deferred
        );
        assert!(policy.has_deferred());
        assert_eq!(memory.installer().page(page(2)), None);
        policy.retry_deferred(&mut memory, &mut f.cx()).unwrap();
        assert!(!policy.has_deferred());
        assert_eq!(memory.installer().page(page(2)), Some(data(2)));
        assert_eq!(get(&f.stats.deferred_retries), 1);
    }

    #[test]
    fn a_gone_vmm_ends_the_session_and_an_unservable_page_is_poisoned_or_ends_it() {
        let mut memory = test_memory(4, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(1);
        memory.installer().fail_next(Call::Copy, Errno::ESRCH, 0);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(0)), &mut f.cx()),
            Fault::End(EndReason::VmmExited)
        );
        // EFAULT (the file shrank): the access gets SIGBUS instead of hanging.
        memory.installer().fail_next(Call::Copy, Errno::EFAULT, 0);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(1)), &mut f.cx()),
            Fault::Resolved
        );
        assert_eq!(memory.installer().page(page(1)), Some(Page::Poison));
        assert_eq!(get(&f.stats.errors), 1);
        // And if even poison fails, the session ends rather than leave the VMM hanging.
        memory.installer().fail_next(Call::Copy, Errno::EFAULT, 0);
        memory.installer().fail_next(Call::Poison, Errno::EINVAL, 0);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(2)), &mut f.cx()),
            Fault::End(EndReason::UnservableFault)
        );
    }

    #[test]
    fn a_run_that_fails_part_way_counts_what_it_installed() {
        let mut memory = test_memory(8, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(8);
        policy.fault(&mut memory, VmmAddr(page(0)), &mut f.cx());
        memory.installer().fail_next(Call::Copy, Errno::ENOMEM, 1);
        assert_eq!(
            policy.fault(&mut memory, VmmAddr(page(1)), &mut f.cx()),
            Fault::Resolved
        );
        assert_eq!(memory.installer().page(page(1)), Some(data(1)));
        assert_eq!(memory.installer().page(page(2)), None);
        assert_eq!(get(&f.stats.pages_copied), 2);
        assert!(!policy.has_deferred(), "the faulting page was served");
    }

    #[test]
    fn a_recording_fork_notes_each_snapshot_page_once_in_first_touch_order() {
        let slot = Slot::default();
        let ticket = slot.claim(1).unwrap();
        let mut recorder =
            Recorder::new(ticket, 16, Instant::now() + Duration::from_secs(60)).unwrap();
        let mut memory = test_memory(16, &[]);
        let f = Fixture::new();
        let mut policy = OnDemand::new(2);
        for at in [5, 6, 1, 5] {
            let mut cx = FaultContext {
                recorder: Some(&mut recorder),
                ..f.cx()
            };
            policy.fault(&mut memory, VmmAddr(page(at)), &mut cx);
        }
        assert_eq!(recorder.finish().1, vec![5, 6, 7, 1]);
        assert_eq!(get(&f.stats.recorded_pages), 4);
    }
}
