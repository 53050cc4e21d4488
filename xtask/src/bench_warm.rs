//! `cargo xtask bench predict` part `warm`: the destination's cache warm-up
//! (`tern agent --warm-plan`) measured live, against the same migration
//! without it.
//!
//! A source loop device full of random data serves a skewed random-read
//! workload (fio, 4 KiB `randread`, `direct=1`, `zoned:80/10:20/90`: 80 % of
//! the reads in the first tenth of the disk). `tern trace` records a few
//! seconds of it and `tern predict` makes a plan with read-hot extents. Then,
//! alternately without and with `--warm-plan`, the source is migrated into a
//! fresh destination agent whose image is its own loop device
//! (`--direct-io=on`, so a read the page cache misses is counted in
//! `/sys/block/loopN/stat` and is not served from the backing file's cache).
//!
//! Cold start: the pause hook (`--pause 'cmd:…'`) stops the source workload
//! and then drops the destination device's page cache (`blockdev
//! --flushbufs`: write back, then invalidate). It runs before the final delta
//! and the switch, so both arms reach the switch with the same cache: only
//! the final delta's pages (none here: the workload only reads). The warm-up
//! starts at the switch, as in production, and races the workload.
//!
//! As soon as `tern migrate` returns the same read workload (another random
//! seed) runs against the destination's NBD export for a fixed time; the
//! figures are the page-cache residency (mincore) of the warmed ranges and of
//! the pages the workload then read, at the moment it starts; the reads the
//! destination device served while it ran; fio's IOPS (in the first second,
//! from the iolog's time stamps, and overall) and latency; the
//! warm-up's bytes and seconds from the agent's log.
//!
//! Environment: `TERN_BENCH_WARM_MIB` (source size, default 512),
//! `TERN_BENCH_WARM_IOPS` (source workload rate, default 2000),
//! `TERN_BENCH_WARM_SECONDS` (post-cutover workload, default 5),
//! `TERN_BENCH_WARM_BUDGET` (`--warm-budget`, default `256M`), and
//! `TERN_BENCH_PREDICT_RUNS` (migrations per arm, default 3).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    MIB, Proc, Scratch, env_or, fill_random, free_port, lab_certs, learn, median, num, same,
};
use crate::sh::{output, run as run_cmd};

/// The workload's skew: 80 % of the reads in the first 10 % of the disk, the
/// rest spread over the other 90 %. A fixed hot region (not fio's zipf, whose
/// hot blocks are hashed with the random seed) keeps the hot set the same
/// across runs while each run draws its own sequence.
const DISTRIBUTION: &str = "zoned:80/10:20/90";

/// `(read requests, read bytes)` a block device has completed.
fn disk_reads(dev: &str) -> Result<(u64, u64)> {
    let name = Path::new(dev)
        .file_name()
        .context("a device path")?
        .to_string_lossy();
    let path = format!("/sys/block/{name}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{path}: {text:?}"))?;
    if f.len() < 3 {
        bail!("{path}: too few fields in {text:?}");
    }
    Ok((f[0], f[2] * 512))
}

/// Which pages of `dev` are in the page cache (one bool per page).
fn resident(dev: &str, len: u64, page: u64) -> Result<Vec<bool>> {
    let file = std::fs::File::open(dev).with_context(|| format!("cannot open {dev}"))?;
    let len = len as usize;
    // SAFETY: a read-only shared mapping of the first `len` bytes of an open
    // device; it is never dereferenced (mincore only looks the pages up in
    // the page cache, without faulting them in) and is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot mmap {dev}"));
    }
    let mut vec = vec![0u8; len.div_ceil(page as usize)];
    // SAFETY: `addr..addr + len` is the mapping made above and `vec` has one
    // byte per page of it.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps the mapping made above; nothing refers to it after this.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err).with_context(|| format!("mincore on {dev}"));
    }
    Ok(vec.iter().map(|b| b & 1 == 1).collect())
}

/// The ranges the agent warms: the plan's extents with `p_read >= 0.5`, most
/// likely first, cut at `budget` bytes (what `Prediction::read_hot` does for
/// `--warm-plan`; the figures only need the set, not the order).
fn read_hot(plan: &serde_json::Value, budget: u64) -> Result<Vec<(u64, u64)>> {
    let extents = plan["extents"].as_array().context("plan without extents")?;
    let mut hot: Vec<(f64, u64, u64)> = extents
        .iter()
        .filter_map(|e| {
            let p = e["p_read"].as_f64()?;
            (p >= 0.5).then(|| (p, num(&e["offset"]), num(&e["len"])))
        })
        .collect();
    hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = budget;
    let mut out = Vec::new();
    for (_, offset, len) in hot {
        if left == 0 {
            break;
        }
        let len = len.min(left);
        out.push((offset, offset + len));
        left -= len;
    }
    Ok(out)
}

/// Share of the pages in `pages` resident in `map`.
fn share(map: &[bool], pages: impl Iterator<Item = u64>) -> f64 {
    let (mut n, mut hit) = (0u64, 0u64);
    for p in pages {
        n += 1;
        hit += u64::from(map.get(p as usize).copied().unwrap_or(false));
    }
    if n == 0 { 0.0 } else { hit as f64 / n as f64 }
}

/// `(bytes, seconds)` of the agent's warm-up, from its log line.
fn warm_log(log: &Path) -> Option<(u64, f64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("warmed the predicted read-hot extents"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|v| v.trim_end_matches(|c: char| !c.is_ascii_digit()).to_owned())
    };
    Some((
        field("bytes=")?.parse().ok()?,
        field("seconds=")?.parse().ok()?,
    ))
}

/// One migration and the destination workload after it.
struct Run {
    with_plan: bool,
    warm_bytes: u64,
    warm_seconds: f64,
    hot_resident: f64,
    read_resident: f64,
    disk_mib: f64,
    disk_requests: f64,
    iops: f64,
    iops_first: f64,
    p50_us: f64,
    p99_us: f64,
    converge_s: f64,
}

#[expect(
    clippy::too_many_lines,
    reason = "one benchmark scenario read top to bottom"
)]
pub(super) fn warm_part(bin: &Path, out: &mut String) -> Result<()> {
    let mib: u64 = env_or("TERN_BENCH_WARM_MIB", "512").parse()?;
    let iops = env_or("TERN_BENCH_WARM_IOPS", "2000");
    let seconds: u64 = env_or("TERN_BENCH_WARM_SECONDS", "5").parse()?;
    let budget_text = env_or("TERN_BENCH_WARM_BUDGET", "256M");
    let budget = parse_mib(&budget_text)?;
    let runs: usize = env_or("TERN_BENCH_PREDICT_RUNS", "3").parse()?;
    // SAFETY: sysconf reads a constant of the running system.
    let page =
        u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).context("the page size")?;
    let mut scratch = Scratch::new("tern-bench-warm")?;
    let dir = scratch.dir.clone();
    let src = scratch.loop_device("src.img", mib, &[])?;
    fill_random(&src, mib)?;
    let tls = lab_certs(bin, &dir)?;
    let reader = |filename: &str, extra: &[String]| {
        let mut c = Command::new("fio");
        c.args([
            "--name=hot",
            filename,
            "--rw=randread",
            "--bs=4k",
            &format!("--random_distribution={DISTRIBUTION}"),
            &format!("--size={mib}M"),
            "--randrepeat=0",
            "--iodepth=1",
        ])
        .args(extra);
        c
    };
    let fio = Proc(
        reader(
            &format!("--filename={src}"),
            &[
                "--direct=1".into(),
                "--ioengine=psync".into(),
                "--time_based".into(),
                "--runtime=3600".into(),
                format!("--rate_iops={iops}"),
                "--thread".into(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start fio")?,
    );
    let pid = fio.0.id().to_string();
    let (plan, _) = learn(bin, &src, &dir)?;
    let plan_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).context("read the plan")?)
            .context("plan JSON")?;
    let hot = read_hot(&plan_json, budget)?;
    let hot_bytes: u64 = hot.iter().map(|(a, b)| b - a).sum();
    if hot_bytes == 0 {
        bail!(
            "the plan {} has no read-hot extents (p_read >= 0.5): the source workload's reads were not predicted",
            plan.display()
        );
    }
    // How much of the warm-up lies in the workload's hot tenth.
    let zone_end = mib * MIB / 10;
    let in_zone: u64 = hot
        .iter()
        .map(|&(a, b)| b.min(zone_end).saturating_sub(a))
        .sum();
    let hot_pages: Vec<u64> = hot
        .iter()
        .flat_map(|&(a, b)| (a / page)..b.div_ceil(page))
        .collect();

    let mut rows: Vec<Run> = Vec::new();
    for i in 0..runs * 2 {
        let with_plan = i % 2 == 1;
        let run_dir = dir.join(format!("run{i}"));
        std::fs::create_dir_all(&run_dir)?;
        // A fresh destination per run: a new sparse file on its own loop
        // device, so every run starts from the same empty image.
        let dst = scratch.loop_device(&format!("run{i}/dst.img"), mib, &["--direct-io=on"])?;
        let dio_path = format!("/sys/block/{}/loop/dio", dst.trim_start_matches("/dev/"));
        if !std::fs::read_to_string(&dio_path).is_ok_and(|s| s.trim() == "1") {
            bail!(
                "{dst} did not take --direct-io=on ({dio_path}); its reads would be served from the backing file's cache and not counted: set TERN_BENCH_DIR to a file system with O_DIRECT"
            );
        }
        // The agent opens the device through a link in the run directory so
        // its epoch file lands there, not in /dev.
        let link = run_dir.join("dst.dev");
        std::os::unix::fs::symlink(&dst, &link)?;
        let grpc = free_port()?;
        let nbd = free_port()?;
        let log = run_dir.join("agent.log");
        let mut agent_cmd = Command::new(bin);
        agent_cmd
            .args(["agent", "--role", "destination", "--image"])
            .arg(&link)
            .args(["--size", &format!("{}", mib * MIB)])
            .args(["--grpc", &format!("127.0.0.1:{grpc}")])
            .args(["--nbd", &format!("127.0.0.1:{nbd}")])
            .arg("--tls-dir")
            .arg(&tls)
            // The warm-up reports its bytes and seconds at info level.
            .env("TERN_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log)?);
        if with_plan {
            agent_cmd
                .arg("--warm-plan")
                .arg(&plan)
                .args(["--warm-budget", &budget_text]);
        }
        let agent = Proc(agent_cmd.spawn().context("start the destination agent")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the destination agent never listened (log: {})",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = output(
            Command::new("timeout")
                .args(["-s", "KILL", "600"])
                .arg(bin)
                .args(["migrate", "--device", &src])
                .args(["--to", &format!("127.0.0.1:{grpc}")])
                .arg("--tls-dir")
                .arg(&tls)
                .args(["--domain", "localhost", "--json", "--max-downtime", "100ms"])
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--trace-out")
                .arg(dir.join("src.trace"))
                .args([
                    "--pause",
                    &format!(
                        "cmd:kill -STOP {pid} && blockdev --flushbufs {dst};;kill -CONT {pid}"
                    ),
                ]),
        )?;
        let report: serde_json::Value =
            serde_json::from_str(text.lines().last().context("a report")?)?;
        if report["outcome"] != "cut over" {
            bail!("migration did not cut over: {report}");
        }
        // The workload moves to the destination at once, as a resumed VM
        // would: the residency is what its first read finds.
        let map = resident(&dst, mib * MIB, page)?;
        let before = disk_reads(&dst)?;
        let iolog = run_dir.join("reads.iolog");
        let fio_out = output(&mut reader(
            "--ioengine=nbd",
            &[
                format!("--uri=nbd://127.0.0.1:{nbd}/tern"),
                "--time_based".into(),
                format!("--runtime={seconds}"),
                format!("--write_iolog={}", iolog.display()),
                "--output-format=json".into(),
            ],
        ))?;
        let after = disk_reads(&dst)?;
        // fio may print notes before its JSON.
        let fio_json: serde_json::Value =
            serde_json::from_str(fio_out.get(fio_out.find('{').unwrap_or(0)..).unwrap_or(""))
                .with_context(|| format!("fio's JSON on the destination: {fio_out:.200}"))?;
        let read = &fio_json["jobs"][0]["read"];
        let pct = &read["clat_ns"]["percentile"];
        // `time_us file read offset length` (fio's iolog version 3).
        let reads: Vec<(u64, u64)> = std::fs::read_to_string(&iolog)
            .with_context(|| format!("cannot read {}", iolog.display()))?
            .lines()
            .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [us, _, "read", offset, _] => Some((us.parse().ok()?, offset.parse().ok()?)),
                _ => None,
            })
            .collect();
        let Some(&(first_us, _)) = reads.first() else {
            bail!("fio logged no reads in {}", iolog.display());
        };
        let read_pages: HashSet<u64> = reads.iter().map(|&(_, o)| o / page).collect();
        // The warm-up's effect is largest while it runs: the first second.
        let first_second = reads
            .iter()
            .filter(|&&(us, _)| us < first_us + 1_000_000)
            .count();
        // The warm-up may outlast the workload window; give it time to log.
        let (warm_bytes, warm_seconds) = if with_plan {
            let deadline = Instant::now() + Duration::from_mins(1);
            loop {
                if let Some(w) = warm_log(&log) {
                    break w;
                }
                if Instant::now() > deadline {
                    bail!("the agent never logged its warm-up ({})", log.display());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            (0, 0.0)
        };
        let _ = writeln!(
            std::io::stderr(),
            "warm run {i} ({}): {warm_bytes} B warmed in {warm_seconds:.2} s, {} disk reads, {:.0} IOPS ({first_second} in the first second)",
            if with_plan {
                "with --warm-plan"
            } else {
                "without"
            },
            after.0 - before.0,
            read["iops"].as_f64().unwrap_or(0.0),
        );
        rows.push(Run {
            with_plan,
            warm_bytes,
            warm_seconds,
            hot_resident: share(&map, hot_pages.iter().copied()),
            read_resident: share(&map, read_pages.iter().copied()),
            disk_mib: (after.1 - before.1) as f64 / MIB as f64,
            disk_requests: (after.0 - before.0) as f64,
            iops: read["iops"].as_f64().unwrap_or(0.0),
            iops_first: first_second as f64,
            p50_us: pct["50.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            p99_us: pct["99.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            converge_s: report["total_seconds"].as_f64().unwrap_or(0.0),
        });
        drop(agent);
        same(Path::new(&src), Path::new(&dst))?;
        scratch.detach(&dst);
        std::fs::remove_dir_all(&run_dir)?;
        // The source workload runs again for the next migration.
        run_cmd(Command::new("kill").args(["-CONT", &pid]))?;
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(fio);

    let _ = writeln!(
        out,
        "## Destination warm-up at cutover: without and with `--warm-plan` ({mib} MiB source of random data, fio 4 KiB randread `{DISTRIBUTION}` at {iops} IOPS on the source, plan from 5 s of trace: {:.1} MiB read-hot within `--warm-budget {budget_text}`, {:.1} MiB of it in the hot tenth; then the same reads over NBD for {seconds} s at queue depth 1; medians of {runs} runs each, alternated)\n",
        hot_bytes as f64 / MIB as f64,
        in_zone as f64 / MIB as f64,
    );
    let _ = writeln!(
        out,
        "| arm | warm-up MiB | warm-up s | warmed ranges resident at start | pages read resident at start | disk reads MiB | disk read requests | IOPS first 1 s | IOPS | p50 µs | p99 µs | migration s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut disk = [0.0f64; 2];
    let mut iops_med = [0.0f64; 2];
    for (k, arm) in ["without warm-up", "with --warm-plan"].iter().enumerate() {
        let sel: Vec<&Run> = rows.iter().filter(|r| r.with_plan == (k == 1)).collect();
        let col = |f: &dyn Fn(&Run) -> f64| median(sel.iter().map(|r| f(r)).collect());
        disk[k] = col(&|r| r.disk_requests);
        iops_med[k] = col(&|r| r.iops);
        let _ = writeln!(
            out,
            "| {arm} | {:.1} | {:.2} | {:.1}% | {:.1}% | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            col(&|r| r.warm_bytes as f64) / MIB as f64,
            col(&|r| r.warm_seconds),
            col(&|r| r.hot_resident) * 100.0,
            col(&|r| r.read_resident) * 100.0,
            col(&|r| r.disk_mib),
            disk[k],
            col(&|r| r.iops_first),
            iops_med[k],
            col(&|r| r.p50_us),
            col(&|r| r.p99_us),
            col(&|r| r.converge_s),
        );
    }
    if disk[0] > 0.0 && iops_med[0] > 0.0 {
        let _ = writeln!(
            out,
            "\nwith the warm-up: {:.1}% fewer disk read requests in the first {seconds} s (the warm-up's own included), IOPS {:+.1}%\n",
            (disk[0] - disk[1]) / disk[0] * 100.0,
            (iops_med[1] - iops_med[0]) / iops_med[0] * 100.0,
        );
    }
    drop(scratch);
    Ok(())
}

/// `256M`-style sizes (K, M, G suffixes, binary) as bytes.
fn parse_mib(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("TERN_BENCH_WARM_BUDGET={text:?}: write e.g. 256M"))?;
    Ok(n << shift)
}
