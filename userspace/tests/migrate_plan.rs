//! `tern plan` and `tern migrate --plan` end to end, as root: a real source on
//! a loop device under fio, a destination agent, the source trace the
//! migration records, and the plan made from it.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::migration::{MIB, agent, fill_random, fio_writer, migrate, pause_stop, tern};
use support::{LoopDev, sh};

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
    fill_random(src.path(), 64);
    let dir = src.dir.path();
    let (_agent, addr) = agent(dir, size);
    let plan = dir.join("plan.json");
    write_plan(&plan, size);
    let fio = fio_writer(src.path(), 400, 64);
    std::thread::sleep(Duration::from_secs(1));
    let pause = pause_stop(fio.0.id());
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
