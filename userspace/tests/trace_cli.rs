//! The `tern trace` command as a user runs it: real binary, real loop device, signals.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{LoopDev, sh};

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

#[test]
fn sigterm_stops_the_tracer_cleanly_and_flushes_everything() {
    let lo = LoopDev::new("64M");
    let out = lo.dir.path().join("t.trace");
    let mut child = tern()
        .args(["trace", "--device", lo.path(), "--out"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern runs");
    let t0 = Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "tracer did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sh(Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", lo.path()),
            "bs=64k",
            "count=100",
            "oflag=direct",
        ])
        .stderr(Stdio::null()));
    sh(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let status = child.wait().expect("tern exits");
    assert!(status.success(), "{status}");
    let stat = sh(tern().args(["trace", "stat", "--json"]).arg(&out));
    let v: serde_json::Value = serde_json::from_str(&stat).expect("json");
    assert_eq!(v["complete"], true, "the end record is written at SIGTERM");
    assert!(
        v["ops"]["write"]["requests"].as_u64().unwrap_or(0) >= 100,
        "{stat}"
    );
    assert_eq!(v["lost_events"], 0);
}

#[test]
fn duration_bounds_a_trace_and_csv_export_works_on_it() {
    let lo = LoopDev::new("64M");
    let out = lo.dir.path().join("t.trace");
    let run = tern()
        .args([
            "trace",
            "-q",
            "--device",
            lo.path(),
            "--duration",
            "1s",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("tern runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = sh(tern()
        .args(["trace", "export", "--format", "csv"])
        .arg(&out));
    assert!(csv.starts_with("kind,ts_ns,"), "{csv}");
}

#[test]
fn bad_input_is_one_line_and_never_a_panic() {
    let dir = tempfile::tempdir().expect("dir");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"this is not a trace at all").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["trace".into(), "stat".into(), junk.display().to_string()],
            "not a Tern trace file",
        ),
        (
            vec![
                "trace".into(),
                "--device".into(),
                "/dev/nope".into(),
                "--out".into(),
                dir.path().join("x").display().to_string(),
            ],
            "device /dev/nope does not exist",
        ),
        (
            vec![
                "trace".into(),
                "--device".into(),
                junk.display().to_string(),
                "--out".into(),
                dir.path().join("x").display().to_string(),
            ],
            "is not a block device",
        ),
        (
            vec![
                "trace".into(),
                "--device".into(),
                "/dev/loop0".into(),
                "--ring-size".into(),
                "12K".into(),
                "--out".into(),
                dir.path().join("x").display().to_string(),
            ],
            "power of two",
        ),
    ];
    for (args, want) in cases {
        let out = tern().args(&args).output().expect("tern runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // A truncated trace names its byte offset.
    let lo = LoopDev::new("64M");
    let good = lo.dir.path().join("g.trace");
    sh(tern()
        .args([
            "trace",
            "-q",
            "--device",
            lo.path(),
            "--duration",
            "200ms",
            "--out",
        ])
        .arg(&good));
    let bytes = std::fs::read(&good).expect("read");
    let cut = dir.path().join("cut.trace");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("write");
    let out = tern()
        .args(["trace", "stat"])
        .arg(&cut)
        .output()
        .expect("tern runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated at byte"), "{err}");
}
