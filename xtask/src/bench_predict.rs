//! `cargo xtask bench predict`: the predictor's evaluation table on real
//! program traces, and a live migration with and without a prediction.
//!
//! 1. Eval: `tern predict eval TRACE --json` on every `*.trace` in
//!    `TERN_TRACES` (default `/work/traces`, made by `cargo xtask traces`):
//!    per model precision, coverage (units and bytes), post-cutover read
//!    misses against readahead and the LRU hot set, re-sent bytes avoided,
//!    and what training costs (events learned per second against the
//!    trace's own event rate, state held).
//! 2. Migration: a loop device with random data, fio rewriting a hot region
//!    with 4 KiB random writes; `tern trace` records a few seconds of it and
//!    `tern predict` makes a plan; then `tern migrate` into a local
//!    destination agent, alternately without and with `--prefetch`, under a
//!    wire rate limit so the bulk copy overlaps the writes. Re-sent bytes are
//!    the bytes sent beyond the first pass and the held-back extents' one
//!    send (`sent - first_round - held_back`). Every destination is compared
//!    with the source byte for byte.
//!
//! 3. Warm: the destination's cache warm-up at cutover (`tern agent
//!    --warm-plan`) against the same migration without it; see
//!    `bench_warm.rs`.
//! 4. Post-copy: demand fetches after a post-copy switch with the
//!    predictor's push order against an ascending push, the workload's own
//!    reads replayed on the destination; see `bench_postcopy.rs`.
//!
//! Environment: `TERN_BENCH_PREDICT_HORIZON` (eval horizon, default `5s`),
//! `TERN_BENCH_PREDICT_PARTS` (`eval,migrate,warm,postcopy`), `TERN_BENCH_PREDICT_RUNS`
//! (migrations per arm, default 3), `TERN_BENCH_PREDICT_MIB` (source size,
//! default 512), `TERN_BENCH_PREDICT_IOPS` (default 2000),
//! `TERN_BENCH_PREDICT_RATE` (`--max-rate`, default `100M`), `TERN_BENCH_DIR`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{output, run as run_cmd};

#[path = "bench_postcopy.rs"]
mod postcopy;
#[path = "bench_warm.rs"]
mod warm;

const MIB: u64 = 1 << 20;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn run(bin: &Path) -> Result<()> {
    crate::sh::require_root("cargo xtask bench predict")?;
    let parts = env_or("TERN_BENCH_PREDICT_PARTS", "eval,migrate,warm,postcopy");
    let mut out = String::new();
    if parts.contains("eval") {
        eval_part(bin, &mut out)?;
    }
    if parts.contains("migrate") {
        migrate_part(bin, &mut out)?;
    }
    if parts.contains("warm") {
        warm::warm_part(bin, &mut out)?;
    }
    if parts.contains("postcopy") {
        postcopy::postcopy_part(bin, &mut out)?;
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn pct(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn eval_part(bin: &Path, out: &mut String) -> Result<()> {
    let dir = PathBuf::from(env_or("TERN_TRACES", "/work/traces"));
    let horizon = env_or("TERN_BENCH_PREDICT_HORIZON", "5s");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "no traces in {}: make them with `cargo xtask traces` or set TERN_TRACES",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "trace"))
        .collect();
    traces.sort();
    let _ = writeln!(
        out,
        "## Prediction: `tern predict eval TRACE --train 0-50% --test 50-100% --horizon {horizon} --json`\n"
    );
    let _ = writeln!(
        out,
        "| trace | model | unit | precision | coverage | F1 | F1 (4K blocks) | read misses | fewer than last-horizon | re-sent avoided | learns events/s | trace events/s | state KiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for trace in &traces {
        let text = output(
            Command::new(bin)
                .args(["predict", "eval"])
                .arg(trace)
                .args(["--horizon", &horizon, "--json"]),
        );
        let name = trace
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                // The command's own message (its last line) says why.
                let why = format!("{e:#}");
                let why = why
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                let _ = writeln!(out, "| {name} | not evaluated: {} |", why.trim());
                continue;
            }
        };
        let r: serde_json::Value = serde_json::from_str(&text).context("eval JSON")?;
        verdicts.extend(eval_rows(out, &name, &r)?);
    }
    let _ = writeln!(
        out,
        "\nThe ensemble against the best naive forecast (F1 by 4 KiB blocks; the bar is the naive F1 plus a tenth of what it leaves to perfect):\n"
    );
    let _ = writeln!(
        out,
        "| trace | best naive forecast | its F1 | the bar | ensemble | target |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for v in verdicts {
        let _ = writeln!(out, "{v}");
    }
    let _ = writeln!(out);
    Ok(())
}

/// One trace's rows of the eval table; its verdict line, if it has one.
fn eval_rows(out: &mut String, name: &str, r: &serde_json::Value) -> Result<Option<String>> {
    let models = r["models"].as_array().context("models")?;
    let misses = |name: &str, unit: u64| {
        models
            .iter()
            .find(|m| m["name"] == name && num(&m["unit"]) == unit)
            .map(|m| num(&m["read_misses"]))
    };
    let fewer = |mine: u64, base: Option<u64>| match base {
        Some(b) if b > 0 => format!("{:.1}%", (b as f64 - mine as f64) / b as f64 * 100.0),
        _ => "-".to_owned(),
    };
    for m in models {
        let mine = num(&m["read_misses"]);
        let base = num(&m["resent_baseline_bytes"]);
        let unit = num(&m["unit"]);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {:.0} | {:.0} | {} |",
            m["name"].as_str().unwrap_or("?"),
            size(unit),
            pct(&m["precision"]),
            pct(&m["coverage"]),
            f1(&m["f1"]),
            f1(&m["f1_blocks"]),
            mine,
            num(&m["read_units"]),
            fewer(mine, misses("last-horizon", unit)),
            if base > 0 {
                format!(
                    "{:.1}%",
                    num(&m["resent_avoided_bytes"]) as f64 / base as f64 * 100.0
                )
            } else {
                "-".to_owned()
            },
            m["events_per_second"].as_f64().unwrap_or(0.0),
            r["history_events_per_second"].as_f64().unwrap_or(0.0),
            num(&m["state_bytes"]) >> 10,
        );
    }
    let t = &r["target"];
    if t.is_null() {
        return Ok(None);
    }
    Ok(Some(format!(
        "| {name} | {} at {} | {} | {} | {} at {} | {} |",
        t["naive"].as_str().unwrap_or("?"),
        size(num(&t["naive_unit"])),
        f1(&t["naive_f1_blocks"]),
        f1(&t["target_f1_blocks"]),
        f1(&t["f1_blocks"]),
        size(num(&t["unit"])),
        if t["met"].as_bool() == Some(true) {
            "met"
        } else {
            "**not met**"
        },
    )))
}

fn f1(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |f| format!("{f:.3}"))
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// A child stopped (resumed first, in case it is stopped) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Loop devices and a scratch directory, all removed on drop.
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
    pub(crate) devs: Vec<String>,
}

impl Scratch {
    /// A fresh directory `NAME-PID` under `TERN_BENCH_DIR` (default `/var/tmp`).
    pub(crate) fn new(name: &str) -> Result<Scratch> {
        let base = PathBuf::from(env_or("TERN_BENCH_DIR", "/var/tmp"));
        let dir = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch {
            dir,
            devs: Vec::new(),
        })
    }

    /// A loop device over a sparse `mib` MiB file `name` in the directory,
    /// with `losetup` options `extra`.
    pub(crate) fn loop_device(&mut self, name: &str, mib: u64, extra: &[&str]) -> Result<String> {
        let img = self.dir.join(name);
        run_cmd(
            Command::new("truncate")
                .args(["-s", &format!("{mib}M")])
                .arg(&img),
        )?;
        let dev = output(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(extra)
                .arg(&img),
        )?
        .trim()
        .to_owned();
        self.devs.push(dev.clone());
        Ok(dev)
    }

    pub(crate) fn detach(&mut self, dev: &str) {
        let _ = Command::new("losetup").args(["-d", dev]).status();
        self.devs.retain(|d| d != dev);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for dev in std::mem::take(&mut self.devs) {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `mib` MiB of random data at the start of `dev`, past the page cache.
pub(crate) fn fill_random(dev: &str, mib: u64) -> Result<()> {
    run_cmd(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={dev}"),
        "bs=1M",
        &format!("count={mib}"),
        "oflag=direct",
        "status=none",
    ]))
}

/// Certificates for `localhost` in `dir/pki`; returns the TLS directory.
pub(crate) fn lab_certs(bin: &Path, dir: &Path) -> Result<PathBuf> {
    run_cmd(
        Command::new(bin)
            .args(["certs", "init"])
            .arg(dir.join("pki"))
            .args(["--host", "localhost"]),
    )?;
    Ok(dir.join("pki/localhost"))
}

/// Records 5 s of `dev` with `tern trace` (into `dir/history.trace`) and
/// writes `tern predict`'s plan for the next 30 s to `dir/plan.json`;
/// returns the plan's path and how long the prediction took.
pub(crate) fn learn(bin: &Path, dev: &str, dir: &Path) -> Result<(PathBuf, f64)> {
    let trace = dir.join("history.trace");
    run_cmd(
        Command::new("timeout")
            .args(["-s", "KILL", "60"])
            .arg(bin)
            .args(["trace", "--device", dev, "--duration", "5s", "--out"])
            .arg(&trace)
            .stderr(Stdio::null()),
    )?;
    let plan = dir.join("plan.json");
    let started = Instant::now();
    run_cmd(
        Command::new(bin)
            .arg("predict")
            .arg(&trace)
            .args(["--horizon", "30s", "--out"])
            .arg(&plan),
    )?;
    Ok((plan, started.elapsed().as_secs_f64()))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn same(a: &Path, b: &Path) -> Result<()> {
    let st = Command::new("cmp")
        .arg(a)
        .arg(b)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!(
            "{} and {} differ after a migration",
            a.display(),
            b.display()
        );
    }
    Ok(())
}

#[expect(
    clippy::too_many_lines,
    reason = "one benchmark scenario read top to bottom"
)]
fn migrate_part(bin: &Path, out: &mut String) -> Result<()> {
    let mib: u64 = env_or("TERN_BENCH_PREDICT_MIB", "512").parse()?;
    let iops = env_or("TERN_BENCH_PREDICT_IOPS", "2000");
    let rate = env_or("TERN_BENCH_PREDICT_RATE", "100M");
    let runs: usize = env_or("TERN_BENCH_PREDICT_RUNS", "3").parse()?;
    let mut scratch = Scratch::new("tern-bench-predict")?;
    let dir = scratch.dir.clone();
    let dev = scratch.loop_device("src.img", mib, &[])?;
    // Half the disk holds data; the hot region is its first eighth.
    let hot = mib / 8;
    fill_random(&dev, mib / 2)?;
    let tls = lab_certs(bin, &dir)?;
    let fio = Proc(
        Command::new("fio")
            .args([
                "--name=hot",
                &format!("--filename={dev}"),
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--ioengine=psync",
                "--time_based",
                "--runtime=3600",
                &format!("--rate_iops={iops}"),
                &format!("--size={hot}M"),
                "--randrepeat=0",
                "--thread",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start fio")?,
    );
    let pid = fio.0.id().to_string();
    let (plan, predict_s) = learn(bin, &dev, &dir)?;

    let mut rows: Vec<(bool, serde_json::Value)> = Vec::new();
    for i in 0..runs * 2 {
        let with_plan = i % 2 == 1;
        let dst = dir.join("dst.img");
        let _ = std::fs::remove_file(&dst);
        let port = free_port()?;
        let agent = Proc(
            Command::new(bin)
                .args(["agent", "--role", "destination", "--image"])
                .arg(&dst)
                .args(["--size", &format!("{}", mib * MIB)])
                .args(["--grpc", &format!("127.0.0.1:{port}")])
                .arg("--tls-dir")
                .arg(&tls)
                .stderr(Stdio::null())
                .spawn()
                .context("start the destination agent")?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("the destination agent never listened");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cmd = Command::new("timeout");
        cmd.args(["-s", "KILL", "600"])
            .arg(bin)
            .args(["migrate", "--device", &dev])
            .args(["--to", &format!("127.0.0.1:{port}")])
            .arg("--tls-dir")
            .arg(&tls)
            .args(["--domain", "localhost", "--json", "--max-downtime", "100ms"])
            .args(["--max-rate", &rate])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--trace-out")
            .arg(dir.join("src.trace"))
            .args([
                "--pause",
                &format!("cmd:kill -STOP {pid};;kill -CONT {pid}"),
            ]);
        if with_plan {
            cmd.arg("--prefetch").arg(&plan);
        }
        let text = output(&mut cmd)?;
        let report: serde_json::Value =
            serde_json::from_str(text.lines().last().context("a report")?)?;
        if report["outcome"] != "cut over" {
            bail!("migration did not cut over: {report}");
        }
        // fio is stopped by the cutover: compare, then let it run again.
        same(Path::new(&dev), &dst)?;
        run_cmd(Command::new("kill").args(["-CONT", &pid]))?;
        drop(agent);
        rows.push((with_plan, report));
        // Let the workload settle again before the next run.
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(fio);

    let _ = writeln!(
        out,
        "## Migration with and without `--prefetch` ({mib} MiB source, {} MiB of data, fio 4 KiB randwrite at {iops} IOPS over the first {hot} MiB, `--max-rate {rate}`, medians of {runs} runs each, alternated; plan from 5 s of trace in {predict_s:.2} s)\n",
        mib / 2
    );
    let _ = writeln!(
        out,
        "| arm | sent MiB | first pass MiB | held back MiB | re-sent MiB | rounds | time to converge s | downtime ms | final delta KiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let mut resent = [0.0f64; 2];
    for (k, arm) in ["without prediction", "with --prefetch"].iter().enumerate() {
        let sel: Vec<&serde_json::Value> = rows
            .iter()
            .filter(|(w, _)| *w == (k == 1))
            .map(|(_, r)| r)
            .collect();
        let col =
            |f: &dyn Fn(&serde_json::Value) -> f64| median(sel.iter().map(|r| f(r)).collect());
        let m = |v: &serde_json::Value, key: &str| num(&v[key]) as f64;
        let re = col(&|r| {
            (m(r, "sent_bytes") - m(r, "first_round_bytes") - m(r, "held_back_bytes")).max(0.0)
        });
        resent[k] = re;
        let _ = writeln!(
            out,
            "| {arm} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.1} | {:.0} |",
            col(&|r| m(r, "sent_bytes")) / MIB as f64,
            col(&|r| m(r, "first_round_bytes")) / MIB as f64,
            col(&|r| m(r, "held_back_bytes")) / MIB as f64,
            re / MIB as f64,
            col(&|r| m(r, "rounds")),
            col(&|r| r["total_seconds"].as_f64().unwrap_or(0.0)),
            col(&|r| r["downtime_ms"].as_f64().unwrap_or(0.0)),
            col(&|r| m(r, "final_delta_bytes")) / 1024.0,
        );
    }
    if resent[0] > 0.0 {
        let _ = writeln!(
            out,
            "\nre-sent bytes with the prediction: {:.1}% fewer than without\n",
            (resent[0] - resent[1]) / resent[0] * 100.0
        );
    }
    drop(scratch);
    Ok(())
}
