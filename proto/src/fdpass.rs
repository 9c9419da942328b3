//! Passing the handoff message and its userfaultfd over a Unix stream socket.
//!
//! The VMM side ([`send_handoff`]) sends the JSON bytes with exactly one fd as `SCM_RIGHTS`
//! ancillary data in the first `sendmsg`, then any rest of the bytes, and never closes the
//! connection. The page-server side ([`HandoffReceiver`]) is driven from a non-blocking event
//! loop: each call reads what has arrived, keeps every fd that came with it, and reports a
//! handoff once the bytes form one complete JSON value. There is no fixed message buffer, so
//! a VMM with many regions works; the size is capped at [`MAX_MESSAGE_BYTES`].
//!
//! ```text
//!   VMM                                   pagerd
//!   connect ───────────────────────────▶ accept (SO_PEERCRED → pid)
//!   sendmsg(json[..n], SCM_RIGHTS[uffd]) ▶ HandoffReceiver::poll: bytes + fds
//!   write(json[n..])  ─────────────────▶ HandoffReceiver::poll: … complete → validate
//! ```

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

use crate::handoff::{self, GuestRegionUffdMapping, HandoffError, MAX_MESSAGE_BYTES};

/// What `/proc/self/fd/N` reads for a userfaultfd.
const USERFAULTFD_LINK: &str = "anon_inode:[userfaultfd]";
/// How many fds one `recvmsg` makes room for; more than one is already an error.
const FDS_PER_CHUNK: usize = 8;
/// Bytes read per `recvmsg`.
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

/// One `recvmsg` worth of data.
struct Chunk {
    len: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

fn recv_chunk(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Chunk> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; FDS_PER_CHUNK]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for this
            // message; nothing else owns them, so each is wrapped exactly once.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(Chunk {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
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
            let chunk = match recv_chunk(sock.as_fd(), &mut buf) {
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
