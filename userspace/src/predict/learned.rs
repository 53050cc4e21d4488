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
use std::sync::Arc;

use super::boosted::{self, BINS, Forest, Row};
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
/// About this many candidates per window become training rows when recording.
const ROWS: u64 = 2_000;

/// How many features [`Features::vector`] gives, and their names in order
/// (the columns of `tern predict features`, checked against a model file).
pub const FEATURES: usize = 10;
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "age",
    "read_age",
    "write_age",
    "periods",
    "touches",
    "region",
    "prev_region",
    "next_region",
    "zone",
    "wrote_last",
];
/// The age, in horizons, given for "never".
const NEVER_AGE: f32 = 1.0e6;

/// What the model knows of a candidate unit at the moment of a forecast.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    horizon_ns: u64,
    /// Nanoseconds since the last access, read, write; `None`: never.
    age: Option<u64>,
    read_age: Option<u64>,
    write_age: Option<u64>,
    /// Of the last [`PERIODS`] horizon-long periods, those it was touched in.
    periods: u32,
    touches: u32,
    /// Units touched in the last horizon: of its region, of the regions
    /// before and after it, of its zone.
    region: u32,
    prev_region: u32,
    next_region: u32,
    zone: u32,
    wrote_last: bool,
}

impl Features {
    /// The features as numbers, ages in horizons, in [`FEATURE_NAMES`] order.
    pub fn vector(&self) -> [f32; FEATURES] {
        let h = self.horizon_ns.max(1) as f64;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an age in horizons needs no more than f32's precision"
        )]
        let age = |a: Option<u64>| a.map_or(NEVER_AGE, |a| (a as f64 / h).min(1.0e6) as f32);
        #[expect(
            clippy::cast_precision_loss,
            reason = "a feature, not a count to add up: past 2^24 touches (a day at 200/s) f32 rounds to 1 part in 16 million, which no split tells apart"
        )]
        let n = |c: u32| c as f32;
        [
            age(self.age),
            age(self.read_age),
            age(self.write_age),
            n(self.periods),
            n(self.touches),
            n(self.region),
            n(self.prev_region),
            n(self.next_region),
            n(self.zone),
            n(u32::from(self.wrote_last)),
        ]
    }

    fn age_bucket(&self) -> usize {
        self.age.map_or(NEVER, |a| age_bucket(a, self.horizon_ns))
    }

    /// The hand-made cell: age, periods, region and zone activity, and the
    /// last op (for a never-touched unit: whether the region before is active).
    fn bucket_cell(&self) -> usize {
        cell(
            self.age_bucket(),
            freq_bucket(self.periods),
            density_bucket(self.region),
            zone_bucket(self.zone),
            if self.age.is_none() {
                self.prev_region > 0
            } else {
                self.wrote_last
            },
        )
    }
}

/// How a candidate's features become its cell.
#[derive(Clone)]
enum Cells {
    /// The hand-made buckets (`learned`).
    Buckets,
    /// The hand-made cell refined by the trees' score (`boosted`): each
    /// hand-made cell split in [`BINS`].
    Trees(Arc<Forest>),
}

/// Cells without their zone: what a sparsely seen cell's rate is pulled toward.
fn zoneless(c: usize) -> usize {
    (c / 2 / ZONES) * 2 + c % 2
}

impl Cells {
    fn count(&self) -> usize {
        match self {
            Cells::Buckets => CELLS,
            Cells::Trees(_) => CELLS * BINS,
        }
    }

    fn of(&self, f: &Features) -> usize {
        match self {
            Cells::Buckets => f.bucket_cell(),
            Cells::Trees(forest) => f.bucket_cell() * BINS + boosted::bin(forest, f),
        }
    }

    /// The hand-made cell of a cell.
    fn bucket(&self, c: usize) -> usize {
        match self {
            Cells::Buckets => c,
            Cells::Trees(_) => c / BINS,
        }
    }

    /// The age bucket of a cell.
    fn age(&self, c: usize) -> usize {
        age_of(self.bucket(c))
    }

    /// The coarser cells a sparsely seen cell's rate is pulled toward, finest
    /// first: the rest of its hand-made cell (for a refined one: the other
    /// bins, so that trees scoring every unit alike change nothing), the
    /// hand-made cell without its zone, its age. Each level: its number of
    /// cells and a cell's parent there.
    fn chain(&self) -> Vec<Level> {
        let mut chain = vec![
            Level {
                cells: CELLS / ZONES,
                parent: Box::new(zoneless),
                rest: false,
            },
            Level {
                cells: AGES,
                parent: Box::new(age_of),
                rest: false,
            },
        ];
        if let Cells::Trees(_) = self {
            chain.insert(
                0,
                Level {
                    cells: CELLS,
                    parent: Box::new(|c| c),
                    rest: true,
                },
            );
            for level in &mut chain {
                let parent = std::mem::replace(&mut level.parent, Box::new(|c| c));
                level.parent = Box::new(move |c| parent(c / BINS));
            }
        }
        chain
    }
}

/// One level of [`Cells::chain`].
struct Level {
    cells: usize,
    parent: Box<dyn Fn(usize) -> usize>,
    /// The parent without the cell itself.
    rest: bool,
}

/// Training rows being recorded (`tern predict features`).
struct Recording {
    /// Moments before this are not recorded.
    from: u64,
    rows: Vec<Row>,
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    last: u64,
    last_read: Option<u64>,
    last_write: Option<u64>,
    /// Period (`ts / H`) of the last touch, and the touched periods before
    /// it: bit i = period `period - i`.
    period: u64,
    periods: u8,
    touches: u32,
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
    /// When recording: sampled candidates' features and whether touched.
    rows: HashMap<u64, ([f32; FEATURES], bool)>,
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
    cells: Cells,
    record: Option<Recording>,
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
        Learned::with_cells(horizon_ns, Cells::Buckets)
    }

    /// The same table over the boosted trees' scores (`boosted`).
    pub fn boosted(horizon_ns: u64, forest: Arc<Forest>) -> Learned {
        Learned::with_cells(horizon_ns, Cells::Trees(forest))
    }

    /// A table that also records its candidates from moment `from` on as
    /// training rows ([`Learned::finish`] returns them).
    pub fn recording(horizon_ns: u64, from: u64) -> Learned {
        Learned {
            record: Some(Recording {
                from,
                rows: Vec::new(),
            }),
            ..Learned::for_horizon(horizon_ns)
        }
    }

    /// Learns every window that ended by `now` and returns the rows recorded.
    pub fn finish(mut self, now: u64) -> Vec<Row> {
        self.resolve(now);
        self.record.map(|r| r.rows).unwrap_or_default()
    }

    fn with_cells(horizon_ns: u64, cells: Cells) -> Learned {
        let h = horizon_ns.max(4);
        Learned {
            horizon_ns: h,
            units: HashMap::new(),
            table: vec![Rates::default(); cells.count()],
            touched: 0.0,
            windows: 0,
            pending: Vec::new(),
            schedule: Schedule::quarter(h),
            claim: Vec::new(),
            rates: Vec::new(),
            cells,
            record: None,
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

    /// Every candidate at `now` with its features: `f(unit, features)`,
    /// given the region and zone activity at `now` ([`Learned::densities`]).
    fn candidates(
        &self,
        now: u64,
        (dens, zones): &(HashMap<u64, u32>, HashMap<u64, u32>),
        mut f: impl FnMut(u64, &Features),
    ) {
        let h = self.horizon_ns;
        let density = |region: u64| dens.get(&region).copied().unwrap_or(0);
        let zone = |unit: u64| zones.get(&(unit / ZONE_UNITS)).copied().unwrap_or(0);
        let around = |region: u64| {
            (
                region.checked_sub(1).map_or(0, density),
                density(region),
                density(region.saturating_add(1)),
            )
        };
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
            let (prev_region, region, next_region) = around(unit / REGION_UNITS);
            let ago = |t: Option<u64>| t.filter(|&t| t < now).map(|t| now - t);
            f(
                unit,
                &Features {
                    horizon_ns: h,
                    age: Some(now - u.last),
                    read_age: ago(u.last_read),
                    write_age: ago(u.last_write),
                    periods: periods.count_ones(),
                    touches: u.touches,
                    region,
                    prev_region,
                    next_region,
                    zone: zone(unit),
                    wrote_last: u.wrote_last,
                },
            );
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
            let (prev_region, density, next_region) = around(region);
            let features = Features {
                horizon_ns: h,
                age: None,
                read_age: None,
                write_age: None,
                periods: 0,
                touches: 0,
                region: density,
                prev_region,
                next_region,
                zone: zone(region * REGION_UNITS),
                wrote_last: false,
            };
            for unit in region * REGION_UNITS..(region + 1) * REGION_UNITS {
                if !self.units.contains_key(&unit) {
                    f(unit, &features);
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
        let recording = self.record.as_ref().is_some_and(|r| at >= r.from);
        let row_sample = estimate.div_ceil(ROWS).max(1);
        let mut cells = HashMap::new();
        let mut rows = HashMap::new();
        self.candidates(at, &activity, |unit, f| {
            if sampled(unit, sample) {
                let c = self.cells.of(f);
                cells.insert(unit, u16::try_from(c).expect("at most 8192 cells"));
            }
            // Another hash of the unit: rows are not the table's sample.
            if recording && sampled(unit.rotate_left(29), row_sample) {
                rows.insert(unit, (f.vector(), false));
            }
        });
        self.pending.push(Pending {
            at,
            cells,
            sample,
            hits: vec![Rates::default(); self.table.len()],
            touched: 0.0,
            rows,
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
            if let Some(rec) = &mut self.record {
                let mut rows: Vec<Row> = p
                    .rows
                    .into_iter()
                    .map(|(unit, (features, touched))| Row {
                        at_ns: p.at,
                        unit,
                        features,
                        touched,
                    })
                    .collect();
                rows.sort_unstable_by_key(|r| r.unit);
                rec.rows.extend(rows);
            }
        }
        self.rates = self.smooth();
        self.claim = self.best_cells(&self.rates);
    }

    /// Each cell's rate of units touched (any, read, write), pulled toward
    /// the rate of the cells like it where it was seldom seen ([`Cells::chain`]:
    /// e.g. a cell toward the same cell over every zone, that toward its
    /// age's rate, that toward the mean).
    fn smooth(&self) -> Vec<(f64, f64, f64)> {
        let chain = self.cells.chain();
        let mut levels: Vec<Vec<Rates>> = chain
            .iter()
            .map(|l| vec![Rates::default(); l.cells])
            .collect();
        let mut all = Rates::default();
        for (c, r) in self.table.iter().enumerate() {
            let parents = levels
                .iter_mut()
                .zip(&chain)
                .map(|(level, l)| &mut level[(l.parent)(c)]);
            for acc in parents.chain([&mut all]) {
                acc.n += r.n;
                acc.any += r.any;
                acc.read += r.read;
                acc.write += r.write;
            }
        }
        let toward = |r: &Rates, prior: f64| (r.any + PRIOR * prior) / (r.n + PRIOR);
        let mean = if all.n > 0.0 { all.any / all.n } else { 0.0 };
        (0..self.table.len())
            .map(|c| {
                let r = &self.table[c];
                let p = levels
                    .iter()
                    .zip(&chain)
                    .rev()
                    .fold(mean, |prior, (level, l)| {
                        let at = &level[(l.parent)(c)];
                        if l.rest {
                            let rest = Rates {
                                n: at.n - r.n,
                                any: at.any - r.any,
                                read: at.read - r.read,
                                write: at.write - r.write,
                            };
                            toward(&rest, prior)
                        } else {
                            toward(at, prior)
                        }
                    });
                let p = toward(r, p);
                // Which op: the cell's own mix where it has one, else its
                // zoneless cell's.
                let (k, l) = chain
                    .iter()
                    .enumerate()
                    .find(|(_, l)| !l.rest)
                    .expect("the chain has the zoneless level");
                let mix = if r.any > 0.0 {
                    r
                } else {
                    &levels[k][(l.parent)(c)]
                };
                let share = |x: f64| if mix.any > 0.0 { x / mix.any } else { 0.5 };
                (p, p * share(mix.read), p * share(mix.write))
            })
            .collect()
    }

    /// The F1-optimal set of cells on the windows learned: cells in falling
    /// smoothed rate, as far as F1 (with the smoothed rates) rises.
    fn best_cells(&self, rates: &[(f64, f64, f64)]) -> Vec<bool> {
        let n = self.table.len();
        let mut order: Vec<usize> = (0..n).filter(|&c| self.table[c].n > 0.0).collect();
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
        let mut claim = vec![false; n];
        for &c in &order[..take] {
            claim[c] = true;
        }
        // What the set scored on those windows, counted: if either naive
        // forecast (a set of cells too) scored better, take it.
        let counted = |set: &[bool]| {
            let (tp, n) = (0..n).filter(|&c| set[c]).fold((0.0, 0.0), |(tp, n), c| {
                (tp + self.table[c].any, n + self.table[c].n)
            });
            f1(tp, n)
        };
        let mut best = counted(&claim);
        for keep in [
            &(|age: usize| age < WITHIN_HORIZON) as &dyn Fn(usize) -> bool,
            &|age: usize| age != NEVER,
        ] {
            let set: Vec<bool> = (0..n).map(|c| keep(self.cells.age(c))).collect();
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
        match self.cells {
            Cells::Buckets => "learned",
            Cells::Trees(_) => "boosted",
        }
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
            if let Some(row) = p.rows.get_mut(&a.unit) {
                row.1 = true;
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
            touches: 0,
            wrote_last: a.write,
        });
        u.touches = u.touches.saturating_add(1);
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
                record: self.record.take(),
                ..Learned::with_cells(horizon_ns, self.cells.clone())
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
        self.candidates(now_ns, &self.densities(now_ns), |unit, f| {
            let c = self.cells.of(f);
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
    fn the_trees_split_a_hand_made_cell_by_their_score() {
        // A stump on `touches` (feature 4): few touches score low, many high.
        let stump = format!(
            r#"{{"format":"tern-boosted-trees","version":1,"features":{},"base_score":0.0,"learning_rate":1.0,"trees":[{{"feature":[4,-2,-2],"threshold":[10.0,-2,-2],"left":[1,-1,-1],"right":[2,-1,-1],"value":[0.0,-5.0,5.0]}}]}}"#,
            serde_json::to_string(&FEATURE_NAMES).expect("names serialize")
        );
        let trees = Cells::Trees(Arc::new(Forest::parse(&stump).expect("a valid model")));
        let few = Features {
            horizon_ns: 100 * MS,
            age: Some(50 * MS),
            read_age: Some(50 * MS),
            write_age: None,
            periods: 0b11,
            touches: 2,
            region: 3,
            prev_region: 0,
            next_region: 0,
            zone: 5,
            wrote_last: false,
        };
        let many = Features {
            touches: 500,
            ..few
        };
        let hand = Cells::Buckets.of(&few);
        assert_eq!(Cells::Buckets.of(&many), hand, "one hand-made cell");
        let (a, b) = (trees.of(&few), trees.of(&many));
        assert!(a < b, "split by the score, the higher bin above: {a} {b}");
        assert_eq!((trees.bucket(a), trees.bucket(b)), (hand, hand));
        assert_eq!(
            b - a,
            BINS - 1,
            "scores near 0 and 1: the first and last bins"
        );
    }

    #[test]
    fn trees_that_score_every_unit_alike_leave_the_claims_as_they_were() {
        // Every hand-made cell falls in one bin: the refined table is the
        // hand-made one, and so are its claims.
        let one_leaf = format!(
            r#"{{"format":"tern-boosted-trees","version":1,"features":{},"base_score":-1.0,"learning_rate":0.1,"trees":[{{"feature":[-2],"threshold":[-2],"left":[-1],"right":[-1],"value":[3.0]}}]}}"#,
            serde_json::to_string(&FEATURE_NAMES).expect("names serialize")
        );
        let forest = Arc::new(Forest::parse(&one_leaf).expect("a valid model"));
        let h = 100 * MS;
        let mut plain = Learned::for_horizon(h);
        let mut refined = Learned::boosted(h, forest);
        assert_eq!(refined.name(), "boosted");
        for t in (0..4000).step_by(10) {
            for ev in [read(t * MS, 1000 + t / 3), read(t * MS + 1, t % 97)] {
                plain.feed(&ev);
                refined.feed(&ev);
            }
        }
        let now = 4000 * MS;
        let claims = claimed(&plain.predict(now, h));
        assert!(!claims.is_empty());
        assert_eq!(claimed(&refined.predict(now, h)), claims);
    }

    #[test]
    fn recorded_rows_label_what_the_next_horizon_touched() {
        // Unit 5 read every 100 ms, unit 9 once at the start: rows of unit
        // 5 are touched, those of unit 9 are not, and ages are in horizons.
        let h = 200 * MS;
        let mut m = Learned::recording(h, 0);
        m.feed(&read(0, 9));
        for t in (0..3000).step_by(100) {
            m.feed(&read(t * MS + 1, 5));
        }
        let rows = m.finish(3000 * MS);
        let of = |unit: u64| rows.iter().filter(move |r| r.unit == unit);
        assert!(of(5).count() > 5 && of(9).count() > 5);
        assert!(of(5).all(|r| r.touched) && of(9).all(|r| !r.touched));
        let r = of(9).next_back().expect("rows of unit 9");
        let age = (r.at_ns as f64 / h as f64) as f32;
        assert!((r.features[0] - age).abs() < 1e-3, "{r:?}");
        assert!((r.features[4] - 1.0).abs() < f32::EPSILON, "{r:?}");
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
