//! Inode numbers of the FUSE view.
//!
//! ```text
//! 1  /                      (root)
//! 2  /snapshots
//! n  /snapshots/<id>        one pair per snapshot *instance*
//! n+1 /snapshots/<id>/memory
//! ```
//!
//! A snapshot deleted and registered again under the same id is a different file, so it gets
//! new inode numbers: the kernel caches pages per inode (keep-cache), and an old number must
//! never show new bytes. Nodes hold snapshots weakly; a deleted snapshot's nodes answer
//! `ENOENT`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::snapshot::Snapshot;
use proto::SnapshotId;

/// The root directory.
pub const ROOT: u64 = 1;
/// `/snapshots`.
pub const SNAPSHOTS: u64 = 2;
const FIRST_SNAPSHOT: u64 = 16;

/// What an inode is.
#[derive(Debug, Clone)]
pub enum Node {
    /// `/`.
    Root,
    /// `/snapshots`.
    Snapshots,
    /// `/snapshots/<id>`.
    SnapshotDir(Weak<Snapshot>),
    /// `/snapshots/<id>/memory`.
    Memory(Weak<Snapshot>),
}

#[derive(Debug, Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    /// The directory inode of the latest instance seen of each snapshot id.
    dirs: HashMap<SnapshotId, (Weak<Snapshot>, u64)>,
    next: u64,
}

/// Inode numbers, allocated as snapshots are first looked up.
#[derive(Debug, Default)]
pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    /// A table with the two fixed directories.
    pub fn new() -> Self {
        let mut table = Table {
            next: FIRST_SNAPSHOT,
            ..Table::default()
        };
        table.nodes.insert(ROOT, Node::Root);
        table.nodes.insert(SNAPSHOTS, Node::Snapshots);
        Self {
            table: Mutex::new(table),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inode, if it exists.
    pub fn node(&self, ino: u64) -> Option<Node> {
        self.lock().nodes.get(&ino).cloned()
    }

    /// The directory inode of this snapshot instance (the memory file is the next number).
    pub fn snapshot_dir(&self, snapshot: &Arc<Snapshot>) -> u64 {
        let mut table = self.lock();
        if let Some((known, ino)) = table.dirs.get(snapshot.id()) {
            if known.as_ptr() == Arc::as_ptr(snapshot) {
                return *ino;
            }
        }
        let ino = table.next;
        table.next += 2;
        let weak = Arc::downgrade(snapshot);
        table.nodes.insert(ino, Node::SnapshotDir(weak.clone()));
        table.nodes.insert(ino + 1, Node::Memory(weak.clone()));
        table.dirs.insert(snapshot.id().clone(), (weak, ino));
        ino
    }
}
