//! Per-region access intensity forecast with exponential smoothing (ETS,
//! chosen automatically by `augurs`' `AutoETS`). Each 1 MiB region keeps its
//! access counts in the last 64 bins of a quarter horizon; the busiest regions
//! get a fitted model whose forecast over the horizon is the expected number
//! of accesses `λ`. A unit's share of its region's past reads (writes) splits
//! `λ`, and a Poisson arrival gives `p = 1 - exp(-λ·share)`. Bins that fell
//! in a gap repeat the bin before them instead of reading as idle.

use std::collections::{HashMap, VecDeque};

use augurs::ets::AutoETS;
use augurs::{Fit as _, Predict as _};

use super::{Access, MAX_CLAIMS, Model, REGION_UNITS, Scored, top_n};

const BINS: usize = 64;
/// Regions fitted per prediction (the busiest recently): bounds the cost.
const FITTED: usize = 64;

#[derive(Debug, Default)]
struct Region {
    /// Counts of the bins up to `last_bin`, oldest first.
    counts: VecDeque<f64>,
    last_bin: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct UnitCounts {
    reads: u32,
    writes: u32,
}

/// The ETS intensity model.
#[derive(Debug)]
pub struct Intensity {
    bin_ns: u64,
    regions: HashMap<u64, Region>,
    units: HashMap<u64, UnitCounts>,
    gaps: Vec<(u64, u64)>,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity::new(1_000_000_000)
    }
}

impl Intensity {
    /// Bins of a quarter `horizon_ns` (10 ms to 60 s).
    pub fn for_horizon(horizon_ns: u64) -> Intensity {
        Intensity::new((horizon_ns / 4).clamp(10_000_000, 60_000_000_000))
    }

    pub fn new(bin_ns: u64) -> Intensity {
        Intensity {
            bin_ns: bin_ns.max(1),
            regions: HashMap::new(),
            units: HashMap::new(),
            gaps: Vec::new(),
        }
    }

    fn bin_in_gap(&self, bin: u64) -> bool {
        let (from, to) = (bin * self.bin_ns, (bin + 1) * self.bin_ns);
        self.gaps.iter().any(|&(s, e)| s < to && from < e)
    }

    /// The region's complete bins before `end_bin`, gap bins carried forward.
    fn series(&self, r: &Region, end_bin: u64) -> Vec<f64> {
        let first_bin = r.last_bin + 1 - r.counts.len() as u64;
        let mut s: Vec<f64> = r
            .counts
            .iter()
            .copied()
            // `take` of more than usize holds is `take` of all.
            .take(usize::try_from(end_bin.saturating_sub(first_bin)).unwrap_or(usize::MAX))
            .collect();
        while first_bin + (s.len() as u64) < end_bin {
            s.push(0.0);
        }
        for i in 1..s.len() {
            if self.bin_in_gap(first_bin + i as u64) {
                s[i] = s[i - 1];
            }
        }
        if s.len() > BINS {
            s.drain(..s.len() - BINS);
        }
        s
    }
}

/// Expected accesses over `steps` bins from an `AutoETS` fit, or the mean.
fn forecast(series: &[f64], steps: usize) -> f64 {
    let mean = series.iter().sum::<f64>() / series.len().max(1) as f64;
    if series.len() < 8 || series.iter().all(|&x| (x - series[0]).abs() < f64::EPSILON) {
        return mean * steps as f64;
    }
    let fitted = AutoETS::non_seasonal().fit(series);
    match fitted.and_then(|m| m.predict(steps, None)) {
        Ok(f) if f.point.iter().all(|x| x.is_finite()) => {
            f.point.iter().map(|x| x.max(0.0)).sum::<f64>()
        }
        _ => mean * steps as f64,
    }
}

impl Model for Intensity {
    fn name(&self) -> &'static str {
        "ets"
    }

    fn observe(&mut self, a: &Access) {
        let bin = a.ts_ns / self.bin_ns;
        let r = self.regions.entry(a.unit / REGION_UNITS).or_default();
        if r.counts.is_empty() {
            r.last_bin = bin;
            r.counts.push_back(0.0);
        }
        while r.last_bin < bin {
            r.counts.push_back(0.0);
            r.last_bin += 1;
            if r.counts.len() > BINS {
                r.counts.pop_front();
            }
        }
        if let Some(last) = r.counts.back_mut() {
            *last += 1.0;
        }
        let u = self.units.entry(a.unit).or_default();
        if a.write {
            u.writes = u.writes.saturating_add(1);
        } else {
            u.reads = u.reads.saturating_add(1);
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        self.gaps.push((start_ns, end_ns));
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        // Bins before the one `now_ns` falls in are complete.
        let now_bin = now_ns / self.bin_ns;
        // More steps than usize holds could not be forecast anyway: saturate.
        let steps = usize::try_from(horizon_ns.div_ceil(self.bin_ns).max(1)).unwrap_or(usize::MAX);
        // The busiest regions over the kept window.
        let mut busy: Vec<(u64, f64)> = self
            .regions
            .iter()
            .filter(|(_, r)| now_bin.saturating_sub(r.last_bin) < BINS as u64)
            .map(|(&id, r)| (id, r.counts.iter().sum::<f64>()))
            .collect();
        busy.sort_by(|a, b| b.1.total_cmp(&a.1));
        busy.truncate(FITTED);
        let mut lambdas: HashMap<u64, f64> = HashMap::new();
        for (id, _) in busy {
            let series = self.series(&self.regions[&id], now_bin);
            lambdas.insert(id, forecast(&series, steps));
        }
        // Region totals of the units' counts, to share λ out.
        let mut totals: HashMap<u64, f64> = HashMap::new();
        for (&unit, c) in &self.units {
            if lambdas.contains_key(&(unit / REGION_UNITS)) {
                *totals.entry(unit / REGION_UNITS).or_default() +=
                    f64::from(c.reads) + f64::from(c.writes);
            }
        }
        let scored = self
            .units
            .iter()
            .filter_map(|(&unit, c)| {
                let region = unit / REGION_UNITS;
                let lambda = *lambdas.get(&region)?;
                let total = totals.get(&region).copied().filter(|&t| t > 0.0)?;
                let p = |n: u32| 1.0 - (-lambda * f64::from(n) / total).exp();
                Some(Scored {
                    unit,
                    read: p(c.reads),
                    write: p(c.writes),
                })
            })
            .filter(|s| s.any() >= 0.01)
            .collect();
        top_n(scored, MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.regions.capacity() * (size_of::<Region>() + 16)
            + self.regions.len() * BINS * 8
            + self.units.capacity() * (size_of::<UnitCounts>() + 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, claimed, read};

    #[test]
    fn a_steadily_busy_region_is_claimed_and_a_finished_one_is_not() {
        // 100 ms bins. Region 0 (units 0..16) is read 20 times a bin
        // throughout; region 10 was busy early and then went quiet.
        let mut m = Intensity::new(100 * MS);
        for bin in 0..60u64 {
            for k in 0..20u64 {
                m.feed(&read(bin * 100 * MS + k * MS, k % 4));
                if bin < 20 {
                    m.feed(&read(bin * 100 * MS + k * MS, 160 + k % 4));
                }
            }
        }
        let s = m.predict(6000 * MS, 200 * MS);
        let c = claimed(&s);
        assert_eq!(c, vec![0, 1, 2, 3], "{s:?}");
    }

    #[test]
    fn a_gap_is_not_read_as_an_idle_stretch() {
        let mut with_gap = Intensity::new(100 * MS);
        let mut idle = Intensity::new(100 * MS);
        for bin in 0..40u64 {
            if (30..40).contains(&bin) {
                continue;
            }
            for k in 0..10u64 {
                with_gap.feed(&read(bin * 100 * MS + k * MS, 0));
                idle.feed(&read(bin * 100 * MS + k * MS, 0));
            }
        }
        with_gap.gap(3000 * MS, 4000 * MS);
        let p = |m: &mut Intensity| {
            m.predict(4000 * MS, 100 * MS)
                .first()
                .map_or(0.0, |s| s.read)
        };
        assert!(p(&mut with_gap) > p(&mut idle), "a gap keeps the level");
    }
}
