//! Typed places in memory, so an address in a VMM is never mixed up with an offset in a file
//! or a page number.

use std::fmt;

/// The size of the pages memory files are counted in.
pub const PAGE_4K: u64 = 4096;

/// An address in a VMM's address space where it maps guest memory: what its uffd's faults
/// report, and where pages are installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmmAddr(pub u64);

impl VmmAddr {
    /// The address `bytes` further on.
    pub fn add(self, bytes: u64) -> Self {
        Self(self.0 + bytes)
    }

    /// Bytes from `base` to here (`base` must not be above).
    pub fn offset_from(self, base: VmmAddr) -> u64 {
        self.0 - base.0
    }

    /// The start of the `page_size` page holding this address.
    pub fn page_start(self, page_size: u64) -> Self {
        Self(self.0 & !(page_size - 1))
    }
}

impl fmt::Display for VmmAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A byte offset in a memory file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileOffset(pub u64);

impl FileOffset {
    /// The 4 KiB page holding this offset.
    pub fn page(self) -> FilePage {
        FilePage(self.0 / PAGE_4K)
    }
}

/// A 4 KiB page of a memory file, by number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilePage(pub u64);

impl FilePage {
    /// Where the page starts.
    pub fn offset(self) -> FileOffset {
        FileOffset(self.0 * PAGE_4K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_convert_without_mixing_units() {
        assert_eq!(FileOffset(8192 + 17).page(), FilePage(2));
        assert_eq!(FilePage(3).offset(), FileOffset(3 * 4096));
        let base = VmmAddr(0x7000_0000);
        assert_eq!(base.add(0x2345).offset_from(base), 0x2345);
        assert_eq!(base.add(0x2345).page_start(4096), VmmAddr(0x7000_2000));
        assert_eq!(base.add(0x2345).page_start(2 << 20), base);
        assert_eq!(VmmAddr(0x1000).to_string(), "0x1000");
    }
}
