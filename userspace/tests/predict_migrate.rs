//! A migration ordered by a prediction, as root, with real processes: fio
//! rewrites a hot region of a loop device, `tern trace` records it, `tern
//! predict` turns the trace into a plan, and `tern migrate --prefetch` holds
//! the hot region back from the bulk copy. The destination must end
//! byte-identical to the source, as without a plan.

mod support;

use std::process::Command;

use support::migration::{MIB, agent, assert_same, fill_random, fio_writer, migrate, pause_stop};
use support::{LoopDev, sh};

/// `tern` under a hard timeout, so a hang fails the test instead of CI.
fn tern_bounded(secs: u32) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", &secs.to_string(), env!("CARGO_BIN_EXE_tern")]);
    c
}

#[test]
fn a_migration_ordered_by_a_prediction_holds_back_the_hot_region_and_ends_identical() {
    let src = LoopDev::new("128M");
    let dir = src.dir.path();
    fill_random(src.path(), 64);
    let (_agent, addr) = agent(dir, 128 * MIB);
    let image = dir.join("dst.img");

    // The workload: 4 KiB random writes over the first 16 MiB.
    let fio = fio_writer(src.path(), 1000, 16);
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

    let pause = pause_stop(fio.0.id());
    let (ok, report, err) = migrate(
        dir,
        src.path(),
        &addr,
        &[
            "--max-downtime",
            "300ms",
            "--prefetch",
            plan.to_str().expect("utf-8"),
            "--pause",
            &pause,
        ],
    );
    assert!(ok, "migrate failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    let held = report["held_back_bytes"].as_u64().expect("held");
    assert!(held >= 4 * MIB, "the hot region was held back: {report}");
    // fio stays stopped after the cutover: the source is still.
    assert_same(src.path(), &image);
    drop(fio);
}
