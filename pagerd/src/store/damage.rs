//! Why a snapshot in the state directory cannot be served, and why a file cannot be linked
//! into it: typed reasons whose `Display` is the message answers and logs carry.
//!
//! ```text
//! Damage ─┬─ UnreadableRecord { path, RecordProblem }   snapshot.json unreadable or wrong
//!         ├─ Unmappable(SnapshotError)                  the memory file cannot be mapped
//!         ├─ SizeMismatch { actual, recorded }          mapped, but not the recorded size
//!         ├─ Changed(FileChanges)                       its identity differs (identity.rs)
//!         └─ Uninspectable(io::Error)                   its fstat failed
//! NotLinkable ─┬─ Unreadable(io::Error)                 the state directory's fstat failed
//!              └─ OtherFilesystem                       a hard link cannot reach it
//! ```
//!
//! A damaged snapshot keeps its reason until it is removed, so the reasons are `Clone`;
//! errors that are not are shared.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use proto::SnapshotId;

use super::identity::FileChanges;
use crate::snapshot::SnapshotError;

/// Why a snapshot is damaged: kept on disk, reported, never forked.
#[derive(Debug, Clone)]
pub enum Damage {
    /// Its metadata record cannot be used.
    UnreadableRecord {
        /// The record (`snapshot.json`).
        path: PathBuf,
        /// What is wrong with it.
        problem: RecordProblem,
    },
    /// Its memory file cannot be mapped.
    Unmappable(Arc<SnapshotError>),
    /// Its memory file is not the size recorded.
    SizeMismatch {
        /// The size now.
        actual: u64,
        /// The size recorded.
        recorded: u64,
    },
    /// Its memory file changed after registration.
    Changed(FileChanges),
    /// Its memory file's identity cannot be read (`fstat` failed).
    Uninspectable(Arc<io::Error>),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnreadableRecord { path, problem } => write!(f, "{}: {problem}", path.display()),
            Self::Unmappable(e) => f.write_str(&crate::errors::error_chain(e.as_ref())),
            Self::SizeMismatch { actual, recorded } => {
                write!(f, "memory file is {actual} bytes, recorded {recorded}")
            }
            Self::Changed(changes) => {
                write!(f, "memory file changed after registration ({changes})")
            }
            Self::Uninspectable(e) => write!(f, "cannot inspect the memory file: {e}"),
        }
    }
}

/// What is wrong with a snapshot's metadata record.
#[derive(Debug, Clone)]
pub enum RecordProblem {
    /// It cannot be read.
    Read(Arc<io::Error>),
    /// It is not valid metadata.
    Parse(Arc<serde_json::Error>),
    /// It describes another snapshot than its directory's.
    NamesAnother(SnapshotId),
}

impl fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => e.fmt(f),
            Self::Parse(e) => e.fmt(f),
            Self::NamesAnother(id) => write!(f, "it names snapshot `{id}`"),
        }
    }
}

/// Why a file cannot be linked into the state directory.
#[derive(Debug)]
pub enum NotLinkable {
    /// The state directory's snapshots cannot be inspected.
    Unreadable(io::Error),
    /// The file is on another filesystem.
    OtherFilesystem,
}

impl fmt::Display for NotLinkable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(e) => e.fmt(f),
            Self::OtherFilesystem => f.write_str(
                "it is on another filesystem than the state directory; a link needs the same \
                 one (register it without link to copy it)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::identity::Change;

    #[test]
    fn reasons_read_as_the_messages_they_replace() {
        let changed = Damage::Changed(FileChanges::from(vec![Change::Size {
            recorded: 8192,
            now: 4096,
        }]));
        assert_eq!(
            changed.to_string(),
            "memory file changed after registration (size 8192→4096)"
        );
        let size = Damage::SizeMismatch {
            actual: 4096,
            recorded: 8192,
        };
        assert_eq!(size.to_string(), "memory file is 4096 bytes, recorded 8192");
        let record = Damage::UnreadableRecord {
            path: "/s/snapshots/a/snapshot.json".into(),
            problem: RecordProblem::NamesAnother("b".parse().unwrap()),
        };
        assert_eq!(
            record.to_string(),
            "/s/snapshots/a/snapshot.json: it names snapshot `b`"
        );
        assert!(NotLinkable::OtherFilesystem
            .to_string()
            .starts_with("it is on another filesystem"));
    }
}
