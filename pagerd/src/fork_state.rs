//! A fork's state machine: each state carries exactly its data, and [`ForkPhase::apply`] is
//! the one place that moves a fork from one state to the next, refusing moves that cannot
//! happen.
//!
//! ```text
//!   Waiting ──attach──▶ Serving ──end──▶ Ended
//!                          ▲
//!   Recovering ──attach────┘            (a VMM that outlived the daemon, its uffd taken back)
//!        └──────detach──▶ Detached ──end──▶ Ended
//! ```
//!
//! What happens beside the state (the last refused handoff, a record that could not be
//! written, how often the uffd was taken back) is kept in [`ForkStatus`] next to the phase.

use proto::model::{DetachedReason, EndReason, ForkState, HandoffErrorInfo};

/// What serving a fork needs to show: which worker, which VMM, which uffd features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// The worker serving it.
    pub worker: usize,
    /// The VMM's pid, from `SO_PEERCRED` (none if the kernel did not say).
    pub vmm_pid: Option<i32>,
    /// The uffd features the VMM negotiated, read from the fd's `fdinfo`.
    pub uffd_features: u64,
}

/// Where a fork is, with exactly the data of that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkPhase {
    /// Its handoff socket listens; no VMM yet.
    Waiting,
    /// Found at start with a VMM that outlived the previous daemon; its uffd is being taken
    /// back (shown as `detached` until that is done).
    Recovering {
        /// The live VMM.
        vmm_pid: i32,
    },
    /// A worker serves its uffd.
    Serving(Serving),
    /// Its VMM outlived a daemon restart and its uffd could not be taken back.
    Detached {
        /// The live VMM.
        vmm_pid: i32,
        /// Why the uffd could not be taken back.
        reason: DetachedReason,
    },
    /// Serving is over.
    Ended {
        /// Why.
        reason: EndReason,
        /// How it was served, if it was.
        served: Option<Serving>,
        /// The VMM, if one was known.
        vmm_pid: Option<i32>,
    },
}

/// A move from one phase to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A worker serves the fork now (a handoff was accepted, or a uffd was taken back).
    Attach(Serving),
    /// The uffd of a recovering fork could not be taken back.
    Detach(DetachedReason),
    /// Serving stopped.
    End(EndReason),
}

/// A transition that the fork's phase does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a fork that is {from:?} cannot {transition:?}")]
pub struct ImpossibleTransition {
    /// The phase it was in (unchanged).
    pub from: ForkPhase,
    /// What was asked.
    pub transition: Transition,
}

impl ForkPhase {
    /// The phase after `transition`, or why it cannot happen.
    pub fn apply(self, transition: Transition) -> Result<ForkPhase, ImpossibleTransition> {
        let next = match (self, transition) {
            (Self::Waiting | Self::Recovering { .. }, Transition::Attach(serving)) => {
                Self::Serving(serving)
            }
            (Self::Recovering { vmm_pid }, Transition::Detach(reason)) => {
                Self::Detached { vmm_pid, reason }
            }
            (Self::Serving(serving), Transition::End(reason)) => Self::Ended {
                reason,
                served: Some(serving),
                vmm_pid: serving.vmm_pid,
            },
            (Self::Detached { vmm_pid, .. }, Transition::End(reason)) => Self::Ended {
                reason,
                served: None,
                vmm_pid: Some(vmm_pid),
            },
            (from, transition) => return Err(ImpossibleTransition { from, transition }),
        };
        Ok(next)
    }

    /// The state on the wire.
    pub fn state(&self) -> ForkState {
        match self {
            Self::Waiting => ForkState::Waiting,
            Self::Recovering { .. } | Self::Detached { .. } => ForkState::Detached,
            Self::Serving(_) => ForkState::Serving,
            Self::Ended { .. } => ForkState::Ended,
        }
    }

    /// The VMM, once one is known.
    pub fn vmm_pid(&self) -> Option<i32> {
        match *self {
            Self::Waiting => None,
            Self::Recovering { vmm_pid } | Self::Detached { vmm_pid, .. } => Some(vmm_pid),
            Self::Serving(s) => s.vmm_pid,
            Self::Ended { vmm_pid, .. } => vmm_pid,
        }
    }

    /// How the fork is or was served.
    pub fn served(&self) -> Option<Serving> {
        match *self {
            Self::Serving(s) => Some(s),
            Self::Ended { served, .. } => served,
            _ => None,
        }
    }

    /// The worker serving it now.
    pub fn worker(&self) -> Option<usize> {
        match self {
            Self::Serving(s) => Some(s.worker),
            _ => None,
        }
    }

    /// Why serving ended.
    pub fn end_reason(&self) -> Option<EndReason> {
        match self {
            Self::Ended { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Why a detached fork's uffd could not be taken back.
    pub fn detached_reason(&self) -> Option<DetachedReason> {
        match self {
            Self::Detached { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// What a fork is doing, guarded by the fork's lock.
#[derive(Debug, Clone)]
pub struct ForkStatus {
    /// Its phase.
    pub phase: ForkPhase,
    /// The last handoff refused on this fork's socket.
    pub last_handoff_error: Option<HandoffErrorInfo>,
    /// Times this daemon took the fork's uffd back from its live VMM (0 or 1).
    pub recovered: u32,
    /// Why the attached VMM could not be recorded (the fork is served, but a restart cannot
    /// take its uffd back).
    pub record_error: Option<String>,
}

impl ForkStatus {
    /// A fork starting out in `phase`.
    pub fn new(phase: ForkPhase) -> Self {
        Self {
            phase,
            last_handoff_error: None,
            recovered: 0,
            record_error: None,
        }
    }

    /// Moves the fork on; a recovering fork that attaches counts as recovered.
    pub fn apply(&mut self, transition: Transition) -> Result<(), ImpossibleTransition> {
        let recovering = matches!(self.phase, ForkPhase::Recovering { .. });
        self.phase = self.phase.apply(transition)?;
        if recovering && matches!(transition, Transition::Attach(_)) {
            self.recovered += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVING: Serving = Serving {
        worker: 1,
        vmm_pid: Some(42),
        uffd_features: 0x20,
    };

    #[test]
    fn a_fork_waits_is_served_and_ends_keeping_how_it_was_served() {
        let mut status = ForkStatus::new(ForkPhase::Waiting);
        assert_eq!(status.phase.state(), ForkState::Waiting);
        assert_eq!(status.phase.vmm_pid(), None);
        status.apply(Transition::Attach(SERVING)).unwrap();
        assert_eq!(status.phase.state(), ForkState::Serving);
        assert_eq!(status.phase.worker(), Some(1));
        assert_eq!(status.recovered, 0, "attached, not recovered");
        status.apply(Transition::End(EndReason::VmmExited)).unwrap();
        assert_eq!(status.phase.state(), ForkState::Ended);
        assert_eq!(status.phase.end_reason(), Some(EndReason::VmmExited));
        assert_eq!(status.phase.served(), Some(SERVING));
        assert_eq!(status.phase.vmm_pid(), Some(42));
        assert_eq!(status.phase.worker(), None, "nobody serves it any more");
    }

    #[test]
    fn a_recovered_fork_counts_and_a_failed_recovery_has_one_reason() {
        let mut status = ForkStatus::new(ForkPhase::Recovering { vmm_pid: 7 });
        assert_eq!(status.phase.state(), ForkState::Detached);
        assert_eq!(status.phase.vmm_pid(), Some(7));
        status.apply(Transition::Attach(SERVING)).unwrap();
        assert_eq!(status.recovered, 1);

        let mut status = ForkStatus::new(ForkPhase::Recovering { vmm_pid: 7 });
        status
            .apply(Transition::Detach(DetachedReason::NotPermitted))
            .unwrap();
        assert_eq!(status.phase.state(), ForkState::Detached);
        assert_eq!(
            status.phase.detached_reason(),
            Some(DetachedReason::NotPermitted)
        );
        assert_eq!(status.phase.end_reason(), None, "detached is not ended");
        assert_eq!(status.recovered, 0);
        status.apply(Transition::End(EndReason::Closed)).unwrap();
        assert_eq!(status.phase.vmm_pid(), Some(7));
        assert_eq!(status.phase.detached_reason(), None);
    }

    #[test]
    fn impossible_moves_are_refused_and_change_nothing() {
        let ended = ForkPhase::Ended {
            reason: EndReason::Closed,
            served: None,
            vmm_pid: None,
        };
        let detached = ForkPhase::Detached {
            vmm_pid: 3,
            reason: DetachedReason::UffdNotFound,
        };
        let refused = [
            (ForkPhase::Waiting, Transition::End(EndReason::VmmExited)),
            (
                ForkPhase::Waiting,
                Transition::Detach(DetachedReason::SetupFailed),
            ),
            (ForkPhase::Serving(SERVING), Transition::Attach(SERVING)),
            (
                ForkPhase::Serving(SERVING),
                Transition::Detach(DetachedReason::SetupFailed),
            ),
            (ended, Transition::Attach(SERVING)),
            (ended, Transition::End(EndReason::Closed)),
            (detached, Transition::Attach(SERVING)),
            (detached, Transition::Detach(DetachedReason::SetupFailed)),
        ];
        for (from, transition) in refused {
            let mut status = ForkStatus::new(from);
            let err = status.apply(transition).unwrap_err();
            assert_eq!(err, ImpossibleTransition { from, transition });
            assert_eq!(status.phase, from, "{transition:?} left {from:?} as it was");
        }
    }
}
