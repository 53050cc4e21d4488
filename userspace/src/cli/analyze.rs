//! `tern analyze`: the workload analyzer over a trace file — heatmaps and the
//! workload's profile.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tern::analyze::{self, report::Report};

#[derive(Subcommand)]
pub enum AnalyzeCommand {
    /// Draw an offset × time heatmap (reads blue, writes red, log scale) to a
    /// PNG, or write its grid as JSON for a dashboard to draw.
    #[command(
        after_help = "Examples:\n  tern analyze heatmap loop0.trace --out heat.png\n  tern analyze heatmap loop0.trace --out heat.json   # the grid: read[row][col], write[row][col] in bytes\n  tern analyze heatmap app.trace --faults --out faults.png"
    )]
    Heatmap(HeatmapArgs),
    /// Print the workload's profile: R/W mix, hot set, dirty rate, sequentiality, periods, gaps.
    #[command(
        after_help = "Examples:\n  tern analyze report loop0.trace\n  tern analyze report loop0.trace --json --window 100ms"
    )]
    Report(ReportArgs),
}

#[derive(Args)]
pub struct Common {
    /// The trace file (from `tern trace` or `tern trace import`).
    trace: PathBuf,
    /// Which of the trace's targets to analyze (by index, see `tern trace stat`).
    #[arg(long, default_value_t = 0)]
    target: u16,
    /// The dirty rate's and working sets' window, e.g. 1s or 100ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
}

#[derive(Args)]
pub struct HeatmapArgs {
    #[command(flatten)]
    common: Common,
    /// The file to write: `*.png` (the picture) or `*.json` (the grid).
    #[arg(long)]
    out: PathBuf,
    /// Page faults (address × time) instead of block I/O.
    #[arg(long)]
    faults: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    common: Common,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn load(c: &Common) -> Result<analyze::Analyzer> {
    analyze::analyze_trace(&c.trace, c.target, c.window)
        .with_context(|| format!("analyzing {}", c.trace.display()))
}

pub fn run(cmd: AnalyzeCommand) -> Result<()> {
    match cmd {
        AnalyzeCommand::Heatmap(h) => {
            let json = match h.out.extension().and_then(|e| e.to_str()) {
                Some(e) if e.eq_ignore_ascii_case("png") => false,
                Some(e) if e.eq_ignore_ascii_case("json") => true,
                _ => bail!(
                    "--out {}: name it *.png for the picture or *.json for the grid",
                    h.out.display()
                ),
            };
            let a = load(&h.common)?;
            if json {
                let data = if h.faults {
                    a.fault_heatmap_data()?
                } else {
                    a.block_heatmap_data()?
                };
                let file = std::fs::File::create(&h.out)
                    .with_context(|| format!("cannot create {}", h.out.display()))?;
                let mut w = std::io::BufWriter::new(file);
                serde_json::to_writer(&mut w, &data)
                    .with_context(|| format!("cannot write {}", h.out.display()))?;
                w.flush()
                    .with_context(|| format!("cannot write {}", h.out.display()))?;
            } else if h.faults {
                a.fault_heatmap(&h.out)?;
            } else {
                a.block_heatmap(&h.out)?;
            }
            eprintln!("heatmap written to {}", h.out.display());
        }
        AnalyzeCommand::Report(r) => {
            let a = load(&r.common)?;
            let report = Report::of(&a);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if r.json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", report.render())?;
            }
            out.flush()?;
        }
    }
    Ok(())
}
