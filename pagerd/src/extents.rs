//! Where a file's data is: its data extents, found with `SEEK_DATA` / `SEEK_HOLE`, so that
//! holes (which read as zeros) are neither read nor copied.

use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// The data extents of the first `size` bytes of `file`, as `start..end` byte ranges in
/// order; everything between them is a hole. A filesystem that cannot tell reports one
/// extent covering everything. The descriptor's file offset (which a descriptor passed by a
/// client shares with that client) is put back afterwards.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
    let saved = lseek(file, 0, Whence::SeekCur)?;
    let found = find(file, size);
    lseek(file, saved, Whence::SeekSet)?;
    found
}

fn find(file: &File, size: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
    let whole = || Ok(std::iter::once(0..size).collect());
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let at = i64::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(data) => data.unsigned_abs(),
            // No data after `offset`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if extents.is_empty() => return whole(),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let data_at = i64::try_from(data).map_err(|_| Errno::EOVERFLOW)?;
        let hole = match lseek(file, data_at, Whence::SeekHole) {
            Ok(hole) => hole.unsigned_abs().min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        extents.push(data..hole);
        offset = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_skipped_and_the_offset_is_kept() {
        let mut file = tempfile::tempfile().unwrap();
        let mib = 1 << 20;
        file.set_len(4 * mib).unwrap();
        file.write_all_at(&[1u8; 4096], mib).unwrap();
        file.write_all_at(&[2u8; 4096], 3 * mib).unwrap();
        io::Seek::seek(&mut file, io::SeekFrom::Start(77)).unwrap();
        let extents = data_extents(&file, 4 * mib).unwrap();
        let covered: u64 = extents.iter().map(|r| r.end - r.start).sum();
        assert!(covered < 4 * mib, "holes were found: {extents:?}");
        for at in [mib, 3 * mib] {
            assert!(extents.iter().any(|r| r.contains(&at)), "{at}: {extents:?}");
        }
        assert_eq!(io::Seek::stream_position(&mut file).unwrap(), 77);
    }
}
