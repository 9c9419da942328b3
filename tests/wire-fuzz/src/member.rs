//! Connections made as a `--group` member: a thread of this process takes the member's uid and
//! group (Linux credentials are per thread; the raw system calls change only the calling
//! thread, where libc's wrappers would change every thread) and connects on request, so the
//! daemon's `SO_PEERCRED` sees the member while the rest of the fuzzer stays root.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};

/// A thread connecting as another user.
pub struct MemberConnector {
    requests: Sender<(PathBuf, Sender<io::Result<UnixStream>>)>,
}

impl MemberConnector {
    /// Starts the thread, running as `uid` with primary group `gid` and no other groups.
    pub fn start(uid: u32, gid: u32) -> io::Result<Self> {
        let (requests, inbox) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name("wire-fuzz-member".into())
            .spawn(move || connect_as(uid, gid, &inbox, &ready_tx))?;
        ready
            .recv()
            .map_err(|_| io::Error::other("the member thread exited"))??;
        Ok(Self { requests })
    }

    /// A connection to the Unix socket at `path`, made as the member.
    pub fn connect(&self, path: PathBuf) -> io::Result<UnixStream> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((path, tx))
            .map_err(|_| io::Error::other("the member thread exited"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the member thread exited"))?
    }
}

/// The member thread: drops to `uid`/`gid`, says so on `ready`, then connects on request.
fn connect_as(
    uid: u32,
    gid: u32,
    inbox: &Receiver<(PathBuf, Sender<io::Result<UnixStream>>)>,
    ready: &Sender<io::Result<()>>,
) {
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: three system calls that change only this thread's credentials; the null list
    // with a count of 0 clears the supplementary groups.
    let dropped = unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))
        .and_then(|()| check(libc::syscall(libc::SYS_setresgid, gid, gid, gid)))
        .and_then(|()| check(libc::syscall(libc::SYS_setresuid, uid, uid, uid)))
    };
    let failed = dropped.is_err();
    let _ = ready.send(dropped);
    if failed {
        return;
    }
    while let Ok((path, reply)) = inbox.recv() {
        let _ = reply.send(UnixStream::connect(path));
    }
}
