//! The processes of a fan-out run: reaping a child with `wait4` for its resource use, the CPU
//! time of a live process from `/proc`, and waiting until a handler's socket listens.

use std::path::Path;
use std::time::Duration;

use testkit::poll_until;

/// Resource use of a reaped child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak RSS in KiB.
    pub max_rss_kib: u64,
    /// Whether it exited with status 0.
    pub success: bool,
}

fn tv_s(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// Waits for a child with `wait4`, for its status and resource use.
pub fn reap(pid: u32) -> Usage {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(pid).expect("pid fits");
    // SAFETY: waiting on our own child with valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    Usage {
        cpu_s: tv_s(usage.ru_utime) + tv_s(usage.ru_stime),
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

/// SIGKILLs a child of ours (not yet reaped, so its pid cannot have been reused).
pub fn kill(pid: u32) {
    let pid = i32::try_from(pid).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// CPU seconds a process has used so far.
pub fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / hz
}

/// Whether a Unix socket bound at `path` is listening (`/proc/net/unix` lists it with
/// `__SO_ACCEPTCON`): a handler that binds and listens without saying so is then ready.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path.
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() == 8 && fields[7] == path && fields[3] == "00010000"
    })
}

/// Waits until the socket at `path` listens, for at most `deadline`.
pub fn wait_listening(path: &Path, deadline: Duration) -> bool {
    poll_until(deadline, || listening(path))
}
