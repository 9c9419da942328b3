//! Recording a fork's first touches for its snapshot's working set.
//!
//! A recording session notes, in order, each snapshot page its faults install for the first
//! time: the whole run a fault fills, since readahead grows only for readers that go on to
//! touch it, and runs of zero pages cost a replay nothing but page-table entries. It stops at
//! the end of its window or of the session; the trace then goes to the lifecycle to be merged.

use std::time::Instant;

use crate::bitmap::Bitmap;
use crate::working_set::merge::Trace;
use crate::working_set::slot::Ticket;

/// First touches of one fork.
#[derive(Debug)]
pub struct Recorder {
    ticket: Ticket,
    seen: Bitmap,
    trace: Trace,
    until: Instant,
}

impl Recorder {
    /// Records first touches among `pages` snapshot pages until `until`. `None` if the map
    /// cannot be allocated (the fork is then served without recording).
    pub fn new(ticket: Ticket, pages: u64, until: Instant) -> Option<Self> {
        Some(Self {
            ticket,
            seen: Bitmap::try_new(pages).ok()?,
            trace: Vec::new(),
            until,
        })
    }

    /// Notes snapshot pages `first..first+count` as touched; returns how many were new.
    pub fn touch(&mut self, first: u64, count: u64) -> u64 {
        let mut new = 0;
        for page in first..(first + count).min(self.seen.len()) {
            if !self.seen.get(page) {
                self.seen.set(page);
                self.trace.push(page);
                new += 1;
            }
        }
        new
    }

    /// Whether the window has passed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }

    /// The recording's ticket and trace.
    pub fn finish(self) -> (Ticket, Trace) {
        (self.ticket, self.trace)
    }
}
