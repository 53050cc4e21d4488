//! Shared by the live-migration tests: the `tern` binary, a destination agent,
//! `tern migrate` and its report, fio writers and image comparison.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sh;

pub const MIB: u64 = 1 << 20;

pub fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child killed (and waited for) on drop, resumed first in case it is stopped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // Already reaped (a test may stop it itself): its pid may be reused.
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A destination agent on loopback writing `dir/dst.img`, with certificates
/// made in `dir/pki`; returns it and its gRPC address.
pub fn agent(dir: &Path, size: u64) -> (Killed, String) {
    sh(tern()
        .args(["certs", "init"])
        .arg(dir.join("pki"))
        .args(["--host", "localhost"]));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = tern()
        .args(["agent", "--role", "destination", "--image"])
        .arg(dir.join("dst.img"))
        .args(["--size", &size.to_string(), "--grpc", &addr])
        .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-dir")
        .arg(dir.join("pki/localhost"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the destination agent");
    let guard = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the agent never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (guard, addr)
}

/// `tern migrate` to an [`agent`] made in `dir`, bounded by a timeout, recording
/// the source trace in `dir/src.trace`; (success, report, stderr).
pub fn migrate(
    dir: &Path,
    dev: &str,
    addr: &str,
    args: &[&str],
) -> (bool, serde_json::Value, String) {
    run_report(
        Command::new("timeout")
            .args(["-s", "KILL", "300", env!("CARGO_BIN_EXE_tern")])
            .args(["migrate", "--device", dev, "--to", addr, "--tls-dir"])
            .arg(dir.join("pki/localhost"))
            .args(["--domain", "localhost", "--json", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--trace-out")
            .arg(dir.join("src.trace"))
            .args(args),
    )
}

/// Runs a migration to its end; returns (success, last JSON line of stdout, stderr).
pub fn run_report(cmd: &mut Command) -> (bool, serde_json::Value, String) {
    let out = cmd.output().expect("run tern migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, stderr)
}

/// A device's contents, read past the page cache.
pub fn read_direct(path: &str) -> Vec<u8> {
    let out = Command::new("dd")
        .args([
            &format!("if={path}"),
            "iflag=direct",
            "bs=1M",
            "status=none",
        ])
        .output()
        .expect("dd");
    assert!(out.status.success());
    out.stdout
}

pub fn assert_same(source: &str, dest: &Path) {
    let a = read_direct(source);
    let b = std::fs::read(dest).expect("read destination image");
    assert_eq!(a.len(), b.len(), "sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        // Which blocks, and whether the destination's disk agrees with its
        // page cache: what tells a missed write from a stale cache.
        let blocks: Vec<usize> = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(n, _)| n)
            .collect();
        let direct = read_direct(&dest.display().to_string());
        panic!(
            "source and destination differ first at byte {i}: {} blocks of 4 KiB {:?}; \
             the destination read with O_DIRECT {} its page cache and {} the source",
            blocks.len(),
            &blocks[..blocks.len().min(16)],
            if direct == b {
                "matches"
            } else {
                "differs from"
            },
            if direct == a {
                "matches"
            } else {
                "differs from"
            },
        );
    }
}

/// Fills the first `mib` MiB of a device with random data so a copy takes a while.
pub fn fill_random(dev: &str, mib: u64) {
    sh(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={dev}"),
        "bs=1M",
        &format!("count={mib}"),
        "oflag=direct",
        "status=none",
    ]));
}

/// fio writing 4 KiB blocks at random in the first `mib` MiB of a raw device until killed.
pub fn fio_writer(dev: &str, iops: u32, mib: u64) -> Killed {
    let child = Command::new("fio")
        .args([
            "--name=w",
            &format!("--filename={dev}"),
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--time_based",
            "--runtime=600",
            &format!("--rate_iops={iops}"),
            &format!("--size={mib}M"),
            "--randrepeat=0",
            // One process: SIGSTOP of it pauses every job.
            "--thread",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    Killed(child)
}

/// A `--pause` hook that stops `pid` for the cutover and resumes it after.
pub fn pause_stop(pid: u32) -> String {
    format!("cmd:kill -STOP {pid};;kill -CONT {pid}")
}
