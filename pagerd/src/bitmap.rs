//! A fixed-size bit set, one bit per page.

/// A fixed-size set of page indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).expect("bitmap fits in memory");
        Self {
            words: vec![0; words],
            len,
        }
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

    /// Sets or clears bits `start..end` (clamped to the map).
    pub fn fill(&mut self, start: u64, end: u64, value: bool) {
        for i in start..end.min(self.len) {
            let word = &mut self.words[(i / 64) as usize];
            if value {
                *word |= 1 << (i % 64);
            } else {
                *word &= !(1 << (i % 64));
            }
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
}
