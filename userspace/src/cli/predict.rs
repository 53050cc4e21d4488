//! `tern predict`: forecast a trace's next horizon into a plan file, and
//! `tern predict eval`: the evaluation table of every model on a trace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::sync::Arc;

use tern::predict::boosted::{self, Forest, RowsSpec};
use tern::predict::eval::{self, EvalSpec};
use tern::predict::{self, PredictOptions};

use super::args::parse_size;

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  tern predict app.trace --horizon 10m --out plan.json\n  tern predict s3://tern/history --from 24h --device dev-vdb --horizon 10m --out plan.json\n  tern migrate --device /dev/vdb --to dst:7443 --prefetch plan.json ...\n  tern predict eval app.trace --train 0-50% --test 50-100% --horizon 10s [--step 2s] [--unit 4K,64K,1M] [--json]\n  tern predict features app.trace --range 0-50% --horizon 5s --unit 4K --out rows.csv"
)]
pub struct PredictArgs {
    #[command(subcommand)]
    command: Option<PredictCommand>,
    #[command(flatten)]
    run: PredictRunArgs,
}

#[derive(Args)]
struct PredictRunArgs {
    /// The history: a trace file (`tern trace`, `tern trace import`), or a
    /// history store a source agent recorded (`--history`): a directory,
    /// `file:///dir` or `s3://bucket/prefix`.
    #[arg(required = true, value_name = "TRACE|HISTORY")]
    trace: Option<PathBuf>,
    /// Which part of a history store (not for a trace file).
    #[command(flatten)]
    filter: super::history::HistoryFilter,
    /// How far ahead to predict.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    horizon: Duration,
    /// Where to write the plan (JSON); stdout when absent.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
    /// The model (ensemble, regional, learned, boosted, last-horizon, ever-touched, lru,
    /// readahead, stride, correlation, periodic, ets).
    #[arg(long, default_value = "ensemble")]
    model: String,
    /// Claims below this probability are left out of the plan.
    #[arg(long, default_value_t = 0.05)]
    min_probability: f64,
}

#[derive(Args, Clone)]
struct Common {
    /// Prediction unit: the migration's checksum region by default.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    unit: u64,
    /// Which traced target (index in the trace header).
    #[arg(long, default_value_t = 0)]
    target: u16,
}

#[derive(Subcommand)]
enum PredictCommand {
    /// Train on one part of a trace, test on another: precision, coverage,
    /// post-cutover misses, re-sent bytes avoided, cost, per model.
    #[command(
        after_help = "Examples:\n  tern predict eval app.trace --horizon 10s\n  tern predict eval app.trace --train 0-50% --test 50-100% --horizon 5s --unit 4K,64K,1M --models ensemble,last-horizon,ever-touched --json"
    )]
    Eval {
        trace: PathBuf,
        /// Training range, as a share of the trace's time span.
        #[arg(long, default_value = "0-50%")]
        train: String,
        #[arg(long, default_value = "50-100%")]
        test: String,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        horizon: Duration,
        /// Only these models (comma-separated); all by default.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// How far the forecast's moment moves between windows (default: one
        /// horizon, windows tiling the test range; shorter: overlapping whole
        /// horizons).
        #[arg(long, value_parser = humantime::parse_duration)]
        step: Option<Duration>,
        /// At most this many test windows are scored (spread evenly).
        #[arg(long, default_value_t = 200)]
        max_windows: usize,
        /// Units to evaluate every model at (comma-separated); the ensemble
        /// at the finest one chooses among it and 16 and 256 times it itself.
        #[arg(long, alias = "units", value_delimiter = ',', value_parser = parse_size, default_value = "4K,64K,1M")]
        unit: Vec<u64>,
        /// Which traced target (index in the trace header).
        #[arg(long, default_value_t = 0)]
        target: u16,
        /// The report as JSON (fields documented in docs/prediction.md).
        #[arg(long)]
        json: bool,
        /// The boosted trees' model file (default: the one built in).
        #[arg(long, value_name = "MODEL.json")]
        trees: Option<PathBuf>,
    },
    /// Export training rows for the boosted trees (`python -m tern_analysis
    /// boosted ROWS.csv --out M.json`): per moment of the range, sampled candidate units with
    /// their features and whether the next horizon touched them.
    #[command(
        after_help = "Examples:\n  tern predict features app.trace --range 0-50% --horizon 5s --unit 4K --out rows.csv\n  python -m tern_analysis boosted rows.csv --out trees.json && tern predict eval app.trace --horizon 5s --trees trees.json"
    )]
    Features {
        trace: PathBuf,
        /// Which part of the trace's time span.
        #[arg(long, default_value = "0-50%")]
        range: String,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        horizon: Duration,
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        unit: u64,
        #[arg(long, default_value_t = 0)]
        target: u16,
        /// Also a `score` column: this model's probability for each row.
        #[arg(long, value_name = "MODEL.json")]
        trees: Option<PathBuf>,
        /// Where to write the CSV; stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn horizon_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn predict(args: PredictArgs) -> Result<()> {
    match args.command {
        Some(PredictCommand::Eval {
            trace,
            train,
            test,
            horizon,
            models,
            step,
            max_windows,
            unit,
            target,
            json,
            trees,
        }) => {
            let forest = trees
                .map(|path| Forest::load(&path).map(Arc::new))
                .transpose()?;
            let spec = EvalSpec {
                units: unit,
                target,
                horizon_ns: horizon_ns(horizon),
                step_ns: step.map(horizon_ns),
                train: eval::parse_split(&train)?,
                test: eval::parse_split(&test)?,
                models,
                max_windows,
                forest,
            };
            evaluate(&trace, &spec, json)?;
        }
        Some(PredictCommand::Features {
            trace,
            range,
            horizon,
            unit,
            target,
            trees,
            out,
        }) => {
            let spec = RowsSpec {
                unit,
                target,
                horizon_ns: horizon_ns(horizon),
                range: eval::parse_split(&range)?,
            };
            features(&trace, &spec, trees.as_deref(), out.as_ref())?;
        }
        None => {
            let run = args.run;
            let trace = run.trace.context("give a trace file")?;
            let opts = PredictOptions {
                unit: run.common.unit,
                target: run.common.target,
                model: run.model,
                min_probability: run.min_probability,
            };
            let horizon = horizon_ns(run.horizon);
            let plan = if super::history::is_store(&trace) {
                let url = trace.to_string_lossy();
                let reader = tern::history::HistoryReader::open(&url, &run.filter.query()?)
                    .with_context(|| format!("opening the history {url}"))?;
                predict::predict_future_io(reader, horizon, &opts)
            } else {
                anyhow::ensure!(
                    run.filter.is_empty(),
                    "--from, --to, --host and --device select from a history store, not from the trace file {}",
                    trace.display()
                );
                predict::predict_future_io(super::args::open_trace(&trace)?, horizon, &opts)
            }
            .with_context(|| format!("predicting from {}", trace.display()))?;
            super::args::write_out(run.out.as_ref(), |out| {
                serde_json::to_writer(&mut *out, &plan)?;
                writeln!(out)?;
                Ok(())
            })?;
            let (reads, writes) = plan.extents.iter().fold((0u64, 0u64), |(r, w), e| {
                (
                    r + if e.p_read >= 0.5 { e.len } else { 0 },
                    w + if e.p_write >= 0.5 { e.len } else { 0 },
                )
            });
            eprintln!(
                "{} extents from {}: {} MiB likely read, {} MiB likely written within {}",
                plan.extents.len(),
                plan.model,
                reads >> 20,
                writes >> 20,
                humantime::format_duration(run.horizon)
            );
        }
    }
    Ok(())
}

/// `tern predict features`: the training rows as CSV.
fn features(
    trace: &PathBuf,
    spec: &RowsSpec,
    trees: Option<&Path>,
    out: Option<&PathBuf>,
) -> Result<()> {
    let forest = trees.map(Forest::load).transpose()?;
    let rows = boosted::training_rows(super::args::open_trace(trace)?, spec)
        .with_context(|| format!("exporting rows from {}", trace.display()))?;
    super::args::write_out(out, |w| {
        boosted::write_csv(&rows, forest.as_ref(), w)?;
        Ok(())
    })?;
    let touched = rows.iter().filter(|r| r.touched).count();
    eprintln!(
        "{} rows ({touched} touched) from {}",
        rows.len(),
        trace.display()
    );
    Ok(())
}

/// `tern predict eval`: the table, or its JSON.
fn evaluate(trace: &PathBuf, spec: &EvalSpec, json: bool) -> Result<()> {
    let reader = super::args::open_trace(trace)?;
    let report = eval::evaluate(reader, spec)
        .with_context(|| format!("evaluating on {}", trace.display()))?;
    super::args::write_out(None, |out| {
        if json {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        } else {
            write!(out, "{}", report.render())?;
        }
        Ok(())
    })
}
