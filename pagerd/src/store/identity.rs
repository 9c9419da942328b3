//! Noticing that a memory file changed after registration.
//!
//! Each snapshot's metadata records its memory file's [`FileIdentity`] (device, inode, size,
//! modification and change times in nanoseconds), taken once the file is in place. A copy is
//! pagerd's own file and should never change; a linked file is the caller's, who promised
//! never to write it again ([`super::import::ImportMode::Link`]). Any difference means that
//! promise, or the state directory, was broken: the snapshot is marked damaged.
//!
//! The change time catches writes that reset the modification time, at the price of also
//! counting `chmod`, `chown`, and adding or removing names of a linked file as changes.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

pub use proto::model::FileIdentity;

const NS_PER_S: i64 = 1_000_000_000;

/// Taking and comparing [`FileIdentity`]s.
pub trait FileIdentityExt: Sized {
    /// The identity of an open file (`fstat`).
    fn of(file: &File) -> io::Result<Self>;

    /// The identity in a file's metadata.
    fn from_metadata(meta: &std::fs::Metadata) -> Self;

    /// What differs between `self` (recorded) and `now`; `None` if nothing does.
    fn changes(&self, now: &Self) -> Option<FileChanges>;
}

/// One way a file differs from its recorded identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Another file is in its place.
    Inode {
        /// `(dev, ino)` recorded.
        recorded: (u64, u64),
        /// `(dev, ino)` now.
        now: (u64, u64),
    },
    /// Its size.
    Size {
        /// Recorded.
        recorded: u64,
        /// Now.
        now: u64,
    },
    /// Its modification time, ns since the epoch.
    Mtime {
        /// Recorded.
        recorded: i64,
        /// Now.
        now: i64,
    },
    /// Its change time, ns since the epoch.
    Ctime {
        /// Recorded.
        recorded: i64,
        /// Now.
        now: i64,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Inode { recorded, now } => write!(
                f,
                "inode {}:{}→{}:{} (another file is in its place)",
                recorded.0, recorded.1, now.0, now.1
            ),
            Self::Size { recorded, now } => write!(f, "size {recorded}→{now}"),
            Self::Mtime { recorded, now } => {
                write!(f, "mtime {}→{}", seconds(recorded), seconds(now))
            }
            Self::Ctime { recorded, now } => {
                write!(f, "ctime {}→{}", seconds(recorded), seconds(now))
            }
        }
    }
}

/// Every way a file differs from its recorded identity (at least one), shown as
/// `size A→B, mtime …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChanges(Vec<Change>);

impl From<Vec<Change>> for FileChanges {
    fn from(changes: Vec<Change>) -> Self {
        Self(changes)
    }
}

impl fmt::Display for FileChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, change) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            change.fmt(f)?;
        }
        Ok(())
    }
}

impl FileIdentityExt for FileIdentity {
    fn of(file: &File) -> io::Result<Self> {
        Ok(Self::from_metadata(&file.metadata()?))
    }

    fn from_metadata(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(NS_PER_S)
                .saturating_add(meta.mtime_nsec()),
            ctime_ns: meta
                .ctime()
                .saturating_mul(NS_PER_S)
                .saturating_add(meta.ctime_nsec()),
        }
    }

    fn changes(&self, now: &Self) -> Option<FileChanges> {
        let mut changes = Vec::new();
        if self.dev != now.dev || self.ino != now.ino {
            changes.push(Change::Inode {
                recorded: (self.dev, self.ino),
                now: (now.dev, now.ino),
            });
        }
        if self.size != now.size {
            changes.push(Change::Size {
                recorded: self.size,
                now: now.size,
            });
        }
        if self.mtime_ns != now.mtime_ns {
            changes.push(Change::Mtime {
                recorded: self.mtime_ns,
                now: now.mtime_ns,
            });
        }
        if self.ctime_ns != now.ctime_ns {
            changes.push(Change::Ctime {
                recorded: self.ctime_ns,
                now: now.ctime_ns,
            });
        }
        (!changes.is_empty()).then_some(FileChanges(changes))
    }
}

/// Nanoseconds since the epoch as `seconds.nanoseconds`.
fn seconds(ns: i64) -> String {
    format!("{}.{:09}", ns.div_euclid(NS_PER_S), ns.rem_euclid(NS_PER_S))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_is_noticed_and_an_untouched_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let before = FileIdentity::of(&File::open(&path).unwrap()).unwrap();
        assert_eq!(
            before.changes(&FileIdentity::of(&File::open(&path).unwrap()).unwrap()),
            None
        );
        std::fs::write(&path, vec![2u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let modified = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_000_000_007);
        file.set_modified(modified).unwrap();
        let after = FileIdentity::of(&file).unwrap();
        let changes = before.changes(&after).unwrap();
        assert_eq!(
            changes.0[0],
            Change::Size {
                recorded: 8192,
                now: 4096
            }
        );
        let changes = changes.to_string();
        assert!(
            changes.starts_with("size 8192→4096, mtime ") && changes.contains("→1.000000007"),
            "{changes}"
        );
        assert_eq!(seconds(1_500_000_000_000_000_007), "1500000000.000000007");
    }
}
