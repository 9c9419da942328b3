//! A fixed-size bit set, one bit per page.

use std::collections::TryReserveError;

/// A fixed-size set of page indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` bits, all clear. Aborts if the memory cannot be had: for sizes a peer chose, use
    /// [`try_new`](Self::try_new).
    pub fn new(len: u64) -> Self {
        Self::try_new(len).expect("bitmap fits in memory")
    }

    /// `len` bits, all clear, or an error if that much memory cannot be allocated.
    pub fn try_new(len: u64) -> Result<Self, TryReserveError> {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        let mut v = Vec::new();
        v.try_reserve_exact(words)?;
        v.resize(words, 0);
        Ok(Self { words: v, len })
    }

    /// How many bits the map holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether bit `i` is set. Bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of {}", self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Sets or clears bits `start..end` (clamped to the map), a word at a time.
    pub fn fill(&mut self, start: u64, end: u64, value: bool) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let word = &mut self.words[(i / 64) as usize];
            if value {
                *word |= mask;
            } else {
                *word &= !mask;
            }
            i += n;
        }
    }

    /// How many bits are set.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let mut fast = Bitmap::new(200);
            fast.fill(start, end, true);
            let expected: Vec<bool> = (0..200).map(|i| i >= start && i < end.min(200)).collect();
            let got: Vec<bool> = (0..200).map(|i| fast.get(i)).collect();
            assert_eq!(got, expected, "{start}..{end}");
            fast.fill(0, 200, true);
            fast.fill(start, end, false);
            let got: Vec<bool> = (0..200).map(|i| !fast.get(i)).collect();
            assert_eq!(got, expected, "clearing {start}..{end}");
        }
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        assert!(Bitmap::try_new(u64::MAX).is_err());
        assert!(Bitmap::try_new(1 << 62).is_err());
        assert_eq!(Bitmap::try_new(0).unwrap().len(), 0);
        assert_eq!(Bitmap::try_new(0).unwrap().len(), 0);
    }
}
