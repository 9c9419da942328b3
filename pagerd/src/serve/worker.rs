//! A worker: one thread with one `mio` poll serving many forks' uffds.
//!
//! ```text
//!   Poll ─┬─ WAKER            commands: attach a session, close a fork, shut down
//!         ├─ 2k   (uffd)      drain events in batches → Session::drain
//!         │                   (an error event: O_NONBLOCK was cleared → end, uffd_tampered)
//!         └─ 2k+1 (exit)      the VMM's pidfd became readable: it exited → end session k
//! ```
//!
//! Nothing here waits on a descriptor the VMM controls: uffd reads use `RWF_NOWAIT` (see
//! [`crate::serve::uffd`]), so a worker cannot be stalled by one VMM, whatever it does to its
//! uffd, and every other fork on the worker keeps being served.
//!
//! A fork's faults stay on its worker, so its state needs no lock. A session whose batch
//! budget ran out is drained again on the next turn (zero-timeout poll) so one busy fork
//! cannot starve the others; while any session has deferred faults the poll wakes every
//! [`DEFERRED_RETRY`] to retry them even if no new event arrives. For a short while after a
//! fault (`--spin-us`) the worker polls without sleeping, because waking a sleeping thread is
//! the dearest part of a fault round trip on virtualized hosts — but only while the faulting
//! VMMs leave it a core ([`crate::serve::spin`]). With no fault left to serve, the worker
//! installs pages ahead of the guests ([`crate::serve::prefetch`]), one step at a time.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use proto::model::EndReason;
use proto::ForkId;

use crate::registry::{Registry, Transition};
use crate::serve::prefetch::{Phase, Step};
use crate::serve::prefetch_queue::PrefetchQueue;
use crate::serve::priority::{Level, WorkerPriority};
use crate::serve::session::{Drain, Session};
use crate::serve::spin::{ActiveSessions, SpinBudget, ACTIVE_WINDOW};
use crate::serve::uffd::{empty_msg, UffdMsg};
use crate::serve::{ForkEvent, ForkEvents};

/// How often deferred faults are retried when no event arrives.
pub const DEFERRED_RETRY: Duration = Duration::from_micros(200);
/// Events read per `read` of a uffd.
const EVENTS_PER_READ: usize = 64;
const WAKER: Token = Token(usize::MAX);

/// What a worker can be asked to do.
#[derive(Debug)]
pub enum Command {
    /// Serve a new session.
    Attach(Box<Session>),
    /// Stop serving a fork; `done` is signalled once its descriptors are closed.
    Close {
        /// The fork.
        fork: ForkId,
        /// Signalled when done.
        done: Sender<()>,
    },
    /// End every session and exit.
    Shutdown,
}

/// The handle the rest of the daemon keeps for one worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    sessions: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerHandle {
    /// Starts worker number `index`.
    pub fn spawn(
        index: usize,
        registry: Arc<Registry>,
        events: ForkEvents,
        spin: Duration,
        spin_budget: Arc<SpinBudget>,
        replay_nice: i32,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let sessions = Arc::new(AtomicUsize::new(0));
        let mut worker = Worker {
            poll,
            sessions: Slab::new(),
            rx,
            registry,
            events,
            load: sessions.clone(),
            spin,
            deferred: Vec::new(),
            prefetching: PrefetchQueue::default(),
            index,
            active: ActiveSessions::default(),
            spin_budget,
            priority: WorkerPriority::new(replay_nice),
        };
        let thread = std::thread::Builder::new()
            .name(format!("pagerd-worker-{index}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            tx,
            waker,
            sessions,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a command. Returns it if the worker has exited. An attached session counts
    /// towards the worker's load from this moment, so back-to-back attaches spread evenly.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        let attach = matches!(command, Command::Attach(_));
        self.tx.send(command).map_err(|e| e.0)?;
        if attach {
            self.sessions.fetch_add(1, Relaxed);
        }
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake worker");
        }
        Ok(())
    }

    /// Sessions the worker serves now.
    pub fn load(&self) -> usize {
        self.sessions.load(Relaxed)
    }

    /// Asks the worker to end its sessions and waits for its thread.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

struct Worker {
    poll: Poll,
    sessions: Slab<Session>,
    rx: Receiver<Command>,
    registry: Arc<Registry>,
    events: ForkEvents,
    load: Arc<AtomicUsize>,
    /// After a fault, keep polling without sleeping for this long: the same VMM's next fault
    /// usually follows within microseconds, and a sleeping worker costs a wakeup.
    spin: Duration,
    /// Keys of the sessions with faults waiting for a retry, so a wakeup need not scan all.
    deferred: Vec<usize>,
    /// Sessions with pages to install ahead of their guests, in turn order.
    prefetching: PrefetchQueue,
    /// This worker's index.
    index: usize,
    /// Its sessions that faulted recently, and what every worker shares about them.
    active: ActiveSessions,
    spin_budget: Arc<SpinBudget>,
    priority: WorkerPriority,
}

/// Session `key`'s prefetch phase (`Done` once it is gone).
fn phase_of(sessions: &Slab<Session>, key: usize) -> Phase {
    sessions
        .get(key)
        .map_or(Phase::Done, Session::prefetch_phase)
}

fn uffd_token(key: usize) -> Token {
    Token(key * 2)
}

fn exit_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut buf: Vec<UffdMsg> = vec![empty_msg(); EVENTS_PER_READ];
        // Both kept across turns, so a busy loop does not allocate.
        let mut busy: Vec<usize> = Vec::new();
        let mut to_drain: Vec<usize> = Vec::new();
        let mut last_fault: Option<Instant> = None;
        loop {
            let spinning = last_fault.is_some_and(|t: Instant| t.elapsed() < self.spin)
                && self.spin_budget.may_spin();
            let prefetch = self.prefetch_wait();
            let timeout = if !busy.is_empty() || spinning || prefetch == Some(Duration::ZERO) {
                Some(Duration::ZERO)
            } else if !self.deferred.is_empty() {
                Some(prefetch.map_or(DEFERRED_RETRY, |p| p.min(DEFERRED_RETRY)))
            } else {
                prefetch
            };
            // While it counts sessions as active, wake in time to stop counting them.
            let timeout = match (timeout, self.active.is_empty()) {
                (None, false) => Some(ACTIVE_WINDOW),
                (t, _) => t,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "worker poll failed; ending its sessions");
                self.end_all(EndReason::Shutdown);
                return;
            }
            // One clock read per wakeup serves every event of it.
            let woke = Instant::now();
            to_drain.clear();
            to_drain.append(&mut busy);
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        if !self.commands() {
                            return;
                        }
                    }
                    Token(t) if t % 2 == 0 && event.is_error() => self.tampered(t / 2),
                    Token(t) if t % 2 == 0 => {
                        to_drain.push(t / 2);
                        last_fault = Some(woke);
                        self.active.faulted(t / 2, woke);
                    }
                    Token(t) => self.end(t / 2, EndReason::VmmExited),
                }
            }
            for &key in &to_drain {
                let Some(session) = self.sessions.get_mut(key) else {
                    continue;
                };
                match session.drain(&mut buf) {
                    Drain::Idle => {}
                    Drain::More => busy.push(key),
                    Drain::Ended(reason) => {
                        self.end(key, reason);
                        continue;
                    }
                }
                self.hand_on_recording(key, false);
                self.note_deferred(key);
            }
            self.retry_deferred();
            let active = self.active.count(woke);
            self.spin_budget.publish(self.index, active);
            self.priority.set(self.priority_level(active));
            // Faults first: prefetch only runs when no session has events left over.
            if busy.is_empty() {
                self.prefetch_turn();
            }
        }
    }

    /// What this worker does now, for its priority: replaying if any session replays; only
    /// graduating if that is all there is and no session faulted recently.
    fn priority_level(&self, active: usize) -> Level {
        if self
            .prefetching
            .any_in(Phase::Replay, |key| phase_of(&self.sessions, key))
        {
            Level::Replay
        } else if active == 0 && !self.prefetching.is_empty() {
            Level::Background
        } else {
            Level::Normal
        }
    }

    /// How long until some prefetch may go on: zero if one may now, `None` if none waits.
    fn prefetch_wait(&self) -> Option<Duration> {
        self.prefetching.wait(Instant::now())
    }

    /// One prefetch step of the session whose turn it is ([`PrefetchQueue::next`]); it then
    /// goes to the back of the line.
    fn prefetch_turn(&mut self) {
        let now = Instant::now();
        let sessions = &self.sessions;
        let Some(key) = self.prefetching.next(now, |key| phase_of(sessions, key)) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        match session.prefetch_step() {
            Step::More => self.prefetching.push(key, None),
            Step::Waiting => self.prefetching.push(key, Some(now + DEFERRED_RETRY)),
            Step::Done => {}
            Step::Ended(reason) => self.end(key, reason),
        }
    }

    /// Hands a finished recording of session `key` to the lifecycle (at the end of its
    /// window, or with `ending`, whatever it recorded).
    fn hand_on_recording(&mut self, key: usize, ending: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if let Some((ticket, trace)) = session.take_recording(ending) {
            let _ = self.events.send(ForkEvent::Recorded {
                snapshot: session.snapshot().clone(),
                ticket,
                trace,
            });
        }
    }

    /// Remembers session `key` if it has faults waiting for a retry.
    fn note_deferred(&mut self, key: usize) {
        let waiting = self.sessions.get(key).is_some_and(Session::has_deferred);
        if waiting && !self.deferred.contains(&key) {
            self.deferred.push(key);
        }
    }

    /// Retries the deferred faults of the sessions that have some (usually none).
    fn retry_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.deferred) {
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if let Err(reason) = session.retry_deferred() {
                self.end(key, reason);
            } else if session.has_deferred() {
                self.deferred.push(key);
            }
        }
    }

    /// The kernel's poll reported an error on session `key`'s uffd: for a uffd whose API was
    /// negotiated (checked at handoff) that means `O_NONBLOCK` was cleared on the shared open
    /// file description. Reads would still never block, but readiness is meaningless from now
    /// on, so the session ends.
    fn tampered(&mut self, key: usize) {
        let Some(session) = self.sessions.get(key) else {
            return;
        };
        let nonblock_cleared = session.uffd().nonblock_cleared();
        tracing::warn!(fork = %session.fork().id(), nonblock_cleared,
            "the uffd reports an error (the VMM cleared O_NONBLOCK on it); ending the session");
        self.end(key, EndReason::UffdTampered);
    }

    /// Handles queued commands; `false` means shut down.
    fn commands(&mut self) -> bool {
        while let Ok(command) = self.rx.try_recv() {
            match command {
                Command::Attach(session) => self.attach(*session),
                Command::Close { fork, done } => {
                    let key = self
                        .sessions
                        .iter()
                        .find(|(_, s)| s.fork().id() == &fork)
                        .map(|(k, _)| k);
                    if let Some(key) = key {
                        self.end(key, EndReason::Closed);
                    }
                    let _ = done.send(());
                }
                Command::Shutdown => {
                    self.end_all(EndReason::Shutdown);
                    return false;
                }
            }
        }
        true
    }

    fn attach(&mut self, session: Session) {
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let registry = self.poll.registry();
        let uffd_fd = session.uffd().as_fd().as_raw_fd();
        let mut result =
            registry.register(&mut SourceFd(&uffd_fd), uffd_token(key), Interest::READABLE);
        if let (Ok(()), Some(pidfd)) = (&result, session.pidfd()) {
            result = registry.register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                exit_token(key),
                Interest::READABLE,
            );
        }
        let fork = session.fork().clone();
        entry.insert(session);
        if let Err(e) = result {
            tracing::error!(fork = %fork.id(), error = %e, "cannot watch the uffd; ending the session");
            self.end(key, EndReason::ReadFailed);
            return;
        }
        tracing::info!(fork = %fork.id(), "serving");
        if self
            .sessions
            .get(key)
            .is_some_and(|s| s.prefetch_phase() != Phase::Done)
        {
            self.prefetching.push(key, None);
        }
        // Faults may have queued before the uffd was registered with this poll: edge-triggered
        // readiness would never report them, so drain once now.
        let mut buf = vec![empty_msg(); EVENTS_PER_READ];
        if let Some(session) = self.sessions.get_mut(key) {
            if let Drain::Ended(reason) = session.drain(&mut buf) {
                self.end(key, reason);
            }
        }
        self.note_deferred(key);
    }

    fn end(&mut self, key: usize, reason: EndReason) {
        self.active.forget(key);
        self.hand_on_recording(key, true);
        self.prefetching.remove(key);
        let Some(session) = self.sessions.try_remove(key) else {
            return;
        };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&session.uffd().as_fd().as_raw_fd()));
        if let Some(pidfd) = session.pidfd() {
            let _ = registry.deregister(&mut SourceFd(&pidfd.as_raw_fd()));
        }
        let fork = session.fork().clone();
        drop(session);
        self.load.fetch_sub(1, Relaxed);
        let stats = fork.stats.report();
        crate::stats::DAEMON.ended(reason);
        tracing::info!(fork = %fork.id(), reason = reason.as_str(), faults = stats.faults,
            pages_copied = stats.pages_copied, zero_pages = stats.zero_pages, "session ended");
        if let Err(e) = self.registry.transition(&fork, Transition::End(reason)) {
            tracing::error!(fork = %fork.id(), error = %e, "a session ended on a fork not served");
        }
        let _ = self.events.send(ForkEvent::Ended(fork));
    }

    fn end_all(&mut self, reason: EndReason) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.end(key, reason);
        }
    }
}
