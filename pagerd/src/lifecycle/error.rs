//! Why a lifecycle operation was refused or failed, with messages that name what is in the
//! way (the forks, the processes, the unreadable records).

use std::path::PathBuf;

use proto::model::FileUserInfo;
use proto::{ForkId, SnapshotId, VmId};

use crate::registry::RegistryError;
use crate::serve::ServeError;
use crate::snapshot::SnapshotError;
use crate::store::damage::{Damage, NotLinkable};
use crate::store::StoreError;

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LifecycleError {
    /// No such snapshot or fork.
    #[error("no {kind} `{id}`")]
    NotFound {
        /// "snapshot" or "fork".
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The memory file is larger than `--max-snapshot-size`.
    #[error("the memory file is {size} bytes, more than --max-snapshot-size ({max})")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The uid would hold more snapshot bytes than `--max-snapshot-bytes-per-uid`.
    #[error(
        "uid {uid} holds {used} bytes of snapshots; {size} more would pass \
         --max-snapshot-bytes-per-uid ({quota}); delete some first"
    )]
    Quota {
        /// The registering uid.
        uid: u32,
        /// Bytes it holds (imports under way included).
        used: u64,
        /// The size asked for.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// The id is taken.
    #[error("{kind} `{id}` already exists")]
    Exists {
        /// "snapshot" or "fork".
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// Live forks, or processes holding its memory file, reference the snapshot.
    #[error(
        "snapshot `{snapshot}` is referenced by {}; close them first, or delete with defer",
        references(forks, file_users, vms)
    )]
    InUse {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The forks referencing it.
        forks: Vec<ForkId>,
        /// The processes holding its memory file on the FUSE mount.
        file_users: Vec<FileUserInfo>,
        /// The launched VMs running on it.
        vms: Vec<VmId>,
    },
    /// The snapshot is being deleted; no new forks.
    #[error("snapshot `{0}` is pending deletion; no new forks of it are allowed")]
    DeletePending(SnapshotId),
    /// Some fork record cannot be read, so no reference count can be trusted.
    #[error("cannot count the forks and VMs of snapshot `{snapshot}`: unreadable record(s) {}; repair or remove them", paths(records))]
    CountsUnknown {
        /// The snapshot.
        snapshot: SnapshotId,
        /// The unreadable records.
        records: Vec<PathBuf>,
    },
    /// The snapshot's files on disk are damaged.
    #[error("snapshot `{snapshot}` is damaged: {damage}")]
    Broken {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What is wrong.
        damage: Damage,
    },
    /// A delete without `force` of a damaged snapshot.
    #[error("snapshot `{snapshot}` is damaged: {damage}; only a forced delete removes it")]
    BrokenNeedsForce {
        /// The snapshot.
        snapshot: SnapshotId,
        /// What is wrong.
        damage: Damage,
    },
    /// The path given cannot be a memory file.
    #[error("{}: {why}", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file to link is on another filesystem (or the state directory cannot be inspected).
    #[error("{}: {reason}", path.display())]
    NotLinkable {
        /// The file.
        path: PathBuf,
        /// Why it cannot be linked.
        reason: NotLinkable,
    },
    /// A linked file changed while it was being registered.
    #[error("{}: {damage}", path.display())]
    ChangedWhileImporting {
        /// The file.
        path: PathBuf,
        /// What changed.
        damage: Damage,
    },
    /// The memory file cannot be mapped.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Reading or writing the state directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The serving side failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A fork did not reach the state waited for in time (always
    /// [`RegistryError::WaitTimedOut`]; the registry's other refusals become [`NotFound`] and
    /// [`Exists`]).
    ///
    /// [`NotFound`]: LifecycleError::NotFound
    /// [`Exists`]: LifecycleError::Exists
    #[error(transparent)]
    WaitTimedOut(RegistryError),
}

impl LifecycleError {
    /// No snapshot `id`.
    pub(crate) fn no_snapshot(id: &SnapshotId) -> Self {
        Self::NotFound {
            kind: "snapshot",
            id: id.to_string(),
        }
    }

    /// No fork `id`.
    pub(crate) fn no_fork(id: &ForkId) -> Self {
        Self::NotFound {
            kind: "fork",
            id: id.to_string(),
        }
    }
}

/// The registry's refusals, as the lifecycle's: one "not found" and one "exists", whichever
/// side noticed.
impl From<RegistryError> for LifecycleError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NoSnapshot(id) => Self::no_snapshot(&id),
            RegistryError::NoFork(id) => Self::no_fork(&id),
            RegistryError::Exists { kind, id } => Self::Exists { kind, id },
            timed_out @ RegistryError::WaitTimedOut { .. } => Self::WaitTimedOut(timed_out),
        }
    }
}

fn list<K: proto::ids::Kind>(ids: &[proto::Id<K>]) -> String {
    ids.iter()
        .map(proto::Id::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn references(forks: &[ForkId], file_users: &[FileUserInfo], vms: &[VmId]) -> String {
    let mut parts = Vec::new();
    if !vms.is_empty() {
        parts.push(format!("{} VM(s): {}", vms.len(), list(vms)));
    }
    if !forks.is_empty() {
        parts.push(format!("{} fork(s): {}", forks.len(), list(forks)));
    }
    if !file_users.is_empty() {
        let users: Vec<String> = file_users.iter().map(ToString::to_string).collect();
        parts.push(format!(
            "{} process(es) holding its memory file: {}",
            users.len(),
            users.join(", ")
        ));
    }
    parts.join(" and ")
}

fn paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
