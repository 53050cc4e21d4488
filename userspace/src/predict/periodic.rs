//! Time-of-day and other periods found in the history: the nightly backup
//! touches the same region at 02:00. The access count per 100 ms bin is the
//! series, and its periods are the analyzer's (`analyze::periodicity`, the
//! one period finder: autocorrelation over the bins no gap touched), snapped
//! to whole bins. A day is always a candidate once two days are known.
//! A unit is claimed with the share of past cycles (up to eight) in which it
//! was touched in the same phase window; cycles whose window fell in a gap are
//! not counted either way.

use std::collections::HashMap;

use super::{Access, MAX_CLAIMS, Model, Scored, top_n};
use crate::analyze::periodicity::periods_of;

const BIN_NS: u64 = 100_000_000;
const DAY_NS: u64 = 86_400_000_000_000;
/// Per unit, the newest touched bins kept.
const KEPT_BINS: usize = 128;
const CYCLES: u64 = 8;

/// A touched bin: index, and bit 0 read / bit 1 write.
type Touch = (u32, u8);

/// The period model.
#[derive(Debug, Default)]
pub struct Periodic {
    start_ns: Option<u64>,
    counts: Vec<f32>,
    units: HashMap<u64, Vec<Touch>>,
    gaps: Vec<(u64, u64)>,
    /// Periods (ns) confirmed at the series length in `.1`.
    cached: Option<(Vec<u64>, usize)>,
}

impl Periodic {
    fn bin(&self, ts: u64) -> u64 {
        ts.saturating_sub(self.start_ns.unwrap_or(0)) / BIN_NS
    }

    /// Periods in nanoseconds, strongest first: the analyzer's, snapped to
    /// whole bins (the phase windows are counted in bins), and a day.
    fn periods(&mut self) -> Vec<u64> {
        if let Some((p, len)) = &self.cached
            && self.counts.len() < len + len / 4 + 1
        {
            return p.clone();
        }
        let bins = self.counts.len();
        let mut unknown = vec![false; bins];
        for &(s, e) in &self.gaps {
            let (a, b) = (self.bin_index(s), self.bin_index(e));
            for u in unknown.iter_mut().take(b.saturating_add(1)).skip(a) {
                *u = true;
            }
        }
        let mut found: Vec<u64> = Vec::new();
        for p in periods_of(self.counts.clone(), unknown, BIN_NS) {
            let ns = whole_bins(p.seconds) * BIN_NS;
            if ns > 0 && !found.contains(&ns) {
                found.push(ns);
            }
        }
        let span = bins as u64 * BIN_NS;
        if span >= 2 * DAY_NS && !found.contains(&DAY_NS) {
            found.push(DAY_NS);
        }
        self.cached = Some((found.clone(), bins));
        found
    }

    /// The bin of `ts`, as an index of `counts`.
    fn bin_index(&self, ts: u64) -> usize {
        usize::try_from(self.bin(ts)).unwrap_or(usize::MAX)
    }

    fn in_gap(&self, from: u64, to: u64) -> bool {
        self.gaps.iter().any(|&(s, e)| s < to && from < e)
    }
}

/// A period in seconds as a whole number of bins, the nearest.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a period is positive and shorter than the history, far below 2^64 bins"
)]
fn whole_bins(seconds: f64) -> u64 {
    (seconds * 1e9 / BIN_NS as f64).round().max(0.0) as u64
}

impl Model for Periodic {
    fn name(&self) -> &'static str {
        "periodic"
    }

    fn observe(&mut self, a: &Access) {
        let start = *self.start_ns.get_or_insert(a.ts_ns);
        if a.ts_ns < start {
            return;
        }
        let bin = self.bin(a.ts_ns);
        let i = self.bin_index(a.ts_ns);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0.0);
        }
        self.counts[i] += 1.0;
        let touches = self.units.entry(a.unit).or_default();
        let bit = if a.write { 2 } else { 1 };
        match touches.last_mut() {
            Some(t) if u64::from(t.0) == bin => t.1 |= bit,
            _ => {
                if touches.len() >= KEPT_BINS {
                    touches.remove(0);
                }
                // 2^32 bins of 100 ms are 13 years of history.
                touches.push((u32::try_from(bin).unwrap_or(u32::MAX), bit));
            }
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        self.gaps.push((start_ns, end_ns));
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let Some(start) = self.start_ns else {
            return Vec::new();
        };
        let mut claims: HashMap<u64, Scored> = HashMap::new();
        for period in self.periods() {
            if period < horizon_ns {
                continue;
            }
            // The phase windows of past cycles that the history covers cleanly.
            let windows: Vec<(u64, u64)> = (1..=CYCLES)
                .filter_map(|c| {
                    let from = now_ns.checked_sub(c * period)?;
                    (from >= start && !self.in_gap(from, from + horizon_ns))
                        .then(|| (self.bin(from), self.bin(from + horizon_ns - 1)))
                })
                .collect();
            if windows.len() < 2 {
                continue;
            }
            // One period: the strongest usable (its multiples would hide
            // the cycles in between).
            let n = windows.len() as f64;
            for (&unit, touches) in &self.units {
                let (mut reads, mut writes) = (0u32, 0u32);
                for &(lo, hi) in &windows {
                    let i = touches.partition_point(|t| u64::from(t.0) < lo);
                    let mask = touches[i..]
                        .iter()
                        .take_while(|t| u64::from(t.0) <= hi)
                        .fold(0u8, |m, t| m | t.1);
                    reads += u32::from(mask & 1);
                    writes += u32::from(mask >> 1);
                }
                if reads + writes == 0 {
                    continue;
                }
                let c = claims.entry(unit).or_insert(Scored {
                    unit,
                    read: 0.0,
                    write: 0.0,
                });
                c.read = c.read.max(f64::from(reads) / n);
                c.write = c.write.max(f64::from(writes) / n);
            }
            break;
        }
        top_n(claims.into_values().collect(), MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.counts.capacity() * 4
            + self.units.capacity() * 40
            + self.units.values().map(Vec::capacity).sum::<usize>() * size_of::<Touch>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, SEC, claimed, read, write};

    /// A job every 60 s reads units 100..110 and writes 200; between runs, a
    /// steady trickle of reads elsewhere.
    fn periodic_history(cycles: u64, lost: Option<u64>) -> (Periodic, u64) {
        let mut m = Periodic::default();
        let mut noise = 10_000;
        for c in 0..cycles {
            let base = c * 60 * SEC;
            if lost == Some(c) {
                m.feed(&read(base + 30 * SEC, noise));
                noise += 1;
                continue;
            }
            for (k, u) in (100..110).enumerate() {
                m.feed(&read(base + k as u64 * MS, u));
            }
            m.feed(&write(base + 20 * MS, 200));
            for s in (1..60).step_by(3) {
                m.feed(&read(base + s * SEC, noise));
                noise += 1;
            }
        }
        (m, cycles * 60 * SEC)
    }

    #[test]
    fn a_periodic_job_is_predicted_just_before_it_runs() {
        let (mut m, end) = periodic_history(12, None);
        let periods = m.periods();
        assert!(periods.contains(&(60 * SEC)), "60 s found: {periods:?}");
        // Predict from 1 s before the next run, for 2 s.
        let s = m.predict(end - SEC, 2 * SEC);
        let mut want: Vec<u64> = (100..110).collect();
        want.push(200);
        assert_eq!(claimed(&s), want);
        let job_write = s.iter().find(|s| s.unit == 200).expect("200");
        assert!(job_write.write > 0.9 && job_write.read == 0.0);
        // Mid-cycle, the job is not claimed.
        let mid = m.predict(end - 30 * SEC, 2 * SEC);
        assert!(claimed(&mid).iter().all(|&u| u >= 10_000));
    }

    #[test]
    fn cycles_lost_in_a_gap_are_not_counted_against_the_unit() {
        // The last cycle's run is missing: without a gap that is a miss (7 of 8)...
        let (mut m, end) = periodic_history(12, Some(11));
        let s = m.predict(end - SEC, 2 * SEC);
        let job = s.iter().find(|s| s.unit == 105).expect("105");
        assert!((job.read - 7.0 / 8.0).abs() < 1e-9, "{job:?}");
        // ...but when the tracer lost events then, the cycle is not counted.
        let (mut m, end) = periodic_history(12, Some(11));
        m.gap(end - 61 * SEC, end - 58 * SEC);
        let s = m.predict(end - SEC, 2 * SEC);
        let job = s.iter().find(|s| s.unit == 105).expect("105");
        assert!((job.read - 1.0).abs() < 1e-9, "{job:?}");
    }
}
