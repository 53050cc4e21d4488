//! `cargo xtask traces --out DIR`: traces of real programs (fio, sqlite3,
//! pgbench, a git clone and a C build, periodic jobs, sqlite3's page faults) recorded with
//! `tern trace` on ext4 on a loop device, for the analyzer, the planner and
//! the predictor. Each workload is prepared untraced (files laid out, the
//! database initialised), the file system is remounted so its page cache is
//! cold, then the traced phase runs for a bounded time. A `manifest.json`
//! beside the traces says what each one holds and how it was configured.
//! Everything made is undone on every path (mounts, loop devices, servers).
//! `msr-bpftrace` is the exception to "recorded with `tern trace`": bpftrace
//! writes it in a public format (MSR Cambridge CSV) and Tern imports it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{self, output, require_root};

#[path = "traces_msr.rs"]
mod msr;

/// What the traces are recorded on: big enough for pgbench at scale 5.
const DISK: &str = "1G";

/// The workloads, in recording order.
pub const WORKLOADS: &[&str] = &[
    "fio",
    "sqlite",
    "pgbench",
    "git-build",
    "cron",
    "backup",
    "batch-build",
    "vm-guest",
    "sqlite-faults",
    "msr-bpftrace",
];

/// The fio job: a rate-limited hot random writer beside a rate-limited
/// sequential reader; the analyzer's tests check their figures against these.
pub const FIO_HOT_IOPS: u32 = 500;
pub const FIO_HOT_SIZE_MIB: u64 = 64;
pub const FIO_SCAN_MIB_S: u64 = 16;
pub const FIO_SCAN_SIZE_MIB: u64 = 256;
/// The `cron` trace's jobs: a report every this many seconds, a batch every
/// [`CRON_BATCH_S`]; the trace lasts at least [`CRON_MIN_SECS`] (six batches).
pub const CRON_REPORT_S: u64 = 6;
pub const CRON_BATCH_S: u64 = 20;
pub const CRON_MIN_SECS: u64 = 120;
/// The `backup` trace: an incremental backup every [`BACKUP_INC_S`], a full
/// one every [`BACKUP_FULL_S`]; it lasts at least [`BACKUP_MIN_SECS`].
pub const BACKUP_INC_S: u64 = 20;
pub const BACKUP_FULL_S: u64 = 60;
pub const BACKUP_MIN_SECS: u64 = 180;
/// The `batch-build` trace: a build every [`BUILD_EVERY_S`], a clean one
/// every third; it lasts at least [`BUILD_MIN_SECS`].
pub const BUILD_EVERY_S: u64 = 30;
pub const BUILD_MIN_SECS: u64 = 180;
/// The `vm-guest` trace lasts at least this long.
pub const VM_MIN_SECS: u64 = 120;
/// sqlite3 commits once per this period (plus the commit's own time).
pub const SQLITE_PERIOD_MS: u64 = 1000;

/// Everything one recording made, undone on drop.
struct Scratch {
    dir: PathBuf,
    mnt: PathBuf,
    loop_dev: Option<String>,
    mounted: bool,
    children: Vec<Child>,
    /// A `PostgreSQL` data directory whose server must be stopped.
    postgres: Option<PathBuf>,
}

impl Scratch {
    fn new(name: &str) -> Result<Scratch> {
        let dir = PathBuf::from(format!(
            "/var/tmp/tern-traces-{}-{name}",
            std::process::id()
        ));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt)
            .with_context(|| format!("cannot create {}", mnt.display()))?;
        let mut s = Scratch {
            dir,
            mnt,
            loop_dev: None,
            mounted: false,
            children: Vec::new(),
            postgres: None,
        };
        let image = s.dir.join("disk.img");
        sh::run(Command::new("truncate").args(["-s", DISK]).arg(&image))?;
        let dev = output(Command::new("losetup").args(["-f", "--show"]).arg(&image))?
            .trim()
            .to_string();
        s.loop_dev = Some(dev.clone());
        sh::run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
        s.mount()?;
        Ok(s)
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap_or_default()
    }

    fn mount(&mut self) -> Result<()> {
        sh::run(Command::new("mount").arg(self.dev()).arg(&self.mnt))?;
        self.mounted = true;
        Ok(())
    }

    /// Unmount and mount again: the file system's page cache is dropped, so the
    /// traced phase reads from the disk as a cold start would.
    fn remount(&mut self) -> Result<()> {
        sh::run(Command::new("umount").arg(&self.mnt))?;
        self.mounted = false;
        self.mount()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(data) = &self.postgres {
            let _ = pg_ctl(data, &["stop", "-m", "immediate"]).status();
        }
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` to completion within `limit`, killing it and everything it
/// started (its process group: a script's background jobs too, which would
/// otherwise keep the scratch file system busy) past that.
fn run_for(cmd: &mut Command, limit: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let mut child = cmd
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{cmd:?} failed: {status}");
            }
            return Ok(());
        }
        if t0.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `tern trace` child recording `dev` (and page faults of `pid`, if given).
struct Recording {
    child: Child,
    out: PathBuf,
}

impl Recording {
    fn start(tern: &Path, dev: &str, fault_pid: Option<u32>, out: &Path) -> Result<Recording> {
        let _ = std::fs::remove_file(out);
        let mut cmd = Command::new(tern);
        cmd.args(["trace", "--device", dev, "--quiet", "--ring-size", "32M"])
            .arg("--out")
            .arg(out);
        if let Some(pid) = fault_pid {
            cmd.args(["--pid", &pid.to_string()]);
        }
        let child = cmd
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start tern trace")?;
        let mut rec = Recording {
            child,
            out: out.to_path_buf(),
        };
        // The header on disk means the hooks are attached.
        let t0 = Instant::now();
        while !std::fs::metadata(out).is_ok_and(|m| m.len() > 0) {
            if let Some(status) = rec.child.try_wait()? {
                bail!("tern trace exited early: {status}");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                rec.kill();
                bail!("tern trace did not start within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(rec)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the tracer drains the ring and writes its end record.
    fn stop(mut self) -> Result<PathBuf> {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("tern trace exited with {status}");
                }
                return Ok(self.out.clone());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                self.kill();
                bail!("tern trace did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn pg_ctl(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &pg_bin("pg_ctl"), "-D"])
        .arg(data)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Debian keeps `PostgreSQL`'s server programs off `PATH`, under `/usr/lib/postgresql/N/bin`.
fn pg_bin(name: &str) -> String {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    versions.sort();
    versions.last().map_or_else(
        || name.to_string(),
        |v| v.join("bin").join(name).display().to_string(),
    )
}

/// One recorded trace and what it holds.
struct Recorded {
    name: &'static str,
    file: PathBuf,
    description: String,
    config: serde_json::Value,
}

fn fio(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("fio")?;
    let job = s.dir.join("job.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\ndirectory={mnt}\nioengine=psync\ndirect=1\ntime_based\nruntime={secs}\n\n\
             [hot]\nrw=randwrite\nbs=4k\nsize={hot}M\nrate_iops={FIO_HOT_IOPS}\nfilename=hot.dat\n\n\
             [scan]\nrw=read\nbs=1M\nsize={scan}M\nrate={FIO_SCAN_MIB_S}m\nfilename=scan.dat\n",
            mnt = s.mnt.display(),
            hot = FIO_HOT_SIZE_MIB,
            scan = FIO_SCAN_SIZE_MIB,
        ),
    )?;
    // Lay the files out untraced, then start cold.
    run_for(
        Command::new("fio").arg("--create_only=1").arg(&job),
        Duration::from_mins(2),
    )?;
    s.remount()?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    run_for(
        Command::new("fio").arg(&job),
        Duration::from_secs(secs + 60),
    )?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "fio",
        file,
        description: "fio: 4 KiB O_DIRECT random writes at a fixed IOPS over a file, beside a \
                      rate-limited 1 MiB sequential reader over another file"
            .into(),
        config: serde_json::json!({
            "hot": {"rw": "randwrite", "bs": 4096, "rate_iops": FIO_HOT_IOPS, "size_bytes": FIO_HOT_SIZE_MIB << 20},
            "scan": {"rw": "read", "bs": 1 << 20, "rate_bytes_per_s": FIO_SCAN_MIB_S << 20, "size_bytes": FIO_SCAN_SIZE_MIB << 20},
            "seconds": secs,
        }),
    })
}

fn sqlite(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("sqlite")?;
    let db = s.mnt.join("app.db");
    sh::run(Command::new("sqlite3").arg(&db).arg(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT); CREATE INDEX tk ON t(k);",
    ))?;
    s.remount()?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    // A periodic job: one transaction of 200 inserts, then a pause.
    let pause = SQLITE_PERIOD_MS as f64 / 1000.0;
    let script = format!(
        "end=$(($(date +%s) + {secs})); while [ $(date +%s) -lt $end ]; do \
         sqlite3 {db} 'BEGIN; INSERT INTO t(k, v) SELECT abs(random()) % 100000, hex(randomblob(100)) \
         FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<200) SELECT x FROM c); COMMIT;'; \
         sleep {pause}; done",
        db = db.display()
    );
    run_for(
        Command::new("sh").args(["-c", &script]),
        Duration::from_secs(secs + 60),
    )?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "sqlite",
        file,
        description: "sqlite3 (rollback journal): one transaction of 200 indexed inserts, then \
                      a fixed sleep, repeated"
            .into(),
        config: serde_json::json!({"sleep_ms": SQLITE_PERIOD_MS, "rows_per_txn": 200, "seconds": secs}),
    })
}

fn pgbench(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    pgbench_with(tern, out, secs, None).map(|(rec, _)| rec)
}

/// pgbench recorded by `tern trace` into `out`, and, with `msr_csv`, by
/// bpftrace into that MSR CSV over the same run.
fn pgbench_with(
    tern: &Path,
    out: &Path,
    secs: u64,
    msr_csv: Option<&Path>,
) -> Result<(Recorded, Option<msr::Summary>)> {
    let mut s = Scratch::new("pgbench")?;
    let data = s.mnt.join("pg");
    std::fs::create_dir_all(&data)?;
    sh::run(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&s.mnt),
    )?;
    sh::run(
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&s.dir),
    )?;
    run_for(
        Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &pg_bin("initdb"),
                "-A",
                "trust",
                "-D",
            ])
            .arg(&data),
        Duration::from_mins(2),
    )?;
    let sock = s.dir.clone();
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let opts = format!(
        "-c shared_buffers=16MB -c listen_addresses='' -c unix_socket_directories={} -p {port}",
        sock.display()
    );
    let start = |s: &mut Scratch| -> Result<()> {
        s.postgres = Some(data.clone());
        let status = pg_ctl(&data, &["start", "-w", "-t", "60", "-o", &opts])
            .status()
            .context("cannot run pg_ctl")?;
        if !status.success() {
            bail!("PostgreSQL did not start: {status}");
        }
        Ok(())
    };
    let stop = |s: &mut Scratch| -> Result<()> {
        let status = pg_ctl(&data, &["stop", "-w", "-t", "60", "-m", "fast"]).status()?;
        if !status.success() {
            bail!("PostgreSQL did not stop: {status}");
        }
        s.postgres = None;
        Ok(())
    };
    let pgbench = |args: &[&str]| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "pgbench", "-h"])
            .arg(&sock)
            .args(["-p", &port.to_string()])
            .args(args)
            .stderr(Stdio::null());
        c
    };
    start(&mut s)?;
    run_for(
        &mut pgbench(&["-i", "-s", "5", "-q", "postgres"]),
        Duration::from_mins(5),
    )?;
    stop(&mut s)?;
    s.remount()?;
    start(&mut s)?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    let side = msr_csv
        .map(|csv| msr::Bpftrace::start(s.dev(), csv))
        .transpose()?;
    run_for(
        &mut pgbench(&[
            "-c",
            "4",
            "-j",
            "2",
            "-R",
            "200",
            "-T",
            &secs.to_string(),
            "postgres",
        ]),
        Duration::from_secs(secs + 60),
    )?;
    let summary = side.map(msr::Bpftrace::stop).transpose()?;
    let file = rec.stop()?;
    stop(&mut s)?;
    drop(s);
    let rec = Recorded {
        name: "pgbench",
        file,
        description: "PostgreSQL pgbench TPC-B-like, scale 5, 4 clients, rate-limited to 200 \
                      transactions/s, shared_buffers 16 MB, cold cache"
            .into(),
        config: serde_json::json!({"scale": 5, "clients": 4, "rate_tps": 200, "seconds": secs}),
    };
    Ok((rec, summary))
}

/// zstd's C library as shipped inside the `zstd-sys` crate Tern builds against.
fn zstd_sources() -> Result<PathBuf> {
    let home = std::env::var("CARGO_HOME").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    );
    let registry = home.join("registry/src");
    for index in std::fs::read_dir(&registry)
        .with_context(|| format!("no crate sources in {}", registry.display()))?
        .flatten()
    {
        let mut crates: Vec<PathBuf> = std::fs::read_dir(index.path())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("zstd-sys-"))
            })
            .collect();
        crates.sort();
        if let Some(lib) = crates.last().map(|c| c.join("zstd/lib"))
            && lib.is_dir()
        {
            return Ok(lib);
        }
    }
    bail!(
        "zstd-sys sources not found under {}: run `cargo fetch` first",
        registry.display()
    )
}

fn git_build(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let s = Scratch::new("git")?;
    // The upstream repository lives outside the traced disk, as a remote would.
    let upstream = s.dir.join("zstd.git");
    sh::run(
        Command::new("cp")
            .arg("-r")
            .arg(zstd_sources()?)
            .arg(&upstream),
    )?;
    std::fs::write(
        upstream.join("Makefile"),
        "SRCS := $(wildcard common/*.c compress/*.c decompress/*.c dictBuilder/*.c)\n\
         OBJS := $(SRCS:.c=.o)\n\
         libzstd.a: $(OBJS)\n\tar rcs $@ $^\n\
         %.o: %.c\n\tgcc -O1 -g -DZSTD_DISABLE_ASM -I. -Icommon -c $< -o $@\n",
    )?;
    let git = |dir: &Path, args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(dir)
            .args(["-c", "user.name=tern", "-c", "user.email=tern@localhost"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    run_for(
        &mut git(&upstream, &["init", "-q"]),
        Duration::from_secs(30),
    )?;
    run_for(&mut git(&upstream, &["add", "-A"]), Duration::from_secs(30))?;
    run_for(
        &mut git(&upstream, &["commit", "-q", "-m", "zstd"]),
        Duration::from_secs(30),
    )?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    let work = s.mnt.join("zstd");
    run_for(
        Command::new("git")
            .args(["clone", "-q", "--no-local"])
            .arg(&upstream)
            .arg(&work),
        Duration::from_mins(2),
    )?;
    let build = run_for(
        Command::new("make")
            .arg("-C")
            .arg(&work)
            .args(["-j2", "-s"]),
        Duration::from_secs(secs),
    );
    // A slow machine may not finish the build in time: what ran is still a real trace.
    if let Err(e) = build {
        eprintln!("xtask traces: git-build: {e:#} (the trace keeps what ran)");
    }
    run_for(&mut Command::new("sync"), Duration::from_mins(1))?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "git-build",
        file,
        description: "git clone (no hard links) of zstd's C library from a local repository onto \
                      ext4, then `make -j2` of libzstd.a there, then sync"
            .into(),
        config: serde_json::json!({"build_limit_seconds": secs}),
    })
}

/// A day of periodic jobs compressed into minutes: a report that reads the
/// same 30 files every [`CRON_REPORT_S`], a batch that reads 60 other files
/// and writes a 4 MiB output every [`CRON_BATCH_S`] (the output of two runs
/// before deleted, so new outputs reuse freed blocks), and a 64 KiB log
/// append every second. Reads and writes are `O_DIRECT`, so every job's
/// reads reach the disk as they would once a cache has been evicted between
/// runs hours apart.
fn cron(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("cron")?;
    let data = s.mnt.join("data");
    std::fs::create_dir_all(&data)?;
    sh::run(Command::new("sh").args([
        "-c",
        &format!(
            "for i in $(seq 0 119); do dd if=/dev/urandom of={d}/f$i bs=512K count=1 status=none; done",
            d = data.display()
        ),
    ]))?;
    s.remount()?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    let script = format!(
        "cd {mnt}; end=$(($(date +%s) + {secs})); i=0; \
         read_files() {{ for f in $(seq $1 $2); do dd if=data/f$f of=/dev/null bs=512K iflag=direct status=none; done; }}; \
         while [ $(date +%s) -lt $end ]; do \
           dd if=/dev/zero of=app.log bs=64K count=1 oflag=direct,append conv=notrunc status=none; \
           if [ $((i % {report})) -eq 0 ]; then read_files 0 29 & fi; \
           if [ $((i % {batch})) -eq $(({batch} / 2)) ]; then \
             (read_files 30 89; dd if=/dev/zero of=out$i bs=1M count=4 oflag=direct status=none; \
              rm -f out$((i - 2 * {batch})); sync) & fi; \
           i=$((i + 1)); sleep 1; \
         done; wait",
        mnt = s.mnt.display(),
        report = CRON_REPORT_S,
        batch = CRON_BATCH_S,
    );
    run_for(
        Command::new("bash").args(["-c", &script]),
        Duration::from_secs(secs + 60),
    )?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "cron",
        file,
        description: "periodic jobs, a day compressed into minutes: a report re-reading the same \
                      15 MiB every 6 s, a batch reading 30 MiB of other files and writing a 4 MiB \
                      output every 20 s (older outputs deleted), a 64 KiB log append every second; \
                      all O_DIRECT"
            .into(),
        config: serde_json::json!({
            "report_every_s": CRON_REPORT_S,
            "report_bytes": 30 * 512 * 1024,
            "batch_every_s": CRON_BATCH_S,
            "batch_read_bytes": 60 * 512 * 1024,
            "batch_write_bytes": 4 << 20,
            "log_append_bytes_per_s": 64 * 1024,
            "seconds": secs,
        }),
    })
}

/// Drops the page cache (clean pages only) before a periodic job, as the
/// hours between two runs would: its reads reach the disk again.
const DROP_CACHE: &str = "sync; echo 1 > /proc/sys/vm/drop_caches";

/// Nightly backups compressed into minutes: an application rewrites 64 KiB
/// of two of 200 files (256 KiB each) every second (`O_DIRECT`); every
/// [`BACKUP_INC_S`] `tar --listed-incremental` archives what changed, every
/// [`BACKUP_FULL_S`] a full archive of all 50 MiB starts a new chain (the
/// chain before the last deleted). The page cache is dropped before each
/// backup.
fn backup(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("backup")?;
    let data = s.mnt.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(s.mnt.join("backups"))?;
    sh::run(Command::new("sh").args([
        "-c",
        &format!(
            "for i in $(seq 0 199); do dd if=/dev/urandom of={d}/f$i bs=256K count=1 status=none; done",
            d = data.display()
        ),
    ]))?;
    s.remount()?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    // `bk`: GNU tar exits 1 when a file changed while it read it (the
    // application writes on): a backup all the same; 2 is a failure.
    let script = format!(
        "cd {mnt}; end=$(($(date +%s) + {secs})); i=0; chain=0; jobs=; \
         bk() {{ tar --listed-incremental=backups/snar$chain \"$@\" || [ $? -eq 1 ]; }}; \
         while [ $(date +%s) -lt $end ]; do \
           for k in 1 2; do \
             dd if=/dev/urandom of=data/f$((RANDOM % 200)) bs=64K count=1 oflag=direct conv=notrunc status=none || exit 1; \
           done; \
           if [ $((i % {full})) -eq 0 ]; then \
             chain=$i; (set -e; {drop}; bk -cf backups/full$chain.tar data; \
              old=$((chain - 2 * {full})); rm -f backups/full$old.tar backups/snar$old; \
              for j in $(seq $old $((old + {full} - 1))); do rm -f backups/inc$j.tar; done; sync) & \
             jobs=\"$jobs $!\"; \
           elif [ $((i % {inc})) -eq 0 ]; then \
             (set -e; {drop}; bk -cf backups/inc$i.tar data; sync) & \
             jobs=\"$jobs $!\"; \
           fi; \
           i=$((i + 1)); sleep 1; \
         done; for j in $jobs; do wait $j || exit 1; done",
        mnt = s.mnt.display(),
        full = BACKUP_FULL_S,
        inc = BACKUP_INC_S,
        drop = DROP_CACHE,
    );
    run_for(
        Command::new("bash").args(["-c", &script]),
        Duration::from_secs(secs + 120),
    )?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "backup",
        file,
        description: "backups, nights compressed into minutes: an application rewrites 64 KiB of \
                      two of 200 files (50 MiB) every second (O_DIRECT); tar archives what \
                      changed every 20 s (--listed-incremental) and everything every 60 s, onto \
                      the same disk, older chains deleted; page cache dropped before each backup"
            .into(),
        config: serde_json::json!({
            "files": 200,
            "file_bytes": 256 * 1024,
            "rewrite_bytes_per_s": 2 * 64 * 1024,
            "incremental_every_s": BACKUP_INC_S,
            "full_every_s": BACKUP_FULL_S,
            "seconds": secs,
        }),
    })
}

/// A build server's day compressed into minutes: zstd's C library built
/// every [`BUILD_EVERY_S`] on ext4 — a clean build every third time, else
/// an incremental one after three sources changed (a commit landing) —
/// with the page cache dropped before each (the sources are read from the
/// disk again, as hours later).
fn batch_build(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("build")?;
    let src = s.mnt.join("zstd");
    sh::run(Command::new("cp").arg("-r").arg(zstd_sources()?).arg(&src))?;
    std::fs::write(
        src.join("Makefile"),
        "SRCS := $(wildcard common/*.c compress/*.c decompress/*.c dictBuilder/*.c)\n\
         OBJS := $(SRCS:.c=.o)\n\
         libzstd.a: $(OBJS)\n\tar rcs $@ $^\n\
         %.o: %.c\n\tgcc -O1 -g -DZSTD_DISABLE_ASM -I. -Icommon -c $< -o $@\n",
    )?;
    run_for(
        Command::new("make").arg("-C").arg(&src).args(["-j2", "-s"]),
        Duration::from_mins(5),
    )?;
    s.remount()?;
    let rec = Recording::start(tern, s.dev(), None, out)?;
    let script = format!(
        "cd {src}; end=$(($(date +%s) + {secs})); n=0; \
         while [ $(date +%s) -lt $end ]; do \
           start=$(date +%s); {drop}; \
           if [ $((n % 3)) -eq 0 ]; then rm -f libzstd.a */*.o; \
           else for f in $(ls common/*.c compress/*.c decompress/*.c | shuf -n 3 --random-source=<(yes $n)); do \
             echo \"/* change $n */\" >> $f; done; fi; \
           make -j2 -s >/dev/null || exit 1; sync; n=$((n + 1)); \
           left=$((start + {every} - $(date +%s))); if [ $left -gt 0 ]; then sleep $left; fi; \
         done",
        src = src.display(),
        drop = DROP_CACHE,
        every = BUILD_EVERY_S,
    );
    run_for(
        Command::new("bash").args(["-c", &script]),
        Duration::from_secs(secs + 300),
    )?;
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "batch-build",
        file,
        description:
            "a build server compressed into minutes: zstd's C library built every 30 s on \
                      ext4, clean every third time, else incremental after three sources \
                      changed; page cache dropped before each build"
                .into(),
        config: serde_json::json!({
            "build_every_s": BUILD_EVERY_S,
            "clean_every": 3,
            "changed_sources": 3,
            "seconds": secs,
        }),
    })
}

/// A VM's virtual disk: the VM tests' guest with its write workload and
/// reads beside it, traced from the host in image offsets
/// (`vm-tests/tests/record_vm.rs`, which says what the guest does).
fn vm_guest(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    sh::run(
        sh::cargo()
            .args(["test", "-p", "tern-vm-tests", "--test", "record_vm"])
            .args(["--", "--ignored", "--nocapture"])
            .env("TERN_BIN", tern)
            .env("TERN_VM_TRACE_OUT", out)
            .env("TERN_VM_TRACE_SECS", secs.to_string()),
    )?;
    Ok(Recorded {
        name: "vm-guest",
        file: out.to_path_buf(),
        description:
            "a QEMU guest's virtual disk (TCG, Debian bookworm's kernel, ext4 on virtio): \
                      every tick rewrites one of 32 files of 16 KiB, its checksum, a counter \
                      and a log, and syncs; beside it 1 MiB read at a random place of a 16 MiB \
                      file every second and the whole file every 20 s (O_DIRECT); traced from \
                      the host with `tern trace --file` (image offsets)"
                .into(),
        config: serde_json::json!({
            "disk_mib": 64,
            "random_mib": 16,
            "read_every_s": 1,
            "scan_every_s": 20,
            "seconds": secs,
        }),
    })
}

/// sqlite3 with an in-memory database fed on its standard input: its own page
/// faults (the heap growing, then queries over it), and its block I/O.
fn sqlite_faults(tern: &Path, out: &Path, secs: u64) -> Result<Recorded> {
    let mut s = Scratch::new("sqlfault")?;
    s.children.push(
        Command::new("sqlite3")
            .arg(":memory:")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start sqlite3")?,
    );
    let pid = s.children[0].id();
    let rec = Recording::start(tern, s.dev(), Some(pid), out)?;
    let mut stdin = s.children[0].stdin.take().context("sqlite3 has no stdin")?;
    let t0 = Instant::now();
    writeln!(
        stdin,
        "PRAGMA cache_size=-200000; CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB); CREATE INDEX tk ON t(k);"
    )?;
    let mut round = 0u32;
    while t0.elapsed() < Duration::from_secs(secs) {
        // Grow for a while, then keep scanning what is there: a working set that stops growing.
        if round < 8 {
            writeln!(
                stdin,
                "INSERT INTO t(k, v) SELECT abs(random()) % 1000000, randomblob(400) FROM \
                 (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<20000) SELECT x FROM c);"
            )?;
        }
        writeln!(
            stdin,
            "SELECT count(*), sum(length(v)) FROM t WHERE k % 7 = {};",
            round % 7
        )?;
        stdin.flush()?;
        round += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    writeln!(stdin, ".quit")?;
    drop(stdin);
    let t1 = Instant::now();
    while s.children[0].try_wait()?.is_none() {
        if t1.elapsed() > Duration::from_mins(1) {
            bail!("sqlite3 did not quit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = rec.stop()?;
    drop(s);
    Ok(Recorded {
        name: "sqlite-faults",
        file,
        description: "sqlite3 with an in-memory database: 8 rounds of 20000 inserts of 400-byte \
                      blobs, then repeated full scans; its page faults are traced"
            .into(),
        config: serde_json::json!({"pid_traced": pid, "insert_rounds": 8, "rows_per_round": 20000, "seconds": secs}),
    })
}

/// Records `only` (default: every workload) into `out`, `secs` seconds each.
pub fn run(tern: &Path, out: &Path, only: &[String], secs: u64) -> Result<()> {
    require_root("recording traces (loop devices, mount, eBPF)")?;
    for w in only {
        if !WORKLOADS.contains(&w.as_str()) {
            bail!(
                "unknown workload {w:?}; choose from {}",
                WORKLOADS.join(", ")
            );
        }
    }
    if !(5..=3600).contains(&secs) {
        bail!(
            "--seconds {secs}: choose between 5 and 3600 (an hour: long enough for a 10 min horizon; the busiest trace, pgbench, takes about 60 MB an hour)"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let manifest_path = out.join("manifest.json");
    let mut manifest: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string(&manifest_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
    for &name in WORKLOADS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let file = out.join(format!("{name}.trace"));
        // Periodic workloads need several periods whatever --seconds says.
        let least = match name {
            "git-build" => 60,
            "cron" => CRON_MIN_SECS,
            "backup" => BACKUP_MIN_SECS,
            "batch-build" => BUILD_MIN_SECS,
            "vm-guest" => VM_MIN_SECS,
            _ => 0,
        };
        let run = secs.max(least);
        eprintln!(
            "xtask traces: recording {name} ({run} s) into {}",
            file.display()
        );
        let rec = match name {
            "fio" => fio(tern, &file, run)?,
            "sqlite" => sqlite(tern, &file, run)?,
            "pgbench" => pgbench(tern, &file, run)?,
            "git-build" => git_build(tern, &file, run)?,
            "cron" => cron(tern, &file, run)?,
            "backup" => backup(tern, &file, run)?,
            "batch-build" => batch_build(tern, &file, run)?,
            "vm-guest" => vm_guest(tern, &file, run)?,
            "msr-bpftrace" => msr::msr_bpftrace(tern, &file, run)?,
            _ => sqlite_faults(tern, &file, run)?,
        };
        let stat = output(
            Command::new(tern)
                .args(["trace", "stat", "--json"])
                .arg(&rec.file),
        )?;
        let stat: serde_json::Value =
            serde_json::from_str(&stat).context("tern trace stat printed no JSON")?;
        eprintln!(
            "xtask traces: {name}: {} block requests, {} page faults, {} lost, {:.1} s, {} bytes",
            stat["block_events"],
            stat["fault_events"],
            stat["lost_events"],
            stat["duration_ns"].as_f64().unwrap_or(0.0) / 1e9,
            std::fs::metadata(&rec.file).map_or(0, |m| m.len()),
        );
        manifest.insert(
            rec.name.to_string(),
            serde_json::json!({
                "file": rec.file.file_name().map(|f| f.to_string_lossy().into_owned()),
                "description": rec.description,
                "config": rec.config,
                "block_events": stat["block_events"],
                "fault_events": stat["fault_events"],
                "lost_events": stat["lost_events"],
                "duration_ns": stat["duration_ns"],
            }),
        );
        std::fs::write(
            &manifest_path,
            serde_json::to_string_pretty(&manifest)? + "\n",
        )?;
    }
    eprintln!("xtask traces: manifest in {}", manifest_path.display());
    Ok(())
}
