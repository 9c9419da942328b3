//! Console logs, capped: the hypervisor writes its stdout straight into `console.log`
//! (opened for appending, so it survives a pagerd restart without a pipe to break); every
//! second pagerd looks at the size, and a log past the cap is copied to `console.log.1`
//! and truncated (a copy-truncate rotation: a line written between the copy and the
//! truncate can be lost). At most twice the cap is kept per VM. [`tail`] reads the last
//! lines of a log, for a hypervisor that ended while starting.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
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

/// The last `lines` lines of the log at `path`, from at most its last `bytes` bytes (a line
/// cut by that limit is left out unless it is the only one, and then only its end is kept);
/// bytes that are not UTF-8 are replaced. A missing log has no lines.
pub(crate) fn tail(path: &Path, lines: usize, bytes: u64) -> io::Result<String> {
    let mut file = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    // With one byte before the window: whether it ends a line says if the first one is whole.
    let cut = size > bytes;
    let start = if cut { size - bytes - 1 } else { 0 };
    file.seek(SeekFrom::Start(start))?;
    let mut read = Vec::new();
    file.take(bytes.saturating_add(1)).read_to_end(&mut read)?;
    let mut window = read.as_slice();
    if cut {
        if let Some((&before, rest)) = window.split_first() {
            window = rest;
            let first_newline = window.iter().position(|&b| b == b'\n');
            if let Some(at) = first_newline.filter(|&at| before != b'\n' && at + 1 < window.len()) {
                window = &window[at + 1..];
            }
        }
    }
    let text = String::from_utf8_lossy(window);
    let kept: Vec<&str> = text.lines().collect();
    let from = kept.len().saturating_sub(lines);
    Ok(kept[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn the_tail_is_the_last_whole_lines_within_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(super::tail(&path, 20, 4096).unwrap(), "", "no log yet");
        let text: String = (1..=30).map(|n| format!("line {n}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let expected: Vec<String> = (11..=30).map(|n| format!("line {n}")).collect();
        assert_eq!(super::tail(&path, 20, 4096).unwrap(), expected.join("\n"));
        // 24 bytes are the last three lines exactly; 26 reach into "line 27\n", which is
        // left out.
        for bytes in [24, 26] {
            assert_eq!(
                super::tail(&path, 20, bytes).unwrap(),
                "line 28\nline 29\nline 30"
            );
        }
        assert_eq!(super::tail(&path, 2, 4096).unwrap(), "line 29\nline 30");
        std::fs::write(&path, b"no newline at all, \xff and long").unwrap();
        assert_eq!(super::tail(&path, 20, 8).unwrap(), "and long");
        assert_eq!(
            super::tail(&path, 20, 4096).unwrap(),
            "no newline at all, \u{fffd} and long"
        );
    }

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
