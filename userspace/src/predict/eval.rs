//! The evaluation harness behind `tern predict eval`: train each model on
//! one part of a history, then walk the test part one horizon at a time —
//! predict at the window's start, compare with what the window did, show the
//! model the window, move on — and sum the counts over the windows.
//!
//! Per model (the JSON field names in brackets; `docs/prediction.md` has the
//! table):
//! - working set (any op, claims with probability >= 0.5): precision and
//!   coverage by count of units [`precision`, `coverage`] and by bytes
//!   [`precision_bytes`: of the bytes a prefetch of the claimed units would
//!   move, the share the window then used; `coverage_bytes`: of the bytes the
//!   window accessed, the share inside claimed units];
//! - post-cutover misses [`read_misses`]: distinct units the window read that
//!   a destination cache filled with the model's top read claims would not
//!   hold, at a budget of the units read in the previous window (what is known
//!   at cutover); [`budget_curve`] gives the read coverage at 0.5x to 8x that;
//! - re-sent bytes [`resent_baseline_bytes`: units written in the window, each
//!   of which a copy made at the window's start would send again;
//!   `resent_avoided_bytes`: those the model held back (write claims >= 0.5);
//!   `held_bytes`: all it held back];
//! - cost [`train_seconds`, `predict_seconds`, `state_bytes`, `events_per_second`].
//!
//! The model sees every event before the test's start (from the train
//! range's start); windows that overlap a gap are skipped, not scored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::boosted::Forest;
use super::{Event, MODEL_NAMES, Model, PredictError, Units, build_with};
use crate::trace::Record;

/// Budget multiples of the previous window's read set in the curve.
pub const BUDGET_FACTORS: [f64; 5] = [0.5, 1.0, 2.0, 4.0, 8.0];

/// The units every model is evaluated at unless told otherwise.
pub const UNITS: [u64; 3] = [4 << 10, 64 << 10, 1 << 20];

/// The resolution of the block figures: what a 4 KiB page cache or a
/// 4 KiB-block copy would move.
const BLOCK: u64 = 4096;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Units to evaluate every model at; empty: [`UNITS`].
    pub units: Vec<u64>,
    pub target: u16,
    pub horizon_ns: u64,
    /// How far the forecast's moment moves between windows; `None`: one
    /// horizon (windows tile the test range). Shorter steps give
    /// overlapping windows; each is a whole horizon.
    pub step_ns: Option<u64>,
    /// Fractions of the history's time span, e.g. (0.0, 0.5).
    pub train: (f64, f64),
    pub test: (f64, f64),
    /// Model names; empty: all of [`MODEL_NAMES`].
    pub models: Vec<String>,
    /// At most this many windows are scored (evenly spread); all are fed.
    pub max_windows: usize,
    /// The trees of `boosted`; `None`: the model shipped in the binary.
    pub forest: Option<Arc<Forest>>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            units: Vec::new(),
            target: 0,
            horizon_ns: 10_000_000_000,
            step_ns: None,
            train: (0.0, 0.5),
            test: (0.5, 1.0),
            models: Vec::new(),
            max_windows: 200,
            forest: None,
        }
    }
}

/// Parses `FROM-TO%` (e.g. `0-50%`) into fractions.
pub fn parse_split(text: &str) -> Result<(f64, f64), PredictError> {
    let bad = || PredictError::Split(text.to_owned());
    let body = text.trim().trim_end_matches('%');
    let (a, b) = body.split_once('-').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    if !((0.0..100.0).contains(&a) && a < b && b <= 100.0) {
        return Err(bad());
    }
    Ok((a / 100.0, b / 100.0))
}

/// One point of the prefetch-budget curve.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetPoint {
    /// Multiple of the previous window's read set.
    pub factor: f64,
    /// Mean budget per window in bytes.
    pub budget_bytes: u64,
    /// Share of the distinct units read that the prefetched set held.
    pub read_coverage: Option<f64>,
}

/// One scored window of one row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowScore {
    /// The forecast's moment (trace nanoseconds).
    pub at_ns: u64,
    pub f1: Option<f64>,
    pub f1_blocks: Option<f64>,
}

/// One model's row at one unit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelReport {
    pub name: String,
    pub unit: u64,
    pub precision: Option<f64>,
    pub coverage: Option<f64>,
    pub f1: Option<f64>,
    /// The same by distinct 4 KiB blocks: a claimed unit claims all its
    /// blocks, an access touches the blocks it covers.
    pub precision_blocks: Option<f64>,
    pub coverage_blocks: Option<f64>,
    pub f1_blocks: Option<f64>,
    pub precision_bytes: Option<f64>,
    pub coverage_bytes: Option<f64>,
    pub predicted_units: u64,
    pub actual_units: u64,
    pub hit_units: u64,
    pub predicted_blocks: u64,
    pub actual_blocks: u64,
    pub hit_blocks: u64,
    pub read_units: u64,
    pub read_misses: u64,
    pub resent_baseline_bytes: u64,
    pub resent_avoided_bytes: u64,
    pub held_bytes: u64,
    pub budget_curve: Vec<BudgetPoint>,
    pub train_seconds: f64,
    pub predict_seconds: f64,
    pub state_bytes: u64,
    /// Events the model learned from per second of its training time.
    pub events_per_second: f64,
    pub windows: Vec<WindowScore>,
}

/// The bar a model must clear: the best naive forecast's F1 by blocks plus a
/// tenth of what it leaves to perfect.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Target {
    pub naive: String,
    pub naive_unit: u64,
    pub naive_f1_blocks: f64,
    pub target_f1_blocks: f64,
    pub model: String,
    pub unit: u64,
    pub f1_blocks: Option<f64>,
    pub met: bool,
}

/// The whole evaluation (`tern predict eval --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub version: u32,
    pub units: Vec<u64>,
    pub horizon_ns: u64,
    pub step_ns: u64,
    /// History span and the train and test ranges, in the trace's nanoseconds.
    pub span_ns: (u64, u64),
    pub train_ns: (u64, u64),
    pub test_ns: (u64, u64),
    pub windows: u64,
    pub scored_windows: u64,
    pub gap_windows: u64,
    pub train_events: u64,
    pub test_events: u64,
    /// Events per second of history in the test range (what training must keep up with).
    pub history_events_per_second: f64,
    pub models: Vec<ModelReport>,
    /// The ensemble at the finest unit (it chooses among coarser ones
    /// itself) against the best naive forecast.
    pub target: Option<Target>,
}

#[derive(Default, Clone)]
struct Counts {
    predicted: u64,
    actual: u64,
    hits: u64,
    predicted_blocks: u64,
    actual_blocks: u64,
    hit_blocks: u64,
    predicted_bytes: u64,
    used_bytes: u64,
    actual_bytes: u64,
    covered_bytes: u64,
    read_units: u64,
    read_misses: u64,
    resent_baseline: u64,
    resent_avoided: u64,
    held: u64,
    curve_hits: Vec<u64>,
    curve_budget: Vec<u64>,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            curve_hits: vec![0; BUDGET_FACTORS.len()],
            curve_budget: vec![0; BUDGET_FACTORS.len()],
            ..Counts::default()
        }
    }

    fn add(&mut self, o: &Counts) {
        self.predicted += o.predicted;
        self.actual += o.actual;
        self.hits += o.hits;
        self.predicted_blocks += o.predicted_blocks;
        self.actual_blocks += o.actual_blocks;
        self.hit_blocks += o.hit_blocks;
        self.predicted_bytes += o.predicted_bytes;
        self.used_bytes += o.used_bytes;
        self.actual_bytes += o.actual_bytes;
        self.covered_bytes += o.covered_bytes;
        self.read_units += o.read_units;
        self.read_misses += o.read_misses;
        self.resent_baseline += o.resent_baseline;
        self.resent_avoided += o.resent_avoided;
        self.held += o.held;
        for (a, b) in self.curve_hits.iter_mut().zip(&o.curve_hits) {
            *a += b;
        }
        for (a, b) in self.curve_budget.iter_mut().zip(&o.curve_budget) {
            *a += b;
        }
    }

    fn f1(&self) -> Option<f64> {
        f1(self.hits, self.predicted, self.actual)
    }

    fn f1_blocks(&self) -> Option<f64> {
        f1(self.hit_blocks, self.predicted_blocks, self.actual_blocks)
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// F1 of a claim of `predicted` items of which `hits` came, against `actual`.
fn f1(hits: u64, predicted: u64, actual: u64) -> Option<f64> {
    ratio(2 * hits, predicted + actual)
}

/// What one window did per unit: bytes read, bytes written.
type WindowActual = HashMap<u64, (u64, u64)>;

/// The history's block requests and gaps on the target, in time order, and
/// their 4 KiB events.
fn block_records<I, E>(history: I, blocks: Units) -> Result<(Vec<Record>, Vec<Event>), PredictError>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut records = Vec::new();
    let mut scratch = Vec::new();
    for record in history {
        let record = record.map_err(|e| PredictError::History(Box::new(e)))?;
        scratch.clear();
        blocks.events(&record, &mut scratch);
        if !scratch.is_empty() {
            records.push(record);
        }
    }
    // Trace records are in issue order per CPU chunk; make time order exact.
    records.sort_by_key(Record::ts_ns);
    let mut events = Vec::new();
    for r in &records {
        blocks.events(r, &mut events);
    }
    if !events.iter().any(|e| matches!(e, Event::Access(_))) {
        return Err(PredictError::NoAccesses {
            target: blocks.target,
        });
    }
    Ok((records, events))
}

/// The test range's windows: one every step, each a whole horizon (a
/// forecast for a horizon is judged on a horizon: a window cut short at the
/// test's end would judge it on a sliver); when not even one whole horizon
/// fits, the one window the test range holds. At most `max` are scored,
/// evenly spread, and none that overlaps a gap. Also returns how many are
/// scored and how many were skipped for a gap.
fn windows_of(
    blocks: &[Event],
    (test_from, test_to): (u64, u64),
    (h, step): (u64, u64),
    max: usize,
) -> (Vec<Window>, u64, u64) {
    let gaps: Vec<(u64, u64)> = blocks
        .iter()
        .filter_map(|e| match e {
            Event::Gap { start_ns, end_ns } => Some((*start_ns, (*end_ns).max(start_ns + 1))),
            Event::Access(_) => None,
        })
        .collect();
    let in_gap = |from: u64, to: u64| gaps.iter().any(|&(s, e)| s < to && from < e);

    let mut starts = Vec::new();
    let mut t = test_from;
    while t < test_to && (t.saturating_add(h) <= test_to || starts.is_empty()) {
        starts.push(t);
        t = t.saturating_add(step);
    }
    let every = (starts.len() as u64).div_ceil(max.max(1) as u64).max(1);
    let (mut scored_windows, mut gap_windows) = (0, 0);
    let mut windows: Vec<Window> = Vec::with_capacity(starts.len());
    windows.extend(starts.iter().enumerate().map(|(k, &from)| {
        let to = from.saturating_add(h).min(test_to);
        let picked = (k as u64).is_multiple_of(every);
        let gap = picked && in_gap(from, to);
        scored_windows += u64::from(picked && !gap);
        gap_windows += u64::from(gap);
        Window {
            at: from,
            to,
            scored: picked && !gap,
            blocks: Vec::new(),
        }
    }));
    for w in windows.iter_mut().filter(|w| w.scored) {
        let (from, to) = (w.at, w.to);
        w.blocks = {
            let lo = blocks.partition_point(|e| e.ts_ns() < from);
            let hi = blocks.partition_point(|e| e.ts_ns() < to);
            let mut set: Vec<u64> = blocks[lo..hi]
                .iter()
                .filter_map(|e| match e {
                    Event::Access(a) => Some(a.unit),
                    Event::Gap { .. } => None,
                })
                .collect();
            set.sort_unstable();
            set.dedup();
            set
        };
    }
    (windows, scored_windows, gap_windows)
}

/// One window of the test range: its moment, its end, whether it is
/// scored, and the distinct 4 KiB blocks it touched.
struct Window {
    at: u64,
    to: u64,
    scored: bool,
    blocks: Vec<u64>,
}

/// Evaluates the models of `spec` on `history`.
pub fn evaluate<I, E>(history: I, spec: &EvalSpec) -> Result<EvalReport, PredictError>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if spec.horizon_ns == 0 || spec.step_ns == Some(0) {
        return Err(PredictError::Horizon);
    }
    let units_list: Vec<u64> = if spec.units.is_empty() {
        UNITS.to_vec()
    } else {
        spec.units.clone()
    };
    let blocks_units = Units::new(BLOCK, spec.target)?;
    for &u in &units_list {
        Units::new(u, spec.target)?;
    }
    let names: Vec<String> = if spec.models.is_empty() {
        MODEL_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        spec.models.clone()
    };
    let forest = spec.forest.clone().unwrap_or_else(Forest::embedded);
    // Every name is checked before any work.
    for name in &names {
        build_with(name, BLOCK, spec.horizon_ns, &forest)?;
    }
    let (records, blocks) = block_records(history, blocks_units)?;
    let t0 = blocks.first().map_or(0, Event::ts_ns);
    // A clock at its end (a crafted or damaged trace) must not overflow.
    let t1 = blocks
        .iter()
        .map(Event::ts_ns)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "f is a fraction in 0..=1 (parse_split), so the offset lies in 0..=t1 - t0"
    )]
    let at = |f: f64| t0 + ((t1 - t0) as f64 * f).round() as u64;
    let (train_from, train_to) = (at(spec.train.0), at(spec.train.1));
    let (test_from, test_to) = (at(spec.test.0), at(spec.test.1));
    let h = spec.horizon_ns;
    let step = spec.step_ns.unwrap_or(h);

    let (windows, scored_windows, gap_windows) =
        windows_of(&blocks, (test_from, test_to), (h, step), spec.max_windows);
    let count = |from: u64, to: u64| {
        blocks
            .iter()
            .filter(|e| matches!(e, Event::Access(_)) && (from..to).contains(&e.ts_ns()))
            .count() as u64
    };
    let train_events = count(train_from, test_from);
    let test_events = count(test_from, test_to);
    drop(blocks);

    let mut report = EvalReport {
        version: 2,
        units: units_list.clone(),
        horizon_ns: h,
        step_ns: step,
        span_ns: (t0, t1),
        train_ns: (train_from, train_to),
        test_ns: (test_from, test_to),
        windows: windows.len() as u64,
        scored_windows,
        gap_windows,
        train_events,
        test_events,
        history_events_per_second: test_events as f64 / ((test_to - test_from) as f64 / 1e9),
        models: Vec::new(),
        target: None,
    };
    for &unit in &units_list {
        let units = Units::new(unit, spec.target)?;
        let mut events = Vec::new();
        for r in &records {
            units.events(r, &mut events);
        }
        events.sort_by_key(Event::ts_ns);
        for name in &names {
            let mut model = build_with(name, unit, h, &forest)?;
            let row = run_model(model.as_mut(), &events, train_from, &windows, h, unit);
            report.models.push(row);
        }
    }
    report.models.sort_by(|a, b| {
        let rank = |n: &str| MODEL_NAMES.iter().position(|m| *m == n);
        rank(&a.name).cmp(&rank(&b.name)).then(a.unit.cmp(&b.unit))
    });
    report.target = report.target_of("ensemble");
    Ok(report)
}

fn report_row(
    name: &str,
    unit: u64,
    c: &Counts,
    scored: u64,
    (train_seconds, predict_seconds, state_bytes, events_per_second): (f64, f64, u64, f64),
) -> ModelReport {
    ModelReport {
        name: name.to_owned(),
        unit,
        precision: ratio(c.hits, c.predicted),
        coverage: ratio(c.hits, c.actual),
        f1: c.f1(),
        precision_blocks: ratio(c.hit_blocks, c.predicted_blocks),
        coverage_blocks: ratio(c.hit_blocks, c.actual_blocks),
        f1_blocks: c.f1_blocks(),
        precision_bytes: ratio(c.used_bytes, c.predicted_bytes),
        coverage_bytes: ratio(c.covered_bytes, c.actual_bytes),
        predicted_units: c.predicted,
        actual_units: c.actual,
        hit_units: c.hits,
        predicted_blocks: c.predicted_blocks,
        actual_blocks: c.actual_blocks,
        hit_blocks: c.hit_blocks,
        read_units: c.read_units,
        read_misses: c.read_misses,
        resent_baseline_bytes: c.resent_baseline,
        resent_avoided_bytes: c.resent_avoided,
        held_bytes: c.held,
        budget_curve: BUDGET_FACTORS
            .iter()
            .enumerate()
            .map(|(k, &factor)| BudgetPoint {
                factor,
                budget_bytes: c.curve_budget[k].checked_div(scored).unwrap_or(0),
                read_coverage: ratio(c.curve_hits[k], c.read_units),
            })
            .collect(),
        train_seconds,
        predict_seconds,
        state_bytes,
        events_per_second,
        windows: Vec::new(),
    }
}

fn run_model(
    model: &mut dyn Model,
    events: &[Event],
    train_from: u64,
    windows: &[Window],
    horizon: u64,
    unit: u64,
) -> ModelReport {
    let start = events.partition_point(|e| e.ts_ns() < train_from);
    let test_from = windows.first().map_or(u64::MAX, |w| w.at);
    let mut next = start;
    let feed_to = |model: &mut dyn Model, next: &mut usize, to: u64| {
        let upto = *next + events[*next..].partition_point(|e| e.ts_ns() < to);
        let t = Instant::now();
        for e in &events[*next..upto] {
            model.feed(e);
        }
        *next = upto;
        t.elapsed().as_secs_f64()
    };
    let train_seconds = feed_to(model, &mut next, test_from);
    let mut total = Counts::new();
    let mut scores = Vec::new();
    let mut predict_seconds = 0.0;
    let mut feed_seconds = 0.0;
    let shift = unit.trailing_zeros() - BLOCK.trailing_zeros();
    for w in windows {
        feed_seconds += feed_to(model, &mut next, w.at);
        if !w.scored {
            continue;
        }
        let t = Instant::now();
        let claims = model.predict(w.at, horizon);
        predict_seconds += t.elapsed().as_secs_f64();
        let lo = events.partition_point(|e| e.ts_ns() < w.at);
        let hi = events.partition_point(|e| e.ts_ns() < w.to);
        let before = events.partition_point(|e| e.ts_ns() < w.at.saturating_sub(horizon));
        let prev_reads: HashSet<u64> = events[before..lo]
            .iter()
            .filter_map(|e| match e {
                Event::Access(a) if !a.write => Some(a.unit),
                _ => None,
            })
            .collect();
        let mut blocks: HashMap<u64, u64> = HashMap::new();
        for b in &w.blocks {
            *blocks.entry(b >> shift).or_default() += 1;
        }
        let mut c = Counts::new();
        score(
            &claims,
            &events[lo..hi],
            &prev_reads,
            (&blocks, w.blocks.len() as u64),
            &mut c,
            unit,
        );
        total.add(&c);
        scores.push(WindowScore {
            at_ns: w.at,
            f1: c.f1(),
            f1_blocks: c.f1_blocks(),
        });
    }
    feed_seconds += feed_to(model, &mut next, u64::MAX);
    let learned = (events.len() - start) as u64;
    let learn_seconds = train_seconds + feed_seconds;
    let mut row = report_row(
        model.name(),
        unit,
        &total,
        scores.len() as u64,
        (
            train_seconds,
            predict_seconds,
            model.state_bytes() as u64,
            if learn_seconds > 0.0 {
                learned as f64 / learn_seconds
            } else {
                0.0
            },
        ),
    );
    row.windows = scores;
    row
}

/// Adds one window's comparison to the counts (a claimed unit costs `unit`
/// bytes of prefetch). `blocks` holds, per unit, the distinct 4 KiB blocks
/// the window touched in it, and their total.
fn score(
    claims: &[super::Scored],
    window: &[Event],
    prev_reads: &HashSet<u64>,
    (blocks, total_blocks): (&HashMap<u64, u64>, u64),
    c: &mut Counts,
    unit: u64,
) {
    let mut actual: WindowActual = HashMap::new();
    for e in window {
        if let Event::Access(a) = e {
            let v = actual.entry(a.unit).or_default();
            if a.write {
                v.1 += u64::from(a.bytes);
            } else {
                v.0 += u64::from(a.bytes);
            }
        }
    }
    // Working set.
    let predicted: HashSet<u64> = claims
        .iter()
        .filter(|s| s.any() >= 0.5)
        .map(|s| s.unit)
        .collect();
    c.predicted += predicted.len() as u64;
    c.actual += actual.len() as u64;
    c.predicted_bytes += predicted.len() as u64 * unit;
    c.predicted_blocks += predicted.len() as u64 * (unit / BLOCK);
    c.actual_blocks += total_blocks;
    c.hit_blocks += predicted
        .iter()
        .map(|u| blocks.get(u).copied().unwrap_or(0))
        .sum::<u64>();
    for (u, &(r, w)) in &actual {
        let bytes = r + w;
        c.actual_bytes += bytes;
        if predicted.contains(u) {
            c.hits += 1;
            c.covered_bytes += bytes;
            c.used_bytes += bytes.min(unit);
        }
    }
    // Post-cutover reads: the top read claims, at budgets.
    let mut by_read: Vec<&super::Scored> = claims.iter().filter(|s| s.read > 0.0).collect();
    by_read.sort_by(|a, b| b.read.total_cmp(&a.read).then(a.unit.cmp(&b.unit)));
    let reads: Vec<u64> = actual
        .iter()
        .filter(|(_, (r, _))| *r > 0)
        .map(|(&u, _)| u)
        .collect();
    c.read_units += reads.len() as u64;
    let base = prev_reads.len().max(1) as f64;
    for (k, factor) in BUDGET_FACTORS.iter().enumerate() {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a count times a positive factor; `as` saturates, and `take` takes what there is"
        )]
        let budget = (base * factor).ceil() as usize;
        let cache: HashSet<u64> = by_read.iter().take(budget).map(|s| s.unit).collect();
        let hits = reads.iter().filter(|u| cache.contains(u)).count() as u64;
        c.curve_hits[k] += hits;
        c.curve_budget[k] += budget as u64 * unit;
        if (*factor - 1.0).abs() < f64::EPSILON {
            c.read_misses += reads.len() as u64 - hits;
        }
    }
    // Re-sent bytes: writes in the window, and which of them were held back.
    let held: HashSet<u64> = claims
        .iter()
        .filter(|s| s.write >= 0.5)
        .map(|s| s.unit)
        .collect();
    c.held += held.len() as u64 * unit;
    for (u, &(_, w)) in &actual {
        if w > 0 {
            c.resent_baseline += unit;
            if held.contains(u) {
                c.resent_avoided += unit;
            }
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

impl EvalReport {
    /// Fewer post-cutover read misses than the model `name` at the same
    /// unit, as a share of its misses (positive: fewer).
    pub fn fewer_misses_than(&self, model: &ModelReport, name: &str) -> Option<f64> {
        let base = self
            .models
            .iter()
            .find(|m| m.name == name && m.unit == model.unit)?;
        if base.read_misses == 0 {
            return None;
        }
        Some((base.read_misses as f64 - model.read_misses as f64) / base.read_misses as f64)
    }

    /// The best naive forecast (F1 by blocks, over every unit) and the bar
    /// it sets for `model` at the finest unit evaluated (the ensemble there
    /// chooses among that unit and coarser ones itself).
    pub fn target_of(&self, model: &str) -> Option<Target> {
        let naive = self
            .models
            .iter()
            .filter(|m| super::NAIVE.contains(&m.name.as_str()))
            .filter_map(|m| m.f1_blocks.map(|f| (m, f)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let row = self
            .models
            .iter()
            .filter(|m| m.name == model)
            .min_by_key(|m| m.unit)?;
        let target = naive.1 + (1.0 - naive.1) / 10.0;
        Some(Target {
            naive: naive.0.name.clone(),
            naive_unit: naive.0.unit,
            naive_f1_blocks: naive.1,
            target_f1_blocks: target,
            model: row.name.clone(),
            unit: row.unit,
            f1_blocks: row.f1_blocks,
            met: row.f1_blocks.is_some_and(|f| f >= target - 1e-12),
        })
    }

    /// The table `tern predict eval` prints (markdown, as in `docs/prediction.md`).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let secs = |ns: u64| ns as f64 / 1e9;
        let _ = writeln!(
            s,
            "horizon {:.3} s, step {:.3} s, train {:.1}-{:.1} s, test {:.1}-{:.1} s, {} windows ({} scored, {} in gaps), {} events in the test ({:.0}/s)\n",
            secs(self.horizon_ns),
            secs(self.step_ns),
            secs(self.train_ns.0 - self.span_ns.0),
            secs(self.train_ns.1 - self.span_ns.0),
            secs(self.test_ns.0 - self.span_ns.0),
            secs(self.test_ns.1 - self.span_ns.0),
            self.windows,
            self.scored_windows,
            self.gap_windows,
            self.test_events,
            self.history_events_per_second,
        );
        let _ = writeln!(
            s,
            "| model | unit | precision | coverage | F1 | precision (4K blocks) | coverage (4K blocks) | F1 (4K blocks) | read misses | vs last-horizon | re-sent avoided | train s | predict s | state KiB | events/s |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for m in &self.models {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} of {} MiB | {:.3} | {:.3} | {} | {:.0} |",
                m.name,
                unit_name(m.unit),
                pct(m.precision),
                pct(m.coverage),
                num(m.f1),
                pct(m.precision_blocks),
                pct(m.coverage_blocks),
                num(m.f1_blocks),
                m.read_misses,
                m.read_units,
                pct(self.fewer_misses_than(m, "last-horizon")),
                pct(ratio(m.resent_avoided_bytes, m.resent_baseline_bytes)),
                m.resent_baseline_bytes >> 20,
                m.train_seconds,
                m.predict_seconds,
                m.state_bytes >> 10,
                m.events_per_second,
            );
        }
        if let Some(t) = &self.target {
            let _ = writeln!(
                s,
                "\nBest naive forecast: {} at {}, F1 {:.3} by 4 KiB blocks; the bar (plus a tenth of what it leaves): {:.3}. {} at {}: {} -- {}.",
                t.naive,
                unit_name(t.naive_unit),
                t.naive_f1_blocks,
                t.target_f1_blocks,
                t.model,
                unit_name(t.unit),
                num(t.f1_blocks),
                if t.met { "met" } else { "NOT met" }
            );
        }
        let _ = writeln!(
            s,
            "\nRead coverage over prefetch budget (multiples of the previous window's read set):\n"
        );
        let _ = write!(s, "| model | unit |");
        for f in BUDGET_FACTORS {
            let _ = write!(s, " {f}x |");
        }
        let _ = writeln!(s, "\n|---|---|{}", "---|".repeat(BUDGET_FACTORS.len()));
        for m in &self.models {
            let _ = write!(s, "| {} | {} |", m.name, unit_name(m.unit));
            for p in &m.budget_curve {
                let _ = write!(
                    s,
                    " {} ({} MiB) |",
                    pct(p.read_coverage),
                    p.budget_bytes >> 20
                );
            }
            let _ = writeln!(s);
        }
        s
    }
}

fn unit_name(u: u64) -> String {
    if u >= 1 << 20 && u.is_multiple_of(1 << 20) {
        format!("{}M", u >> 20)
    } else {
        format!("{}K", u >> 10)
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Op;
    use crate::trace::record::BlockRecord;

    const U: u64 = 64 << 10;
    const S: u64 = 1_000_000_000;

    fn rec(ts_ns: u64, unit: u64, len: u32, op: Op) -> Record {
        Record::Block(BlockRecord {
            ts_ns,
            offset: unit * U,
            latency_ns: 0,
            len,
            pid: 1,
            flags: 0,
            target: 0,
            op,
        })
    }

    #[test]
    fn a_trace_at_the_clocks_end_is_evaluated_without_overflow() {
        let history: Vec<Result<Record, std::io::Error>> = (0..40u64)
            .map(|k| Ok(rec(u64::MAX - (40 - k) * S / 10, k % 3, 4096, Op::Write)))
            .chain(std::iter::once(Ok(rec(u64::MAX, 1, 4096, Op::Write))))
            .collect();
        let spec = EvalSpec {
            horizon_ns: S / 2,
            models: vec!["last-horizon".into()],
            ..EvalSpec::default()
        };
        let report = evaluate(history, &spec).expect("evaluated");
        assert_eq!(report.span_ns.1, u64::MAX);
        assert!(report.scored_windows > 0, "{report:?}");
    }

    #[test]
    fn splits_parse_and_bad_ones_say_what_to_give() {
        assert_eq!(parse_split("0-50%").expect("ok"), (0.0, 0.5));
        assert_eq!(parse_split("50-100").expect("ok"), (0.5, 1.0));
        assert!(parse_split("50-40%").is_err());
        assert!(parse_split("0-150%").is_err());
        assert!(parse_split("half").is_err());
    }

    /// Hand-computed: at t = 1 s with a 1 s horizon the hot set claims
    /// unit 1 (read 1 s ago: p = exp(-1/(1+ln 2)) = 0.55), unit 2 (read
    /// 0.1 s ago) and unit 3 (written 0.05 s ago). The window then reads
    /// 2 (4 KiB) and 4 (16 KiB) and writes 3 (4 KiB).
    #[test]
    fn metrics_match_hand_computed_values_on_a_tiny_trace() {
        let history: Vec<Result<Record, std::io::Error>> = [
            rec(0, 1, 4096, Op::Read),
            rec(900_000_000, 2, 4096, Op::Read),
            rec(950_000_000, 3, 8192, Op::Write),
            rec(1_500_000_000, 2, 4096, Op::Read),
            rec(1_600_000_000, 3, 4096, Op::Write),
            rec(2 * S - 1, 4, 16384, Op::Read),
        ]
        .into_iter()
        .map(Ok)
        .collect();
        let spec = EvalSpec {
            units: vec![U],
            horizon_ns: S,
            models: vec!["lru".into()],
            ..EvalSpec::default()
        };
        let r = evaluate(history, &spec).expect("eval");
        assert_eq!(r.test_ns, (S, 2 * S));
        assert_eq!((r.windows, r.scored_windows), (1, 1));
        let m = &r.models[0];
        assert_eq!((m.predicted_units, m.actual_units, m.hit_units), (3, 3, 2));
        assert_eq!(m.precision, Some(2.0 / 3.0));
        assert_eq!(m.coverage, Some(2.0 / 3.0));
        // Bytes used of the three prefetched units: 4 KiB of 2 and 4 KiB of 3.
        assert_eq!(m.precision_bytes, Some(8192.0 / (3.0 * U as f64)));
        // Bytes accessed inside claimed units: 8 KiB of 24 KiB.
        assert_eq!(m.coverage_bytes, Some(8192.0 / 24576.0));
        // 4 KiB blocks: 3 units claim 48; the window touched 1 + 1 + 4, of
        // which the blocks in units 2 and 3 were claimed.
        assert_eq!(
            (m.predicted_blocks, m.actual_blocks, m.hit_blocks),
            (48, 6, 2)
        );
        assert_eq!(m.f1, Some(2.0 / 3.0));
        assert_eq!(m.f1_blocks, Some(4.0 / 54.0));
        assert_eq!(m.windows.len(), 1);
        // Previous window read 1 and 2: a budget of two units holds 2 and 1; 4 misses.
        assert_eq!((m.read_units, m.read_misses), (2, 1));
        let one = &m.budget_curve[1];
        assert!((one.factor - 1.0).abs() < 1e-9);
        assert_eq!(one.read_coverage, Some(0.5));
        assert_eq!(one.budget_bytes, 2 * U);
        // Unit 3 was written in the window and held back.
        assert_eq!(
            (
                m.resent_baseline_bytes,
                m.resent_avoided_bytes,
                m.held_bytes
            ),
            (U, U, U)
        );
    }

    #[test]
    fn windows_overlapping_a_gap_are_skipped() {
        let mut history: Vec<Result<Record, std::io::Error>> = (0..40)
            .map(|i| Ok(rec(i * S / 10, i, 4096, Op::Read)))
            .collect();
        history.push(Ok(Record::Gap(crate::trace::Gap {
            start_ns: 3 * S,
            end_ns: 3 * S + 1,
            lost_block: 5,
            lost_fault: 0,
        })));
        let spec = EvalSpec {
            horizon_ns: S / 2,
            models: vec!["stride".into()],
            ..EvalSpec::default()
        };
        let r = evaluate(history, &spec).expect("eval");
        // The test part is 1.95-3.9 s: three whole 0.5 s horizons (the last
        // 0.45 s is not one), the third overlapping the gap at 3 s.
        assert_eq!(r.windows, 3);
        assert_eq!((r.scored_windows, r.gap_windows), (2, 1));
    }
}
