//! A worker's CPU priority follows what it is doing.
//!
//! ```text
//!   replaying a working set   --replay-nice (default -19): installing a set is the cheapest
//!                             way to give forks their pages, but only if it gets ahead of
//!                             them; on an oversubscribed host a worker at the VMMs' priority
//!                             got a fair share and lost the race (most pages still faulted)
//!   serving faults            nice 0, like the VMMs
//!   only graduating           nice 19: background work, after every other thread on the host
//! ```
//!
//! `setpriority(PRIO_PROCESS, tid)` sets one thread's nice value on Linux. A level changes only
//! when the worker's work changes, so the cost is one syscall per change, not per fault.
//! Without the right to raise priority (no `CAP_SYS_NICE`), the worker says so once and stays
//! where it is.

/// What a worker is doing, for its priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Some session replays its working set.
    Replay,
    /// Serving faults (no replay pending).
    Normal,
    /// Nothing but graduation, and no fault for a while.
    Background,
}

/// The nice value of graduation-only work.
const BACKGROUND_NICE: i32 = 19;

/// A worker thread's priority.
#[derive(Debug)]
pub struct WorkerPriority {
    replay_nice: i32,
    current: Level,
    /// Set once raising the priority was refused.
    refused: bool,
}

impl WorkerPriority {
    /// A worker at `Normal`, replaying at `replay_nice`.
    pub fn new(replay_nice: i32) -> Self {
        Self {
            replay_nice,
            current: Level::Normal,
            refused: false,
        }
    }

    fn nice_of(&self, level: Level) -> i32 {
        match level {
            Level::Replay if self.refused => 0,
            Level::Replay => self.replay_nice,
            Level::Normal => 0,
            Level::Background => BACKGROUND_NICE,
        }
    }

    /// Moves the calling thread to `level`'s nice value, if it is not there already.
    pub fn set(&mut self, level: Level) {
        if level == self.current {
            return;
        }
        let nice = self.nice_of(level);
        if nice == self.nice_of(self.current) {
            self.current = level;
            return;
        }
        let tid = nix::unistd::gettid().as_raw();
        // SAFETY: setpriority reads only its arguments; for PRIO_PROCESS a thread id names
        // that one thread on Linux, here the calling worker itself.
        let rc = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::id_t::try_from(tid).unwrap_or(0),
                nice,
            )
        };
        if rc != 0 && !self.refused {
            self.refused = true;
            tracing::warn!(nice, error = %std::io::Error::last_os_error(),
                "cannot change a worker's priority (CAP_SYS_NICE?); replay runs at normal priority");
        }
        self.current = level;
    }
}
