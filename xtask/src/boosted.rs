//! `cargo xtask boosted`: trains the boosted trees Tern ships
//! (`userspace/models/boosted.json`) on the traces of `cargo xtask traces`,
//! and measures how they do on a trace they never saw.
//!
//! Rows: `tern predict features TRACE --range 0-50% --horizon 5s` at 4 KiB
//! and 64 KiB units, for every `*.trace` of the directory (the first half
//! only: `tern predict eval` tests on the second). Training: `python -m
//! tern_analysis boosted` (scikit-learn) on all rows. With
//! `--leave-one-out`, each trace is also evaluated with trees trained
//! without any row of it: the figure for a workload the trees never met.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sh::{output, repo_root};

const UNITS: [&str; 2] = ["4K", "64K"];
const HORIZON: &str = "5s";

pub struct Options {
    pub traces: PathBuf,
    pub python: PathBuf,
    pub out: Option<PathBuf>,
    pub leave_one_out: bool,
}

fn traces_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut traces: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "no traces in {}: make them with `cargo xtask traces --out {}`",
                dir.display(),
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "trace"))
        .collect();
    traces.sort();
    if traces.is_empty() {
        bail!(
            "no *.trace in {}: make them with `cargo xtask traces`",
            dir.display()
        );
    }
    Ok(traces)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn train(python: &Path, rows: &[PathBuf], out: &Path) -> Result<()> {
    let mut c = Command::new(python);
    c.current_dir(repo_root().join("analysis"))
        .args(["-m", "tern_analysis", "boosted"])
        .args(rows)
        .arg("--out")
        .arg(out);
    let summary = output(&mut c).context(
        "training with scikit-learn: give --python the analysis venv's python (see .ci/run)",
    )?;
    eprintln!("boosted: trained {}: {}", out.display(), summary.trim());
    Ok(())
}

/// Rows of every trace at every unit: (trace name, CSV), and the traces
/// that gave rows.
type Exported = (Vec<(String, PathBuf)>, Vec<PathBuf>);

fn export_rows(bin: &Path, traces: &[PathBuf], dir: &Path) -> Result<Exported> {
    let mut rows: Vec<(String, PathBuf)> = Vec::new();
    let mut used = Vec::new();
    for t in traces {
        // A trace of page faults only (sqlite-faults) has no block rows.
        let stat: serde_json::Value = serde_json::from_str(&output(
            Command::new(bin).args(["trace", "stat", "--json"]).arg(t),
        )?)
        .with_context(|| format!("tern trace stat {} printed no JSON", t.display()))?;
        if stat["block_events"].as_u64() == Some(0) {
            eprintln!("boosted: {} has no block I/O, no rows from it", stem(t));
            continue;
        }
        for unit in UNITS {
            let csv = dir.join(format!("{}-{unit}.csv", stem(t)));
            output(
                Command::new(bin)
                    .args(["predict", "features"])
                    .arg(t)
                    .args([
                        "--range",
                        "0-50%",
                        "--horizon",
                        HORIZON,
                        "--unit",
                        unit,
                        "--out",
                    ])
                    .arg(&csv),
            )?;
            rows.push((stem(t), csv));
        }
        used.push(t.clone());
    }
    Ok((rows, used))
}

pub fn run_boosted(bin: &Path, o: &Options) -> Result<()> {
    let traces = traces_in(&o.traces)?;
    let work = crate::bench_migrate::TempDir::create(
        std::env::temp_dir().join(format!("tern-boosted-{}", std::process::id())),
    )?;
    let (rows, used) = export_rows(bin, &traces, &work.path)?;
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| repo_root().join("userspace/models/boosted.json"));
    let all: Vec<PathBuf> = rows.iter().map(|(_, p)| p.clone()).collect();
    train(&o.python, &all, &out)?;
    if !o.leave_one_out {
        return Ok(());
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n## Boosted trees on a trace they never saw (`tern predict eval TRACE --horizon {HORIZON} --unit 4K`, F1 by 4K blocks)\n"
    );
    let _ = writeln!(
        table,
        "| trace | last-horizon | ever-touched | learned | boosted (all traces) | boosted (without this trace) |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    for t in &used {
        let name = stem(t);
        let others: Vec<PathBuf> = rows
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(_, p)| p.clone())
            .collect();
        let model = work.path.as_path().join(format!("without-{name}.json"));
        train(&o.python, &others, &model)?;
        let eval = |trees: &Path| -> Result<serde_json::Value> {
            let text = output(
                Command::new(bin)
                    .args(["predict", "eval"])
                    .arg(t)
                    .args(["--horizon", HORIZON, "--unit", "4K"])
                    .args(["--models", "last-horizon,ever-touched,learned,boosted"])
                    .arg("--trees")
                    .arg(trees)
                    .arg("--json"),
            )?;
            Ok(serde_json::from_str(&text)?)
        };
        let f1 = |v: &serde_json::Value, model: &str| -> String {
            v["models"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["name"] == model))
                .and_then(|r| r["f1_blocks"].as_f64())
                .map_or_else(|| "-".to_owned(), |f| format!("{f:.3}"))
        };
        let with_all = eval(&out)?;
        let without = eval(&model)?;
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} |",
            f1(&with_all, "last-horizon"),
            f1(&with_all, "ever-touched"),
            f1(&with_all, "learned"),
            f1(&with_all, "boosted"),
            f1(&without, "boosted"),
        );
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(table.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
