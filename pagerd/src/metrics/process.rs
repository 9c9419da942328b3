//! The standard `process_*` metrics of the daemon's own process, read from `/proc/self` at
//! each scrape: start time, CPU time, resident and virtual memory, open and allowed
//! descriptors.
//!
//! ```text
//!   /proc/self/stat  ─▶ utime + stime (ticks), starttime (ticks after boot), vsize, rss (pages)
//!   /proc/stat       ─▶ btime (boot, seconds since the epoch)
//!   /proc/self/fd    ─▶ open descriptors;  RLIMIT_NOFILE (soft) ─▶ allowed descriptors
//! ```

use std::io;

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// What the kernel says of this process.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ProcessStats {
    /// When it started, in seconds since the epoch.
    pub start_time_seconds: f64,
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_bytes: u64,
    /// Open descriptors.
    pub open_fds: u64,
    /// The soft limit on descriptors.
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads them now.
    pub fn read() -> io::Result<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let boot = std::fs::read_to_string("/proc/stat")?;
        let fds = crate::sys::open_fd_count()?;
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        Self::parse(
            &stat,
            &boot,
            fds as u64,
            max_fds,
            clock_ticks(),
            page_size(),
        )
    }

    /// From `/proc/self/stat` and `/proc/stat`, given the clock's ticks per second and the
    /// page size.
    fn parse(
        stat: &str,
        boot: &str,
        open_fds: u64,
        max_fds: u64,
        ticks: u64,
        page: u64,
    ) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        // The command name (field 2) is in parentheses and may hold spaces or parentheses:
        // fields are counted after its last `)`, from field 3 (the state).
        let (_, after_name) = stat
            .rsplit_once(')')
            .ok_or_else(|| invalid("no command name in /proc/self/stat"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |n: usize| -> io::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid(&format!("no field {n} in /proc/self/stat")))
        };
        let boot_time: u64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| invalid("no btime in /proc/stat"))?;
        let ticks = ticks.max(1) as f64;
        Ok(Self {
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            resident_bytes: field(24)?.saturating_mul(page),
            virtual_bytes: field(23)?,
            open_fds,
            max_fds,
        })
    }

    /// Adds them to `registry` (unprefixed: these names are the same for every program).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the epoch",
            Unit::Seconds,
            ConstGauge::new(self.start_time_seconds),
        );
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            ConstCounter::new(self.cpu_seconds),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            ConstGauge::new(self.resident_bytes),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            ConstGauge::new(self.virtual_bytes),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            ConstGauge::new(self.open_fds),
        );
        registry.register(
            "process_max_fds",
            "Most file descriptors the process may open (soft limit)",
            ConstGauge::new(self.max_fds),
        );
    }
}

/// The clock ticks per second `/proc` counts in.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library; it takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100)
}

/// The size of a page, in bytes.
fn page_size() -> u64 {
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 150, stime 50, starttime
        // 1000 ticks, vsize 8192000 bytes, rss 300 pages.
        let stat = "4242 (pa ger)d) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 3 0 \
                    1000 8192000 300 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let p = ProcessStats::parse(stat, boot, 12, 1024, 100, 4096).unwrap();
        assert_eq!(
            p,
            ProcessStats {
                start_time_seconds: 1_700_000_010.0,
                cpu_seconds: 2.0,
                resident_bytes: 300 * 4096,
                virtual_bytes: 8_192_000,
                open_fds: 12,
                max_fds: 1024,
            }
        );
        assert!(ProcessStats::parse("4242 (x) S 1", boot, 0, 0, 100, 4096).is_err());
        assert!(ProcessStats::parse(stat, "cpu 1\n", 0, 0, 100, 4096).is_err());
    }

    #[test]
    fn this_process_is_described() {
        let p = ProcessStats::read().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0);
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
    }
}
