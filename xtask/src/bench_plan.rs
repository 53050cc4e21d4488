//! `cargo xtask bench plan`: the migration simulator against a real
//! migration, and the granularity controller's what-if tables for traces of
//! real programs.
//!
//! 1. Validation: a loop device (random data) under fio 4 KiB
//!    random writes is migrated by `tern migrate` through a veth pair into a
//!    network namespace shaped by `tbf`, recording the source's trace
//!    (`--trace-out`). `tern plan` then simulates that trace with the same
//!    link and knobs (4 KiB units, 64 KiB regions, 1 MiB extents), and the
//!    simulated bytes, rounds and downtime are set against the measured ones.
//! 2. What-if tables: `tern plan` on the traces in `/work/traces` (or
//!    `TERN_TRACES`) made by `cargo xtask traces`: fio, pgbench, sqlite3.
//!
//! Environment: `TERN_BENCH_PLAN_MIB` (image, default 512),
//! `TERN_BENCH_PLAN_IOPS` (fio rate, default `500,2000`), `TERN_BENCH_PLAN_LINK`
//! (tbf rate, default `200mbit`), `TERN_BENCH_PLAN_MIGRATE_BIN` (a `tern` for
//! the real migrations only, e.g. an older release build), `TERN_BENCH_PLAN_LINK`
//! (tbf rate, default `200mbit`), `TERN_BENCH_PLAN_DOWNTIME` (default
//! `100ms`), `TERN_BENCH_PLAN_PARTS` (`validate,whatif`), `TERN_BENCH_DIR`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench_migrate::{Loop, Netns, NetnsSpec, TempDir, fio_writes};
use crate::sh::{output, run as run_cmd};

const HOST_ADDR: &str = "10.213.79.1";
const NS_ADDR: &str = "10.213.79.2";
const NETNS: NetnsSpec = NetnsSpec {
    tag: "plan",
    veth: "tbp",
    host_addr: HOST_ADDR,
    ns_addr: NS_ADDR,
};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn run(tern: &Path) -> Result<()> {
    crate::sh::require_root("cargo xtask bench plan (loop devices, eBPF, namespaces)")?;
    let parts = env("TERN_BENCH_PLAN_PARTS", "validate,whatif");
    let mut out = String::new();
    if parts.contains("validate") {
        out += &validate(tern)?;
    }
    if parts.contains("whatif") {
        out += &whatif(tern)?;
    }
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

/// `tern plan … --json` on a trace.
fn plan_json(tern: &Path, trace: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let text = output(
        Command::new("timeout")
            .arg("600")
            .arg(tern)
            .arg("plan")
            .arg(trace)
            .args(args)
            .arg("--json"),
    )?;
    serde_json::from_str(&text).context("parse tern plan --json")
}

fn whatif(tern: &Path) -> Result<String> {
    let dir = PathBuf::from(env("TERN_TRACES", "/work/traces"));
    let mut t = String::new();
    for name in ["fio", "pgbench", "sqlite"] {
        let trace = dir.join(format!("{name}.trace"));
        if !trace.exists() {
            writeln!(
                t,
                "{}: missing (run `cargo xtask traces`)\n",
                trace.display()
            )?;
            continue;
        }
        let text = output(
            Command::new("timeout")
                .arg("600")
                .arg(tern)
                .arg("plan")
                .arg(&trace)
                .args([
                    "--bandwidth",
                    "1Gbit",
                    "--rtt",
                    "1ms",
                    "--max-downtime",
                    "50ms",
                ]),
        )?;
        writeln!(
            t,
            "What-if: tern plan {} --bandwidth 1Gbit --rtt 1ms --max-downtime 50ms\n{text}",
            trace.display()
        )?;
    }
    Ok(t)
}

#[expect(
    clippy::too_many_lines,
    reason = "one validation scenario read top to bottom"
)]
fn validate(tern: &Path) -> Result<String> {
    let mib: u64 = env("TERN_BENCH_PLAN_MIB", "512")
        .parse()
        .context("TERN_BENCH_PLAN_MIB")?;
    let link = env("TERN_BENCH_PLAN_LINK", "200mbit");
    let downtime = env("TERN_BENCH_PLAN_DOWNTIME", "100ms");
    let rates: Vec<u32> = env("TERN_BENCH_PLAN_IOPS", "500,2000")
        .split(',')
        .map(|r| r.trim().parse())
        .collect::<Result<_, _>>()
        .context("TERN_BENCH_PLAN_IOPS: comma-separated IOPS")?;
    let base = PathBuf::from(env("TERN_BENCH_DIR", "/var/tmp"));
    let dir = TempDir::create(base.join(format!("tern-bench-plan-{}", std::process::id())))?;
    let img = dir.path.join("src.img");
    random_image(&img, mib)?;
    // Random data everywhere: neither the zero skip nor zstd changes the
    // bytes, so the comparison is about rounds and timing, not content.
    let migrate_bin =
        std::env::var_os("TERN_BENCH_PLAN_MIGRATE_BIN").map_or(tern.to_path_buf(), PathBuf::from);
    let dev = Loop::attach(&img)?;
    let ns = Netns::create(&NETNS, &link)?;
    let certs = dir.path.join("certs");
    run_cmd(
        Command::new(tern)
            .args(["certs", "init"])
            .arg(&certs)
            .args(["--host", "localhost", "--host", NS_ADDR])
            .stderr(Stdio::null()),
    )?;
    let mut t = format!(
        "Simulator against real migrations: {mib} MiB loop device (random data), fio 4 KiB random writes, \
         tbf {link} veth into a namespace, --max-downtime {downtime}, 4K units, 64K regions, 1M extents\n\
         (sim: `tern plan TRACE --bandwidth {link} --rtt 0.2ms --no-repeat --max-downtime {downtime}`, 4K row, on the source trace the migration recorded)\n"
    );
    writeln!(
        t,
        "{:>6} {:<5} {:>8} {:>9} {:>8} {:>7} {:>12} {:>10} {:>8}",
        "IOPS",
        "",
        "sent MB",
        "wire MB",
        "final MB",
        "rounds",
        "downtime ms",
        "final ms",
        "total s"
    )?;
    for &iops in &rates {
        let dst = dir.path.join("dst.img");
        std::fs::remove_file(&dst).ok();
        let grpc: SocketAddr = format!("{NS_ADDR}:7443").parse()?;
        let mut agent = Guard::spawn(
            Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(&migrate_bin)
                .args(["agent", "--role", "destination", "--image"])
                .arg(&dst)
                .args([
                    "--size",
                    &(mib << 20).to_string(),
                    "--grpc",
                    &grpc.to_string(),
                ])
                .args(["--nbd", "127.0.0.1:10809", "--tls-dir"])
                .arg(certs.join(NS_ADDR))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_listening(grpc)?;
        let fio = Guard::spawn(&mut fio_writes("plan", &dev.dev, iops))?;
        std::thread::sleep(Duration::from_secs(2));
        let trace = dir.path.join(format!("src-{iops}.trace"));
        let pause = format!("cmd:kill -STOP {pid};;kill -CONT {pid}", pid = fio.pid());
        let out = Command::new("timeout")
            .arg("600")
            .arg(&migrate_bin)
            .args([
                "migrate",
                "--device",
                &dev.dev,
                "--to",
                &grpc.to_string(),
                "--tls-dir",
            ])
            .arg(certs.join("localhost"))
            .arg("--trace-out")
            .arg(&trace)
            .arg("--state-dir")
            .arg(dir.path.join("state"))
            .args(["--pause", &pause, "--max-downtime", &downtime, "--json"])
            // The simulator's region size, whatever migrate's default.
            .args(["--region-size", "64K"])
            .stderr(Stdio::null())
            .output()
            .context("run tern migrate")?;
        drop(fio);
        agent.stop();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(json_line) = stdout.lines().rev().find(|l| l.starts_with('{')) else {
            writeln!(t, "{iops:>6} tern migrate failed ({})", out.status)?;
            continue;
        };
        let real: serde_json::Value = serde_json::from_str(json_line)?;
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let sim_all = plan_json(
            tern,
            &trace,
            &[
                "--bandwidth",
                &link,
                "--no-repeat",
                "--max-downtime",
                &downtime,
                "--rtt",
                "0.2ms",
            ],
        )?;
        let sim = sim_all["choices"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "4K"))
            .context("tern plan has no 4K row")?["report"]
            .clone();
        let rows = [
            (
                "real",
                f(&real, "sent_bytes"),
                f(&real, "wire_bytes"),
                f(&real, "final_delta_bytes"),
                f(&real, "rounds"),
                f(&real, "downtime_ms"),
                f(&real, "final_round_ms"),
                f(&real, "total_seconds"),
            ),
            (
                "sim",
                f(&sim, "sent_bytes"),
                f(&sim, "wire_bytes"),
                f(&sim, "final_delta_bytes"),
                f(&sim, "rounds"),
                f(&sim, "downtime_s") * 1e3,
                f(&sim, "final_round_s") * 1e3,
                f(&sim, "total_s"),
            ),
        ];
        for (who, sent, wire, fin, rounds, down, fin_ms, total) in rows {
            writeln!(
                t,
                "{iops:>6} {who:<5} {:>8.1} {:>9.1} {:>8.2} {:>7} {:>12.1} {:>10.1} {:>8.2}",
                sent / 1e6,
                wire / 1e6,
                fin / 1e6,
                rounds,
                down,
                fin_ms,
                total
            )?;
        }
        writeln!(
            t,
            "{iops:>6} downtime parts ms: real pause/flush/final/verify {:.0}/{:.0}/{:.0}/{:.0}, sim final/verify {:.0}/{:.0}",
            f(&real, "pause_ms"),
            f(&real, "flush_ms"),
            f(&real, "final_round_ms"),
            f(&real, "verify_ms"),
            f(&sim, "final_round_s") * 1e3,
            f(&sim, "verify_s") * 1e3
        )?;
        let err = |a: f64, b: f64| 100.0 * (b - a) / a;
        writeln!(
            t,
            "{iops:>6} error {:>7.1}% {:>8.1}% {:>8} {:>7} {:>11.1}% {:>9.1}% {:>7.1}%   (real {}, sim {})",
            err(rows[0].1, rows[1].1),
            err(rows[0].2, rows[1].2),
            "",
            format!("{:+}", rows[1].4 - rows[0].4),
            err(rows[0].5, rows[1].5),
            err(rows[0].6, rows[1].6),
            err(rows[0].7, rows[1].7),
            real["outcome"].as_str().unwrap_or("?"),
            if sim["converged"].as_bool() == Some(true) {
                "converged"
            } else {
                "not converging"
            }
        )?;
        // Keep the trace for a later look when asked.
        if let Ok(keep) = std::env::var("TERN_BENCH_PLAN_KEEP") {
            std::fs::copy(
                &trace,
                Path::new(&keep).join(format!("migrate-{iops}.trace")),
            )
            .ok();
        }
    }
    t.push('\n');
    Ok(t)
}

/// Random data (xorshift), written whole.
fn random_image(path: &Path, mib: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()?;
    Ok(())
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the destination agent did not listen on {addr} within 20 s")
}

/// A child stopped (SIGCONT, SIGTERM, then SIGKILL after 10 s) when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn spawn(cmd: &mut Command) -> Result<Guard> {
        Ok(Guard(Some(
            cmd.stdin(Stdio::null()).spawn().context("start a child")?,
        )))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        for sig in ["-CONT", "-TERM"] {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
