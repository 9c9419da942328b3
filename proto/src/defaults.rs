//! Where things are when nobody says: the daemon and every client read these, so `pagerd` and
//! `pagerctl` with no arguments meet.

use std::path::{Path, PathBuf};

/// The state directory: snapshots, fork records, sockets, the FUSE mount point.
pub const STATE_DIR: &str = "/var/lib/pagerd";
/// Overrides [`STATE_DIR`] for both the daemon and the CLI.
pub const STATE_DIR_ENV: &str = "PAGERD_STATE_DIR";
/// The control socket's file name inside the state directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";
/// Overrides the control socket path for clients.
pub const SOCKET_ENV: &str = "PAGERD_SOCKET";

/// The control socket of a daemon whose state directory is `state_dir`.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_SOCKET_NAME)
}
