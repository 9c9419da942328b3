//! Files only root can change: the test a program must pass before root pagerd executes it
//! (an upgrade), and a memory file before pagerd links it instead of copying it.
//!
//! A file is trusted when it and every directory above it are owned by root (or by pagerd's
//! own user) and writable by nobody else: no group or other write bit. One exception keeps
//! `/tmp`-style directories usable: a root-owned directory with the sticky bit may be writable
//! by everyone, because nobody but root can then rename or remove the root-owned entry below
//! it. The decision ([`verdict`]) is pure; [`check_path`] and [`check_open_file`] read the
//! metadata it decides on.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The mode bits that let someone other than the owner write.
const GROUP_OR_OTHER_WRITE: u32 = 0o022;
/// The sticky bit: in such a directory only an entry's owner (or the directory's) may rename
/// or remove it.
const STICKY: u32 = 0o1000;

/// Why a file is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Untrusted {
    /// Owned by someone other than root or pagerd's user.
    #[error("{path} is owned by uid {uid}, not by root")]
    Owner {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Writable by a group or by others.
    #[error("{path} is writable by others than its owner (mode {mode:o})")]
    Writable {
        /// The file or directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// Its metadata or its path cannot be read.
    #[error("{path}: {why}")]
    Unreadable {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// Whether `uid` is one pagerd trusts with its own files: root, or the daemon's own user.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Owner and mode of one file or directory, as [`verdict`] needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Owner.
    pub uid: u32,
    /// Mode bits (permissions, sticky).
    pub mode: u32,
}

impl From<&Metadata> for Entry {
    fn from(meta: &Metadata) -> Self {
        Self {
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Decides on a file (`file`, at `path`) and the directories above it, from the root down
/// (`ancestors[0]` is `/`). A writable directory is accepted only if it is root's and sticky
/// and the entry below it is trusted, so nobody else can replace that entry.
pub(crate) fn verdict(
    path: &Path,
    file: Entry,
    ancestors: &[(PathBuf, Entry)],
) -> Result<(), Untrusted> {
    let owned = |p: &Path, e: Entry| {
        if trusted_owner(e.uid) {
            Ok(())
        } else {
            Err(Untrusted::Owner {
                path: p.to_owned(),
                uid: e.uid,
            })
        }
    };
    owned(path, file)?;
    if file.mode & GROUP_OR_OTHER_WRITE != 0 {
        return Err(Untrusted::Writable {
            path: path.to_owned(),
            mode: file.mode,
        });
    }
    for (dir, entry) in ancestors {
        owned(dir, *entry)?;
        let sticky_root = entry.uid == 0 && entry.mode & STICKY != 0;
        if entry.mode & GROUP_OR_OTHER_WRITE != 0 && !sticky_root {
            return Err(Untrusted::Writable {
                path: dir.clone(),
                mode: entry.mode,
            });
        }
    }
    Ok(())
}

/// The directories above `path` (canonical: no symlinks, no `..`), from `/` down, with their
/// owners and modes.
fn ancestors_of(path: &Path) -> Result<Vec<(PathBuf, Entry)>, Untrusted> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    dirs.into_iter()
        .map(|dir| {
            std::fs::symlink_metadata(dir)
                .map(|meta| (dir.to_owned(), Entry::from(&meta)))
                .map_err(|e| Untrusted::Unreadable {
                    path: dir.to_owned(),
                    why: e.to_string(),
                })
        })
        .collect()
}

/// Opens the regular file at `path` (symlinks resolved first, so the directories checked are
/// the real ones) if it and every directory above it are trusted. The open file is what the
/// caller must use from then on: nobody else could have swapped it since.
pub(crate) fn open_trusted(path: &Path) -> Result<(PathBuf, File), Untrusted> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |p: &Path, e: std::io::Error| Untrusted::Unreadable {
        path: p.to_owned(),
        why: e.to_string(),
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| unreadable(path, e))?;
    let ancestors = ancestors_of(&canonical)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&canonical)
        .map_err(|e| unreadable(&canonical, e))?;
    let meta = file.metadata().map_err(|e| unreadable(&canonical, e))?;
    if !meta.is_file() {
        return Err(Untrusted::NotRegular(canonical));
    }
    verdict(&canonical, Entry::from(&meta), &ancestors)?;
    Ok((canonical, file))
}

/// Checks an already open file (`file`, named `name` by whoever opened it): the file itself
/// and the directories above the path it has now (`/proc/self/fd`). A file with no name left
/// (deleted) is not trusted.
pub(crate) fn check_open_file(file: &File, name: &Path) -> Result<(), Untrusted> {
    use std::os::fd::AsRawFd;
    let unreadable = |e: std::io::Error| Untrusted::Unreadable {
        path: name.to_owned(),
        why: e.to_string(),
    };
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(Untrusted::NotRegular(name.to_owned()));
    }
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(unreadable)?;
    if !link.is_absolute() || link.to_string_lossy().ends_with(" (deleted)") {
        return Err(Untrusted::Unreadable {
            path: name.to_owned(),
            why: "the file has no name left to check".into(),
        });
    }
    verdict(&link, Entry::from(&meta), &ancestors_of(&link)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uid: u32, mode: u32) -> Entry {
        Entry { uid, mode }
    }

    fn dirs(entries: &[(&str, Entry)]) -> Vec<(PathBuf, Entry)> {
        entries
            .iter()
            .map(|(p, e)| (PathBuf::from(p), *e))
            .collect()
    }

    const MEMBER: u32 = 65534;

    #[test]
    fn root_files_in_root_directories_are_trusted() {
        let up = dirs(&[("/", entry(0, 0o755)), ("/usr", entry(0, 0o755))]);
        assert_eq!(
            verdict(Path::new("/usr/pagerd"), entry(0, 0o755), &up),
            Ok(())
        );
    }

    #[test]
    fn another_owner_anywhere_is_refused() {
        let up = dirs(&[("/", entry(0, 0o755)), ("/home/m", entry(MEMBER, 0o755))]);
        assert!(matches!(
            verdict(Path::new("/home/m/x"), entry(0, 0o755), &up),
            Err(Untrusted::Owner { uid: MEMBER, .. })
        ));
        let up = dirs(&[("/", entry(0, 0o755))]);
        assert!(matches!(
            verdict(Path::new("/x"), entry(MEMBER, 0o755), &up),
            Err(Untrusted::Owner { uid: MEMBER, .. })
        ));
    }

    #[test]
    fn group_or_other_write_is_refused_on_the_file_and_on_directories() {
        let up = dirs(&[("/", entry(0, 0o755))]);
        for mode in [0o775, 0o757, 0o666] {
            assert!(
                matches!(
                    verdict(Path::new("/x"), entry(0, mode), &up),
                    Err(Untrusted::Writable { .. })
                ),
                "{mode:o}"
            );
        }
        let up = dirs(&[("/", entry(0, 0o755)), ("/shared", entry(0, 0o775))]);
        assert!(matches!(
            verdict(Path::new("/shared/x"), entry(0, 0o755), &up),
            Err(Untrusted::Writable { .. })
        ));
    }

    #[test]
    fn a_sticky_world_writable_directory_is_trusted_only_when_roots() {
        let tmp = dirs(&[("/", entry(0, 0o755)), ("/tmp", entry(0, 0o1777))]);
        assert_eq!(verdict(Path::new("/tmp/x"), entry(0, 0o755), &tmp), Ok(()));
        let not_sticky = dirs(&[("/", entry(0, 0o755)), ("/tmp", entry(0, 0o777))]);
        assert!(verdict(Path::new("/tmp/x"), entry(0, 0o755), &not_sticky).is_err());
        let members = dirs(&[("/", entry(0, 0o755)), ("/t", entry(MEMBER, 0o1777))]);
        assert!(verdict(Path::new("/t/x"), entry(0, 0o755), &members).is_err());
    }

    #[test]
    fn open_trusted_resolves_symlinks_and_refuses_a_writable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prog");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let (canonical, _) = open_trusted(&link).unwrap();
        assert_eq!(canonical, std::fs::canonicalize(&file).unwrap());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            open_trusted(&link),
            Err(Untrusted::Writable { .. })
        ));
        assert!(matches!(
            open_trusted(dir.path()),
            Err(Untrusted::NotRegular(_))
        ));
    }
}
