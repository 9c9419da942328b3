//! Console logs, capped: the hypervisor writes its stdout straight into `console.log`
//! (opened for appending, so it survives a pagerd restart without a pipe to break); every
//! second pagerd looks at the size, and a log past the cap is copied to `console.log.1`
//! and truncated (a copy-truncate rotation: a line written between the copy and the
//! truncate can be lost). At most twice the cap is kept per VM.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens (creating) a console log for the hypervisor to append to, mode 0600.
pub(crate) fn open(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Rotates `path` if it is larger than `cap` bytes. Returns whether it did.
pub(crate) fn cap(path: &Path, cap: u64) -> io::Result<bool> {
    let size = std::fs::symlink_metadata(path)?.len();
    if size <= cap {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    File::options()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn a_log_past_its_cap_is_rotated_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = super::open(&path).unwrap();
        log.write_all(&[b'a'; 100]).unwrap();
        assert!(!super::cap(&path, 100).unwrap());
        log.write_all(b"b").unwrap();
        assert!(super::cap(&path, 100).unwrap());
        log.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1"))
                .unwrap()
                .len(),
            101
        );
    }
}
