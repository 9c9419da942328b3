//! A fork's memory as the fault path and prefetch see it: its regions (which pages are
//! present or given back), the [`MemorySource`] its pages come from, and the
//! [`PageInstaller`] that puts them into the VMM.
//!
//! Every page installed goes through [`ForkMemory::fill`] or [`ForkMemory::fill_from`], which
//! take typed places and borrowed bytes (no raw pointer) and keep the present map true to
//! what was installed. Policies (on-demand faults, replay, graduation) sit above this type
//! and never touch the uffd or the source themselves.

use std::sync::Arc;

use nix::errno::Errno;
use proto::handoff::{GuestRegionUffdMapping, PAGE_SIZE_4K};

use super::region::{Fill, HugeZeroPage, Region, Regions};
use super::uffd::{FillError, PageInstaller, Wake};
use crate::bitmap::Bitmap;
use crate::memory::{CopySource, MemorySource, VmmAddr};

/// Why a fork's memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemorySetupError {
    /// The per-page maps of the regions could not be allocated.
    #[error("cannot allocate page maps for {pages} pages")]
    PageMaps {
        /// Pages in all regions.
        pages: u64,
        /// Why.
        #[source]
        source: std::collections::TryReserveError,
    },
    /// The zero buffer hugetlbfs regions are filled from could not be mapped.
    #[error("cannot map 2 MiB of zeros for hugetlbfs regions")]
    HugeZeroPage(#[source] std::io::Error),
}

/// A fork's regions, where their pages come from, and how they are installed.
#[derive(Debug)]
pub struct ForkMemory<U> {
    /// Sorted by address; validated not to overlap.
    regions: Regions,
    source: Arc<dyn MemorySource>,
    installer: U,
    /// Set when a region has 2 MiB pages.
    huge_zero: Option<HugeZeroPage>,
}

/// What a fill did: how many pages it installed before it stopped, and why it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// Pages installed.
    pub pages: u64,
    /// Bytes installed.
    pub bytes: u64,
    /// `Err` if it stopped before the end.
    pub result: Result<(), FillError>,
}

impl<U: PageInstaller> ForkMemory<U> {
    /// The memory of validated regions (their file ranges disjoint and inside `source`, so
    /// the page maps are bounded by its size). Allocation failures are errors.
    pub fn new(
        mut mappings: Vec<GuestRegionUffdMapping>,
        source: Arc<dyn MemorySource>,
        installer: U,
    ) -> Result<Self, MemorySetupError> {
        mappings.sort_by_key(|m| m.base_host_virt_addr);
        let pages: u64 = mappings.iter().map(|m| m.size / m.page_size).sum();
        let map =
            |n| Bitmap::try_new(n).map_err(|source| MemorySetupError::PageMaps { pages, source });
        let mut regions = Vec::new();
        regions
            .try_reserve_exact(mappings.len())
            .map_err(|source| MemorySetupError::PageMaps { pages, source })?;
        for mapping in mappings {
            let n = mapping.size / mapping.page_size;
            regions.push(Region::new(mapping, map(n)?, map(n)?));
        }
        let regions = Regions(regions);
        let huge_zero = if regions.iter().any(|r| !r.small_pages()) {
            Some(HugeZeroPage::get().map_err(MemorySetupError::HugeZeroPage)?)
        } else {
            None
        };
        Ok(Self {
            regions,
            source,
            installer,
            huge_zero,
        })
    }

    /// The regions.
    pub(super) fn regions(&self) -> &Regions {
        &self.regions
    }

    /// The regions, to change readahead or mark pages.
    pub(super) fn regions_mut(&mut self) -> &mut Regions {
        &mut self.regions
    }

    /// Where the pages come from.
    pub fn source(&self) -> &dyn MemorySource {
        &*self.source
    }

    /// The installer.
    pub fn installer(&self) -> &U {
        &self.installer
    }

    /// How page `page` of region `ri` is filled.
    pub(super) fn fill_kind(&self, ri: usize, page: u64) -> Fill {
        self.regions.fill_kind(ri, page, &*self.source)
    }

    /// Installs `pages` pages of `kind` from page `page` of region `ri` on, from the source
    /// (data) or as zeros, and marks what was installed present.
    pub(super) fn fill(
        &mut self,
        ri: usize,
        page: u64,
        pages: u64,
        kind: Fill,
        wake: Wake,
    ) -> Filled {
        let region = &self.regions[ri];
        let ps = region.page_size();
        let dst = region.addr_of(page);
        let len = pages * ps;
        let result = match (kind, self.huge_zero) {
            (Fill::Zero, _) if ps == PAGE_SIZE_4K => self.installer.zeropage(dst, len, wake),
            // Hugetlbfs has no zero page: copy from 2 MiB of zeros, one page at a time.
            (Fill::Zero, Some(zero)) if len <= zero.bytes().len() => {
                self.installer.copy(dst, zero.bytes().prefix(len), wake)
            }
            (Fill::Zero, _) => Err(invalid()),
            (Fill::Data, _) => match self.source.copy_source(region.file_offset_of(page), len) {
                Some(src) => self.installer.copy(dst, src, wake),
                // Validation put every region's file range inside the source: cannot happen.
                None => Err(invalid()),
            },
        };
        self.settle(ri, page, ps, len, result)
    }

    /// Installs `src` (whole 4 KiB pages) at page `page` of region `ri` on, and marks what was
    /// installed present.
    pub(super) fn fill_from(
        &mut self,
        ri: usize,
        page: u64,
        src: CopySource<'_>,
        wake: Wake,
    ) -> Filled {
        let region = &self.regions[ri];
        let (ps, dst) = (region.page_size(), region.addr_of(page));
        let result = self.installer.copy(dst, src, wake);
        self.settle(ri, page, ps, src.len(), result)
    }

    fn settle(
        &mut self,
        ri: usize,
        page: u64,
        ps: u64,
        len: u64,
        result: Result<(), FillError>,
    ) -> Filled {
        let bytes = match result {
            Ok(()) => len,
            Err(e) => e.done.min(len),
        };
        let pages = bytes / ps;
        self.regions.mark_present(ri, page, page + pages);
        Filled {
            pages,
            bytes,
            result,
        }
    }

    /// Poisons `addr..addr+len`.
    pub(super) fn poison(&self, addr: VmmAddr, len: u64) -> Result<(), FillError> {
        self.installer.poison(addr, len)
    }

    /// Wakes the threads waiting on `addr..addr+len`.
    pub(super) fn wake(&self, addr: VmmAddr, len: u64) -> Result<(), Errno> {
        self.installer.wake(addr, len)
    }

    /// Hands every region back to the kernel (no more faults are raised there).
    pub(super) fn unregister_all(&self) -> Result<(), Errno> {
        for (start, len) in self.regions.region_spans() {
            self.installer.unregister(start, len)?;
        }
        Ok(())
    }

    /// The guest gave `start..end` back: those pages read as zeros from now on.
    pub(super) fn remove(&mut self, start: VmmAddr, end: VmmAddr) {
        for region in self.regions.iter_mut() {
            let (lo, hi) = (start.max(region.base()), end.min(region.end()));
            if lo >= hi {
                continue;
            }
            let ps = region.page_size();
            let first = lo.offset_from(region.base()) / ps;
            let last = hi.offset_from(region.base()).div_ceil(ps);
            region.removed.fill(first, last, true);
            region.present.fill(first, last, false);
        }
    }
}

fn invalid() -> FillError {
    FillError {
        errno: Errno::EINVAL,
        done: 0,
    }
}
