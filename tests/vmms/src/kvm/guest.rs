//! The guest program the KVM test VMM runs, and the checksum it computes, defined once so the
//! VMM's guest and the tests' expectations cannot drift apart.
//!
//! The program is hand-assembled x86-64 (checked against GNU `as`); [`PROGRAM`] keeps every
//! instruction's bytes next to its Intel-syntax source, and [`listing`] prints it with
//! offsets. It runs at CPL3 over identity page tables, so it executes natively under PVM;
//! its `out`s are allowed by the TSS's I/O permission bitmap (see [`super`]).
//!
//! Its inputs are registers set by the VMM (see [`GuestArgs`]):
//!
//! | register | meaning |
//! | --- | --- |
//! | `rdi` | image size in bytes (a multiple of 1 MiB); the image starts at guest physical 0 |
//! | `rsi` | bytes to overwrite with the write pattern first (a multiple of 8, at most `rdi`) |
//! | `r12` | [`WRITE_PATTERN_KEY`] |
//! | `r13` | [`FNV_OFFSET_BASIS`] |
//! | `r14` | [`FNV_PRIME`] |
//!
//! First it writes `offset ^ r12` into every 64-bit word of `[0, rsi)` (its own
//! copy-on-write pages), then for each MiB of `[0, rdi)` it computes [`checksum_mib`] and
//! writes its low 32 bits to [`PORT_CHECKSUM_LO`] and its high 32 bits to
//! [`PORT_CHECKSUM_HI`]; finally it writes the number of MiB to [`PORT_DONE`] (and repeats that
//! forever, should the VMM resume it).

/// I/O port receiving the low 32 bits of the current MiB's checksum.
pub const PORT_CHECKSUM_LO: u16 = 0x600;
/// I/O port receiving the high 32 bits; this write completes one MiB's checksum.
pub const PORT_CHECKSUM_HI: u16 = 0x601;
/// I/O port receiving the number of MiB checksummed, once all are done.
pub const PORT_DONE: u16 = 0x602;

/// The checksum covers this many bytes.
pub const CHECKSUM_CHUNK: u64 = 1 << 20;
/// 64-bit FNV-1a offset basis: the checksum's initial value.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// 64-bit FNV prime: the checksum's multiplier.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// The write pattern stores `offset ^ WRITE_PATTERN_KEY` into the word at image `offset`.
pub const WRITE_PATTERN_KEY: u64 = 0xa5c3_5a3c_0f1e_2d4b;

/// The checksum of one chunk: FNV-1a over its little-endian 64-bit words
/// (`h = (h ^ word) * FNV_PRIME`, wrapping), which, unlike a plain sum, also notices words or
/// pages in the wrong place.
pub fn checksum_mib(chunk: &[u8]) -> u64 {
    chunk.chunks_exact(8).fold(FNV_OFFSET_BASIS, |h, w| {
        let w = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
        (h ^ w).wrapping_mul(FNV_PRIME)
    })
}

/// The guest's checksums of an image: one per MiB, in order. A partial last MiB (which the
/// VMM refuses to run) is checksummed over what there is.
pub fn checksums(image: &[u8]) -> Vec<u64> {
    image
        .chunks(CHECKSUM_CHUNK as usize)
        .map(checksum_mib)
        .collect()
}

/// What the guest writes into the word at image `offset` (a multiple of 8).
pub fn pattern_word(offset: u64) -> u64 {
    offset ^ WRITE_PATTERN_KEY
}

/// Applies the guest's write pattern to the first `len` bytes of `image` (a multiple of 8).
pub fn apply_write_pattern(image: &mut [u8], len: u64) {
    let len = usize::try_from(len).expect("length fits in usize");
    for (i, word) in image[..len].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(i as u64 * 8).to_le_bytes());
    }
}

/// The checksums a guest reports after writing the pattern over its first `write_mib` MiB of
/// `image`: what the tests expect from `kvm-vmm --write-mib N`.
pub fn checksums_after_writes(image: &[u8], write_mib: u64) -> Vec<u64> {
    let mut copy = image.to_vec();
    apply_write_pattern(&mut copy, write_mib * CHECKSUM_CHUNK);
    checksums(&copy)
}

/// The register inputs of one run of [`PROGRAM`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestArgs {
    /// Image size in bytes (`rdi`).
    pub image_bytes: u64,
    /// Bytes to overwrite with the pattern before checksumming (`rsi`).
    pub write_bytes: u64,
}

/// Hand-assembled code: each entry is one instruction's bytes and its Intel-syntax source (a
/// label when the bytes are empty).
pub type Program = &'static [(&'static [u8], &'static str)];

/// The guest program: each entry is one instruction's bytes and its Intel-syntax source (a
/// label when the bytes are empty). Jump displacements are relative to the next instruction.
#[rustfmt::skip]
pub const PROGRAM: Program = &[
    // Phase 1: overwrite [0, rsi) with the pattern, one 64-bit word at a time.
    (&[0x31, 0xc9],                   "xor ecx, ecx              ; rcx = byte offset into the image"),
    (&[],                             "write_loop:"),
    (&[0x48, 0x39, 0xf1],             "cmp rcx, rsi"),
    (&[0x73, 0x0f],                   "jae write_done            ; +0x0f"),
    (&[0x48, 0x89, 0xc8],             "mov rax, rcx"),
    (&[0x4c, 0x31, 0xe0],             "xor rax, r12              ; rax = offset ^ WRITE_PATTERN_KEY"),
    (&[0x48, 0x89, 0x01],             "mov [rcx], rax            ; copy-on-write fault on first touch"),
    (&[0x48, 0x83, 0xc1, 0x08],       "add rcx, 8"),
    (&[0xeb, 0xec],                   "jmp write_loop            ; -0x14"),
    // Phase 2: one FNV-1a checksum per MiB of [0, rdi), reported through two ports.
    (&[],                             "write_done:"),
    (&[0x31, 0xc9],                   "xor ecx, ecx              ; rcx = byte offset into the image"),
    (&[],                             "mib_loop:"),
    (&[0x48, 0x39, 0xf9],             "cmp rcx, rdi"),
    (&[0x73, 0x2a],                   "jae all_done              ; +0x2a"),
    (&[0x4c, 0x89, 0xe8],             "mov rax, r13              ; h = FNV_OFFSET_BASIS"),
    (&[0x48, 0x8d, 0x99, 0x00, 0x00, 0x10, 0x00],
                                      "lea rbx, [rcx + 0x100000] ; rbx = end of this MiB"),
    (&[],                             "word_loop:"),
    (&[0x48, 0x33, 0x01],             "xor rax, [rcx]            ; h ^= word (a missing page faults)"),
    (&[0x49, 0x0f, 0xaf, 0xc6],       "imul rax, r14             ; h *= FNV_PRIME"),
    (&[0x48, 0x83, 0xc1, 0x08],       "add rcx, 8"),
    (&[0x48, 0x39, 0xd9],             "cmp rcx, rbx"),
    (&[0x75, 0xf0],                   "jne word_loop             ; -0x10"),
    (&[0x66, 0xba, 0x00, 0x06],       "mov dx, 0x600             ; PORT_CHECKSUM_LO"),
    (&[0xef],                         "out dx, eax               ; low 32 bits of h"),
    (&[0x48, 0xc1, 0xe8, 0x20],       "shr rax, 32"),
    (&[0x66, 0xba, 0x01, 0x06],       "mov dx, 0x601             ; PORT_CHECKSUM_HI"),
    (&[0xef],                         "out dx, eax               ; high 32 bits of h"),
    (&[0xeb, 0xd1],                   "jmp mib_loop              ; -0x2f"),
    // Done: report the number of MiB; the VMM stops here.
    (&[],                             "all_done:"),
    (&[0x48, 0x89, 0xf8],             "mov rax, rdi"),
    (&[0x48, 0xc1, 0xe8, 0x14],       "shr rax, 20               ; MiB checksummed"),
    (&[0x66, 0xba, 0x02, 0x06],       "mov dx, 0x602             ; PORT_DONE"),
    (&[0xef],                         "out dx, eax"),
    (&[0xeb, 0xf2],                   "jmp all_done              ; -0x0e"),
];

/// The guest program's machine code.
pub fn code() -> Vec<u8> {
    assemble(PROGRAM)
}

/// A program's machine code.
pub fn assemble(program: Program) -> Vec<u8> {
    program
        .iter()
        .flat_map(|(bytes, _)| bytes.iter().copied())
        .collect()
}

/// A program as an assembler listing: offset, bytes, source.
pub fn listing(program: Program) -> String {
    let mut out = String::new();
    let mut at = 0;
    for (bytes, source) in program {
        if bytes.is_empty() {
            out.push_str(&format!("{source}\n"));
            continue;
        }
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!("  {at:04x}  {:<24} {source}\n", hex.join(" ")));
        at += bytes.len();
    }
    out
}

/// The instruction at `offset` in a program, for error messages.
pub fn instruction_at(program: Program, offset: u64) -> Option<&'static str> {
    let mut at = 0;
    for (bytes, source) in program {
        if !bytes.is_empty() && at == offset {
            return Some(source);
        }
        at += bytes.len() as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rel8 displacement of the jump at `source` lands on `label`.
    fn assert_jump(source: &str, label: &str) {
        let mut at = 0i64;
        let mut jump_end = None;
        let mut disp = 0i64;
        let mut target = None;
        for (bytes, text) in PROGRAM {
            if text.starts_with(label) && text.ends_with(':') {
                target = Some(at);
            }
            at += i64::try_from(bytes.len()).expect("small");
            if text.starts_with(source) {
                disp = i64::from(i8::from_le_bytes([bytes[bytes.len() - 1]]));
                jump_end = Some(at);
            }
        }
        assert_eq!(
            jump_end.expect("jump") + disp,
            target.expect("label"),
            "{source}\n{}",
            listing(PROGRAM)
        );
    }

    #[test]
    fn every_jump_lands_on_its_label() {
        assert_jump("jae write_done", "write_done");
        assert_jump("jmp write_loop", "write_loop");
        assert_jump("jae all_done", "all_done");
        assert_jump("jne word_loop", "word_loop");
        assert_jump("jmp mib_loop", "mib_loop");
        assert_jump("jmp all_done", "all_done");
    }

    #[test]
    fn ports_in_the_code_match_the_constants() {
        let code = code();
        for port in [PORT_CHECKSUM_LO, PORT_CHECKSUM_HI, PORT_DONE] {
            let mov_dx = [0x66, 0xba, port as u8, (port >> 8) as u8];
            assert!(code.windows(4).any(|w| w == mov_dx), "port {port:#x}");
        }
    }

    #[test]
    fn checksum_is_fnv1a_over_words_and_position_sensitive() {
        let mut a = vec![0u8; 16];
        a[0] = 1;
        let mut b = vec![0u8; 16];
        b[8] = 1;
        // h = (h ^ 1) * P for the first word, then (h ^ 0) * P = h * P for the second.
        let expected_a = (FNV_OFFSET_BASIS ^ 1)
            .wrapping_mul(FNV_PRIME)
            .wrapping_mul(FNV_PRIME);
        assert_eq!(checksum_mib(&a), expected_a);
        assert_ne!(checksum_mib(&a), checksum_mib(&b));
    }

    #[test]
    fn write_pattern_only_touches_the_first_bytes() {
        let image = vec![7u8; 3 * CHECKSUM_CHUNK as usize];
        let plain = checksums(&image);
        let written = checksums_after_writes(&image, 1);
        assert_eq!(plain.len(), 3);
        assert_ne!(plain[0], written[0]);
        assert_eq!(plain[1..], written[1..]);
        let mut copy = image.clone();
        apply_write_pattern(&mut copy, 16);
        assert_eq!(copy[..8], WRITE_PATTERN_KEY.to_le_bytes());
        assert_eq!(copy[8..16], (8 ^ WRITE_PATTERN_KEY).to_le_bytes());
        assert_eq!(copy[16], 7);
    }
}
