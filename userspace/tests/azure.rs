//! `az://` stores against a real Azure Blob Storage emulator (Azurite): the
//! history (put, ls, get, as an operator runs them) and a staged migration
//! (`tern migrate --via az://…` with `tern agent --role destination --from az://…`).

#[path = "support/azurite.rs"]
mod azurite;
mod support;

use std::fmt::Write as _;
use std::process::{Command, Output, Stdio};

use azurite::Azurite;
use support::LoopDev;
use support::migration::{Killed, MIB, assert_same, fill_random, free_port, run_report, tern};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("tern runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_history_round_trips_through_azure_blob_storage() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // 6 s of writes, 10 000 a second, as an MSR trace (100 ns ticks).
    let mut csv = String::from("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n");
    for i in 0..60_000u64 {
        let _ = writeln!(
            csv,
            "{},h,0,Write,{},4096,100",
            128_166_372_003_061_629 + i * 1000,
            (i * 7919 % 65_536) * 4096
        );
    }
    let input = dir.path().join("in.csv");
    std::fs::write(&input, csv).expect("write");
    let trace = dir.path().join("in.trace");
    run(tern()
        .args(["trace", "import", "--format", "msr", "--out"])
        .arg(&trace)
        .arg(&input));
    let url = az.url("history/host1");
    run(tern()
        .args(["history", "put", "--every", "2s", &url])
        .arg(&trace)
        .envs(az.env()));
    let out = run(tern()
        .args(["history", "ls", &url, "--json"])
        .envs(az.env()));
    let segments: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(segments.len(), 3, "three 2 s windows: {segments:?}");
    let got = dir.path().join("got.trace");
    run(tern()
        .args(["history", "get", &url, "--out"])
        .arg(&got)
        .envs(az.env()));
    let stat = |t: &std::path::Path| {
        let out = run(tern().args(["trace", "stat", "--json"]).arg(t));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("trace stat prints JSON");
        (
            v["block_events"].clone(),
            v["ops"].clone(),
            v["gaps"].clone(),
        )
    };
    assert_eq!(stat(&got), stat(&trace), "every record came back");
}

#[test]
fn a_migration_staged_through_azure_blob_storage_cuts_over_identical() {
    let az = Azurite::start();
    let src = LoopDev::new("32M");
    fill_random(src.path(), 12);
    let url = az.url("staging/disk1");
    let _agent = Killed(
        tern()
            .args(["agent", "--role", "destination", "--image"])
            .arg(src.dir.path().join("dst.img"))
            .args(["--size", &(32 * MIB).to_string()])
            .args(["--grpc", &format!("127.0.0.1:{}", free_port())])
            .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
            .args(["--from", &url])
            .envs(az.env())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the destination agent"),
    );
    let (ok, report, err) = run_report(
        Command::new("timeout")
            .args(["-s", "KILL", "300", env!("CARGO_BIN_EXE_tern")])
            .args([
                "migrate",
                "--device",
                src.path(),
                "--via",
                &url,
                "--no-pause",
            ])
            .args(["--json", "--via-wait", "60s", "--state-dir"])
            .arg(src.dir.path().join("state"))
            .arg("--trace-out")
            .arg(src.dir.path().join("src.trace"))
            .envs(az.env()),
    );
    assert!(ok, "staged migration failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert!(
        report["staged"]["bytes"].as_u64().expect("staged bytes") > 12 * MIB,
        "{report}"
    );
    assert_same(src.path(), &src.dir.path().join("dst.img"));
}
