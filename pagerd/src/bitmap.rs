//! A fixed-size bit set, one bit per page, that costs memory in proportion to what is mixed.
//!
//! The bits are cut into chunks of [`CHUNK_BITS`] (32,768 pages: 128 MiB of 4 KiB pages). A
//! chunk whose bits are all clear or all set is one byte of state and no allocation; only a
//! chunk holding both gets its 4 KiB of words. So a fork's map of a 4 TiB region costs 256 KiB
//! of chunk slots until pages are served, and a snapshot's zero map of a sparse file costs
//! nothing for its holes: what a peer declares does not decide what pagerd allocates.

use std::collections::TryReserveError;

/// Bits per chunk.
pub const CHUNK_BITS: u64 = 1 << 15;
/// Words per chunk.
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// One chunk of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Every bit clear.
    Clear,
    /// Every bit set.
    Set,
    /// Some of each.
    Mixed(Box<[u64; CHUNK_WORDS]>),
}

impl Chunk {
    fn get(&self, bit: u64) -> bool {
        match self {
            Self::Clear => false,
            Self::Set => true,
            Self::Mixed(words) => words[(bit / 64) as usize] & (1 << (bit % 64)) != 0,
        }
    }

    /// The words, allocated from the uniform state if need be.
    fn words(&mut self) -> &mut [u64; CHUNK_WORDS] {
        if let Self::Clear | Self::Set = self {
            let word = if *self == Self::Set { u64::MAX } else { 0 };
            *self = Self::Mixed(Box::new([word; CHUNK_WORDS]));
        }
        match self {
            Self::Mixed(words) => words,
            Self::Clear | Self::Set => unreachable!("made mixed above"),
        }
    }

    fn count_ones(&self) -> u64 {
        match self {
            Self::Clear => 0,
            Self::Set => CHUNK_BITS,
            Self::Mixed(words) => words.iter().map(|w| u64::from(w.count_ones())).sum(),
        }
    }
}

/// A fixed-size set of page indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    chunks: Vec<Chunk>,
    len: u64,
}

impl Bitmap {
    /// `len` bits, all clear. Aborts if the chunk table cannot be had: for sizes a peer
    /// chose, use [`try_new`](Self::try_new).
    pub fn new(len: u64) -> Self {
        Self::try_new(len).expect("bitmap fits in memory")
    }

    /// `len` bits, all clear, or an error if the chunk table (one byte-sized slot per
    /// [`CHUNK_BITS`]) cannot be allocated.
    pub fn try_new(len: u64) -> Result<Self, TryReserveError> {
        let chunks = usize::try_from(len.div_ceil(CHUNK_BITS)).unwrap_or(usize::MAX);
        let mut v = Vec::new();
        v.try_reserve_exact(chunks)?;
        v.resize(chunks, Chunk::Clear);
        Ok(Self { chunks: v, len })
    }

    /// How many bits the map holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether bit `i` is set. Bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.chunks[(i / CHUNK_BITS) as usize].get(i % CHUNK_BITS)
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of {}", self.len);
        let chunk = &mut self.chunks[(i / CHUNK_BITS) as usize];
        if *chunk == Chunk::Set {
            return;
        }
        let bit = i % CHUNK_BITS;
        chunk.words()[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// Sets or clears bits `start..end` (clamped to the map): whole chunks without touching
    /// words, the rest a word at a time.
    pub fn fill(&mut self, start: u64, end: u64, value: bool) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let chunk = &mut self.chunks[(i / CHUNK_BITS) as usize];
            let chunk_start = i - i % CHUNK_BITS;
            let chunk_end = (chunk_start + CHUNK_BITS).min(end);
            let uniform = if value { Chunk::Set } else { Chunk::Clear };
            if i == chunk_start && chunk_end - chunk_start == CHUNK_BITS {
                *chunk = uniform;
            } else if *chunk != uniform {
                fill_words(
                    chunk.words(),
                    i - chunk_start,
                    chunk_end - chunk_start,
                    value,
                );
                // No scan back to a uniform state here: this runs per fault; a fill of a
                // whole chunk is made uniform above.
            }
            i = chunk_end;
        }
    }

    /// How many bits are set.
    pub fn count_ones(&self) -> u64 {
        let whole: u64 = self.chunks.iter().map(Chunk::count_ones).sum();
        // A last, partial chunk set whole counts only the bits that exist.
        let tail = self.len % CHUNK_BITS;
        match self.chunks.last() {
            Some(Chunk::Set) if tail != 0 => whole - (CHUNK_BITS - tail),
            _ => whole,
        }
    }

    /// The runs of set bits, as `start..end` ranges in order: whole chunks at once, mixed
    /// ones a word at a time.
    pub fn set_runs(&self) -> Vec<std::ops::Range<u64>> {
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        let mut add = |start: u64, end: u64| match runs.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => runs.push(start..end),
        };
        for (index, chunk) in self.chunks.iter().enumerate() {
            let base = index as u64 * CHUNK_BITS;
            match chunk {
                Chunk::Clear => {}
                Chunk::Set => add(base, (base + CHUNK_BITS).min(self.len)),
                Chunk::Mixed(words) => {
                    for (w, &word) in words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let first = u64::from(bits.trailing_zeros());
                            let ones = u64::from((bits >> first).trailing_ones());
                            let start = base + w as u64 * 64 + first;
                            add(start, (start + ones).min(self.len));
                            bits = if first + ones >= 64 {
                                0
                            } else {
                                bits & !(((1u64 << ones) - 1) << first)
                            };
                        }
                    }
                }
            }
        }
        runs
    }

    /// Bytes of words allocated (mixed chunks only), for accounting.
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Mixed(_)))
            .count()
            * CHUNK_WORDS
            * 8
    }
}

/// Sets or clears bits `start..end` of one chunk's words.
fn fill_words(words: &mut [u64; CHUNK_WORDS], start: u64, end: u64, value: bool) {
    let mut i = start;
    while i < end {
        let bit = i % 64;
        let n = (64 - bit).min(end - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let word = &mut words[(i / 64) as usize];
        if value {
            *word |= mask;
        } else {
            *word &= !mask;
        }
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_runs_are_the_set_bits_in_order_across_chunks_and_words() {
        let len = 3 * CHUNK_BITS + 100;
        let mut b = Bitmap::new(len);
        let runs = [
            0..1,
            63..65,
            127..128,
            CHUNK_BITS - 2..2 * CHUNK_BITS + 5,
            3 * CHUNK_BITS + 90..len,
        ];
        for r in &runs {
            b.fill(r.start, r.end, true);
        }
        assert_eq!(b.set_runs(), runs);
        let mut full = Bitmap::new(len);
        full.fill(0, len, true);
        let whole = full.set_runs();
        assert_eq!(whole.len(), 1);
        assert_eq!(
            whole[0],
            0..len,
            "a last partial chunk ends at the map's end"
        );
        assert!(Bitmap::new(len).set_runs().is_empty());
    }

    #[test]
    fn set_fill_and_count() {
        let mut b = Bitmap::new(130);
        b.set(0);
        b.set(129);
        b.fill(60, 70, true);
        assert!(b.get(0) && b.get(129) && b.get(60) && b.get(69) && !b.get(70) && !b.get(59));
        assert_eq!(b.count_ones(), 12);
        b.fill(0, 1000, false);
        assert_eq!(b.count_ones(), 0);
        assert!(!b.get(500));
    }

    #[test]
    fn fill_matches_bit_by_bit_on_every_boundary() {
        for (start, end) in [
            (0, 0),
            (0, 1),
            (0, 64),
            (0, 65),
            (63, 65),
            (64, 128),
            (1, 200),
            (100, 100),
            (120, 500),
            (5, 3),
        ] {
            for base in [0, CHUNK_BITS - 100] {
                let (start, end) = (base + start, base + end);
                let len = base + 200;
                let mut fast = Bitmap::new(len);
                fast.fill(start, end, true);
                let expected: Vec<bool> =
                    (0..len).map(|i| i >= start && i < end.min(len)).collect();
                let got: Vec<bool> = (0..len).map(|i| fast.get(i)).collect();
                assert_eq!(got, expected, "{start}..{end}");
                fast.fill(0, len, true);
                fast.fill(start, end, false);
                let got: Vec<bool> = (0..len).map(|i| !fast.get(i)).collect();
                assert_eq!(got, expected, "clearing {start}..{end}");
            }
        }
    }

    #[test]
    fn uniform_chunks_cost_nothing_and_a_whole_fill_makes_them_uniform_again() {
        // 4 TiB of 4 KiB pages.
        let pages = 1u64 << 30;
        let mut map = Bitmap::try_new(pages).unwrap();
        assert_eq!(map.allocated_bytes(), 0);
        map.fill(0, pages, true);
        assert_eq!((map.count_ones(), map.allocated_bytes()), (pages, 0));
        map.fill(5, 6, false);
        assert_eq!(map.count_ones(), pages - 1);
        assert_eq!(map.allocated_bytes(), 4096, "one chunk became mixed");
        map.set(5);
        map.fill(0, CHUNK_BITS, true);
        assert_eq!(map.allocated_bytes(), 0, "and uniform again");
        let mut fork = Bitmap::try_new(pages).unwrap();
        for page in (0..pages).step_by(1 << 20) {
            fork.set(page);
        }
        assert_eq!(fork.count_ones(), 1024);
        assert_eq!(
            fork.allocated_bytes(),
            1024 * 4096,
            "pages used, not pages declared"
        );
    }

    #[test]
    fn a_partial_last_chunk_counts_only_its_bits() {
        let mut map = Bitmap::new(CHUNK_BITS + 100);
        map.fill(0, CHUNK_BITS + 100, true);
        assert_eq!(map.count_ones(), CHUNK_BITS + 100);
        assert!(map.get(CHUNK_BITS + 99) && !map.get(CHUNK_BITS + 100));
        map.fill(CHUNK_BITS, CHUNK_BITS + 100, false);
        assert_eq!(map.count_ones(), CHUNK_BITS);
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        assert!(Bitmap::try_new(u64::MAX).is_err());
        assert_eq!(Bitmap::try_new(0).unwrap().len(), 0);
        assert_eq!(Bitmap::try_new(0).unwrap().len(), 0);
    }
}
