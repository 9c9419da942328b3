//! A fork's guest memory regions: which pages are present or given back, how far a fault's run
//! may reach, and the queries prefetch makes (where a snapshot page lives in the fork, which
//! pages are still missing).
//!
//! A session owns its [`Regions`], sorted by guest address and validated not to overlap, on
//! one worker: no lock.

use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_2M, PAGE_SIZE_4K};

use crate::bitmap::Bitmap;
use crate::memory::{CopySource, FileOffset, FilePage, MemorySource, VmmAddr, PAGE_4K};

/// One guest memory region and which of its pages are present or removed.
#[derive(Debug)]
pub(super) struct Region {
    pub(super) mapping: GuestRegionUffdMapping,
    pub(super) present: Bitmap,
    pub(super) removed: Bitmap,
    pub(super) readahead: Readahead,
}

/// Readahead state of a region, as the kernel keeps for files: a fault that continues the
/// previous run doubles the window (up to the maximum); any other fault starts over at one
/// page. Sequential readers get large copies, scattered ones get only what they touch.
#[derive(Debug, Default)]
pub(super) struct Readahead {
    /// One past the last page of the previous run.
    pub(super) stream_end: u64,
    /// Pages the next sequential fault may fill.
    window: u64,
}

impl Readahead {
    pub(super) fn window_for(&mut self, page: u64, max: u64) -> u64 {
        self.window = if page == self.stream_end && self.window > 0 {
            (self.window * 2).min(max)
        } else {
            1
        };
        self.window
    }
}

/// How a page is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Copied from the snapshot.
    Data,
    /// The zero page.
    Zero,
}

/// How far a run from `page` may reach: a data run to its readahead `window`, a zero run to
/// the next 2 MiB boundary; never past `len` pages.
pub(super) fn run_limit(page: u64, kind: Fill, window: u64, len: u64) -> u64 {
    match kind {
        // Zero runs cost no memory and `UFFDIO_ZEROPAGE` is cheap: let them reach further.
        Fill::Zero => (page / ZERO_WINDOW_PAGES + 1) * ZERO_WINDOW_PAGES,
        Fill::Data => page + window,
    }
    .min(len)
}

/// The pages of a run: `page` itself, then every following page below `limit` for which
/// `fits` holds, up to the first that does not.
pub(super) fn run_len(page: u64, limit: u64, fits: impl Fn(u64) -> bool) -> u64 {
    let mut end = page + 1;
    while end < limit && fits(end) {
        end += 1;
    }
    end - page
}

impl Region {
    /// A region over `mapping` with no page present or given back.
    pub(super) fn new(mapping: GuestRegionUffdMapping, present: Bitmap, removed: Bitmap) -> Self {
        Self {
            mapping,
            present,
            removed,
            readahead: Readahead::default(),
        }
    }

    /// Where the region starts in the VMM.
    pub(super) fn base(&self) -> VmmAddr {
        VmmAddr(self.mapping.base_host_virt_addr)
    }

    /// One past its end in the VMM.
    pub(super) fn end(&self) -> VmmAddr {
        VmmAddr(self.mapping.end())
    }

    /// Its page size.
    pub(super) fn page_size(&self) -> u64 {
        self.mapping.page_size
    }

    /// Whether it has 4 KiB pages.
    pub(super) fn small_pages(&self) -> bool {
        self.mapping.page_size == PAGE_SIZE_4K
    }

    pub(super) fn page_of(&self, addr: VmmAddr) -> u64 {
        addr.offset_from(self.base()) / self.mapping.page_size
    }

    pub(super) fn addr_of(&self, page: u64) -> VmmAddr {
        self.base().add(page * self.mapping.page_size)
    }

    pub(super) fn file_offset_of(&self, page: u64) -> FileOffset {
        FileOffset(self.mapping.offset + page * self.mapping.page_size)
    }

    pub(super) fn fill_of(&self, page: u64, source: &dyn MemorySource) -> Fill {
        let zero = self.removed.get(page)
            || (self.small_pages() && source.is_zero_page(self.file_offset_of(page).page()));
        if zero {
            Fill::Zero
        } else {
            Fill::Data
        }
    }
}

/// The address of a read-only, never-touched 2 MiB anonymous mapping: zeros to copy into
/// hugetlbfs pages, which `UFFDIO_ZEROPAGE` does not support. Reading it costs no memory.
/// Mapped once per process, on the first session with 2 MiB regions; an address rather than
/// a pointer so sessions holding it can move between threads.
#[derive(Debug, Clone, Copy)]
pub(super) struct HugeZeroPage(usize);

impl HugeZeroPage {
    pub(super) fn get() -> std::io::Result<Self> {
        static ZERO: OnceLock<usize> = OnceLock::new();
        if let Some(&addr) = ZERO.get() {
            return Ok(Self(addr));
        }
        let len = PAGE_SIZE_2M as usize;
        // SAFETY: a fresh private anonymous read-only mapping; never written, and never
        // unmapped once published in `ZERO`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if ZERO.set(addr as usize).is_err() {
            // Another thread published its mapping first; this one was never shared.
            // SAFETY: unmapping our own fresh mapping, which nothing refers to.
            unsafe { libc::munmap(addr, len) };
        }
        Ok(Self(*ZERO.get().expect("published above")))
    }

    /// The 2 MiB of zeros, for the kernel to copy from.
    pub(super) fn bytes(self) -> CopySource<'static> {
        // SAFETY: the address is that of a 2 MiB read-only mapping published in `ZERO`, never
        // written and never unmapped, so it is valid for reads for the rest of the process.
        CopySource::new(unsafe {
            std::slice::from_raw_parts(self.0 as *const u8, PAGE_SIZE_2M as usize)
        })
    }
}

/// How far a run of zero pages may extend: up to the next 2 MiB boundary.
const ZERO_WINDOW_PAGES: u64 = 512;

/// A session's regions, sorted by guest address.
#[derive(Debug)]
pub(super) struct Regions(pub(super) Vec<Region>);

impl Deref for Regions {
    type Target = Vec<Region>;

    fn deref(&self) -> &Vec<Region> {
        &self.0
    }
}

impl DerefMut for Regions {
    fn deref_mut(&mut self) -> &mut Vec<Region> {
        &mut self.0
    }
}

impl Regions {
    /// The region holding `addr`.
    pub(super) fn index_of(&self, addr: VmmAddr) -> Option<usize> {
        let i = self.0.partition_point(|r| r.end() <= addr);
        (i < self.0.len() && self.0[i].mapping.contains(addr.0)).then_some(i)
    }

    /// Whether two addresses lie in the same region.
    pub(super) fn same_region(&self, a: VmmAddr, b: VmmAddr) -> bool {
        self.index_of(a).is_some() && self.index_of(a) == self.index_of(b)
    }

    /// The 4 KiB region holding snapshot page `file_page`: its index, the page in it, and how
    /// many pages from there (at most `max`) it still holds.
    pub(super) fn locate_file_page(
        &self,
        file_page: FilePage,
        max: u64,
    ) -> Option<(usize, u64, u64)> {
        let offset = file_page.offset().0;
        self.0.iter().enumerate().find_map(|(i, r)| {
            let m = &r.mapping;
            (m.page_size == PAGE_SIZE_4K && offset >= m.offset && offset < m.offset + m.size).then(
                || {
                    let page = (offset - m.offset) / PAGE_SIZE_4K;
                    (i, page, (r.present.len() - page).min(max))
                },
            )
        })
    }

    /// Snapshot pages from `file_page` to the next 4 KiB region's start (`u64::MAX`: none).
    pub(super) fn pages_to_next_region(&self, file_page: FilePage) -> u64 {
        let offset = file_page.offset().0;
        self.0
            .iter()
            .filter(|r| r.mapping.page_size == PAGE_SIZE_4K && r.mapping.offset > offset)
            .map(|r| (r.mapping.offset - offset) / PAGE_4K)
            .min()
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// In region `ri` from `page` on (`span` pages): the first pages that are present or
    /// given back are skipped; then the missing pages up to `max` of them. Returns the
    /// missing range and how many were skipped.
    pub(super) fn missing_span(
        &self,
        ri: usize,
        page: u64,
        span: u64,
        max: u64,
    ) -> (u64, u64, u64) {
        let r = &self.0[ri];
        let wanted = |p: u64| !r.present.get(p) && !r.removed.get(p);
        let end = page + span;
        let mut start = page;
        while start < end && !wanted(start) {
            start += 1;
        }
        let mut stop = start;
        while stop < end && stop - start < max && wanted(stop) {
            stop += 1;
        }
        (start, stop, start - page)
    }

    /// The first page from `page` on in region `ri` that is not present.
    pub(super) fn next_missing(&self, ri: usize, page: u64) -> Option<u64> {
        let r = &self.0[ri];
        (page..r.present.len()).find(|&p| !r.present.get(p))
    }

    /// How page `page` of region `ri` is filled.
    pub(super) fn fill_kind(&self, ri: usize, page: u64, source: &dyn MemorySource) -> Fill {
        self.0[ri].fill_of(page, source)
    }

    /// One past the last of the missing pages of `kind` from `page` on (at most `max`).
    pub(super) fn run_of(
        &self,
        ri: usize,
        page: u64,
        kind: Fill,
        max: u64,
        source: &dyn MemorySource,
    ) -> u64 {
        let r = &self.0[ri];
        let limit = (page + max.max(1)).min(r.present.len());
        page + run_len(page, limit, |p| {
            !r.present.get(p) && r.fill_of(p, source) == kind
        })
    }

    pub(super) fn addr_of(&self, ri: usize, page: u64) -> VmmAddr {
        self.0[ri].addr_of(page)
    }

    pub(super) fn mark_present(&mut self, ri: usize, start: u64, end: u64) {
        let r = &mut self.0[ri];
        r.present.fill(start, end.min(r.present.len()), true);
    }

    /// Whether every page of every region is present.
    pub(super) fn all_present(&self) -> bool {
        self.0
            .iter()
            .all(|r| r.present.count_ones() == r.present.len())
    }

    /// Each region's start and length.
    pub(super) fn region_spans(&self) -> Vec<(VmmAddr, u64)> {
        self.0.iter().map(|r| (r.base(), r.mapping.size)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_doubles_on_a_continuing_fault_and_restarts_otherwise() {
        let mut ra = Readahead::default();
        assert_eq!(ra.window_for(10, 32), 1, "the first fault fills one page");
        ra.stream_end = 11;
        assert_eq!(ra.window_for(11, 32), 2);
        ra.stream_end = 13;
        assert_eq!(ra.window_for(13, 32), 4);
        ra.stream_end = 17;
        let mut page = 17;
        for _ in 0..10 {
            let w = ra.window_for(page, 32);
            page += w;
            ra.stream_end = page;
        }
        assert_eq!(ra.window, 32, "capped at the maximum");
        assert_eq!(ra.window_for(5, 32), 1, "a jump starts over");
        assert_eq!(ra.window_for(7, 1), 1);
    }

    #[test]
    fn runs_stop_at_the_window_the_region_end_or_the_first_misfit() {
        // Data: as far as the window.
        assert_eq!(run_limit(10, Fill::Data, 8, 1000), 18);
        assert_eq!(
            run_limit(10, Fill::Data, 8, 12),
            12,
            "never past the region"
        );
        // Zeros: to the next 2 MiB boundary, whatever the window.
        assert_eq!(run_limit(10, Fill::Zero, 0, 10_000), 512);
        assert_eq!(run_limit(512, Fill::Zero, 0, 10_000), 1024);
        assert_eq!(run_limit(1000, Fill::Zero, 0, 1010), 1010);
        // The faulting page is always in.
        assert_eq!(run_len(5, 6, |_| false), 1);
        assert_eq!(run_len(5, 5, |_| true), 1);
        assert_eq!(run_len(5, 20, |_| true), 15);
        assert_eq!(run_len(5, 20, |p| p != 9), 4);
    }
}
