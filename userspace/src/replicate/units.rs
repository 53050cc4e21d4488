//! Replication units larger than the dirty map's: a plan from the
//! granularity controller may give a zone of the disk a unit of, say, 1 MiB
//! while the dirty map tracks 4 KiB. Before a round reads its runs, each run
//! is widened to whole units of its zone, so a write sends its whole unit,
//! as the plan priced it.

use std::ops::Range;

/// A stretch of the disk replicated in units of `unit` bytes counted from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitZone {
    pub start: u64,
    pub end: u64,
    pub unit: u64,
}

/// Widens every run to whole units of the zones it touches, joins runs that
/// then overlap or touch, and cuts the result into pieces of at most
/// `max_len` bytes. `zones` are sorted and do not overlap; bytes outside
/// every zone are left as they are.
pub fn widen(runs: &[Range<u64>], zones: &[UnitZone], max_len: u64) -> Vec<Range<u64>> {
    let mut wide: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for run in runs {
        let mut r = run.clone();
        let first = zones.partition_point(|z| z.end <= r.start);
        if let Some(z) = zones
            .get(first)
            .filter(|z| z.start <= r.start && z.unit > 0)
        {
            r.start = z.start + (r.start - z.start) / z.unit * z.unit;
        }
        let last = zones.partition_point(|z| z.end < r.end);
        if let Some(z) = zones.get(last).filter(|z| z.start < r.end && z.unit > 0) {
            r.end = (z.start + (r.end - z.start).div_ceil(z.unit) * z.unit).min(z.end);
        }
        match wide.last_mut() {
            Some(prev) if r.start <= prev.end => prev.end = prev.end.max(r.end),
            _ => wide.push(r),
        }
    }
    let max_len = max_len.max(1);
    let mut out = Vec::with_capacity(wide.len());
    for r in wide {
        let mut at = r.start;
        while at < r.end {
            let end = (at + max_len).min(r.end);
            out.push(at..end);
            at = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn zones() -> Vec<UnitZone> {
        vec![
            UnitZone {
                start: 0,
                end: 16 * MIB,
                unit: 4096,
            },
            UnitZone {
                start: 16 * MIB,
                end: 32 * MIB,
                unit: MIB,
            },
            UnitZone {
                start: 32 * MIB,
                end: 40 * MIB,
                unit: 8 * MIB,
            },
        ]
    }

    #[test]
    fn a_4k_write_in_a_1m_zone_sends_its_whole_unit() {
        let run: Range<u64> = (17 * MIB + 4096)..(17 * MIB + 8192);
        let runs = std::slice::from_ref(&run);
        assert_eq!(widen(runs, &zones(), 8 * MIB), vec![(17 * MIB)..(18 * MIB)]);
    }

    #[test]
    fn runs_in_4k_zones_are_unchanged() {
        let runs = [4096..8192, 65536..69632];
        assert_eq!(widen(&runs, &zones(), MIB), runs.to_vec());
    }

    #[test]
    fn widened_runs_that_meet_are_joined_then_cut_at_the_extent_length() {
        // Two writes in the same 1 MiB unit and one in the next: two units, one run.
        let runs = [
            (16 * MIB + 4096)..(16 * MIB + 8192),
            (16 * MIB + 65536)..(16 * MIB + 69632),
            (17 * MIB + 4096)..(17 * MIB + 8192),
        ];
        assert_eq!(
            widen(&runs, &zones(), 8 * MIB),
            vec![(16 * MIB)..(18 * MIB)]
        );
        // A write in the 8 MiB whole-zone unit, cut into 1 MiB extents.
        let run: Range<u64> = (33 * MIB)..(33 * MIB + 4096);
        let runs = std::slice::from_ref(&run);
        let out = widen(runs, &zones(), MIB);
        assert_eq!(out.len(), 8);
        assert_eq!(out[0], (32 * MIB)..(33 * MIB));
        assert_eq!(out[7], (39 * MIB)..(40 * MIB));
    }

    #[test]
    fn a_run_across_two_zones_is_widened_at_both_ends() {
        let run: Range<u64> = (16 * MIB - 4096)..(16 * MIB + 4096);
        let runs = std::slice::from_ref(&run);
        assert_eq!(
            widen(runs, &zones(), 8 * MIB),
            vec![(16 * MIB - 4096)..(17 * MIB)]
        );
    }
}
