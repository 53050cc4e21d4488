//! `cargo xtask bench tracer`: fio 4 KiB random read and write on zram,
//! untraced, under `tern trace`, and under the blktrace-class peer. blktrace
//! itself fails on this kernel (EPERM on its relay files), so it is tried and
//! reported, and bpftrace recording every request stands in as the peer.
//! Runs alternate and the median of several is reported: the spread between
//! two identical runs here is often 10–20 %.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};

use crate::sh::{self, output};

const RUNS: usize = 3;
const RUNTIME_S: u32 = 6;

struct Zram(String);

impl Drop for Zram {
    fn drop(&mut self) {
        let id = self.0.trim_start_matches("/dev/zram");
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", id);
    }
}

fn zram() -> Result<Zram> {
    let id = std::fs::read_to_string("/sys/class/zram-control/hot_add")
        .context("cannot add a zram device (is the zram module loaded?)")?;
    let id = id.trim().to_string();
    std::fs::write(format!("/sys/block/zram{id}/disksize"), "1G")
        .context("cannot size the zram device")?;
    Ok(Zram(format!("/dev/zram{id}")))
}

fn fio_iops(dev: &str, rw: &str) -> Result<f64> {
    let out = output(Command::new("fio").args([
        "--name=bench",
        &format!("--filename={dev}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--direct=1",
        "--ioengine=io_uring",
        "--iodepth=32",
        "--size=1G",
        &format!("--runtime={RUNTIME_S}"),
        "--time_based",
        "--output-format=json",
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("fio printed no JSON")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { "read" } else { "write" };
    job[side]["iops"].as_f64().context("fio JSON has no iops")
}

fn stop(mut child: Child) -> Result<()> {
    sh::run(Command::new("kill").args(["-INT", &child.id().to_string()]))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("tracer exited with {status}");
    }
    Ok(())
}

fn wait_for_file(path: &Path) -> Result<()> {
    for _ in 0..200 {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not appear", path.display())
}

struct Traced {
    iops: f64,
    events: u64,
    lost: u64,
    seconds: f64,
}

fn under_tern(tern: &Path, dev: &str, rw: &str) -> Result<Traced> {
    let trace = Path::new("/dev/shm/tern-bench.trace");
    let _ = std::fs::remove_file(trace);
    let child = Command::new(tern)
        .args([
            "trace",
            "-q",
            "--device",
            dev,
            "--ring-size",
            "64M",
            "--out",
        ])
        .arg(trace)
        .stderr(Stdio::null())
        .spawn()?;
    wait_for_file(trace)?;
    std::thread::sleep(Duration::from_millis(300));
    let iops = fio_iops(dev, rw);
    stop(child)?;
    let iops = iops?;
    let stat = output(
        Command::new(tern)
            .args(["trace", "stat", "--json"])
            .arg(trace),
    )?;
    let v: serde_json::Value = serde_json::from_str(&stat)?;
    let _ = std::fs::remove_file(trace);
    Ok(Traced {
        iops,
        events: v["block_events"].as_u64().unwrap_or(0),
        lost: v["lost_events"].as_u64().unwrap_or(0),
        seconds: v["duration_ns"].as_f64().unwrap_or(1.0) / 1e9,
    })
}

fn dev_numbers(dev: &str) -> Result<(u32, u32)> {
    let name = dev.trim_start_matches("/dev/");
    let s = std::fs::read_to_string(format!("/sys/block/{name}/dev"))?;
    let (a, b) = s.trim().split_once(':').context("bad dev file")?;
    Ok((a.parse()?, b.parse()?))
}

/// bpftrace recording each request (device, sector, size, op) to a file, as blktrace would.
fn under_bpftrace(dev: &str, rw: &str) -> Result<f64> {
    let (major, minor) = dev_numbers(dev)?;
    let kdev = (major << 20) | minor;
    let script = format!(
        "tracepoint:block:block_bio_queue /args->dev == {kdev}/ {{ printf(\"%d %d %s\\n\", args->sector, args->nr_sector, args->rwbs); }}"
    );
    let log = std::fs::File::create("/dev/shm/tern-bench.bpftrace")?;
    let child = Command::new("bpftrace")
        .args(["-e", &script])
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()?;
    wait_for_file(Path::new("/dev/shm/tern-bench.bpftrace"))?;
    let iops = fio_iops(dev, rw);
    stop(child)?;
    let _ = std::fs::remove_file("/dev/shm/tern-bench.bpftrace");
    iops
}

fn blktrace_works(dev: &str) -> String {
    // blktrace needs debugfs; mount it so its failure (or success) is its own.
    if !Path::new("/sys/kernel/debug/block").exists() {
        let _ = Command::new("mount")
            .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
            .status();
    }
    let r = Command::new("timeout")
        .args([
            "3",
            "blktrace",
            "-d",
            dev,
            "-o",
            "/dev/shm/tern-bench-blk",
            "-w",
            "1",
        ])
        .output();
    match r {
        Ok(o) if o.status.success() => "ran".into(),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().next().unwrap_or("failed").to_string();
            if first.is_empty() {
                format!("failed ({})", o.status)
            } else {
                first
            }
        }
        Err(_) => "not installed".into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(tern: &Path) -> Result<()> {
    let z = zram()?;
    let dev = z.0.clone();
    let blk = blktrace_works(&dev);
    eprintln!(
        "bench tracer: {dev} (zram, 1 GiB); blktrace here: {blk}; peer: bpftrace printing every request"
    );
    let mut rows = Vec::new();
    for rw in ["randread", "randwrite"] {
        let (mut base, mut tern_iops, mut peer, mut evps, mut lost) =
            (vec![], vec![], vec![], vec![], 0);
        // Warm the device once so every measured run sees the same state.
        fio_iops(&dev, rw)?;
        for i in 0..RUNS {
            eprintln!("bench tracer: {rw} round {}/{RUNS}", i + 1);
            base.push(fio_iops(&dev, rw)?);
            let t = under_tern(tern, &dev, rw)?;
            tern_iops.push(t.iops);
            evps.push(t.events as f64 / t.seconds);
            lost += t.lost;
            peer.push(under_bpftrace(&dev, rw)?);
        }
        rows.push((
            rw,
            median(base),
            median(tern_iops),
            median(peer),
            median(evps),
            lost,
        ));
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nfio 4 KiB, io_uring iodepth 32, {RUNTIME_S} s runs, median of {RUNS} (zram {dev})"
    );
    let _ = writeln!(
        table,
        "{:<10} {:>12} {:>12} {:>10} {:>14} {:>10} {:>14} {:>8}",
        "workload",
        "untraced",
        "tern trace",
        "slowdown",
        "bpftrace-rec",
        "slowdown",
        "tern events/s",
        "lost"
    );
    for (rw, base, t, p, e, lost) in &rows {
        let _ = writeln!(
            table,
            "{:<10} {:>12.0} {:>12.0} {:>9.1}% {:>14.0} {:>9.1}% {:>14.0} {:>8}",
            rw,
            base,
            t,
            (1.0 - t / base) * 100.0,
            p,
            (1.0 - p / base) * 100.0,
            e,
            lost
        );
    }
    let _ = writeln!(table, "blktrace: {blk}");
    // The table is the benchmark's product: it goes to stdout.
    #[allow(clippy::print_stdout)]
    {
        print!("{table}");
    }
    drop(z);
    Ok(())
}
