//! Who owns what, and how many forks each user may hold.
//!
//! Every snapshot, fork and VM records the uid that created it (records written before owners
//! were kept belong to root). Root and pagerd's own user, the *operators*, may change
//! anything; any other user (a `--group` member) may change only its own objects, and holds at
//! most `--max-forks-per-uid` forks, never the last [`RESERVED_FORKS`] of `--max-forks`, which
//! are kept for the operators. Reading (`get`, `list`, `wait`) stays open to every member.
//! Pure decisions: the dispatcher and the lifecycle ask, and say no with the reason.

/// The forks of `--max-forks` that only the operators may create (fewer when the maximum is
/// small: at most half of it).
pub(crate) const RESERVED_FORKS: usize = 16;

/// The owner of objects recorded before owners were kept, and of `--snapshot` registrations.
pub(crate) const ROOT: u32 = 0;

/// Whether `uid` is root or pagerd's own user.
pub(crate) fn is_operator(uid: u32) -> bool {
    uid == ROOT || uid == nix::unistd::geteuid().as_raw()
}

/// Whether `caller` (`None`: unknown, which is nobody) may change an object `owner` created.
pub(crate) fn may_change(caller: Option<u32>, owner: u32) -> bool {
    caller.is_some_and(|uid| is_operator(uid) || uid == owner)
}

/// Why a fork was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ForkQuotaError {
    /// Every fork slot is taken.
    #[error("{max} forks exist (--max-forks); close some first")]
    Full {
        /// `--max-forks`.
        max: usize,
    },
    /// The uid holds as many forks as one user may.
    #[error("uid {uid} already holds {max} forks (--max-forks-per-uid); close one first")]
    PerUid {
        /// The caller.
        uid: u32,
        /// `--max-forks-per-uid`.
        max: usize,
    },
    /// Only the slots kept for root and pagerd's user are left.
    #[error("only the {reserved} forks kept for root are left of {max} (--max-forks)")]
    Reserved {
        /// How many are kept.
        reserved: usize,
        /// `--max-forks`.
        max: usize,
    },
}

/// How many forks may exist, in all and per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForkQuota {
    /// `--max-forks`.
    pub max: usize,
    /// `--max-forks-per-uid` (operators are not limited by it).
    pub per_uid: usize,
}

impl ForkQuota {
    /// The slots only operators may take.
    fn reserved(&self) -> usize {
        RESERVED_FORKS.min(self.max / 2)
    }

    /// Whether `uid` may create one more fork while `existing` forks exist, `of_uid` of them
    /// its own.
    pub fn admit(&self, uid: u32, existing: usize, of_uid: usize) -> Result<(), ForkQuotaError> {
        if existing >= self.max {
            return Err(ForkQuotaError::Full { max: self.max });
        }
        if is_operator(uid) {
            return Ok(());
        }
        if of_uid >= self.per_uid {
            return Err(ForkQuotaError::PerUid {
                uid,
                max: self.per_uid,
            });
        }
        if existing >= self.max - self.reserved() {
            return Err(ForkQuotaError::Reserved {
                reserved: self.reserved(),
                max: self.max,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uid that is neither root nor the test's own.
    fn member() -> u32 {
        if nix::unistd::geteuid().as_raw() == 65534 {
            65533
        } else {
            65534
        }
    }

    #[test]
    fn members_change_only_their_own_objects_and_operators_everything() {
        let m = member();
        assert!(may_change(Some(m), m));
        assert!(!may_change(Some(m), ROOT));
        assert!(!may_change(Some(m), m + 1));
        assert!(may_change(Some(ROOT), m));
        assert!(may_change(Some(nix::unistd::geteuid().as_raw()), m));
        assert!(!may_change(None, m), "an unknown caller is nobody");
    }

    #[test]
    fn a_member_is_held_to_its_share_and_never_takes_the_reserve() {
        let quota = ForkQuota {
            max: 300,
            per_uid: 1000,
        };
        let m = member();
        assert_eq!(quota.admit(m, 283, 283), Ok(()));
        assert_eq!(
            quota.admit(m, 284, 284),
            Err(ForkQuotaError::Reserved {
                reserved: 16,
                max: 300
            })
        );
        assert_eq!(quota.admit(ROOT, 299, 0), Ok(()), "root gets the reserve");
        assert_eq!(
            quota.admit(ROOT, 300, 0),
            Err(ForkQuotaError::Full { max: 300 })
        );
        let quota = ForkQuota {
            max: 300,
            per_uid: 10,
        };
        assert_eq!(
            quota.admit(m, 10, 10),
            Err(ForkQuotaError::PerUid { uid: m, max: 10 })
        );
        assert_eq!(
            quota.admit(m, 50, 9),
            Ok(()),
            "other users' forks do not count"
        );
    }

    #[test]
    fn a_small_maximum_keeps_half_for_operators() {
        let quota = ForkQuota { max: 4, per_uid: 4 };
        assert_eq!(quota.admit(member(), 1, 1), Ok(()));
        assert!(matches!(
            quota.admit(member(), 2, 2),
            Err(ForkQuotaError::Reserved { reserved: 2, .. })
        ));
    }
}
