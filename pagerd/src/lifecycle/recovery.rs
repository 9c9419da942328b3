//! Serving again, after a restart, the forks whose VMM outlived the previous daemon, and
//! recording at attach what that needs.
//!
//! ```text
//! attach (acceptor, before "ok"):  ForkRecord { vmm: pid + start time,
//!                                               uffd: fd in the VMM, inode, features, regions }
//! start (reconcile), VMM alive:    record has no uffd ─▶ detached (record_too_old)
//!                                  pidfd_open ─▶ same process? ─▶ pidfd_getfd ─▶ Server::recover
//!                                  any failure ─▶ detached, with the reason
//! ```
//!
//! Who started the VMM does not matter: only its pid, start time and descriptor table do.

use std::io;
use std::os::fd::AsFd;

use proto::handoff::GuestRegionUffdMapping;

use crate::registry::{unix_ms, Fork};
use crate::serve::recover::{self, RecoverError, ServedUffd};
use crate::serve::{AttachJournal, Server};
use crate::store::{ForkRecord, RegionRecord, Store, UffdRecord, VmmIdentity};

/// Writes a fork's record with its VMM and uffd when a handoff is accepted.
#[derive(Debug)]
pub(crate) struct RecordJournal {
    store: Store,
}

impl RecordJournal {
    /// A journal writing into `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl AttachJournal for RecordJournal {
    fn attached(&self, fork: &Fork, vmm_pid: i32, uffd: &ServedUffd) -> io::Result<()> {
        let Some(vmm) = VmmIdentity::of(vmm_pid) else {
            // The VMM already exited: its session ends at once, and its record with it.
            return Ok(());
        };
        let record = ForkRecord {
            id: fork.id().clone(),
            snapshot: fork.snapshot().clone(),
            created_unix_ms: unix_ms(fork.created()),
            vmm: Some(vmm),
            uffd: Some(UffdRecord {
                vmm_fd: uffd.vmm_fd,
                ino: uffd.ino,
                features: uffd.features,
                regions: uffd.regions.iter().map(region_record).collect(),
            }),
            prefetch: Some(fork.prefetch()),
            owner: Some(fork.owner()),
        };
        // The space kept at creation makes room for the record on a full disk.
        self.store.release_fork_space(fork.id());
        self.store
            .write_fork(&record)
            .map_err(|e| io::Error::other(crate::errors::error_chain(&e)))
    }
}

fn region_record(r: &GuestRegionUffdMapping) -> RegionRecord {
    RegionRecord {
        base_host_virt_addr: r.base_host_virt_addr,
        size: r.size,
        offset: r.offset,
        page_size: r.page_size,
    }
}

fn region_mapping(r: &RegionRecord) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: r.base_host_virt_addr,
        size: r.size,
        offset: r.offset,
        page_size: r.page_size,
    }
}

/// Why a fork could not be served again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoveryError {
    /// The record predates pagerd keeping its uffd.
    #[error("the fork's record predates recorded uffds")]
    RecordTooOld,
    /// Taking the uffd back failed.
    #[error(transparent)]
    Recover(#[from] RecoverError),
}

impl RecoveryError {
    /// The fork's `detached_reason`.
    pub fn reason(&self) -> proto::model::DetachedReason {
        match self {
            Self::RecordTooOld => proto::model::DetachedReason::RecordTooOld,
            Self::Recover(e) => e.reason(),
        }
    }
}

/// Takes the uffd of `fork`'s live VMM (`vmm`) back and serves it again.
pub(crate) fn recover_fork(
    server: &Server,
    fork: &std::sync::Arc<Fork>,
    record: &ForkRecord,
    vmm: VmmIdentity,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<(), RecoveryError> {
    let uffd = record.uffd.as_ref().ok_or(RecoveryError::RecordTooOld)?;
    let pidfd = crate::sys::pidfd_open(vmm.pid).map_err(|_| RecoverError::VmmGone)?;
    // The pidfd names whatever process has the pid now: make sure it is still the VMM.
    if !vmm.is_alive() {
        return Err(RecoverError::VmmGone.into());
    }
    let fd = recover::reclaim_uffd(pidfd.as_fd(), vmm.pid, uffd.vmm_fd, uffd.ino)?;
    let served = ServedUffd {
        vmm_fd: uffd.vmm_fd,
        ino: uffd.ino,
        features: uffd.features,
        regions: uffd.regions.iter().map(region_mapping).collect(),
    };
    server.recover(fork, vmm.pid, pidfd, fd, served, inherited)?;
    Ok(())
}
