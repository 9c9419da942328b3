//! A snapshot exported to a directory, for backups and for moving it to another host: the
//! files, and a manifest with a digest of each, checked before anything is imported.
//!
//! ```text
//!  DIR/manifest.json   format, the snapshot's id and size, the hypervisor, and per file its
//!                      name, size and BLAKE3 digest
//!  DIR/memory          the memory, sparse: only pages holding data are written
//!  DIR/vmstate         the hypervisor's device state, if the snapshot has one
//!  DIR/working-set     its recorded working set, if it has one
//! ```
//!
//! The memory's digest covers its contents, not its holes: BLAKE3 over every 4 KiB page that
//! holds a non-zero byte, each preceded by its page number, so a sparse copy and a full one of
//! the same memory have the same digest and reading it costs only the data.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use proto::model::VmmKind;
use proto::SnapshotId;
use serde::{Deserialize, Serialize};

use crate::snapshot::ZERO_MAP_PAGE;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The memory's file name.
pub const MEMORY: &str = "memory";
/// The device state's file name.
pub const VMSTATE: &str = "vmstate";
/// The working set's file name.
pub const WORKING_SET: &str = "working-set";
/// The format this daemon writes and reads.
pub const FORMAT: u32 = 1;
/// The largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// What an export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The snapshot's id where it was exported.
    pub snapshot: SnapshotId,
    /// The memory.
    pub memory: FileDigest,
    /// The hypervisor the device state is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
    /// The device state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate: Option<FileDigest>,
    /// The working set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<FileDigest>,
}

/// One file of an export: its size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Bytes.
    pub size: u64,
    /// BLAKE3, hex (for the memory: of its data pages, see the module doc).
    pub blake3: String,
}

/// The digest of the first `size` bytes of memory `file` (data pages only, numbered).
pub fn memory_digest(file: &File, size: u64) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    crate::extents::read_data(file, size, |offset, bytes| {
        for (number, page) in (offset / ZERO_MAP_PAGE..).zip(bytes.chunks(ZERO_MAP_PAGE as usize)) {
            if !crate::extents::is_zero(page) {
                hasher.update(&number.to_le_bytes());
                hasher.update(page);
            }
        }
        Ok(())
    })?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The digest of a whole file's bytes.
pub fn file_digest(path: &Path) -> io::Result<FileDigest> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let size = io::copy(&mut (&mut file).take(u64::MAX), &mut hasher)?;
    Ok(FileDigest {
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn the_memory_digest_covers_contents_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full");
        let sparse = dir.path().join("sparse");
        let mut bytes = vec![0u8; 64 * 4096];
        bytes[5 * 4096..6 * 4096].fill(9);
        bytes[40 * 4096 + 7] = 1;
        std::fs::write(&full, &bytes).unwrap();
        let f = File::create(&sparse).unwrap();
        f.set_len(bytes.len() as u64).unwrap();
        f.write_all_at(&bytes[5 * 4096..6 * 4096], 5 * 4096)
            .unwrap();
        f.write_all_at(&bytes[40 * 4096..41 * 4096], 40 * 4096)
            .unwrap();
        drop(f);
        let size = bytes.len() as u64;
        let digest = |p: &Path| memory_digest(&File::open(p).unwrap(), size).unwrap();
        assert_eq!(digest(&full), digest(&sparse));
        // One byte more, or the same page elsewhere, is another digest.
        let mut moved = bytes.clone();
        moved[40 * 4096 + 7] = 0;
        moved[41 * 4096 + 7] = 1;
        std::fs::write(&full, &moved).unwrap();
        assert_ne!(digest(&full), digest(&sparse));
    }

    #[test]
    fn manifests_round_trip_and_refuse_unknown_fields() {
        let manifest = Manifest {
            format: FORMAT,
            snapshot: "s".parse().unwrap(),
            memory: FileDigest {
                size: 4096,
                blake3: "ab".into(),
            },
            vmm: Some(VmmKind::Firecracker),
            vmstate: None,
            working_set: None,
        };
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<Manifest>(&extra).is_err());
    }
}
