//! How many connections of one kind are served at once, and for whom: control connections
//! ([`crate::control`]) and handoff connections waiting for their message
//! ([`crate::serve::acceptor`]).
//!
//! ```text
//!   0 ──────────────────────────── total − reserved ──────────── total
//!   │ anyone allowed to connect, at most per_uid each │ root and the daemon's own user only │
//! ```
//!
//! Root and the daemon's own user (the operators) may use every connection, the last
//! `reserved` included, and are not counted against a per-uid limit. Every other uid (a
//! `--group` member) may hold at most `per_uid` connections, and only while fewer than
//! `total − reserved` are open in all. So a member that opens connections and sends nothing
//! runs into its own limit long before it could keep an operator out, and even many members
//! together leave the reserve free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Every connection this peer may use is taken.
    #[error("too many {what} ({open} open); try again later")]
    Busy {
        /// What is counted.
        what: Counted,
        /// Connections open.
        open: usize,
    },
    /// The peer's uid holds its limit already.
    #[error("uid {uid} already holds {limit} {what}{}; close one first", what.limit_flag())]
    PerUid {
        /// What is counted.
        what: Counted,
        /// The peer's uid.
        uid: u32,
        /// Its limit.
        limit: usize,
    },
}

/// What an [`Admission`] counts, as its refusals name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Connections to the control socket.
    ControlConnections,
    /// Connections to handoff sockets that have not sent their whole message yet.
    PendingHandoffs,
}

impl Counted {
    /// The option that sets the per-uid limit, as a refusal names it.
    fn limit_flag(self) -> &'static str {
        match self {
            Self::ControlConnections => " (--max-connections-per-uid)",
            Self::PendingHandoffs => "",
        }
    }
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ControlConnections => "control connections",
            Self::PendingHandoffs => "handoff connections that sent no handoff yet",
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Open connections of uids under the per-uid limit (not root's, not the owner's).
    by_uid: HashMap<u32, usize>,
}

/// Counts open connections and admits new ones (see the module docs).
#[derive(Debug)]
pub struct Admission {
    what: Counted,
    total: usize,
    reserved: usize,
    per_uid: usize,
    owner: u32,
    counts: Mutex<Counts>,
}

/// One admitted connection; dropping it gives the connection back.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    /// The uid counted against its limit, if any.
    limited_uid: Option<u32>,
}

impl Admission {
    /// `total` connections of kind `what` at most, the last `reserved` of them for root and
    /// `owner`, and `per_uid` for each other uid.
    pub fn new(
        what: Counted,
        total: usize,
        reserved: usize,
        per_uid: usize,
        owner: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            total,
            reserved: reserved.min(total),
            per_uid,
            owner,
            counts: Mutex::default(),
        })
    }

    /// Whether `uid` is an operator: root or the daemon's own user.
    pub fn is_operator(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner
    }

    /// Admits a connection from `uid`, or says why not.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Permit, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let operator = self.is_operator(uid);
        let room = if operator {
            self.total
        } else {
            self.total - self.reserved
        };
        if counts.total >= room {
            return Err(Refusal::Busy {
                what: self.what,
                open: counts.total,
            });
        }
        if !operator {
            let held = counts.by_uid.entry(uid).or_insert(0);
            if *held >= self.per_uid {
                return Err(Refusal::PerUid {
                    what: self.what,
                    uid,
                    limit: self.per_uid,
                });
            }
            *held += 1;
        }
        counts.total += 1;
        Ok(Permit {
            admission: self.clone(),
            limited_uid: (!operator).then_some(uid),
        })
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total -= 1;
        if let Some(uid) = self.limited_uid {
            if let Some(held) = counts.by_uid.get_mut(&uid) {
                *held -= 1;
                if *held == 0 {
                    counts.by_uid.remove(&uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: u32 = 1000;
    const WHAT: Counted = Counted::ControlConnections;

    #[test]
    fn a_uid_stops_at_its_limit_and_others_still_get_in() {
        let admission = Admission::new(WHAT, 16, 4, 3, OWNER);
        let member: Vec<Permit> = (0..3).map(|_| admission.admit(65534).unwrap()).collect();
        assert_eq!(
            admission.admit(65534).unwrap_err(),
            Refusal::PerUid {
                what: WHAT,
                uid: 65534,
                limit: 3
            }
        );
        let other = admission.admit(65533).unwrap();
        let root = admission.admit(0).unwrap();
        drop(member);
        assert_eq!(admission.open(), 2);
        admission.admit(65534).unwrap();
        drop((other, root));
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn the_reserve_is_for_root_and_the_owner_only() {
        let admission = Admission::new(WHAT, 8, 3, 100, OWNER);
        let members: Vec<Permit> = (0..5)
            .map(|i| admission.admit(60000 + i).unwrap())
            .collect();
        assert_eq!(
            admission.admit(60009).unwrap_err(),
            Refusal::Busy {
                what: WHAT,
                open: 5
            }
        );
        let operators: Vec<Permit> = [0, OWNER, 0]
            .iter()
            .map(|&uid| admission.admit(uid).unwrap())
            .collect();
        assert_eq!(
            admission.admit(0).unwrap_err(),
            Refusal::Busy {
                what: WHAT,
                open: 8
            }
        );
        drop(operators);
        drop(members);
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn operators_are_not_counted_per_uid() {
        let admission = Admission::new(WHAT, 64, 4, 2, OWNER);
        let held: Vec<Permit> = (0..10).map(|_| admission.admit(0).unwrap()).collect();
        let owner: Vec<Permit> = (0..10).map(|_| admission.admit(OWNER).unwrap()).collect();
        assert_eq!(admission.open(), 20);
        drop((held, owner));
    }
}
