//! Waiting for a freshly started hypervisor's control socket (Firecracker's API, QEMU's QMP)
//! to accept connections: tried every few milliseconds until it does, the deadline passes, or
//! the process is gone.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait between two attempts.
const RETRY_PERIOD: Duration = Duration::from_millis(5);

/// Waits until `socket` accepts a connection, for at most `timeout`; `alive` is asked after
/// each failed attempt and ends the wait early when it answers `false`. The error is the last
/// attempt's.
pub fn wait_accepting(
    socket: &Path,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> io::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= end || !alive() => return Err(e),
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
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            asked, 1,
            "the first failed attempt asks, and a dead process ends it"
        );
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        wait_accepting(&path, Duration::ZERO, &mut || panic!("not asked")).unwrap();
    }
}
