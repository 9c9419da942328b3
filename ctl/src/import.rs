//! `snapshot add` while the daemon imports: a progress line at a terminal, and `--no-wait`,
//! which returns as soon as the daemon has the snapshot (importing), leaving the copy to it.
//!
//! The registration is one request answered when the import is done; meanwhile `snapshot
//! get` on another connection shows `importing` with bytes done and in all. A caller that
//! stops waiting does not stop the import: the daemon finishes it and the snapshot is ready.

use std::io::Write;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use proto::client::{Client, ClientError};
use proto::model::SnapshotInfo;
use proto::SnapshotId;

/// How often the progress is looked at.
const POLL: Duration = Duration::from_millis(250);

/// Runs `register` (the registration of `id`) and, while it runs, either shows its progress
/// on stderr (`show`) or, with `no_wait`, returns the snapshot as soon as the daemon lists
/// it.
pub fn watch(
    client: &Client,
    id: &SnapshotId,
    no_wait: bool,
    show: bool,
    register: impl FnOnce() -> Result<SnapshotInfo, ClientError> + Send + 'static,
) -> Result<SnapshotInfo, ClientError> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(register());
    });
    let started = Instant::now();
    let mut shown = false;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(answer) => {
                if shown {
                    eprintln!();
                }
                return answer;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ClientError::Malformed("the registration stopped".into()));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Ok(info) = client.snapshot(id) else {
            continue;
        };
        if no_wait {
            return Ok(info);
        }
        if let (true, Some(p)) = (show, info.importing) {
            let percent = p
                .done_bytes
                .saturating_mul(100)
                .checked_div(p.total_bytes)
                .unwrap_or(100);
            eprint!(
                "\rimporting {id}: {} of {} ({percent}%), {}s",
                crate::units::bytes(p.done_bytes),
                crate::units::bytes(p.total_bytes),
                started.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
            shown = true;
        }
    }
}
