//! Gradient-boosted trees trained in Python (`analysis/`, `python -m
//! tern_analysis boosted ROWS.csv --out M.json`) on the same per-unit features the learned
//! table buckets ([`Features`]), run here without Python.
//!
//! The trees score a candidate unit with the probability that it is touched
//! within the next horizon, trained on rows that `tern predict features`
//! exports from traces. The `boosted` model is the learned table with the
//! trees' score refining the hand-made buckets: each candidate's cell is
//! its hand-made cell split by its score's bin ([`BINS`]), and the table still learns each cell's rate
//! and the F1-optimal set of cells online, on the history's own windows (so
//! the trees rank, the history calibrates, and the naive forecasts stay the
//! guard they are in [`super::learned`]).
//!
//! The model file is JSON ([`FORMAT`]): the feature names in order (checked
//! against [`FEATURE_NAMES`]), the base score and learning rate, and per tree
//! the node arrays of scikit-learn's trees (`feature`, `threshold`, `left`,
//! `right`, `value`; a leaf has `left` = -1). A node sends `x[feature] <=
//! threshold` left. The model in the tree, `userspace/models/boosted.json`,
//! is what `cargo xtask boosted` trains on `cargo xtask traces`' traces.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use serde::Deserialize;

use super::learned::{FEATURE_NAMES, FEATURES, Features, Learned};
use super::{Event, Model, PredictError, Units};
use crate::trace::Record;

/// The `format` field of a model file.
pub const FORMAT: &str = "tern-boosted-trees";
/// The model file version this build reads.
pub const VERSION: u32 = 1;

/// Errors of loading a model file.
#[derive(Debug, thiserror::Error)]
pub enum ForestError {
    /// The file could not be read.
    #[error("cannot read the model {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its model is refused (the cause says why).
    #[error("the model {path} is refused")]
    File {
        path: String,
        #[source]
        source: Box<ForestError>,
    },
    /// Not JSON, or not the shape of a model.
    #[error("the model is not valid JSON of a boosted-trees model")]
    Parse(#[source] serde_json::Error),
    /// Another format or version.
    #[error(
        "the model's format is {found:?} version {version}; this build reads {FORMAT:?} version {VERSION}"
    )]
    Format { found: String, version: u32 },
    /// Trained on other features than this build computes.
    #[error(
        "the model was trained on the features {found:?}; this build computes {FEATURE_NAMES:?} (retrain it: `cargo xtask boosted`)"
    )]
    Features { found: Vec<String> },
    /// A tree whose nodes do not form a tree of known features.
    #[error("tree {tree} of the model is malformed: {what}")]
    Tree { tree: usize, what: &'static str },
    /// A score the trees could add up to is not a finite number.
    #[error(
        "the model's base score, learning rate or leaves can add up to a score that is not a finite number"
    )]
    Numbers,
}

#[derive(Deserialize)]
struct ForestFile {
    format: String,
    version: u32,
    features: Vec<String>,
    base_score: f64,
    learning_rate: f64,
    trees: Vec<TreeFile>,
}

#[derive(Deserialize)]
struct TreeFile {
    feature: Vec<i64>,
    threshold: Vec<f64>,
    left: Vec<i64>,
    right: Vec<i64>,
    value: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// `FEATURES` for a leaf.
    feature: usize,
    threshold: f64,
    left: u32,
    right: u32,
    value: f64,
}

/// A loaded, checked model.
#[derive(Debug)]
pub struct Forest {
    base: f64,
    rate: f64,
    /// Every tree's nodes, root first; trees start at `roots`.
    nodes: Vec<Node>,
    roots: Vec<u32>,
}

static EMBEDDED: LazyLock<Arc<Forest>> = LazyLock::new(|| {
    Arc::new(
        Forest::parse(include_str!("../../models/boosted.json"))
            .expect("the embedded model is checked by the unit tests"),
    )
});

impl Forest {
    /// The model shipped in the binary (`userspace/models/boosted.json`).
    pub fn embedded() -> Arc<Forest> {
        Arc::clone(&EMBEDDED)
    }

    /// Reads a model file.
    pub fn load(path: &Path) -> Result<Forest, ForestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ForestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Forest::parse(&text).map_err(|e| ForestError::File {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    /// Parses and checks a model: every child after its parent and inside
    /// its tree, every feature index known, every number finite.
    pub fn parse(text: &str) -> Result<Forest, ForestError> {
        let file: ForestFile = serde_json::from_str(text).map_err(ForestError::Parse)?;
        if file.format != FORMAT || file.version != VERSION {
            return Err(ForestError::Format {
                found: file.format,
                version: file.version,
            });
        }
        if file.features != FEATURE_NAMES {
            return Err(ForestError::Features {
                found: file.features,
            });
        }
        if !file.base_score.is_finite() || !file.learning_rate.is_finite() {
            return Err(ForestError::Numbers);
        }
        let mut nodes = Vec::new();
        let mut roots = Vec::with_capacity(file.trees.len());
        for (k, t) in file.trees.iter().enumerate() {
            let bad = |what| ForestError::Tree { tree: k, what };
            let n = t.feature.len();
            if n == 0 {
                return Err(bad("it has no nodes"));
            }
            if [
                t.threshold.len(),
                t.left.len(),
                t.right.len(),
                t.value.len(),
            ] != [n; 4]
            {
                return Err(bad("its node arrays differ in length"));
            }
            let start = u32::try_from(nodes.len()).map_err(|_| bad("too many nodes"))?;
            roots.push(start);
            for i in 0..n {
                let value = t.value[i];
                // A leaf has no children (scikit-learn writes -1 for both).
                let leaf = t.left[i] == -1 && t.right[i] == -1;
                if !value.is_finite() || !t.threshold[i].is_finite() && !leaf {
                    return Err(bad("a value or threshold is not finite"));
                }
                let node = if leaf {
                    Node {
                        feature: FEATURES,
                        threshold: 0.0,
                        left: 0,
                        right: 0,
                        value,
                    }
                } else {
                    let child = |c: i64| -> Result<u32, ForestError> {
                        let c = usize::try_from(c).map_err(|_| bad("a child index is negative"))?;
                        if c <= i || c >= n {
                            return Err(bad("a child is not after its parent in the tree"));
                        }
                        u32::try_from(c)
                            .map_err(|_| bad("too many nodes"))?
                            .checked_add(start)
                            .ok_or(bad("too many nodes"))
                    };
                    let feature = usize::try_from(t.feature[i])
                        .ok()
                        .filter(|&f| f < FEATURES)
                        .ok_or(bad("a split names no known feature"))?;
                    Node {
                        feature,
                        threshold: t.threshold[i],
                        left: child(t.left[i])?,
                        right: child(t.right[i])?,
                        value,
                    }
                };
                nodes.push(node);
            }
        }
        // Each value is finite, but a sum of them may not be: bound the
        // largest score any unit can get, so that no probability is NaN.
        let mut bound = file.base_score.abs();
        for (k, &root) in roots.iter().enumerate() {
            let end = roots.get(k + 1).map_or(nodes.len(), |&r| r as usize);
            let largest = nodes[root as usize..end]
                .iter()
                .filter(|n| n.feature == FEATURES)
                .map(|n| (file.learning_rate * n.value).abs())
                .fold(0.0, f64::max);
            bound += largest;
        }
        if !bound.is_finite() {
            return Err(ForestError::Numbers);
        }
        Ok(Forest {
            base: file.base_score,
            rate: file.learning_rate,
            nodes,
            roots,
        })
    }

    /// The probability the trees give a unit with these features.
    pub fn probability(&self, x: &[f32; FEATURES]) -> f64 {
        let mut raw = self.base;
        for &root in &self.roots {
            let mut i = root as usize;
            loop {
                let n = &self.nodes[i];
                if n.feature == FEATURES {
                    raw += self.rate * n.value;
                    break;
                }
                // As scikit-learn compares: the f32 feature widened.
                i = if f64::from(x[n.feature]) <= n.threshold {
                    n.left
                } else {
                    n.right
                } as usize;
            }
        }
        1.0 / (1.0 + (-raw).exp())
    }
}

/// What to export as training rows.
#[derive(Debug, Clone)]
pub struct RowsSpec {
    pub unit: u64,
    pub target: u16,
    pub horizon_ns: u64,
    /// The part of the history's time span whose windows become rows.
    pub range: (f64, f64),
}

/// One exported candidate: the moment of the forecast, the unit, its
/// features then, and whether it was touched within the horizon after.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub at_ns: u64,
    pub unit: u64,
    pub features: [f32; FEATURES],
    pub touched: bool,
}

/// The training rows of a history: the candidates the learned table notes
/// at each of its moments in `spec.range` (a hash sample of at most a few
/// thousand per moment), each with its label, for windows that ended inside
/// the range and overlap no gap.
pub fn training_rows<I, E>(history: I, spec: &RowsSpec) -> Result<Vec<Row>, PredictError>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if spec.horizon_ns == 0 {
        return Err(PredictError::Horizon);
    }
    let units = Units::new(spec.unit, spec.target)?;
    let mut events = Vec::new();
    for r in history {
        let r = r.map_err(|e| PredictError::History(Box::new(e)))?;
        units.events(&r, &mut events);
    }
    events.sort_by_key(Event::ts_ns);
    // The span is the accesses' (a history of gaps alone has nothing to learn).
    let mut accesses = events.iter().filter(|e| matches!(e, Event::Access(_)));
    let Some(t0) = accesses.next().map(Event::ts_ns) else {
        return Err(PredictError::NoAccesses {
            target: spec.target,
        });
    };
    // A clock at its end (a crafted or damaged trace) must not overflow.
    let t1 = accesses
        .map(Event::ts_ns)
        .max()
        .unwrap_or(t0)
        .saturating_add(1);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "f is a fraction in 0..=1 (parse_split), so the offset lies in 0..=t1 - t0"
    )]
    let at = |f: f64| t0 + ((t1 - t0) as f64 * f).round() as u64;
    let (from, to) = (at(spec.range.0), at(spec.range.1));
    let mut model = Learned::recording(spec.horizon_ns, from);
    for e in events.iter().take_while(|e| e.ts_ns() < to) {
        model.feed(e);
    }
    Ok(model.finish(to))
}

/// Writes rows as CSV: `at_ns,unit,<features>,touched` and, with a model,
/// the trees' probability as `score`.
pub fn write_csv(
    rows: &[Row],
    forest: Option<&Forest>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    write!(out, "at_ns,unit")?;
    for name in FEATURE_NAMES {
        write!(out, ",{name}")?;
    }
    write!(out, ",touched")?;
    if forest.is_some() {
        write!(out, ",score")?;
    }
    writeln!(out)?;
    for r in rows {
        write!(out, "{},{}", r.at_ns, r.unit)?;
        for x in r.features {
            write!(out, ",{x}")?;
        }
        write!(out, ",{}", u8::from(r.touched))?;
        if let Some(f) = forest {
            write!(out, ",{}", f.probability(&r.features))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Bins of the trees' probability that refine each hand-made cell of the
/// boosted table (by the probability's square root: finer at the low
/// probabilities most candidates have).
pub const BINS: usize = 8;

/// The bin of a candidate's probability.
pub fn bin(forest: &Forest, features: &Features) -> usize {
    let p = forest.probability(&features.vector());
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "p is a probability, so the product lies in 0..=BINS"
    )]
    let bin = (p.sqrt() * BINS as f64) as usize;
    bin.min(BINS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Op;
    use crate::trace::record::{BlockRecord, Gap};

    fn write_at(ts_ns: u64, block: u64) -> Record {
        Record::Block(BlockRecord {
            ts_ns,
            offset: block * 4096,
            latency_ns: 0,
            len: 4096,
            pid: 1,
            flags: 0,
            target: 0,
            op: Op::Write,
        })
    }

    #[test]
    fn rows_come_from_accesses_whatever_the_clock_says() {
        let spec = RowsSpec {
            unit: 4096,
            target: 0,
            horizon_ns: 1_000_000_000,
            range: (0.0, 1.0),
        };
        // Ten seconds of writes ending at the clock's last nanosecond.
        let end: Vec<_> = (0..=100u64)
            .map(|k| Ok::<_, std::io::Error>(write_at(u64::MAX - (100 - k) * 100_000_000, k % 7)))
            .collect();
        let rows = training_rows(end, &spec).expect("rows");
        assert!(!rows.is_empty());
        // Only a gap (and no access): nothing to learn, said so.
        let gap_only = vec![Ok::<_, std::io::Error>(Record::Gap(Gap {
            start_ns: 5,
            end_ns: 10,
            lost_block: 3,
            lost_fault: 0,
        }))];
        assert!(matches!(
            training_rows(gap_only, &spec),
            Err(PredictError::NoAccesses { target: 0 })
        ));
    }

    fn model(trees: &str) -> String {
        format!(
            r#"{{"format":"{FORMAT}","version":1,"features":{features},"base_score":-1.0,"learning_rate":0.5,"trees":[{trees}]}}"#,
            features = serde_json::to_string(&FEATURE_NAMES).expect("names serialize")
        )
    }

    /// Splits on `age` (feature 0) at 2.0, then on `region` (feature 5).
    const TWO_TREES: &str = r#"{"feature":[0,-2,5,-2,-2],"threshold":[2.0,-2,3.5,-2,-2],"left":[1,-1,3,-1,-1],"right":[2,-1,4,-1,-1],"value":[0,1.0,0,-2.0,0.5]},
        {"feature":[-2],"threshold":[-2],"left":[-1],"right":[-1],"value":[0.25]}"#;

    #[test]
    fn a_small_forest_scores_as_worked_by_hand() {
        let f = Forest::parse(&model(TWO_TREES)).expect("a valid model");
        let sigmoid = |raw: f64| 1.0 / (1.0 + (-raw).exp());
        let mut x = [0.0f32; FEATURES];
        x[0] = 1.5; // age <= 2: leaf 1.0
        assert!((f.probability(&x) - sigmoid(-1.0 + 0.5 * (1.0 + 0.25))).abs() < 1e-12);
        x[0] = 3.0; // age > 2, region 0 <= 3.5: leaf -2.0
        assert!((f.probability(&x) - sigmoid(-1.0 + 0.5 * (-2.0 + 0.25))).abs() < 1e-12);
        x[5] = 4.0; // region > 3.5: leaf 0.5
        assert!((f.probability(&x) - sigmoid(-1.0 + 0.5 * (0.5 + 0.25))).abs() < 1e-12);
        x[0] = 2.0; // a threshold itself goes left, as in scikit-learn
        assert!((f.probability(&x) - sigmoid(-1.0 + 0.5 * (1.0 + 0.25))).abs() < 1e-12);
    }

    #[test]
    fn malformed_models_are_refused_with_what_is_wrong() {
        let tree = |left: &str| {
            format!(
                r#"{{"feature":[0,-2,-2],"threshold":[1.0,-2,-2],"left":{left},"right":[2,-1,-1],"value":[0,1,2]}}"#
            )
        };
        assert!(matches!(
            Forest::parse(&model(&tree("[0,-1,-1]"))),
            Err(ForestError::Tree { tree: 0, .. })
        ));
        assert!(matches!(
            Forest::parse(&model(&tree("[1,-1]"))),
            Err(ForestError::Tree { tree: 0, .. })
        ));
        assert!(matches!(
            Forest::parse(&model(&tree("[7,-1,-1]"))),
            Err(ForestError::Tree { .. })
        ));
        let other = model(TWO_TREES).replace("\"zone\"", "\"zones\"");
        let err = Forest::parse(&other).expect_err("features differ");
        assert!(matches!(err, ForestError::Features { .. }));
        assert!(err.to_string().contains("cargo xtask boosted"), "{err}");
        let v2 = model(TWO_TREES).replace("\"version\":1", "\"version\":2");
        assert!(matches!(
            Forest::parse(&v2),
            Err(ForestError::Format { version: 2, .. })
        ));
        assert!(matches!(Forest::parse("{"), Err(ForestError::Parse(_))));
        assert!(matches!(
            Forest::load(Path::new("/nonexistent/model.json")),
            Err(ForestError::Read { .. })
        ));
        // A split on a feature this build does not have; a negative child.
        let unknown = tree("[1,-1,-1]").replace("\"feature\":[0,", "\"feature\":[99,");
        assert!(matches!(
            Forest::parse(&model(&unknown)),
            Err(ForestError::Tree { tree: 0, what }) if what.contains("no known feature")
        ));
        assert!(matches!(
            Forest::parse(&model(&tree("[-5,-1,-1]"))),
            Err(ForestError::Tree { tree: 0, .. })
        ));
        // Finite leaves whose sum is not: refused, not NaN scores.
        let huge = tree("[1,-1,-1]").replace("[0,1,2]", "[0,1e308,-1e308]");
        let four = [huge.as_str(); 4].join(",");
        assert!(matches!(
            Forest::parse(&model(&four)),
            Err(ForestError::Numbers)
        ));
        assert!(
            Forest::parse(&model(&huge)).is_ok(),
            "one such tree is finite"
        );
        // A file's error names the file.
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").expect("write");
        let err = Forest::load(&bad).expect_err("not JSON");
        assert!(
            err.to_string().contains("bad.json") && matches!(err, ForestError::File { .. }),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_model_loads_and_ranks_a_busy_unit_above_a_forgotten_one() {
        let f = Forest::embedded();
        let mut busy = [0.0f32; FEATURES];
        // Touched a tenth of a horizon ago, in all 8 periods, 40 times, its
        // region and zone busy.
        busy[..10].copy_from_slice(&[0.1, 0.1, 1.0e6, 8.0, 40.0, 12.0, 10.0, 10.0, 150.0, 0.0]);
        let mut forgotten = [0.0f32; FEATURES];
        forgotten[..10].copy_from_slice(&[50.0, 50.0, 1.0e6, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let (pb, pf) = (f.probability(&busy), f.probability(&forgotten));
        assert!(pb > 3.0 * pf, "busy {pb}, forgotten {pf}");
    }
}
