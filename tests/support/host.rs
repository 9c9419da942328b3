//! What tests need from the machine: 2 MiB huge pages, a file's own page cache, and a small
//! tmpfs to fill.

use std::os::fd::AsRawFd;
use std::path::Path;

/// 2 MiB hugetlbfs pages reserved through `/proc/sys/vm/nr_hugepages`, given back on drop.
pub struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_nr_hugepages() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("nr_hugepages is a number")
}

impl HugePages {
    /// Adds `count` pages to the pool; panics if the kernel could not reserve them all.
    pub fn reserve(count: u64) -> Self {
        let before = read_nr_hugepages();
        std::fs::write(NR_HUGEPAGES, (before + count).to_string()).expect("write nr_hugepages");
        let now = read_nr_hugepages();
        let guard = Self { before };
        assert!(
            now >= before + count,
            "only {now} hugepages could be reserved (wanted {})",
            before + count
        );
        guard
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// The KiB of `path`'s own page cache, from `cachestat(2)`: the pages cached for that file
/// and no other (a FUSE memory file served by passthrough has none of its own: its pages are
/// the backing file's).
pub fn cached_kib(path: &Path) -> u64 {
    /// `struct cachestat_range`.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat`.
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// `cachestat`'s number in the generic syscall table, which x86-64 shares.
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).unwrap();
    // The whole file (a length of 0 runs to its end).
    let range = Range { off: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of the kernel's layout,
    // on a descriptor this function owns.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat({}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
    stat.nr_cache * page / 1024
}

/// A tmpfs mounted for one test, unmounted on drop.
pub struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on a new temp directory.
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self(dir)
    }
}

impl SmallTmpfs {
    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}
