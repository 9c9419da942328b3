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

/// The most pages one recording notes (16 GiB of touched memory, a 32 MiB trace): a fork that
/// touches more stops recording there, and what it noted counts.
pub const MAX_TRACE_PAGES: usize = 1 << 22;

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
            if self.full() {
                break;
            }
            if !self.seen.get(page) {
                self.seen.set(page);
                self.trace.push(page);
                new += 1;
            }
        }
        new
    }

    /// Whether the window has passed at `now`, or the trace is full.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until || self.full()
    }

    fn full(&self) -> bool {
        self.trace.len() >= MAX_TRACE_PAGES
    }

    /// The recording's ticket and trace.
    pub fn finish(self) -> (Ticket, Trace) {
        (self.ticket, self.trace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::working_set::slot::Slot;

    #[test]
    fn first_touches_are_noted_once_in_order_until_the_window_ends() {
        let slot = Slot::default();
        let ticket = slot.claim(1).unwrap();
        let now = Instant::now();
        let mut r = Recorder::new(ticket, 100, now + std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(r.touch(10, 3), 3);
        assert_eq!(r.touch(5, 1), 1);
        assert_eq!(r.touch(11, 4), 2, "11 and 12 were seen");
        assert_eq!(r.touch(98, 10), 2, "never past the snapshot");
        assert!(!r.expired(now));
        assert!(r.expired(now + std::time::Duration::from_secs(1)));
        let (_, trace) = r.finish();
        assert_eq!(trace, vec![10, 11, 12, 5, 13, 14, 98, 99]);
    }
}
