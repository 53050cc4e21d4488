//! The ensemble: the forecast that has lately been best, chosen among every
//! model (the two naive forecasts included) and the per-region combination
//! ([`Regional`]), each at three units — the base unit, 16 and 256 times it
//! (4 KiB, 64 KiB, 1 MiB from 4 KiB). A coarser unit claims whole larger
//! extents: it wins where the workload touches new blocks beside old ones,
//! it loses where it claims blocks nobody asks for.
//!
//! Every quarter horizon of history (the first after an eighth; the
//! interval doubling every 64 checkpoints, up to one horizon) each candidate's claims are kept and, once the horizon has
//! passed, scored by F1 at the base unit (a claimed coarse unit claims every
//! base unit in it) against what was touched; older windows weigh less. The
//! forecast is the best-scoring candidate's, given at the base unit. So on
//! the windows it has seen, the ensemble is as good as the best of its
//! candidates, the naive forecasts among them; where one of them is best on
//! a trace, the ensemble becomes it.

use std::collections::{HashMap, HashSet};

use super::ensemble::Ensemble as Regional;
use super::schedule::{Schedule, drop_gapped, ended, within};
use super::{Access, MAX_CLAIMS, Model, Scored, top_n};

/// Weight kept by older windows at each new score, over the whole disk
/// and in a zone.
const DECAY: f64 = 0.85;
const ZONE_DECAY: f64 = 0.7;
/// Each level's unit is the one before times 2^this.
const LEVEL_SHIFT: u32 = 4;
const LEVELS: u32 = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    tp: f64,
    claimed: f64,
    actual: f64,
}

impl Tally {
    fn f1(&self) -> Option<f64> {
        let d = self.claimed + self.actual;
        (d > 0.0).then(|| 2.0 * self.tp / d)
    }
}

struct Level {
    /// Base units per unit of this level, as a shift.
    shift: u32,
    regional: Regional,
    /// The access being gathered: a request's base units at one coarse unit
    /// are one access there.
    gathering: Option<Access>,
}

impl Level {
    fn observe(&mut self, a: &Access) {
        let coarse = Access {
            unit: a.unit >> self.shift,
            ..*a
        };
        match &mut self.gathering {
            Some(g)
                if g.unit == coarse.unit
                    && g.ts_ns == coarse.ts_ns
                    && g.write == coarse.write
                    && g.stream == coarse.stream =>
            {
                g.bytes = g.bytes.saturating_add(coarse.bytes);
            }
            _ => {
                if let Some(g) = self.gathering.replace(coarse) {
                    self.regional.observe(&g);
                }
            }
        }
    }

    fn flush(&mut self) {
        if let Some(g) = self.gathering.take() {
            self.regional.observe(&g);
        }
    }
}

struct Pending {
    at: u64,
    /// Per candidate, the units it claimed (at its level); last, the
    /// zone-wise combination's (at the base unit).
    claims: Vec<Vec<u64>>,
    /// Base units touched in `[at, at + horizon)`.
    touched: HashSet<u64>,
}

/// Chooses the best model and unit from its own past windows.
pub struct Chooser {
    horizon_ns: u64,
    levels: Vec<Level>,
    /// Candidates per level: the models, then the per-region combination.
    per_level: usize,
    names: Vec<&'static str>,
    /// Per candidate over the whole disk; last, the zone-wise combination.
    tallies: Vec<Tally>,
    /// Per zone (a unit of the coarsest level), per candidate.
    zones: HashMap<u64, Vec<Tally>>,
    /// Base units per zone, as a shift.
    zone_shift: u32,
    pending: Vec<Pending>,
    schedule: Schedule,
}

impl Chooser {
    /// A chooser at `unit` (and 16 and 256 times it, up to 1 GiB) whose
    /// levels each hold the models `models(unit)` builds.
    pub fn new(unit: u64, horizon_ns: u64, models: impl Fn(u64) -> Vec<Box<dyn Model>>) -> Chooser {
        let h = horizon_ns.max(2);
        let levels: Vec<Level> = (0..LEVELS)
            .map(|k| k * LEVEL_SHIFT)
            .filter(|&shift| unit.checked_shl(shift).is_some_and(|u| u <= 1 << 30))
            .map(|shift| Level {
                shift,
                regional: Regional::new(models(unit << shift), h),
                gathering: None,
            })
            .collect();
        let names = levels
            .first()
            .map(|l| l.regional.names())
            .unwrap_or_default();
        let per_level = names.len() + 1;
        Chooser {
            horizon_ns: h,
            tallies: vec![Tally::default(); per_level * levels.len() + 1],
            zones: HashMap::new(),
            zone_shift: levels.last().map_or(0, |l| l.shift).max(LEVEL_SHIFT),
            levels,
            per_level,
            names,
            pending: Vec::new(),
            schedule: Schedule::quarter(h),
        }
    }

    /// Each candidate's name (`model@level`, level 0 the base unit) and its
    /// F1 so far, best first.
    pub fn standings(&self) -> Vec<(String, u32, Option<f64>)> {
        let mut v: Vec<(String, u32, Option<f64>)> = self
            .tallies
            .iter()
            .enumerate()
            .map(|(c, t)| {
                let (level, m) = (c / self.per_level, c % self.per_level);
                let name = match self.levels.get(level) {
                    None => "by-zone",
                    Some(_) => self.names.get(m).copied().unwrap_or("regional"),
                };
                (name.to_owned(), self.shift_of(c), t.f1())
            })
            .collect();
        v.sort_by(|a, b| b.2.unwrap_or(-1.0).total_cmp(&a.2.unwrap_or(-1.0)));
        v
    }

    /// A candidate's unit as a shift of the base unit.
    fn shift_of(&self, c: usize) -> u32 {
        self.levels.get(c / self.per_level).map_or(0, |l| l.shift)
    }

    /// Candidates other than the combination.
    fn singles(&self) -> usize {
        self.tallies.len() - 1
    }

    /// Per zone, the candidate whose claims are used there: the best in the
    /// zone where one has been right; else the best over the disk, unless
    /// it has been wrong there (then none).
    fn zone_choice(&self, zone: u64, global: usize) -> Option<usize> {
        let Some(t) = self.zones.get(&zone) else {
            return Some(global);
        };
        if t.iter().any(|t| t.tp > 0.0) {
            return t
                .iter()
                .enumerate()
                .filter_map(|(c, t)| t.f1().map(|f| (c, f)))
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(c, _)| c);
        }
        (t[global].claimed == 0.0).then_some(global)
    }

    /// The zone-wise combination of `claims` (every single candidate's), at
    /// the base unit.
    fn combine(&self, claims: &[Vec<Scored>]) -> Vec<Scored> {
        let global = self.best_single();
        let mut chosen: HashMap<u64, Option<usize>> = HashMap::new();
        let mut out = Vec::new();
        for (c, list) in claims.iter().enumerate() {
            let shift = self.shift_of(c);
            for s in list {
                let zone = (s.unit << shift) >> self.zone_shift;
                let pick = *chosen
                    .entry(zone)
                    .or_insert_with(|| self.zone_choice(zone, global));
                if pick == Some(c) {
                    out.extend((0..1u64 << shift).map(|k| Scored {
                        unit: (s.unit << shift) + k,
                        ..*s
                    }));
                }
            }
        }
        out
    }

    fn flush(&mut self) {
        for l in &mut self.levels {
            l.flush();
        }
    }

    fn claims_at(&mut self, now: u64) -> Vec<Vec<Scored>> {
        self.flush();
        let h = self.horizon_ns;
        self.levels
            .iter_mut()
            .flat_map(|l| l.regional.every_claim(now, h))
            .collect()
    }

    fn checkpoint(&mut self, at: u64) {
        let mut every = self.claims_at(at);
        every.push(self.combine(&every));
        let claims = every
            .into_iter()
            .map(|c| {
                let mut v: Vec<u64> = c
                    .iter()
                    .filter(|s| s.any() >= 0.5)
                    .map(|s| s.unit)
                    .collect();
                // A model may claim a unit twice (a stream's window and a
                // stride's); each counts once.
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        self.pending.push(Pending {
            at,
            claims,
            touched: HashSet::new(),
        });
    }

    fn resolve(&mut self, now: u64) {
        let done = ended(&mut self.pending, now, self.horizon_ns, |p| p.at);
        let singles = self.singles();
        let zs = self.zone_shift;
        for p in done {
            let actual = p.touched.len() as f64;
            // Per zone: base units touched, and per candidate (tp, claimed).
            let mut zone_actual: HashMap<u64, f64> = HashMap::new();
            for &u in &p.touched {
                *zone_actual.entry(u >> zs).or_default() += 1.0;
            }
            // Base units touched per unit of each level (the combinations
            // are at the base unit), once per level, not per candidate.
            let per_level: HashMap<u32, HashMap<u64, u64>> = (0..p.claims.len())
                .map(|c| self.shift_of(c))
                .collect::<HashSet<u32>>()
                .into_iter()
                .map(|shift| {
                    let mut per: HashMap<u64, u64> = HashMap::new();
                    for &u in &p.touched {
                        *per.entry(u >> shift).or_default() += 1;
                    }
                    (shift, per)
                })
                .collect();
            let mut zone_counts: HashMap<u64, Vec<(f64, f64)>> = HashMap::new();
            for (c, claims) in p.claims.iter().enumerate() {
                let shift = self.shift_of(c);
                let single = c < singles;
                let per = per_level
                    .get(&shift)
                    .expect("a map was built for every candidate's level");
                let mut tp = 0u64;
                for u in claims {
                    let hit = per.get(u).copied().unwrap_or(0);
                    tp += hit;
                    if single {
                        let e = zone_counts
                            .entry((u << shift) >> zs)
                            .or_insert_with(|| vec![(0.0, 0.0); singles]);
                        e[c].0 += hit as f64;
                        e[c].1 += f64::from(1u32 << shift);
                    }
                }
                let t = &mut self.tallies[c];
                t.tp = t.tp * DECAY + tp as f64;
                t.claimed = t.claimed * DECAY + (claims.len() as f64) * f64::from(1u32 << shift);
                t.actual = t.actual * DECAY + actual;
            }
            for &z in zone_actual.keys() {
                zone_counts
                    .entry(z)
                    .or_insert_with(|| vec![(0.0, 0.0); singles]);
            }
            for (z, counts) in zone_counts {
                let a = zone_actual.get(&z).copied().unwrap_or(0.0);
                let tallies = self
                    .zones
                    .entry(z)
                    .or_insert_with(|| vec![Tally::default(); singles]);
                for (t, (tp, claimed)) in tallies.iter_mut().zip(counts) {
                    t.tp = t.tp * ZONE_DECAY + tp;
                    t.claimed = t.claimed * ZONE_DECAY + claimed;
                    t.actual = t.actual * ZONE_DECAY + a;
                }
            }
        }
    }

    /// The best single candidate so far (the base level's per-region
    /// combination before any window has been scored).
    fn best_single(&self) -> usize {
        let fallback = self.per_level - 1;
        self.tallies[..self.singles()]
            .iter()
            .enumerate()
            .filter_map(|(c, t)| t.f1().map(|f| (c, f)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .map_or(fallback, |(c, _)| c)
    }
}

impl Model for Chooser {
    fn name(&self) -> &'static str {
        "ensemble"
    }

    fn observe(&mut self, a: &Access) {
        while let Some(c) = self.schedule.due(a.ts_ns) {
            self.resolve(c);
            self.checkpoint(c);
        }
        let h = self.horizon_ns;
        for p in &mut self.pending {
            if within(p.at, a.ts_ns, h) {
                p.touched.insert(a.unit);
            }
        }
        for l in &mut self.levels {
            l.observe(a);
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        drop_gapped(
            &mut self.pending,
            (start_ns, end_ns),
            self.horizon_ns,
            |p| p.at,
        );
        self.flush();
        for l in &mut self.levels {
            l.regional.gap(start_ns, end_ns);
        }
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        if horizon_ns != self.horizon_ns {
            self.horizon_ns = horizon_ns.max(2);
            self.schedule.set_horizon(self.horizon_ns);
        }
        self.resolve(now_ns);
        if self.levels.is_empty() {
            return Vec::new();
        }
        let mut every = self.claims_at(now_ns);
        // The base unit's hot set (recency and frequency), to rank within.
        let hot: HashMap<u64, (f64, f64)> = self
            .names
            .iter()
            .position(|n| *n == "lru")
            .map(|i| {
                every[i]
                    .iter()
                    .map(|s| (s.unit, (s.read, s.write)))
                    .collect()
            })
            .unwrap_or_default();
        // The zone-wise combination unless one candidate alone has done
        // better over the whole disk.
        let best = self.best_single();
        let together = self.tallies[self.singles()].f1().unwrap_or(0.0);
        let chosen = if self.tallies[best].f1().is_none_or(|f| f <= together) {
            self.combine(&every)
        } else {
            let shift = self.shift_of(best);
            every
                .swap_remove(best)
                .into_iter()
                .flat_map(|s| {
                    (0..1u64 << shift).map(move |k| Scored {
                        unit: (s.unit << shift) + k,
                        ..s
                    })
                })
                .collect()
        };
        // The choice says which units; within them, what was used lately and
        // often comes first (a post-copy push and a warm-up read in this
        // order). The naive forecasts claim everything at 1, which ranks
        // nothing.
        // A unit claimed twice (by a stream's window and a stride) once.
        let mut by_unit: HashMap<u64, (f64, f64)> = HashMap::new();
        for s in chosen {
            let e = by_unit.entry(s.unit).or_default();
            e.0 = e.0.max(s.read);
            e.1 = e.1.max(s.write);
        }
        let ranked = by_unit
            .into_iter()
            .map(|(unit, (read, write))| {
                let (r, w) = hot.get(&unit).copied().unwrap_or((0.0, 0.0));
                let rank = |p: f64, h: f64| if p >= 0.5 { 0.5 + 0.5 * h } else { p };
                Scored {
                    unit,
                    read: rank(read, r),
                    write: rank(write, w),
                }
            })
            .collect();
        top_n(ranked, MAX_CLAIMS.saturating_mul(16))
    }

    fn state_bytes(&self) -> usize {
        self.levels
            .iter()
            .map(|l| l.regional.state_bytes())
            .sum::<usize>()
            + self
                .pending
                .iter()
                .map(|p| {
                    p.touched.capacity() * 16 + p.claims.iter().map(Vec::len).sum::<usize>() * 8
                })
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::naive::Naive;
    use crate::predict::testkit::{MS, claimed};

    fn naive(_unit: u64) -> Vec<Box<dyn Model>> {
        vec![
            Box::new(Naive::last_horizon()),
            Box::new(Naive::ever_touched()),
        ]
    }

    fn touch(c: &mut Chooser, t_ms: u64, unit: u64) {
        c.observe(&Access {
            ts_ns: t_ms * MS,
            unit,
            bytes: 4096,
            write: true,
            stream: 1,
        });
    }

    #[test]
    fn a_workload_filling_new_blocks_of_old_extents_gets_the_coarse_unit() {
        // Every 100 ms horizon touches 8 fresh base units of one 16-unit
        // extent, the other 8 the horizon after: at the base unit the last
        // horizon's units are never touched again (F1 0), the extent at 16
        // units is (F1 2/3 with half its units touched, not worse than any
        // other), so the chooser ends on level 1.
        let mut c = Chooser::new(4096, 100 * MS, naive);
        for t in 0..3000u64 {
            let window = t / 100;
            let extent = window / 2 % 4;
            let half = window % 2;
            let unit = extent * 16 + half * 8 + (t % 8);
            touch(&mut c, t, unit);
        }
        let best = &c.standings()[0];
        assert_eq!(best.1, 4, "{:?}", c.standings());
        // The forecast is given at the base unit: whole 16-unit extents.
        let claims = claimed(&c.predict(3000 * MS, 100 * MS));
        assert!(
            !claims.is_empty() && claims.len().is_multiple_of(16),
            "{claims:?}"
        );
    }

    #[test]
    fn a_workload_rereading_its_blocks_keeps_the_base_unit() {
        // The same 8 units of each extent every horizon: the base unit's
        // last horizon is exact, a coarser unit claims twice as much.
        let mut c = Chooser::new(4096, 100 * MS, naive);
        for t in 0..3000u64 {
            touch(&mut c, t, (t % 4) * 16 + (t / 4) % 8);
        }
        let best = &c.standings()[0];
        assert_eq!(
            (best.0.as_str(), best.1),
            ("last-horizon", 0),
            "{:?}",
            c.standings()
        );
        assert_eq!(claimed(&c.predict(3000 * MS, 100 * MS)).len(), 32);
    }

    /// Claims every unit it has seen, each twice.
    struct Twice(Vec<u64>);

    impl Model for Twice {
        fn name(&self) -> &'static str {
            "twice"
        }
        fn observe(&mut self, a: &Access) {
            self.0.push(a.unit);
        }
        fn gap(&mut self, _start_ns: u64, _end_ns: u64) {}
        fn predict(&mut self, _now_ns: u64, _horizon_ns: u64) -> Vec<Scored> {
            let s = |unit| Scored {
                unit,
                read: 0.0,
                write: 1.0,
            };
            self.0.iter().flat_map(|&u| [s(u), s(u)]).collect()
        }
        fn state_bytes(&self) -> usize {
            0
        }
    }

    #[test]
    fn a_unit_claimed_twice_counts_once() {
        let mut c = Chooser::new(4096, 100 * MS, |_| {
            vec![Box::new(Twice(Vec::new())) as Box<dyn Model>]
        });
        for t in 0..2000u64 {
            touch(&mut c, t, t % 8);
        }
        let st = c.standings();
        let twice = st
            .iter()
            .find(|s| s.0 == "twice" && s.1 == 0)
            .and_then(|s| s.2)
            .expect("scored");
        // It claims exactly the 8 units touched every window: F1 1, not 2.
        assert!((twice - 1.0).abs() < 1e-9, "{st:?}");
    }
}
