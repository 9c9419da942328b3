//! The handoff message: which guest memory regions a VMM's userfaultfd covers.
//!
//! A VMM restoring a snapshot sends one JSON message with its uffd (see `fdpass`). The message
//! lists the guest memory regions, each as Firecracker's `GuestRegionUffdMapping`:
//!
//! ```text
//! [{"base_host_virt_addr":140395300257792,"size":268435456,"offset":0,
//!   "page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! Parsing is tolerant of what VMMs are seen to send: the bare array or a `{"mappings": [...]}`
//! wrapper, either page-size field alone (`page_size_kib` is, despite its name, bytes too), and
//! unknown fields, which are ignored. Validation is strict, because the message is hostile
//! input: page sizes other than 4 KiB and 2 MiB, unaligned bases, sizes or offsets, empty or
//! overflowing regions, regions overlapping in the VMM's address space or in the file, and file
//! ranges past the end of the snapshot's memory file are all rejected before a single page is
//! served. Since the file ranges are disjoint and inside the file, the regions add up to at most
//! the file's size, which bounds what serving a handoff costs (per-page maps) whatever the
//! message says.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::ErrorCode;
use crate::ids::ForkId;
use crate::model::RefusalReason;

/// A 4 KiB page, the only normal page size pagerd serves.
pub const PAGE_SIZE_4K: u64 = 4096;
/// A 2 MiB hugetlbfs page.
pub const PAGE_SIZE_2M: u64 = 2 * 1024 * 1024;
/// The largest handoff message accepted, in bytes. A region takes about 110 bytes of JSON, so
/// this allows thousands of regions while bounding what one connection can make pagerd hold.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The most regions one handoff may list.
pub const MAX_REGIONS: usize = 4096;

/// One guest memory region of a VMM, as pagerd serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the VMM's address space; fault addresses are in this space.
    pub base_host_virt_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Where the region's bytes start in the snapshot memory file.
    pub offset: u64,
    /// Page size in bytes: [`PAGE_SIZE_4K`] or [`PAGE_SIZE_2M`].
    pub page_size: u64,
}

impl GuestRegionUffdMapping {
    /// One past the region's last address in the VMM's address space (checked in validation).
    pub fn end(&self) -> u64 {
        self.base_host_virt_addr.saturating_add(self.size)
    }

    /// Whether `addr` lies inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr < self.end()
    }
}

/// A region as it travels on the wire; both page-size fields are optional.
#[derive(Debug, Serialize, Deserialize)]
struct WireMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page_size_kib: Option<u64>,
}

/// The one JSON line pagerd writes back on a handoff connection: `{"ok":true,"fork":ID}` once
/// it serves the uffd, or `{"ok":false,"error":{…}}` when it refuses it. Firecracker never
/// reads it; other VMMs and operators debugging a refused handoff can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReply {
    /// Whether the uffd is served.
    pub ok: bool,
    /// The fork now served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkId>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<HandoffRefusal>,
}

/// A refused handoff, as told to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRefusal {
    /// The control protocol's error code for it.
    pub code: ErrorCode,
    /// The stable reason.
    pub reason: RefusalReason,
    /// What a human can act on.
    pub message: String,
}

/// Why a handoff was refused. Each variant has a stable [`reason`](HandoffError::reason) that
/// pagerd reports to the VMM and in its logs.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The message came without a file descriptor.
    #[error("the handoff carried no file descriptor; expected exactly one userfaultfd")]
    NoFd,
    /// The message came with more than one file descriptor (all of them were closed).
    #[error("the handoff carried {count} file descriptors; expected exactly one userfaultfd")]
    SeveralFds {
        /// How many arrived (at least, if the kernel had to truncate them).
        count: usize,
    },
    /// The file descriptor is something other than a userfaultfd.
    #[error("the file descriptor handed over is not a userfaultfd (it is `{kind}`)")]
    NotUserfaultfd {
        /// What `/proc/self/fd` says the descriptor is.
        kind: String,
    },
    /// The message grew past [`MAX_MESSAGE_BYTES`].
    #[error("the handoff message is over the {cap}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        cap: usize,
    },
    /// The connection ended before a whole JSON message arrived.
    #[error("the connection closed after {received} bytes, before a complete handoff message")]
    Incomplete {
        /// Bytes received before the end.
        received: usize,
    },
    /// Reading from the socket failed.
    #[error("reading the handoff failed")]
    Io(#[source] std::io::Error),
    /// No message arrived in time.
    #[error("no complete handoff message arrived within {timeout_ms} ms")]
    TimedOut {
        /// The time allowed.
        timeout_ms: u64,
    },
    /// The bytes are not JSON of the expected shape.
    #[error("the handoff message is not a valid region list")]
    InvalidJson(#[source] serde_json::Error),
    /// The region list is empty.
    #[error("the handoff message lists no memory regions")]
    NoRegions,
    /// The region list is longer than [`MAX_REGIONS`].
    #[error("the handoff message lists {count} regions, over the limit of {MAX_REGIONS}")]
    TooManyRegions {
        /// How many were listed.
        count: usize,
    },
    /// Neither `page_size` nor `page_size_kib` was given.
    #[error("region {index}: no page size (`page_size` or `page_size_kib`)")]
    MissingPageSize {
        /// The region's position in the message.
        index: usize,
    },
    /// `page_size` and `page_size_kib` were both given and differ.
    #[error("region {index}: page_size {page_size} and page_size_kib {page_size_kib} disagree")]
    PageSizeMismatch {
        /// The region's position in the message.
        index: usize,
        /// The `page_size` field.
        page_size: u64,
        /// The `page_size_kib` field.
        page_size_kib: u64,
    },
    /// A page size other than 4 KiB or 2 MiB.
    #[error("region {index}: page size {page_size} is not 4096 or 2097152")]
    UnsupportedPageSize {
        /// The region's position in the message.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// A base, size or offset that is not a multiple of the region's page size.
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {page_size}")]
    Unaligned {
        /// The region's position in the message.
        index: usize,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// A region of size zero.
    #[error("region {index}: size is zero")]
    EmptyRegion {
        /// The region's position in the message.
        index: usize,
    },
    /// `base + size` or `offset + size` does not fit in 64 bits.
    #[error("region {index}: address or file range overflows")]
    Overflow {
        /// The region's position in the message.
        index: usize,
    },
    /// Two regions share addresses in the VMM's address space.
    #[error("regions {first} and {second} overlap in the VMM's address space")]
    Overlap {
        /// The region that starts first.
        first: usize,
        /// The region that starts inside it.
        second: usize,
    },
    /// Two regions' file ranges share bytes: the memory file is the regions laid end to end.
    #[error("regions {first} and {second} overlap in the snapshot memory file")]
    FileOverlap {
        /// The region whose file range starts first.
        first: usize,
        /// The region whose file range starts inside it.
        second: usize,
    },
    /// A region's file range runs past the end of the snapshot memory file.
    #[error(
        "region {index}: file range {offset:#x}..{end:#x} runs past the end of the snapshot \
         memory file ({file_size} bytes)"
    )]
    PastEndOfFile {
        /// The region's position in the message.
        index: usize,
        /// Start of the file range.
        offset: u64,
        /// End of the file range.
        end: u64,
        /// The memory file's size.
        file_size: u64,
    },
}

impl HandoffError {
    /// The stable reason reported to the VMM and on the fork.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::NoFd => RefusalReason::NoFd,
            Self::SeveralFds { .. } => RefusalReason::SeveralFds,
            Self::NotUserfaultfd { .. } => RefusalReason::NotUserfaultfd,
            Self::TooLarge { .. } => RefusalReason::TooLarge,
            Self::Incomplete { .. } => RefusalReason::Incomplete,
            Self::Io(_) => RefusalReason::Io,
            Self::TimedOut { .. } => RefusalReason::TimedOut,
            Self::InvalidJson(_) => RefusalReason::InvalidJson,
            Self::NoRegions => RefusalReason::NoRegions,
            Self::TooManyRegions { .. } => RefusalReason::TooManyRegions,
            Self::MissingPageSize { .. } => RefusalReason::MissingPageSize,
            Self::PageSizeMismatch { .. } => RefusalReason::PageSizeMismatch,
            Self::UnsupportedPageSize { .. } => RefusalReason::UnsupportedPageSize,
            Self::Unaligned { .. } => RefusalReason::Unaligned,
            Self::EmptyRegion { .. } => RefusalReason::EmptyRegion,
            Self::Overflow { .. } => RefusalReason::Overflow,
            Self::Overlap { .. } => RefusalReason::Overlap,
            Self::FileOverlap { .. } => RefusalReason::FileOverlap,
            Self::PastEndOfFile { .. } => RefusalReason::PastEndOfFile,
        }
    }
}

fn shape_error(what: &str) -> HandoffError {
    use serde::de::Error as _;
    HandoffError::InvalidJson(serde_json::Error::custom(what))
}

/// Parses a complete handoff message into regions, resolving the page-size fields. Checks
/// that need the snapshot are left to [`validate`].
pub fn parse(bytes: &[u8]) -> Result<Vec<GuestRegionUffdMapping>, HandoffError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(HandoffError::TooLarge {
            cap: MAX_MESSAGE_BYTES,
        });
    }
    // The two shapes seen in the wild: a bare array, or the array under `mappings`.
    let list = match serde_json::from_slice::<Value>(bytes).map_err(HandoffError::InvalidJson)? {
        Value::Array(list) => list,
        Value::Object(mut wrapper) => match wrapper.remove("mappings") {
            Some(Value::Array(list)) => list,
            _ => {
                return Err(shape_error(
                    "an object must hold the region array in `mappings`",
                ))
            }
        },
        _ => {
            return Err(shape_error(
                "expected an array of regions or {\"mappings\": [...]}",
            ))
        }
    };
    if list.len() > MAX_REGIONS {
        return Err(HandoffError::TooManyRegions { count: list.len() });
    }
    list.into_iter()
        .enumerate()
        .map(|(index, value)| {
            let w: WireMapping = serde_json::from_value(value)
                .map_err(|e| shape_error(&format!("region {index}: {e}")))?;
            let page_size = match (w.page_size, w.page_size_kib) {
                (None, None) => return Err(HandoffError::MissingPageSize { index }),
                (Some(a), Some(b)) if a != b => {
                    return Err(HandoffError::PageSizeMismatch {
                        index,
                        page_size: a,
                        page_size_kib: b,
                    })
                }
                (Some(a), _) | (None, Some(a)) => a,
            };
            Ok(GuestRegionUffdMapping {
                base_host_virt_addr: w.base_host_virt_addr,
                size: w.size,
                offset: w.offset,
                page_size,
            })
        })
        .collect()
}

/// Checks regions against each other and against a snapshot memory file of `file_size` bytes.
pub fn validate(regions: &[GuestRegionUffdMapping], file_size: u64) -> Result<(), HandoffError> {
    if regions.is_empty() {
        return Err(HandoffError::NoRegions);
    }
    for (index, r) in regions.iter().enumerate() {
        if r.page_size != PAGE_SIZE_4K && r.page_size != PAGE_SIZE_2M {
            return Err(HandoffError::UnsupportedPageSize {
                index,
                page_size: r.page_size,
            });
        }
        for (field, value) in [
            ("base_host_virt_addr", r.base_host_virt_addr),
            ("size", r.size),
            ("offset", r.offset),
        ] {
            if value % r.page_size != 0 {
                return Err(HandoffError::Unaligned {
                    index,
                    field,
                    value,
                    page_size: r.page_size,
                });
            }
        }
        if r.size == 0 {
            return Err(HandoffError::EmptyRegion { index });
        }
        let (Some(_), Some(file_end)) = (
            r.base_host_virt_addr.checked_add(r.size),
            r.offset.checked_add(r.size),
        ) else {
            return Err(HandoffError::Overflow { index });
        };
        if file_end > file_size {
            return Err(HandoffError::PastEndOfFile {
                index,
                offset: r.offset,
                end: file_end,
                file_size,
            });
        }
    }
    let mut by_base: Vec<usize> = (0..regions.len()).collect();
    by_base.sort_by_key(|&i| regions[i].base_host_virt_addr);
    for pair in by_base.windows(2) {
        let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
        if b.base_host_virt_addr < a.end() {
            return Err(HandoffError::Overlap {
                first: pair[0],
                second: pair[1],
            });
        }
    }
    let mut by_offset = by_base;
    by_offset.sort_by_key(|&i| regions[i].offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
        // Both ends were checked not to overflow above.
        if b.offset < a.offset + a.size {
            return Err(HandoffError::FileOverlap {
                first: pair[0],
                second: pair[1],
            });
        }
    }
    Ok(())
}

/// Encodes regions the way Firecracker does: a bare array with both page-size fields.
pub fn encode(regions: &[GuestRegionUffdMapping]) -> Vec<u8> {
    let wire: Vec<WireMapping> = regions
        .iter()
        .map(|r| WireMapping {
            base_host_virt_addr: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
            page_size: Some(r.page_size),
            page_size_kib: Some(r.page_size),
        })
        .collect();
    serde_json::to_vec(&wire).expect("a list of integers always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: PAGE_SIZE_4K,
        }
    }

    #[test]
    fn parses_the_captured_firecracker_message() {
        let msg = br#"[{"base_host_virt_addr":140395300257792,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let regions = parse(msg).unwrap();
        assert_eq!(regions, vec![region(140395300257792, 268435456, 0)]);
        validate(&regions, 268435456).unwrap();
    }

    #[test]
    fn accepts_the_wrapper_either_page_size_field_and_unknown_fields() {
        let msg = br#"{"mappings":[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096,"x":1},
                                   {"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size":4096}]}"#;
        let regions = parse(msg).unwrap();
        assert_eq!(
            regions,
            vec![region(4096, 8192, 0), region(65536, 4096, 8192)]
        );
    }

    #[test]
    fn encode_round_trips_many_regions() {
        let regions: Vec<_> = (0..300)
            .map(|i| region(i * 0x10_0000, 0x1000, i * 0x1000))
            .collect();
        let bytes = encode(&regions);
        assert!(
            bytes.len() > 1024,
            "many regions must not fit the old 1 KiB buffer"
        );
        assert_eq!(parse(&bytes).unwrap(), regions);
        validate(&regions, 300 * 0x1000).unwrap();
    }

    /// The reason's wire name.
    fn name(reason: RefusalReason) -> String {
        serde_json::to_value(reason)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn rejects_each_malformed_message_with_its_reason() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "invalid_json"),
            (b"[{\"size\":1}]", "invalid_json"),
            (b"[]", "no_regions"),
            (b"[{\"base_host_virt_addr\":0,\"size\":4096,\"offset\":0}]", "missing_page_size"),
            (
                b"[{\"base_host_virt_addr\":0,\"size\":4096,\"offset\":0,\"page_size\":4096,\"page_size_kib\":4}]",
                "page_size_mismatch",
            ),
        ];
        for (msg, reason) in cases {
            let err = parse(msg).and_then(|r| validate(&r, 1 << 20)).unwrap_err();
            assert_eq!(
                name(err.reason()),
                reason,
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn validation_rejects_bad_geometry() {
        let huge = |base, size, offset| GuestRegionUffdMapping {
            page_size: PAGE_SIZE_2M,
            ..region(base, size, offset)
        };
        let odd = GuestRegionUffdMapping {
            page_size: 8192,
            ..region(0, 8192, 0)
        };
        let cases = vec![
            (vec![odd], "unsupported_page_size"),
            (vec![region(100, 4096, 0)], "unaligned"),
            (vec![region(0, 4000, 0)], "unaligned"),
            (vec![region(0, 4096, 512)], "unaligned"),
            (vec![huge(PAGE_SIZE_2M, 4096, 0)], "unaligned"),
            (vec![region(0, 0, 0)], "empty_region"),
            (vec![region(u64::MAX - 4095, 8192, 0)], "overflow"),
            (vec![region(0, 8192, 0), region(4096, 4096, 0)], "overlap"),
            (
                vec![
                    region(0, 4096, (1 << 20) - 4096),
                    region(8192, 8192, 1 << 20),
                ],
                "past_end_of_file",
            ),
        ];
        for (regions, reason) in cases {
            let err = validate(&regions, 1 << 20).unwrap_err();
            assert_eq!(name(err.reason()), reason, "{regions:?}: {err}");
        }
    }

    #[test]
    fn regions_may_not_share_file_bytes() {
        // Laid end to end, in any order: fine.
        validate(&[region(0x10_0000, 8192, 8192), region(0, 8192, 0)], 16384).unwrap();
        // Gaps in the file are fine too.
        validate(&[region(0, 4096, 0), region(0x10_0000, 4096, 12288)], 16384).unwrap();
        let cases = vec![
            vec![region(0, 8192, 0), region(0x10_0000, 8192, 0)],
            vec![region(0, 8192, 0), region(0x10_0000, 8192, 4096)],
            vec![region(0x10_0000, 4096, 4096), region(0, 16384, 0)],
            vec![
                region(0, 4096, 0),
                region(0x10_0000, 4096, 8192),
                region(0x20_0000, 8192, 4096),
            ],
        ];
        for regions in cases {
            let err = validate(&regions, 1 << 20).unwrap_err();
            assert_eq!(
                err.reason(),
                RefusalReason::FileOverlap,
                "{regions:?}: {err}"
            );
        }
    }

    #[test]
    fn valid_regions_never_add_up_to_more_than_the_file() {
        // The attack this bounds: many regions mapping the same file range.
        let file_size = 1 << 20;
        let regions: Vec<_> = (0..MAX_REGIONS as u64)
            .map(|i| region(i << 30, file_size, 0))
            .collect();
        assert_eq!(
            validate(&regions, file_size).unwrap_err().reason(),
            RefusalReason::FileOverlap
        );
        let fine: Vec<_> = (0..256u64)
            .map(|i| region(i << 30, 4096, i * 4096))
            .collect();
        validate(&fine, file_size).unwrap();
        let total: u64 = fine.iter().map(|r| r.size).sum();
        assert!(total <= file_size);
    }

    #[test]
    fn rejects_oversized_messages() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(name(parse(&big).unwrap_err().reason()), "too_large");
    }
}
