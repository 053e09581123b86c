//! The recent past, for the live view's charts: a ring of samples, one per
//! refresh, and the same series squeezed into however many columns a
//! chart has. Pure: fed numbers, read as series.

use std::collections::VecDeque;

/// Samples kept: ten minutes at the default one-second refresh.
pub const CAPACITY: usize = 600;

/// A fixed-size history of one number, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    samples: VecDeque<u64>,
    capacity: usize,
}

impl Default for Ring {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl Ring {
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// Adds the newest sample, dropping the oldest when full.
    pub fn push(&mut self, value: u64) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(value);
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    #[must_use]
    pub fn last(&self) -> Option<u64> {
        self.samples.back().copied()
    }

    #[must_use]
    pub fn max(&self) -> u64 {
        self.samples.iter().copied().max().unwrap_or(0)
    }

    /// The history in at most `width` values, newest last. A wider history
    /// is cut into spans of equal length counted back from the newest
    /// sample, as many as fill the width, each shown by its largest value,
    /// so a one-sample burst is never averaged away; a shorter one is
    /// shown as it is.
    #[must_use]
    pub fn window(&self, width: usize) -> Vec<u64> {
        let n = self.samples.len();
        if width == 0 || n == 0 {
            return Vec::new();
        }
        if n <= width {
            return self.samples.iter().copied().collect();
        }
        let per = n / width;
        let (older, newer) = self.samples.as_slices();
        let all: Vec<u64> = older.iter().chain(newer).copied().collect();
        let mut columns: Vec<u64> = all
            .rchunks(per)
            .take(width)
            .map(|chunk| chunk.iter().copied().max().unwrap_or(0))
            .collect();
        columns.reverse();
        columns
    }
}

/// The header's numbers over time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trends {
    /// Closes per second by side (whole numbers: charts need no fractions).
    pub active_per_s: Ring,
    pub passive_per_s: Ring,
    pub time_wait_traced: Ring,
    pub time_wait_kernel: Ring,
    pub close_wait_now: Ring,
    /// Events lost during each interval.
    pub lost: Ring,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(values: impl IntoIterator<Item = u64>, capacity: usize) -> Ring {
        let mut r = Ring::with_capacity(capacity);
        for v in values {
            r.push(v);
        }
        r
    }

    #[test]
    fn a_full_ring_drops_its_oldest_sample() {
        let r = ring(1..=5, 3);
        assert_eq!(r.window(10), [3, 4, 5]);
        assert_eq!((r.len(), r.last(), r.max()), (3, Some(5), 5));
    }

    #[test]
    fn a_short_history_is_shown_as_it_is() {
        assert_eq!(ring([7, 8], 600).window(40), [7, 8]);
        assert!(ring([], 600).window(40).is_empty());
        assert!(ring([1], 600).window(0).is_empty());
    }

    #[test]
    fn a_long_history_keeps_every_burst_when_squeezed() {
        // 600 quiet seconds with one burst: squeezed into 60 columns of
        // 10 samples, the burst survives as its column's maximum.
        let mut values = vec![1; 600];
        values[333] = 900;
        let w = ring(values, 600).window(60);
        assert_eq!(w.len(), 60);
        assert_eq!(w.iter().filter(|&&v| v == 900).count(), 1);
        assert_eq!(w[33], 900);
        assert!(w.iter().all(|&v| v == 1 || v == 900));
    }

    #[test]
    fn the_newest_sample_is_always_in_the_last_column_and_the_width_filled() {
        let w = ring(0..100, 600).window(7);
        assert_eq!(w.len(), 7, "{w:?}");
        assert_eq!(w.last(), Some(&99));
        // 300 samples in 96 columns: three each, the oldest 12 left out.
        let w = ring(0..300, 600).window(96);
        assert_eq!((w.len(), w[0], w[95]), (96, 14, 299));
    }
}
