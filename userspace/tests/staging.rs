//! Migrations staged through object storage (`tern migrate --via`, `tern
//! agent --role destination --from`), as root, with real processes: a
//! directory store and a real S3 server (Garage), a live fio writer paused
//! for the cutover, the store killed mid-upload, the source killed and resumed.

#[path = "support/garage.rs"]
mod garage;
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use garage::Garage;
use support::LoopDev;
use support::migration::{
    Killed, MIB, assert_same, fill_random, fio_writer, free_port, pause_stop, run_report, tern,
};

/// A destination agent applying the store at `url` into `dir/dst.img`.
fn applying_agent(dir: &Path, size: u64, url: &str, env: &[(&'static str, String)]) -> Killed {
    let grpc = format!("127.0.0.1:{}", free_port());
    let child = tern()
        .args(["agent", "--role", "destination", "--image"])
        .arg(dir.join("dst.img"))
        .args(["--size", &size.to_string(), "--grpc", &grpc])
        .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
        .args(["--from", url])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the destination agent");
    Killed(child)
}

/// `tern migrate --via url` of `dev`, bounded by a timeout.
fn staged_migrate(dir: &Path, dev: &str, url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", "300", env!("CARGO_BIN_EXE_tern")])
        .args([
            "migrate",
            "--device",
            dev,
            "--via",
            url,
            "--json",
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .arg("--trace-out")
        .arg(dir.join("src.trace"))
        .args(args);
    if !args.contains(&"--via-wait") {
        cmd.args(["--via-wait", "60s"]);
    }
    cmd
}

fn staged(report: &serde_json::Value, what: &str) -> u64 {
    report["staged"][what]
        .as_u64()
        .unwrap_or_else(|| panic!("the report says what was staged: {report}"))
}

#[test]
fn a_migration_staged_through_a_directory_cuts_over_identical_under_a_live_writer() {
    let src = LoopDev::new("64M");
    fill_random(src.path(), 16);
    let store = src.dir.path().join("store");
    let url = store.to_str().expect("utf-8").to_owned();
    let _agent = applying_agent(src.dir.path(), 64 * MIB, &url, &[]);
    let writer = fio_writer(src.path(), 300, 48);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, report, err) = run_report(&mut staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &[
            "--pause",
            &pause_stop(writer.0.id()),
            "--max-downtime",
            "2s",
        ],
    ));
    assert!(ok, "staged migration failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    // Zero-skipped: 16 MiB of data and fio's writes, not the 64 MiB disk.
    let bytes = staged(&report, "bytes");
    assert!(bytes > 16 * MIB && bytes < 48 * MIB, "{report}");
    assert!(staged(&report, "segments") >= 2, "{report}");
    // The writer is still stopped by the pause: the destination equals it.
    assert_same(src.path(), &src.dir.path().join("dst.img"));
    drop(writer);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("destination.json")).expect("the destination published"),
    )
    .expect("json");
    assert_eq!(state["export_writable"], true, "{state}");
    assert_eq!(state["root"], report["root"], "{state} vs {report}");
}

#[test]
fn a_killed_staged_source_resumes_without_a_full_resend() {
    let src = LoopDev::new("96M");
    fill_random(src.path(), 96);
    let url = src
        .dir
        .path()
        .join("store")
        .to_str()
        .expect("utf-8")
        .to_owned();
    let _agent = applying_agent(src.dir.path(), 96 * MIB, &url, &[]);
    let mut child = staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause", "--raw", "--max-rate", "16M"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start migrate");
    let stderr = child.stderr.take().expect("stderr");
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let sent = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["sent_bytes"].as_u64())
            .unwrap_or(0);
        if sent >= 40 * MIB {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let (ok, report, err) = run_report(&mut staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause", "--raw"],
    ));
    assert!(ok, "the resumed staged migration failed: {err}");
    assert_eq!(report["delta_sync"], true, "{report}");
    let sent = report["sent_bytes"].as_u64().expect("sent");
    assert!(
        sent < 96 * MIB * 3 / 4,
        "the resume sent {sent} bytes: {report}"
    );
    assert_same(src.path(), &src.dir.path().join("dst.img"));
}

#[test]
fn a_migration_staged_through_s3_survives_the_store_killed_mid_upload() {
    let mut garage = Garage::start();
    let src = LoopDev::new("64M");
    fill_random(src.path(), 64);
    let url = garage.url("staging/vm1");
    let env = garage.env();
    let _agent = applying_agent(src.dir.path(), 64 * MIB, &url, &env);
    let child = staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause", "--raw", "--max-rate", "12M"],
    )
    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start migrate");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    garage.kill();
    std::thread::sleep(Duration::from_secs(4));
    garage.restart();
    let out = child.wait_with_output().expect("migrate ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "staged migration failed: {report} {stderr}"
    );
    assert!(
        stderr.contains("the staging store failed; retrying")
            && stderr.contains("the staging store answers again"),
        "the upload met the outage and outlived it: {stderr}"
    );
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "it outlived the store's outage"
    );
    assert_same(src.path(), &src.dir.path().join("dst.img"));
}

#[test]
fn a_staged_migration_without_a_destination_agent_says_what_it_waits_for() {
    let src = LoopDev::new("16M");
    let url = src
        .dir
        .path()
        .join("store")
        .to_str()
        .expect("utf-8")
        .to_owned();
    let (ok, _report, err) = run_report(&mut staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause", "--via-wait", "2s"],
    ));
    assert!(!ok, "a migration with nobody to apply it cannot succeed");
    assert!(
        err.contains("--role destination --from"),
        "the error names what to start: {err}"
    );
}

#[test]
fn an_all_zero_disk_stages_nothing_and_still_switches_and_an_emptied_store_starts_afresh() {
    let src = LoopDev::new("16M");
    let store = src.dir.path().join("store");
    let url = store.to_str().expect("utf-8").to_owned();
    let _agent = applying_agent(src.dir.path(), 16 * MIB, &url, &[]);
    // Nothing to stage: no segment, and the switch must not wait for one.
    let (ok, report, err) = run_report(&mut staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause"],
    ));
    assert!(ok, "staged migration of a blank disk failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert_eq!(staged(&report, "segments"), 0, "{report}");

    // The operator empties the prefix and stages again into the same
    // destination: its record of what it applied is for the old staging.
    fill_random(src.path(), 4);
    std::fs::remove_dir_all(&store).expect("empty the store");
    let (ok, report, err) = run_report(&mut staged_migrate(
        src.dir.path(),
        src.path(),
        &url,
        &["--no-pause"],
    ));
    assert!(ok, "the second staging failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert_same(src.path(), &src.dir.path().join("dst.img"));
}

#[test]
fn what_a_staged_migration_cannot_do_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("store");
    let url = url.to_str().expect("utf-8");
    let refused = |args: &[&str], says: &str| {
        let out = Command::new("timeout")
            .args(["20", env!("CARGO_BIN_EXE_tern")])
            .args(args)
            .output()
            .expect("tern runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    refused(
        &[
            "agent",
            "--role",
            "source",
            "--device",
            "/dev/null",
            "--via",
            url,
        ],
        "a standby source agent keeps a replica over a link",
    );
    refused(
        &[
            "migrate",
            "--device",
            "/dev/null",
            "--via",
            url,
            "--no-pause",
            "--mode",
            "postcopy",
        ],
        "pre-copy only",
    );
    refused(
        &[
            "migrate",
            "--vm",
            "qmp:/nonexistent.qmp@tcp:dst:4444",
            "--via",
            url,
        ],
        "needs a link between the hosts",
    );
}
