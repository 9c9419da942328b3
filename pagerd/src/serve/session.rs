//! One fork being served: its memory, its uffd's events, and the policies that fill it.
//!
//! ```text
//!  uffd events (batch of up to 64; fds a FORK event carries are closed at once)
//!    PAGEFAULT addr, flags
//!        ├─ WP or MINOR flag: a fault on a present page, which pagerd cannot resolve
//!        │        ─▶ the session ends (unservable_fault)
//!        └─ otherwise ─▶ on-demand policy (serve::fault) over the fork's memory
//!    REMOVE start..end ─▶ pages marked removed (read back as zeros), present bits cleared
//!  no event left ─▶ prefetch policy (serve::prefetch): replay, graduation
//! ```
//!
//! A session lives on exactly one worker, so its state needs no lock. It owns the fork's
//! [`ForkMemory`] (regions, source, installer) and the policies above it: [`OnDemand`]
//! faults, the [`Prefetcher`] and the [`Recorder`]. The `present` map is advisory: it keeps
//! fault-around runs from colliding with pages already there, but a fault on a page marked
//! present is still served (the kernel says it is missing). A session is built on the acceptor
//! before the VMM is told its handoff was accepted, so a failure to allocate its state is a
//! refused handoff, never a panic on a worker.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::handoff::GuestRegionUffdMapping;
use proto::model::EndReason;

use super::fault::{Fault, FaultContext, OnDemand};
use super::memory::{ForkMemory, MemorySetupError};
use super::prefetch::{Phase, PrefetchContext, Prefetcher, Step};
use super::record::Recorder;
use super::start::{self, Start};
use crate::memory::{MemorySource, VmmAddr};
use crate::ratelimit::RateLimiter;
use crate::registry::Fork;
use crate::serve::uffd::{
    event_fd, UffdMsg, Userfaultfd, EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMOVE,
    PAGEFAULT_FLAG_MINOR, PAGEFAULT_FLAG_WP,
};
use crate::snapshot::Snapshot;
use crate::stats::bump;
use crate::working_set::merge::Trace;
use crate::working_set::slot::Ticket;

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
    memory: ForkMemory<Userfaultfd>,
    pidfd: Option<OwnedFd>,
    /// Kept open for as long as the VMM runs; the VMM never sends anything more.
    connection: Option<UnixStream>,
    on_demand: OnDemand,
    error_log: RateLimiter,
    latencies: Vec<u64>,
    /// Installs pages ahead of the guest (working-set replay, graduation).
    prefetcher: Prefetcher,
    /// Notes first touches while the fork records its snapshot's working set.
    recorder: Option<Recorder>,
    /// A recording whose window has passed, for the worker to hand on.
    finished_recording: Option<(Ticket, Trace)>,
}

impl Session {
    /// A session for a VMM that just handed over its uffd, over validated regions (their file
    /// ranges disjoint and inside the snapshot, so the page maps are bounded by the
    /// snapshot's size): it records, replays or graduates as the fork and its snapshot's
    /// working set say ([`start::choose`]). Allocation failures are errors.
    pub fn attached(
        fork: Arc<Fork>,
        snapshot: Arc<Snapshot>,
        uffd: Userfaultfd,
        pidfd: Option<OwnedFd>,
        mappings: Vec<GuestRegionUffdMapping>,
        options: ServeOptions,
    ) -> Result<Self, MemorySetupError> {
        let mut session = Self::recovered(fork, snapshot, uffd, pidfd, mappings, options)?;
        let small_pages_only = session.memory.regions().iter().all(|r| r.small_pages());
        let prefetch = session.fork.prefetch();
        let slot = &session.snapshot.working_set;
        match start::choose(prefetch, slot, options.record_forks, small_pages_only) {
            Start::Record(ticket) => session.start_recording(ticket, options.record_window),
            Start::Prefetch { set, graduate } => {
                if let Some(set) = set.as_ref().filter(|s| !s.head_resident()) {
                    // Cold: large sequential reads into the page cache, started now, off the
                    // workers.
                    set.read_ahead();
                }
                session.prefetcher = Prefetcher::new(set, graduate);
            }
        }
        Ok(session)
    }

    /// A session that serves faults only: a uffd taken back from a VMM that outlived the
    /// previous daemon (its guest has run; nothing is installed ahead of it).
    pub fn recovered(
        fork: Arc<Fork>,
        snapshot: Arc<Snapshot>,
        uffd: Userfaultfd,
        pidfd: Option<OwnedFd>,
        mappings: Vec<GuestRegionUffdMapping>,
        options: ServeOptions,
    ) -> Result<Self, MemorySetupError> {
        let source: Arc<dyn MemorySource> = snapshot.clone();
        let memory = ForkMemory::new(mappings, source, uffd)?;
        Ok(Self {
            snapshot,
            fork,
            memory,
            pidfd,
            connection: None,
            on_demand: OnDemand::new(options.fault_around_pages),
            error_log: RateLimiter::new(5, Duration::from_secs(10)),
            latencies: Vec::with_capacity(64),
            prefetcher: Prefetcher::Done,
            recorder: None,
            finished_recording: None,
        })
    }

    /// Records the fork's first touches for its snapshot's working set during `window`.
    fn start_recording(&mut self, ticket: Ticket, window: Duration) {
        let pages = self.memory.source().size() / crate::memory::PAGE_4K;
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
        self.memory.installer()
    }

    /// The pidfd of the VMM, readable once it exits.
    pub fn pidfd(&self) -> Option<&OwnedFd> {
        self.pidfd.as_ref()
    }

    /// Whether faults wait for a retry.
    pub fn has_deferred(&self) -> bool {
        self.on_demand.has_deferred()
    }

    /// Whether prefetch has work, and which phase.
    pub fn prefetch_phase(&self) -> Phase {
        self.prefetcher.phase()
    }

    /// Installs up to one step of pages ahead of the guest. A fork that graduated has its
    /// queued events read and dropped, so no thread waits for pagerd to read them.
    pub fn prefetch_step(&mut self) -> Step {
        let cx = PrefetchContext {
            fork: self.fork.id(),
            snapshot: self.fork.snapshot(),
            stats: &self.fork.stats,
            working_set: &self.snapshot.working_set,
        };
        let step = self.prefetcher.step(&mut self.memory, &cx);
        if step == Step::Ended(EndReason::Graduated) {
            let mut buf = vec![super::uffd::empty_msg(); 64];
            self.discard_events(&mut buf);
        }
        step
    }

    /// Reads and drops every event still queued (after the regions were unregistered: a
    /// `REMOVE` whose thread waits for it to be read must not wait forever).
    fn discard_events(&self, buf: &mut [UffdMsg]) {
        for _ in 0..BATCHES_PER_TURN * 8 {
            match self.uffd().read_events(buf) {
                Ok(n) if n > 0 => {
                    for msg in &buf[..n] {
                        drop(event_fd(msg));
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads and handles pending events, at most [`BATCHES_PER_TURN`] batches. Never blocks,
    /// whatever the VMM does to the uffd.
    pub fn drain(&mut self, buf: &mut [UffdMsg]) -> Drain {
        for batch in 0..BATCHES_PER_TURN {
            let n = match self.uffd().read_events(buf) {
                Ok(0) => return Drain::Ended(EndReason::UffdGone),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Readiness with nothing to read: someone else read the events (the VMM
                    // may read its own uffd), or a race. Check nobody cleared O_NONBLOCK;
                    // the kernel's error event says so too, this catches it between polls.
                    if batch == 0 && self.uffd().nonblock_cleared() {
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

    fn fault_context(
        &mut self,
    ) -> (
        FaultContext<'_>,
        &mut ForkMemory<Userfaultfd>,
        &mut OnDemand,
    ) {
        (
            FaultContext {
                fork: self.fork.id(),
                stats: &self.fork.stats,
                recorder: self.recorder.as_mut(),
            },
            &mut self.memory,
            &mut self.on_demand,
        )
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
                let (mut cx, memory, on_demand) = self.fault_context();
                let outcome = on_demand.fault(memory, VmmAddr(addr), &mut cx);
                if outcome == Fault::Resolved {
                    let ns = batch_start.elapsed().as_nanos();
                    self.latencies.push(u64::try_from(ns).unwrap_or(u64::MAX));
                }
                outcome
            }
            EVENT_REMOVE => {
                // SAFETY: the kernel filled the `remove` member for this event type.
                let (start, end) = unsafe { (msg.arg.remove.start, msg.arg.remove.end) };
                bump(&self.fork.stats.removes, 1);
                self.memory.remove(VmmAddr(start), VmmAddr(end));
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
        let (mut cx, memory, on_demand) = self.fault_context();
        on_demand.retry_deferred(memory, &mut cx)
    }

    /// Hands the recording on once its window has passed.
    fn check_recording_window(&mut self, now: Instant) {
        if self.recorder.as_ref().is_some_and(|r| r.expired(now)) {
            self.finished_recording = self.recorder.take().map(Recorder::finish);
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
