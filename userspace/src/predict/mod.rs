//! The predictor: from the I/O history (a stream of trace [`Record`]s),
//! forecast which extents will be read and written within a horizon.
//!
//! Every model sees the same stream of [`Access`]es (block requests cut into
//! fixed units, 64 KiB by default: the checksum-tree region the migration
//! sends and verifies in) and answers the same question through [`Model`]:
//! for each unit, the probability of a read and of a write in `[now, now +
//! horizon)`. The [`ensemble`] picks per region the model that has predicted
//! it best so far; [`eval`] measures them all on a held-out part of a trace.
//! Gaps in the history (events the tracer lost) break every model's notion of
//! "what came just before", and windows overlapping one are not scored.

pub mod boosted;
pub mod chooser;
pub mod correlation;
pub mod ensemble;
pub mod eval;
pub mod hotset;
pub mod intensity;
pub mod learned;
pub mod naive;
pub mod periodic;
pub mod readahead;
mod schedule;
pub mod stride;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::trace::{Op, Record};

/// Errors of the predictor.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The history holds no block I/O on the chosen target.
    #[error(
        "the history holds no block reads or writes on target {target}; is it the right trace (see `tern trace stat`)?"
    )]
    NoAccesses { target: u16 },
    /// The unit is unusable.
    #[error("prediction unit {0} bytes is not valid: give a power of two from 4 KiB to 1 GiB")]
    Unit(u64),
    /// The horizon is zero.
    #[error("the horizon must be longer than zero")]
    Horizon,
    /// A train/test split is not inside 0-100 % or is empty.
    #[error("split {0:?} is not valid: give FROM-TO% with 0 <= FROM < TO <= 100, e.g. 0-50%")]
    Split(String),
    /// A model's unknown name.
    #[error("unknown model {0:?}; choose from {1}")]
    UnknownModel(String, String),
    /// Reading the history failed.
    #[error("reading the history: {0}")]
    History(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A plan file cannot be read or parsed.
    #[error("cannot read the plan {path}: {source}")]
    Plan {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Default unit: the migration's 64 KiB checksum region.
pub const DEFAULT_UNIT: u64 = 64 << 10;

/// Units per ensemble / intensity region (1 MiB at the default unit).
pub const REGION_UNITS: u64 = 16;

/// One unit touched by one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub ts_ns: u64,
    pub unit: u64,
    /// Bytes of the request inside this unit.
    pub bytes: u32,
    pub write: bool,
    /// Who issued it (pid; 0 when unknown): models follow trends per stream.
    pub stream: u32,
}

/// What a model sees, in time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Access(Access),
    /// Events were lost in `[start_ns, end_ns)`.
    Gap {
        start_ns: u64,
        end_ns: u64,
    },
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Access(a) => a.ts_ns,
            Event::Gap { start_ns, .. } => *start_ns,
        }
    }
}

/// Cuts trace records into [`Event`]s at one unit size, for one target.
#[derive(Debug, Clone, Copy)]
pub struct Units {
    pub unit: u64,
    shift: u32,
    pub target: u16,
}

impl Units {
    pub fn new(unit: u64, target: u16) -> Result<Units, PredictError> {
        if !unit.is_power_of_two() || !(4096..=1 << 30).contains(&unit) {
            return Err(PredictError::Unit(unit));
        }
        Ok(Units {
            unit,
            shift: unit.trailing_zeros(),
            target,
        })
    }

    /// The events of one record (a request spanning units gives one per unit).
    pub fn events(&self, record: &Record, out: &mut Vec<Event>) {
        match record {
            Record::Block(b) if b.target == self.target && b.len > 0 => {
                let write = match b.op {
                    Op::Read => false,
                    op if op.modifies() => true,
                    _ => return,
                };
                let end = b.offset + u64::from(b.len);
                let mut at = b.offset;
                while at < end {
                    let unit = at >> self.shift;
                    let unit_end = ((unit + 1) << self.shift).min(end);
                    out.push(Event::Access(Access {
                        ts_ns: b.ts_ns,
                        unit,
                        bytes: u32::try_from(unit_end - at).unwrap_or(u32::MAX),
                        write,
                        stream: b.pid,
                    }));
                    at = unit_end;
                }
            }
            Record::Gap(g) => out.push(Event::Gap {
                start_ns: g.start_ns,
                end_ns: g.end_ns.max(g.start_ns),
            }),
            _ => {}
        }
    }

    pub fn range(&self, unit: u64) -> Range<u64> {
        unit << self.shift..(unit + 1) << self.shift
    }
}

/// A model's claim about one unit within the horizon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub unit: u64,
    /// Probability of at least one read.
    pub read: f64,
    /// Probability of at least one write.
    pub write: f64,
}

impl Scored {
    pub fn any(&self) -> f64 {
        self.read.max(self.write)
    }
}

/// A predictor of future I/O.
pub trait Model: Send {
    /// The name in tables and plans.
    fn name(&self) -> &'static str;
    /// Learns from one access (called in time order).
    fn observe(&mut self, access: &Access);
    /// Events were lost in `[start_ns, end_ns)`: whatever came before is not
    /// known to lead to what comes after.
    fn gap(&mut self, start_ns: u64, end_ns: u64);
    /// Units that may be accessed in `[now_ns, now_ns + horizon_ns)`, with
    /// probabilities (units not listed: no claim, probability 0).
    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored>;
    /// Approximate bytes of state held (what training costs in memory).
    fn state_bytes(&self) -> usize;

    /// Feeds one event.
    fn feed(&mut self, event: &Event) {
        match event {
            Event::Access(a) => self.observe(a),
            Event::Gap { start_ns, end_ns } => self.gap(*start_ns, *end_ns),
        }
    }
}

/// Names of the models [`build`] knows, in table order.
pub const MODEL_NAMES: [&str; 12] = [
    "last-horizon",
    "ever-touched",
    "lru",
    "readahead",
    "stride",
    "correlation",
    "periodic",
    "ets",
    "learned",
    "boosted",
    "regional",
    "ensemble",
];

/// The two naive forecasts: every model is measured against them.
pub const NAIVE: [&str; 2] = ["last-horizon", "ever-touched"];

/// What the ensemble chooses among (the baselines included: where the hot
/// set predicts best, it is used), for predictions `horizon_ns` ahead.
pub fn component_models(unit: u64, horizon_ns: u64) -> Vec<Box<dyn Model>> {
    vec![
        Box::new(naive::Naive::last_horizon()),
        Box::new(naive::Naive::ever_touched()),
        Box::new(hotset::HotSet::default()),
        Box::new(readahead::Readahead::new(unit)),
        Box::new(stride::Stride::default()),
        Box::new(correlation::Correlation::default()),
        Box::new(periodic::Periodic::default()),
        Box::new(intensity::Intensity::for_horizon(horizon_ns)),
        Box::new(learned::Learned::for_horizon(horizon_ns)),
    ]
}

/// One model by name (see [`MODEL_NAMES`]), `boosted` with the model
/// shipped in the binary.
pub fn build(name: &str, unit: u64, horizon_ns: u64) -> Result<Box<dyn Model>, PredictError> {
    build_with(name, unit, horizon_ns, &boosted::Forest::embedded())
}

/// One model by name, `boosted` with the trees given. The boosted trees
/// are not a member of the ensemble: measured as one, they made it worse
/// on three traces, better on one, the same on two (docs/prediction.md).
pub fn build_with(
    name: &str,
    unit: u64,
    horizon_ns: u64,
    forest: &Arc<boosted::Forest>,
) -> Result<Box<dyn Model>, PredictError> {
    match name {
        "boosted" => Ok(Box::new(learned::Learned::boosted(
            horizon_ns,
            Arc::clone(forest),
        ))),
        "ensemble" => Ok(Box::new(chooser::Chooser::new(unit, horizon_ns, |u| {
            component_models(u, horizon_ns)
        }))),
        "regional" => Ok(Box::new(ensemble::Ensemble::new(
            component_models(unit, horizon_ns),
            horizon_ns,
        ))),
        _ => component_models(unit, horizon_ns)
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| PredictError::UnknownModel(name.to_owned(), MODEL_NAMES.join(", "))),
    }
}

/// One ranked extent of a [`Prediction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedExtent {
    pub offset: u64,
    pub len: u64,
    /// Probability of at least one read of the extent within the horizon.
    pub p_read: f64,
    /// Probability of at least one write within the horizon.
    pub p_write: f64,
    /// Expected bytes read and written within the horizon.
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// `tern predict`'s answer: a ranked list of extents (highest probability of
/// any access first). Serialized as the plan file `tern migrate --prefetch` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub version: u32,
    /// Unit the extents are made of (bytes).
    pub unit: u64,
    pub target: u16,
    pub model: String,
    /// The prediction covers `[at_ns, at_ns + horizon_ns)` in the history's clock.
    pub at_ns: u64,
    pub horizon_ns: u64,
    pub extents: Vec<PredictedExtent>,
}

/// Options of [`predict_future_io`].
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub unit: u64,
    pub target: u16,
    /// A model name from [`MODEL_NAMES`]; the ensemble by default.
    pub model: String,
    /// Claims below this probability are left out of the plan.
    pub min_probability: f64,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions {
            unit: DEFAULT_UNIT,
            target: 0,
            model: "ensemble".into(),
            min_probability: 0.05,
        }
    }
}

/// Per-unit mean bytes read and written per access, for volume estimates.
#[derive(Default)]
struct Volumes {
    per_unit: HashMap<u64, (u64, u32, u64, u32)>,
}

impl Volumes {
    fn add(&mut self, a: &Access) {
        let e = self.per_unit.entry(a.unit).or_default();
        if a.write {
            e.2 += u64::from(a.bytes);
            e.3 += 1;
        } else {
            e.0 += u64::from(a.bytes);
            e.1 += 1;
        }
    }

    fn mean(&self, unit: u64, write: bool, default: u64) -> u64 {
        match self.per_unit.get(&unit) {
            Some(&(rb, rn, _, _)) if !write && rn > 0 => rb / u64::from(rn),
            Some(&(_, _, wb, wn)) if write && wn > 0 => wb / u64::from(wn),
            _ => default,
        }
    }
}

/// Forecasts the I/O of the `horizon_ns` after the end of `history`: trains
/// the chosen model on every record (in order), then ranks its claims.
pub fn predict_future_io<I, E>(
    history: I,
    horizon_ns: u64,
    opts: &PredictOptions,
) -> Result<Prediction, PredictError>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if horizon_ns == 0 {
        return Err(PredictError::Horizon);
    }
    let units = Units::new(opts.unit, opts.target)?;
    let mut model = build(&opts.model, opts.unit, horizon_ns)?;
    let mut volumes = Volumes::default();
    let mut events = Vec::new();
    let mut last_ts = 0;
    let mut accesses = 0u64;
    for record in history {
        let record = record.map_err(|e| PredictError::History(Box::new(e)))?;
        events.clear();
        units.events(&record, &mut events);
        for ev in &events {
            if let Event::Access(a) = ev {
                volumes.add(a);
                accesses += 1;
            }
            last_ts = last_ts.max(ev.ts_ns());
            model.feed(ev);
        }
    }
    if accesses == 0 {
        return Err(PredictError::NoAccesses {
            target: opts.target,
        });
    }
    let now = last_ts + 1;
    let mut scored: Vec<Scored> = model
        .predict(now, horizon_ns)
        .into_iter()
        .filter(|s| s.any() >= opts.min_probability)
        .collect();
    scored.sort_by_key(|s| s.unit);
    let extents = merge_extents(&scored, &units, &volumes);
    Ok(Prediction {
        version: 1,
        unit: opts.unit,
        target: opts.target,
        model: model.name().to_owned(),
        at_ns: now,
        horizon_ns,
        extents,
    })
}

/// Joins adjacent units with the same (rounded) claims into extents, ranked.
fn merge_extents(sorted: &[Scored], units: &Units, volumes: &Volumes) -> Vec<PredictedExtent> {
    let round = |p: f64| (p * 100.0).round() / 100.0;
    let mut out: Vec<PredictedExtent> = Vec::new();
    for s in sorted {
        let r = units.range(s.unit);
        let (pr, pw) = (round(s.read), round(s.write));
        let expected = |p: f64, write: bool| -> u64 {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a probability times a mean volume: non-negative, `as` saturates"
            )]
            let bytes = (p * volumes.mean(s.unit, write, units.unit) as f64) as u64;
            bytes
        };
        let (rb, wb) = (expected(s.read, false), expected(s.write, true));
        match out.last_mut() {
            Some(e)
                if e.offset + e.len == r.start
                    && (e.p_read - pr).abs() < 1e-9
                    && (e.p_write - pw).abs() < 1e-9 =>
            {
                e.len += units.unit;
                e.read_bytes += rb;
                e.write_bytes += wb;
            }
            _ => out.push(PredictedExtent {
                offset: r.start,
                len: units.unit,
                p_read: pr,
                p_write: pw,
                read_bytes: rb,
                write_bytes: wb,
            }),
        }
    }
    out.sort_by(|a, b| {
        b.p_read
            .max(b.p_write)
            .total_cmp(&a.p_read.max(a.p_write))
            .then(a.offset.cmp(&b.offset))
    });
    out
}

impl Prediction {
    /// Reads a plan written by `tern predict --out`.
    pub fn load(path: &std::path::Path) -> Result<Prediction, PredictError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| PredictError::Plan {
            path: path.display().to_string(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.into()))?;
        serde_json::from_str(&text).map_err(|e| err(e.into()))
    }

    /// The migration's use of the plan: extents predicted to be read (and
    /// not rewritten) first, by rank; extents predicted to be rewritten
    /// within the horizon held back (their copy would be stale soon).
    pub fn send_order(&self, threshold: f64) -> crate::replicate::SendOrder {
        let mut order = crate::replicate::SendOrder::default();
        for e in &self.extents {
            let run = e.offset..e.offset + e.len;
            if e.p_write >= threshold {
                order.hold.push(run);
            } else if e.p_read >= threshold {
                order.first.push(run);
            }
        }
        order
    }

    /// A post-copy's push order: every extent of the plan predicted to be
    /// read, most likely first (a read of a unit still on the source waits
    /// for it), then those predicted only to be written (a write into part
    /// of a unit waits too). Unlike [`Prediction::send_order`] there is no
    /// threshold: the push sends everything anyway, so even a weak claim
    /// ranks an extent before the rest, which goes in disk order. Nothing is
    /// held back: after the switch the source no longer changes.
    pub fn postcopy_order(&self) -> crate::replicate::SendOrder {
        let mut ranked: Vec<&PredictedExtent> = self
            .extents
            .iter()
            .filter(|e| e.p_read > 0.0 || e.p_write > 0.0)
            .collect();
        ranked.sort_by(|a, b| {
            (b.p_read > 0.0)
                .cmp(&(a.p_read > 0.0))
                .then(b.p_read.total_cmp(&a.p_read))
                .then(b.p_write.total_cmp(&a.p_write))
                .then(a.offset.cmp(&b.offset))
        });
        crate::replicate::SendOrder {
            first: ranked.iter().map(|e| e.offset..e.offset + e.len).collect(),
            hold: Vec::new(),
        }
    }

    /// Extents predicted to be read, most likely first, up to `budget` bytes:
    /// what the destination reads into its cache after cutover.
    pub fn read_hot(&self, threshold: f64, budget: u64) -> Vec<Range<u64>> {
        let mut ranked: Vec<&PredictedExtent> = self
            .extents
            .iter()
            .filter(|e| e.p_read >= threshold)
            .collect();
        ranked.sort_by(|a, b| b.p_read.total_cmp(&a.p_read).then(a.offset.cmp(&b.offset)));
        let mut out = Vec::new();
        let mut left = budget;
        for e in ranked {
            if left == 0 {
                break;
            }
            let len = e.len.min(left);
            out.push(e.offset..e.offset + len);
            left -= len;
        }
        out
    }
}

/// Keeps the `n` highest-scoring entries of a map of claims (by `any`).
pub(crate) fn top_n(mut scored: Vec<Scored>, n: usize) -> Vec<Scored> {
    if scored.len() > n {
        scored.select_nth_unstable_by(n, |a, b| b.any().total_cmp(&a.any()));
        scored.truncate(n);
    }
    scored
}

/// Largest number of claims a model returns (a plan is bounded however large the disk).
pub const MAX_CLAIMS: usize = 1 << 18;

#[cfg(test)]
pub(crate) mod testkit {
    //! Constructed histories with known answers.
    use super::{Access, Event};

    pub const MS: u64 = 1_000_000;
    pub const SEC: u64 = 1_000_000_000;

    pub fn read(ts_ns: u64, unit: u64) -> Event {
        Event::Access(Access {
            ts_ns,
            unit,
            bytes: 4096,
            write: false,
            stream: 1,
        })
    }

    pub fn write(ts_ns: u64, unit: u64) -> Event {
        Event::Access(Access {
            ts_ns,
            unit,
            bytes: 4096,
            write: true,
            stream: 1,
        })
    }

    /// The model's claimed units at probability >= 0.5 (any op), sorted.
    pub fn claimed(scored: &[super::Scored]) -> Vec<u64> {
        let mut v: Vec<u64> = scored
            .iter()
            .filter(|s| s.any() >= 0.5)
            .map(|s| s.unit)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::record::{BlockRecord, Gap};

    fn block(ts_ns: u64, offset: u64, len: u32, op: Op) -> Record {
        Record::Block(BlockRecord {
            ts_ns,
            offset,
            latency_ns: 0,
            len,
            pid: 7,
            flags: 0,
            target: 0,
            op,
        })
    }

    #[test]
    fn a_request_spanning_units_gives_one_access_per_unit_with_its_bytes() {
        let units = Units::new(64 << 10, 0).expect("unit");
        let mut out = Vec::new();
        units.events(&block(5, (64 << 10) - 4096, 8192, Op::Write), &mut out);
        units.events(&block(6, 0, 4096, Op::Flush), &mut out);
        assert_eq!(out.len(), 2);
        let Event::Access(a) = out[0] else {
            panic!("an access")
        };
        assert_eq!((a.unit, a.bytes, a.write), (0, 4096, true));
        let Event::Access(b) = out[1] else {
            panic!("an access")
        };
        assert_eq!((b.unit, b.bytes), (1, 4096));
    }

    #[test]
    fn a_sequential_history_predicts_the_next_extents_ranked_first() {
        let unit = 64 << 10;
        let records: Vec<Result<Record, std::io::Error>> = (0..200u64)
            .map(|i| Ok(block(i * 1_000_000, i * unit, unit as u32, Op::Read)))
            .chain(std::iter::once(Ok(Record::Gap(Gap {
                start_ns: 200_000_000,
                end_ns: 200_000_001,
                lost_block: 1,
                lost_fault: 0,
            }))))
            .chain((200..260u64).map(|i| Ok(block(i * 1_000_000, i * unit, unit as u32, Op::Read))))
            .collect();
        let opts = PredictOptions {
            model: "stride".into(),
            ..PredictOptions::default()
        };
        let p = predict_future_io(records, 20_000_000, &opts).expect("predict");
        assert_eq!(p.model, "stride");
        let top = &p.extents[0];
        assert_eq!(top.offset, 260 * unit, "the next unit after the scan");
        assert!(top.p_read > 0.5 && top.p_write == 0.0);
        let order = p.send_order(0.5);
        assert!(order.hold.is_empty());
        assert_eq!(order.first[0].start, 260 * unit);
        let hot = p.read_hot(0.5, 2 * unit);
        assert_eq!(hot.iter().map(|r| r.end - r.start).sum::<u64>(), 2 * unit);
    }

    #[test]
    fn a_post_copy_pushes_the_likely_reads_first_then_the_writes_and_holds_nothing() {
        let extent = |offset, p_read, p_write| PredictedExtent {
            offset,
            len: 4096,
            p_read,
            p_write,
            read_bytes: 0,
            write_bytes: 0,
        };
        let p = Prediction {
            version: 1,
            unit: 4096,
            target: 0,
            model: "test".into(),
            at_ns: 0,
            horizon_ns: 1,
            extents: vec![
                extent(0, 0.1, 0.9),
                extent(4096, 0.6, 0.9),
                extent(8192, 0.95, 0.0),
                extent(12288, 0.2, 0.1),
                extent(16384, 0.0, 0.3),
                extent(20480, 0.0, 0.0),
            ],
        };
        let order = p.postcopy_order();
        assert!(order.hold.is_empty());
        let starts: Vec<u64> = order.first.iter().map(|r| r.start).collect();
        assert_eq!(starts, vec![8192, 4096, 12288, 0, 16384]);
        // Pre-copy holds back the extent it expects rewritten instead.
        assert_eq!(p.send_order(0.5).hold.len(), 2);
    }

    #[test]
    fn a_history_without_io_is_an_error_that_says_so() {
        let records: Vec<Result<Record, std::io::Error>> = vec![Ok(block(0, 0, 0, Op::Read))];
        let e = predict_future_io(records, 1, &PredictOptions::default()).expect_err("empty");
        assert!(matches!(e, PredictError::NoAccesses { target: 0 }));
    }
}
