//! `cargo xtask bench analyze`: the analyzer's throughput on one core (events
//! per second, alone and decoding a trace file) on a generated 20 M-event
//! workload over a 1 TiB device, and its memory for that device (the stated
//! bound, and the process's peak RSS). Target: ≥ 5 M events/s offline.

use std::process::Command;

use anyhow::{Context, Result};

use crate::sh::{cargo, output, run as run_cmd};

const EVENTS: u64 = 20_000_000;

pub fn run() -> Result<()> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "tern",
        "--example",
        "analyze_bench",
    ]))?;
    let target = crate::target_dir();
    let bin = target.join("release/examples/analyze_bench");
    // One core: the figure is per core, whatever else the machine runs.
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(&bin).arg(EVENTS.to_string());
    let line = output(&mut cmd).context("the analyzer benchmark failed")?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("the benchmark printed no JSON")?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let mib = |k: &str| f(k) / f64::from(1 << 20);
    eprintln!("analyzer benchmark (one core, generated workload on a 1 TiB device)");
    eprintln!("  {:<44} {:>14}", "figure", "value");
    eprintln!("  {:<44} {:>14.0}", "events analysed", f("events"));
    eprintln!(
        "  {:<44} {:>12.2} M",
        "analyzer alone, events/s",
        f("analyzer_events_per_s") / 1e6
    );
    eprintln!(
        "  {:<44} {:>12.2} M",
        "analyzer alone, events per CPU-second",
        f("analyzer_cpu_events_per_s") / 1e6
    );
    eprintln!(
        "  {:<44} {:>12.2} M",
        "offline, events per CPU-second",
        f("offline_cpu_events_per_s") / 1e6
    );
    eprintln!(
        "  {:<44} {:>14.0}",
        "analyzer alone, ns/event",
        f("analyzer_ns_per_event")
    );
    eprintln!(
        "  {:<44} {:>12.2} M",
        "offline (decode + analyze), events/s",
        f("offline_events_per_s") / 1e6
    );
    eprintln!(
        "  {:<44} {:>12.2} M",
        "decode only (TraceReader), events/s",
        f("decode_only_events_per_s") / 1e6
    );
    eprintln!(
        "  {:<44} {:>10.1} MiB",
        "memory for 1 TiB, empty (stated bound part)",
        mib("memory_1tib_empty_bytes")
    );
    eprintln!(
        "  {:<44} {:>10.1} MiB",
        "memory for 1 TiB after the run",
        mib("memory_1tib_after_bytes")
    );
    eprintln!(
        "  {:<44} {:>10.1} MiB",
        "peak RSS of the benchmark process",
        mib("peak_rss_bytes")
    );
    eprintln!(
        "  {:<44} {:>12.3} s",
        "report (percentiles, periods)",
        f("report_s")
    );
    eprintln!(
        "  target ≥ 5 M events/s offline: {}",
        if f("offline_cpu_events_per_s") >= 5e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
