//! The history in a directory store, through the binary: a damaged segment
//! costs its own records, never the rest of the history.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("tern runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{cmd:?}: {stderr}");
    (stdout, stderr)
}

/// The one object in `dir` (recursively) whose name ends with `suffix`.
fn object(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "{suffix}: {found:?}");
    found.remove(0)
}

#[test]
fn a_corrupt_segment_or_summary_is_listed_and_read_around_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 10 s of writes, 10 000 a second, as an MSR trace (100 ns ticks).
    let mut csv = String::from("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n");
    for i in 0..100_000u64 {
        // Writing into a String cannot fail.
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
    let store = dir.path().join("history");
    run(tern()
        .args(["history", "put", "--every", "1s", "--no-parquet"])
        .arg(&store)
        .arg(&trace));
    // Segment 2's summary is garbage; segment 5's trace has a flipped byte.
    std::fs::write(object(&store, "_000002.json"), b"not json").expect("damage");
    let seg5 = object(&store, "_000005.trace");
    let mut bytes = std::fs::read(&seg5).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg5, bytes).expect("damage");

    let (list, warn) = run(tern().args(["history", "ls"]).arg(&store));
    assert_eq!(
        list.lines().count(),
        11,
        "a header and every segment:\n{list}"
    );
    assert_eq!(list.matches("corrupt").count(), 3, "{list}");
    assert!(
        warn.contains("could not be read") && warn.contains("_000002"),
        "{warn}"
    );

    let got = dir.path().join("got.trace");
    let (_, warn) = run(tern()
        .args(["history", "get"])
        .arg(&store)
        .arg("--out")
        .arg(&got));
    assert!(
        warn.contains("corrupt history segment") && warn.contains("_000005"),
        "{warn}"
    );
    let (stat, _) = run(tern().args(["trace", "stat", "--json"]).arg(&got));
    let v: serde_json::Value = serde_json::from_str(&stat).expect("stat json");
    let events = v["block_events"].as_u64().expect("block_events");
    // Every segment but the damaged tail of the sixth.
    assert!(
        (90_000..100_000).contains(&events),
        "{events} of 100000 records read"
    );
    assert_eq!(v["gaps"], 1, "the unreadable part is a gap: {v}");
}
