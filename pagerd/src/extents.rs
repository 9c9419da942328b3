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

/// The size of the pages [`read_data`] aligns to.
pub const PAGE: u64 = 4096;
/// The most bytes [`read_data`] hands over at once.
const CHUNK: u64 = 1 << 20;

/// Reads the data of the first `size` bytes of `file` (a whole number of 4 KiB pages), holes
/// skipped, in page-aligned pieces of at most 1 MiB: `each(offset, bytes)` in file order.
/// Data that is gone by the time it is read (the file shrank meanwhile) is `UnexpectedEof`.
pub fn read_data(
    file: &File,
    size: u64,
    mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; CHUNK as usize];
    for extent in data_extents(file, size)? {
        let end = extent.end.div_ceil(PAGE).saturating_mul(PAGE).min(size);
        let mut offset = extent.start - extent.start % PAGE;
        while offset < end {
            let len = usize::try_from((end - offset).min(CHUNK)).unwrap_or(buf.len());
            let bytes = &mut buf[..len];
            file.read_exact_at(bytes, offset)?;
            each(offset, bytes)?;
            offset += len as u64;
        }
    }
    Ok(())
}

/// Whether a page holds only zeros.
pub fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
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

    #[test]
    fn data_is_read_page_aligned_in_order_and_holes_are_skipped() {
        let file = tempfile::tempfile().unwrap();
        let size = 8u64 << 20;
        file.set_len(size).unwrap();
        file.write_all_at(&[1, 2, 3], (3 << 20) + 10).unwrap();
        file.write_all_at(&[4; 4096], 6 << 20).unwrap();
        let mut pieces = Vec::new();
        read_data(&file, size, |offset, bytes| {
            pieces.push((
                offset,
                bytes.len(),
                bytes.iter().map(|&b| u64::from(b)).sum::<u64>(),
            ));
            Ok(())
        })
        .unwrap();
        assert!(pieces
            .iter()
            .all(|(offset, len, _)| offset % PAGE == 0 && *len as u64 % PAGE == 0));
        assert!(
            pieces.windows(2).all(|w| w[0].0 + w[0].1 as u64 <= w[1].0),
            "{pieces:?}"
        );
        let read: u64 = pieces.iter().map(|p| p.1 as u64).sum();
        assert!(read < size / 2, "holes are not read: {read} bytes");
        assert_eq!(pieces.iter().map(|p| p.2).sum::<u64>(), 6 + 4 * 4096);
    }
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
