//! `tern plan` and `tern migrate --plan` end to end, as root: a real source on
//! a loop device under fio, a destination agent, the source trace the
//! migration records, and the plan made from it.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{LoopDev, sh};

const MIB: u64 = 1 << 20;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

/// A child killed (and waited for) on drop, resumed first in case it is stopped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A destination agent on loopback with its own certificates.
fn agent(dir: &Path, size: u64) -> (Killed, String) {
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

/// `tern migrate` bounded by a timeout; (success, report, stderr).
fn migrate(dir: &Path, dev: &str, addr: &str, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new("timeout")
        .args(["-s", "KILL", "300", env!("CARGO_BIN_EXE_tern")])
        .args(["migrate", "--device", dev, "--to", addr, "--tls-dir"])
        .arg(dir.join("pki/localhost"))
        .args(["--domain", "localhost", "--json", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--trace-out")
        .arg(dir.join("src.trace"))
        .args(args)
        .output()
        .expect("run tern migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn same(source: &str, dest: &Path) {
    let out = Command::new("cmp")
        .arg(source)
        .arg(dest)
        .output()
        .expect("cmp");
    assert!(
        out.status.success(),
        "source and destination differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A plan: 4 KiB units in the first 32 MiB, 8 MiB units in the rest.
fn write_plan(path: &Path, size: u64) {
    let plan = serde_json::json!({
        "device_size": size,
        "unit": 4096,
        "region_size": 65536,
        "extent_len": MIB,
        "layout": {
            "size": size,
            "zones": [
                {"start": 0, "end": 32 * MIB, "unit": 4096},
                {"start": 32 * MIB, "end": size, "unit": 8 * MIB},
            ],
        },
    });
    std::fs::write(path, plan.to_string()).expect("write the plan");
}

#[test]
fn a_migration_with_a_plan_sends_whole_coarse_units_and_ends_identical() {
    let size = 64 * MIB;
    let src = LoopDev::new("64M");
    sh(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", src.path()),
        "bs=1M",
        "count=64",
        "oflag=direct",
        "status=none",
    ]));
    let dir = src.dir.path();
    let (_agent, addr) = agent(dir, size);
    let plan = dir.join("plan.json");
    write_plan(&plan, size);
    let fio = Killed(
        Command::new("fio")
            .args([
                "--name=w",
                &format!("--filename={}", src.path()),
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--ioengine=psync",
                "--time_based",
                "--runtime=600",
                "--rate_iops=400",
                "--randrepeat=0",
                "--thread",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fio"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let pause = format!("cmd:kill -STOP {pid};;kill -CONT {pid}", pid = fio.0.id());
    let (ok, report, err) = migrate(
        dir,
        src.path(),
        &addr,
        &[
            "--plan",
            plan.to_str().expect("utf-8"),
            "--pause",
            &pause,
            "--max-downtime",
            "500ms",
        ],
    );
    assert!(ok, "migrate --plan failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    // fio is stopped at the pause: the destination must equal the source.
    same(src.path(), &dir.join("dst.img"));
    // The delta round sent whole 8 MiB units for writes in the second zone
    // (about half of fio's writes land there).
    let sent = report["sent_bytes"].as_u64().expect("sent_bytes");
    assert!(sent >= size + 8 * MIB, "sent {sent} bytes: {report}");
    drop(fio);

    // The trace the migration recorded makes a plan, and the plan a table.
    let out = tern()
        .arg("plan")
        .arg(dir.join("src.trace"))
        .args(["--bandwidth", "1Gbit", "--json", "--out"])
        .arg(dir.join("made.json"))
        .output()
        .expect("tern plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan json");
    let names: Vec<&str> = p["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in ["4K", "64K", "1M", "16M", "whole image", "adaptive"] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert_eq!(p["device_size"], size);
    // A plan made for another disk is refused with the way out.
    let other = dir.join("other.json");
    write_plan(&other, 2 * size);
    let (ok, _, err) = migrate(
        dir,
        src.path(),
        &addr,
        &["--plan", other.to_str().expect("utf-8"), "--no-pause"],
    );
    assert!(!ok);
    assert!(err.contains("--device-size"), "{err}");
}

#[test]
fn plan_refuses_an_empty_trace_and_absurd_flags_with_clear_errors() {
    let src = LoopDev::new("16M");
    let trace = src.dir.path().join("idle.trace");
    // Nothing writes: the trace has no writes.
    sh(Command::new("timeout")
        .args([
            "60",
            env!("CARGO_BIN_EXE_tern"),
            "trace",
            "--device",
            src.path(),
        ])
        .args(["--duration", "1s", "-q", "--out"])
        .arg(&trace));
    let run = |args: &[&str]| {
        let out = tern()
            .arg("plan")
            .arg(&trace)
            .args(args)
            .output()
            .expect("tern plan");
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--bandwidth", "1Gbit"]).contains("no writes"));
    assert!(run(&["--bandwidth", "0Gbit"]).contains("at least 1 KB/s"));
    assert!(run(&["--bandwidth", "1Gbit", "--max-downtime", "0s"]).contains("above 0"));
    assert!(run(&["--bandwidth", "1Gbit", "--nonzero", "3"]).contains("non-zero"));
}
