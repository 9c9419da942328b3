//! Numbers for people: sizes in binary units (`humansize`), durations in the unit that reads
//! best, and times of day in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use humansize::{format_size, BINARY};

/// `bytes` as B, KiB, MiB, GiB or TiB with one decimal where it matters.
pub fn bytes(bytes: u64) -> String {
    format_size(bytes, BINARY.decimal_places(1))
}

/// A latency in nanoseconds as ns, µs, ms or s.
pub fn nanos(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// An uptime in milliseconds as days, hours, minutes and seconds.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A time given in ms since the Unix epoch, as UTC to the second and how long ago it was
/// (from `now`).
pub fn when(unix_ms: u64, now: SystemTime) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let ago = now
        .duration_since(at)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(at),
        uptime(ago)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(256 << 20), "256 MiB");
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn latencies_pick_their_unit() {
        assert_eq!(nanos(850), "850 ns");
        assert_eq!(nanos(12_300), "12.3 µs");
        assert_eq!(nanos(3_300_000), "3.3 ms");
        assert_eq!(nanos(2_500_000_000), "2.50 s");
    }

    #[test]
    fn times_read_in_utc_with_their_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_125);
        assert_eq!(
            when(1_700_000_000_000, now),
            "2023-11-14T22:13:20Z (2m 5s ago)"
        );
    }

    #[test]
    fn uptimes_read_as_a_clock() {
        assert_eq!(uptime(42_000), "42s");
        assert_eq!(uptime(3_723_000), "1h 2m");
        assert_eq!(uptime(90_061_000), "1d 1h");
    }
}
