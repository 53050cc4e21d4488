//! `cargo xtask bench migrate`: `tern migrate` against the usual ways of
//! moving a disk image, on the same images in one run.
//!
//! 1. Full copy to a fresh destination: `tern migrate` (source a loop device,
//!    idle, `--no-pause`) into `tern agent --role destination` over loopback
//!    mutual TLS; `qemu-img convert` into a `qemu-nbd` export; local
//!    `rsync --inplace`.
//! 2. Delta sync after a random change of 64 KiB blocks (written once through
//!    the loop device): `tern migrate` again to the destination that holds the
//!    previous copy, and `rsync --inplace --no-whole-file`.
//! 3. Live migration under fio 4 KiB random writes at several rates, through
//!    a veth pair into a network namespace shaped to 1 Gbit/s by `tbf`; the
//!    destination agent runs in the namespace, fio is paused for the cutover
//!    with `--pause 'cmd:kill -STOP PID;;kill -CONT PID'` (fio runs its job
//!    as a thread, so one stopped process is the whole workload). A
//!    bystander fio reads 1000 4 KiB blocks a second in the writer's
//!    cgroups: its read rate during the migration against the warm-up's is
//!    what a throttle costs what it is not aimed at.
//! 4. A real file system (`fs.rs`): an ext4 image filled from this machine's
//!    `/usr` and a clone of this repository to about 75 %, copied whole by
//!    `tern migrate` and by `qemu-img convert` into `qemu-nbd`, over loopback
//!    and over the 1 Gbit/s link into the namespace; `qemu-img convert -c`
//!    to a local qcow2 as the compression reference.
//! 5. Small extents (`small.rs`): scattered 4 KiB blocks changed, one delta
//!    sync with `--region-size 4K`, against `rsync --no-whole-file`; and one
//!    delta round of as many blocks known from the tracer (a live
//!    migration's final delta).
//!
//! Figures, not pass/fail; but every copy is compared byte for byte with
//! `cmp`, and a difference fails the benchmark. The page cache is dropped
//! before each timed copy and every time includes a final `sync`.
//!
//! Environment: `TERN_BENCH_MIGRATE_MIB` (parts 1–2 image, default 4096),
//! `TERN_BENCH_MIGRATE_LIVE_MIB` (part 3 image, default 1024),
//! `TERN_BENCH_MIGRATE_RATES` (fio IOPS, 0 for unlimited, default
//! `200,1000,5000,20000,0`), `TERN_BENCH_MIGRATE_CONVERGE` (the live part's
//! modes, each run at every rate: `fail`, `throttle` (its writes),
//! `throttle-cpu` (its CPU), `postcopy`, `auto` (`--mode auto`); default
//! `fail,throttle,throttle-cpu,postcopy,auto`),
//! `TERN_BENCH_MIGRATE_CHANGE_PCT` (default 5),
//! `TERN_BENCH_MIGRATE_DOWNTIME` (`--max-downtime`, default `50ms`),
//! `TERN_BENCH_MIGRATE_WARMUP` (seconds fio writes before the live
//! migration starts, default 2),
//! `TERN_BENCH_MIGRATE_LIVE_REGION` (`--region-size` of the live part,
//! default tern's own choice),
//! `TERN_BENCH_MIGRATE_FS_MIB` (part 4 image, default 2048),
//! `TERN_BENCH_MIGRATE_FS_ROUNDS` (part 4 copies per tool and link, the
//! tools alternating; the median is shown, default 3),
//! `TERN_BENCH_MIGRATE_SMALL_MIB` (part 5 image, default 2048),
//! `TERN_BENCH_MIGRATE_SMALL_EXTENTS` (part 5 changed 4 KiB blocks, default 50000),
//! `TERN_BENCH_MIGRATE_PARTS` (any of `copy,delta,fs,small,live`, default
//! all; delta needs copy),
//! `TERN_BENCH_MIGRATE_PEERS_ONLY=1` (skip the `tern migrate` calls: checks
//! the peers and the network set-up alone), `TERN_BENCH_DIR` (default
//! `/var/tmp`, which must be a real disk file system), `TERN_BENCH_KEEP=1`
//! (keep the images and logs).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{output, run as run_cmd};

mod fs;
mod postcopy;
mod small;
mod staged;

const MIB: u64 = 1 << 20;
const CHANGE_BLOCK: u64 = 64 << 10;
/// Addresses of the veth pair for part 3 (host side, namespace side).
const HOST_ADDR: &str = "10.213.77.1";
const NS_ADDR: &str = "10.213.77.2";
const LINK_RATE: &str = "1gbit";
const NETNS: NetnsSpec = NetnsSpec {
    tag: "mig",
    veth: "tbm",
    host_addr: HOST_ADDR,
    ns_addr: NS_ADDR,
};

struct Config {
    mib: u64,
    live_mib: u64,
    rates: Vec<u32>,
    /// `--converge` modes of the live part, each run at every rate.
    converge: Vec<String>,
    change_pct: f64,
    downtime: String,
    parts: Vec<String>,
    peers_only: bool,
    fs_mib: u64,
    fs_rounds: u32,
    small_mib: u64,
    small_extents: u64,
    /// The staged part's ext4 image (MiB).
    staged_mib: u64,
    /// Seconds fio writes before `tern migrate` starts (live part).
    warmup_secs: u64,
    /// `--region-size` for the live part; `None`: tern's default.
    live_region: Option<String>,
}

const PARTS: [&str; 6] = ["copy", "delta", "fs", "small", "live", "staged"];
/// The live part's modes.
const LIVE_MODES: [&str; 5] = ["fail", "throttle", "throttle-cpu", "postcopy", "auto"];

impl Config {
    fn from_env() -> Result<Config> {
        let rates: String = env_or(
            "TERN_BENCH_MIGRATE_RATES",
            "200,1000,5000,20000,0".to_owned(),
        )?;
        let rates = rates
            .split(',')
            .map(|r| r.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .context("TERN_BENCH_MIGRATE_RATES: comma-separated IOPS")?;
        let converge: String = env_or("TERN_BENCH_MIGRATE_CONVERGE", LIVE_MODES.join(","))?;
        let converge: Vec<String> = converge.split(',').map(|c| c.trim().to_owned()).collect();
        if let Some(c) = converge.iter().find(|c| !LIVE_MODES.contains(&c.as_str())) {
            bail!(
                "TERN_BENCH_MIGRATE_CONVERGE: unknown mode {c:?}; choose from {}",
                LIVE_MODES.join(", ")
            );
        }
        let parts: String = env_or("TERN_BENCH_MIGRATE_PARTS", PARTS.join(","))?;
        let parts: Vec<String> = parts.split(',').map(|p| p.trim().to_owned()).collect();
        if let Some(p) = parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
            bail!(
                "TERN_BENCH_MIGRATE_PARTS: unknown part {p:?}; choose from {}",
                PARTS.join(", ")
            );
        }
        if parts.iter().any(|p| p == "delta") && !parts.iter().any(|p| p == "copy") {
            bail!("TERN_BENCH_MIGRATE_PARTS: delta needs copy (it syncs onto the copies)");
        }
        let mib = env_or("TERN_BENCH_MIGRATE_MIB", 4096)?;
        let live_mib = env_or("TERN_BENCH_MIGRATE_LIVE_MIB", 1024)?;
        let fs_mib = env_or("TERN_BENCH_MIGRATE_FS_MIB", 2048)?;
        let small_mib = env_or("TERN_BENCH_MIGRATE_SMALL_MIB", 2048)?;
        let small_extents = env_or("TERN_BENCH_MIGRATE_SMALL_EXTENTS", 50_000)?;
        if mib < 2 || live_mib < 2 || small_mib < 2 {
            bail!("image sizes must be at least 2 MiB");
        }
        let fs_rounds = env_or("TERN_BENCH_MIGRATE_FS_ROUNDS", 3)?;
        if fs_rounds == 0 {
            bail!("TERN_BENCH_MIGRATE_FS_ROUNDS: at least 1");
        }
        if fs_mib < 64 {
            bail!("TERN_BENCH_MIGRATE_FS_MIB: an ext4 image needs at least 64 MiB");
        }
        // Distinct blocks: at most every 4 KiB block of the image.
        if small_extents == 0 || small_extents > small_mib * MIB / small::BLOCK {
            bail!(
                "TERN_BENCH_MIGRATE_SMALL_EXTENTS must be from 1 to {} (the 4 KiB blocks of a \
                 {small_mib} MiB image)",
                small_mib * MIB / small::BLOCK
            );
        }
        Ok(Config {
            mib,
            live_mib,
            rates,
            converge,
            change_pct: env_or("TERN_BENCH_MIGRATE_CHANGE_PCT", 5.0)?,
            downtime: env_or("TERN_BENCH_MIGRATE_DOWNTIME", "50ms".to_owned())?,
            parts,
            peers_only: env_or("TERN_BENCH_MIGRATE_PEERS_ONLY", 0u8)? != 0,
            warmup_secs: env_or("TERN_BENCH_MIGRATE_WARMUP", 2)?,
            live_region: std::env::var("TERN_BENCH_MIGRATE_LIVE_REGION")
                .ok()
                .filter(|r| !r.is_empty()),
            fs_mib,
            fs_rounds,
            small_mib,
            small_extents,
            staged_mib: env_or("TERN_BENCH_MIGRATE_STAGED_MIB", 1024)?,
        })
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

pub fn run(tern_bin: &Path) -> Result<()> {
    crate::sh::require_root("cargo xtask bench migrate (loop devices, eBPF, namespaces)")?;
    for tool in [
        "losetup",
        "qemu-img",
        "qemu-nbd",
        "rsync",
        "cmp",
        "fio",
        "ip",
        "tc",
        "mkfs.ext4",
        "mount",
        "git",
    ] {
        require(tool)?;
    }
    if !tern_bin.exists() {
        bail!(
            "{} does not exist; build it first (cargo build --release -p tern)",
            tern_bin.display()
        );
    }
    let cfg = Config::from_env()?;
    catch_interrupts();
    let base =
        std::env::var_os("TERN_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = TempDir::create(base.join(format!("tern-bench-migrate-{}", std::process::id())))?;
    let certs = dir.path.join("certs");
    run_cmd(
        Command::new(tern_bin)
            .args(["certs", "init"])
            .arg(&certs)
            .args(["--host", "localhost", "--host", NS_ADDR])
            .stderr(Stdio::null()),
    )?;
    let b = Bench {
        tern: tern_bin,
        dir: &dir.path,
        certs: &certs,
        cfg: &cfg,
    };
    let mut tables = Vec::new();
    if cfg.wants("copy") {
        let (copy, delta) = b.copy_and_delta()?;
        tables.push(copy);
        tables.extend(delta);
    }
    if cfg.wants("fs") {
        tables.push(b.fs()?);
    }
    if cfg.wants("small") {
        tables.push(b.small()?);
    }
    if cfg.wants("live") {
        tables.push(b.live()?);
    }
    if cfg.wants("staged") {
        tables.push(b.staged()?);
    }
    let mut out = std::io::stdout().lock();
    for t in tables {
        writeln!(out, "{t}")?;
    }
    Ok(())
}

struct Bench<'a> {
    tern: &'a Path,
    dir: &'a Path,
    certs: &'a Path,
    cfg: &'a Config,
}

/// What `tern migrate` reported (its last stdout line is one JSON object).
/// What `tern migrate` reads.
#[derive(Clone, Copy)]
enum Source<'a> {
    Device(&'a str),
    File(&'a str),
}

struct Report {
    outcome: String,
    downtime_ms: f64,
    rounds: u64,
    wire_bytes: u64,
    /// A staged migration's segments in the store (framing included).
    staged_bytes: Option<u64>,
    total_seconds: f64,
    /// The downtime's parts: pausing, flushing the source, the final
    /// round, verifying checksum roots (the rest is the fence and the
    /// destination's switch to writable).
    pause_ms: f64,
    flush_ms: f64,
    final_round_ms: f64,
    verify_ms: f64,
    final_delta_bytes: f64,
    /// The initial pass was a delta sync by checksums, and what it found
    /// and sent; what was hashed (the source's and the destination's trees).
    delta_sync: Option<bool>,
    differing_regions: f64,
    first_round_bytes: f64,
    sent_bytes: f64,
    hashed_bytes: f64,
    /// The throttle's lowest write limit (0: not throttled).
    throttle_lowest_bps: f64,
    /// The CPU throttle's lowest quota and the writer's CPU before, cores.
    throttle_lowest_cores: Option<f64>,
    throttle_cpu_before: Option<f64>,
    /// `pre-copy` or `post-copy`, and why (`--mode auto`, `--converge postcopy`).
    mode: String,
    mode_reason: Option<String>,
    /// After a post-copy switch: what was missing, how long until the
    /// destination held it, the demand fetches and their waits.
    postcopy: Option<PostCopyFigures>,
}

struct PostCopyFigures {
    missing_bytes: f64,
    push_seconds: f64,
    demands: f64,
    waits: f64,
    wait_p50_ms: f64,
    wait_p99_ms: f64,
}

impl Report {
    fn parse(stdout: &str) -> Result<Report> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .context("tern migrate printed no JSON report")?;
        let v: serde_json::Value =
            serde_json::from_str(line).context("parse the JSON report of tern migrate")?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("tern migrate's report has no number {k:?}: {line}"))
        };
        Ok(Report {
            outcome: v["outcome"].as_str().unwrap_or("?").to_owned(),
            downtime_ms: num("downtime_ms")?,
            rounds: num("rounds")? as u64,
            wire_bytes: num("wire_bytes")? as u64,
            staged_bytes: v["staged"]["bytes"].as_u64(),
            total_seconds: num("total_seconds")?,
            pause_ms: v["pause_ms"].as_f64().unwrap_or(f64::NAN),
            flush_ms: v["flush_ms"].as_f64().unwrap_or(f64::NAN),
            final_round_ms: v["final_round_ms"].as_f64().unwrap_or(f64::NAN),
            verify_ms: v["verify_ms"].as_f64().unwrap_or(f64::NAN),
            final_delta_bytes: v["final_delta_bytes"].as_f64().unwrap_or(f64::NAN),
            delta_sync: v["delta_sync"].as_bool(),
            differing_regions: v["differing_regions"].as_f64().unwrap_or(f64::NAN),
            first_round_bytes: v["first_round_bytes"].as_f64().unwrap_or(f64::NAN),
            sent_bytes: v["sent_bytes"].as_f64().unwrap_or(f64::NAN),
            hashed_bytes: v["hashed_bytes"].as_f64().unwrap_or(f64::NAN),
            throttle_lowest_bps: v["throttle"]["lowest_bps"].as_f64().unwrap_or(0.0),
            throttle_lowest_cores: v["throttle"]["lowest_cores"].as_f64(),
            throttle_cpu_before: v["throttle"]["cpu_before_cores"].as_f64(),
            mode: v["mode"].as_str().unwrap_or("?").to_owned(),
            mode_reason: v["mode_reason"].as_str().map(str::to_owned),
            postcopy: v["postcopy"].is_object().then(|| {
                let p = &v["postcopy"];
                let n = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
                PostCopyFigures {
                    missing_bytes: n(&p["missing_bytes"]),
                    push_seconds: n(&p["push_seconds"]),
                    demands: n(&p["destination"]["demands"]),
                    waits: n(&p["destination"]["waits"]),
                    wait_p50_ms: n(&p["destination"]["wait_p50_us"]) / 1e3,
                    wait_p99_ms: n(&p["destination"]["wait_p99_us"]) / 1e3,
                }
            }),
        })
    }
}

impl Bench<'_> {
    #[expect(
        clippy::too_many_lines,
        reason = "one benchmark scenario, Tern and its peer side by side, read top to bottom"
    )]
    fn copy_and_delta(&self) -> Result<(String, Option<String>)> {
        let cfg = self.cfg;
        let size = cfg.mib * MIB;
        let src = self.dir.join("src.img");
        eprintln!("bench migrate: writing the {} MiB source image", cfg.mib);
        let data_bytes = write_half_zero_image(&src, cfg.mib)?;
        check_interrupted()?;
        let src_loop = Loop::attach(&src)?;

        // 1a. tern migrate over loopback mTLS into a fresh destination.
        let dst = self.dir.join("dst.img");
        let tern_copy = if cfg.peers_only {
            None
        } else {
            let (mut agent, to) = self.start_agent(&dst, size, None)?;
            drop_caches();
            let (secs, report) = timed(|| self.migrate(&src_loop.dev, to, &["--no-pause"]))?;
            agent.stop();
            same(&src, &dst, "tern migrate (full copy)")?;
            Some((secs, report))
        };

        // 1b. qemu-img convert into a qemu-nbd export of a fresh sparse file.
        let dst2 = self.dir.join("dst2.img");
        File::create(&dst2)?.set_len(size)?;
        let port = free_port("127.0.0.1")?;
        let mut qemu_nbd = Proc::spawn(
            "qemu-nbd",
            Command::new("qemu-nbd")
                .args(["-f", "raw", "-t", "-b", "127.0.0.1", "-p"])
                .arg(port.port().to_string())
                .arg("--cache=none")
                .arg(&dst2),
            Some(port),
        )?;
        qemu_nbd.wait_listening()?;
        drop_caches();
        let (qemu_secs, ()) = timed(|| {
            run_cmd(
                Command::new("qemu-img")
                    .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                    .arg(&src)
                    .arg(format!("nbd://{port}/")),
            )
        })?;
        qemu_nbd.stop();
        same(&src, &dst2, "qemu-img convert")?;
        std::fs::remove_file(&dst2).ok();

        // 1c. rsync, local, into a file that does not exist yet.
        let dst3 = self.dir.join("dst3.img");
        drop_caches();
        let (rsync_secs, rsync_wire) = timed(|| rsync(&src, &dst3, &[]))?;
        same(&src, &dst3, "rsync (full copy)")?;

        let mut t = format!(
            "Full copy, {} MiB image ({} MiB random data in 1 MiB blocks interleaved with zero blocks), \
             cold page cache, each time includes a final sync\n",
            cfg.mib,
            data_bytes / MIB
        );
        writeln!(
            t,
            "{:<34} {:>8} {:>8} {:>10} {:>12}",
            "tool", "seconds", "MB/s", "wire MB", "vs qemu-img"
        )?;
        let row = |name: &str, secs: Option<f64>, wire: Option<u64>| {
            let cell = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            format!(
                "{:<34} {:>8} {:>8} {:>10} {:>12}\n",
                name,
                cell(secs.map(|s| format!("{s:.2}"))),
                cell(secs.map(|s| format!("{:.0}", size as f64 / s / 1e6))),
                cell(wire.map(|w| format!("{:.1}", w as f64 / 1e6))),
                cell(secs.map(|s| format!("{:.2}x", qemu_secs / s))),
            )
        };
        t += &row(
            "tern migrate (loopback mTLS)",
            tern_copy.as_ref().map(|c| c.0),
            tern_copy.as_ref().map(|c| c.1.wire_bytes),
        );
        t += &row(
            "qemu-img convert -> qemu-nbd",
            Some(qemu_secs),
            Some(data_bytes),
        );
        t += &row(
            "rsync --inplace (local)",
            Some(rsync_secs),
            Some(rsync_wire),
        );
        t += "(wire: tern's wire_bytes; qemu-img: the non-zero data it writes; rsync: bytes sent + received)\n";

        if !cfg.wants("delta") {
            return Ok((t, None));
        }

        // 2. The same random change for everyone: written once, through the
        // loop device, as a server would write to its disk.
        let total = size / CHANGE_BLOCK;
        let n = ((total as f64 * cfg.change_pct / 100.0).round() as u64).min(total);
        let (changed, old_blocks) = change_blocks(&src_loop.dev, size, CHANGE_BLOCK, n)?;
        let mut tern_delta = Vec::new();
        if !cfg.peers_only {
            // 16K first: the size the full copy used (the default for this
            // disk), so its agent's saved tree
            // is restored; the 1M run's destination is put back behind its
            // agent's back and must be (and is) hashed again.
            for (i, region) in ["16K", "1M"].into_iter().enumerate() {
                if i > 0 {
                    // Put the previous copy back: the old contents of the changed blocks.
                    restore_blocks(&dst, &old_blocks)?;
                }
                let restored_before = self.restored_trees();
                let (mut agent, to) = self.start_agent(&dst, size, None)?;
                let restored = self.restored_trees() > restored_before;
                drop_caches();
                let (secs, report) = timed(|| {
                    self.migrate(&src_loop.dev, to, &["--no-pause", "--region-size", region])
                })?;
                agent.stop();
                same(
                    &src,
                    &dst,
                    &format!("tern migrate (delta sync, {region} regions)"),
                )?;
                tern_delta.push((region, restored, secs, report));
            }
        }
        drop(old_blocks);
        drop_caches();
        let (rsync_secs, rsync_wire) = timed(|| rsync(&src, &dst3, &["--no-whole-file"]))?;
        same(&src, &dst3, "rsync (delta)")?;

        let mut d = format!(
            "Delta sync after a {}% change: {} random 64 KiB blocks, {:.1} MB changed, \
             destination holds the previous copy; cold page cache, times include a final sync\n",
            cfg.change_pct,
            changed / CHANGE_BLOCK,
            changed as f64 / 1e6
        );
        writeln!(
            d,
            "{:<46} {:>8} {:>10} {:>14} {:>14}",
            "tool", "seconds", "wire MB", "wire/changed", "time vs rsync"
        )?;
        let row = |name: &str, secs: Option<f64>, wire: Option<u64>| {
            let cell = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            format!(
                "{:<46} {:>8} {:>10} {:>14} {:>14}\n",
                name,
                cell(secs.map(|s| format!("{s:.2}"))),
                cell(wire.map(|w| format!("{:.1}", w as f64 / 1e6))),
                cell(wire.map(|w| format!("{:.3}", w as f64 / changed as f64))),
                cell(secs.map(|s| format!("{:.2}x", s / rsync_secs))),
            )
        };
        if tern_delta.is_empty() {
            d += &row("tern migrate (loopback mTLS)", None, None);
        }
        for (region, restored, secs, report) in &tern_delta {
            let tree = if *restored {
                "saved tree"
            } else {
                "tree hashed"
            };
            let name = format!("tern migrate --region-size {region} ({tree})");
            d += &row(&name, Some(*secs), Some(report.wire_bytes));
        }
        d += &row(
            "rsync --inplace --no-whole-file",
            Some(rsync_secs),
            Some(rsync_wire),
        );
        Ok((t, Some(d)))
    }

    fn live(&self) -> Result<String> {
        let cfg = self.cfg;
        let size = cfg.live_mib * MIB;
        let src = self.dir.join("live.img");
        eprintln!("bench migrate: writing the {} MiB live image", cfg.live_mib);
        write_half_zero_image(&src, cfg.live_mib)?;
        check_interrupted()?;
        let src_loop = Loop::attach(&src)?;
        let ns = Netns::create(&NETNS, LINK_RATE)?;
        // The writer runs in a blkio cgroup of its own, which `--converge
        // throttle` limits (no limit is set otherwise).
        let cgroup = BlkioCgroup::create()?;
        let mut t = format!(
            "Live migration, {} MiB image, fio 4 KiB random writes (direct, libaio) on the loop device, \
             {LINK_RATE}/s tbf veth into a namespace, mTLS, --max-downtime {}\n\
             (IOPS: fio's --rate_iops, max: unlimited; mode: fail or throttle (--converge), \
             throttle-cpu (--converge throttle --throttle-by cpu), auto (--mode auto), \
             postcopy (--mode postcopy: switch after the first pass, the rest fetched after, while \
             fio reads 4 KiB at random on the destination's export, at the writer's rate, 1000 for max); \
             measured: write IOPS the loop device completed during the migration; \
             pause/flush/final/verify: the downtime's parts in ms; final MB: the final delta; \
             lowest limit: the throttle's lowest write limit or CPU quota; bystander: a reader of \
             1000 IOPS in the writer's cgroups)\n",
            cfg.live_mib, cfg.downtime
        );
        if let Some(region) = &cfg.live_region {
            writeln!(t, "(--region-size {region})")?;
        }
        writeln!(
            t,
            "{:>6} {:<12} {:>9} {:<10} {:>12} {:>24} {:>9} {:>10} {:>8} {:>7} {:>13}",
            "IOPS",
            "mode",
            "measured",
            "outcome",
            "downtime ms",
            "pause/flush/final/verify",
            "final MB",
            "wire MB",
            "total s",
            "rounds",
            "lowest limit"
        )?;
        for &rate in &cfg.rates {
            for mode in &cfg.converge {
                check_interrupted()?;
                let row = self.live_row(&src_loop, &ns, &cgroup, size, rate, mode)?;
                t.push_str(&row);
            }
        }
        Ok(t)
    }

    /// One live migration under fio at `rate` IOPS (0: unlimited) with
    /// `--converge mode`: its table row.
    fn live_row(
        &self,
        src_loop: &Loop,
        ns: &Netns,
        cgroup: &BlkioCgroup,
        size: u64,
        rate: u32,
        mode: &str,
    ) -> Result<String> {
        let cfg = self.cfg;
        let label = if rate == 0 {
            "max".to_owned()
        } else {
            rate.to_string()
        };
        let dst = self.dir.join("live-dst.img");
        std::fs::remove_file(&dst).ok();
        let (mut agent, to) = self.start_agent(&dst, size, Some(ns))?;
        let (mut fio, mut bystander, base_rate) = start_workload(cfg, cgroup, &src_loop.dev, rate)?;
        if cfg.peers_only {
            return Ok(format!("{label:>6} {mode:<12} {:>9} (peers only)\n", "-"));
        }
        let writes_before = loop_writes(&src_loop.dev)?;
        let reads_before = cgroup.reads()?;
        let started = Instant::now();
        let pause = format!("cmd:kill -STOP {pid};;kill -CONT {pid}", pid = fio.pid());
        let args = live_args(cfg, cgroup, &pause, mode);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent_log = self.dir.join("agent.log");
        // Auto may switch in post-copy too: its reads are measured alike.
        let reader = (mode == "postcopy" || mode == "auto").then(|| {
            postcopy::Reader::start(ns, &agent_log, self.dir.join("dst-reads.json"), rate)
        });
        let result = self.migrate(&src_loop.dev, to, &args);
        let reads = reader.map(postcopy::Reader::finish).transpose()?.flatten();
        let measured =
            (loop_writes(&src_loop.dev)? - writes_before) as f64 / started.elapsed().as_secs_f64();
        let read_rate = (cgroup.reads()? - reads_before) as f64 / started.elapsed().as_secs_f64();
        let bystander_note = format!(
            "{:>6} bystander reads {read_rate:.0}/s during, {base_rate:.0}/s before ({:+.0} %)\n",
            "",
            100.0 * (read_rate / base_rate.max(1.0) - 1.0)
        );
        fio.kill();
        bystander.kill();
        agent.stop();
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                // An interrupt fails the benchmark; a failed migration is a figure.
                check_interrupted()?;
                eprintln!("bench migrate: live migration at {label} IOPS, {mode}: {e:#}");
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or("");
                let first = first.split_once("): ").map_or(first, |(_, r)| r);
                let first: String = first.chars().take(90).collect();
                return Ok(format!(
                    "{label:>6} {mode:<12} {measured:>9.0} failed: {first}\n{bystander_note}"
                ));
            }
        };
        // After a cutover the source stays paused, so it must equal the
        // destination; after a rollback it moved on.
        if r.outcome != "rolled back" && r.outcome != "synced" {
            same(
                Path::new(&src_loop.dev),
                &dst,
                &format!("live migration at {label} IOPS, {mode}"),
            )?;
        }
        let lowest = match (r.throttle_lowest_cores, r.throttle_cpu_before) {
            (Some(c), Some(b)) => format!("{b:.2}→{c:.2} core"),
            (Some(c), None) => format!("{c:.2} core"),
            _ if r.throttle_lowest_bps > 0.0 => {
                format!("{:.1} MB/s", r.throttle_lowest_bps / 1e6)
            }
            _ => "-".to_owned(),
        };
        let mut row = format!(
            "{label:>6} {mode:<12} {measured:>9.0} {:<10} {:>12.1} {:>24} {:>9.2} {:>10.1} {:>8.2} {:>7} {lowest:>13}\n",
            r.outcome,
            r.downtime_ms,
            format!(
                "{:.0}/{:.0}/{:.0}/{:.0}",
                r.pause_ms, r.flush_ms, r.final_round_ms, r.verify_ms
            ),
            r.final_delta_bytes / 1e6,
            r.wire_bytes as f64 / 1e6,
            r.total_seconds,
            r.rounds
        );
        if mode == "auto" {
            let _ = writeln!(
                row,
                "{:>6} auto chose {}: {}",
                "",
                r.mode,
                r.mode_reason.as_deref().unwrap_or("(no reason given)")
            );
        }
        if let Some(p) = &r.postcopy {
            row.push_str(&postcopy_line(p, reads.as_ref()));
        }
        row.push_str(&bystander_note);
        Ok(row)
    }

    /// How many times a destination agent restored its saved checksum tree
    /// (counted in the agents' shared log, which is appended to).
    fn restored_trees(&self) -> usize {
        std::fs::read_to_string(self.dir.join("agent.log"))
            .map_or(0, |log| log.matches("checksum tree restored").count())
    }

    /// A destination agent on a fresh port; in `ns` (listening on the veth
    /// address) or on loopback.
    fn start_agent(
        &self,
        image: &Path,
        size: u64,
        ns: Option<&Netns>,
    ) -> Result<(Proc, SocketAddr)> {
        let (grpc, tls) = match ns {
            Some(_) => (
                SocketAddr::new(NS_ADDR.parse()?, 7443),
                self.certs.join(NS_ADDR),
            ),
            None => (free_port("127.0.0.1")?, self.certs.join("localhost")),
        };
        let nbd = match ns {
            Some(_) => "127.0.0.1:10809".parse()?,
            None => free_port("127.0.0.1")?,
        };
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(self.tern);
                c
            }
            None => Command::new(self.tern),
        };
        cmd.args(["agent", "--role", "destination", "--image"])
            .arg(image)
            .args(["--size", &size.to_string(), "--grpc", &grpc.to_string()])
            .args(["--nbd", &nbd.to_string(), "--tls-dir"])
            .arg(tls)
            // The saved-tree lines are info; `restored_trees` counts them.
            .env("TERN_LOG", "warn,tern::rpc::server=info")
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("agent.log"))?);
        let mut agent = Proc::spawn("tern agent", &mut cmd, Some(grpc))?;
        agent.wait_listening()?;
        Ok((agent, grpc))
    }

    /// `tern migrate` from a device; the report, or an error with the end of
    /// its log.
    fn migrate(&self, device: &str, to: SocketAddr, extra: &[&str]) -> Result<Report> {
        self.migrate_from(Source::Device(device), to, extra)
    }

    /// `tern migrate` from a device or a file.
    fn migrate_from(&self, source: Source<'_>, to: SocketAddr, extra: &[&str]) -> Result<Report> {
        let to = to.to_string();
        let tls = self.certs.join("localhost");
        let tls = tls
            .to_str()
            .context("the bench directory's path is UTF-8")?;
        self.run_migrate(source, &["--to", &to, "--tls-dir", tls], extra, &[])
    }

    /// `tern migrate` from `source` to `dest` (`--to …` or `--via …`) with
    /// `env` set; the report, or an error with the end of its log.
    fn run_migrate(
        &self,
        source: Source<'_>,
        dest: &[&str],
        extra: &[&str],
        env: &[(&'static str, String)],
    ) -> Result<Report> {
        check_interrupted()?;
        let log = self.dir.join("migrate.log");
        let (flag, path) = match source {
            Source::Device(d) => ("--device", d),
            Source::File(f) => ("--file", f),
        };
        let out = Command::new(self.tern)
            .args(["migrate", flag, path])
            .args(dest)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("--trace-out")
            .arg(self.dir.join("source.trace"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(extra)
            .arg("--json")
            .stderr(log_file(&log)?)
            .output()
            .context("run tern migrate")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            // Its error is the last line that starts with "tern:".
            let reason = tail
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("tern: "))
                .unwrap_or("see the log above");
            bail!(
                "tern migrate failed ({}): {reason}\n{}\n{}",
                out.status,
                stdout.trim(),
                tail.join("\n")
            );
        }
        Report::parse(&stdout)
    }
}

/// The line under a post-copy row: what was missing, its demand fetches
/// and what the destination's reader saw.
/// The live part's workload, warmed up: the writer at `rate` IOPS and a
/// bystander reader in the same cgroups (reads the throttle is not aimed
/// at: a write limit should leave them alone, a CPU quota slows them), and
/// the bystander's read rate over the warm-up.
fn start_workload(
    cfg: &Config,
    cgroup: &BlkioCgroup,
    dev: &str,
    rate: u32,
) -> Result<(Proc, Proc, f64)> {
    let mut fio = Proc::spawn("fio", &mut cgroup.run(&fio_writes("live", dev, rate)), None)?;
    let mut bystander = Proc::spawn(
        "fio",
        &mut cgroup.run(&fio_reads("bystander", dev, BYSTANDER_IOPS)),
        None,
    )?;
    // fio's own start-up is not the bystander's rate.
    std::thread::sleep(Duration::from_millis(500));
    let (base_reads, base_at) = (cgroup.reads()?, Instant::now());
    std::thread::sleep(Duration::from_secs(cfg.warmup_secs));
    for p in [&mut fio, &mut bystander] {
        if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("fio exited at start ({status})");
        }
    }
    let base_rate = (cgroup.reads()? - base_reads) as f64 / base_at.elapsed().as_secs_f64();
    Ok((fio, bystander, base_rate))
}

/// `tern migrate`'s flags for one live row in `mode`.
fn live_args(cfg: &Config, cgroup: &BlkioCgroup, pause: &str, mode: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--pause".into(),
        pause.into(),
        "--max-downtime".into(),
        cfg.downtime.clone(),
    ];
    let extra: Vec<String> = match mode {
        "postcopy" | "auto" => vec!["--mode".into(), mode.into()],
        "throttle" => vec![
            "--converge".into(),
            "throttle".into(),
            "--throttle-cgroup".into(),
            cgroup.dir.display().to_string(),
        ],
        "throttle-cpu" => vec![
            "--converge".into(),
            "throttle".into(),
            "--throttle-by".into(),
            "cpu".into(),
            "--throttle-cgroup".into(),
            cgroup.cpu.display().to_string(),
        ],
        _ => vec!["--converge".into(), mode.into()],
    };
    args.extend(extra);
    if let Some(region) = &cfg.live_region {
        args.extend(["--region-size".into(), region.clone()]);
    }
    args
}

fn postcopy_line(p: &PostCopyFigures, reads: Option<&postcopy::Reads>) -> String {
    let reads = reads.map_or_else(
        || "no reads on the destination".to_owned(),
        |r| {
            format!(
                "destination reads {:.0} IOPS, p50 {:.2} ms, p99 {:.2} ms",
                r.iops, r.p50_ms, r.p99_ms
            )
        },
    );
    format!(
        "{:>16} {:.0} MB missing at the switch, all there {:.1} s later; {:.0} demands, {:.0} requests waited (p50 {:.2} ms, p99 {:.2} ms); {reads}\n",
        "post-copy:",
        p.missing_bytes / 1e6,
        p.push_seconds,
        p.demands,
        p.waits,
        p.wait_p50_ms,
        p.wait_p99_ms,
    )
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn require(tool: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("{tool} is not installed; `cargo xtask setup` installs it");
    }
    Ok(())
}

fn log_file(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// Set by SIGINT/SIGTERM: the benchmark stops at the next step and its
/// guards clean up (a default SIGINT would kill it with loop devices, the
/// namespace and gigabytes of images left behind).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Runs `f`, then `sync`; returns the seconds of both and `f`'s value.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    check_interrupted()?;
    let start = Instant::now();
    let v = f()?;
    check_interrupted()?;
    run_cmd(&mut Command::new("sync"))?;
    Ok((start.elapsed().as_secs_f64(), v))
}

/// Writes dirty pages back and drops the page cache, so every copy reads
/// from the disk.
fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Fails loudly unless the two files or devices are byte-identical.
fn same(a: &Path, b: &Path, what: &str) -> Result<()> {
    let out = Command::new("cmp")
        .arg(a)
        .arg(b)
        .output()
        .context("run cmp")?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!(
            "{what}: the copy is NOT byte-identical: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        _ => bail!(
            "cmp {} {} failed ({}): {}",
            a.display(),
            b.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `rsync --inplace --stats` plus `extra`; returns bytes sent + received.
fn rsync(src: &Path, dst: &Path, extra: &[&str]) -> Result<u64> {
    let out = output(
        Command::new("rsync")
            .args(["--inplace", "--stats"])
            .args(extra)
            .arg(src)
            .arg(dst),
    )?;
    let stat = |key: &str| -> Result<u64> {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("rsync --stats printed no {key:?}:\n{out}"))?;
        let digits: String = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .with_context(|| format!("rsync --stats: cannot read {key:?} in {line:?}"))
    };
    Ok(stat("Total bytes sent:")? + stat("Total bytes received:")?)
}

/// xorshift64: fast, deterministic noise.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes());
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b) % n
    }
}

/// Even 1 MiB blocks random, odd ones zero (written, not holes: a real
/// disk's zeros are allocated). Returns the bytes of random data.
fn write_half_zero_image(path: &Path, mib: u64) -> Result<u64> {
    let mut f = std::io::BufWriter::with_capacity(
        4 << 20,
        File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut block = vec![0u8; MIB as usize];
    let zeros = vec![0u8; MIB as usize];
    let mut data = 0;
    for i in 0..mib {
        if i % 2 == 0 {
            noise.fill(&mut block);
            f.write_all(&block)?;
            data += MIB;
        } else {
            f.write_all(&zeros)?;
        }
    }
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(data)
}

/// The old contents of changed blocks: (offset, bytes).
type OldBlocks = Vec<(u64, Vec<u8>)>;

/// Overwrites `n` distinct random `block`-sized, `block`-aligned blocks of
/// the device with random data (deterministic seed); returns the bytes
/// changed and what the blocks held before.
fn change_blocks(dev: &str, size: u64, block: u64, n: u64) -> Result<(u64, OldBlocks)> {
    let total = size / block;
    if n > total {
        bail!("cannot change {n} distinct blocks of {block} bytes in {size} bytes");
    }
    // Partial Fisher–Yates: the first n entries are a random sample.
    let mut blocks: Vec<u64> = (0..total).collect();
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    for i in 0..n {
        let j = i + noise.below(total - i);
        blocks.swap(i as usize, j as usize);
    }
    let f = File::options()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("open {dev}"))?;
    let mut buf = vec![0u8; block as usize];
    let mut old = Vec::with_capacity(n as usize);
    for &b in &blocks[..n as usize] {
        let mut was = vec![0u8; block as usize];
        f.read_exact_at(&mut was, b * block)
            .with_context(|| format!("read {dev}"))?;
        old.push((b * block, was));
        noise.fill(&mut buf);
        f.write_all_at(&buf, b * block)
            .with_context(|| format!("write {dev}"))?;
    }
    f.sync_all().with_context(|| format!("sync {dev}"))?;
    Ok((n * block, old))
}

/// Writes the old contents of the changed blocks back into `image`.
fn restore_blocks(image: &Path, old: &OldBlocks) -> Result<()> {
    let f = File::options()
        .write(true)
        .open(image)
        .with_context(|| format!("open {}", image.display()))?;
    for (offset, data) in old {
        f.write_all_at(data, *offset)
            .with_context(|| format!("write {}", image.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("sync {}", image.display()))
}

/// Writes completed on a block device, from `/sys/block/NAME/stat`.
fn loop_writes(dev: &str) -> Result<u64> {
    let name = dev.trim_start_matches("/dev/");
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat"))?;
    stat.split_whitespace()
        .nth(4)
        .context("short /sys/block stat")?
        .parse()
        .context("parse /sys/block stat")
}

fn free_port(host: &str) -> Result<SocketAddr> {
    let l = TcpListener::bind((host, 0)).context("find a free port")?;
    Ok(l.local_addr()?)
}

/// Removes the directory (images, certificates, logs) when dropped.
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
}

impl TempDir {
    pub(crate) fn create(path: PathBuf) -> Result<TempDir> {
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // TERN_BENCH_KEEP=1 keeps the images and logs for a look after a failure.
        if std::env::var_os("TERN_BENCH_KEEP").is_some_and(|v| v == "1") {
            eprintln!("bench: kept {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process stopped (SIGTERM, SIGCONT in case it is stopped, then
/// SIGKILL after 20 s) when dropped.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    /// Where it listens, if it is a server.
    addr: Option<SocketAddr>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, addr: Option<SocketAddr>) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc {
            name,
            child: Some(child),
            addr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn wait_listening(&mut self) -> Result<SocketAddr> {
        let addr = self.addr.context("not a server")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            check_interrupted()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(addr);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("{} exited before listening ({status})", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} did not listen on {addr} within 20 s", self.name)
    }

    /// SIGTERM (servers drain and flush) and SIGCONT (in case it is
    /// stopped), then wait; SIGKILL if it hangs.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        for sig in ["-TERM", "-CONT"] {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench migrate: {} ignored SIGTERM for 20 s; killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL at once (works on a stopped process too).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// fio writing 4 KiB blocks at random on `dev` at `iops` until stopped;
/// one process (`--thread`), so SIGSTOP of it pauses every job.
/// The bystander's read rate in the live part.
const BYSTANDER_IOPS: u32 = 1000;

/// fio reading 4 KiB blocks at random from `dev` at `iops`, synchronously.
fn fio_reads(name: &str, dev: &str, iops: u32) -> Command {
    fio_random(name, dev, iops, &["--rw=randread", "--ioengine=psync"])
}

pub(crate) fn fio_writes(name: &str, dev: &str, iops: u32) -> Command {
    fio_random(
        name,
        dev,
        iops,
        &["--rw=randwrite", "--ioengine=libaio", "--iodepth=8"],
    )
}

/// fio doing 4 KiB direct I/O at random on `dev` at `iops` (0: unlimited)
/// for up to ten minutes, as `how` says (`--rw`, the engine).
fn fio_random(name: &str, dev: &str, iops: u32, how: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([&format!("--name={name}"), "--direct=1", "--bs=4k"])
        .args(how)
        .args([
            "--thread",
            "--time_based",
            "--runtime=600",
            "--eta=never",
            &format!("--rate_iops={iops}"),
            &format!("--filename={dev}"),
        ])
        .stdout(Stdio::null());
    cmd
}

/// A cgroup v1 blkio directory (where this host's io controller lives) for
/// the live part's writer; removed when dropped, after the writer is gone.
/// The writer's cgroups: v1 blkio (its write limit) and v1 cpu (its CPU
/// quota), so either lever can slow it.
pub(crate) struct BlkioCgroup {
    pub(crate) dir: PathBuf,
    pub(crate) cpu: PathBuf,
}

impl BlkioCgroup {
    pub(crate) fn create() -> Result<BlkioCgroup> {
        let name = format!("tern-bench-{}", std::process::id());
        let dir = Path::new("/sys/fs/cgroup/blkio").join(&name);
        let cpu = Path::new("/sys/fs/cgroup/cpu").join(&name);
        for (d, what) in [(&dir, "blkio"), (&cpu, "cpu")] {
            std::fs::create_dir(d).with_context(|| {
                format!(
                    "create the writer's cgroup {} (is cgroup v1 {what} mounted?)",
                    d.display()
                )
            })?;
        }
        Ok(BlkioCgroup { dir, cpu })
    }

    /// Reads the cgroup's tasks completed on any disk (blkio's own count:
    /// Tern's reads of the source are not in it).
    pub(crate) fn reads(&self) -> Result<u64> {
        let path = self.dir.join("blkio.throttle.io_serviced");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, op, n) = (f.next()?, f.next()?, f.next()?);
                (op == "Read").then(|| n.parse::<u64>().ok()).flatten()
            })
            .sum())
    }

    /// `cmd`, run from inside these cgroups.
    pub(crate) fn run(&self, cmd: &Command) -> Command {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "echo $$ > \"$0/cgroup.procs\" && echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
            &self.dir.display().to_string(),
            &self.cpu.display().to_string(),
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(Stdio::null());
        sh
    }
}

impl Drop for BlkioCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(&self.cpu);
    }
}

/// A loop device over a file, detached when dropped.
pub(crate) struct Loop {
    pub(crate) dev: String,
}

impl Loop {
    pub(crate) fn attach(file: &Path) -> Result<Loop> {
        // `TERN_BENCH_LOOP_DIRECT=1`: the loop device reads its file with
        // O_DIRECT, as a disk would, instead of copying from the file's page cache.
        let direct = if std::env::var("TERN_BENCH_LOOP_DIRECT").is_ok_and(|v| v == "1") {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let dev = output(
            Command::new("losetup")
                .args(["--find", "--show", direct])
                .arg(file),
        )?
        .trim()
        .to_owned();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {dev:?}, not a loop device");
        }
        Ok(Loop { dev })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A network namespace joined to the host by a veth pair, both ends shaped
/// by `tbf`; deleted (with the pair) when dropped.
pub(crate) struct Netns {
    pub(crate) name: String,
    host_veth: String,
}

/// How a bench names and addresses its [`Netns`]; each bench has its own
/// so two benches never collide.
pub(crate) struct NetnsSpec<'a> {
    /// In the namespace name, `tern-bench-{tag}-{pid}`.
    pub(crate) tag: &'a str,
    /// The veth pair is `{veth}{pid}h` / `{veth}{pid}n` (15 bytes at most).
    pub(crate) veth: &'a str,
    /// The host end's address in a /30.
    pub(crate) host_addr: &'a str,
    /// The namespace end's address in the same /30.
    pub(crate) ns_addr: &'a str,
}

impl Netns {
    /// Both ends of the pair are shaped to `rate` (a `tc` rate, e.g. `1gbit`).
    pub(crate) fn create(spec: &NetnsSpec<'_>, rate: &str) -> Result<Netns> {
        let id = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("tern-bench-{}-{id}", spec.tag),
            host_veth: format!("{}{id}h", spec.veth),
        };
        let ns_veth = format!("{}{id}n", spec.veth);
        run_cmd(Command::new("ip").args(["netns", "add", &ns.name]))?;
        // From here on, dropping `ns` cleans up whatever was made.
        let ip = |args: &[&str]| run_cmd(Command::new("ip").args(args));
        let in_ns = |args: &[&str]| {
            run_cmd(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name])
                    .args(args),
            )
        };
        ip(&[
            "link",
            "add",
            &ns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns_veth,
        ])?;
        ip(&["link", "set", &ns_veth, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", spec.host_addr),
            "dev",
            &ns.host_veth,
        ])?;
        ip(&["link", "set", &ns.host_veth, "up"])?;
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", spec.ns_addr),
            "dev",
            &ns_veth,
        ])?;
        in_ns(&["ip", "link", "set", &ns_veth, "up"])?;
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms",
        ];
        run_cmd(
            Command::new("tc")
                .args(["qdisc", "add", "dev", &ns.host_veth])
                .args(tbf),
        )?;
        in_ns(&[&["tc", "qdisc", "add", "dev", &ns_veth][..], &tbf[..]].concat())?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        // Deleting the namespace deletes the pair; this only matters if the
        // peer never moved into it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_json_line() {
        let out = "something\n{\"outcome\":\"completed\",\"downtime_ms\":12.5,\"rounds\":3,\
                   \"sent_bytes\":10,\"wire_bytes\":7,\"total_seconds\":1.5}\n";
        let r = Report::parse(out).expect("parse");
        assert_eq!(r.outcome, "completed");
        assert_eq!((r.rounds, r.wire_bytes), (3, 7));
        assert!((r.downtime_ms - 12.5).abs() < f64::EPSILON);
        assert!(Report::parse("no json").is_err());
    }

    #[test]
    fn reads_the_delta_figures_and_tolerates_their_absence() {
        let out = "{\"outcome\":\"synced\",\"downtime_ms\":0,\"rounds\":0,\"wire_bytes\":9,\
                   \"total_seconds\":2,\"delta_sync\":true,\"differing_regions\":5000,\
                   \"first_round_bytes\":20480000,\"sent_bytes\":20480000,\"hashed_bytes\":3}\n";
        let r = Report::parse(out).expect("parse");
        assert_eq!(r.delta_sync, Some(true));
        assert!((r.differing_regions - 5000.0).abs() < f64::EPSILON);
        let old = "{\"outcome\":\"synced\",\"downtime_ms\":0,\"rounds\":0,\"wire_bytes\":9,\
                   \"total_seconds\":2}";
        let r = Report::parse(old).expect("parse");
        assert_eq!(r.delta_sync, None);
        assert!(r.hashed_bytes.is_nan());
    }

    #[test]
    fn change_blocks_refuses_more_blocks_than_the_device_holds() {
        let err = change_blocks("/nonexistent", 8192, 4096, 3).expect_err("3 of 2 blocks");
        assert!(format!("{err:#}").contains("distinct blocks"), "{err:#}");
    }
}
