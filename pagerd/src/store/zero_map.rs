//! A snapshot's zero map, stored beside it so that a start reads no snapshot data.
//!
//! Registration learns which 4 KiB pages of the memory file are all zeros (holes skipped,
//! data read once). That map is written to `snapshots/<id>/zero-map` with the identity of the
//! memory file it describes; a start loads it instead of reading the file again, if the file
//! still has that identity and the map passes its checks. Anything else (no map, another
//! identity, a damaged map) is a fresh scan, whose map is stored again.
//!
//! ```text
//!  0   magic "PAGERDZM" · version u32 · 0 u32
//!  16  the memory file's identity: dev, ino, size (u64) · mtime_ns, ctime_ns (i64)
//!  56  pages u64 · runs u64
//!  72  runs of zero pages: start u64 · end u64, in order, disjoint, inside `pages`
//!  end CRC-32 of everything before it (u32)
//! ```
//!
//! Little endian throughout.

use std::ops::Range;

use super::identity::FileIdentity;
use crate::bitmap::Bitmap;

/// The file's name in a snapshot's directory.
pub const FILE_NAME: &str = "zero-map";
const MAGIC: &[u8; 8] = b"PAGERDZM";
const VERSION: u32 = 1;
const HEADER: usize = 72;
const RUN: usize = 16;

/// The stored form of `map`, the zero map of the memory file with `identity`.
pub fn encode(identity: &FileIdentity, map: &Bitmap) -> Vec<u8> {
    let runs = map.set_runs();
    let mut out = Vec::with_capacity(HEADER + runs.len() * RUN + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for field in [identity.dev, identity.ino, identity.size] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    for field in [identity.mtime_ns, identity.ctime_ns] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(&map.len().to_le_bytes());
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for run in &runs {
        out.extend_from_slice(&run.start.to_le_bytes());
        out.extend_from_slice(&run.end.to_le_bytes());
    }
    let sum = crc32fast::hash(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The map stored in `bytes`, if they are an intact map of `pages` pages of the memory file
/// with `identity`.
pub fn decode(bytes: &[u8], identity: &FileIdentity, pages: u64) -> Option<Bitmap> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body) != u32::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let mut fields = Fields(body.get(8..)?);
    let header_ok = body.get(..8)? == MAGIC
        && fields.u32()? == VERSION
        && fields.u32()? == 0
        && fields.u64()? == identity.dev
        && fields.u64()? == identity.ino
        && fields.u64()? == identity.size
        && fields.i64()? == identity.mtime_ns
        && fields.i64()? == identity.ctime_ns
        && fields.u64()? == pages;
    if !header_ok {
        return None;
    }
    let count = usize::try_from(fields.u64()?).ok()?;
    if fields.0.len() != count.checked_mul(RUN)? {
        return None;
    }
    let mut map = Bitmap::try_new(pages).ok()?;
    let mut previous_end = 0;
    for _ in 0..count {
        let run: Range<u64> = fields.u64()?..fields.u64()?;
        if run.start < previous_end || run.start >= run.end || run.end > pages {
            return None;
        }
        map.fill(run.start, run.end, true);
        previous_end = run.end;
    }
    Some(map)
}

/// Little-endian fields read off the front of a slice.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_at_checked(N)?;
        self.0 = rest;
        head.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> FileIdentity {
        FileIdentity {
            dev: 8,
            ino: 12,
            size: 1000 * 4096,
            mtime_ns: 5,
            ctime_ns: 6,
        }
    }

    fn map() -> Bitmap {
        let mut map = Bitmap::new(1000);
        map.fill(0, 10, true);
        map.fill(500, 1000, true);
        map.set(20);
        map
    }

    #[test]
    fn a_stored_map_loads_back_for_the_same_file_only() {
        let bytes = encode(&identity(), &map());
        assert_eq!(bytes.len(), HEADER + 3 * RUN + 4);
        assert_eq!(decode(&bytes, &identity(), 1000), Some(map()));
        let mut touched = identity();
        touched.ctime_ns += 1;
        assert_eq!(
            decode(&bytes, &touched, 1000),
            None,
            "the file changed since"
        );
        assert_eq!(decode(&bytes, &identity(), 999), None, "another size");
    }

    #[test]
    fn a_damaged_map_is_never_used() {
        let bytes = encode(&identity(), &map());
        for at in [0, 9, 20, 60, HEADER + 3, bytes.len() - 1] {
            let mut broken = bytes.clone();
            broken[at] ^= 0x40;
            assert_eq!(
                decode(&broken, &identity(), 1000),
                None,
                "byte {at} flipped"
            );
        }
        assert_eq!(decode(&bytes[..bytes.len() - 5], &identity(), 1000), None);
        assert_eq!(decode(&[], &identity(), 1000), None);
    }

    #[test]
    fn runs_out_of_order_or_out_of_range_are_refused_even_with_a_good_sum() {
        let reseal = |mut body: Vec<u8>| {
            body.truncate(body.len() - 4);
            let sum = crc32fast::hash(&body);
            body.extend_from_slice(&sum.to_le_bytes());
            body
        };
        let mut past_end = encode(&identity(), &map());
        // The last run's end (500..1000) moved past the map.
        let end_at = HEADER + 2 * RUN + 8;
        past_end[end_at..end_at + 8].copy_from_slice(&1001u64.to_le_bytes());
        assert_eq!(decode(&reseal(past_end), &identity(), 1000), None);
        let mut overlapping = encode(&identity(), &map());
        // The second run (20..21) starting inside the first (0..10).
        overlapping[HEADER + RUN..HEADER + RUN + 8].copy_from_slice(&5u64.to_le_bytes());
        assert_eq!(decode(&reseal(overlapping), &identity(), 1000), None);
    }
}
