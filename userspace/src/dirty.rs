//! The dirty map: one bit per fixed-size unit of a disk, in `AtomicU64`
//! words, set by the tracker thread and taken (read and cleared) by the
//! replication engine.
//!
//! Memory: one bit per unit, so 2 MiB per TiB at the default 64 KiB unit
//! (`bytes_per_tib`). Taking a bit clears it *before* the caller reads the
//! data, so a write that lands after the take marks the unit again and the
//! unit is sent again in a later round: a copy can be early, never stale.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors building a dirty map.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The unit is unusable.
    #[error("dirty-map unit {0} bytes is not valid: give a power of two from 4 KiB to 1 GiB")]
    Unit(u64),
}

/// Bits over `[0, disk_size)` in units of `unit` bytes.
#[derive(Debug)]
pub struct DirtyMap {
    words: Box<[AtomicU64]>,
    unit: u64,
    unit_shift: u32,
    disk_size: u64,
    units: u64,
}

impl DirtyMap {
    /// An all-clean map of `disk_size` bytes.
    pub fn new(disk_size: u64, unit: u64) -> Result<DirtyMap, DirtyError> {
        if !unit.is_power_of_two() || !(4096..=1 << 30).contains(&unit) {
            return Err(DirtyError::Unit(unit));
        }
        let units = disk_size.div_ceil(unit);
        let words = (0..units.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(DirtyMap {
            words,
            unit,
            unit_shift: unit.trailing_zeros(),
            disk_size,
            units,
        })
    }

    /// Memory the bits take for one TiB at `unit`.
    pub fn bytes_per_tib(unit: u64) -> u64 {
        (1u64 << 40) / unit / 8
    }

    pub fn unit(&self) -> u64 {
        self.unit
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of units (the last may be short).
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Byte range of unit `index`, clipped to the disk.
    pub fn unit_range(&self, index: u64) -> Range<u64> {
        let start = index << self.unit_shift;
        start..(start + self.unit).min(self.disk_size)
    }

    /// Marks every unit that `[offset, offset + len)` touches. Ranges past the
    /// end are clipped (a request straddling the end still marks the last unit).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let first = offset >> self.unit_shift;
        let last = (end - 1) >> self.unit_shift;
        self.mark_units(first..last + 1);
    }

    /// Marks units `range` (clipped to the map).
    pub fn mark_units(&self, range: Range<u64>) {
        for (_, word, mask) in self.word_masks(range) {
            word.fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// The words that hold units `range` (clipped to the map), in order:
    /// each as its first unit, the word itself, and the mask of the range's
    /// bits in it.
    fn word_masks(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &AtomicU64, u64)> {
        let end = range.end.min(self.units);
        let mut i = range.start;
        std::iter::from_fn(move || {
            if i >= end {
                return None;
            }
            let word = i / 64;
            let bit = i % 64;
            let n = (end - i).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            i += n;
            let at = usize::try_from(word).expect("a word of the map, which is in memory");
            Some((word * 64, &self.words[at], mask))
        })
    }

    /// Marks the whole disk: what a gap in the trace means.
    pub fn mark_all(&self) {
        self.mark_units(0..self.units);
    }

    /// Whether unit `index` is dirty (without clearing it).
    pub fn is_dirty(&self, index: u64) -> bool {
        index < self.units
            && self.words[(index / 64) as usize].load(Ordering::Acquire) & (1 << (index % 64)) != 0
    }

    /// Number of dirty units right now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Bytes the dirty units cover (the last unit counts only its part on the disk).
    pub fn dirty_bytes(&self) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let last = self.units - 1;
        let short = self.unit - (self.unit_range(last).end - self.unit_range(last).start);
        count * self.unit - if self.is_dirty(last) { short } else { 0 }
    }

    /// Takes (clears and returns) the dirty units inside units `range`
    /// (clipped to the map), as runs of unit indices in disk order.
    pub fn take_units(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (first, word, mask) in self.word_masks(range) {
            let mut rest = word.fetch_and(!mask, Ordering::AcqRel) & mask;
            while rest != 0 {
                let index = first + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                match runs.last_mut() {
                    Some(run) if run.end == index => run.end = index + 1,
                    _ => runs.push(index..index + 1),
                }
            }
        }
        runs
    }

    /// Takes (clears and returns) the dirty units of units `within` (clipped
    /// to the map), as byte runs of at most `max_run` bytes (rounded down to
    /// whole units, at least one), in disk order, until `budget` runs are
    /// collected. Returns the runs and the unit to continue from.
    pub fn take_runs(
        &self,
        within: Range<u64>,
        max_run: u64,
        budget: usize,
    ) -> (Vec<Range<u64>>, u64) {
        let per_run = (max_run >> self.unit_shift).max(1);
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut next = within.start;
        for (first, word, mask) in self.word_masks(within.clone()) {
            if runs.len() >= budget {
                break;
            }
            let mut rest = word.fetch_and(!mask, Ordering::AcqRel) & mask;
            while rest != 0 {
                let index = first + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let range = self.unit_range(index);
                match runs.last_mut() {
                    Some(run)
                        if run.end == range.start
                            && (run.end - run.start) >> self.unit_shift < per_run =>
                    {
                        run.end = range.end;
                    }
                    _ => runs.push(range),
                }
            }
            // The unit after the mask's last bit.
            next = first + 64 - u64::from(mask.leading_zeros());
        }
        (runs, next)
    }

    /// Clears the units lying wholly inside `[start, end)` (the end of the
    /// disk counts as a unit's end); returns their indices. A caller that is
    /// about to read those units takes them this way so that a write landing
    /// after the read marks them again.
    pub fn clear_within(&self, start: u64, end: u64) -> Range<u64> {
        let first = start.div_ceil(self.unit);
        let last = if end >= self.disk_size {
            self.units
        } else {
            end / self.unit
        };
        if first >= last {
            return first..first;
        }
        for (_, word, mask) in self.word_masks(first..last) {
            word.fetch_and(!mask, Ordering::AcqRel);
        }
        first..last
    }

    /// Takes (clears and returns) the dirty units lying wholly inside
    /// `[start, end)` (the end of the disk counts as a unit's end), as runs
    /// of unit indices: the units a caller about to read that range must
    /// account for (the clean ones are already accounted for).
    pub fn take_within(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let first = start.div_ceil(self.unit);
        let last = if end >= self.disk_size {
            self.units
        } else {
            end / self.unit
        };
        self.take_units(first..last.max(first))
    }

    /// Whether every unit `[offset, offset + len)` touches is marked.
    pub fn all_marked(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.disk_size {
            return false;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let first = offset >> self.unit_shift;
        let last = (end - 1) >> self.unit_shift;
        self.word_masks(first..last + 1)
            .all(|(_, word, mask)| word.load(Ordering::Acquire) & mask == mask)
    }

    /// The map as bytes: bit `i % 8` of byte `i / 8` is unit `i` (the
    /// post-copy map's wire form), `units / 8` bytes rounded up.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = usize::try_from(self.units.div_ceil(8)).expect("a map held in memory");
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .take(len)
            .collect()
    }

    /// Marks the units set in `bytes` (the form [`DirtyMap::to_bytes`]
    /// makes); returns how many were set there.
    pub fn mark_bytes(&self, bytes: &[u8]) -> u64 {
        self.set_bytes(bytes, true)
    }

    /// Clears the units set in `bytes`; returns how many were set there.
    pub fn clear_bytes(&self, bytes: &[u8]) -> u64 {
        self.set_bytes(bytes, false)
    }

    fn set_bytes(&self, bytes: &[u8], on: bool) -> u64 {
        let mut count = 0;
        for (i, byte) in bytes.iter().enumerate() {
            let mut rest = *byte;
            while rest != 0 {
                let unit = (i as u64) * 8 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                if on {
                    self.mark_units(unit..unit + 1);
                } else {
                    self.take_units(unit..unit + 1);
                }
                count += 1;
            }
        }
        count
    }

    /// Takes every dirty unit, as runs of at most `max_run` bytes.
    pub fn take_all(&self, max_run: u64) -> Vec<Range<u64>> {
        self.take_runs(0..self.units, max_run, usize::MAX).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_byte_form_has_one_bit_per_unit_in_order() {
        let map = DirtyMap::new(70 * 4096, 4096).expect("map");
        map.mark_units(0..1);
        map.mark_units(9..10);
        map.mark_units(69..70);
        let bytes = map.to_bytes();
        assert_eq!(bytes.len(), 9);
        assert_eq!((bytes[0], bytes[1], bytes[8]), (0b1, 0b10, 0b10_0000));
        assert_eq!(bytes.iter().map(|b| b.count_ones()).sum::<u32>(), 3);
        map.mark_units(10..69);
        assert!(map.all_marked(9 * 4096, 61 * 4096));
        assert!(map.all_marked(69 * 4096 + 5, 1 << 20), "clipped at the end");
        assert!(!map.all_marked(8 * 4096, 2 * 4096));
        assert!(!map.all_marked(0, 0));
        let again = DirtyMap::new(70 * 4096, 4096).expect("map");
        assert_eq!(again.mark_bytes(&bytes), 3);
        assert_eq!(again.to_bytes(), bytes);
        assert_eq!(again.clear_bytes(&[0b1]), 1);
        assert_eq!(again.count(), 2);
    }

    #[test]
    fn refuses_a_unit_that_is_not_a_power_of_two() {
        assert!(DirtyMap::new(1 << 20, 3000).is_err());
        assert!(DirtyMap::new(1 << 20, 2048).is_err());
        assert!(DirtyMap::new(1 << 20, 65536).is_ok());
    }

    #[test]
    fn a_write_straddling_units_marks_both_and_take_coalesces() {
        let map = DirtyMap::new(1 << 20, 4096).expect("map");
        map.mark(4095, 2);
        assert_eq!(map.count(), 2);
        assert_eq!(map.take_all(1 << 20), vec![0..8192]);
        assert_eq!(map.count(), 0);
    }

    #[test]
    fn the_short_last_unit_counts_only_its_bytes() {
        let map = DirtyMap::new(10_000, 4096).expect("map");
        map.mark_all();
        assert_eq!(map.dirty_bytes(), 10_000);
        assert_eq!(map.take_all(1 << 20), vec![0..10_000]);
        map.mark(9999, 100);
        assert_eq!(map.take_all(1 << 20), vec![8192..10_000]);
    }

    #[test]
    fn runs_are_cut_at_max_run_and_resume_where_they_stopped() {
        let map = DirtyMap::new(1 << 30, 65536).expect("map");
        map.mark(0, 1 << 30);
        let (runs, next) = map.take_runs(0..u64::MAX, 1 << 20, 3);
        assert!(runs.len() >= 3);
        assert!(runs.iter().all(|r| r.end - r.start == 1 << 20));
        assert!(next > 0);
        let rest = map.take_all(1 << 20);
        let total: u64 = runs.iter().chain(&rest).map(|r| r.end - r.start).sum();
        assert_eq!(total, 1 << 30);
    }

    #[test]
    fn clear_within_clears_only_whole_units_inside() {
        let map = DirtyMap::new(10_000, 4096).expect("map");
        map.mark_all();
        assert_eq!(map.clear_within(100, 8192), 1..2);
        assert!(map.is_dirty(0) && !map.is_dirty(1) && map.is_dirty(2));
        // The short last unit counts as whole when the range reaches the disk's end.
        assert_eq!(map.clear_within(8192, 10_000), 2..3);
        assert_eq!(map.count(), 1);
        assert_eq!(map.clear_within(4096, 5000), 1..1);
    }

    #[test]
    fn take_units_takes_only_the_dirty_units_inside_the_range() {
        let map = DirtyMap::new(1 << 20, 4096).expect("map");
        for unit in [3u64, 62, 63, 64, 65, 130, 200, 255] {
            map.mark_units(unit..unit + 1);
        }
        assert_eq!(map.take_units(60..131), vec![62..66, 130..131]);
        assert!(map.is_dirty(3) && map.is_dirty(200) && !map.is_dirty(64));
        // Clipped to the map's 256 units.
        assert_eq!(map.take_units(199..1000), vec![200..201, 255..256]);
        assert_eq!(map.take_units(0..256), vec![3..4]);
        assert_eq!(map.count(), 0);
        // Within a byte range: only whole units, the short end counting as whole.
        map.mark_units(0..256);
        assert_eq!(map.take_within(100, 3 * 4096 + 5), vec![1..3]);
        assert_eq!(map.take_within(255 * 4096, u64::MAX), vec![255..256]);
        assert!(map.is_dirty(0) && map.is_dirty(3));
        assert_eq!(map.count(), 256 - 3);
        // Runs taken below a bound leave the units past it.
        map.take_units(0..256);
        map.mark_units(0..256);
        let (runs, next) = map.take_runs(10..70, 1 << 20, usize::MAX);
        assert_eq!(next, 70);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0], 10 * 4096..70 * 4096);
        assert_eq!(map.count(), 256 - 60);
    }

    #[test]
    fn memory_is_two_mib_per_tib_at_64k() {
        assert_eq!(DirtyMap::bytes_per_tib(65536), 2 << 20);
    }

    proptest! {
        #[test]
        fn take_returns_exactly_the_marked_units(
            marks in proptest::collection::vec((0u64..5_000_000, 1u64..300_000), 0..40),
            max_run in prop::sample::select(vec![4096u64, 65536, 1 << 20]),
        ) {
            let size = 5_000_000u64;
            let map = DirtyMap::new(size, 4096).expect("map");
            let mut want = vec![false; size.div_ceil(4096) as usize];
            for &(off, len) in &marks {
                map.mark(off, len);
                let end = (off + len).min(size);
                for u in off / 4096..=(end - 1) / 4096 {
                    want[u as usize] = true;
                }
            }
            let runs = map.take_all(max_run);
            let mut got = vec![false; want.len()];
            for r in &runs {
                prop_assert!(r.end - r.start <= max_run.max(4096));
                prop_assert!(r.start % 4096 == 0);
                for u in r.start / 4096..r.end.div_ceil(4096) {
                    prop_assert!(!got[u as usize], "unit {} twice", u);
                    got[u as usize] = true;
                }
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(map.count(), 0);
        }
    }
}
