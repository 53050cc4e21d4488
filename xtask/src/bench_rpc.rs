//! `cargo xtask bench rpc`: gRPC extent ingest over loopback with mutual TLS.
//!
//! Starts `tern agent --role destination` and pushes a file into it with
//! `tern replica push` (which prints a JSON report), for incompressible and
//! compressible data, raw and zstd, in 1 MiB extents, and for incompressible
//! data in 4 KiB extents; checks the destination byte for byte. Besides GB/s
//! it reports extents per second and the CPU time per extent of each side:
//! the pusher's from its rusage when it is reaped (`wait4`), the agent's as
//! the growth of utime + stime in `/proc/PID/stat` across the push.
//! Targets: at least 1 GB/s in 1 MiB extents; in 4 KiB extents at least
//! 300 MB/s and at most 10 µs of CPU per extent on each side. Both ends
//! share this machine's cores, so the figures are a floor for two real hosts.
//!
//! The push ends with a barrier that fdatasyncs the destination image, so its
//! time includes writing the image back when the directory is on a disk: the
//! images go to `/dev/shm` (tmpfs) when it exists, and the table names the
//! file system used.
//!
//! Environment: `TERN_BENCH_RPC_MIB` (1 MiB cases, default 1024),
//! `TERN_BENCH_RPC_SMALL_MIB` (4 KiB cases, default 256),
//! `TERN_BENCH_RPC_RUNS` (default 3), `TERN_BENCH_RPC_DIR` (default
//! `/dev/shm` if present, else the temporary directory).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// 1 MiB extents: bytes per second.
const TARGET_GBPS: f64 = 1.0;
/// 4 KiB extents: bytes per second, and CPU per extent on each side.
const SMALL_TARGET_GBPS: f64 = 0.3;
const SMALL_TARGET_CPU_US: f64 = 10.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Data {
    Incompressible,
    TextLike,
}

impl Data {
    fn name(self) -> &'static str {
        match self {
            Data::Incompressible => "incompressible",
            Data::TextLike => "text-like",
        }
    }
}

struct Case {
    data: Data,
    mode: &'static str,
    /// `--extent` of the push.
    extent: &'static str,
    args: &'static [&'static str],
}

impl Case {
    fn small(&self) -> bool {
        self.extent == "4K"
    }
}

const CASES: [Case; 6] = [
    Case {
        data: Data::Incompressible,
        mode: "raw",
        extent: "1M",
        args: &["--raw"],
    },
    Case {
        data: Data::Incompressible,
        mode: "zstd-1",
        extent: "1M",
        args: &["--zstd-level", "1"],
    },
    Case {
        data: Data::TextLike,
        mode: "raw",
        extent: "1M",
        args: &["--raw"],
    },
    Case {
        data: Data::TextLike,
        mode: "zstd-1",
        extent: "1M",
        args: &["--zstd-level", "1"],
    },
    Case {
        data: Data::Incompressible,
        mode: "zstd-1",
        extent: "4K",
        args: &["--zstd-level", "1"],
    },
    Case {
        data: Data::Incompressible,
        mode: "raw",
        extent: "4K",
        args: &["--raw"],
    },
];

/// One push's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    gbps: f64,
    extents_per_s: f64,
    /// CPU µs per extent: the pusher (source) and the agent (destination).
    src_us: f64,
    dst_us: f64,
}

pub fn run(tern_bin: &Path) -> Result<()> {
    let mib: u64 = env_or("TERN_BENCH_RPC_MIB", 1024)?;
    let small_mib: u64 = env_or("TERN_BENCH_RPC_SMALL_MIB", 256)?;
    let runs: usize = env_or("TERN_BENCH_RPC_RUNS", 3)?;
    if runs == 0 || mib == 0 || small_mib == 0 {
        bail!(
            "TERN_BENCH_RPC_MIB, TERN_BENCH_RPC_SMALL_MIB and TERN_BENCH_RPC_RUNS must be at least 1"
        );
    }
    let base = std::env::var_os("TERN_BENCH_RPC_DIR").map_or_else(
        || {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        },
        PathBuf::from,
    );
    let dir = base.join(format!("tern-bench-rpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = bench(tern_bin, &dir, mib, small_mib, runs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(tern_bin: &Path, dir: &Path, mib: u64, small_mib: u64, runs: usize) -> Result<()> {
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
    let fs_type = crate::sh::output(Command::new("stat").args(["-f", "-c", "%T"]).arg(dir))?
        .trim()
        .to_owned();
    let ticks = clock_ticks()?;
    let mut rows = Vec::new();
    for (data, small) in [
        (Data::Incompressible, false),
        (Data::TextLike, false),
        (Data::Incompressible, true),
    ] {
        let size_mib = if small { small_mib } else { mib };
        let src = dir.join(format!("{}-{size_mib}.img", data.name()));
        fill(&src, size_mib, data == Data::TextLike)?;
        for case in CASES
            .iter()
            .filter(|c| c.data == data && c.small() == small)
        {
            let mut all = Vec::with_capacity(runs);
            for _ in 0..runs {
                all.push(one_run(
                    tern_bin, dir, &tls_dir, &src, size_mib, case, ticks,
                )?);
            }
            rows.push((case, size_mib, median(&all)));
        }
        std::fs::remove_file(&src).ok();
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "gRPC extent ingest over loopback, mutual TLS, median of {runs}; images on {} ({fs_type}{})",
        dir.display(),
        if fs_type == "tmpfs" {
            ": the final fdatasync costs nothing"
        } else {
            ": the time includes the final fdatasync to this disk"
        }
    )?;
    writeln!(
        out,
        "CPU µs/ext: utime + stime per extent, src = the `tern replica push` process (start and TLS \
         included), dst = the agent during the push; vs target: measured/target for rates, \
         target/measured for CPU (1.00x or more meets it)"
    )?;
    writeln!(
        out,
        "{:<16} {:<8} {:>6} {:>6} {:>7} {:>11} {:>10} {:>10}  vs target",
        "data", "mode", "extent", "MiB", "GB/s", "extents/s", "src µs/ext", "dst µs/ext"
    )?;
    for (case, size_mib, f) in rows {
        let target = if case.small() {
            format!(
                "{:.2}x of >=300 MB/s; CPU {:.2}x src, {:.2}x dst of <=10 µs/ext",
                f.gbps / SMALL_TARGET_GBPS,
                SMALL_TARGET_CPU_US / f.src_us,
                SMALL_TARGET_CPU_US / f.dst_us
            )
        } else {
            format!("{:.2}x of >=1 GB/s", f.gbps / TARGET_GBPS)
        };
        writeln!(
            out,
            "{:<16} {:<8} {:>6} {:>6} {:>7.2} {:>11.0} {:>10.2} {:>10.2}  {target}",
            case.data.name(),
            case.mode,
            case.extent,
            size_mib,
            f.gbps,
            f.extents_per_s,
            f.src_us,
            f.dst_us
        )?;
    }
    Ok(())
}

/// Each figure's own median over the runs.
fn median(all: &[Figures]) -> Figures {
    let mid = |get: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = all.iter().map(get).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Figures {
        gbps: mid(|f| f.gbps),
        extents_per_s: mid(|f| f.extents_per_s),
        src_us: mid(|f| f.src_us),
        dst_us: mid(|f| f.dst_us),
    }
}

fn one_run(
    tern_bin: &Path,
    dir: &Path,
    tls_dir: &Path,
    src: &Path,
    mib: u64,
    case: &Case,
    ticks: f64,
) -> Result<Figures> {
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
        let log = dir.join("push.log");
        let agent_before = cpu_ticks(agent.id())?;
        let mut push = Command::new(tern_bin)
            .args(["replica", "push", "--from"])
            .arg(src)
            .args(["--to", &grpc.to_string(), "--tls-dir"])
            .arg(tls_dir)
            .args(["--extent", case.extent])
            .args(case.args)
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?,
            )
            .spawn()
            .context("start tern replica push")?;
        let mut stdout = String::new();
        push.stdout
            .take()
            .context("the push's stdout is piped")?
            .read_to_string(&mut stdout)
            .context("read the push's report")?;
        let (status, push_cpu) = wait_with_cpu(push)?;
        // The barrier has returned: the agent has done all of its work.
        let agent_cpu = (cpu_ticks(agent.id())? - agent_before) as f64 / ticks;
        if !status.success() {
            bail!(
                "tern replica push failed ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let report: serde_json::Value =
            serde_json::from_str(&stdout).context("parse the JSON report of tern replica push")?;
        let num = |k: &str| {
            report[k]
                .as_f64()
                .with_context(|| format!("the push's report has no {k:?}: {stdout}"))
        };
        let (bytes, seconds, extents) = (num("bytes")?, num("seconds")?, num("extents")?);
        if bytes as u64 != mib << 20 {
            bail!("push reported {bytes} bytes, expected {}", mib << 20);
        }
        if extents < 1.0 {
            bail!("push reported no extents: {stdout}");
        }
        Ok(Figures {
            gbps: bytes / seconds / 1e9,
            extents_per_s: extents / seconds,
            src_us: push_cpu.as_secs_f64() * 1e6 / extents,
            dst_us: agent_cpu * 1e6 / extents,
        })
    })();
    stop(&mut agent);
    let figures = result?;
    if !same_contents(src, &image)? {
        bail!(
            "{} differs from {} after the push",
            image.display(),
            src.display()
        );
    }
    Ok(figures)
}

/// Reaps `child` with `wait4`: its exit status and the CPU time (user +
/// system) it used, to the microsecond.
fn wait_with_cpu(child: Child) -> Result<(ExitStatus, Duration)> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // Dropping a `Child` neither waits nor kills: std can no longer reap it.
    drop(child);
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own child, not yet reaped (std reaps only in
        // `wait`/`try_wait`, and the `Child` is gone);
        // `status` and `usage` are live, writable and of the types wait4 takes.
        let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4 for tern replica push");
        }
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((
        ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    ))
}

/// utime + stime of a process (all its threads), in clock ticks: fields 14
/// and 15 of `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let (_, rest) = stat
        .rsplit_once(')')
        .with_context(|| format!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times.
fn clock_ticks() -> Result<f64> {
    let s = crate::sh::output(Command::new("getconf").arg("CLK_TCK"))?;
    let t: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {s:?}"))?;
    if t <= 0.0 {
        bail!("getconf CLK_TCK printed {t}");
    }
    Ok(t)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_a_running_process_grow_with_its_work() {
        let before = cpu_ticks(std::process::id()).expect("read our own /proc stat");
        // Spin until a tick is charged; on a busy machine it may take a
        // while, so only a generous deadline fails the test.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while cpu_ticks(std::process::id()).expect("read our own /proc stat") == before {
            assert!(Instant::now() < deadline, "no CPU tick charged in 20 s");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        }
    }

    #[test]
    fn wait_with_cpu_reaps_the_child_with_its_status_and_cpu() {
        let child = Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 3",
            ])
            .spawn()
            .expect("start sh");
        let (status, cpu) = wait_with_cpu(child).expect("wait4");
        assert_eq!(status.code(), Some(3));
        assert!(cpu > Duration::ZERO);
    }

    #[test]
    fn median_takes_each_figure_on_its_own() {
        let f = |gbps, src_us| Figures {
            gbps,
            extents_per_s: gbps * 1000.0,
            src_us,
            dst_us: 1.0,
        };
        let m = median(&[f(1.0, 9.0), f(3.0, 1.0), f(2.0, 5.0)]);
        assert!((m.gbps - 2.0).abs() < f64::EPSILON);
        assert!((m.src_us - 5.0).abs() < f64::EPSILON);
    }
}
