//! `cargo xtask bench predict` part `postcopy`: a post-copy's demand fetches
//! with the predictor's push order against a plain ascending push, on a
//! program's own reads replayed against the destination.
//!
//! Per workload, on a loop device: the program runs; `tern trace` records
//! its history (`TERN_BENCH_POSTCOPY_SECONDS`, default 6 s) and then, as it
//! goes on with the page cache dropped (the destination's is empty), its
//! future (as long again); the program stops and the source is
//! left idle (as after a workload moved). `tern predict` makes a plan from
//! the history, and `tern predict --model lru` the naive one it must beat
//! (what the history touched, most recent first). Then, in turn without a
//! plan (disk order), with the naive plan and with the predictor's
//! (`--prefetch`), `tern migrate --mode postcopy --precopy none` switches
//! before any copy (every
//! unit missing) and pushes under `--max-rate` (default: the disk in about
//! the future's length), while the future's reads are replayed against the
//! destination's NBD export from the moment of the switch (`qemu-io` reading
//! each traced read at its traced time). A read of a unit still on the
//! source waits for a demand fetch: the requests that waited, the demands and
//! their waits come from the destination (the migration's report). The
//! destination is compared with the source after each run.
//!
//! Workloads: `fio` (4 KiB random reads and writes, 70 % reads, 80 % of them
//! in a tenth of the disk, in its middle), `fio-zipf` (the same with a zipf(1.1) skew) and
//! `sqlite` (ext4, a 200 MB table read at random by row id with some
//! updates, through python3's sqlite3). pgbench is not here yet.
//!
//! Environment: `TERN_BENCH_POSTCOPY_MIB` (default 256),
//! `TERN_BENCH_POSTCOPY_SECONDS`, `TERN_BENCH_POSTCOPY_RATE` (`--max-rate`),
//! `TERN_BENCH_POSTCOPY_WORKLOADS` (default `fio,fio-zipf,sqlite`),
//! `TERN_BENCH_PREDICT_RUNS` (runs per arm, default 3).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{MIB, Proc, Scratch, env_or, fill_random, free_port, lab_certs, median, same};
use crate::sh::{output, run as run_cmd};

/// The push orders compared: disk order, the naive forecast's, the predictor's.
const ARMS: [&str; 3] = ["ascending push", "naive (LRU) push", "predicted push"];

/// One workload's program, prepared on `dev` (mounted at `mnt` where it
/// needs a file system).
fn start_workload(name: &str, dev: &str, mnt: &Path, mib: u64) -> Result<Child> {
    let fio = |dist: &str| -> Result<Child> {
        fill_random(dev, mib)?;
        Command::new("fio")
            .args([
                "--name=moved",
                &format!("--filename={dev}"),
                "--rw=randrw",
                "--rwmixread=70",
                "--bs=4k",
                "--direct=1",
                "--ioengine=psync",
                "--time_based",
                "--runtime=3600",
                "--rate_iops=1000",
                &format!("--random_distribution={dist}"),
                "--randrepeat=0",
                "--thread",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start fio")
    };
    match name {
        // The hot tenth in the middle of the disk, not at its start (where
        // an ascending push would reach it first by chance).
        "fio" => fio("zoned:10/45:80/10:10/45"),
        "fio-zipf" => fio("zipf:1.1"),
        "sqlite" => {
            run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", dev]))?;
            std::fs::create_dir_all(mnt)?;
            run_cmd(Command::new("mount").arg(dev).arg(mnt))?;
            let db = mnt.join("db.sqlite");
            let script = format!(
                "import random, sqlite3, time\n\
                 db = sqlite3.connect('{db}')\n\
                 db.execute('create table t (id integer primary key, v blob)')\n\
                 db.executemany('insert into t values (?, randomblob(1000))', ((i,) for i in range(200000)))\n\
                 db.commit()\n\
                 open('/proc/sys/vm/drop_caches', 'w').write('3')\n\
                 print('ready', flush=True)\n\
                 while True:\n\
                 \x20   for _ in range(50):\n\
                 \x20       db.execute('select v from t where id = ?', (int(random.paretovariate(1.2) * 1000) % 200000,)).fetchall()\n\
                 \x20   db.execute('update t set v = randomblob(1000) where id = ?', (random.randrange(200000),))\n\
                 \x20   db.commit()\n\
                 \x20   time.sleep(0.02)\n",
                db = db.display()
            );
            let mut child = Command::new("python3")
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("start the sqlite workload")?;
            // Wait until the table is laid out and the cache dropped.
            let mut ready = String::new();
            let stdout = child.stdout.as_mut().context("its stdout")?;
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)?;
            if ready.trim() != "ready" {
                bail!("the sqlite workload did not start");
            }
            Ok(child)
        }
        other => bail!("TERN_BENCH_POSTCOPY_WORKLOADS: unknown workload {other:?}"),
    }
}

/// `qemu-io` commands that read what `trace` read, at its times.
fn replay_script(bin: &Path, trace: &Path, size: u64) -> Result<(String, u64)> {
    let csv = output(
        Command::new(bin)
            .args(["trace", "export", "--format", "csv"])
            .arg(trace),
    )?;
    let mut script = String::new();
    let mut reads = 0;
    let mut first = None;
    let mut slept_ms = 0u64;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 7 || f[0] != "block" || f[4] != "read" {
            continue;
        }
        let (Ok(ts), Ok(offset), Ok(len)) = (
            f[1].parse::<u64>(),
            f[5].parse::<u64>(),
            f[6].parse::<u64>(),
        ) else {
            continue;
        };
        if len == 0 || offset >= size {
            continue;
        }
        let at_ms = (ts - *first.get_or_insert(ts)) / 1_000_000;
        if at_ms > slept_ms {
            writeln!(script, "sleep {}", at_ms - slept_ms)?;
            slept_ms = at_ms;
        }
        writeln!(script, "read -q {offset} {}", len.min(size - offset))?;
        reads += 1;
    }
    Ok((script, reads))
}

/// What every run of one workload shares.
struct Lab<'a> {
    bin: &'a Path,
    dir: &'a Path,
    tls: &'a Path,
    dev: &'a str,
    size: u64,
    rate: &'a str,
}

/// One post-copy run: its report (the destination's figures in it).
fn run_once(lab: &Lab<'_>, plan: Option<&Path>, script: &str) -> Result<serde_json::Value> {
    let Lab {
        bin,
        dir,
        tls,
        dev,
        size,
        rate,
    } = *lab;
    let dst = dir.join("dst.img");
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(dir.join("dst.img.tern-postcopy"));
    let (grpc, nbd) = (free_port()?, free_port()?);
    let log = dir.join("agent.log");
    let _agent = Proc(
        Command::new(bin)
            .args(["agent", "--role", "destination", "--image"])
            .arg(&dst)
            .args([
                "--size",
                &size.to_string(),
                "--grpc",
                &format!("127.0.0.1:{grpc}"),
            ])
            .args(["--nbd", &format!("127.0.0.1:{nbd}"), "--tls-dir"])
            .arg(tls)
            .env("TERN_LOG", "warn,tern::rpc::server=info")
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start the destination agent")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        if Instant::now() > deadline {
            bail!("the destination agent never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", "600"])
        .arg(bin)
        .args([
            "migrate",
            "--device",
            dev,
            "--to",
            &format!("127.0.0.1:{grpc}"),
        ])
        .arg("--tls-dir")
        .arg(tls)
        .args(["--domain", "localhost", "--json", "--no-pause"])
        .args([
            "--mode",
            "postcopy",
            "--precopy",
            "none",
            "--max-rate",
            rate,
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(plan) = plan {
        cmd.arg("--prefetch").arg(plan);
    }
    let migration = cmd.spawn().context("start tern migrate")?;
    // The replay starts at the switch: the agent logs it as it arms.
    let deadline = Instant::now() + Duration::from_mins(1);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("post-copy armed")
    {
        if Instant::now() > deadline {
            bail!("the post-copy never switched");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut qemu_io = Command::new("qemu-io")
        .args(["-f", "raw", &format!("nbd://127.0.0.1:{nbd}/tern")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-io")?;
    std::io::Write::write_all(
        qemu_io.stdin.as_mut().context("qemu-io's stdin")?,
        script.as_bytes(),
    )?;
    drop(qemu_io.stdin.take());
    qemu_io.wait()?;
    let out = migration.wait_with_output()?;
    if !out.status.success() {
        bail!("tern migrate failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.lines().last().context("a report")?)?;
    same(Path::new(dev), &dst)?;
    Ok(report)
}

#[expect(
    clippy::too_many_lines,
    reason = "one benchmark scenario read top to bottom: record, predict, alternate the arms, tabulate"
)]
pub(super) fn postcopy_part(bin: &Path, out: &mut String) -> Result<()> {
    let mib: u64 = env_or("TERN_BENCH_POSTCOPY_MIB", "256").parse()?;
    let secs: u64 = env_or("TERN_BENCH_POSTCOPY_SECONDS", "6").parse()?;
    let rate = env_or(
        "TERN_BENCH_POSTCOPY_RATE",
        &format!("{}M", (mib / secs).max(1)),
    );
    let runs: usize = env_or("TERN_BENCH_PREDICT_RUNS", "3").parse()?;
    let workloads = env_or("TERN_BENCH_POSTCOPY_WORKLOADS", "fio,fio-zipf,sqlite");
    let _ = writeln!(
        out,
        "## Post-copy demand fetches: the predicted push against an ascending one and the naive forecast's ({mib} MiB source, `--mode postcopy --precopy none --max-rate {rate}`, the workload's next {secs} s of reads, from a cold cache, replayed on the destination from the switch; medians of {runs} runs per arm, in turn)\n"
    );
    let _ = writeln!(
        out,
        "| workload | arm | reads replayed | reads that waited | demands | wait p50 ms | wait p99 ms | all there after s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for workload in workloads.split(',').map(str::trim) {
        let mut scratch = Scratch::new("tern-bench-postcopy")?;
        let dir = scratch.dir.clone();
        let dev = scratch.loop_device("src.img", mib, &[])?;
        let mnt = dir.join("mnt");
        let tls = lab_certs(bin, &dir)?;
        eprintln!("bench predict postcopy: {workload}: recording");
        let program = Proc(start_workload(workload, &dev, &mnt, mib)?);
        std::thread::sleep(Duration::from_secs(1));
        let record = |name: &str| -> Result<PathBuf> {
            let trace = dir.join(name);
            run_cmd(
                Command::new("timeout")
                    .args(["-s", "KILL", "120"])
                    .arg(bin)
                    .args(["trace", "--device", &dev, "--quiet"])
                    .args(["--duration", &format!("{secs}s"), "--out"])
                    .arg(&trace)
                    .stderr(Stdio::null()),
            )?;
            Ok(trace)
        };
        let history = record("history.trace")?;
        // The destination starts with an empty page cache: so does the
        // future recorded here (what the workload reads there from disk).
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")?;
        let future = record("future.trace")?;
        drop(program);
        if mnt.exists() {
            let _ = Command::new("umount").arg(&mnt).status();
        }
        run_cmd(&mut Command::new("sync"))?;
        // The predictor's plan, and the naive forecast's (what the history
        // touched, most recent first) that it must beat.
        let plan_of = |model: &str| -> Result<PathBuf> {
            let plan = dir.join(format!("plan-{model}.json"));
            run_cmd(
                Command::new(bin)
                    .arg("predict")
                    .arg(&history)
                    .args(["--model", model, "--horizon", &format!("{}s", 2 * secs)])
                    .arg("--out")
                    .arg(&plan)
                    .stderr(Stdio::null()),
            )?;
            Ok(plan)
        };
        let plans = [None, Some(plan_of("lru")?), Some(plan_of("ensemble")?)];
        let (script, reads) = replay_script(bin, &future, mib * MIB)?;
        let mut arms: [Vec<serde_json::Value>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..runs * 3 {
            let arm = i % 3;
            eprintln!(
                "bench predict postcopy: {workload}: run {} {}",
                i / 3 + 1,
                ARMS[arm]
            );
            let lab = Lab {
                bin,
                dir: &dir,
                tls: &tls,
                dev: &dev,
                size: mib * MIB,
                rate: &rate,
            };
            let report = run_once(&lab, plans[arm].as_deref(), &script)?;
            arms[arm].push(report);
        }
        let mut waited = [0.0; 3];
        for (k, arm) in ARMS.iter().enumerate() {
            let col =
                |f: &dyn Fn(&serde_json::Value) -> f64| median(arms[k].iter().map(f).collect());
            let d = |r: &serde_json::Value, key: &str| {
                r["postcopy"]["destination"][key]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            };
            waited[k] = col(&|r| d(r, "waits"));
            let _ = writeln!(
                out,
                "| {workload} | {arm} | {reads} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} |",
                waited[k],
                col(&|r| d(r, "demands")),
                col(&|r| d(r, "wait_p50_us")) / 1e3,
                col(&|r| d(r, "wait_p99_us")) / 1e3,
                col(&|r| r["postcopy"]["push_seconds"].as_f64().unwrap_or(f64::NAN)),
            );
        }
        let fewer = |than: f64| {
            if than > 0.0 {
                format!("{:.0}%", (than - waited[2]) / than * 100.0)
            } else {
                "-".to_owned()
            }
        };
        verdicts.push(format!(
            "{workload}: the predicted push {} fewer reads waited than ascending, {} than the naive (LRU) order",
            fewer(waited[0]),
            fewer(waited[1]),
        ));
        scratch.detach(&dev);
        drop(scratch);
    }
    let _ = writeln!(
        out,
        "\n{} (target: at least 50 % fewer)\n",
        verdicts.join("; ")
    );
    Ok(())
}
