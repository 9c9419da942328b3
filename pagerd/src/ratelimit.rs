//! Rate limiting for log lines a VMM or guest can trigger, so a hostile guest cannot flood
//! the log (Firecracker's `rate_limited` idea: a few lines per interval, then a count).

use std::time::{Duration, Instant};

/// Lets at most `burst` events through per `interval`, counting the ones it holds back.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// `burst` events per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            interval,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event may be logged, where `n` events were suppressed since the last
    /// one logged; `None` if it must be dropped.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.interval);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_then_counts_what_it_drops() {
        let mut rl = RateLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), None);
        assert_eq!(rl.check(t0), None);
        assert_eq!(rl.check(t0 + Duration::from_secs(1)), Some(2));
    }
}
