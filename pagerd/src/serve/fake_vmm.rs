//! A fake of the kernel's side of a fork's uffd for the policies' unit tests: a VMM's memory
//! as a map of installed pages, every call noted, errors injected on demand.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

use std::sync::Arc;

use nix::errno::Errno;
use proto::handoff::GuestRegionUffdMapping;

use super::memory::ForkMemory;
use super::uffd::{FillError, PageInstaller, Wake};
use crate::memory::{BytesSource, CopySource, VmmAddr, PAGE_4K};

/// What a page of the fake VMM holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// Copied bytes, all this one (the test sources fill each page with one byte).
    Data(u8),
    /// The zero page.
    Zero,
    /// Poisoned.
    Poison,
}

/// One call: which, where, how many bytes, and whether it woke.
pub type CallRecord = (Call, VmmAddr, u64, Option<Wake>);

/// Which call an injected error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Copy,
    Zeropage,
    Poison,
    Wake,
    Unregister,
}

/// The fake VMM memory and what was asked of it.
#[derive(Debug, Default)]
pub struct FakeVmm {
    pub pages: RefCell<BTreeMap<u64, Page>>,
    pub calls: RefCell<Vec<CallRecord>>,
    /// Errors to answer, in order, to the next calls of that kind (`done` pages first).
    pub errors: RefCell<VecDeque<(Call, Errno, u64)>>,
}

impl FakeVmm {
    /// The next call of `call` fails with `errno` after `done_pages` pages.
    pub fn fail_next(&self, call: Call, errno: Errno, done_pages: u64) {
        self.errors
            .borrow_mut()
            .push_back((call, errno, done_pages));
    }

    /// The page at `addr`.
    pub fn page(&self, addr: u64) -> Option<Page> {
        self.pages.borrow().get(&addr).cloned()
    }

    /// Calls made of `call`.
    pub fn count(&self, call: Call) -> usize {
        self.calls.borrow().iter().filter(|c| c.0 == call).count()
    }

    fn injected(&self, call: Call) -> Option<(Errno, u64)> {
        let mut errors = self.errors.borrow_mut();
        let i = errors.iter().position(|e| e.0 == call)?;
        errors.remove(i).map(|(_, errno, done)| (errno, done))
    }

    /// Installs pages one by one, as the kernel does: `EEXIST` at the first one present.
    fn install(
        &self,
        call: Call,
        dst: VmmAddr,
        len: u64,
        wake: Option<Wake>,
        page: impl Fn(u64) -> Page,
    ) -> Result<(), FillError> {
        self.calls.borrow_mut().push((call, dst, len, wake));
        let injected = self.injected(call);
        let mut pages = self.pages.borrow_mut();
        for i in 0..len / PAGE_4K {
            let done = i * PAGE_4K;
            if let Some((errno, at)) = injected {
                if i == at {
                    return Err(FillError { errno, done });
                }
            }
            let addr = dst.0 + done;
            if pages.contains_key(&addr) {
                return Err(FillError {
                    errno: Errno::EEXIST,
                    done,
                });
            }
            pages.insert(addr, page(i));
        }
        Ok(())
    }
}

impl PageInstaller for FakeVmm {
    fn copy(&self, dst: VmmAddr, src: CopySource<'_>, wake: Wake) -> Result<(), FillError> {
        let bytes = src.bytes_for_test();
        self.install(Call::Copy, dst, src.len(), Some(wake), |i| {
            let at = (i * PAGE_4K) as usize;
            let page = &bytes[at..at + PAGE_4K as usize];
            assert!(
                page.iter().all(|&b| b == page[0]),
                "test pages hold one byte"
            );
            Page::Data(page[0])
        })
    }

    fn zeropage(&self, dst: VmmAddr, len: u64, wake: Wake) -> Result<(), FillError> {
        self.install(Call::Zeropage, dst, len, Some(wake), |_| Page::Zero)
    }

    fn poison(&self, dst: VmmAddr, len: u64) -> Result<(), FillError> {
        self.install(Call::Poison, dst, len, None, |_| Page::Poison)
    }

    fn wake(&self, dst: VmmAddr, len: u64) -> Result<(), Errno> {
        self.calls.borrow_mut().push((Call::Wake, dst, len, None));
        self.injected(Call::Wake)
            .map_or(Ok(()), |(errno, _)| Err(errno))
    }

    fn unregister(&self, start: VmmAddr, len: u64) -> Result<(), Errno> {
        self.calls
            .borrow_mut()
            .push((Call::Unregister, start, len, None));
        self.injected(Call::Unregister)
            .map_or(Ok(()), |(errno, _)| Err(errno))
    }
}

/// Memory for the policies' unit tests: one 4 KiB region at 0x10000 over the whole of a
/// source whose page `i` is filled with byte `i + 1`, except the pages in `zero`.
pub fn test_memory(pages: u64, zero: &[u64]) -> ForkMemory<FakeVmm> {
    let mut bytes = Vec::new();
    for i in 0..pages {
        let fill = if zero.contains(&i) { 0 } else { (i + 1) as u8 };
        bytes.extend(std::iter::repeat_n(fill, PAGE_4K as usize));
    }
    let mapping = GuestRegionUffdMapping {
        base_host_virt_addr: 0x10000,
        size: pages * PAGE_4K,
        offset: 0,
        page_size: PAGE_4K,
    };
    ForkMemory::new(
        vec![mapping],
        Arc::new(BytesSource(bytes)),
        FakeVmm::default(),
    )
    .unwrap()
}
