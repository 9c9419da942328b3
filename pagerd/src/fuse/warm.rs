//! Warming a memory file's page cache with its snapshot's working set (the cached read path).
//!
//! When a snapshot's memory file is first opened on the mount and the snapshot has a recorded
//! working set, a background thread pushes the set's pages into the file's page cache with
//! `FUSE_NOTIFY_STORE` (the contents come from the working-set file, read sequentially). Forks
//! mapping the file then find those pages cached: no FUSE read round trip for them, in any
//! fork. With passthrough the kernel reads the backing file itself and nothing is pushed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{INodeNo, Notifier};

use crate::working_set::WorkingSet;

/// Pages pushed per notification.
const STORE_PAGES: u64 = 32;

/// Pushes working sets into memory files' page caches, once per inode.
#[derive(Debug, Default)]
pub struct Warmer {
    notifier: OnceLock<Notifier>,
    warmed: Mutex<HashSet<u64>>,
}

impl Warmer {
    /// The mount's notification channel, once the session exists.
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Pushes `set` into inode `ino`'s page cache in the background, unless done before.
    pub fn warm(self: &Arc<Self>, ino: u64, snapshot: &str, set: Arc<WorkingSet>) {
        let first = self
            .warmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino);
        if !first || self.notifier.get().is_none() {
            return;
        }
        let (warmer, name) = (self.clone(), snapshot.to_owned());
        let spawned = std::thread::Builder::new()
            .name("pagerd-fuse-warm".into())
            .spawn(move || warmer.push(ino, &name, &set));
        if let Err(e) = spawned {
            tracing::warn!(%snapshot, error = %e, "cannot start warming the memory file's page cache");
        }
    }

    fn push(&self, ino: u64, snapshot: &str, set: &WorkingSet) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let mut pages = 0u64;
        for (i, run) in set.runs().iter().enumerate().filter(|(_, r)| !r.zero) {
            let mut done = 0;
            while done < u64::from(run.pages) {
                let n = STORE_PAGES.min(u64::from(run.pages) - done);
                let Some(bytes) = set.data(i, done, n) else {
                    return;
                };
                if let Err(e) = notifier.store(INodeNo(ino), (run.page + done) * 4096, bytes) {
                    // ENOENT: the kernel forgot the inode (every handle closed); next open again.
                    tracing::debug!(%snapshot, error = %e, "stopped warming the memory file's page cache");
                    self.warmed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&ino);
                    return;
                }
                done += n;
                pages += n;
            }
        }
        tracing::info!(%snapshot, pages, "memory file's page cache warmed with the working set");
    }
}
