//! The analyzer on traces of real programs, recorded with the real tracer on
//! ext4 on a loop device: fio jobs (checked against their configured rates
//! and ranges and the file's place on the disk), sqlite3 on a timer (its
//! period), pgbench (against `PostgreSQL`'s own size on disk) and a git clone +
//! C build (against the clone's size). Each recording feeds the analyzer live
//! through the session's observer, and the trace file is analyzed again
//! offline: the two reports must be identical. Needs root (CI is root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod support;

use support::{LoopDev, sh};
use tern::analyze::report::Report;
use tern::analyze::{self, Analyzer};
use tern::trace::TraceReader;
use tern::trace::fiemap::ImageMap;
use tern::trace::session::{Session, SessionConfig};
use tern::trace::stats::TraceStats;

const MIB: u64 = 1 << 20;

/// ext4 on a fresh loop device, unmounted (and the device detached) on drop.
struct Ext4 {
    mnt: tempfile::TempDir,
    lo: LoopDev,
    mounted: bool,
}

impl Ext4 {
    fn new(size: &str) -> Ext4 {
        let lo = LoopDev::new(size);
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.dev));
        let mnt = tempfile::Builder::new()
            .prefix("tern-analyze")
            .tempdir_in("/var/tmp")
            .expect("mount dir");
        let mut fs = Ext4 {
            mnt,
            lo,
            mounted: false,
        };
        fs.mount();
        fs
    }
    fn path(&self) -> &Path {
        self.mnt.path()
    }
    fn mount(&mut self) {
        sh(Command::new("mount").arg(&self.lo.dev).arg(self.mnt.path()));
        self.mounted = true;
    }
    /// Drops the file system's page cache: the traced phase starts cold.
    fn remount(&mut self) {
        sh(Command::new("umount").arg(self.mnt.path()));
        self.mounted = false;
        self.mount();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mnt.path()).status();
        }
    }
}

/// A bounded command (`timeout` kills it past `secs`) that must succeed.
fn bounded(secs: u32, args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &secs.to_string()]).args(args);
    c
}

struct Recorded {
    live: Report,
    offline: Analyzer,
    trace: PathBuf,
    _dir: tempfile::TempDir,
}

/// Traces `fs`'s device while `work` runs (on its own thread), analyzing live.
fn record(fs: &Ext4, work: impl FnOnce() + Send + 'static) -> Recorded {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("t.trace");
    let cfg = SessionConfig {
        devices: vec![fs.lo.dev.clone()],
        image: None,
        pids: Vec::new(),
        faults: false,
        fault_range: None,
        duration: None,
        ring_bytes: 32 << 20,
        out: trace.clone(),
        progress: false,
        cpu: vec![tern::trace::cpu::CpuTarget::Host],
    };
    let mut session = Session::start(&cfg).expect("tracer starts");
    let header = TraceReader::new(std::fs::File::open(&trace).expect("header on disk"))
        .expect("header")
        .header()
        .clone();
    let live = Arc::new(Mutex::new(
        Analyzer::for_header(&header, 0).expect("analyzer"),
    ));
    session.observe(analyze::live(Arc::clone(&live)));
    let worker = std::thread::spawn(work);
    while !worker.is_finished() {
        session
            .step(Duration::from_millis(10))
            .expect("session step");
    }
    let outcome = worker.join();
    for _ in 0..20 {
        session
            .step(Duration::from_millis(10))
            .expect("session step");
    }
    session.finish().expect("session finishes");
    assert!(outcome.is_ok(), "the workload failed");
    let mut a = live.lock().expect("live analyzer");
    a.finish();
    let live = Report::of(&a);
    drop(a);
    let offline = analyze::analyze_trace(&trace, 0, None).expect("offline analysis");
    Recorded {
        live,
        offline,
        trace,
        _dir: dir,
    }
}

fn same_figures(r: &Recorded) -> Report {
    let off = Report::of(&r.offline);
    // One code path: live and offline agree on every figure. Only `complete`
    // differs: the session writes its end record to the file at `finish`,
    // after the observer is gone.
    let figures = |rep: &Report| {
        let mut v = serde_json::to_value(rep).expect("json");
        v.as_object_mut().expect("an object").remove("complete");
        v
    };
    assert_eq!(
        figures(&r.live),
        figures(&off),
        "live and offline reports differ"
    );
    assert!(off.complete && !r.live.complete);
    // An independent count over the same file.
    let stats = TraceStats::from_reader(
        TraceReader::new(std::io::BufReader::new(
            std::fs::File::open(&r.trace).expect("trace"),
        ))
        .expect("reader"),
    )
    .expect("stats");
    let written = stats.op(tern::trace::Op::Write).bytes
        + stats.op(tern::trace::Op::WriteZeroes).bytes
        + stats.op(tern::trace::Op::Discard).bytes;
    assert_eq!(off.mix.write_bytes, written);
    assert_eq!(off.mix.read_bytes, stats.op(tern::trace::Op::Read).bytes);
    // Empty writes (a PREFLUSH without data) count as flushes, not writes.
    assert_eq!(
        off.mix.writes + off.mix.flushes,
        stats.op(tern::trace::Op::Write).requests
            + stats.op(tern::trace::Op::WriteZeroes).requests
            + stats.op(tern::trace::Op::Discard).requests
            + stats.op(tern::trace::Op::Flush).requests
    );
    assert_eq!(off.gaps.gaps, stats.gaps);
    // The host's CPU beside the I/O, live and offline alike (compared above).
    let host = off.cpu.first().expect("the host's CPU profile");
    assert_eq!(host.target, "host");
    assert!(host.samples > 0 && host.mean_cores > 0.0, "{host:?}");
    off
}

/// Bytes a file occupies on the device, from FIEMAP: (start, len) pairs.
fn file_extents(path: &Path) -> Vec<(u64, u64)> {
    let map = ImageMap::open(path).expect("fiemap");
    map.extents().iter().map(|e| (e.disk, e.len)).collect()
}

#[test]
fn fio_rates_and_ranges_come_out_as_configured() {
    let mut fs = Ext4::new("512M");
    let dir = fs.path().display().to_string();
    let job = format!(
        "[global]\ndirectory={dir}\nioengine=psync\ndirect=1\ntime_based\nruntime=10\n\
         [hot]\nrw=randwrite\nbs=4k\nsize=32M\nrate_iops=200\nfilename=hot.dat\n\
         [scan]\nrw=read\nbs=1M\nsize=64M\nrate=8m\nfilename=scan.dat\n"
    );
    let job_file = fs.path().join("job.fio");
    std::fs::write(&job_file, job).expect("job file");
    sh(bounded(120, &["fio", "--create_only=1"]).arg(&job_file));
    fs.remount();
    let hot = file_extents(&fs.path().join("hot.dat"));
    let scan = file_extents(&fs.path().join("scan.dat"));
    let job = job_file.clone();
    let rec = record(&fs, move || {
        sh(bounded(60, &["fio", "--output=/dev/null"]).arg(&job));
    });
    let r = same_figures(&rec);
    eprint!("{}", r.render());
    let secs = r.duration_s;
    // The configured rates, within 10 % (the trace includes fio's start and stop).
    let write_iops = r.mix.writes as f64 / 10.0;
    assert!(
        (180.0..=220.0).contains(&write_iops),
        "write IOPS {write_iops} over {secs} s"
    );
    let read_rate = r.mix.read_bytes as f64 / 10.0;
    assert!(
        (7.2 * MIB as f64..=8.8 * MIB as f64).contains(&read_rate),
        "read rate {read_rate}"
    );
    // The configured ranges: reads cover the 64 MiB scan file and nothing else;
    // data writes all fall in the hot file's blocks.
    let level = &rec.offline.levels[0];
    let inside = |extents: &[(u64, u64)], unit: u64| -> u64 {
        extents
            .iter()
            .flat_map(|&(start, len)| start / 4096..(start + len) / 4096)
            .filter(|&b| {
                if unit == 0 {
                    level.read_ever.get(b)
                } else {
                    level.written_ever.get(b)
                }
            })
            .count() as u64
            * 4096
    };
    assert_eq!(inside(&scan, 0), 64 * MIB, "the whole scan file is read");
    // Beyond it, only a few blocks of file-system metadata.
    assert!(
        r.levels[0].read_unique_bytes <= 65 * MIB,
        "{}",
        r.levels[0].read_unique_bytes
    );
    // fio keeps a random map by default: each block of the file is written once
    // per pass, so the distinct blocks written in the hot file equal its writes
    // (until the file is covered), less the few writes that are metadata.
    let big_n = 32 * MIB / 4096;
    let expected = (r.mix.writes.min(big_n) * 4096) as f64;
    let in_hot = inside(&hot, 1) as f64;
    assert!(
        (expected * 0.97..=expected).contains(&in_hot),
        "{in_hot} bytes written in the hot file, expected about {expected}"
    );
    // Anything else written is the journal (16 MiB on a 512 MiB ext4), ext4's
    // lazy inode-table initialisation and metadata.
    assert!(r.levels[0].written_unique_bytes as f64 - in_hot < 24.0 * MIB as f64);
    assert!(r.sequential.read_fraction > 0.9, "{:?}", r.sequential);
    // fio's random writes continue no run; the sequential written bytes are
    // ext4's (journal, lazy inode-table initialisation): 38 % in one run.
    assert!(r.sequential.write_fraction < 0.6, "{:?}", r.sequential);
    // A steady writer: the 4 KiB dirty rate's median is near 200 × 4 KiB/s
    // (fewer once blocks repeat within a second, which is rare here).
    let d = r.levels[0].dirty_rate.p50;
    assert!(
        (600.0 * 1024.0..=880.0 * 1024.0).contains(&d),
        "dirty rate p50 {d}"
    );
}

#[test]
fn sqlite3_on_a_timer_has_its_period_found() {
    let fs = Ext4::new("256M");
    let db = fs.path().join("app.db");
    sh(Command::new("sqlite3")
        .arg(&db)
        .arg("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"));
    let script = format!(
        "for i in $(seq 30); do sqlite3 {} 'BEGIN; INSERT INTO t(v) SELECT hex(randomblob(200)) FROM \
         (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<100) SELECT x FROM c); COMMIT;'; \
         sleep 0.5; done",
        db.display()
    );
    let rec = record(&fs, move || {
        sh(&mut bounded(120, &["sh", "-c", &script]));
    });
    let r = same_figures(&rec);
    eprint!("{}", r.render());
    let p = r.periods.first().expect("a period is found");
    // The sleep plus sqlite3's own run time.
    assert!((0.5..=0.8).contains(&p.seconds), "{:?}", r.periods);
    assert!(r.mix.writes > 0 && r.mix.flushes > 0);
}

/// Stops a `PostgreSQL` server on drop, on every path.
struct Stop(Vec<String>);
impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["-k", "5", "60", "runuser", "-u", "postgres", "--"])
            .args(&self.0)
            .status();
    }
}

#[test]
fn pgbench_writes_stay_within_the_database_and_journal() {
    let mut fs = Ext4::new("512M");
    let data = fs.path().join("pg");
    std::fs::create_dir_all(&data).expect("data dir");
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(fs.path()));
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask setup)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .max()
        .expect("a PostgreSQL version");
    let as_pg = |secs: u32, args: &[&str]| {
        let mut c = bounded(secs, &["runuser", "-u", "postgres", "--"]);
        c.args(args);
        c
    };
    let tool = |name: &str| bin.join(name).display().to_string();
    sh(as_pg(120, &[&tool("initdb"), "-A", "trust", "-D"]).arg(&data));
    let sock = fs.path().display().to_string();
    let port = (30_000 + std::process::id() % 20_000).to_string();
    let opts = format!(
        "-c shared_buffers=16MB -c listen_addresses='' -c unix_socket_directories={sock} -p {port}"
    );
    // The server logs to a file, not to pg_ctl's pipes (which it would hold open).
    let log = fs.path().join("pg.log").display().to_string();
    let pg_ctl = |args: &[&str]| {
        let mut c = as_pg(
            90,
            &[
                &tool("pg_ctl"),
                "-D",
                &data.display().to_string(),
                "-l",
                &log,
            ],
        );
        c.args(args);
        c
    };
    let stop_args: Vec<String> = [
        &tool("pg_ctl"),
        "-D",
        &data.display().to_string(),
        "stop",
        "-m",
        "immediate",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    sh(&mut pg_ctl(&["start", "-w", "-o", &opts]));
    let stop = Stop(stop_args);
    let pgbench = |secs: u32, args: &[&str]| {
        let mut c = as_pg(secs, &["pgbench", "-h", &sock, "-p", &port]);
        c.args(args);
        c
    };
    sh(&mut pgbench(120, &["-i", "-s", "2", "-q", "postgres"]));
    sh(&mut pg_ctl(&["stop", "-w", "-m", "fast"]));
    fs.remount();
    sh(&mut pg_ctl(&["start", "-w", "-o", &opts]));
    let mut run = pgbench(
        60,
        &["-c", "2", "-j", "2", "-R", "100", "-T", "8", "postgres"],
    );
    let rec = record(&fs, move || {
        sh(&mut run);
    });
    drop(stop);
    let r = same_figures(&rec);
    eprint!("{}", r.render());
    let du: u64 = sh(Command::new("du").args(["-s", "-B1"]).arg(&data))
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a size");
    // Every written block is in the database's files, its WAL, or the ext4
    // journal and metadata (the journal of a 512 MiB ext4 is 16 MiB).
    let written = r.levels[0].written_unique_bytes;
    assert!(written > MIB, "pgbench wrote {written} bytes");
    assert!(written < du + 24 * MIB, "{written} written vs {du} on disk");
    // TPC-B updates random rows: mostly random I/O, and a commit flush per transaction.
    assert!(
        r.mix.flushes >= 400,
        "{} flushes for about 800 transactions",
        r.mix.flushes
    );
    assert!(r.hot_sets.iter().any(|h| h.write_hot_extents > 0));
}

/// zstd's C library as shipped in the `zstd-sys` crate this project builds against.
fn zstd_sources() -> PathBuf {
    let home = std::env::var("CARGO_HOME").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cargo"),
        PathBuf::from,
    );
    std::fs::read_dir(home.join("registry/src"))
        .expect("crate sources (cargo fetch)")
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("zstd-sys-"))
        })
        .map(|p| p.join("zstd/lib"))
        .filter(|p| p.is_dir())
        .max()
        .expect("zstd-sys sources in the cargo registry")
}

#[test]
fn a_git_clone_and_build_writes_its_tree_sequentially() {
    let fs = Ext4::new("512M");
    // The upstream repository lives outside the traced disk, as a remote would.
    let upstream = tempfile::tempdir().expect("upstream dir");
    let repo = upstream.path().join("zstd");
    sh(Command::new("cp").arg("-r").arg(zstd_sources()).arg(&repo));
    std::fs::write(
        repo.join("Makefile"),
        "SRCS := $(wildcard common/*.c decompress/*.c)\nOBJS := $(SRCS:.c=.o)\n\
         libzstd_d.a: $(OBJS)\n\tar rcs $@ $^\n\
         %.o: %.c\n\tgcc -O0 -DZSTD_DISABLE_ASM -I. -Icommon -c $< -o $@\n",
    )
    .expect("Makefile");
    let git = |args: &[&str]| {
        let mut c = bounded(60, &["git", "-C", &repo.display().to_string()]);
        c.args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
            .args(args);
        c
    };
    sh(&mut git(&["init", "-q"]));
    sh(&mut git(&["add", "-A"]));
    sh(&mut git(&["commit", "-q", "-m", "zstd"]));
    let work = fs.path().join("zstd");
    let work2 = work.clone();
    let rec = record(&fs, move || {
        sh(bounded(120, &["git", "clone", "-q", "--no-local"])
            .arg(&repo)
            .arg(&work2));
        sh(&mut bounded(
            300,
            &["make", "-s", "-j2", "-C", &work2.display().to_string()],
        ));
        sh(&mut bounded(60, &["sync"]));
    });
    let r = same_figures(&rec);
    eprint!("{}", r.render());
    let du: u64 = sh(Command::new("du").args(["-s", "-B1"]).arg(&work))
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a size");
    assert!(
        work.join("libzstd_d.a").exists(),
        "the build produced its library"
    );
    let written = r.levels[0].written_unique_bytes;
    // After sync the whole tree (sources, .git, objects) is on the disk; beyond
    // it only the journal and metadata (the journal of a 512 MiB ext4 is 16 MiB).
    assert!(
        written as f64 >= du as f64 * 0.9,
        "{written} written, {du} in the tree"
    );
    assert!(
        written < du + 24 * MIB,
        "{written} written, {du} in the tree"
    );
    assert!(r.sequential.write_fraction > 0.3, "{:?}", r.sequential);
}
