//! Where a fork's pages come from: the [`MemorySource`] trait, and [`CopySource`], bytes only
//! the kernel reads.

use std::fmt;

use super::addr::{FileOffset, FilePage};

/// The memory a snapshot's forks are served from: its size, which 4 KiB pages are all zeros,
/// and the bytes to copy into a fork.
pub trait MemorySource: Send + Sync + fmt::Debug {
    /// The memory's size in bytes (a multiple of 4 KiB).
    fn size(&self) -> u64;

    /// Whether `page` is all zeros (answered with the zero page, never copied).
    fn is_zero_page(&self, page: FilePage) -> bool;

    /// `len` bytes from `at`, for the kernel to copy into a fork; `None` if they are not
    /// (all) inside the memory.
    fn copy_source(&self, at: FileOffset, len: u64) -> Option<CopySource<'_>>;
}

/// Bytes the kernel copies from (`UFFDIO_COPY`'s source). pagerd's own code never reads them
/// through this type: a snapshot's mapping must not be read by pagerd (see
/// [`crate::snapshot`]), so the only thing to do with one is hand it to the kernel.
#[derive(Clone, Copy)]
pub struct CopySource<'a> {
    bytes: &'a [u8],
}

impl<'a> CopySource<'a> {
    /// Bytes for the kernel to copy from.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// How many bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The first `len` bytes (all of them if there are fewer).
    pub fn prefix(self, len: u64) -> Self {
        let len = usize::try_from(len).map_or(self.bytes.len(), |l| l.min(self.bytes.len()));
        Self {
            bytes: &self.bytes[..len],
        }
    }

    /// The bytes themselves, for fakes of the kernel in tests.
    #[cfg(test)]
    pub fn bytes_for_test(&self) -> &'a [u8] {
        self.bytes
    }

    /// Where they start, for the ioctl (valid for [`Self::len`] bytes while `'a` lasts).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }
}

impl fmt::Debug for CopySource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CopySource({:p}, {} bytes)",
            self.bytes.as_ptr(),
            self.bytes.len()
        )
    }
}

/// Memory held in a vector, for tests of what sits above the source.
#[cfg(test)]
#[derive(Debug)]
pub struct BytesSource(pub Vec<u8>);

#[cfg(test)]
impl MemorySource for BytesSource {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn is_zero_page(&self, page: FilePage) -> bool {
        let start = page.offset().0 as usize;
        self.0
            .get(start..start + super::PAGE_4K as usize)
            .is_some_and(|p| p.iter().all(|&b| b == 0))
    }

    fn copy_source(&self, at: FileOffset, len: u64) -> Option<CopySource<'_>> {
        let start = usize::try_from(at.0).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.0.get(start..end).map(CopySource::new)
    }
}
