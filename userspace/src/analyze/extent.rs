//! Per-extent statistics at one resolution: which units were ever read or
//! written (bitmaps, 1 bit per unit), which were dirtied in the current
//! window (the dirty rate), and at coarse resolutions full counters per
//! extent (reads, writes, bytes, first and last access and write) from which
//! inter-access and rewrite intervals follow.

use serde::Serialize;

/// One bit per unit, grown on demand up to the highest unit touched, with a
/// running count of set bits.
#[derive(Debug, Default, Clone)]
pub struct UnitBits {
    words: Vec<u64>,
    ones: u64,
}

impl UnitBits {
    pub fn with_units(units: u64) -> UnitBits {
        UnitBits {
            // A size hint: a count past usize starts empty and grows on demand.
            words: vec![0; usize::try_from(units.div_ceil(64)).unwrap_or(0)],
            ones: 0,
        }
    }

    pub fn ones(&self) -> u64 {
        self.ones
    }

    pub fn bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    pub fn get(&self, unit: u64) -> bool {
        self.words
            .get((unit / 64) as usize)
            .is_some_and(|w| w & (1 << (unit % 64)) != 0)
    }

    /// Sets units `first..=last`; returns how many were newly set, and pushes
    /// the index of every word that was all zero before onto `touched`.
    #[inline]
    pub fn set_range(&mut self, first: u64, last: u64, touched: Option<&mut Vec<usize>>) -> u64 {
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        if w1 >= self.words.len() {
            // Grow geometrically so a trace without a known size pays O(1) amortised.
            let want = (w1 + 1).max(self.words.len() * 2);
            self.words.resize(want, 0);
        }
        let mut newly = 0u64;
        let mut touched = touched;
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let old = self.words[w];
            let new = old | mask;
            if new != old {
                newly += u64::from((new ^ old).count_ones());
                if old == 0
                    && let Some(t) = touched.as_deref_mut()
                {
                    t.push(w);
                }
                self.words[w] = new;
            }
        }
        self.ones += newly;
        newly
    }

    /// Clears the listed words (those `set_range` reported), and empties the list.
    pub fn clear_words(&mut self, touched: &mut Vec<usize>) {
        for &w in touched.iter() {
            if let Some(word) = self.words.get_mut(w) {
                self.ones -= u64::from(word.count_ones());
                *word = 0;
            }
        }
        touched.clear();
    }
}

/// A hint to load `slice[i]` into the cache; no effect on results.
#[inline]
pub fn prefetch<T>(slice: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = slice.get(i) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is only a hint and never faults; `p` is a valid reference
        // anyway, and SSE is part of the x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(p).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (slice, i);
}

/// Counters of one extent. Timestamps are ns since the trace began; a mean
/// interval is (last − first) / (count − 1), so no per-access history is kept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExtentStats {
    pub reads: u32,
    pub writes: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub first_write_ns: u64,
    pub last_write_ns: u64,
}

impl ExtentStats {
    pub fn accesses(&self) -> u64 {
        u64::from(self.reads) + u64::from(self.writes)
    }
    pub fn bytes(&self) -> u64 {
        self.read_bytes + self.write_bytes
    }
    /// Mean time between two accesses, if there were at least two.
    pub fn mean_interval_ns(&self) -> Option<u64> {
        (self.accesses() >= 2).then(|| (self.last_ns - self.first_ns) / (self.accesses() - 1))
    }
    /// Mean time between two writes, if there were at least two.
    pub fn mean_rewrite_ns(&self) -> Option<u64> {
        (self.writes >= 2)
            .then(|| (self.last_write_ns - self.first_write_ns) / u64::from(self.writes - 1))
    }
}

/// A log2 histogram of nanosecond intervals: bucket i holds [2^i, 2^(i+1)).
#[derive(Debug, Clone, Copy)]
pub struct IntervalHistogram(pub [u64; 64]);

impl Default for IntervalHistogram {
    fn default() -> Self {
        IntervalHistogram([0; 64])
    }
}

impl IntervalHistogram {
    #[inline]
    pub fn add(&mut self, ns: u64) {
        self.0[63 - ns.max(1).leading_zeros() as usize] += 1;
    }
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }
    /// The upper bound of the bucket holding quantile `q`, or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a rank: q is a fraction, so the product lies in 0..=total, and `as` saturates (NaN to 0)"
        )]
        let want = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(1u64 << (i + 1).min(63));
            }
        }
        None
    }
}

/// Everything kept at one resolution.
#[derive(Debug)]
pub struct Level {
    pub shift: u32,
    pub read_ever: UnitBits,
    pub written_ever: UnitBits,
    /// Units written in the current base window, and which words to clear.
    window: UnitBits,
    window_words: Vec<usize>,
    /// Units newly dirtied in the current window / first written ever in it.
    pub window_dirty: u64,
    pub window_new: u64,
    /// Full counters per extent, kept at coarse resolutions only.
    pub stats: Option<Vec<ExtentStats>>,
    pub access_intervals: IntervalHistogram,
    pub rewrite_intervals: IntervalHistogram,
}

impl Level {
    pub fn new(unit: u64, device_bytes: u64, with_stats: bool) -> Level {
        let shift = unit.trailing_zeros();
        let units = device_bytes.div_ceil(unit);
        Level {
            shift,
            read_ever: UnitBits::with_units(units),
            written_ever: UnitBits::with_units(units),
            window: UnitBits::with_units(units),
            window_words: Vec::new(),
            window_dirty: 0,
            window_new: 0,
            // A size hint: a count past usize starts empty and grows on demand.
            stats: with_stats
                .then(|| vec![ExtentStats::default(); usize::try_from(units).unwrap_or(0)]),
            access_intervals: IntervalHistogram::default(),
            rewrite_intervals: IntervalHistogram::default(),
        }
    }

    pub fn unit(&self) -> u64 {
        1 << self.shift
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.read_ever.bytes()
            + self.written_ever.bytes()
            + self.window.bytes()
            + self.window_words.capacity() * std::mem::size_of::<usize>()
            + self
                .stats
                .as_ref()
                .map_or(0, |s| s.capacity() * std::mem::size_of::<ExtentStats>())
    }

    /// One request of `len > 0` bytes at `offset`.
    #[inline]
    pub fn access(&mut self, ts: u64, offset: u64, len: u64, write: bool) {
        let first = offset >> self.shift;
        let last = (offset + len - 1) >> self.shift;
        if write {
            self.window_dirty += self
                .window
                .set_range(first, last, Some(&mut self.window_words));
            self.window_new += self.written_ever.set_range(first, last, None);
        } else {
            self.read_ever.set_range(first, last, None);
        }
        let Some(stats) = &mut self.stats else {
            return;
        };
        // Units index memory: one past usize could not be held, so it saturates
        // and the resize fails loudly instead of counting on another extent.
        let (first_i, last_i) = (
            usize::try_from(first).unwrap_or(usize::MAX),
            usize::try_from(last).unwrap_or(usize::MAX),
        );
        if last_i >= stats.len() {
            let want = last_i.saturating_add(1).max(stats.len() * 2);
            stats.resize(want, ExtentStats::default());
        }
        let unit = 1u64 << self.shift;
        for (s, e) in stats[first_i..=last_i].iter_mut().zip(first..) {
            let lo = offset.max(e << self.shift);
            let hi = (offset + len).min((e << self.shift) + unit);
            let part = hi - lo;
            if s.accesses() == 0 {
                s.first_ns = ts;
            } else {
                self.access_intervals.add(ts.saturating_sub(s.last_ns));
            }
            s.last_ns = s.last_ns.max(ts);
            if write {
                if s.writes == 0 {
                    s.first_write_ns = ts;
                } else {
                    self.rewrite_intervals
                        .add(ts.saturating_sub(s.last_write_ns));
                }
                s.last_write_ns = s.last_write_ns.max(ts);
                s.writes = s.writes.saturating_add(1);
                s.write_bytes += part;
            } else {
                s.reads = s.reads.saturating_add(1);
                s.read_bytes += part;
            }
        }
    }

    /// Asks the CPU to start loading what `access` at `offset` will touch, so
    /// that the cache misses of several requests overlap instead of queueing.
    #[inline]
    pub fn prefetch(&self, offset: u64, write: bool) {
        let first = offset >> self.shift;
        let word = (first / 64) as usize;
        if write {
            prefetch(&self.window.words, word);
            prefetch(&self.written_ever.words, word);
        } else {
            prefetch(&self.read_ever.words, word);
        }
        if let Some(stats) = &self.stats {
            // A hint: an index past usize is simply out of range.
            prefetch(stats, usize::try_from(first).unwrap_or(usize::MAX));
        }
    }

    /// Ends the current base window: returns (units dirtied, units first written) in it.
    pub fn close_window(&mut self) -> (u64, u64) {
        let out = (self.window_dirty, self.window_new);
        self.window.clear_words(&mut self.window_words);
        self.window_dirty = 0;
        self.window_new = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges_count_new_units_across_word_edges() {
        let mut b = UnitBits::with_units(10);
        let mut touched = Vec::new();
        assert_eq!(b.set_range(60, 130, Some(&mut touched)), 71);
        assert_eq!(touched, vec![0, 1, 2]);
        assert_eq!(b.set_range(0, 200, None), 201 - 71);
        assert_eq!(b.ones(), 201);
        assert!(b.get(200) && !b.get(201));
        b.clear_words(&mut touched);
        // Words 0..=2 cleared: units 192..=200 in word 3 remain.
        assert_eq!(b.ones(), 9);
        assert!(touched.is_empty());
    }

    #[test]
    fn a_request_spanning_extents_splits_its_bytes() {
        let mut l = Level::new(1 << 20, 4 << 20, true);
        l.access(10, (1 << 20) - 4096, 8192, true);
        let s = l.stats.as_ref().expect("stats level");
        assert_eq!(s[0].write_bytes, 4096);
        assert_eq!(s[1].write_bytes, 4096);
        assert_eq!(l.window_dirty, 2);
        l.access(1_000_010, 0, 4096, true);
        let s = l.stats.as_ref().expect("stats level");
        assert_eq!(s[0].mean_rewrite_ns(), Some(1_000_000));
        assert_eq!(l.rewrite_intervals.count(), 1);
        assert_eq!(l.close_window(), (2, 2));
        assert_eq!(l.close_window(), (0, 0));
    }

    #[test]
    fn histogram_quantiles_are_bucket_upper_bounds() {
        let mut h = IntervalHistogram::default();
        for ns in [1000, 1000, 1000, 1_000_000] {
            h.add(ns);
        }
        assert_eq!(h.quantile(0.5), Some(1024));
        assert_eq!(h.quantile(1.0), Some(1 << 20));
        assert_eq!(IntervalHistogram::default().quantile(0.5), None);
    }
}
