//! Merging the first-touch traces of recorded forks into one ordered working set.
//!
//! Clones of one snapshot touch nearly the same *set* of pages, in orders that barely repeat.
//! So the merge keeps a set with a rough order: a page is kept when more than half of the
//! recorded forks touched it (one fork: everything it touched; two: what both touched, as
//! E2B does), and pages are ordered by the mean of their relative first-touch positions
//! (0 = first touch of a fork, 1 = its last), ties by page number.

use std::collections::HashMap;

/// One fork's trace: snapshot page numbers (4 KiB units) in first-touch order, no repeats.
pub type Trace = Vec<u64>;

/// The working set of `traces`: kept pages in rough first-touch order.
pub fn merge(traces: &[Trace]) -> Vec<u64> {
    let forks = traces.len();
    // page → (forks that touched it, sum of its relative positions)
    let mut seen: HashMap<u64, (usize, f64)> = HashMap::new();
    for trace in traces {
        let last = trace.len().saturating_sub(1).max(1) as f64;
        for (i, &page) in trace.iter().enumerate() {
            let entry = seen.entry(page).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += i as f64 / last;
        }
    }
    let mut kept: Vec<(f64, u64)> = seen
        .into_iter()
        .filter(|&(_, (count, _))| count * 2 > forks)
        .map(|(page, (count, sum))| (sum / count as f64, page))
        .collect();
    kept.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    kept.into_iter().map(|(_, page)| page).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fork_keeps_its_order() {
        assert_eq!(merge(&[vec![9, 3, 7, 1]]), vec![9, 3, 7, 1]);
        assert_eq!(merge(&[vec![]]), Vec::<u64>::new());
        assert_eq!(merge(&[]), Vec::<u64>::new());
    }

    #[test]
    fn two_forks_keep_what_both_touched_in_mean_order() {
        // 5 early in both, 8 late in both, 2 only in one fork.
        let merged = merge(&[vec![5, 2, 6, 8], vec![5, 6, 8]]);
        assert_eq!(merged, vec![5, 6, 8]);
    }

    #[test]
    fn three_forks_keep_a_majority() {
        let merged = merge(&[vec![1, 2, 3], vec![2, 3, 4], vec![3, 4, 5]]);
        let mut sorted = merged.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![2, 3, 4]);
        assert_eq!(merged[0], 2, "2 comes earliest on average");
    }
}
