//! The replay plan: a working set cut into runs that install with few ioctls, roughly in
//! first-touch order.
//!
//! The ordered pages are cut into *waves* of [`WAVE_PAGES`]; within a wave pages are sorted by
//! number and consecutive pages of one kind (data or zeros) become one run, installed by one
//! `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`. Early waves hold what forks touched first, so a fork
//! that runs while its set is replayed mostly finds its next pages already there.

/// Pages per wave: large enough for long runs, small enough to keep the rough order.
pub const WAVE_PAGES: usize = 2048;

/// Consecutive snapshot pages installed by one ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First snapshot page (4 KiB units from the start of the memory file).
    pub page: u64,
    /// Pages.
    pub pages: u32,
    /// All zeros (installed as zero pages, no data stored).
    pub zero: bool,
}

/// Runs in replay order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The runs.
    pub runs: Vec<Run>,
}

impl Plan {
    /// The plan for `ordered` pages (no repeats), `is_zero` telling which are all zeros.
    pub fn new(ordered: &[u64], is_zero: impl Fn(u64) -> bool) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        for wave in ordered.chunks(WAVE_PAGES) {
            let mut wave = wave.to_vec();
            wave.sort_unstable();
            wave.dedup();
            let first = runs.len();
            for page in wave {
                let zero = is_zero(page);
                match runs[first..].last_mut() {
                    Some(run)
                        if run.zero == zero
                            && run.page + u64::from(run.pages) == page
                            && run.pages < u32::MAX =>
                    {
                        run.pages += 1
                    }
                    _ => runs.push(Run {
                        page,
                        pages: 1,
                        zero,
                    }),
                }
            }
        }
        Self { runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pages_of_one_kind_make_a_run() {
        let plan = Plan::new(&[7, 3, 4, 5, 10, 11, 12], |p| p >= 11);
        assert_eq!(
            plan.runs,
            vec![
                Run {
                    page: 3,
                    pages: 3,
                    zero: false
                },
                Run {
                    page: 7,
                    pages: 1,
                    zero: false
                },
                Run {
                    page: 10,
                    pages: 1,
                    zero: false
                },
                Run {
                    page: 11,
                    pages: 2,
                    zero: true
                },
            ]
        );
    }

    #[test]
    fn waves_keep_the_rough_order() {
        // A late page never comes before an early wave's.
        let late: Vec<u64> = (0..WAVE_PAGES as u64).map(|i| 100_000 + i).collect();
        let mut ordered = late.clone();
        ordered.extend(0..10);
        let plan = Plan::new(&ordered, |_| false);
        assert_eq!(plan.runs[0].page, 100_000);
        assert_eq!(plan.runs[0].pages as usize, WAVE_PAGES);
        assert_eq!(plan.runs[1].page, 0);
        assert_eq!(plan.runs.len(), 2);
    }
}
