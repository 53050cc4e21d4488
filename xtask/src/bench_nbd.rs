//! `cargo xtask bench nbd`: Tern's NBD server against `qemu-nbd` and
//! `nbdkit file`, measured by fio's libnbd engine on the same image in the
//! same run; and over TLS (`nbds://`, mutual TLS with certificates from
//! `tern certs init`), Tern against `nbdkit --tls=require --tls-verify-peer`.
//!
//! The image lives on the real disk (`/var/tmp`), not on tmpfs, because
//! `qemu-nbd --cache=none` needs `O_DIRECT` with real alignment semantics.
//! Environment knobs: `TERN_BENCH_RUNTIME` (seconds per job, default 10),
//! `TERN_BENCH_ROUNDS` (rounds, medians reported, default 1),
//! `TERN_BENCH_SIZE_MIB` (image size, default 1024), `TERN_BENCH_DIR`.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One fio workload.
struct Job {
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
}

const JOBS: [Job; 4] = [
    Job {
        label: "4K random read",
        rw: "randread",
        bs: "4k",
    },
    Job {
        label: "4K random write",
        rw: "randwrite",
        bs: "4k",
    },
    Job {
        label: "1M sequential read",
        rw: "read",
        bs: "1M",
    },
    Job {
        label: "1M sequential write",
        rw: "write",
        bs: "1M",
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Tern with `O_DIRECT` (`tern nbd serve`'s default, like `qemu-nbd --cache=none`).
    Tern,
    /// Tern with `--no-direct`: page cache, like `nbdkit file`. This is how
    /// the destination agent runs (its `--direct` is off by default), so it
    /// is the row held against nbdkit.
    TernBuffered,
    QemuNbd,
    Nbdkit,
    /// `TernBuffered` requiring TLS (`--tls-dir`).
    TernTls,
    /// `nbdkit file` requiring TLS and a client certificate, as Tern does.
    NbdkitTls,
}

impl Server {
    const ALL: [Server; 6] = [
        Server::Tern,
        Server::TernBuffered,
        Server::QemuNbd,
        Server::Nbdkit,
        Server::TernTls,
        Server::NbdkitTls,
    ];

    fn name(self) -> &'static str {
        match self {
            Server::Tern => "tern O_DIRECT",
            Server::TernBuffered => "tern (agent: cache)",
            Server::QemuNbd => "qemu-nbd",
            Server::Nbdkit => "nbdkit",
            Server::TernTls => "tern TLS (cache)",
            Server::NbdkitTls => "nbdkit TLS",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Server::TernTls | Server::NbdkitTls)
    }

    /// The nbdkit row a row is held against: the one with the same transport.
    fn nbdkit(self) -> Server {
        if self.tls() {
            Server::NbdkitTls
        } else {
            Server::Nbdkit
        }
    }
}

/// One measurement: IOPS and bytes per second.
#[derive(Clone, Copy, Default)]
struct Figure {
    iops: f64,
    bytes_per_sec: f64,
}

const EXPORT: &str = "bench";

/// Runs the benchmark and prints the table.
pub fn run(tern_bin: &Path) -> Result<()> {
    for tool in ["fio", "qemu-nbd", "nbdkit"] {
        require(tool)?;
    }
    if !tern_bin.exists() {
        bail!(
            "{} does not exist; build it first (cargo build --release -p tern)",
            tern_bin.display()
        );
    }
    let runtime: u64 = env_or("TERN_BENCH_RUNTIME", 10)?;
    let rounds: usize = env_or("TERN_BENCH_ROUNDS", 1)?;
    let size_mib: u64 = env_or("TERN_BENCH_SIZE_MIB", 1024)?;
    let base =
        std::env::var_os("TERN_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = base.join(format!("tern-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join("bench.img");
    let result = (|| {
        fill_image(&image, size_mib)?;
        // One certificate (`localhost`) serves both ends: the servers and fio.
        let certs = make_certs(tern_bin, &dir)?;
        // results[server][job] = one figure per round
        let mut results = vec![vec![Vec::new(); JOBS.len()]; Server::ALL.len()];
        for round in 0..rounds {
            // Alternate the server order between rounds so drift (page
            // cache, CPU frequency) does not favour one of them.
            let mut order = Server::ALL.to_vec();
            let n = order.len();
            order.rotate_left(round % n);
            for server in order {
                let sidx = Server::ALL
                    .iter()
                    .position(|&s| s == server)
                    .expect("listed");
                let mut child = start_server(server, tern_bin, &image, &certs)?;
                let measured = (|| {
                    let addr = child.1;
                    wait_listening(addr, &mut child.0, server)?;
                    // fio's engine refuses `tls-certificates=` in a URI (local file
                    // access); libnbd then looks in $HOME/.pki/libnbd, but only for
                    // a user other than root: see `fio`.
                    let uri = if server.tls() {
                        format!("nbds://localhost:{}/{EXPORT}", addr.port())
                    } else {
                        format!("nbd://{addr}/{EXPORT}")
                    };
                    for (j, job) in JOBS.iter().enumerate() {
                        let home = server.tls().then(|| dir.join("home"));
                        let fig = fio(&uri, home.as_deref(), job, runtime, size_mib).with_context(
                            || format!("fio {} against {}", job.label, server.name()),
                        )?;
                        results[sidx][j].push(fig);
                    }
                    Ok::<_, anyhow::Error>(())
                })();
                stop(&mut child.0, server);
                measured?;
            }
        }
        print_table(&results, runtime, rounds, size_mib)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
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

/// Writes non-zero data over the whole image so reads hit real blocks.
fn fill_image(path: &Path, size_mib: u64) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in chunk.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..size_mib {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// `tern certs init DIR/pki`: the `localhost` host directory, which holds
/// the names nbdkit and libnbd look for too.
fn make_certs(tern_bin: &Path, dir: &Path) -> Result<PathBuf> {
    let pki = dir.join("pki");
    let out = Command::new(tern_bin)
        .args(["certs", "init"])
        .arg(&pki)
        .output()
        .context("running tern certs init")?;
    if !out.status.success() {
        bail!(
            "tern certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let host = pki.join("localhost");
    // libnbd's default certificate directory for a user other than root
    // (root's is /etc/pki/libnbd, which a bench must not touch): fio runs as
    // `nobody` with HOME=dir/home, holding its own copy of the client files.
    let libnbd = dir.join("home/.pki/libnbd");
    std::fs::create_dir_all(&libnbd)?;
    for (name, from) in [
        ("ca-cert.pem", "ca.pem"),
        ("client-cert.pem", "cert.pem"),
        ("client-key.pem", "key.pem"),
    ] {
        let to = libnbd.join(name);
        std::fs::copy(host.join(from), &to).with_context(|| format!("copying {from} for fio"))?;
        std::os::unix::fs::chown(&to, Some(NOBODY), Some(NOBODY))?;
    }
    for d in [dir.join("home"), dir.join("home/.pki"), libnbd] {
        std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY))?;
    }
    // `nobody` must be able to reach its home under the bench directory.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(host)
}

/// The user fio runs as against TLS servers (see `make_certs`).
const NOBODY: u32 = 65_534;

fn start_server(
    server: Server,
    tern_bin: &Path,
    image: &Path,
    certs: &Path,
) -> Result<(Child, SocketAddr)> {
    let addr = free_port()?;
    let img = image.to_str().context("image path is not UTF-8")?;
    let port = addr.port().to_string();
    let mut cmd = match server {
        Server::Tern | Server::TernBuffered | Server::TernTls => {
            let mut c = Command::new(tern_bin);
            c.args(["nbd", "serve", "--image", img, "--name", EXPORT, "--listen"])
                .arg(addr.to_string());
            if server != Server::Tern {
                c.arg("--no-direct");
            }
            if server == Server::TernTls {
                c.arg("--tls-dir").arg(certs);
            }
            c
        }
        Server::QemuNbd => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "--cache=none",
                "-f",
                "raw",
                "-x",
                EXPORT,
                "-b",
                "127.0.0.1",
                "-p",
                &port,
                "--persistent",
                "--shared=16",
                img,
            ]);
            c
        }
        Server::Nbdkit | Server::NbdkitTls => {
            let mut c = Command::new("nbdkit");
            c.args(["--foreground", "-i", "127.0.0.1", "-p", &port]);
            if server == Server::NbdkitTls {
                c.args(["--tls=require", "--tls-verify-peer"])
                    .arg(format!("--tls-certificates={}", certs.display()));
            }
            c.arg("file").arg(format!("file={img}"));
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", server.name()))?;
    Ok((child, addr))
}

fn wait_listening(addr: SocketAddr, child: &mut Child, server: Server) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{} exited before listening: {status}", server.name());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 15 s", server.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: &mut Child, server: Server) {
    // SIGTERM first so servers drain and flush; SIGKILL if they hang.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writeln!(
        std::io::stderr(),
        "{} ignored SIGTERM for 10 s; killing it",
        server.name()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// fio; with `home`, as `nobody` with `HOME=home`, where `make_certs` put
/// libnbd's certificate directory.
fn fio(uri: &str, home: Option<&Path>, job: &Job, runtime: u64, size_mib: u64) -> Result<Figure> {
    let mut cmd = match home {
        None => Command::new("fio"),
        Some(home) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"])
                .env("HOME", home);
            c
        }
    };
    let out = cmd
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", job.rw),
            &format!("--bs={}", job.bs),
            "--iodepth=16",
            "--time_based",
            &format!("--runtime={runtime}"),
            &format!("--size={size_mib}M"),
            "--group_reporting",
            "--output-format=json",
        ])
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_fio(&out.stdout, job.rw)
}

/// Extracts IOPS and bandwidth for the job's direction from fio's JSON.
fn parse_fio(json: &[u8], rw: &str) -> Result<Figure> {
    // fio may print warnings before the JSON object.
    let start = json
        .iter()
        .position(|&b| b == b'{')
        .context("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_slice(&json[start..]).context("parsing fio JSON")?;
    let dir = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let stats = &v["jobs"][0][dir];
    let iops = stats["iops"].as_f64().context("fio JSON has no iops")?;
    let bw = stats["bw_bytes"]
        .as_f64()
        .context("fio JSON has no bw_bytes")?;
    Ok(Figure {
        iops,
        bytes_per_sec: bw,
    })
}

fn median(figs: &[Figure]) -> Figure {
    if figs.is_empty() {
        return Figure::default();
    }
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            f64::midpoint(v[n / 2 - 1], v[n / 2])
        }
    };
    Figure {
        iops: mid(figs.iter().map(|f| f.iops).collect()),
        bytes_per_sec: mid(figs.iter().map(|f| f.bytes_per_sec).collect()),
    }
}

fn print_table(
    results: &[Vec<Vec<Figure>>],
    runtime: u64,
    rounds: usize,
    size_mib: u64,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "NBD servers, fio libnbd engine, iodepth 16, {runtime} s per job, {rounds} round(s) (medians), {size_mib} MiB image on /var/tmp"
    )?;
    writeln!(
        out,
        "{:<20} {:<19} {:>10} {:>10} {:>10} {:>12}",
        "workload", "server", "IOPS", "MB/s", "vs nbdkit", "vs qemu-nbd"
    )?;
    writeln!(
        out,
        "(TLS rows: held against nbdkit with TLS; both require a client certificate)"
    )?;
    let at = |server: Server| {
        Server::ALL
            .iter()
            .position(|&s| s == server)
            .expect("every server is listed")
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    for (j, job) in JOBS.iter().enumerate() {
        let qemu = median(&results[at(Server::QemuNbd)][j]);
        for server in Server::ALL {
            let f = median(&results[at(server)][j]);
            let nbdkit = median(&results[at(server.nbdkit())][j]);
            writeln!(
                out,
                "{:<20} {:<19} {:>10.0} {:>10.1} {:>10.2} {:>12.2}",
                job.label,
                server.name(),
                f.iops,
                f.bytes_per_sec / 1e6,
                ratio(f.iops, nbdkit.iops),
                ratio(f.iops, qemu.iops),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_warnings() {
        let json = br#"note: both iodepth >= 1 and synchronous I/O engine
{"jobs":[{"read":{"iops":1234.5,"bw_bytes":5056512},"write":{"iops":0.0,"bw_bytes":0}}]}"#;
        let f = parse_fio(json, "randread").expect("parse");
        assert!((f.iops - 1234.5).abs() < f64::EPSILON);
        assert!((f.bytes_per_sec - 5_056_512.0).abs() < f64::EPSILON);
        assert!(parse_fio(b"no json", "read").is_err());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        let f = |iops| Figure {
            iops,
            bytes_per_sec: iops,
        };
        assert!((median(&[f(3.0), f(1.0), f(2.0)]).iops - 2.0).abs() < f64::EPSILON);
        assert!((median(&[f(4.0), f(1.0), f(2.0), f(3.0)]).iops - 2.5).abs() < f64::EPSILON);
    }
}
