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
    // A cut trace is read up to its last complete chunk, and the cut is named.
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
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("the file is cut at byte {}", bytes.len() - 3)),
        "{said}"
    );
}

/// A cgroup v2 directory of its own, removed with its processes at the end.
struct Cgroup2(std::path::PathBuf);

impl Cgroup2 {
    fn new(name: &str) -> Cgroup2 {
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/cgroup/unified/tern-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("cgroup v2 directory");
        Cgroup2(dir)
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn the_cpu_of_a_cgroup_and_a_process_is_profiled_beside_the_io_and_reaches_the_plan() {
    let lo = LoopDev::new("64M");
    let out = lo.dir.path().join("t.trace");
    // One core's worth of spinning in a cgroup, and a process that sleeps.
    let cg = Cgroup2::new("spin");
    let spin = format!(
        "echo $$ > {}/cgroup.procs && exec sh -c 'while :; do :; done'",
        cg.0.display()
    );
    let _spinner = support::migration::Killed(
        Command::new("sh")
            .args(["-c", &spin])
            .spawn()
            .expect("spinner"),
    );
    let sleeper =
        support::migration::Killed(Command::new("sleep").arg("60").spawn().expect("sleeper"));
    let tracer = tern()
        .args(["trace", "-q", "--device", lo.path(), "--duration", "3s"])
        .args(["--cpu", &format!("cgroup:{}", cg.0.display())])
        .args(["--cpu", &format!("pid:{}", sleeper.0.id())])
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern runs");
    // Writes for the analyzer to profile beside the CPU.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        sh(Command::new("dd")
            .args([
                "if=/dev/urandom",
                &format!("of={}", lo.path()),
                "bs=64k",
                "count=1",
                &format!("seek={}", i * 7),
                "oflag=direct",
                "status=none",
            ])
            .stderr(Stdio::null()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = tracer.wait_with_output().expect("tern exits");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stat = sh(tern().args(["trace", "stat", "--json"]).arg(&out));
    let v: serde_json::Value = serde_json::from_str(&stat).expect("json");
    assert_eq!(v["cpu_targets"].as_array().map(Vec::len), Some(3), "{stat}");
    // 3 s at 4 samples a second, for each of three targets.
    assert!(v["cpu_samples"].as_u64().unwrap_or(0) >= 30, "{stat}");

    let report = sh(tern().args(["analyze", "report", "--json"]).arg(&out));
    let r: serde_json::Value = serde_json::from_str(&report).expect("json");
    let cpu = r["cpu"].as_array().expect("a CPU profile");
    let by = |prefix: &str| {
        cpu.iter()
            .find(|c| c["target"].as_str().is_some_and(|t| t.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no {prefix} profile in {report}"))
    };
    let mean = |c: &serde_json::Value| c["mean_cores"].as_f64().expect("mean_cores");
    // The spinner keeps one core busy, less what others took from it.
    let spinner = by("cgroup:");
    assert!(
        (0.5..=1.1).contains(&mean(spinner)),
        "the spinner used {} cores: {report}",
        mean(spinner)
    );
    assert!(spinner["wait_share"].is_number(), "{report}");
    assert!(mean(by("pid:")) < 0.05, "the sleeper: {report}");
    let host = by("host");
    assert!(mean(host) >= mean(spinner) - 0.05, "{report}");
    assert_eq!(host["host_cpus"].as_u64(), u64::try_from(num_cpus()).ok());
    let text = sh(tern().args(["analyze", "report"]).arg(&out));
    assert!(text.contains("cores mean"), "{text}");

    the_plan_reads_the_cpu_profile(&lo, &out);
}

/// The controller reads the host's idle cores (whether compressing pays)
/// and the workload's CPU (which lever a throttle should pull).
fn the_plan_reads_the_cpu_profile(lo: &LoopDev, out: &std::path::Path) {
    let plan = lo.dir.path().join("plan.json");
    sh(tern()
        .args([
            "plan",
            "--bandwidth",
            "1Gbit",
            "--compression",
            "0.4",
            "--out",
        ])
        .arg(&plan)
        .arg(out));
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).expect("plan")).expect("json");
    assert!(p["compress"].is_boolean(), "{p}");
    let why = p["explanation"]
        .as_array()
        .expect("explanation")
        .iter()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with("compress") || l.starts_with("send raw"))
        .unwrap_or_else(|| panic!("no compression line in {p}"));
    assert!(why.contains("idle in 90% of the samples"), "{why}");
    // And which lever a throttle should pull, from the workload's own CPU
    // (the spinner's cgroup: the first target that is not the host).
    assert!(
        matches!(p["throttle_by"].as_str(), Some("cpu" | "writes")),
        "{p}"
    );
    let lever = p["explanation"]
        .as_array()
        .expect("explanation")
        .iter()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with("throttle by"))
        .unwrap_or_else(|| panic!("no throttle line in {p}"));
    assert!(lever.contains("cgroup:"), "{lever}");
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
