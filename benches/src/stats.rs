//! Small statistics over a handful of samples: median, range, pair-by-pair ratios.

use serde::Serialize;

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

/// Summarizes `samples`, ignoring NaNs; `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
        n,
    })
}

/// The ratios `ours[i] / theirs[i]` over the pairs where both are present and
/// `theirs[i]` is positive, summarized.
pub fn pair_ratios(ours: &[Option<f64>], theirs: &[Option<f64>]) -> Option<Summary> {
    let ratios: Vec<f64> = ours
        .iter()
        .zip(theirs)
        .filter_map(|pair| match pair {
            (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect();
    summarize(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = summarize(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_pair_by_pair() {
        let ours = [Some(1.0), None, Some(3.0), Some(2.0)];
        let theirs = [Some(2.0), Some(1.0), Some(3.0), Some(0.0)];
        let s = pair_ratios(&ours, &theirs).unwrap();
        assert_eq!(s.n, 2);
        assert_eq!(s.median, 0.75);
        assert_eq!((s.min, s.max), (0.5, 1.0));
    }
}
