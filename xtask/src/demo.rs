//! The demo, Tern's main job end to end: ext4 on a loop device with a live
//! workload (fio with fsync, sqlite3 transactions) migrated by `tern migrate`
//! to a `tern agent --role destination` over mutual TLS, the file system
//! frozen for the cutover; then the destination is checked byte for byte
//! against the paused source, with `e2fsck` and with sqlite's integrity check.
//! Cleans up on every path. A destination that differs says which blocks and
//! keeps the source's trace and status in `target/demo-failure`
//! (`TERN_DEMO_KEEP=DIR` keeps both images there too).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{self, output, require_root};

const SIZE: &str = "512M";
const SIZE_BYTES: u64 = 512 << 20;

/// Everything the demo made, undone on drop (also when a step fails).
struct Scratch {
    dir: PathBuf,
    loop_dev: Option<String>,
    mounted: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for m in self.mounted.iter().rev() {
            // Only in case a failure left it frozen: "not frozen" is the usual answer.
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(m)
                .stderr(std::process::Stdio::null())
                .status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        for m in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The live workload: fio random read/write with fsync and a sqlite3 writer, until killed.
fn start_workload(mnt: &Path, s: &mut Scratch) -> Result<()> {
    let fio = Command::new("fio")
        .args([
            "--name=demo",
            &format!("--directory={}", mnt.display()),
            "--rw=randrw",
            "--rwmixread=60",
            "--bs=4k",
            "--size=64M",
            "--ioengine=psync",
            "--direct=1",
            "--fsync=16",
            "--rate_iops=400",
            "--runtime=600",
            "--time_based",
            // One process, so killing it stops every job.
            "--thread",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start fio")?;
    s.children.push(fio);
    let db = mnt.join("demo.db");
    let script = format!(
        "sqlite3 {db} 'PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);' >/dev/null; \
         while true; do sqlite3 {db} 'BEGIN; INSERT INTO t(v) SELECT hex(randomblob(64)) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<100) SELECT x FROM c); COMMIT;'; done",
        db = db.display()
    );
    let sqlite = Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .context("cannot start the sqlite3 writer")?;
    s.children.push(sqlite);
    Ok(())
}

fn wait_listening(port: u16, agent: &mut Child) -> Result<()> {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = agent.try_wait()? {
            bail!("the destination agent exited early: {status}");
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the destination agent did not listen within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Checks a WAL-mode sqlite database as the application would find it after
/// the cutover: the database and its write-ahead log are copied out of the
/// (read-only) mount into `scratch`, where sqlite can replay the log, then
/// `PRAGMA integrity_check` must answer exactly `ok`. Returns the rows in `t`.
fn check_sqlite(db: &Path, scratch: &Path) -> Result<u64> {
    std::fs::create_dir_all(scratch)?;
    let copy = scratch.join("demo.db");
    std::fs::copy(db, &copy).with_context(|| format!("cannot copy {}", db.display()))?;
    let wal = db.with_file_name("demo.db-wal");
    if wal.exists() {
        std::fs::copy(&wal, scratch.join("demo.db-wal"))
            .with_context(|| format!("cannot copy {}", wal.display()))?;
    }
    let out = output(
        Command::new("sqlite3")
            .arg(&copy)
            .arg("PRAGMA integrity_check; SELECT 'rows=' || count(*) FROM t;"),
    )?;
    let mut lines = out.lines();
    if lines.next() != Some("ok") {
        bail!("integrity_check: {}", out.trim());
    }
    lines
        .find_map(|l| l.strip_prefix("rows="))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no row count in sqlite3's answer: {out:?}"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads a device with `O_DIRECT` (its page cache may be stale under a mounted file system).
fn read_direct(path: &str) -> Result<Vec<u8>> {
    let out = Command::new("dd")
        .args([
            &format!("if={path}"),
            "iflag=direct",
            "bs=1M",
            "status=none",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "reading {path} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Keeps what explains a failed check (the source's trace of the
/// migration and its status file) in `target/demo-failure`, outside the
/// scratch directory that is cleaned up.
fn failure_evidence(scratch: &Path, status_file: &Path) -> Result<PathBuf> {
    let keep = PathBuf::from("target/demo-failure");
    std::fs::create_dir_all(&keep)?;
    for (from, name) in [
        (scratch.join("source.trace"), "source.trace"),
        (status_file.to_path_buf(), "status.json"),
    ] {
        std::fs::copy(&from, keep.join(name))
            .with_context(|| format!("cannot keep {}", from.display()))?;
    }
    Ok(std::fs::canonicalize(&keep)?)
}

#[expect(
    clippy::too_many_lines,
    reason = "the demo's script, step by step, as the user reads its output"
)]
pub fn run(tern: &Path) -> Result<()> {
    require_root("the demo (loop devices, mount, eBPF)")?;
    let dir = PathBuf::from(format!("/var/tmp/tern-demo-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let mut s = Scratch {
        dir: dir.clone(),
        loop_dev: None,
        mounted: Vec::new(),
        children: Vec::new(),
    };
    let image = dir.join("src.img");
    sh::run(Command::new("truncate").args(["-s", SIZE]).arg(&image))?;
    let dev = output(Command::new("losetup").args(["-f", "--show"]).arg(&image))?
        .trim()
        .to_string();
    s.loop_dev = Some(dev.clone());
    eprintln!(
        "demo: source {dev} ({SIZE}, backed by {}), making ext4",
        image.display()
    );
    sh::run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
    sh::run(Command::new("mount").arg(&dev).arg(&mnt))?;
    s.mounted.push(mnt.clone());

    eprintln!(
        "demo: destination agent (mutual TLS on loopback, NBD export read-only until cutover)"
    );
    sh::run(
        Command::new(tern)
            .args(["certs", "init"])
            .arg(dir.join("pki"))
            .args(["--host", "localhost"]),
    )?;
    let (grpc, nbd) = (free_port()?, free_port()?);
    let dst = dir.join("dst.img");
    let mut agent = Command::new(tern)
        .args(["agent", "--role", "destination", "--image"])
        .arg(&dst)
        .args(["--size", &SIZE_BYTES.to_string()])
        .args(["--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--nbd", &format!("127.0.0.1:{nbd}")])
        .arg("--tls-dir")
        .arg(dir.join("pki/localhost"))
        .spawn()
        .context("cannot start the destination agent")?;
    wait_listening(grpc, &mut agent)?;
    s.children.push(agent);

    eprintln!("demo: workload running on the source: fio 4 KiB randrw with fsync, sqlite3 inserts");
    start_workload(&mnt, &mut s)?;
    std::thread::sleep(Duration::from_secs(3));

    eprintln!(
        "demo: tern migrate — bulk copy, delta rounds, fsfreeze, final delta, verify, switch"
    );
    let out = Command::new(tern)
        .args([
            "migrate",
            "--device",
            &dev,
            "--to",
            &format!("127.0.0.1:{grpc}"),
        ])
        .arg("--tls-dir")
        .arg(dir.join("pki/localhost"))
        .args(["--domain", "localhost", "--max-downtime", "100ms"])
        .arg("--pause")
        .arg(format!("fsfreeze:{}", mnt.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--trace-out")
        .arg(dir.join("source.trace"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run tern migrate")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("tern migrate failed ({}): {stdout}", out.status);
    }
    eprint!("{stdout}");
    // What `tern status` shows: the finished run and its report.
    let shown = Command::new(tern)
        .args(["status", "--json", "--state-dir"])
        .arg(dir.join("state"))
        .output()
        .context("cannot run tern status")?;
    if !shown.status.success() {
        bail!(
            "tern status failed: {}",
            String::from_utf8_lossy(&shown.stderr).trim()
        );
    }
    let status: serde_json::Value =
        serde_json::from_slice(&shown.stdout).context("tern status --json printed no JSON")?;
    let status_file = dir.join("status.json");
    std::fs::write(&status_file, &shown.stdout)?;
    if status["finished"] != true {
        bail!("the status file does not say the migration finished: {status}");
    }
    let report = &status["report"];

    // The source is still frozen at the cutover point: the destination must equal it.
    let a = read_direct(&dev)?;
    let b = std::fs::read(&dst)?;
    if a != b {
        let at = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        // Which blocks, and whether the destination's disk (O_DIRECT) agrees
        // with its page cache: what tells a missed write from a stale cache.
        let differing: Vec<usize> = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect();
        let dst_direct = read_direct(&dst.display().to_string())?;
        let evidence = failure_evidence(&dir, &status_file)?;
        if let Ok(keep) = std::env::var("TERN_DEMO_KEEP") {
            // The images too (1 GiB): only when asked.
            let keep = PathBuf::from(keep);
            std::fs::create_dir_all(&keep)?;
            std::fs::write(keep.join("src.img"), &a)?;
            std::fs::write(keep.join("dst.img"), &b)?;
        }
        bail!(
            "the destination differs from the paused source at byte {at}: {} blocks of 4 KiB \
             (first: {:?}); the destination's disk read with O_DIRECT {} its page cache and {} \
             the source; the source trace and status are kept in {}",
            differing.len(),
            &differing[..differing.len().min(8)],
            if dst_direct == b {
                "matches"
            } else {
                "differs from"
            },
            if dst_direct == a {
                "matches"
            } else {
                "differs from"
            },
            evidence.display()
        );
    }
    eprintln!(
        "demo: destination is byte-identical to the paused source ({} bytes)",
        a.len()
    );
    let nbd_check = output(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &image.display().to_string(),
        &format!("nbd://127.0.0.1:{nbd}/tern"),
    ]));
    eprintln!(
        "demo: qemu-img compare source vs the destination's NBD export: {}",
        nbd_check.as_deref().map_or("differ", str::trim)
    );

    // Stop the (frozen) workload on the source; the destination is primary now.
    for c in s.children.iter_mut().skip(1) {
        let _ = c.kill();
    }
    sh::run(Command::new("fsfreeze").arg("-u").arg(&mnt))?;
    let fsck = Command::new("e2fsck").arg("-fn").arg(&dst).output()?;
    eprintln!(
        "demo: e2fsck -fn on the destination: {}",
        if fsck.status.success() {
            "clean"
        } else {
            "ERRORS"
        }
    );
    let check = dir.join("check");
    std::fs::create_dir_all(&check)?;
    sh::run(
        Command::new("mount")
            .args(["-o", "ro,noload"])
            .arg(&dst)
            .arg(&check),
    )?;
    s.mounted.push(check.clone());
    let db = check_sqlite(&check.join("demo.db"), &dir.join("db-check"));
    eprintln!(
        "demo: sqlite3 integrity_check on the destination's database: {}",
        match &db {
            Ok(rows) => format!("ok, {rows} rows"),
            Err(e) => format!("FAILED: {e:#}"),
        }
    );
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    eprintln!(
        "demo: {} — downtime {:.1} ms (pause {:.1}, flush {:.1}, final delta {:.1} ms for {:.2} MB, verify {:.1}, switch {:.1}); {} delta rounds; {:.1} MB sent ({:.1} MB on the wire, {:.1} MB of zeroes skipped) in {:.1} s",
        report["outcome"].as_str().unwrap_or("?"),
        f("downtime_ms"),
        f("pause_ms"),
        f("flush_ms"),
        f("final_round_ms"),
        f("final_delta_bytes") / 1e6,
        f("verify_ms"),
        f("switch_ms"),
        f("rounds"),
        f("sent_bytes") / 1e6,
        f("wire_bytes") / 1e6,
        f("skipped_zero_bytes") / 1e6,
        f("total_seconds"),
    );
    if !fsck.status.success() || db.is_err() {
        bail!("the destination's file system or database did not check clean");
    }
    drop(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(db: &Path, sql: &str) {
        let st = Command::new("sqlite3")
            .arg(db)
            .arg(sql)
            .stdout(Stdio::null())
            .status()
            .expect("sqlite3 is installed by `cargo xtask setup`");
        assert!(st.success(), "sqlite3 {sql}");
    }

    const MAKE: &str = "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; \
        CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
        INSERT INTO t(v) SELECT hex(randomblob(64)) FROM (WITH RECURSIVE c(x) AS \
        (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<2000) SELECT x FROM c);";

    /// A database caught as the demo catches its writer's: the writer still
    /// has it open, its rows only in the write-ahead log. The files are
    /// copied into `dir/ro` while it is open (sqlite folds the log back into
    /// the database, and deletes it, when the last connection closes).
    fn live_wal_copy(dir: &Path) -> PathBuf {
        use std::io::{BufRead, BufReader, Write};

        let db = dir.join("demo.db");
        let mut writer = Command::new("sqlite3")
            .arg(&db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sqlite3 is installed by `cargo xtask setup`");
        let mut stdin = writer.stdin.take().expect("piped");
        writeln!(stdin, "{MAKE}\n.print done").expect("to sqlite3");
        // `journal_mode` answers "wal" first.
        let done = BufReader::new(writer.stdout.take().expect("piped"))
            .lines()
            .map(|l| l.expect("from sqlite3"))
            .any(|l| l == "done");
        assert!(done, "sqlite3 made the database");
        let ro = dir.join("ro");
        std::fs::create_dir(&ro).expect("a directory");
        for f in ["demo.db", "demo.db-wal"] {
            std::fs::copy(dir.join(f), ro.join(f)).expect("copy while open");
        }
        drop(stdin);
        writer.wait().expect("sqlite3 exits");
        ro.join("demo.db")
    }

    #[test]
    fn sqlite_check_reads_rows_still_in_the_wal() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = live_wal_copy(dir.path());
        assert!(
            db.with_file_name("demo.db-wal")
                .metadata()
                .expect("wal")
                .len()
                > 0
        );
        // The rows are in the log only: the database file alone has none.
        let main_only = dir.path().join("main-only");
        std::fs::create_dir(&main_only).expect("a directory");
        std::fs::copy(&db, main_only.join("demo.db")).expect("copy");
        assert!(check_sqlite(&main_only.join("demo.db"), &dir.path().join("s1")).is_err());
        let rows =
            check_sqlite(&db, &dir.path().join("s2")).expect("an intact database checks clean");
        assert_eq!(rows, 2000);
    }

    #[test]
    fn sqlite_check_fails_on_a_corrupt_database() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("demo.db");
        sqlite(&db, MAKE);
        // Garbage over the table's pages past the schema page.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open the database");
        f.seek(SeekFrom::Start(3 * 4096)).expect("seek");
        f.write_all(&[0x5a; 4 * 4096]).expect("corrupt");
        drop(f);
        let err = check_sqlite(&db, &dir.path().join("scratch"))
            .expect_err("a corrupt database must not check clean");
        assert!(
            format!("{err:#}").contains("integrity_check")
                || format!("{err:#}").contains("malformed"),
            "{err:#}"
        );
    }
}
