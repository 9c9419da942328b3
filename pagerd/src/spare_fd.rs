//! A descriptor kept in reserve for accept loops. When the process is out of descriptors
//! (`EMFILE`), a listening socket stays readable while `accept` keeps failing, so a loop that
//! polls it spins, and a connection waiting in the backlog is never answered. Releasing the
//! spare makes room for exactly one `accept`: the loop takes the connection off the backlog,
//! turns it away (or, for an operator, serves it), and takes the spare back once that
//! connection is closed (before, its room is taken).
//!
//! The spare is the last line. Before it, [`low_on_descriptors`] keeps the last
//! [`RESERVED_DESCRIPTORS`] for root and pagerd's own user: while fewer are free, every other
//! user's new connection (control or handoff) is turned away, so members cannot bring the
//! daemon to `EMFILE` at all. At start the soft limit is raised to the hard one
//! ([`raise_descriptor_limit`]).

use std::fs::File;
use std::io;

/// One descriptor held in reserve (`/dev/null`, opened read-only).
#[derive(Debug)]
pub(crate) struct SpareFd(Option<File>);

impl SpareFd {
    /// Opens the spare.
    pub fn new() -> Self {
        Self(File::open("/dev/null").ok())
    }

    /// Closes the spare, making room for one descriptor.
    pub fn release(&mut self) {
        self.0 = None;
    }

    /// Takes the spare back if it was given away and a descriptor is free again.
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }

    /// Whether the spare is held.
    #[cfg(test)]
    pub fn held(&self) -> bool {
        self.0.is_some()
    }
}

/// Descriptors kept free for root and pagerd's own user.
pub(crate) const RESERVED_DESCRIPTORS: u64 = 32;

/// How many more descriptors this process may open: its soft limit minus those open (`None`
/// if it cannot tell, e.g. without a descriptor to list `/proc/self/fd` with).
pub(crate) fn free_descriptors() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(limit.saturating_sub(u64::try_from(open).unwrap_or(u64::MAX)))
}

/// Whether fewer than [`RESERVED_DESCRIPTORS`] are free (or the count cannot be read): only
/// operators' connections are taken then.
pub(crate) fn low_on_descriptors() -> bool {
    free_descriptors().is_none_or(|free| free < RESERVED_DESCRIPTORS)
}

/// Raises the soft limit on open descriptors to the hard one (each fork costs a few).
pub(crate) fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            ..limit
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the limit on open descriptors");
        }
    }
}

/// Whether `error` says the process (`EMFILE`) or the system (`ENFILE`) is out of descriptors.
pub(crate) fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spare_makes_room_for_one_accept_and_comes_back() {
        let mut spare = SpareFd::new();
        assert!(spare.held());
        spare.release();
        assert!(!spare.held());
        spare.refill();
        assert!(
            spare.held(),
            "descriptors are free here, so it comes back at once"
        );
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
        assert!(free_descriptors().is_some_and(|free| free > 0));
    }
}
