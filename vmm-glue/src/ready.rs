//! Waiting for a freshly started hypervisor's control socket (Firecracker's API, QEMU's QMP)
//! to accept connections: tried every few milliseconds until it does, the deadline passes, or
//! the process is gone.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait between two attempts.
const RETRY_PERIOD: Duration = Duration::from_millis(5);

/// Why a control socket did not come up.
#[derive(Debug)]
pub enum NotReady {
    /// The process ended first.
    Ended,
    /// The deadline passed; the last attempt's error.
    TimedOut(io::Error),
}

/// Waits until `socket` accepts a connection, for at most `timeout`; `alive` is asked after
/// each failed attempt and ends the wait early when it answers `false`.
pub fn wait_accepting(
    socket: &Path,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<(), NotReady> {
    let end = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(_) => return Ok(()),
            Err(_) if !alive() => return Err(NotReady::Ended),
            Err(e) if Instant::now() >= end => return Err(NotReady::TimedOut(e)),
            Err(_) => std::thread::sleep(RETRY_PERIOD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_ready_and_a_dead_process_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut asked = 0;
        let error = wait_accepting(&path, Duration::from_secs(60), &mut || {
            asked += 1;
            false
        })
        .unwrap_err();
        assert!(matches!(error, NotReady::Ended), "{error:?}");
        assert_eq!(
            asked, 1,
            "the first failed attempt asks, and a dead process ends it"
        );
        let error = wait_accepting(&path, Duration::ZERO, &mut || true).unwrap_err();
        assert!(
            matches!(&error, NotReady::TimedOut(e) if e.kind() == io::ErrorKind::NotFound),
            "{error:?}"
        );
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        wait_accepting(&path, Duration::ZERO, &mut || panic!("not asked")).unwrap();
    }
}
