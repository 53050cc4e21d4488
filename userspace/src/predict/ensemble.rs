//! The ensemble: per 1 MiB region, use the model that has predicted that
//! region best so far. Every horizon of history (doubling the interval every
//! 64 checkpoints, so replaying a long history stays cheap) each model's
//! claims are kept and, once the horizon has passed, scored per region
//! against what happened (F1 of the claimed units, older evidence decayed).
//! A region where no model has been right yet (no evidence, or only misses
//! and wrong claims) uses the choice of the nearest region within
//! [`NEIGHBOURS`] where one has (a scan or a growing file enters regions
//! next to those where its model has proved itself), else the model best
//! over all regions — unless that model has already been wrong there.

use std::collections::{HashMap, HashSet};

use super::{Access, Model, REGION_UNITS, Scored};

/// Weight kept by older evidence at each new score of a region.
const DECAY: f64 = 0.7;
/// A region where even the best model has scored below this is not claimed:
/// its accesses are not predictable by any model here, and claims there
/// would only cost precision.
const MIN_F1: f64 = 0.3;
const CHECKPOINTS_PER_DOUBLING: u64 = 64;
/// How many regions either side a region where no model has been right yet
/// looks for one where a model has, to borrow its choice.
const NEIGHBOURS: u64 = 8;
/// Weight kept by older windows in the whole-disk standings that decide
/// between the per-region combination and the best model alone.
const RECENT_DECAY: f64 = 0.8;

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    tp: f64,
    fp: f64,
    fn_: f64,
}

impl Tally {
    fn f1(&self) -> Option<f64> {
        let d = 2.0 * self.tp + self.fp + self.fn_;
        (d > 0.0).then(|| 2.0 * self.tp / d)
    }

    fn add(&mut self, tp: f64, fp: f64, fn_: f64, decay: f64) {
        self.tp = self.tp * decay + tp;
        self.fp = self.fp * decay + fp;
        self.fn_ = self.fn_ * decay + fn_;
    }
}

struct Pending {
    at: u64,
    claims: Vec<Vec<Scored>>,
    /// The per-region combination made from `claims` at `at`.
    combined: Vec<Scored>,
    /// Units touched in `[at, at + horizon)`.
    actual: HashSet<u64>,
}

/// Chooses among `models` per region.
pub struct Ensemble {
    models: Vec<Box<dyn Model>>,
    horizon_ns: u64,
    regions: HashMap<u64, Vec<Tally>>,
    global: Vec<Tally>,
    /// Recent F1 over all regions, per model and (last) for the per-region
    /// combination: the combination is used only while it has been at least
    /// as good as every model alone.
    recent: Vec<Tally>,
    pending: Option<Pending>,
    next_checkpoint: Option<u64>,
    interval: u64,
    checkpoints: u64,
}

impl Ensemble {
    /// Scores are kept for windows of `horizon_ns` (the horizon it will be asked about).
    pub fn new(models: Vec<Box<dyn Model>>, horizon_ns: u64) -> Ensemble {
        let n = models.len();
        Ensemble {
            models,
            horizon_ns: horizon_ns.max(1),
            regions: HashMap::new(),
            global: vec![Tally::default(); n],
            recent: vec![Tally::default(); n + 1],
            pending: None,
            next_checkpoint: None,
            interval: horizon_ns.max(1),
            checkpoints: 0,
        }
    }

    /// The model names and their F1 over all regions so far.
    pub fn standings(&self) -> Vec<(&'static str, Option<f64>)> {
        self.models
            .iter()
            .zip(&self.global)
            .map(|(m, t)| (m.name(), t.f1()))
            .collect()
    }

    fn score_pending(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let n = self.models.len();
        // Per region, per model: (tp, fp, fn).
        let mut per_region: HashMap<u64, Vec<(f64, f64, f64)>> = HashMap::new();
        let mut claimed_by: Vec<HashSet<u64>> = Vec::with_capacity(n);
        for (m, claims) in p.claims.iter().enumerate() {
            let mut set = HashSet::new();
            for s in claims.iter().filter(|s| s.any() >= 0.5) {
                set.insert(s.unit);
                let e = per_region
                    .entry(s.unit / REGION_UNITS)
                    .or_insert_with(|| vec![(0.0, 0.0, 0.0); n]);
                if p.actual.contains(&s.unit) {
                    e[m].0 += 1.0;
                } else {
                    e[m].1 += 1.0;
                }
            }
            claimed_by.push(set);
        }
        for &unit in &p.actual {
            let e = per_region
                .entry(unit / REGION_UNITS)
                .or_insert_with(|| vec![(0.0, 0.0, 0.0); n]);
            for (m, set) in claimed_by.iter().enumerate() {
                if !set.contains(&unit) {
                    e[m].2 += 1.0;
                }
            }
        }
        let all_claims = p.claims.iter().chain(std::iter::once(&p.combined));
        for (m, claims) in all_claims.enumerate() {
            let set: HashSet<u64> = claims
                .iter()
                .filter(|s| s.any() >= 0.5)
                .map(|s| s.unit)
                .collect();
            let tp = set.iter().filter(|u| p.actual.contains(u)).count() as f64;
            let fp = set.len() as f64 - tp;
            let fn_ = p.actual.len() as f64 - tp;
            self.recent[m].add(tp, fp, fn_, RECENT_DECAY);
        }
        for (region, counts) in per_region {
            let tallies = self
                .regions
                .entry(region)
                .or_insert_with(|| vec![Tally::default(); n]);
            for (m, (tp, fp, fn_)) in counts.into_iter().enumerate() {
                tallies[m].add(tp, fp, fn_, DECAY);
                self.global[m].add(tp, fp, fn_, 1.0);
            }
        }
    }

    fn checkpoint(&mut self, at: u64) {
        self.score_pending();
        let h = self.horizon_ns;
        let claims: Vec<Vec<Scored>> = self.models.iter_mut().map(|m| m.predict(at, h)).collect();
        let combined = self.combine(&claims);
        self.pending = Some(Pending {
            at,
            claims,
            combined,
            actual: HashSet::new(),
        });
        self.checkpoints += 1;
        if self.checkpoints.is_multiple_of(CHECKPOINTS_PER_DOUBLING) {
            self.interval = self.interval.saturating_mul(2);
        }
        self.next_checkpoint = Some(at.saturating_add(self.interval));
    }

    /// Per region, the claims of the model chosen there.
    fn combine(&self, claims: &[Vec<Scored>]) -> Vec<Scored> {
        let best = self.best_global();
        // A region where some model has been right: its best model, or none
        // if even that one scored too low.
        let scored = |tallies: &[Tally]| -> Option<usize> {
            let mut pick = best;
            let mut pick_f1 = tallies[best].f1().unwrap_or(0.0);
            for (m, t) in tallies.iter().enumerate() {
                if let Some(f1) = t.f1()
                    && f1 > pick_f1
                {
                    pick = m;
                    pick_f1 = f1;
                }
            }
            (pick_f1 >= MIN_F1).then_some(pick)
        };
        let proven = |region: u64| {
            self.regions
                .get(&region)
                .filter(|t| t.iter().any(|t| t.tp > 0.0))
        };
        let choice = |region: u64| -> Option<usize> {
            if let Some(tallies) = proven(region) {
                return scored(tallies);
            }
            // Nobody has been right here yet (no evidence, or only misses
            // and wrong claims): borrow the choice of the nearest proven
            // neighbour, below first on a tie (a forward scan has just left
            // it), else the best model over all...
            let borrowed = (1..=NEIGHBOURS)
                .find_map(|d| {
                    region
                        .checked_sub(d)
                        .and_then(proven)
                        .or_else(|| region.checked_add(d).and_then(proven))
                })
                .map_or(Some(best), |tallies| scored(tallies));
            // ...unless that model has already been wrong here.
            let here = self.regions.get(&region);
            borrowed.filter(|&m| here.is_none_or(|t| t[m].fp == 0.0))
        };
        let mut chosen: HashMap<u64, Option<usize>> = HashMap::new();
        let mut out = Vec::new();
        for (m, claims) in claims.iter().enumerate() {
            for s in claims {
                let region = s.unit / REGION_UNITS;
                let pick = *chosen.entry(region).or_insert_with(|| choice(region));
                if pick == Some(m) {
                    out.push(*s);
                }
            }
        }
        out
    }

    /// The combination, unless one model alone has lately done better over
    /// the whole disk (a global fallback proven on past windows).
    fn fallback(&self, claims: &[Vec<Scored>], combined: &[Scored]) -> Vec<Scored> {
        let n = self.models.len();
        let together = self.recent[n].f1().unwrap_or(0.0);
        let alone = (0..n)
            .filter_map(|m| self.recent[m].f1().map(|f| (m, f)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        match alone {
            Some((m, f)) if f > together => claims[m].clone(),
            _ => combined.to_vec(),
        }
    }

    /// Every model's claims at `now` and, last, the ensemble's own, without
    /// moving its checkpoints (for a chooser scoring them on its own windows).
    pub fn every_claim(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Vec<Scored>> {
        let mut claims: Vec<Vec<Scored>> = self
            .models
            .iter_mut()
            .map(|m| m.predict(now_ns, horizon_ns))
            .collect();
        let combined = self.combine(&claims);
        claims.push(self.fallback(&claims[..self.models.len()], &combined));
        claims
    }

    /// The models' names, in the order of [`Ensemble::every_claim`].
    pub fn names(&self) -> Vec<&'static str> {
        self.models.iter().map(|m| m.name()).collect()
    }

    fn best_global(&self) -> usize {
        (0..self.global.len())
            .max_by(|&a, &b| {
                let f = |i: usize| self.global[i].f1().unwrap_or(0.0);
                f(a).total_cmp(&f(b)).then(b.cmp(&a))
            })
            .unwrap_or(0)
    }
}

impl Model for Ensemble {
    fn name(&self) -> &'static str {
        "regional"
    }

    fn observe(&mut self, a: &Access) {
        match self.next_checkpoint {
            None => self.next_checkpoint = Some(a.ts_ns.saturating_add(self.interval)),
            Some(t) if a.ts_ns >= t => self.checkpoint(t),
            Some(_) => {}
        }
        if let Some(p) = &mut self.pending
            && a.ts_ns >= p.at
            && a.ts_ns < p.at.saturating_add(self.horizon_ns)
        {
            p.actual.insert(a.unit);
        }
        for m in &mut self.models {
            m.observe(a);
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        // A window the gap overlaps cannot be scored.
        if let Some(p) = &self.pending
            && start_ns < p.at.saturating_add(self.horizon_ns)
            && p.at < end_ns.max(start_ns + 1)
        {
            self.pending = None;
        }
        for m in &mut self.models {
            m.gap(start_ns, end_ns);
        }
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        if horizon_ns != self.horizon_ns {
            self.horizon_ns = horizon_ns.max(1);
        }
        if self.pending.as_ref().is_none_or(|p| p.at != now_ns) {
            self.checkpoint(now_ns);
        }
        let Some(p) = &self.pending else {
            return Vec::new();
        };
        self.fallback(&p.claims, &p.combined)
    }

    fn state_bytes(&self) -> usize {
        self.models.iter().map(|m| m.state_bytes()).sum::<usize>()
            + self.regions.len() * (16 + self.models.len() * size_of::<Tally>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::hotset::HotSet;
    use crate::predict::stride::Stride;
    use crate::predict::testkit::{MS, claimed, read};

    /// An ensemble of the hot set (model 0) and the stride model (model 1).
    fn hot_set_and_stride() -> Ensemble {
        let models: Vec<Box<dyn Model>> =
            vec![Box::new(HotSet::default()), Box::new(Stride::default())];
        Ensemble::new(models, 50 * MS)
    }

    /// A read of `unit` at `t_ms` by `stream`.
    fn read_by(e: &mut Ensemble, t_ms: u64, unit: u64, stream: u32) {
        let crate::predict::Event::Access(mut acc) = read(t_ms * MS, unit) else {
            unreachable!()
        };
        acc.stream = stream;
        e.observe(&acc);
    }

    #[test]
    fn each_region_gets_the_model_that_predicted_it_best() {
        // Region 0 (units 0..16) is re-read in a loop: the hot set is right
        // there. Far away a scan runs forward: the stride model is right
        // there, and the hot set's claims on the scanned units are wrong.
        let mut e = hot_set_and_stride();
        let mut scan = 1_000_000u64;
        for t in 0..2000u64 {
            let mut a = |unit, stream| read_by(&mut e, t, unit, stream);
            a(t % 4, 1);
            a(scan, 2);
            scan += 1;
        }
        let s = e.predict(2000 * MS, 50 * MS);
        let c = claimed(&s);
        assert!(c.contains(&0) && c.contains(&3), "the loop: {c:?}");
        assert!(
            c.contains(&scan) && c.contains(&(scan + 40)),
            "the scan ahead"
        );
        assert!(
            !c.contains(&(scan - 5)),
            "the scanned units behind are not re-read; the hot set's claim there is dropped"
        );
    }

    #[test]
    fn a_region_without_evidence_borrows_its_neighbours_choice() {
        // A busy loop over 8 regions makes the hot set the best model over
        // all; a slow scan, where the stride model is right, runs into
        // regions nobody has scored yet. Its claims there must be kept.
        let mut e = hot_set_and_stride();
        let mut scan = 1_000_000u64;
        for t in 0..2000u64 {
            let mut a = |unit, stream| read_by(&mut e, t, unit, stream);
            for k in 0..8 {
                a((t * 8 + k) % 128, 1);
            }
            a(scan, 2);
            scan += 1;
        }
        let standings = e.standings();
        assert_eq!(
            standings
                .iter()
                .max_by(|a, b| a.1.unwrap_or(0.0).total_cmp(&b.1.unwrap_or(0.0)))
                .map(|s| s.0),
            Some("lru"),
            "the loop makes the hot set best over all: {standings:?}"
        );
        let s = e.predict(2000 * MS, 50 * MS);
        let c = claimed(&s);
        assert!(c.contains(&5) && c.contains(&100), "the loop: {c:?}");
        // 40 units ahead is two regions past the last scored one.
        assert!(
            c.contains(&scan) && c.contains(&(scan + 40)),
            "the scan ahead, in regions without evidence"
        );
    }

    #[test]
    fn a_region_nobody_predicted_yet_takes_its_neighbours_model_unless_it_was_wrong_there() {
        let mut e = hot_set_and_stride();
        let mut a = |t: u64, unit, stream| read_by(&mut e, t, unit, stream);
        // Regions 100..105: each unit read once, each by its own stream, so
        // only the hot set claims them afterwards, and wrongly.
        for k in 0..80u64 {
            a(
                k * 5,
                1600 + (k * 37) % 80,
                1000 + u32::try_from(k).expect("a small index"),
            );
        }
        // A scan on its own stream arrives just below region 100. Meanwhile
        // a busy loop over regions 0..8 makes the hot set the best model over
        // all, and, far away, region 300 gets the same treatment as regions
        // 100..105 up to the end.
        for t in 1000..1195u64 {
            a(t, 1400 + (t - 1000), 2);
            for k in 0..8 {
                a(t, (t * 8 + k) % 128, 1);
            }
            if t % 12 == 0 {
                let k = (t - 1000) / 12;
                a(
                    t,
                    4800 + (k * 7) % 16,
                    2000 + u32::try_from(k).expect("a small index"),
                );
            }
        }
        let s = e.predict(1195 * MS, 50 * MS);
        assert_eq!(e.best_global(), 0, "the hot set is best over all");
        let c = claimed(&s);
        assert!(
            c.contains(&1600) && c.contains(&1640),
            "the scan ahead, into regions only the hot set had claimed (wrongly): {c:?}"
        );
        assert!(
            !c.iter().any(|u| (4800..4816).contains(u)),
            "the hot set was wrong in region 300 and is not trusted there: {c:?}"
        );
    }
}
