//! Passing the handoff message and its userfaultfd over a Unix stream socket.
//!
//! The VMM side ([`send_handoff`]) sends the JSON bytes with exactly one fd as `SCM_RIGHTS`
//! ancillary data in the first `sendmsg`, then any rest of the bytes, and never closes the
//! connection. The page-server side ([`HandoffReceiver`]) is driven from a non-blocking event
//! loop: each call reads what has arrived, keeps every fd that came with it, and reports a
//! handoff once the bytes form one complete JSON value. There is no fixed message buffer, so
//! a VMM with many regions works; the size is capped at [`MAX_MESSAGE_BYTES`]. Each `recvmsg`
//! has room for the most fds one message can carry (`SCM_MAX_FD`, 253), so the kernel never
//! truncates the control data, and every fd it does install is owned at once, so a refused
//! handoff closes all of them, however many a peer sent. That one read, [`recv_with_fds`], is
//! also how the daemon's control connections receive the descriptors sent with requests.
//!
//! ```text
//!   VMM                                   pagerd
//!   connect ───────────────────────────▶ accept (SO_PEERCRED → pid)
//!   sendmsg(json[..n], SCM_RIGHTS[uffd]) ▶ HandoffReceiver::poll: bytes + fds
//!   write(json[n..])  ─────────────────▶ HandoffReceiver::poll: … complete → validate
//! ```

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sendmsg, sockopt, ControlMessage, MsgFlags};
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

use crate::handoff::{self, GuestRegionUffdMapping, HandoffError, MAX_MESSAGE_BYTES};

/// What `/proc/self/fd/N` reads for a userfaultfd.
const USERFAULTFD_LINK: &str = "anon_inode:[userfaultfd]";
/// The most fds one `SCM_RIGHTS` message can carry (the kernel's `SCM_MAX_FD`). Each `recvmsg`
/// makes room for this many, so the kernel never has to truncate (and drop) any.
pub const SCM_MAX_FD: usize = 253;
/// Bytes read per `recvmsg` of a handoff.
const CHUNK_BYTES: usize = 64 * 1024;

/// Sends `bytes` with `fds` attached to the first byte, then the rest of the bytes.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut writer: &UnixStream = sock;
    writer.write_all(&bytes[sent..])
}

/// Sends a Firecracker-style handoff: the regions as JSON plus the uffd.
pub fn send_handoff(
    sock: &UnixStream,
    regions: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
) -> io::Result<()> {
    send_with_fds(sock, &handoff::encode(regions), &[uffd])
}

/// The pid of the process at the other end of a Unix socket (`SO_PEERCRED`), if it is visible
/// from this pid namespace.
pub fn peer_pid(sock: &impl AsFd) -> io::Result<Option<i32>> {
    let creds = getsockopt(sock, sockopt::PeerCredentials).map_err(io::Error::from)?;
    Ok((creds.pid() > 0).then_some(creds.pid()))
}

/// Whether `fd` is a userfaultfd; on `Err` the text says what it is instead.
pub fn check_userfaultfd(fd: BorrowedFd<'_>) -> Result<(), String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("unreadable: {e}"))?;
    let link = link.to_string_lossy();
    if link == USERFAULTFD_LINK {
        Ok(())
    } else {
        Err(link.into_owned())
    }
}

/// A complete, validated-for-shape handoff: regions plus the uffd that serves them.
#[derive(Debug)]
pub struct ReceivedHandoff {
    /// The regions as the VMM described them (still to be checked against the snapshot).
    pub regions: Vec<GuestRegionUffdMapping>,
    /// The VMM's userfaultfd.
    pub uffd: OwnedFd,
}

/// Assembles one handoff from a non-blocking socket across as many reads as it takes.
#[derive(Debug, Default)]
pub struct HandoffReceiver {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
}

/// What one [`recv_with_fds`] gave.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (0: the peer closed the connection).
    pub len: usize,
    /// Every descriptor the kernel installed with those bytes, owned.
    pub fds: Vec<OwnedFd>,
    /// The kernel truncated the control data (some descriptors may have been dropped).
    pub truncated: bool,
}

/// Whether [`recv_with_fds`] waits for data on a blocking socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait as the socket does (its own timeouts apply).
    AsSocket,
    /// Return `WouldBlock` at once when nothing has arrived (`MSG_DONTWAIT`).
    Never,
}

/// One `recvmsg`: the bytes go to `buf`; every descriptor that came with them is returned
/// owned (close-on-exec), whatever else happens (a truncated control buffer, other message
/// types), so none can leak. There is room for [`SCM_MAX_FD`] descriptors, the most one
/// message carries. Interrupted calls are retried.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], wait: Wait) -> io::Result<Received> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = match wait {
        Wait::AsSocket => RecvFlags::CMSG_CLOEXEC,
        Wait::Never => RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    };
    let msg = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg(sock, &mut iov, &mut control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

impl HandoffReceiver {
    /// A receiver with nothing read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads whatever has arrived. `Ok(None)`: the message is not complete yet, call again when
    /// the socket is readable. `Ok(Some(_))`: one complete handoff with exactly one uffd.
    /// `Err(_)`: the handoff is refused; every fd received has been closed.
    pub fn poll(&mut self, sock: impl AsFd) -> Result<Option<ReceivedHandoff>, HandoffError> {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let chunk = match recv_with_fds(sock.as_fd(), &mut buf, Wait::Never) {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(HandoffError::Io(e)),
            };
            self.fds.extend(chunk.fds);
            self.fds_truncated |= chunk.truncated;
            if chunk.len == 0 {
                return Err(HandoffError::Incomplete {
                    received: self.bytes.len(),
                });
            }
            self.bytes.extend_from_slice(&buf[..chunk.len]);
            if self.bytes.len() > MAX_MESSAGE_BYTES {
                return Err(HandoffError::TooLarge {
                    cap: MAX_MESSAGE_BYTES,
                });
            }
            if self.is_complete() {
                return self.finish().map(Some);
            }
        }
    }

    /// Whether the bytes so far hold one whole JSON value (or something that never will).
    fn is_complete(&self) -> bool {
        match serde_json::from_slice::<serde::de::IgnoredAny>(&self.bytes) {
            Ok(_) => true,
            Err(e) => !e.is_eof(),
        }
    }

    fn finish(&mut self) -> Result<ReceivedHandoff, HandoffError> {
        let fds = std::mem::take(&mut self.fds);
        if fds.len() > 1 || self.fds_truncated {
            return Err(HandoffError::SeveralFds {
                count: fds.len().max(2),
            });
        }
        let uffd = fds.into_iter().next().ok_or(HandoffError::NoFd)?;
        check_userfaultfd(uffd.as_fd()).map_err(|kind| HandoffError::NotUserfaultfd { kind })?;
        let regions = handoff::parse(&self.bytes)?;
        Ok(ReceivedHandoff { regions, uffd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn every_fd_of_a_crowded_message_is_received_and_counted() {
        for count in [2, 9, 20, SCM_MAX_FD] {
            let (a, b) = UnixStream::pair().unwrap();
            let fds: Vec<OwnedFd> = (0..count).map(|_| dev_null()).collect();
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            send_with_fds(&a, b"[]", &borrowed).unwrap();
            let mut buf = vec![0u8; 64];
            let chunk = recv_with_fds(b.as_fd(), &mut buf, Wait::AsSocket).unwrap();
            assert_eq!(chunk.len, 2);
            assert_eq!(chunk.fds.len(), count, "every fd arrives, none is dropped");
            assert!(!chunk.truncated);
            let mut receiver = HandoffReceiver::new();
            send_with_fds(&a, b"[]", &borrowed).unwrap();
            match receiver.poll(&b) {
                Err(HandoffError::SeveralFds { count: got }) => assert_eq!(got, count),
                other => panic!("{count} fds: {other:?}"),
            }
        }
    }

    #[test]
    fn a_read_that_may_not_wait_reports_would_block_and_received_fds_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let nothing = recv_with_fds(b.as_fd(), &mut buf, Wait::Never).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        let fd = dev_null();
        send_with_fds(&a, b"x", &[fd.as_fd()]).unwrap();
        let got = recv_with_fds(b.as_fd(), &mut buf, Wait::AsSocket).unwrap();
        assert_eq!((got.len, got.fds.len(), got.truncated), (1, 1, false));
        let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received descriptors close on exec"
        );
    }

    #[test]
    fn a_message_in_pieces_keeps_its_one_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let fd = dev_null();
        send_with_fds(&a, b"[{\"base", &[fd.as_fd()]).unwrap();
        let mut receiver = HandoffReceiver::new();
        assert!(receiver.poll(&b).unwrap().is_none());
        assert_eq!(receiver.fds.len(), 1);
        (&a).write_all(b"_host_virt_addr\":0}]").unwrap();
        // The fd is /dev/null, so the complete message is refused for that.
        match receiver.poll(&b) {
            Err(HandoffError::NotUserfaultfd { kind }) => assert_eq!(kind, "/dev/null"),
            other => panic!("{other:?}"),
        }
    }
}
