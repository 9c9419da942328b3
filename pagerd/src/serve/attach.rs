//! The checks a complete handoff passes before its session is built, and the refusal (error
//! code and reason) of each way it fails.
//!
//! ```text
//!   the fork waits for a VMM          else already_serving   (conflict)
//!   its snapshot is served            else snapshot_missing  (not_found)
//!   the regions fit the snapshot      else the region error  (invalid_argument; proto::handoff)
//!   the uffd's features are known     else setup_failed      (internal)
//!     and pagerd serves all of them   else unsupported_features (invalid_argument)
//!   setting up serving works          else setup_failed / no_worker
//! ```

use std::io;

use proto::control::ErrorCode;
use proto::handoff::HandoffError;
use proto::model::{ForkState, RefusalReason};
use proto::{ForkId, SnapshotId};

use super::memory::MemorySetupError;
use super::uffd;

/// Why an accepted, complete handoff could not be attached.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttachError {
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error("fork `{fork}` is {state}: it takes one VMM, once")]
    AlreadyServing { fork: ForkId, state: ForkState },
    #[error("snapshot `{0}` is not being served")]
    SnapshotGone(SnapshotId),
    #[error(
        "the uffd negotiated features {unsupported:#x} (of {features:#x}) that pagerd does not \
         serve; it serves {:#x}",
        uffd::SERVED_FEATURES
    )]
    UnsupportedFeatures { features: u64, unsupported: u64 },
    #[error("cannot read the uffd's features from /proc/self/fdinfo")]
    FeaturesUnknown,
    #[error("cannot set up serving")]
    Setup(#[source] io::Error),
    #[error("cannot set up serving")]
    SessionSetup(#[source] MemorySetupError),
    #[error("no worker is running")]
    NoWorker,
}

impl AttachError {
    /// The reason the VMM is given, and kept on the fork.
    pub(super) fn reason(&self) -> RefusalReason {
        match self {
            Self::Handoff(e) => e.reason(),
            Self::AlreadyServing { .. } => RefusalReason::AlreadyServing,
            Self::SnapshotGone(_) => RefusalReason::SnapshotMissing,
            Self::UnsupportedFeatures { .. } => RefusalReason::UnsupportedFeatures,
            Self::FeaturesUnknown | Self::Setup(_) | Self::SessionSetup(_) => {
                RefusalReason::SetupFailed
            }
            Self::NoWorker => RefusalReason::NoWorker,
        }
    }

    /// The error code of the refusal.
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            Self::Handoff(_) | Self::UnsupportedFeatures { .. } => ErrorCode::InvalidArgument,
            Self::AlreadyServing { .. } => ErrorCode::Conflict,
            Self::SnapshotGone(_) => ErrorCode::NotFound,
            Self::FeaturesUnknown | Self::Setup(_) | Self::SessionSetup(_) => ErrorCode::Internal,
            Self::NoWorker => ErrorCode::Unavailable,
        }
    }
}

/// A fork takes one VMM, while it waits for one.
pub(super) fn check_waiting(fork: &ForkId, state: ForkState) -> Result<(), AttachError> {
    match state {
        ForkState::Waiting => Ok(()),
        state => Err(AttachError::AlreadyServing {
            fork: fork.clone(),
            state,
        }),
    }
}

/// The uffd's negotiated features, if they could be read and pagerd serves every one.
pub(super) fn check_features(features: Option<u64>) -> Result<u64, AttachError> {
    let features = features.ok_or(AttachError::FeaturesUnknown)?;
    match uffd::unsupported_features(features) {
        0 => Ok(features),
        unsupported => Err(AttachError::UnsupportedFeatures {
            features,
            unsupported,
        }),
    }
}

#[cfg(test)]
mod tests {
    use proto::handoff::{validate, GuestRegionUffdMapping, PAGE_SIZE_4K};

    use super::*;

    fn refusal(e: &AttachError) -> (ErrorCode, RefusalReason) {
        (e.code(), e.reason())
    }

    #[test]
    fn only_a_waiting_fork_takes_a_vmm() {
        let fork: ForkId = "f".parse().unwrap();
        assert!(check_waiting(&fork, ForkState::Waiting).is_ok());
        for state in [ForkState::Serving, ForkState::Ended, ForkState::Detached] {
            let e = check_waiting(&fork, state).unwrap_err();
            assert_eq!(
                refusal(&e),
                (ErrorCode::Conflict, RefusalReason::AlreadyServing)
            );
            assert_eq!(
                e.to_string(),
                format!("fork `f` is {state}: it takes one VMM, once")
            );
        }
    }

    #[test]
    fn features_must_be_known_initialized_and_served() {
        let firecracker = uffd::FEATURE_INITIALIZED | uffd::FEATURE_EVENT_REMOVE;
        assert_eq!(check_features(Some(firecracker)).unwrap(), firecracker);
        let e = check_features(None).unwrap_err();
        assert_eq!(
            refusal(&e),
            (ErrorCode::Internal, RefusalReason::SetupFailed)
        );
        // UFFDIO_API never ran: nothing is initialized.
        let e = check_features(Some(0)).unwrap_err();
        assert!(matches!(
            e,
            AttachError::UnsupportedFeatures { unsupported, .. } if unsupported == uffd::FEATURE_INITIALIZED
        ));
        // A fork event per fork() of the VMM, which pagerd cannot follow.
        let fork_events = firecracker | userfaultfd_sys::UFFD_FEATURE_EVENT_FORK;
        let e = check_features(Some(fork_events)).unwrap_err();
        assert_eq!(
            refusal(&e),
            (
                ErrorCode::InvalidArgument,
                RefusalReason::UnsupportedFeatures
            )
        );
    }

    #[test]
    fn every_refusal_has_its_code_and_reason() {
        let region = |base, offset| GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size: 2 * PAGE_SIZE_4K,
            offset,
            page_size: PAGE_SIZE_4K,
        };
        let overlapping = [region(0x10000, 0), region(0x11000, 2 * PAGE_SIZE_4K)];
        let handoff = AttachError::from(validate(&overlapping, 1 << 20).unwrap_err());
        let past_end =
            AttachError::from(validate(&[region(0x10000, 0)], PAGE_SIZE_4K).unwrap_err());
        let cases = [
            (handoff, ErrorCode::InvalidArgument, RefusalReason::Overlap),
            (
                past_end,
                ErrorCode::InvalidArgument,
                RefusalReason::PastEndOfFile,
            ),
            (
                AttachError::SnapshotGone("s".parse().unwrap()),
                ErrorCode::NotFound,
                RefusalReason::SnapshotMissing,
            ),
            (
                AttachError::Setup(io::Error::from_raw_os_error(libc::EMFILE)),
                ErrorCode::Internal,
                RefusalReason::SetupFailed,
            ),
            (
                AttachError::NoWorker,
                ErrorCode::Unavailable,
                RefusalReason::NoWorker,
            ),
        ];
        for (e, code, reason) in cases {
            assert_eq!(refusal(&e), (code, reason), "{e}");
        }
    }
}
