//! A forecast learned from the history's own past windows. Each unit is
//! described by a few features at the moment of the forecast: how long ago
//! it was last touched (in eighths of horizons up to sixteen horizons, or
//! never), in how many of the last eight horizon-long periods it was
//! touched, how much of its region (16 units) was touched in the last
//! horizon and of its zone (16 regions), and whether its last access was a
//! write (for a never-touched unit: whether the region before it is active,
//! where a growing file or a scan enters new blocks). The features put the
//! unit in one of 1024 cells.
//!
//! Every quarter horizon of history (the interval doubling every 64
//! windows, up to one horizon) the model notes each candidate's cell
//! (every unit ever touched, and the untouched units of active zones and of
//! the regions after active ones); once the horizon has passed, each cell's
//! rate of units touched in it is known. The claim is the set of cells that
//! maximises F1 on those windows: cells taken in falling rate, as long as
//! F1 rises (the F1-optimal set is such a prefix). Both naive forecasts are
//! unions of cells — "touched in the last horizon" is the first three ages,
//! "ever touched" every age but never — so on the windows it learned from
//! the chosen set is never worse than either; what it adds is what the
//! history says about the cells they treat alike (a unit touched once long
//! ago against one touched every period, a new block beside a busy one).
//! Older windows count less (x0.95 per window), so the set follows a
//! workload that changes.

use std::collections::HashMap;

use super::schedule::{Schedule, drop_gapped, ended, within};
use super::{Access, MAX_CLAIMS, Model, REGION_UNITS, Scored, top_n};

/// Age buckets, by the horizon H: [0, H/4), [H/4, H/2), [H/2, H), [H, 2H),
/// [2H, 4H), [4H, 16H), [16H, ∞), never.
const AGES: usize = 8;
const NEVER: usize = AGES - 1;
/// Ages below this are "touched in the last horizon".
const WITHIN_HORIZON: usize = 3;
/// Periods of the last [`PERIODS`] in which the unit was touched: 0–1, 2,
/// 3–4, 5 and more.
const FREQS: usize = 4;
const PERIODS: u32 = 8;
/// Units of its region touched in the last horizon: none, 1–2, 3–8, more.
const DENSITIES: usize = 4;
/// Units of its zone (16 regions) touched in the last horizon: none, up to
/// 1/64, up to 1/8, more.
const ZONES: usize = 4;
const ZONE_UNITS: u64 = 16 * REGION_UNITS;
const CELLS: usize = AGES * FREQS * DENSITIES * ZONES * 2;
/// Weight an older window keeps when a new one is learned.
const DECAY: f64 = 0.95;
/// Pseudo-count pulling a sparsely seen cell's rate toward the mean.
const PRIOR: f64 = 8.0;
/// At most this many candidates are noted per window (a hash sample beyond).
const SAMPLE: u64 = 200_000;

#[derive(Debug, Clone, Copy)]
struct Unit {
    last: u64,
    last_read: Option<u64>,
    last_write: Option<u64>,
    /// Period (`ts / H`) of the last touch, and the touched periods before
    /// it: bit i = period `period - i`.
    period: u64,
    periods: u8,
    wrote_last: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    n: f64,
    any: f64,
    read: f64,
    write: f64,
}

struct Pending {
    at: u64,
    /// Candidate unit → its cell, for the sampled candidates.
    cells: HashMap<u64, u16>,
    sample: u64,
    hits: Vec<Rates>,
    /// Distinct units touched in the window, candidates or not.
    touched: f64,
}

/// The learned cell table.
pub struct Learned {
    horizon_ns: u64,
    units: HashMap<u64, Unit>,
    table: Vec<Rates>,
    /// Distinct units touched per window, decayed as the table is.
    touched: f64,
    windows: u64,
    pending: Vec<Pending>,
    schedule: Schedule,
    /// Cells claimed and each cell's smoothed rates, recomputed when a
    /// window is learned.
    claim: Vec<bool>,
    rates: Vec<(f64, f64, f64)>,
}

fn age_bucket(age: u64, h: u64) -> usize {
    let h = h.max(1);
    match age {
        a if a < h / 4 => 0,
        a if a < h / 2 => 1,
        a if a < h => 2,
        a if a < 2 * h => 3,
        a if a < 4 * h => 4,
        a if a < 16 * h => 5,
        _ => 6,
    }
}

fn freq_bucket(touched_periods: u32) -> usize {
    match touched_periods {
        0 | 1 => 0,
        2 => 1,
        3 | 4 => 2,
        _ => 3,
    }
}

fn density_bucket(touched: u32) -> usize {
    match touched {
        0 => 0,
        1 | 2 => 1,
        3..=8 => 2,
        _ => 3,
    }
}

fn zone_bucket(touched: u32) -> usize {
    match u64::from(touched) {
        0 => 0,
        t if t <= ZONE_UNITS / 64 => 1,
        t if t <= ZONE_UNITS / 8 => 2,
        _ => 3,
    }
}

fn cell(age: usize, freq: usize, density: usize, zone: usize, bit: bool) -> usize {
    (((age * FREQS + freq) * DENSITIES + density) * ZONES + zone) * 2 + usize::from(bit)
}

/// The age bucket of a cell.
fn age_of(cell: usize) -> usize {
    cell / (FREQS * DENSITIES * ZONES * 2)
}

fn sampled(unit: u64, sample: u64) -> bool {
    sample <= 1 || (unit.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40).is_multiple_of(sample)
}

impl Learned {
    /// Learns for forecasts `horizon_ns` ahead.
    pub fn for_horizon(horizon_ns: u64) -> Learned {
        let h = horizon_ns.max(4);
        Learned {
            horizon_ns: h,
            units: HashMap::new(),
            table: vec![Rates::default(); CELLS],
            touched: 0.0,
            windows: 0,
            pending: Vec::new(),
            schedule: Schedule::quarter(h),
            claim: Vec::new(),
            rates: Vec::new(),
        }
    }

    /// Units of each region and of each zone touched in `[now - H, now)`.
    fn densities(&self, now: u64) -> (HashMap<u64, u32>, HashMap<u64, u32>) {
        let since = now.saturating_sub(self.horizon_ns);
        let mut regions: HashMap<u64, u32> = HashMap::new();
        let mut zones: HashMap<u64, u32> = HashMap::new();
        for (&unit, u) in &self.units {
            if u.last >= since && u.last < now {
                *regions.entry(unit / REGION_UNITS).or_default() += 1;
                *zones.entry(unit / ZONE_UNITS).or_default() += 1;
            }
        }
        (regions, zones)
    }

    /// Every candidate at `now` with its cell: `f(unit, cell)`, given the
    /// region and zone activity at `now` ([`Learned::densities`]).
    fn candidates(
        &self,
        now: u64,
        (dens, zones): &(HashMap<u64, u32>, HashMap<u64, u32>),
        mut f: impl FnMut(u64, usize),
    ) {
        let h = self.horizon_ns;
        let density = |region: u64| dens.get(&region).copied().unwrap_or(0);
        let zone = |unit: u64| zone_bucket(zones.get(&(unit / ZONE_UNITS)).copied().unwrap_or(0));
        let now_period = now / h;
        for (&unit, u) in &self.units {
            if u.last >= now {
                continue;
            }
            let shift = now_period.saturating_sub(u.period);
            let periods = if shift >= u64::from(PERIODS) {
                0
            } else {
                (u32::from(u.periods) << shift) & 0xff
            };
            let c = cell(
                age_bucket(now - u.last, h),
                freq_bucket(periods.count_ones()),
                density_bucket(density(unit / REGION_UNITS)),
                zone(unit),
                u.wrote_last,
            );
            f(unit, c);
        }
        // Untouched units of active zones and of the regions after active
        // regions (a zone's last region leads into the next zone).
        let mut regions: Vec<u64> = zones
            .keys()
            .flat_map(|&z| z * 16..(z + 1) * 16)
            .chain(dens.keys().map(|&r| r + 1))
            .collect();
        regions.sort_unstable();
        regions.dedup();
        for region in regions {
            let c = cell(
                NEVER,
                0,
                density_bucket(density(region)),
                zone(region * REGION_UNITS),
                region.checked_sub(1).is_some_and(|p| density(p) > 0),
            );
            for unit in region * REGION_UNITS..(region + 1) * REGION_UNITS {
                if !self.units.contains_key(&unit) {
                    f(unit, c);
                }
            }
        }
    }

    fn checkpoint(&mut self, at: u64) {
        // Every touched unit, and the untouched ones of active zones and of
        // the regions after active ones: counted before sampling.
        let activity = self.densities(at);
        let estimate = self.units.len() as u64
            + (activity.1.len() as u64).saturating_mul(ZONE_UNITS)
            + (activity.0.len() as u64).saturating_mul(REGION_UNITS);
        let sample = estimate.div_ceil(SAMPLE).max(1);
        let mut cells = HashMap::new();
        self.candidates(at, &activity, |unit, c| {
            if sampled(unit, sample) {
                cells.insert(unit, u16::try_from(c).expect("CELLS is below 2^16"));
            }
        });
        self.pending.push(Pending {
            at,
            cells,
            sample,
            hits: vec![Rates::default(); CELLS],
            touched: 0.0,
        });
    }

    /// Learns every pending window that has ended by `now`.
    fn resolve(&mut self, now: u64) {
        let done = ended(&mut self.pending, now, self.horizon_ns, |p| p.at);
        if done.is_empty() {
            return;
        }
        for p in done {
            let scale = p.sample as f64;
            for r in &mut self.table {
                *r = Rates {
                    n: r.n * DECAY,
                    any: r.any * DECAY,
                    read: r.read * DECAY,
                    write: r.write * DECAY,
                };
            }
            self.touched = self.touched * DECAY + p.touched;
            for &c in p.cells.values() {
                self.table[usize::from(c)].n += scale;
            }
            for (r, hit) in self.table.iter_mut().zip(&p.hits) {
                r.any += hit.any * scale;
                r.read += hit.read * scale;
                r.write += hit.write * scale;
            }
            self.windows += 1;
        }
        self.rates = self.smooth();
        self.claim = self.best_cells(&self.rates);
    }

    /// Each cell's rate of units touched (any, read, write), pulled toward
    /// the rate of the cells like it where it was seldom seen: a cell toward
    /// the same cell over every zone, that toward its age's rate, that
    /// toward the mean.
    fn smooth(&self) -> Vec<(f64, f64, f64)> {
        let coarse_of = |c: usize| (c / 2 / ZONES) * 2 + c % 2;
        let mut by_age = vec![Rates::default(); AGES];
        let mut coarse = vec![Rates::default(); CELLS / ZONES];
        let mut all = Rates::default();
        for (c, r) in self.table.iter().enumerate() {
            for acc in [&mut by_age[age_of(c)], &mut coarse[coarse_of(c)], &mut all] {
                acc.n += r.n;
                acc.any += r.any;
                acc.read += r.read;
                acc.write += r.write;
            }
        }
        let toward = |r: &Rates, prior: f64| (r.any + PRIOR * prior) / (r.n + PRIOR);
        let mean = if all.n > 0.0 { all.any / all.n } else { 0.0 };
        (0..CELLS)
            .map(|c| {
                let r = &self.table[c];
                let co = &coarse[coarse_of(c)];
                let p = toward(r, toward(co, toward(&by_age[age_of(c)], mean)));
                // Which op: the cell's own mix where it has one, else its coarse cell's.
                let mix = if r.any > 0.0 { r } else { co };
                let share = |x: f64| if mix.any > 0.0 { x / mix.any } else { 0.5 };
                (p, p * share(mix.read), p * share(mix.write))
            })
            .collect()
    }

    /// The F1-optimal set of cells on the windows learned: cells in falling
    /// smoothed rate, as far as F1 (with the smoothed rates) rises.
    fn best_cells(&self, rates: &[(f64, f64, f64)]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..CELLS).filter(|&c| self.table[c].n > 0.0).collect();
        order.sort_by(|&a, &b| rates[b].0.total_cmp(&rates[a].0));
        let f1 = |tp: f64, claimed: f64| {
            let d = claimed + self.touched;
            if d > 0.0 { 2.0 * tp / d } else { 0.0 }
        };
        let (mut tp, mut claimed) = (0.0, 0.0);
        let (mut best, mut take) = (0.0, 0);
        for (k, &c) in order.iter().enumerate() {
            tp += rates[c].0 * self.table[c].n;
            claimed += self.table[c].n;
            if f1(tp, claimed) > best {
                best = f1(tp, claimed);
                take = k + 1;
            }
        }
        let mut claim = vec![false; CELLS];
        for &c in &order[..take] {
            claim[c] = true;
        }
        // What the set scored on those windows, counted: if either naive
        // forecast (a set of cells too) scored better, take it.
        let counted = |set: &[bool]| {
            let (tp, n) = (0..CELLS)
                .filter(|&c| set[c])
                .fold((0.0, 0.0), |(tp, n), c| {
                    (tp + self.table[c].any, n + self.table[c].n)
                });
            f1(tp, n)
        };
        let mut best = counted(&claim);
        for keep in [
            &(|age: usize| age < WITHIN_HORIZON) as &dyn Fn(usize) -> bool,
            &|age: usize| age != NEVER,
        ] {
            let set: Vec<bool> = (0..CELLS).map(|c| keep(age_of(c))).collect();
            let f = counted(&set);
            if f > best {
                best = f;
                claim = set;
            }
        }
        claim
    }
}

impl Model for Learned {
    fn name(&self) -> &'static str {
        "learned"
    }

    fn observe(&mut self, a: &Access) {
        let t = a.ts_ns;
        while let Some(c) = self.schedule.due(t) {
            self.resolve(c);
            self.checkpoint(c);
        }
        let before = self.units.get(&a.unit).copied();
        let h = self.horizon_ns;
        for p in &mut self.pending {
            // A window not yet learned (it is learned at the next
            // checkpoint or forecast) counts only its own horizon.
            if !within(p.at, t, h) {
                continue;
            }
            let first = |last: Option<u64>| last.is_none_or(|l| l < p.at);
            let any = first(before.map(|u| u.last));
            let read = !a.write && first(before.and_then(|u| u.last_read));
            let write = a.write && first(before.and_then(|u| u.last_write));
            if any {
                p.touched += 1.0;
            }
            if let Some(&c) = p.cells.get(&a.unit) {
                let hit = &mut p.hits[usize::from(c)];
                hit.any += f64::from(u8::from(any));
                hit.read += f64::from(u8::from(read));
                hit.write += f64::from(u8::from(write));
            }
        }
        let period = t / self.horizon_ns;
        let u = self.units.entry(a.unit).or_insert(Unit {
            last: t,
            last_read: None,
            last_write: None,
            period,
            periods: 0,
            wrote_last: a.write,
        });
        let shift = period.saturating_sub(u.period);
        u.periods = if shift >= u64::from(PERIODS) {
            1
        } else {
            (u.periods << shift) | 1
        };
        u.period = period;
        u.last = t;
        u.wrote_last = a.write;
        if a.write {
            u.last_write = Some(t);
        } else {
            u.last_read = Some(t);
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        // A window the gap overlaps cannot be learned from.
        drop_gapped(
            &mut self.pending,
            (start_ns, end_ns),
            self.horizon_ns,
            |p| p.at,
        );
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        if horizon_ns != self.horizon_ns {
            // Cells are horizon-relative: another horizon starts afresh.
            *self = Learned {
                units: std::mem::take(&mut self.units),
                ..Learned::for_horizon(horizon_ns)
            };
        }
        self.resolve(now_ns);
        let mut out = Vec::new();
        if self.windows == 0 {
            // Nothing learned yet: the last horizon's units.
            let since = now_ns.saturating_sub(self.horizon_ns);
            let recent = |t: Option<u64>| {
                if t.is_some_and(|t| t >= since && t < now_ns) {
                    1.0
                } else {
                    0.0
                }
            };
            for (&unit, u) in &self.units {
                let s = Scored {
                    unit,
                    read: recent(u.last_read),
                    write: recent(u.last_write),
                };
                if s.any() > 0.0 {
                    out.push(s);
                }
            }
            return out;
        }
        let table = &self.rates;
        self.candidates(now_ns, &self.densities(now_ns), |unit, c| {
            let (any, read, write) = table[c];
            let top = read.max(write);
            if top <= 0.0 || any < 0.01 {
                return;
            }
            // Claimed cells at 0.5 or more, the others below, each op in
            // proportion to its rate (the ranking within stays the rates').
            let k = if self.claim[c] {
                any.max(0.5) / top
            } else {
                any.min(0.49) / top
            };
            out.push(Scored {
                unit,
                read: (read * k).min(1.0),
                write: (write * k).min(1.0),
            });
        });
        top_n(out, MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.units.capacity() * (size_of::<u64>() + size_of::<Unit>() + 8)
            + self
                .pending
                .iter()
                .map(|p| p.cells.capacity() * 18)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::naive::Naive;
    use crate::predict::testkit::{MS, claimed, read};

    fn f1(claims: &[u64], actual: &[u64]) -> f64 {
        let hits = claims.iter().filter(|u| actual.contains(u)).count() as f64;
        2.0 * hits / (claims.len() + actual.len()) as f64
    }

    #[test]
    fn units_that_come_back_every_other_horizon_are_claimed_and_one_offs_are_not() {
        // Horizon 100 ms. Units 0..8 are read every 120 ms (so for a sixth
        // of the time, now included, not in the last horizon); each 10 ms a
        // new unit far away is read once and never again. The last horizon claims the one-offs
        // and misses half the returning set; everything ever touched claims
        // every one-off; the learned table should claim the returning set.
        let h = 100 * MS;
        let mut models: Vec<Box<dyn Model>> = vec![
            Box::new(Learned::for_horizon(h)),
            Box::new(Naive::last_horizon()),
            Box::new(Naive::ever_touched()),
        ];
        let mut history = Vec::new();
        for t in (0..6000).step_by(10) {
            history.push(read(t * MS, 1000 + t));
            if t % 120 == 0 {
                for u in 0..8 {
                    history.push(read(t * MS + u, u));
                }
            }
        }
        for ev in &history {
            for m in &mut models {
                m.feed(ev);
            }
        }
        let now = 6000 * MS;
        let actual: Vec<u64> = (0..8)
            .chain((6000..6100).step_by(10).map(|t| 1000 + t))
            .collect();
        let scores: Vec<f64> = models
            .iter_mut()
            .map(|m| f1(&claimed(&m.predict(now, h)), &actual))
            .collect();
        assert!(
            scores[0] > scores[1] && scores[0] > scores[2],
            "learned {:.3}, last-horizon {:.3}, ever-touched {:.3}",
            scores[0],
            scores[1],
            scores[2]
        );
        let learned = claimed(&models[0].predict(now, h));
        assert_eq!(learned, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn new_blocks_beside_a_growing_region_are_claimed() {
        // A log written forward, one unit per 10 ms, never rewritten: what
        // the next horizon writes was never touched. Both naive forecasts
        // claim only old units and score 0; the learned table claims the
        // untouched units ahead of the writes.
        let h = 100 * MS;
        let mut m = Learned::for_horizon(h);
        for t in 0..3000u64 {
            m.feed(&crate::predict::testkit::write(t * 10 * MS, t));
        }
        let now = 30_000 * MS;
        let claims = claimed(&m.predict(now, h));
        let ahead: Vec<u64> = (3000..3010).collect();
        let hits = ahead.iter().filter(|u| claims.contains(u)).count();
        assert!(hits >= 5, "claims {claims:?}");
        assert!(claims.len() < 64, "claims {} units", claims.len());
    }
}
