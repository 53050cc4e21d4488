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
use std::time::Instant;

use serde::Serialize;

use super::{Event, MODEL_NAMES, Model, PredictError, Units, build};
use crate::trace::Record;

/// Budget multiples of the previous window's read set in the curve.
pub const BUDGET_FACTORS: [f64; 5] = [0.5, 1.0, 2.0, 4.0, 8.0];

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    pub unit: u64,
    pub target: u16,
    pub horizon_ns: u64,
    /// Fractions of the history's time span, e.g. (0.0, 0.5).
    pub train: (f64, f64),
    pub test: (f64, f64),
    /// Model names; empty: all of [`MODEL_NAMES`].
    pub models: Vec<String>,
    /// At most this many windows are scored (evenly spread); all are fed.
    pub max_windows: usize,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            unit: super::DEFAULT_UNIT,
            target: 0,
            horizon_ns: 10_000_000_000,
            train: (0.0, 0.5),
            test: (0.5, 1.0),
            models: Vec::new(),
            max_windows: 200,
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

/// One model's row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelReport {
    pub name: String,
    pub precision: Option<f64>,
    pub coverage: Option<f64>,
    pub precision_bytes: Option<f64>,
    pub coverage_bytes: Option<f64>,
    pub predicted_units: u64,
    pub actual_units: u64,
    pub hit_units: u64,
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
}

/// The whole evaluation (`tern predict eval --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub version: u32,
    pub unit: u64,
    pub horizon_ns: u64,
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
}

#[derive(Default)]
struct Counts {
    predicted: u64,
    actual: u64,
    hits: u64,
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

/// What one window did per unit: bytes read, bytes written.
type WindowActual = HashMap<u64, (u64, u64)>;

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Evaluates the models of `spec` on `history`.
pub fn evaluate<I, E>(history: I, spec: &EvalSpec) -> Result<EvalReport, PredictError>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if spec.horizon_ns == 0 {
        return Err(PredictError::Horizon);
    }
    let units = Units::new(spec.unit, spec.target)?;
    let mut events = Vec::new();
    for record in history {
        let record = record.map_err(|e| PredictError::History(Box::new(e)))?;
        units.events(&record, &mut events);
    }
    // Trace records are in issue order per CPU chunk; make time order exact.
    events.sort_by_key(Event::ts_ns);
    if !events.iter().any(|e| matches!(e, Event::Access(_))) {
        return Err(PredictError::NoAccesses {
            target: spec.target,
        });
    }
    let t0 = events.first().map_or(0, Event::ts_ns);
    let t1 = events.last().map_or(0, Event::ts_ns) + 1;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "f is a fraction in 0..=1 (parse_split), so the offset lies in 0..=t1 - t0"
    )]
    let at = |f: f64| t0 + ((t1 - t0) as f64 * f).round() as u64;
    let (train_from, train_to) = (at(spec.train.0), at(spec.train.1));
    let (test_from, test_to) = (at(spec.test.0), at(spec.test.1));
    let h = spec.horizon_ns;
    let windows = (test_to - test_from).div_ceil(h).max(1);
    let every = windows.div_ceil(spec.max_windows.max(1) as u64).max(1);

    let gaps: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Gap { start_ns, end_ns } => Some((*start_ns, (*end_ns).max(start_ns + 1))),
            Event::Access(_) => None,
        })
        .collect();
    let in_gap = |from: u64, to: u64| gaps.iter().any(|&(s, e)| s < to && from < e);

    let names: Vec<String> = if spec.models.is_empty() {
        MODEL_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        spec.models.clone()
    };
    let train_events = events
        .iter()
        .filter(|e| (train_from..test_from).contains(&e.ts_ns()))
        .count() as u64;
    let test_events = events
        .iter()
        .filter(|e| (test_from..test_to).contains(&e.ts_ns()))
        .count() as u64;

    let mut report = EvalReport {
        version: 1,
        unit: spec.unit,
        horizon_ns: h,
        span_ns: (t0, t1),
        train_ns: (train_from, train_to),
        test_ns: (test_from, test_to),
        windows,
        scored_windows: 0,
        gap_windows: 0,
        train_events,
        test_events,
        history_events_per_second: test_events as f64 / ((test_to - test_from) as f64 / 1e9),
        models: Vec::new(),
    };
    for name in &names {
        let mut model = build(name, spec.unit, h)?;
        let (row, scored, skipped) = run_model(
            model.as_mut(),
            &events,
            (train_from, test_from, test_to),
            h,
            spec.unit,
            every,
            &in_gap,
        );
        report.scored_windows = scored;
        report.gap_windows = skipped;
        report.models.push(row);
    }
    Ok(report)
}

fn run_model(
    model: &mut dyn Model,
    events: &[Event],
    (train_from, test_from, test_to): (u64, u64, u64),
    horizon: u64,
    unit: u64,
    every: u64,
    in_gap: &dyn Fn(u64, u64) -> bool,
) -> (ModelReport, u64, u64) {
    let start = events.partition_point(|e| e.ts_ns() < train_from);
    let test_start = events.partition_point(|e| e.ts_ns() < test_from);
    let started = Instant::now();
    for e in &events[start..test_start] {
        model.feed(e);
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let train_count = (test_start - start) as u64;

    let mut counts = Counts {
        curve_hits: vec![0; BUDGET_FACTORS.len()],
        curve_budget: vec![0; BUDGET_FACTORS.len()],
        ..Counts::default()
    };
    // Units read in the window before the current one (the cutover budget).
    let mut prev_reads: HashSet<u64> = events[..test_start]
        .iter()
        .filter_map(|e| match e {
            Event::Access(a) if !a.write && a.ts_ns + horizon >= test_from => Some(a.unit),
            _ => None,
        })
        .collect();
    let mut predict_seconds = 0.0;
    let mut feed_seconds = 0.0;
    let (mut scored, mut skipped) = (0, 0);
    let mut next = test_start;
    let mut index = 0u64;
    let mut from = test_from;
    while from < test_to {
        let to = (from + horizon).min(test_to);
        let end = next + events[next..].partition_point(|e| e.ts_ns() < to);
        let window = &events[next..end];
        if index.is_multiple_of(every) {
            if in_gap(from, to) {
                skipped += 1;
            } else {
                let t = Instant::now();
                let claims = model.predict(from, horizon);
                predict_seconds += t.elapsed().as_secs_f64();
                score(&claims, window, &prev_reads, &mut counts, unit);
                scored += 1;
            }
        }
        let t = Instant::now();
        for e in window {
            model.feed(e);
        }
        feed_seconds += t.elapsed().as_secs_f64();
        prev_reads = window
            .iter()
            .filter_map(|e| match e {
                Event::Access(a) if !a.write => Some(a.unit),
                _ => None,
            })
            .collect();
        next = end;
        from = to;
        index += 1;
    }
    let learned = train_count + (next - test_start) as u64;
    let learn_seconds = train_seconds + feed_seconds;
    let row = ModelReport {
        name: model.name().to_owned(),
        precision: ratio(counts.hits, counts.predicted),
        coverage: ratio(counts.hits, counts.actual),
        precision_bytes: ratio(counts.used_bytes, counts.predicted_bytes),
        coverage_bytes: ratio(counts.covered_bytes, counts.actual_bytes),
        predicted_units: counts.predicted,
        actual_units: counts.actual,
        hit_units: counts.hits,
        read_units: counts.read_units,
        read_misses: counts.read_misses,
        resent_baseline_bytes: counts.resent_baseline,
        resent_avoided_bytes: counts.resent_avoided,
        held_bytes: counts.held,
        budget_curve: BUDGET_FACTORS
            .iter()
            .enumerate()
            .map(|(k, &factor)| BudgetPoint {
                factor,
                budget_bytes: counts.curve_budget[k].checked_div(scored).unwrap_or(0),
                read_coverage: ratio(counts.curve_hits[k], counts.read_units),
            })
            .collect(),
        train_seconds,
        predict_seconds,
        state_bytes: model.state_bytes() as u64,
        events_per_second: if learn_seconds > 0.0 {
            learned as f64 / learn_seconds
        } else {
            0.0
        },
    };
    (row, scored, skipped)
}

/// Adds one window's comparison to the counts (a claimed unit costs `unit`
/// bytes of prefetch).
fn score(
    claims: &[super::Scored],
    window: &[Event],
    prev_reads: &HashSet<u64>,
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
    /// Fewer post-cutover read misses than the baseline `name`, as a share
    /// of the baseline's misses (positive: fewer).
    pub fn fewer_misses_than(&self, model: &ModelReport, name: &str) -> Option<f64> {
        let base = self.models.iter().find(|m| m.name == name)?;
        ratio(
            base.read_misses.saturating_sub(model.read_misses),
            base.read_misses,
        )
        .map(|f| {
            if model.read_misses > base.read_misses {
                -((model.read_misses - base.read_misses) as f64 / base.read_misses as f64)
            } else {
                f
            }
        })
    }

    /// The table `tern predict eval` prints (markdown, as in `docs/prediction.md`).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let secs = |ns: u64| ns as f64 / 1e9;
        let _ = writeln!(
            s,
            "unit {} KiB, horizon {:.3} s, train {:.1}-{:.1} s, test {:.1}-{:.1} s, {} windows ({} scored, {} in gaps), {} events in the test ({:.0}/s)\n",
            self.unit >> 10,
            secs(self.horizon_ns),
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
            "| model | precision | coverage | precision (bytes) | coverage (bytes) | read misses | vs readahead | vs lru | re-sent avoided | train s | predict s | state KiB | events/s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for m in &self.models {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {}/{} | {} | {} | {} of {} MiB | {:.3} | {:.3} | {} | {:.0} |",
                m.name,
                pct(m.precision),
                pct(m.coverage),
                pct(m.precision_bytes),
                pct(m.coverage_bytes),
                m.read_misses,
                m.read_units,
                pct(self.fewer_misses_than(m, "readahead")),
                pct(self.fewer_misses_than(m, "lru")),
                pct(ratio(m.resent_avoided_bytes, m.resent_baseline_bytes)),
                m.resent_baseline_bytes >> 20,
                m.train_seconds,
                m.predict_seconds,
                m.state_bytes >> 10,
                m.events_per_second,
            );
        }
        let _ = writeln!(
            s,
            "\nRead coverage over prefetch budget (multiples of the previous window's read set):\n"
        );
        let _ = write!(s, "| model |");
        for f in BUDGET_FACTORS {
            let _ = write!(s, " {f}x |");
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(BUDGET_FACTORS.len()));
        for m in &self.models {
            let _ = write!(s, "| {} |", m.name);
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
        assert_eq!(r.windows, 4);
        assert_eq!((r.scored_windows, r.gap_windows), (3, 1));
    }
}
