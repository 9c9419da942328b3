//! A tiny KVM VMM whose guest reads its memory through pagerd.
//!
//! [`ChecksumVm`] creates a VM with one vCPU and two memory slots:
//!
//! - slot 0, guest physical `0..size`: the image, backed by the host mapping of a
//!   [`GuestMemory`] made by [`GuestMemory::map_for_uffd`] (so
//!   `MAP_PRIVATE|MAP_ANONYMOUS`, registered MISSING with a uffd that the caller hands to
//!   pagerd before [`ChecksumVm::run`]). KVM's accesses to it fault from kernel context and
//!   pagerd serves them; the guest's writes land in its own copy-on-write pages.
//! - slot 1, at [`ChecksumVm::private_base`] (4 GiB, or above the image if that is larger):
//!   2 MiB of VMM-private anonymous memory, never registered with a uffd, holding the page
//!   tables, GDT, TSS, stack and the guest program, so setup never touches the image.
//!
//! This machine's KVM is nested PVM, which emulates CPL0 guest code instruction by instruction
//! (slowly, and not all of it) but runs CPL3 code natively. So the vCPU starts directly in
//! 64-bit mode at CPL3 (`KVM_SET_SREGS`: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CS and SS with
//! DPL 3), over identity page tables whose entries all have the U/S bit, mapping the image and
//! the private slot with 2 MiB pages. No guest instruction ever runs at CPL0. There is no IDT:
//! any guest exception becomes a triple fault, which the VMM reports with the guest's
//! registers and the instruction at RIP.
//!
//! Port I/O from CPL3: RFLAGS starts with IOPL=3 (enough on VMX or SVM), but under PVM that
//! alone does not let the guest `out`, whether IOPL=3 is set through `KVM_SET_REGS` or by an
//! emulated `iretq` from CPL0 (both were tried): every `out` traps to PVM, whose instruction
//! emulator then checks the TSS's I/O permission bitmap as the CPU does when CPL > IOPL. So
//! the TSS has a bitmap that allows exactly the guest's ports. (Without a valid TSS the
//! emulator reads a "TSS" at guest physical 0, which is the image.)
//!
//! The guest program and the checksum it computes are in [`guest`].

pub mod guest;

use std::io;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;

use crate::synthetic::GuestMemory;
use guest::{GuestArgs, CHECKSUM_CHUNK, PORT_CHECKSUM_HI, PORT_CHECKSUM_LO, PORT_DONE};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Size of the VMM-private slot: one 2 MiB guest page.
pub const PRIVATE_SIZE: u64 = 2 * MIB;
/// The lowest guest physical address of the private slot.
pub const PRIVATE_BASE_MIN: u64 = 4 * GIB;

// Layout of the private slot (offsets from its base).
const PML4_OFF: u64 = 0;
const PDPT_OFF: u64 = 4 * KIB;
const PRIVATE_PD_OFF: u64 = 8 * KIB;
const GDT_OFF: u64 = 12 * KIB;
/// The TSS with its I/O permission bitmap (104 + 8192 + 1 bytes).
const TSS_OFF: u64 = 16 * KIB;
const CODE_OFF: u64 = 28 * KIB;
/// The program's stack (it uses none, but starts with a valid one).
const STACK_TOP_OFF: u64 = 64 * KIB;
/// The image's page directories, one 4 KiB page per GiB of image.
const IMAGE_PD_OFF: u64 = 64 * KIB;
/// Largest image the private slot has page directories for.
const MAX_IMAGE_GIB: u64 = (PRIVATE_SIZE - IMAGE_PD_OFF) / (4 * KIB);

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_TABLE: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
const PTE_2M_PAGE: u64 = PTE_TABLE | PTE_HUGE;

// Control-register and EFER bits.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: bit 1 is always set; IOPL (bits 12-13) = 3 lets CPL3 code use `in`/`out` (on
/// VMX or SVM; PVM goes by the TSS's I/O bitmap).
const RFLAGS_IOPL3: u64 = (1 << 1) | (3 << 12);

// GDT with the user segments where Linux's x86-64 GDT has them (PVM runs guest CPL3 code on
// the host's own user segments, so matching selectors keep the two views alike), then a
// 64-bit TSS descriptor (two slots). Slots 1 to 4 (Linux's kernel and 32-bit segments) are
// unused.
const GDT_ENTRIES: [u64; 7] = [
    0,
    0,
    0,
    0,
    0,
    0x00cf_f300_0000_ffff, // 0x28: user data, DPL 3
    0x00af_fb00_0000_ffff, // 0x30: user code, 64-bit, DPL 3
];
const USER_SS: u16 = 0x28 | 3;
const USER_CS: u16 = 0x30 | 3;
const TSS_SELECTOR: u16 = 0x38;
const GDT_LIMIT: u16 = 9 * 8 - 1;

/// Where the I/O permission bitmap starts in the TSS (right after the 104-byte TSS proper).
const IO_BITMAP_OFF: u64 = 104;
/// The TSS limit covers the bitmap (one bit per port, 65536 ports) and its all-ones end byte.
const TSS_LIMIT: u32 = (IO_BITMAP_OFF + 8192) as u32;

/// Errors of the KVM test VMM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The guest memory or arguments cannot be run.
    #[error("cannot run this guest: {0}")]
    Invalid(String),
    /// Mapping the private slot failed.
    #[error("mapping VMM-private memory failed: {0}")]
    Io(#[from] io::Error),
    /// The guest stopped in a way the program never does.
    #[error("the guest stopped unexpectedly: {0}")]
    Guest(String),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|source| KvmError::Ioctl { what, source })
}

/// A one-vCPU VM that runs the checksum program over an image served by pagerd.
///
/// It borrows the [`GuestMemory`] whose host mapping backs slot 0, so that mapping outlives
/// the VM.
pub struct ChecksumVm<'m> {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    _private: MmapMut,
    private_base: u64,
    args: GuestArgs,
    _memory: std::marker::PhantomData<&'m GuestMemory>,
}

impl std::fmt::Debug for ChecksumVm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChecksumVm")
            .field("private_base", &self.private_base)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl<'m> ChecksumVm<'m> {
    /// Creates the VM over `memory` (exactly one region of 4 KiB pages, a whole number of MiB)
    /// and sets up the vCPU to write the pattern over the first `write_mib` MiB and then
    /// checksum every MiB. Nothing here touches the image: hand its uffd to pagerd, then
    /// [`run`](Self::run).
    pub fn new(memory: &'m GuestMemory, write_mib: u64) -> Result<Self, KvmError> {
        let mappings = memory.mappings();
        let [region] = mappings.as_slice() else {
            return Err(KvmError::Invalid(format!(
                "expected exactly one memory region, got {}",
                mappings.len()
            )));
        };
        let size = region.size;
        if size == 0 || size % CHECKSUM_CHUNK != 0 {
            return Err(KvmError::Invalid(format!(
                "the image size {size} is not a positive whole number of MiB"
            )));
        }
        if memory.page_size() != 4 * KIB {
            return Err(KvmError::Invalid("only 4 KiB pages are supported".into()));
        }
        if size.div_ceil(GIB) > MAX_IMAGE_GIB {
            return Err(KvmError::Invalid(format!(
                "the image is larger than {MAX_IMAGE_GIB} GiB"
            )));
        }
        let write_bytes = write_mib
            .checked_mul(MIB)
            .filter(|&w| w <= size)
            .ok_or_else(|| {
                KvmError::Invalid(format!(
                    "--write-mib {write_mib} exceeds the image ({} MiB)",
                    size / MIB
                ))
            })?;
        let private_base = PRIVATE_BASE_MIN.max(size.next_multiple_of(GIB));
        let args = GuestArgs {
            image_bytes: size,
            write_bytes,
        };

        let mut private = MmapMut::map_anon(PRIVATE_SIZE as usize)?;
        build_private_slot(&mut private, private_base, size);

        let kvm = ioctl("opening /dev/kvm", Kvm::new())?;
        let vm = ioctl("KVM_CREATE_VM", kvm.create_vm())?;
        let slots = [
            kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: region.base_host_virt_addr,
            },
            kvm_userspace_memory_region {
                slot: 1,
                flags: 0,
                guest_phys_addr: private_base,
                memory_size: PRIVATE_SIZE,
                userspace_addr: private.as_mut_ptr() as u64,
            },
        ];
        for slot in slots {
            // SAFETY: slot 0 is the live mapping of `memory` (`size` bytes at
            // `base_host_virt_addr`), slot 1 is `private` (PRIVATE_SIZE bytes); both are owned
            // by values that outlive the VM (the borrow `'m` and the field dropped after
            // `_vm`), and the guest can only reach memory inside them.
            let r = unsafe { vm.set_user_memory_region(slot) };
            ioctl("KVM_SET_USER_MEMORY_REGION", r)?;
        }

        let vcpu = ioctl("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let cpuid = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        // Long mode in EFER is only accepted when the guest's CPUID offers it.
        ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;

        let mut sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
        set_long_mode_user(&mut sregs, private_base);
        ioctl("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
        let regs = initial_regs(private_base, args);
        ioctl("KVM_SET_REGS", vcpu.set_regs(&regs))?;

        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _private: private,
            private_base,
            args,
            _memory: std::marker::PhantomData,
        })
    }

    /// The guest physical address of the VMM-private slot.
    pub fn private_base(&self) -> u64 {
        self.private_base
    }

    /// Runs the guest to the end and returns its checksums, one per MiB of the image.
    pub fn run(&mut self) -> Result<Vec<u64>, KvmError> {
        let expected = self.args.image_bytes / CHECKSUM_CHUNK;
        let mut sums = Vec::with_capacity(expected as usize);
        let mut low: Option<u32> = None;
        loop {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(KvmError::Ioctl {
                        what: "KVM_RUN",
                        source,
                    })
                }
            };
            let problem = match exit {
                VcpuExit::IoOut(port, data) => {
                    let Ok(bytes) = <[u8; 4]>::try_from(data) else {
                        return Err(KvmError::Guest(format!(
                            "{}-byte write to port {port:#x}",
                            data.len()
                        )));
                    };
                    let value = u32::from_le_bytes(bytes);
                    match (port, low) {
                        (PORT_CHECKSUM_LO, None) => {
                            low = Some(value);
                            continue;
                        }
                        (PORT_CHECKSUM_HI, Some(lo)) => {
                            sums.push(u64::from(value) << 32 | u64::from(lo));
                            low = None;
                            if sums.len() as u64 > expected {
                                format!("more than {expected} checksums")
                            } else {
                                continue;
                            }
                        }
                        (PORT_DONE, None) if u64::from(value) == expected => {
                            if sums.len() as u64 == expected {
                                return Ok(sums);
                            }
                            format!("done after {} of {expected} checksums", sums.len())
                        }
                        _ => format!("unexpected write of {value:#x} to port {port:#x}"),
                    }
                }
                VcpuExit::Shutdown => "shutdown (a guest exception: triple fault)".to_owned(),
                VcpuExit::InternalError => {
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member of the
                    // exit-reason union.
                    let internal = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    format!("KVM internal error, suberror {}", internal.suberror)
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    format!("entry failed, reason {reason:#x} on cpu {cpu}")
                }
                other => format!("exit {other:?}"),
            };
            return Err(KvmError::Guest(format!("{problem}; {}", self.describe())));
        }
    }

    /// The guest's state, for error messages.
    fn describe(&self) -> String {
        let Ok(regs) = self.vcpu.get_regs() else {
            return "registers unavailable".into();
        };
        let at = regs
            .rip
            .checked_sub(self.private_base + CODE_OFF)
            .and_then(|off| guest::instruction_at(guest::PROGRAM, off))
            .unwrap_or("?");
        let cs = self.vcpu.get_sregs().map(|s| s.cs.selector).unwrap_or(0);
        format!(
            "rip={:#x} ({at}) cs={cs:#x} rflags={:#x} rax={:#x} rcx={:#x} rsp={:#x}",
            regs.rip, regs.rflags, regs.rax, regs.rcx, regs.rsp
        )
    }
}

fn put_u64(mem: &mut [u8], off: u64, value: u64) {
    let off = off as usize;
    mem[off..off + 8].copy_from_slice(&value.to_le_bytes());
}

/// Writes page tables, GDT, TSS and code into the private slot (guest physical `base`).
fn build_private_slot(mem: &mut [u8], base: u64, image_size: u64) {
    // PML4[0] covers 0..512 GiB: both the image and the private slot.
    put_u64(mem, PML4_OFF, (base + PDPT_OFF) | PTE_TABLE);
    // The image: one page directory per GiB, 2 MiB pages, identity mapped.
    let image_2m_pages = image_size.div_ceil(2 * MIB);
    for gib in 0..image_size.div_ceil(GIB) {
        let pd = IMAGE_PD_OFF + gib * 4 * KIB;
        put_u64(mem, PDPT_OFF + gib * 8, (base + pd) | PTE_TABLE);
        for i in 0..512 {
            let page = gib * 512 + i;
            if page < image_2m_pages {
                put_u64(mem, pd + i * 8, (page * 2 * MIB) | PTE_2M_PAGE);
            }
        }
    }
    // The private slot: one 2 MiB page, identity mapped.
    put_u64(
        mem,
        PDPT_OFF + (base / GIB) * 8,
        (base + PRIVATE_PD_OFF) | PTE_TABLE,
    );
    put_u64(
        mem,
        PRIVATE_PD_OFF + ((base % GIB) / (2 * MIB)) * 8,
        base | PTE_2M_PAGE,
    );

    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        put_u64(mem, GDT_OFF + i as u64 * 8, *entry);
    }
    // A 64-bit TSS descriptor (busy): base, limit, type 0xb, present.
    let tss = base + TSS_OFF;
    let low =
        u64::from(TSS_LIMIT) | (tss & 0xff_ffff) << 16 | 0x8b << 40 | ((tss >> 24) & 0xff) << 56;
    put_u64(mem, GDT_OFF + u64::from(TSS_SELECTOR), low);
    put_u64(mem, GDT_OFF + u64::from(TSS_SELECTOR) + 8, tss >> 32);
    // TSS: rsp0 stays 0 (nothing ever enters CPL0), and an I/O permission bitmap that allows
    // exactly the guest's ports (see the module documentation for why PVM needs it).
    let bitmap_ptr = u16::try_from(IO_BITMAP_OFF).expect("bitmap offset fits");
    mem[(TSS_OFF + 0x66) as usize..(TSS_OFF + 0x68) as usize]
        .copy_from_slice(&bitmap_ptr.to_le_bytes());
    let bitmap = (TSS_OFF + IO_BITMAP_OFF) as usize;
    mem[bitmap..=bitmap + 8192].fill(0xff);
    // A 4-byte `out` to port P uses ports P..P+3, and all four must be allowed.
    for port in [PORT_CHECKSUM_LO, PORT_CHECKSUM_HI, PORT_DONE] {
        for port in usize::from(port)..usize::from(port) + 4 {
            mem[bitmap + port / 8] &= !(1 << (port % 8));
        }
    }

    let code = guest::code();
    let code_off = CODE_OFF as usize;
    mem[code_off..code_off + code.len()].copy_from_slice(&code);
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// 64-bit paging on, CS, SS and the data segments at DPL 3: the vCPU starts at CPL3.
fn set_long_mode_user(sregs: &mut kvm_sregs, base: u64) {
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = base + PML4_OFF;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cs = segment(USER_CS, 0xb, true);
    let data = segment(USER_SS, 0x3, false);
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = kvm_segment {
        base: base + TSS_OFF,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = base + GDT_OFF;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

fn initial_regs(base: u64, args: GuestArgs) -> kvm_regs {
    kvm_regs {
        rip: base + CODE_OFF,
        rsp: base + STACK_TOP_OFF,
        rflags: RFLAGS_IOPL3,
        rdi: args.image_bytes,
        rsi: args.write_bytes,
        r12: guest::WRITE_PATTERN_KEY,
        r13: guest::FNV_OFFSET_BASIS,
        r14: guest::FNV_PRIME,
        ..Default::default()
    }
}
