//! A migration ordered by a prediction, as root, with real processes: fio
//! rewrites a hot region of a loop device, `tern trace` records it, `tern
//! predict` turns the trace into a plan, and `tern migrate --prefetch` holds
//! the hot region back from the bulk copy. The destination must end
//! byte-identical to the source, as without a plan.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{LoopDev, sh};

const MIB: u64 = 1 << 20;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

/// `tern` under a hard timeout, so a hang fails the test instead of CI.
fn tern_bounded(secs: u32) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", &secs.to_string(), env!("CARGO_BIN_EXE_tern")]);
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child killed (and resumed first, if it was stopped) on drop.
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

fn read_direct(path: &str) -> Vec<u8> {
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

fn assert_same(source: &str, dest: &Path) {
    let a = read_direct(source);
    let b = std::fs::read(dest).expect("read destination image");
    assert_eq!(a.len(), b.len(), "sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("source and destination differ first at byte {i}");
    }
}

#[test]
fn a_migration_ordered_by_a_prediction_holds_back_the_hot_region_and_ends_identical() {
    let src = LoopDev::new("128M");
    let dir = src.dir.path();
    sh(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", src.path()),
        "bs=1M",
        "count=64",
        "oflag=direct",
        "status=none",
    ]));
    sh(tern()
        .args(["certs", "init"])
        .arg(dir.join("pki"))
        .args(["--host", "localhost"]));
    let tls = dir.join("pki/localhost");
    let image: PathBuf = dir.join("dst.img");
    let grpc = free_port();
    let _agent = Killed(
        tern()
            .args(["agent", "--role", "destination", "--image"])
            .arg(&image)
            .args(["--size", &(128 * MIB).to_string()])
            .args(["--grpc", &format!("127.0.0.1:{grpc}")])
            .arg("--tls-dir")
            .arg(&tls)
            .stderr(Stdio::null())
            .spawn()
            .expect("start the destination agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(Instant::now() < deadline, "the agent never listened");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The workload: 4 KiB random writes over the first 16 MiB.
    let fio = Killed(
        Command::new("fio")
            .args([
                "--name=hot",
                &format!("--filename={}", src.path()),
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--ioengine=psync",
                "--time_based",
                "--runtime=300",
                "--rate_iops=1000",
                "--size=16M",
                "--randrepeat=0",
                "--thread",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fio"),
    );
    let trace = dir.join("history.trace");
    sh(tern_bounded(60)
        .args(["trace", "--device", src.path(), "--duration", "3s", "--out"])
        .arg(&trace));
    let plan = dir.join("plan.json");
    sh(tern_bounded(120)
        .arg("predict")
        .arg(&trace)
        .args(["--horizon", "30s", "--out"])
        .arg(&plan));
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).expect("plan")).expect("json");
    let hot_writes: u64 = parsed["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["p_write"].as_f64().expect("p") >= 0.5)
        .map(|e| e["len"].as_u64().expect("len"))
        .sum();
    assert!(
        (4 * MIB..=24 * MIB).contains(&hot_writes),
        "the plan names the 16 MiB hot region as written soon: {hot_writes} bytes"
    );

    let pid = fio.0.id();
    let out = tern_bounded(300)
        .args(["migrate", "--device", src.path()])
        .args(["--to", &format!("127.0.0.1:{grpc}")])
        .arg("--tls-dir")
        .arg(&tls)
        .args(["--domain", "localhost", "--json", "--max-downtime", "300ms"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--trace-out")
        .arg(dir.join("src.trace"))
        .arg("--prefetch")
        .arg(&plan)
        .args([
            "--pause",
            &format!("cmd:kill -STOP {pid};;kill -CONT {pid}"),
        ])
        .output()
        .expect("run tern migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("report")).expect("json");
    assert_eq!(report["outcome"], "cut over", "{report}");
    let held = report["held_back_bytes"].as_u64().expect("held");
    assert!(held >= 4 * MIB, "the hot region was held back: {report}");
    // fio stays stopped after the cutover: the source is still.
    assert_same(src.path(), &image);
    drop(fio);
}
