//! Who may register which memory file.
//!
//! pagerd runs as root and can open any file, and a registered memory file becomes readable by
//! every member of the control group (through the FUSE view). A group member asking pagerd to
//! register `/root/secret.mem` would be a confused deputy: pagerd would read a file for a
//! client who cannot. So the client must prove it can read the file:
//!
//! ```text
//! fd: true    the client opens the file and passes the descriptor with the request line
//!             (SCM_RIGHTS); pagerd imports from that descriptor, which must be open for
//!             reading (O_PATH and write-only descriptors are refused). `path` is only the
//!             name recorded.
//! path only   accepted from root and from the daemon's own user, who can read the file
//!             anyway; anyone else: invalid_argument "… pass the file as a descriptor".
//! ```
//!
//! Either way the import is from a descriptor ([`Source`]): a path is opened once, without
//! following a symlink, and never looked up again.

use std::path::PathBuf;

use proto::control::{ControlError, ErrorCode, SnapshotRegister};
use proto::model::SnapshotInfo;

use super::{Peer, RequestContext};
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::store::import::{ImportMode, Source};

/// The message refusing a path-only registration from someone who is not root.
pub const PASS_A_DESCRIPTOR: &str = "only root may register a file by path; pass the file as a \
     descriptor (\"fd\": true, with SCM_RIGHTS; `pagerctl snapshot add` does this)";

/// Whether `peer` may have pagerd open a path on its behalf: root, or the daemon's own user.
pub fn may_register_by_path(peer: Option<Peer>) -> bool {
    peer.is_some_and(|p| crate::owners::is_operator(p.uid))
}

/// The uid that owns what `peer` creates (an in-process caller, with no peer, is the daemon
/// itself: root).
pub fn owner_of(peer: Option<Peer>) -> u32 {
    peer.map_or(crate::owners::ROOT, |p| p.uid)
}

/// Registers a snapshot as `request` asks, on behalf of the client in `context`: from the
/// descriptor it passed, or from a path if it may register by path.
pub fn register(
    lifecycle: &Lifecycle,
    request: SnapshotRegister,
    context: &mut RequestContext,
) -> Result<SnapshotInfo, ControlError> {
    let mode = if request.link {
        ImportMode::Link
    } else {
        ImportMode::Copy
    };
    let invalid = |message: &str| ControlError::new(ErrorCode::InvalidArgument, message);
    let vmm = match (&request.vmstate, request.vmm) {
        (Some(_), Some(vmm)) => Some(vmm),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("\"vmstate\" needs \"vmm\" (firecracker or qemu)")),
        (None, Some(_)) => return Err(invalid("\"vmm\" names the hypervisor of \"vmstate\"")),
    };
    if request.fd {
        let fd = context.take_fd().ok_or_else(|| {
            invalid("\"fd\" is true but no descriptor came with the request line")
        })?;
        let name = request.path.clone();
        let source = Source::from_fd(fd, name).map_err(|e| {
            ControlError::from(LifecycleError::BadPath {
                path: request
                    .path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("the passed descriptor")),
                why: crate::errors::error_chain(&e),
            })
        })?;
        let vmstate = match vmm {
            Some(vmm) => {
                let fd = context.take_fd().ok_or_else(|| {
                    invalid("\"vmstate\" with \"fd\" needs a second descriptor (the state file)")
                })?;
                let name = request.vmstate.clone();
                let state = Source::from_fd(fd, name).map_err(|e| {
                    ControlError::from(LifecycleError::BadPath {
                        path: request.vmstate.clone().unwrap_or_default(),
                        why: crate::errors::error_chain(&e),
                    })
                })?;
                Some((state, vmm))
            }
            None => None,
        };
        let owner = owner_of(context.peer());
        return Ok(lifecycle.register_snapshot(request.snapshot, source, mode, vmstate, owner)?);
    }
    let path = request.path.ok_or_else(|| {
        invalid("a registration needs \"path\", or \"fd\": true and a descriptor")
    })?;
    if !may_register_by_path(context.peer()) {
        return Err(invalid(PASS_A_DESCRIPTOR));
    }
    let vmstate = request.vmstate.as_deref().zip(vmm);
    let owner = owner_of(context.peer());
    Ok(lifecycle.register_snapshot_path(request.snapshot, &path, mode, vmstate, owner)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_daemons_user_register_by_path() {
        let peer = |uid| {
            Some(Peer {
                uid,
                gid: uid,
                pid: 1,
            })
        };
        assert!(may_register_by_path(peer(0)));
        assert!(may_register_by_path(peer(nix::unistd::geteuid().as_raw())));
        let stranger = if nix::unistd::geteuid().as_raw() == 65534 {
            65533
        } else {
            65534
        };
        assert!(!may_register_by_path(peer(stranger)));
        assert!(!may_register_by_path(None), "an unknown peer is nobody");
    }
}
