//! `cargo xtask bench rpc`: gRPC extent ingest over loopback with mutual TLS.
//!
//! Starts `tern agent --role destination` and pushes a file into it with
//! `tern replica push` (which prints a JSON report), for incompressible and
//! compressible data, raw and zstd, and checks the destination byte for byte.
//! Target: at least 1 GB/s. Both ends share this machine's cores, so the
//! figure is a floor for two real hosts.
//!
//! Environment: `TERN_BENCH_RPC_MIB` (default 1024), `TERN_BENCH_RPC_RUNS` (default 3).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const TARGET_GBPS: f64 = 1.0;

struct Case {
    data: &'static str,
    mode: &'static str,
    args: &'static [&'static str],
}

const CASES: [Case; 4] = [
    Case {
        data: "incompressible",
        mode: "raw",
        args: &["--raw"],
    },
    Case {
        data: "incompressible",
        mode: "zstd-1",
        args: &["--zstd-level", "1"],
    },
    Case {
        data: "text-like",
        mode: "raw",
        args: &["--raw"],
    },
    Case {
        data: "text-like",
        mode: "zstd-1",
        args: &["--zstd-level", "1"],
    },
];

pub fn run(tern_bin: &Path) -> Result<()> {
    let mib: u64 = env_or("TERN_BENCH_RPC_MIB", 1024)?;
    let runs: usize = env_or("TERN_BENCH_RPC_RUNS", 3)?;
    let dir = std::env::temp_dir().join(format!("tern-bench-rpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = bench(tern_bin, &dir, mib, runs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(tern_bin: &Path, dir: &Path, mib: u64, runs: usize) -> Result<()> {
    let certs = dir.join("certs");
    let status = Command::new(tern_bin)
        .args(["certs", "init"])
        .arg(&certs)
        .status()
        .context("run tern certs init")?;
    if !status.success() {
        bail!("tern certs init failed ({status})");
    }
    let tls_dir = certs.join("localhost");
    let mut rows = Vec::new();
    for data in ["incompressible", "text-like"] {
        let src = dir.join(format!("{data}.img"));
        fill(&src, mib, data == "text-like")?;
        for case in CASES.iter().filter(|c| c.data == data) {
            let mut figures = Vec::with_capacity(runs);
            for _ in 0..runs {
                figures.push(one_run(tern_bin, dir, &tls_dir, &src, mib, case)?);
            }
            figures.sort_by(f64::total_cmp);
            rows.push((case, figures[figures.len() / 2]));
        }
        std::fs::remove_file(&src).ok();
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "gRPC extent ingest over loopback, mutual TLS, {mib} MiB, median of {runs}"
    )?;
    writeln!(
        out,
        "{:<16} {:<8} {:>8} {:>12}",
        "data", "mode", "GB/s", "vs 1 GB/s"
    )?;
    for (case, gbps) in rows {
        writeln!(
            out,
            "{:<16} {:<8} {:>8.2} {:>11.2}x",
            case.data,
            case.mode,
            gbps,
            gbps / TARGET_GBPS
        )?;
    }
    Ok(())
}

fn one_run(
    tern_bin: &Path,
    dir: &Path,
    tls_dir: &Path,
    src: &Path,
    mib: u64,
    case: &Case,
) -> Result<f64> {
    let image = dir.join("dst.img");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(dir.join("dst.img.tern-epoch"));
    let grpc = free_port()?;
    let nbd = free_port()?;
    let mut agent = Command::new(tern_bin)
        .args(["agent", "--role", "destination", "--image"])
        .arg(&image)
        .args(["--size", &format!("{mib}M"), "--grpc", &grpc.to_string()])
        .args(["--nbd", &nbd.to_string(), "--tls-dir"])
        .arg(tls_dir)
        .stdout(Stdio::null())
        .spawn()
        .context("start tern agent")?;
    let result = (|| {
        wait_listening(grpc, &mut agent)?;
        let out = Command::new(tern_bin)
            .args(["replica", "push", "--from"])
            .arg(src)
            .args(["--to", &grpc.to_string(), "--tls-dir"])
            .arg(tls_dir)
            .args(case.args)
            .output()
            .context("run tern replica push")?;
        if !out.status.success() {
            bail!(
                "tern replica push failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .context("parse the JSON report of tern replica push")?;
        let bytes = report["bytes"].as_f64().context("report has no bytes")?;
        let seconds = report["seconds"]
            .as_f64()
            .context("report has no seconds")?;
        if bytes as u64 != mib << 20 {
            bail!("push reported {bytes} bytes, expected {}", mib << 20);
        }
        Ok(bytes / seconds / 1e9)
    })();
    stop(&mut agent);
    let gbps = result?;
    if !same_contents(src, &image)? {
        bail!(
            "{} differs from {} after the push",
            image.display(),
            src.display()
        );
    }
    Ok(gbps)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

/// Deterministic data: xorshift noise, or repeated text (zstd shrinks it a lot).
fn fill(path: &Path, mib: u64, text: bool) -> Result<()> {
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let words = b"tern replicates a running server's disk; ";
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    for _ in 0..mib {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = if text {
                words[i % words.len()]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            };
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?)
}

fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("tern agent exited early ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("tern agent did not listen on {addr} within 20 s")
}

/// SIGTERM (the agent drains and flushes), then wait.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = std::fs::File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("open {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}
