//! The demo: ext4 on a loop device, real programs writing to it (fio, sqlite3),
//! traced by `tern trace`, then the trace's summary. Cleans up on every path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{self, output, require_root};

/// Everything the demo made, undone on drop (also when a step fails).
struct Scratch {
    dir: PathBuf,
    loop_dev: Option<String>,
    mounted: bool,
    tracer: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut t) = self.tracer.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.join("mnt")).status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_demo_workload(mnt: &Path) -> Result<()> {
    eprintln!("demo: fio — 8 s of 4 KiB random read/write with fsync on a 64 MiB file");
    let terse = output(Command::new("fio").args([
        "--name=demo",
        &format!("--directory={}", mnt.display()),
        "--rw=randrw",
        "--rwmixread=60",
        "--bs=4k",
        "--size=64M",
        "--ioengine=psync",
        "--direct=1",
        "--fsync=16",
        "--runtime=8",
        "--time_based",
        "--output-format=terse",
    ]))
    .context("the fio workload failed")?;
    // Terse v3: field 8 is read IOPS, field 49 write IOPS.
    let f: Vec<&str> = terse.trim().split(';').collect();
    eprintln!(
        "demo: fio did {} read and {} write IOPS",
        f.get(7).unwrap_or(&"?"),
        f.get(48).unwrap_or(&"?")
    );
    eprintln!("demo: sqlite3 — 200 transactions of 100 inserts each, then a query");
    let db = mnt.join("demo.db");
    let mut script =
        String::from("PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\n");
    for _ in 0..200 {
        script.push_str("BEGIN;\n");
        for _ in 0..100 {
            script.push_str("INSERT INTO t(v) VALUES (hex(randomblob(64)));\n");
        }
        script.push_str("COMMIT;\n");
    }
    script.push_str("SELECT count(*) FROM t;\n");
    let script_path = mnt.join("demo.sql");
    std::fs::write(&script_path, script)?;
    let count = output(
        Command::new("sqlite3")
            .arg(&db)
            .arg(format!(".read {}", script_path.display())),
    )?;
    eprintln!(
        "demo: sqlite3 holds {} rows",
        count.lines().last().unwrap_or("?")
    );
    sh::run(&mut Command::new("sync"))?;
    Ok(())
}

// The Scratch guard kills and waits for the tracer on every early return.
#[allow(clippy::zombie_processes)]
pub fn run(tern: &Path) -> Result<()> {
    require_root("the demo (loop devices, mount, eBPF)")?;
    let dir = PathBuf::from(format!("/var/tmp/tern-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("mnt"))?;
    let mut s = Scratch {
        dir: dir.clone(),
        loop_dev: None,
        mounted: false,
        tracer: None,
    };
    let image = dir.join("disk.img");
    sh::run(Command::new("truncate").args(["-s", "512M"]).arg(&image))?;
    let dev = output(Command::new("losetup").args(["-f", "--show"]).arg(&image))?
        .trim()
        .to_string();
    s.loop_dev = Some(dev.clone());
    eprintln!("demo: {dev} holds {}, making ext4", image.display());
    sh::run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
    sh::run(Command::new("mount").arg(&dev).arg(dir.join("mnt")))?;
    s.mounted = true;

    let trace = PathBuf::from("tern-demo.trace");
    let tracer = Command::new(tern)
        .args(["trace", "--device", &dev, "--out"])
        .arg(&trace)
        .spawn()
        .context("cannot start tern trace")?;
    s.tracer = Some(tracer);
    // The tracer is ready once it has written its header.
    let t0 = Instant::now();
    while std::fs::metadata(&trace).map_or(0, |m| m.len()) == 0 {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("tern trace did not start within 20 s");
        }
        if let Some(t) = s.tracer.as_mut()
            && let Some(status) = t.try_wait()?
        {
            bail!("tern trace exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    run_demo_workload(&dir.join("mnt"))?;

    let mut tracer = s.tracer.take().expect("started above");
    sh::run(Command::new("kill").args(["-INT", &tracer.id().to_string()]))?;
    let status = tracer.wait()?;
    if !status.success() {
        bail!("tern trace failed: {status}");
    }
    drop(s);
    eprintln!(
        "demo: done. Look closer with `target/release/tern trace stat {0}` or `tern trace export --format csv {0}`",
        trace.display()
    );
    Ok(())
}
