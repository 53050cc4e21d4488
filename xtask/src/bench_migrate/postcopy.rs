//! The live part's post-copy rows: while the destination fetches what it
//! lacks, the moved workload reads there (fio's NBD engine, 4 KiB random
//! reads inside the destination's namespace, from the moment of the
//! switch until the migration ends), so the demand fetches and what they
//! cost a reader are measured, not only the switch.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Netns;

/// What the destination's reader saw.
pub(super) struct Reads {
    pub(super) iops: f64,
    /// Completion latency percentiles of its reads (ms).
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

/// A reader of the destination's export, started once the agent's log
/// says the post-copy was armed (at the switch); stopped when `done` is set.
pub(super) struct Reader {
    done: Arc<AtomicBool>,
    thread: JoinHandle<Result<Option<Reads>>>,
}

impl Reader {
    pub(super) fn start(ns: &Netns, agent_log: &Path, out: PathBuf, rate: u32) -> Reader {
        let done = Arc::new(AtomicBool::new(false));
        let ns = ns.name.clone();
        let log = agent_log.to_path_buf();
        // The log is shared by every agent of the run: wait for one more.
        let before = armed(&log);
        let stop = Arc::clone(&done);
        let thread =
            std::thread::spawn(move || read_after_switch(&ns, &log, before, &out, rate, &stop));
        Reader { done, thread }
    }

    /// Stops it; `None` when the post-copy never began.
    pub(super) fn finish(self) -> Result<Option<Reads>> {
        self.done.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the destination reader's thread panicked"))?
    }
}

/// Post-copies armed so far, by the agents' log.
fn armed(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |l| l.matches("post-copy armed").count())
}

fn read_after_switch(
    ns: &str,
    log: &Path,
    before: usize,
    out: &Path,
    rate: u32,
    done: &AtomicBool,
) -> Result<Option<Reads>> {
    while armed(log) <= before {
        if done.load(Ordering::Acquire) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let started = Instant::now();
    let mut fio = Command::new("ip")
        .args(["netns", "exec", ns, "fio", "--name=moved", "--ioengine=nbd"])
        .args([
            "--uri=nbd://127.0.0.1:10809/tern",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=1",
            "--time_based",
            "--runtime=600",
            "--eta=never",
            "--output-format=json",
        ])
        // The moved workload: at most its rate on the source (unlimited: 1000).
        .arg(format!(
            "--rate_iops={}",
            if rate == 0 { 1000 } else { rate }
        ))
        .arg(format!("--output={}", out.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start fio on the destination's export")?;
    while !done.load(Ordering::Acquire) {
        if let Some(status) = fio.try_wait()? {
            bail!("fio on the destination's export exited early ({status})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // fio ends its jobs and writes its report on SIGINT.
    let pid = fio.id().to_string();
    let _ = Command::new("pkill").args(["-INT", "-P", &pid]).status();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    fio.wait()?;
    if started.elapsed() < Duration::from_millis(100) {
        return Ok(None);
    }
    parse(&std::fs::read_to_string(out).context("fio's report")?).map(Some)
}

fn parse(report: &str) -> Result<Reads> {
    // fio may print notes before its JSON.
    let json = report.find('{').map_or(report, |at| &report[at..]);
    let v: serde_json::Value = serde_json::from_str(json).context("parse fio's JSON report")?;
    let read = &v["jobs"][0]["read"];
    let pct = |p: &str| {
        read["clat_ns"]["percentile"][p]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e6
    };
    Ok(Reads {
        iops: read["iops"].as_f64().unwrap_or(f64::NAN),
        p50_ms: pct("50.000000"),
        p99_ms: pct("99.000000"),
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_fio_read_latency_percentiles_after_its_notes() {
        let report = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs":[{"read":{"iops":998.5,"clat_ns":{"percentile":{"50.000000":120000,"99.000000":2500000}}}}]}"#;
        let r = parse(report).expect("parse");
        assert!((r.iops - 998.5).abs() < 1e-9);
        assert!((r.p50_ms - 0.12).abs() < 1e-9 && (r.p99_ms - 2.5).abs() < 1e-9);
    }
}
