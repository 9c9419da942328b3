//! Criterion micro-benchmarks of pagerd's fault path and handoff, each beside a baseline
//! measured in the same run.
//!
//! `cargo bench -p pagerd-benches --bench fault_path`
//!
//! - `fault/pagerd`: one 4 KiB fault served end to end by a real pagerd process (fault-around
//!   off): touch → uffd event → worker → `UFFDIO_COPY` → wake.
//! - `fault/map_private_file`: one read fault on a `MAP_PRIVATE` file mapping, page cache warm
//!   (touches 64 KiB apart, so fault-around cannot serve the next one).
//! - `fault/anonymous_first_touch`: one first write to anonymous memory (the kernel allocating
//!   and zeroing a page), the floor of any fault that gives a process a page.
//! - `handoff/connect_to_attached`: connect, send the regions and the uffd, read pagerd's reply
//!   (sent once the handoff is validated and the fork is being attached to a worker).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use proto::model::ForkState;
use test_vmms::synthetic::{GuestMemory, RegionSpec};
use testkit::{read_reply, write_snapshot, Daemon};

const PAGE: u64 = 4096;
/// Pages per guest: each benchmark iteration needs a page never touched before.
const PAGES_PER_GUEST: u64 = 8192;

struct Fixture {
    _dir: tempfile::TempDir,
    mem: std::path::PathBuf,
    daemon: Daemon,
    next: std::cell::Cell<u64>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = write_snapshot(&dir.path().join("mem"), PAGES_PER_GUEST * PAGE, 99, 0, 0);
        let daemon = Daemon::start(&[("base", &mem)], &["--fault-around", "1"]);
        Self {
            _dir: dir,
            mem,
            daemon,
            next: std::cell::Cell::new(0),
        }
    }

    fn fork_id(&self) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("bench-{n}")
    }

    /// Guest memory of `pages` pages served by a fresh fork, attached and ready.
    fn guest(&self, pages: u64) -> (GuestMemory, std::os::unix::net::UnixStream, String) {
        let fork = self.fork_id();
        let socket = self.daemon.create_fork("base", &fork);
        let region = RegionSpec {
            size: pages * PAGE,
            file_offset: 0,
        };
        let memory =
            GuestMemory::map_for_uffd(&self.mem, &[region], false, 0).expect("guest memory");
        let conn = memory.hand_off(&socket).expect("handoff");
        self.daemon.wait_fork(&fork, ForkState::Serving);
        (memory, conn, fork)
    }

    fn close(&self, fork: &str) {
        self.daemon.close_fork(fork);
    }
}

/// Times `touch` over `iters` fresh pages, `PAGES_PER_GUEST` at a time from `setup`.
fn per_fresh_page<S>(
    iters: u64,
    mut setup: impl FnMut(u64) -> (usize, S),
    mut teardown: impl FnMut(S),
    stride: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(PAGES_PER_GUEST / stride);
        let (base, state) = setup(n * stride);
        let started = Instant::now();
        for i in 0..n {
            // SAFETY: `base + i * stride * PAGE` lies inside the mapping `setup` made.
            black_box(unsafe {
                std::ptr::read_volatile((base + (i * stride * PAGE) as usize) as *const u8)
            });
        }
        total += started.elapsed();
        teardown(state);
        left -= n;
    }
    total
}

fn anon_map(bytes: u64) -> usize {
    // SAFETY: a fresh private anonymous mapping.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    addr as usize
}

fn unmap(addr: usize, bytes: u64) {
    // SAFETY: unmapping a mapping this file made, once.
    unsafe { libc::munmap(addr as *mut libc::c_void, bytes as usize) };
}

fn faults(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut group = c.benchmark_group("fault");
    group.bench_function("pagerd", |b| {
        b.iter_custom(|iters| {
            per_fresh_page(
                iters,
                |pages| {
                    let (memory, conn, fork) = fx.guest(pages);
                    (
                        memory.mappings()[0].base_host_virt_addr as usize,
                        (memory, conn, fork),
                    )
                },
                |(memory, conn, fork)| {
                    drop((memory, conn));
                    fx.close(&fork);
                },
                1,
            )
        })
    });
    let file = std::fs::File::open(&fx.mem).expect("open snapshot");
    group.bench_function("map_private_file", |b| {
        b.iter_custom(|iters| {
            per_fresh_page(
                iters,
                |pages| {
                    // SAFETY: a private mapping of the immutable snapshot, read only here.
                    let map = unsafe {
                        memmap2::MmapOptions::new()
                            .len((pages * PAGE) as usize)
                            .map_copy_read_only(&file)
                    }
                    .expect("map file");
                    (map.as_ptr() as usize, map)
                },
                drop,
                16,
            )
        })
    });
    group.bench_function("anonymous_first_touch", |b| {
        b.iter_custom(|iters| {
            per_fresh_page(
                iters,
                |pages| {
                    let bytes = pages * PAGE;
                    let addr = anon_map(bytes);
                    (addr, (addr, bytes))
                },
                |(addr, bytes)| unmap(addr, bytes),
                1,
            )
        })
    });
    group.finish();
}

fn handoff(c: &mut Criterion) {
    let fx = Fixture::new();
    c.bench_function("handoff/connect_to_attached", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let fork = fx.fork_id();
                let socket = fx.daemon.create_fork("base", &fork);
                let region = RegionSpec {
                    size: PAGE,
                    file_offset: 0,
                };
                let memory =
                    GuestMemory::map_for_uffd(&fx.mem, &[region], false, 0).expect("guest memory");
                let started = Instant::now();
                let conn = memory.hand_off(&socket).expect("handoff");
                let reply = read_reply(&conn).expect("reply");
                total += started.elapsed();
                assert!(reply.ok, "{reply:?}");
                drop((memory, conn));
                fx.close(&fork);
            }
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = faults, handoff
}
criterion_main!(benches);
