//! The FUSE fallback: each snapshot's memory as a read-only file, for VMMs that can only map a
//! file (Firecracker's `File` backend, Cloud Hypervisor's restore, QEMU's
//! `memory-backend-file`).
//!
//! ```text
//! MOUNT/snapshots/<id>/memory      0400 (0440 root:GROUP), the snapshot's exact size
//! MOUNT/, directories              0500 (0550 root:GROUP)
//!
//! VMM: open ─▶ mmap(MAP_PRIVATE) ─▶ page faults
//!        │                               │ cached:      FUSE read ─▶ pagerd's mapping of the file
//!        │                               │ passthrough: the kernel reads the backing file itself
//!        └─ FUSE open = a reference; FUSE release (close + munmap, or death) ends it
//! ```
//!
//! Pages nobody wrote are shared by every fork through one page cache; writes are copied on
//! write by the kernel into the writer's private memory. Nothing the mount does can change a
//! snapshot: it is mounted read-only and every mutation answers `EROFS`.
//!
//! The mount is `allow_other` so that members of the `--group` can use it, and
//! `default_permissions` so that the kernel enforces the modes above (those of
//! [`crate::access`]): without a group, only root reads guest memory here.
//!
//! How to mount ([`FuseOptions`], with the read path of [`FuseMode`]) is defined here; the
//! command line (`crate::config`) builds it, and nothing in this module reads the command line.
//!
//! [`FuseView::mount`] first detaches whatever a crashed daemon left on the mount point;
//! [`FuseView::unmount`] removes the mount at shutdown (lazily, if VMMs still hold files).

mod fs;
mod inodes;
pub(crate) mod mountpoint;
mod warm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use fuser::{BackgroundSession, MountOption, SessionACL};

pub use proto::model::ReadPath;

use crate::access::Access;
use crate::lifecycle::{FuseMount, MemoryFiles};

/// Which read path the mount offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FuseMode {
    /// No FUSE mount.
    Off,
    /// pagerd answers reads into the FUSE page cache.
    Cached,
    /// The kernel maps the backing file directly (FUSE passthrough); refuse to start without.
    Passthrough,
    /// Passthrough where the kernel offers it, cached otherwise.
    Auto,
}

/// How to mount.
#[derive(Debug, Clone)]
pub(crate) struct FuseOptions {
    /// Where.
    pub mountpoint: PathBuf,
    /// Which read path.
    pub mode: FuseMode,
    /// Threads answering FUSE requests.
    pub threads: usize,
    /// The mount's readahead in KiB (0 keeps the kernel's default).
    pub readahead_kib: u32,
    /// Who may read memory files: the modes and group the mount shows (and the kernel
    /// enforces).
    pub access: Access,
}

/// Why the FUSE mount could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FuseError {
    /// The mount point could not be prepared (stale mounts, directory).
    #[error("cannot prepare mount point {path}")]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting failed.
    #[error("cannot mount FUSE at {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Passthrough was required but the kernel did not grant it.
    #[error("the kernel did not grant FUSE passthrough (needs Linux 6.9+ and CAP_SYS_ADMIN)")]
    NoPassthrough,
}

/// The mounted view.
#[derive(Debug)]
pub(crate) struct FuseView {
    session: Option<BackgroundSession>,
    info: FuseMount,
}

impl FuseView {
    /// Mounts the view of the snapshots `files` offers, replacing stale mounts first.
    pub fn mount(files: Arc<dyn MemoryFiles>, options: &FuseOptions) -> Result<Self, FuseError> {
        let prepare = |source| FuseError::MountPoint {
            path: options.mountpoint.clone(),
            source,
        };
        let mountpoint = mountpoint::absolute(&options.mountpoint).map_err(prepare)?;
        let stale = mountpoint::detach_all(&mountpoint).map_err(prepare)?;
        if stale > 0 {
            tracing::warn!(mountpoint = %mountpoint.display(), stale, "detached a stale FUSE mount left by an earlier daemon");
        }
        std::fs::create_dir_all(&mountpoint).map_err(prepare)?;

        let wanted = match options.mode {
            FuseMode::Cached | FuseMode::Off => ReadPath::Cached,
            FuseMode::Passthrough | FuseMode::Auto => ReadPath::Passthrough,
        };
        let granted = Arc::new(AtomicBool::new(false));
        let device = Arc::new(OnceLock::new());
        let warmer = Arc::new(warm::Warmer::default());
        let filesystem = fs::MemoryFs::new(
            files,
            wanted,
            granted.clone(),
            device.clone(),
            options.access,
            warmer.clone(),
        );
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::NoExec,
            MountOption::FSName("pagerd".into()),
            MountOption::Subtype("pagerd".into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = true;
        let mount_err = |source| FuseError::Mount {
            path: mountpoint.clone(),
            source,
        };
        let session = fuser::Session::new(filesystem, &mountpoint, &config).map_err(mount_err)?;
        warmer.set_notifier(session.notifier());
        // Known before the first request is answered: open handles are identified by it.
        let (major, minor) = mountpoint::mounted_device(&mountpoint)
            .ok()
            .flatten()
            .ok_or_else(|| mount_err(std::io::Error::other("the new mount is not in mountinfo")))?;
        let _ = device.set((major, minor));
        let read_path = if granted.load(Ordering::Relaxed) {
            ReadPath::Passthrough
        } else {
            ReadPath::Cached
        };
        let session = session.spawn().map_err(mount_err)?;
        let view = Self {
            session: Some(session),
            info: FuseMount {
                path: mountpoint,
                device: nix::sys::stat::makedev(major, minor),
                read_path,
            },
        };
        if options.mode == FuseMode::Passthrough && read_path != ReadPath::Passthrough {
            view.unmount();
            return Err(FuseError::NoPassthrough);
        }
        if options.readahead_kib > 0 {
            if let Err(e) = mountpoint::set_readahead_kib(&view.info.path, options.readahead_kib) {
                tracing::warn!(error = %e, "cannot set the FUSE mount's readahead; keeping the kernel's");
            }
        }
        tracing::info!(mountpoint = %view.info.path.display(), read_path = %read_path, "memory files mounted");
        Ok(view)
    }

    /// Where it is mounted and how it reads.
    pub fn info(&self) -> &FuseMount {
        &self.info
    }

    /// Removes the mount. If processes still hold memory files it is detached instead: they
    /// keep their files (with passthrough, their memory keeps working after the daemon is
    /// gone; cached files fail on pages not yet in the page cache).
    pub fn unmount(mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.info.path.display(), "memory files unmounted")
            }
            Err(e) => {
                tracing::warn!(mountpoint = %self.info.path.display(), error = %e,
                    "memory files still in use; detaching the mount");
                if let Err(e) = mountpoint::detach_all(&self.info.path) {
                    tracing::error!(error = %e, "cannot detach the FUSE mount");
                }
            }
        }
    }
}
