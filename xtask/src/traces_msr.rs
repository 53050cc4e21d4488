//! `cargo xtask traces --only msr-bpftrace`: a trace in a public format made
//! by a tracer that is not Tern's. bpftrace watches the loop device's
//! `block_rq_issue`/`block_rq_complete` tracepoints during a pgbench run and
//! prints one MSR Cambridge CSV line per request
//! (`Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`, times in
//! Windows FILETIME 100 ns ticks); `tern trace import --format msr` turns that
//! CSV into the trace the predictor is evaluated on. Tern's own tracer
//! records the same run beside it, so the import can be checked against it.

use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::Recorded;

/// Positional parameters: `$1` the device's kernel `dev_t`, `$2` the FILETIME
/// tick at `CLOCK_MONOTONIC` zero (bpftrace's `nsecs`), `$3` the host name,
/// `$4` the disk number. Requests are keyed by sector, the way blkparse pairs
/// issue and completion: the tracepoints carry no request pointer. Flushes
/// (no sectors) and discards have no MSR type and are only counted.
const SCRIPT: &str = r##"
BEGIN { printf("# tern-ready\n"); }
tracepoint:block:block_rq_issue /args->dev == $1 && args->nr_sector > 0/ {
  $op = 0;
  if (strncmp(args->rwbs, "R", 1) == 0) { $op = 1; }
  if (strncmp(args->rwbs, "W", 1) == 0 || strncmp(args->rwbs, "FW", 2) == 0) { $op = 2; }
  if ($op != 0) {
    @start[args->sector] = nsecs;
    @size[args->sector] = args->bytes;
    @op[args->sector] = $op;
    @issued = count();
  } else {
    @not_rw = count();
  }
}
tracepoint:block:block_rq_complete /args->dev == $1 && args->nr_sector > 0/ {
  $s = args->sector;
  $t0 = @start[$s];
  if ($t0 != 0) {
    $ts = $2 + $t0 / 100;
    $rt = (nsecs - $t0) / 100;
    if (@op[$s] == 1) {
      printf("%llu,%s,%d,Read,%llu,%u,%llu\n", $ts, str($3), $4, $s * 512, @size[$s], $rt);
    } else {
      printf("%llu,%s,%d,Write,%llu,%u,%llu\n", $ts, str($3), $4, $s * 512, @size[$s], $rt);
    }
    delete(@start[$s]);
    delete(@size[$s]);
    delete(@op[$s]);
    @completed = count();
  } else {
    @unmatched = count();
  }
}
END { clear(@start); clear(@size); clear(@op); }
"##;

/// 100 ns ticks from 1601-01-01 (FILETIME's epoch) to 1970-01-01.
const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// What bpftrace saw and printed.
#[derive(Debug, Default)]
pub(super) struct Summary {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// bpftrace's own counters (`@issued` etc.), printed at exit.
    pub counters: std::collections::BTreeMap<String, u64>,
    pub lost: u64,
}

/// A bpftrace child writing MSR lines into a CSV file.
pub(super) struct Bpftrace {
    child: Child,
    stdout: Option<JoinHandle<Result<Summary>>>,
    stderr: Option<JoinHandle<String>>,
}

fn clock_ns(clock: libc::clockid_t) -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into the one we own.
    if unsafe { libc::clock_gettime(clock, &raw mut ts) } != 0 {
        bail!("clock_gettime: {}", std::io::Error::last_os_error());
    }
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}

/// The FILETIME of `CLOCK_MONOTONIC` zero, in 100 ns ticks.
fn filetime_at_monotonic_zero() -> Result<u64> {
    let mono = clock_ns(libc::CLOCK_MONOTONIC)?;
    let wall = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos())?;
    Ok(FILETIME_UNIX_EPOCH + (wall - mono) / 100)
}

impl Bpftrace {
    /// Starts bpftrace on `dev` and returns once its probes are attached.
    pub(super) fn start(dev: &str, csv: &Path) -> Result<Bpftrace> {
        let rdev = std::fs::metadata(dev)
            .with_context(|| format!("cannot stat {dev}"))?
            .rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        // The block tracepoints carry the kernel's dev_t: major << 20 | minor.
        let kdev = (u64::from(major) << 20) | u64::from(minor);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .replace([',', '"'], "_");
        let host = if host.is_empty() { "tern".into() } else { host };
        let file = std::fs::File::create(csv)
            .with_context(|| format!("cannot create {}", csv.display()))?;
        let mut child = Command::new("bpftrace")
            .args(["-B", "line", "-e", SCRIPT])
            .arg(kdev.to_string())
            .arg(filetime_at_monotonic_zero()?.to_string())
            .arg(&host)
            .arg(minor.to_string())
            // Room for bursts (pages per CPU) and for every request in flight.
            .env("BPFTRACE_PERF_RB_PAGES", "4096")
            .env("BPFTRACE_MAP_KEYS_MAX", "65536")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start bpftrace (`cargo xtask setup` installs it)")?;
        let stdout = child.stdout.take().context("bpftrace has no stdout")?;
        let stderr = child.stderr.take().context("bpftrace has no stderr")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = std::thread::spawn(move || read_stdout(stdout, file, &ready_tx));
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let mut b = Bpftrace {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        // BEGIN runs once every probe is attached: its line means the
        // workload can start without a request going unseen.
        let t0 = Instant::now();
        loop {
            if ready_rx.try_recv().is_ok() {
                return Ok(b);
            }
            if let Some(status) = b.child.try_wait()? {
                let err = b.stderr_text();
                bail!(
                    "bpftrace exited before attaching ({status}): {}",
                    err.trim()
                );
            }
            if t0.elapsed() > Duration::from_mins(1) {
                b.kill();
                bail!("bpftrace did not attach within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// SIGINT: bpftrace detaches, drains its buffers and prints its counters.
    /// Fails if it reported lost events: the CSV would be missing requests.
    pub(super) fn stop(mut self) -> Result<Summary> {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                self.kill();
                bail!("bpftrace did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr_text();
        let summary = self
            .stdout
            .take()
            .context("bpftrace output already read")?
            .join()
            .map_err(|_| anyhow::anyhow!("the bpftrace output reader panicked"))??;
        if !status.success() {
            bail!("bpftrace exited with {status}: {}", err.trim());
        }
        let lost_in_stderr: u64 = err.lines().filter_map(lost_count).sum();
        if summary.lost + lost_in_stderr > 0 {
            bail!(
                "bpftrace lost {} events: the MSR CSV is incomplete",
                summary.lost + lost_in_stderr
            );
        }
        Ok(summary)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// bpftrace's "Lost N events" line.
fn lost_count(line: &str) -> Option<u64> {
    line.trim()
        .strip_prefix("Lost ")?
        .strip_suffix(" events")?
        .parse()
        .ok()
}

/// Copies CSV lines to `file`, keeps bpftrace's counters and lost-event reports.
fn read_stdout(
    stdout: std::process::ChildStdout,
    file: std::fs::File,
    ready: &mpsc::Sender<()>,
) -> Result<Summary> {
    let mut csv = BufWriter::new(file);
    let mut s = Summary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read bpftrace's output")?;
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            let f: Vec<&str> = line.split(',').collect();
            let size: u64 = f
                .get(5)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("bpftrace printed a malformed line: {line:?}"))?;
            match f.get(3).copied() {
                Some("Read") => (s.reads, s.read_bytes) = (s.reads + 1, s.read_bytes + size),
                Some("Write") => (s.writes, s.write_bytes) = (s.writes + 1, s.write_bytes + size),
                _ => bail!("bpftrace printed a malformed line: {line:?}"),
            }
            writeln!(csv, "{line}")?;
        } else if line == "# tern-ready" {
            let _ = ready.send(());
        } else if let Some(n) = lost_count(&line) {
            s.lost += n;
        } else if let Some((name, n)) = line.strip_prefix('@').and_then(|l| l.split_once(": "))
            && let Ok(n) = n.trim().parse()
        {
            s.counters.insert(name.to_string(), n);
        }
    }
    csv.flush()?;
    Ok(s)
}

/// Read requests, read bytes, write requests, write bytes of `trace`, from
/// its CSV export: only requests that carry data, as MSR's lines do (Tern's
/// tracer also records the zero-byte completions of a flush sequence as
/// writes; the predictor ignores them).
fn data_ops(tern: &Path, trace: &Path) -> Result<[u64; 4]> {
    let mut csv = trace.as_os_str().to_owned();
    csv.push(".compare.csv");
    let csv = std::path::PathBuf::from(csv);
    // `output` keeps the export's chatter off the terminal and its error in the message.
    crate::sh::output(
        Command::new(tern)
            .args(["trace", "export", "--format", "csv"])
            .arg(trace)
            .arg("--out")
            .arg(&csv),
    )?;
    let text = std::fs::read_to_string(&csv);
    let _ = std::fs::remove_file(&csv);
    let text = text.with_context(|| format!("cannot read {}", csv.display()))?;
    let mut ops = [0u64; 4];
    for line in text.lines().skip(1) {
        // kind,ts_ns,end_ns,target,op,offset,len,...
        let f: Vec<&str> = line.split(',').collect();
        let len: u64 = f.get(6).and_then(|l| l.parse().ok()).unwrap_or(0);
        if f.first() != Some(&"block") || len == 0 {
            continue;
        }
        let i = match f.get(4).copied() {
            Some("read") => 0,
            Some("write") => 2,
            _ => continue,
        };
        ops[i] += 1;
        ops[i + 1] += len;
    }
    Ok(ops)
}

/// `(a - b) / b` in percent, 0 when both are 0.
fn diff_pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 { 0.0 } else { 100.0 }
    } else {
        (a as f64 - b as f64) / b as f64 * 100.0
    }
}

/// The most the imported trace may differ from Tern's own in requests or
/// bytes per op before the recording is called unfaithful: the two tracers'
/// windows differ by the moments between their starts and stops.
const MAX_DIFF_PCT: f64 = 5.0;

pub(super) fn msr_bpftrace(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let csv = out.with_extension("csv");
    // Tern's own trace of the same run; not `.trace`, so the eval harness
    // (which takes every `*.trace`) does not count the run twice.
    let native = out.with_extension("native");
    let (pg, summary) = super::pgbench_with(tern, &native, secs, Some(&csv))?;
    let summary = summary.context("pgbench ran without bpftrace")?;
    let _ = std::fs::remove_file(out);
    crate::sh::run(
        Command::new(tern)
            .args(["trace", "import", "--format", "msr"])
            .arg(&csv)
            .arg("--out")
            .arg(out),
    )?;
    let imported = data_ops(tern, out)?;
    let own = data_ops(tern, &pg.file)?;
    let from_csv = [
        summary.reads,
        summary.read_bytes,
        summary.writes,
        summary.write_bytes,
    ];
    if imported != from_csv {
        bail!(
            "the imported trace holds {imported:?} (read requests, bytes, write requests, bytes) \
             but the CSV {from_csv:?}"
        );
    }
    let names = [
        "read requests",
        "read bytes",
        "write requests",
        "write bytes",
    ];
    let mut compare = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let d = diff_pct(imported[i], own[i]);
        eprintln!(
            "xtask traces: msr-bpftrace: {name}: bpftrace+import {} / tern trace {} ({d:+.2}%)",
            imported[i], own[i]
        );
        compare.insert(
            (*name).to_string(),
            serde_json::json!({"imported": imported[i], "tern_trace": own[i], "diff_pct": d}),
        );
    }
    let worst = (0..4)
        .map(|i| diff_pct(imported[i], own[i]).abs())
        .fold(0.0, f64::max);
    if worst > MAX_DIFF_PCT {
        bail!(
            "bpftrace and tern trace disagree by {worst:.1}% (more than {MAX_DIFF_PCT}%) on the \
             same run: see the lines above"
        );
    }
    Ok(Recorded {
        name: "msr-bpftrace",
        file: out.to_path_buf(),
        description: format!(
            "{} — recorded by bpftrace (block_rq_issue/complete, this loop device) as MSR \
             Cambridge CSV ({}), imported with `tern trace import --format msr`; Tern's own trace \
             of the same run is {}",
            pg.description,
            file_name(&csv),
            file_name(&native),
        ),
        config: serde_json::json!({
            "workload": pg.config,
            "csv": file_name(&csv),
            "tern_trace": file_name(&native),
            "bpftrace_counters": summary.counters,
            "bpftrace_lost": summary.lost,
            "compared_with_tern_trace": compare,
        }),
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}
