//! The mount point: finding and removing mounts a crashed daemon left behind, and sizing the
//! mount's readahead.
//!
//! A daemon that dies leaves its FUSE mount in place with the connection gone: every access
//! answers `ENOTCONN`. The state directory's lock guarantees no other daemon owns a mount
//! there, so anything mounted on the mount point at start is stale and is detached
//! (`MNT_DETACH`: processes that still hold files of it keep them).

use std::io;
use std::path::{Path, PathBuf};

/// How many mounts stacked on one mount point are removed at most.
const MAX_STACKED: usize = 16;

/// The absolute path of `path`, resolving its parent only (the last component may be a dead
/// mount that cannot be resolved).
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mount point has no name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize()?,
        _ => std::env::current_dir()?,
    };
    Ok(parent.join(name))
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The device (major, minor) of the topmost mount at `path` (absolute), read from
/// `/proc/self/mountinfo` so that nothing is asked of the filesystem itself.
pub fn mounted_device(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let wanted = path.to_string_lossy();
    Ok(mountinfo
        .lines()
        .rev()
        .filter_map(|line| {
            let mut fields = line.split(' ').skip(2);
            let device = fields.next()?;
            let mount_point = fields.nth(1)?;
            (unescape(mount_point) == wanted).then_some(device)
        })
        .next()
        .and_then(|device| {
            let (major, minor) = device.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        }))
}

/// Detaches everything mounted at `path` (absolute); returns how many mounts went.
pub fn detach_all(path: &Path) -> io::Result<usize> {
    let mut detached = 0;
    while detached < MAX_STACKED && mounted_device(path)?.is_some() {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot detach {}: {e}", path.display()),
            )
        })?;
        detached += 1;
    }
    Ok(detached)
}

/// Sets the readahead of the mounted filesystem at `path` (its backing device info in sysfs).
pub fn set_readahead_kib(path: &Path, kib: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    std::fs::write(&knob, kib.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{knob}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape("/plain\\"), "/plain\\");
        assert_eq!(unescape("/x\\9zz"), "/x\\9zz");
    }

    #[test]
    fn the_root_is_mounted_and_a_fresh_directory_is_not() {
        assert!(mounted_device(Path::new("/")).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        assert!(mounted_device(dir.path()).unwrap().is_none());
        assert_eq!(detach_all(dir.path()).unwrap(), 0);
    }
}
