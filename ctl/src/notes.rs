//! Remarks `pagerctl` adds to an answer: what the daemon does with a fork that its request did
//! not say.
//!
//! A fork that asks to graduate records instead when it attaches while a recording of its
//! snapshot's working set wants forks (a recording fork must fault to be seen, so it installs
//! nothing ahead of the guest and never graduates). The daemon decides when the VMM attaches;
//! before that, the snapshot's pending recording says what will happen.

use proto::client::Client;
use proto::model::{ForkInfo, ForkState};
use proto::prefetch::Prefetch;

/// Why `fork` (asking to graduate) records instead, or will, or did; `None` when it does not.
pub fn graduation(client: &Client, fork: &ForkInfo) -> Option<String> {
    if fork.prefetch != Prefetch::Graduate {
        return None;
    }
    if fork.recording {
        return Some(format!(
            "{} records the working set of {} instead of graduating (a recording fork does not \
             graduate)",
            fork.id, fork.snapshot
        ));
    }
    if fork.stats.recorded_pages > 0 {
        return Some(format!(
            "{} recorded the working set of {} instead of graduating",
            fork.id, fork.snapshot
        ));
    }
    if fork.state != ForkState::Waiting {
        return None;
    }
    let wanted = client
        .snapshot(fork.snapshot.as_str())
        .ok()?
        .recording?
        .forks_wanted;
    (wanted > 0).then(|| {
        format!(
            "a recording of {}'s working set wants {wanted} more fork(s): {} will record it \
             instead of graduating if its VMM attaches before the recording has them",
            fork.snapshot, fork.id
        )
    })
}
