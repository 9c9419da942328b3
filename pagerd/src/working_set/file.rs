//! The stored working set: one file beside the snapshot, its pages' contents contiguous.
//!
//! ```text
//!  0       header (4 KiB): magic "PAGERDWS", version, page size, snapshot size, forks recorded,
//!          time, counts, where the run table and the data start, CRC-32 of the run table, of
//!          the block sums and of the header itself
//!  4096    run table: per run  snapshot page (u64) · pages (u32) · flags (u32, bit 0: zeros)
//!  align   data: the contents of every non-zero run, in run order, 4 KiB per page
//!  then    block sums: CRC-32 (u32) of each 64 KiB block of the data (the last may be shorter)
//! ```
//!
//! The header, the run table and the block sums are checked when the file is loaded (and
//! runs that overlap or leave the snapshot refuse it whole); the data is checked block by block
//! before a block is first installed ([`super::WorkingSet::verify`]): a block that does not
//! match is never installed, its pages are served from the snapshot, and the set reports it.
//!
//! As REAP stores it: a fork from a cold page cache reads the whole set in one sequential
//! pass instead of one small read per fault. The file is written with
//! [`crate::store::atomic`]'s temp-fsync-rename, so a crash leaves the old file or the new
//! one; a file that fails any check is refused whole (and reported), never half used. Little
//! endian throughout.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;

use super::plan::{Plan, Run};

/// The first bytes of every working-set file.
const MAGIC: &[u8; 8] = b"PAGERDWS";
/// The format this daemon writes and reads.
pub const VERSION: u32 = 2;
/// Pages are always 4 KiB.
pub const PAGE: u64 = 4096;
/// Bytes per run-table entry.
const RUN_BYTES: u64 = 16;
/// Header bytes covered by its CRC (everything before the CRC itself).
const HEADER_CRC_AT: usize = 88;
/// Bytes of data per block sum.
pub const BLOCK: u64 = 64 * 1024;
/// The run flag for a run of zero pages (no data stored).
const FLAG_ZERO: u32 = 1;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Size of the snapshot the set belongs to.
    pub snapshot_size: u64,
    /// Forks merged.
    pub forks_recorded: u32,
    /// When it was written, ms since the Unix epoch.
    pub recorded_unix_ms: u64,
    /// Runs in the table.
    pub runs: u64,
    /// Pages in all runs.
    pub pages: u64,
    /// Of them, zero pages.
    pub zero_pages: u64,
    /// Byte offset of the data.
    pub data_offset: u64,
}

impl Header {
    /// Bytes of data (the non-zero runs' contents).
    pub fn data_bytes(&self) -> u64 {
        (self.pages - self.zero_pages) * PAGE
    }

    /// Data blocks, each with a sum.
    pub fn blocks(&self) -> u64 {
        self.data_bytes().div_ceil(BLOCK)
    }

    /// Where the block sums start.
    pub fn sums_offset(&self) -> u64 {
        self.data_offset + self.data_bytes()
    }

    /// The size a file with this header must have.
    pub fn file_size(&self) -> u64 {
        self.sums_offset() + self.blocks() * 4
    }
}

fn data_offset_for(runs: u64) -> u64 {
    (PAGE + runs * RUN_BYTES).div_ceil(PAGE) * PAGE
}

fn encode_runs(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_BYTES as usize);
    for run in runs {
        out.extend_from_slice(&run.page.to_le_bytes());
        out.extend_from_slice(&run.pages.to_le_bytes());
        out.extend_from_slice(&(if run.zero { FLAG_ZERO } else { 0 }).to_le_bytes());
    }
    out
}

fn encode_header(h: &Header, runs_crc: u32, sums_crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(PAGE as u32).to_le_bytes());
    out.extend_from_slice(&h.snapshot_size.to_le_bytes());
    out.extend_from_slice(&h.forks_recorded.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [
        h.recorded_unix_ms,
        h.runs,
        h.pages,
        h.zero_pages,
        PAGE,
        h.data_offset,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&runs_crc.to_le_bytes());
    out.extend_from_slice(&sums_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_CRC_AT);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(PAGE as usize, 0);
    out
}

/// Sums each [`BLOCK`] of a stream of data.
#[derive(Default)]
struct BlockSums {
    sums: Vec<u32>,
    hasher: crc32fast::Hasher,
    in_block: u64,
}

impl BlockSums {
    fn add(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = usize::try_from(BLOCK - self.in_block)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.in_block += take as u64;
            bytes = &bytes[take..];
            if self.in_block == BLOCK {
                self.finish_block();
            }
        }
    }

    fn finish_block(&mut self) {
        let hasher = std::mem::take(&mut self.hasher);
        self.sums.push(hasher.finalize());
        self.in_block = 0;
    }

    fn finish(mut self) -> Vec<u32> {
        if self.in_block > 0 {
            self.finish_block();
        }
        self.sums
    }
}

/// The sums as stored.
fn encode_sums(sums: &[u32]) -> Vec<u8> {
    sums.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Writes the file for `plan` to `out`: the header, the run table, each non-zero run's
/// contents as `read(snapshot offset, len)` returns them, and their block sums.
pub fn write(
    out: &File,
    plan: &Plan,
    header: &Header,
    mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<()> {
    let table = encode_runs(&plan.runs);
    let mut sums = BlockSums::default();
    let mut w = BufWriter::with_capacity(1 << 20, out);
    // The header, with the sums' checksum, is written last, over this.
    w.write_all(&[0; PAGE as usize])?;
    w.write_all(&table)?;
    let pad = header.data_offset - PAGE - table.len() as u64;
    w.write_all(&vec![0; pad as usize])?;
    for run in plan.runs.iter().filter(|r| !r.zero) {
        let len = usize::try_from(u64::from(run.pages) * PAGE).map_err(io::Error::other)?;
        let bytes = read(run.page * PAGE, len)?;
        if bytes.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the snapshot is shorter than the working set says",
            ));
        }
        sums.add(&bytes);
        w.write_all(&bytes)?;
    }
    let sums = encode_sums(&sums.finish());
    w.write_all(&sums)?;
    w.flush()?;
    drop(w);
    let head = encode_header(header, crc32fast::hash(&table), crc32fast::hash(&sums));
    out.write_all_at(&head, 0)
}

/// The header for a plan of a snapshot of `snapshot_size` bytes.
pub fn header_for(
    plan: &Plan,
    snapshot_size: u64,
    forks_recorded: u32,
    recorded_unix_ms: u64,
) -> Header {
    let runs = plan.runs.len() as u64;
    Header {
        snapshot_size,
        forks_recorded,
        recorded_unix_ms,
        runs,
        pages: plan.runs.iter().map(|r| u64::from(r.pages)).sum(),
        zero_pages: plan
            .runs
            .iter()
            .filter(|r| r.zero)
            .map(|r| u64::from(r.pages))
            .sum(),
        data_offset: data_offset_for(runs),
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// What a file holds besides its data: the header, the runs, and each data block's sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// The header.
    pub header: Header,
    /// The runs, in replay order.
    pub runs: Vec<Run>,
    /// CRC-32 of each [`BLOCK`] of data.
    pub sums: Vec<u32>,
}

/// Reads and checks the header, the run table and the block sums of `file` (its data is
/// mapped by the caller and checked block by block), for a snapshot of `snapshot_size` bytes.
pub fn read(file: &File, snapshot_size: u64) -> io::Result<Contents> {
    let mut head = vec![0u8; PAGE as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| invalid(format!("cannot read the header: {e}")))?;
    if &head[..8] != MAGIC {
        return Err(invalid("not a pagerd working-set file".into()));
    }
    let version = le_u32(&head, 8);
    if version != VERSION {
        return Err(invalid(format!(
            "format version {version}; this pagerd reads version {VERSION}"
        )));
    }
    if crc32fast::hash(&head[..HEADER_CRC_AT]) != le_u32(&head, HEADER_CRC_AT) {
        return Err(invalid("the header's checksum does not match".into()));
    }
    let header = Header {
        snapshot_size: le_u64(&head, 16),
        forks_recorded: le_u32(&head, 24),
        recorded_unix_ms: le_u64(&head, 32),
        runs: le_u64(&head, 40),
        pages: le_u64(&head, 48),
        zero_pages: le_u64(&head, 56),
        data_offset: le_u64(&head, 72),
    };
    let page_size = le_u32(&head, 12);
    if u64::from(page_size) != PAGE || le_u64(&head, 64) != PAGE {
        return Err(invalid(format!("page size {page_size}, not 4096")));
    }
    if header.snapshot_size != snapshot_size {
        return Err(invalid(format!(
            "it is for a snapshot of {} bytes, this one has {snapshot_size}",
            header.snapshot_size
        )));
    }
    let snapshot_pages = snapshot_size / PAGE;
    if header.runs > snapshot_pages
        || header.pages > snapshot_pages
        || header.zero_pages > header.pages
        || header.data_offset != data_offset_for(header.runs)
    {
        return Err(invalid("the header's counts are impossible".into()));
    }
    let size = file.metadata()?.len();
    if size != header.file_size() {
        return Err(invalid(format!(
            "{size} bytes, the header says {}",
            header.file_size()
        )));
    }
    let mut table = vec![0u8; (header.runs * RUN_BYTES) as usize];
    file.read_exact_at(&mut table, PAGE)?;
    if crc32fast::hash(&table) != le_u32(&head, 80) {
        return Err(invalid("the run table's checksum does not match".into()));
    }
    let runs: Vec<Run> = table
        .chunks_exact(RUN_BYTES as usize)
        .map(|e| Run {
            page: le_u64(e, 0),
            pages: le_u32(e, 8),
            zero: le_u32(e, 12) & FLAG_ZERO != 0,
        })
        .collect();
    let (mut pages, mut zero) = (0u64, 0u64);
    for run in &runs {
        let end = run.page.checked_add(u64::from(run.pages));
        if run.pages == 0 || end.is_none_or(|end| end > snapshot_pages) {
            return Err(invalid(format!(
                "a run ({} pages at page {}) lies outside the snapshot",
                run.pages, run.page
            )));
        }
        pages += u64::from(run.pages);
        if run.zero {
            zero += u64::from(run.pages);
        }
    }
    if pages != header.pages || zero != header.zero_pages {
        return Err(invalid(
            "the run table does not add up to the header".into(),
        ));
    }
    if let Some((a, b)) = overlapping(&runs) {
        return Err(invalid(format!(
            "runs overlap ({} pages at page {} and {} pages at page {})",
            a.pages, a.page, b.pages, b.page
        )));
    }
    let mut sums = vec![0u8; usize::try_from(header.blocks() * 4).map_err(io::Error::other)?];
    file.read_exact_at(&mut sums, header.sums_offset())?;
    if crc32fast::hash(&sums) != le_u32(&head, 84) {
        return Err(invalid("the block sums' checksum does not match".into()));
    }
    let sums = sums.chunks_exact(4).map(|s| le_u32(s, 0)).collect();
    Ok(Contents { header, runs, sums })
}

/// Two runs that cover a page in common, if any (each run already lies in the snapshot).
fn overlapping(runs: &[Run]) -> Option<(Run, Run)> {
    let mut sorted = runs.to_vec();
    sorted.sort_by_key(|r| r.page);
    sorted
        .windows(2)
        .find(|w| w[0].page + u64::from(w[0].pages) > w[1].page)
        .map(|w| (w[0], w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_runs_are_refused_even_with_good_checksums() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let runs = [
            Run {
                page: 4,
                pages: 4,
                zero: true,
            },
            Run {
                page: 6,
                pages: 4,
                zero: true,
            },
        ];
        let plan = Plan {
            runs: runs.to_vec(),
        };
        let header = header_for(&plan, 64 * PAGE, 1, 1);
        write(file.as_file(), &plan, &header, |_, len| Ok(vec![0; len])).unwrap();
        let err = read(file.as_file(), 64 * PAGE).unwrap_err();
        assert!(err.to_string().contains("runs overlap"), "{err}");
        assert_eq!(overlapping(&runs[..1]), None);
    }
}
