//! Export and import of a snapshot through a directory ([`crate::store::exported`]): a backup
//! that restores exactly, here or on another host, checked by its digests before anything is
//! registered.
//!
//! ```text
//! export ID DIR ─▶ DIR/memory (data pages only) · vmstate · working-set ─▶ manifest.json last
//! import DIR    ─▶ manifest read ─▶ every file's digest checked ─▶ registered as a copy,
//!                  its working set installed ─▶ forkable at once
//! ```
//!
//! Both run without the lifecycle's lock while they read and write files; an import registers
//! through the same path as `snapshot.register`, with its checks and quotas.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use proto::model::{ExportInfo, SnapshotInfo};
use proto::SnapshotId;

use super::{Lifecycle, LifecycleError};
use crate::store::atomic::write_atomic;
use crate::store::exported::{
    self, file_digest, memory_digest, FileDigest, Manifest, FORMAT, MANIFEST, MAX_MANIFEST_BYTES,
};
use crate::store::import::{copy_data, ImportMode, Source};
use crate::working_set::{WorkingSet, FILE_NAME as WORKING_SET_FILE};

fn bad(path: &Path, why: impl std::fmt::Display) -> LifecycleError {
    LifecycleError::BadPath {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

impl Lifecycle {
    /// Writes snapshot `id` to directory `dir` (absolute; created if missing, and holding no
    /// export yet): its memory, device state and working set, then the manifest.
    pub fn export_snapshot(
        &self,
        id: &SnapshotId,
        dir: &Path,
    ) -> Result<ExportInfo, LifecycleError> {
        if !dir.is_absolute() {
            return Err(bad(dir, "the path must be absolute"));
        }
        let (snapshot, vmm) = {
            let catalog = self.lock();
            let meta = catalog
                .metas
                .get(id)
                .ok_or_else(|| LifecycleError::no_snapshot(id))?;
            (
                self.registry.snapshot(id)?,
                meta.vmstate.as_ref().map(|v| v.vmm),
            )
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| bad(dir, e))?;
        if dir.join(MANIFEST).exists() {
            return Err(bad(
                dir,
                "it already holds an export; choose an empty directory",
            ));
        }
        let memory = dir.join(exported::MEMORY);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&memory)
            .map_err(|e| bad(&memory, e))?;
        copy_data(snapshot.file(), &out, snapshot.size(), &AtomicU64::new(0))
            .and_then(|_| out.sync_all())
            .map_err(|e| bad(&memory, e))?;
        let digest =
            memory_digest(snapshot.file(), snapshot.size()).map_err(|e| bad(&memory, e))?;
        let copy = |from: &Path, name: &str| -> Result<Option<FileDigest>, LifecycleError> {
            if !from.exists() {
                return Ok(None);
            }
            let to = dir.join(name);
            std::fs::copy(from, &to).map_err(|e| bad(&to, e))?;
            Ok(Some(file_digest(&to).map_err(|e| bad(&to, e))?))
        };
        let vmstate = match vmm {
            Some(_) => copy(&self.store.vmstate_path(id), exported::VMSTATE)?,
            None => None,
        };
        let working_set = copy(
            &self.store.snapshot_dir(id).join(WORKING_SET_FILE),
            exported::WORKING_SET,
        )?;
        let manifest = Manifest {
            format: FORMAT,
            snapshot: id.clone(),
            memory: FileDigest {
                size: snapshot.size(),
                blake3: digest.clone(),
            },
            vmm,
            vmstate,
            working_set,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| bad(dir, e))?;
        write_atomic(dir, MANIFEST, &json).map_err(|e| bad(&dir.join(MANIFEST), e))?;
        tracing::info!(snapshot = %id, dir = %dir.display(), "exported");
        Ok(ExportInfo {
            snapshot: id.clone(),
            dir: dir.to_owned(),
            size: snapshot.size(),
            blake3: digest,
            vmstate: manifest.vmstate.is_some(),
            working_set: manifest.working_set.is_some(),
        })
    }

    /// Registers the export in `dir` as snapshot `id` (default: the id it was exported as),
    /// owned by `owner`, once every file matches the manifest's digest.
    pub fn import_snapshot(
        &self,
        dir: &Path,
        id: Option<SnapshotId>,
        owner: u32,
    ) -> Result<SnapshotInfo, LifecycleError> {
        if !dir.is_absolute() {
            return Err(bad(dir, "the path must be absolute"));
        }
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        let memory_path = dir.join(exported::MEMORY);
        let memory = Source::open(&memory_path).map_err(|e| bad(&memory_path, e))?;
        let size = memory.meta.len();
        if size != manifest.memory.size
            || memory_digest(&memory.file, size).map_err(|e| bad(&memory_path, e))?
                != manifest.memory.blake3
        {
            return Err(bad(
                &memory_path,
                "its contents do not match the manifest's digest",
            ));
        }
        let checked = |digest: &Option<FileDigest>,
                       name: &str|
         -> Result<Option<std::path::PathBuf>, LifecycleError> {
            let Some(digest) = digest else {
                return Ok(None);
            };
            let path = dir.join(name);
            if file_digest(&path).map_err(|e| bad(&path, e))? != *digest {
                return Err(bad(
                    &path,
                    "its contents do not match the manifest's digest",
                ));
            }
            Ok(Some(path))
        };
        let vmstate = match (checked(&manifest.vmstate, exported::VMSTATE)?, manifest.vmm) {
            (Some(path), Some(vmm)) => Some((Source::open(&path).map_err(|e| bad(&path, e))?, vmm)),
            (None, _) => None,
            (Some(path), None) => {
                return Err(bad(&path, "the manifest names no hypervisor for it"))
            }
        };
        let working_set = checked(&manifest.working_set, exported::WORKING_SET)?;
        let id = id.unwrap_or(manifest.snapshot);
        self.register_snapshot(id.clone(), memory, ImportMode::Copy, vmstate, owner)?;
        if let Some(path) = working_set {
            self.install_working_set(&id, &path)?;
        }
        tracing::info!(snapshot = %id, dir = %dir.display(), "imported");
        self.snapshot(&id)
    }

    /// Copies the working-set file at `path` beside snapshot `id` and serves it, if it loads.
    fn install_working_set(&self, id: &SnapshotId, path: &Path) -> Result<(), LifecycleError> {
        let snapshot = self.registry.snapshot(id)?;
        let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
        let dir = self.store.snapshot_dir(id);
        write_atomic(&dir, WORKING_SET_FILE, &bytes).map_err(|e| bad(&dir, e))?;
        match WorkingSet::load(&dir.join(WORKING_SET_FILE), snapshot.size()) {
            Ok(set) => snapshot.working_set.set(set.map(Arc::new)),
            Err(e) => snapshot
                .working_set
                .set_error(format!("{}: {e}", path.display())),
        }
        Ok(())
    }
}

/// The manifest at `path`, bounded in size and checked for its format.
fn read_manifest(path: &Path) -> Result<Manifest, LifecycleError> {
    let file = File::open(path).map_err(|e| bad(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(path, e))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(bad(path, "larger than any manifest"));
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(path, e))?;
    if manifest.format != FORMAT {
        return Err(bad(
            path,
            format!("format {} (this pagerd reads {FORMAT})", manifest.format),
        ));
    }
    Ok(manifest)
}
