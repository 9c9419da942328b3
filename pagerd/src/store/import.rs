//! Bringing a memory file into the state directory: a hardlink when it is on the same
//! filesystem, else a reflink (`FICLONE`) where the filesystem supports it, else a copy.
//! The result is made read-only (mode 0444); with a hardlink that is the caller's file too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub use proto::model::ImportMethod;

/// `ioctl(dst, FICLONE, src)`.
fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its argument and touches no memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Brings `src` in as `dst` (which must not exist) and makes it read-only.
pub fn import(src: &Path, dst: &Path) -> io::Result<ImportMethod> {
    let method = match std::fs::hard_link(src, dst) {
        Ok(()) => ImportMethod::Hardlink,
        Err(e)
            if e.raw_os_error() == Some(libc::EXDEV)
                || e.kind() == io::ErrorKind::PermissionDenied =>
        {
            clone_or_copy(src, dst)?
        }
        Err(e) => return Err(e),
    };
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o444))?;
    File::open(dst)?.sync_all()?;
    Ok(method)
}

fn clone_or_copy(src: &Path, dst: &Path) -> io::Result<ImportMethod> {
    let source = File::open(src)?;
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)?;
    let result = match reflink(&source, &target) {
        Ok(()) => Ok(ImportMethod::Reflink),
        Err(_) => copy_all(&source, &target).map(|()| ImportMethod::Copy),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_all(source: &File, target: &File) -> io::Result<()> {
    let mut reader = source;
    let mut writer = target;
    io::copy(&mut reader, &mut writer)?;
    target.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardlinks_on_the_same_filesystem_and_makes_it_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![7u8; 8192]).unwrap();
        let dst = dir.path().join("dst");
        assert_eq!(import(&src, &dst).unwrap(), ImportMethod::Hardlink);
        assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; 8192]);
        assert_eq!(
            std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
            0o444
        );
    }

    #[test]
    fn copies_across_filesystems() {
        let src_dir = tempfile::tempdir().unwrap();
        let src = src_dir.path().join("src");
        std::fs::write(&src, vec![9u8; 4096]).unwrap();
        let dst_dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let dst = dst_dir.path().join("dst");
        let method = import(&src, &dst).unwrap();
        assert_ne!(method, ImportMethod::Hardlink);
        assert_eq!(std::fs::read(&dst).unwrap(), vec![9u8; 4096]);
    }
}
