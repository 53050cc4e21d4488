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

/// Bytes a plan file predicts to be written soon (`p_write` ≥ 0.5).
fn hot_writes(plan: &std::path::Path) -> u64 {
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan).expect("plan")).expect("json");
    parsed["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["p_write"].as_f64().expect("p") >= 0.5)
        .map(|e| e["len"].as_u64().expect("len"))
        .sum()
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
    let hot_writes = hot_writes(&plan);
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
    // The round that sent the held-back extents does not count as the model
    // of the final delta: another round measured it before the pause.
    assert!(
        report["rounds"].as_u64().expect("rounds") >= 2,
        "a delta round after the catch-up: {report}"
    );
    // fio stays stopped after the cutover: the source is still.
    assert_same(src.path(), &image);
    drop(fio);
}

/// Training inside the source agent: a first migration records the
/// workload's history into a store (`--history`); a second one, to another
/// destination, trains on that history at start (`--prefetch-history`) and
/// holds the hot region back as a plan file would.
#[test]
fn a_source_trains_on_its_recorded_history_and_holds_back_the_hot_region() {
    let src = LoopDev::new("128M");
    let dir = src.dir.path();
    fill_random(src.path(), 64);
    let history = dir.join("history");
    let history = history.to_str().expect("utf-8");
    let fio = fio_writer(src.path(), 1000, 16);
    let pause = pause_stop(fio.0.id());

    let first = dir.join("first");
    std::fs::create_dir(&first).expect("mkdir");
    let (_a, addr) = agent(&first, 128 * MIB);
    let (ok, report, err) = migrate(
        &first,
        src.path(),
        &addr,
        &[
            "--max-downtime",
            "300ms",
            // A copy of seconds, not one: the history must hold more than
            // the 4 MiB of the hot region that fio writes in about a second.
            "--max-rate",
            "32M",
            "--history",
            history,
            "--history-every",
            "1s",
            "--history-spool",
            dir.join("spool").to_str().expect("utf-8"),
            "--pause",
            &pause,
        ],
    );
    assert!(ok, "recording migrate failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert_same(src.path(), &first.join("dst.img"));

    // `tern predict` reads the same store.
    let plan = dir.join("plan.json");
    sh(tern_bounded(120)
        .args([
            "predict",
            history,
            "--from",
            "1h",
            "--horizon",
            "30s",
            "--out",
        ])
        .arg(&plan));
    let hot = hot_writes(&plan);
    assert!(
        (4 * MIB..=24 * MIB).contains(&hot),
        "the plan from history names the 16 MiB hot region as written soon: {hot} bytes"
    );
    let out = tern_bounded(60)
        .args(["predict"])
        .arg(first.join("src.trace"))
        .args(["--from", "1h", "--horizon", "30s"])
        .output()
        .expect("run tern predict");
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("select from a history store"),
        "a history filter on a trace file is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The workload goes on (the first cutover left it stopped).
    sh(Command::new("kill").args(["-CONT", &fio.0.id().to_string()]));
    let second = dir.join("second");
    std::fs::create_dir(&second).expect("mkdir");
    let (_b, addr) = agent(&second, 128 * MIB);
    let (ok, report, err) = migrate(
        &second,
        src.path(),
        &addr,
        &[
            "--max-downtime",
            "300ms",
            "--prefetch-history",
            history,
            "--prefetch-window",
            "1h",
            "--prefetch-horizon",
            "30s",
            "--pause",
            &pause,
        ],
    );
    assert!(ok, "migrate with --prefetch-history failed: {err}");
    assert_eq!(report["outcome"], "cut over", "{report}");
    // Only a plan holds anything back, and only the history made one.
    let held = report["held_back_bytes"].as_u64().expect("held");
    assert!(held >= 4 * MIB, "the hot region was held back: {report}");
    assert_same(src.path(), &second.join("dst.img"));
    drop(fio);
}
