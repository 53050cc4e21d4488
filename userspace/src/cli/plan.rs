//! `tern plan`: the granularity controller's what-if table for a trace.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tern::granularity::simulate::{Model, Workload};
use tern::granularity::{self, Weights};
use tern::trace::TraceReader;
use tern::units::size_flag;

use super::args::{parse_link_rate, parse_size};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tern plan app.trace --bandwidth 1Gbit\n  tern plan app.trace --bandwidth 100MB/s --rtt 5ms --max-downtime 100ms --image /dev/vdb --out plan.json\n  tern migrate --device /dev/vdb --to dst:7443 --plan plan.json --pause fsfreeze:/srv"
)]
pub struct PlanArgs {
    /// A trace of the workload (`tern trace`, or `tern migrate --trace-out`).
    trace: PathBuf,
    /// Link bandwidth: `1Gbit`, `200Mbit`, `125MB/s`, or bytes per second.
    #[arg(long, value_parser = parse_link_rate)]
    bandwidth: f64,
    /// Round-trip time of the link.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Downtime budget, as `tern migrate --max-downtime`.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    max_downtime: Duration,
    /// Delta rounds before giving up, as `tern migrate --max-rounds`.
    #[arg(long, default_value_t = 30)]
    max_rounds: u64,
    /// Size of the disk (when the trace does not say, or to override it).
    #[arg(long, value_parser = parse_size)]
    device_size: Option<u64>,
    /// The disk image or device, to read its GPT/MBR partitions (whole-volume units).
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Share of the disk that holds data (the bulk copy skips zeroes).
    #[arg(long, default_value_t = 1.0)]
    nonzero: f64,
    /// Wire bytes per data byte after zstd (1.0: incompressible).
    #[arg(long, default_value_t = 1.0)]
    compression: f64,
    /// Longest extent on the wire, as `tern migrate --extent`.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    extent: u64,
    /// Checksum-tree region size, as `tern migrate --region-size` (whose
    /// default is 16K up to 16 GiB, 64K at 64 GiB).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    region_size: u64,
    /// Engine time per extent not hidden by the wire.
    #[arg(long, default_value = "180us", value_parser = humantime::parse_duration)]
    per_extent: Duration,
    /// The destination's flush at the end of every round.
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    barrier: Duration,
    /// Do not replay the trace again when the migration outlasts it (the disk goes idle).
    #[arg(long)]
    no_repeat: bool,
    /// Weight of one second of downtime against one second of migration.
    #[arg(long, default_value_t = 100.0)]
    downtime_weight: f64,
    /// Weight of one MiB of dirty-tracking memory, in seconds of migration.
    #[arg(long, default_value_t = 0.05)]
    memory_weight: f64,
    /// Write the plan (for `tern migrate --plan`) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The whole plan as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn plan(a: &PlanArgs) -> Result<()> {
    if a.max_downtime.is_zero() {
        bail!("--max-downtime must be above 0 (e.g. 50ms)");
    }
    if a.max_rounds == 0 || a.max_rounds > 10_000 {
        bail!("--max-rounds must be from 1 to 10000");
    }
    if a.device_size == Some(0) {
        bail!("--device-size must be above 0 (e.g. 20G)");
    }
    let model = Model {
        bandwidth: a.bandwidth,
        rtt_s: a.rtt.as_secs_f64(),
        extent_len: a.extent,
        per_extent_s: a.per_extent.as_secs_f64(),
        region_size: a.region_size,
        barrier_s: a.barrier.as_secs_f64(),
        compression: a.compression,
        nonzero: a.nonzero,
        max_downtime_s: a.max_downtime.as_secs_f64(),
        max_rounds: a.max_rounds,
        repeat: !a.no_repeat,
        ..Model::default()
    };
    model.validate()?;
    let file = std::fs::File::open(&a.trace)
        .with_context(|| format!("cannot open the trace {}", a.trace.display()))?;
    let reader = TraceReader::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a readable trace", a.trace.display()))?;
    let work = Workload::from_trace(reader, a.device_size)
        .with_context(|| format!("cannot simulate {}", a.trace.display()))?;
    let volumes = match &a.image {
        Some(path) => granularity::read_volumes(path)?.1,
        None => Vec::new(),
    };
    let weights = Weights {
        downtime: a.downtime_weight,
        memory_per_mib: a.memory_weight,
        ..Weights::default()
    };
    let usable = |w: f64| w.is_finite() && w >= 0.0;
    if !usable(weights.downtime) || !usable(weights.memory_per_mib) {
        bail!("--downtime-weight and --memory-weight must be finite and not negative");
    }
    let plan = granularity::plan(&work, &model, &weights, &volumes)?;
    if let Some(out) = &a.out {
        super::args::write_out(Some(out), |w| {
            w.write_all(serde_json::to_string_pretty(&plan)?.as_bytes())
                .with_context(|| format!("cannot write the plan to {}", out.display()))
        })?;
    }
    let mut o = std::io::stdout().lock();
    if a.json {
        writeln!(o, "{}", serde_json::to_string(&plan)?)?;
        return Ok(());
    }
    writeln!(
        o,
        "{}: {} disk, {} writes over {:.1} s, {} gaps; link {:.1} MB/s, RTT {:?}, budget {:?}",
        a.trace.display(),
        size_flag(work.size),
        work.writes.len(),
        work.duration_ns as f64 / 1e9,
        work.gaps.len(),
        a.bandwidth / 1e6,
        a.rtt,
        a.max_downtime
    )?;
    write!(o, "{}", table(&plan))?;
    for line in &plan.explanation {
        writeln!(o, "{line}")?;
    }
    Ok(())
}

/// The what-if table: one row per choice.
pub fn table(plan: &granularity::Plan) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<14} {:>10} {:>10} {:>9} {:>7} {:>12} {:>9} {:>10} {:>9}",
        "unit",
        "wire MB",
        "resent MB",
        "extents",
        "rounds",
        "downtime ms",
        "total s",
        "track",
        "cost"
    );
    for c in &plan.choices {
        let r = &c.report;
        let mark = if c.name == plan.chosen { " *" } else { "" };
        let (down, cost) = if r.converged {
            (
                format!("{:.1}", r.downtime_s * 1e3),
                format!("{:.3}", c.cost.total),
            )
        } else {
            ("no conv.".to_owned(), "inf".to_owned())
        };
        let _ = writeln!(
            t,
            "{:<14} {:>10.1} {:>10.1} {:>9} {:>7} {:>12} {:>9.2} {:>10} {:>9}{mark}",
            c.name,
            r.wire_bytes as f64 / 1e6,
            r.resent_bytes as f64 / 1e6,
            r.extents,
            r.rounds,
            down,
            r.total_s,
            size_flag(r.tracking_bytes.max(1)),
            cost
        );
    }
    t
}
