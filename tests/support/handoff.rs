//! Hand-made handoffs: a fresh userfaultfd, arbitrary (hostile) messages with descriptors,
//! and pagerd's reply.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use proto::handoff::HandoffReply;

use crate::DEADLINE;

/// A fresh userfaultfd (nothing registered), to attach to hand-made handoffs.
pub fn new_uffd() -> OwnedFd {
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .expect("create uffd");
    // `Uffd::into_raw_fd` (0.9) still closes the fd on drop, so take a duplicate instead.
    uffd.as_fd().try_clone_to_owned().expect("dup uffd")
}

/// Connects to a handoff socket, sends `bytes` with `fds`, and returns pagerd's reply
/// (`None` if it closed the connection without one).
pub fn raw_handoff(socket: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Option<HandoffReply> {
    let stream = UnixStream::connect(socket).expect("connect handoff socket");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    // pagerd may close the connection before reading everything (too-large messages).
    let _ = proto::fdpass::send_with_fds(&stream, bytes, fds);
    read_reply(&stream)
}

/// Reads pagerd's one reply line from a handoff connection (`None` if it closed the
/// connection without one).
pub fn read_reply(stream: &UnixStream) -> Option<HandoffReply> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}")))
        }
    }
}

/// An open file to pass as an extra or wrong descriptor.
pub fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("open /dev/null")
        .into()
}

/// Borrows a list of owned fds.
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}
