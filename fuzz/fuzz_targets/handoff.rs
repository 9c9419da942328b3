//! The handoff message: `proto::handoff::parse`, then `validate` against a few memory file
//! sizes.
//!
//! Invariants: parsing never panics; what parses encodes and parses back to the same regions;
//! regions that validate are each inside the file, page-aligned, non-empty, of a supported
//! page size, without overflow, and no two overlap in the VMM's address space.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::handoff::{self, GuestRegionUffdMapping, MAX_REGIONS, PAGE_SIZE_2M, PAGE_SIZE_4K};

/// Memory file sizes to validate against: none, one page, one huge page, 1 GiB, the largest.
const FILE_SIZES: [u64; 5] = [0, PAGE_SIZE_4K, PAGE_SIZE_2M, 1 << 30, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Ok(regions) = handoff::parse(data) else {
        return;
    };
    assert!(regions.len() <= MAX_REGIONS);
    let again = handoff::parse(&handoff::encode(&regions)).expect("an encoded message parses");
    assert_eq!(again, regions);
    for file_size in FILE_SIZES {
        if handoff::validate(&regions, file_size).is_ok() {
            check_valid(&regions, file_size);
        }
    }
});

fn check_valid(regions: &[GuestRegionUffdMapping], file_size: u64) {
    assert!(!regions.is_empty());
    for r in regions {
        assert!(
            r.page_size == PAGE_SIZE_4K || r.page_size == PAGE_SIZE_2M,
            "{r:?}"
        );
        assert_eq!(r.base_host_virt_addr % r.page_size, 0, "{r:?}");
        assert_eq!(r.size % r.page_size, 0, "{r:?}");
        assert_eq!(r.offset % r.page_size, 0, "{r:?}");
        assert!(r.size > 0, "{r:?}");
        let end = r.base_host_virt_addr.checked_add(r.size);
        assert_eq!(end, Some(r.end()), "{r:?}");
        let file_end = r.offset.checked_add(r.size).expect("file range fits");
        assert!(file_end <= file_size, "{r:?} past {file_size}");
        assert!(
            r.contains(r.base_host_virt_addr) && !r.contains(r.end()),
            "{r:?}"
        );
    }
    let mut by_base: Vec<&GuestRegionUffdMapping> = regions.iter().collect();
    by_base.sort_by_key(|r| r.base_host_virt_addr);
    for pair in by_base.windows(2) {
        assert!(
            pair[0].end() <= pair[1].base_host_virt_addr,
            "{pair:?} overlap"
        );
    }
}
