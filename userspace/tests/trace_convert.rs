//! Import and export round trips, and fio replaying an exported iolog.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::process::Command;

use tern::trace::export;
use tern::trace::format::{Target, TargetKind, TraceHeader};
use tern::trace::import::{self, ImportFormat};
use tern::trace::record::{BlockRecord, EndRecord, FaultRecord, Gap, block_flags, fault_flags};
use tern::trace::{Op, Record, TraceReader, TraceWriter};

fn header() -> TraceHeader {
    TraceHeader {
        kernel_release: "6.18".into(),
        hostname: "h".into(),
        start_wall_unix_ns: 0,
        start_monotonic_ns: 0,
        sector_size: 512,
        targets: vec![Target {
            name: "/dev/loop7".into(),
            kind: TargetKind::Device,
            dev: Some("7:7".into()),
            size_bytes: 64 << 20,
            logical_block_size: 512,
        }],
        fault_pids: vec![],
        source: "ebpf".into(),
        cpu_targets: vec![],
        host_cpus: 0,
    }
}

fn sample() -> Vec<Record> {
    let mut v = Vec::new();
    for i in 0..500u64 {
        let op = [
            Op::Read,
            Op::Write,
            Op::Write,
            Op::Discard,
            Op::Flush,
            Op::WriteZeroes,
        ][(i % 6) as usize];
        v.push(Record::Block(BlockRecord {
            ts_ns: i * 10_000,
            offset: if op == Op::Flush {
                0
            } else {
                (i * 7919 % 8000) * 4096
            },
            latency_ns: 1000 + i,
            len: if op == Op::Flush {
                0
            } else {
                4096 * (1 + (i % 4) as u32)
            },
            pid: 100 + (i % 3) as u32,
            flags: if i % 5 == 0 {
                block_flags::SYNC | block_flags::FUA
            } else {
                0
            },
            target: 0,
            op,
        }));
        if i % 50 == 0 {
            v.push(Record::Fault(FaultRecord {
                ts_ns: i * 10_000 + 1,
                address: 0x7f00_0000_0000 + i * 4096,
                ip: 0x55_0000 + i,
                pid: 100,
                tid: 101,
                flags: fault_flags::WRITE,
            }));
        }
        if i == 250 {
            v.push(Record::Gap(Gap {
                start_ns: i * 10_000,
                end_ns: i * 10_000 + 5_000_000,
                lost_block: 17,
                lost_fault: 0,
            }));
        }
    }
    v
}

fn write_trace(path: &Path, records: &[Record]) {
    let mut w = TraceWriter::new(
        BufWriter::new(File::create(path).expect("create")),
        &header(),
    )
    .expect("header");
    for r in records {
        w.push(r).expect("push");
    }
    w.finish(EndRecord::default())
        .expect("finish")
        .flush()
        .expect("flush");
}

fn read_trace(path: &Path) -> (TraceHeader, Vec<Record>) {
    let r = TraceReader::new(BufReader::new(File::open(path).expect("open"))).expect("header");
    let h = r.header().clone();
    (
        h,
        r.filter_map(Result::ok)
            .filter(|r| !matches!(r, Record::End(_) | Record::Process(_)))
            .collect(),
    )
}

#[test]
fn csv_export_then_import_gives_back_the_same_records() {
    let dir = tempfile::tempdir().expect("dir");
    let orig = dir.path().join("a.trace");
    let records = sample();
    write_trace(&orig, &records);
    let csv = dir.path().join("a.csv");
    let reader =
        TraceReader::new(BufReader::new(File::open(&orig).expect("open"))).expect("header");
    let rows = export::to_csv(reader, File::create(&csv).expect("csv")).expect("export");
    assert_eq!(rows as usize, records.len());
    let back = dir.path().join("b.trace");
    import::import(
        ImportFormat::Csv,
        &csv,
        File::create(&back).expect("create"),
    )
    .expect("import");
    let (h, got) = read_trace(&back);
    assert_eq!(h.targets[0].name, "/dev/loop7");
    assert_eq!(h.source, "import:csv");
    assert_eq!(got, records);
}

#[test]
fn blkparse_text_imports_issues_with_their_completion_latency() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("blk.txt");
    std::fs::write(
        &input,
        "  7,0    1        1     0.000000000  4242  Q  WS 2048 + 8 [dd]\n\
         \x20 7,0    1        2     0.000001000  4242  G  WS 2048 + 8 [dd]\n\
         \x20 7,0    1        3     0.000010000  4242  D  WS 2048 + 8 [dd]\n\
         \x20 7,0    0        4     0.000210000     0  C  WS 2048 + 8 [0]\n\
         \x20 7,0    1        5     1.500000000  4243  D   R 4096 + 16 [cat]\n\
         \x20 7,0    1        6     1.500100000  4243  D FWFS 8 + 8 [jbd2/loop0-8]\n\
         \x20 7,0    0        7     1.500300000     0  C   R 4096 + 16 [0]\n\
         CPU0 (7,0):\n Reads Queued:           1,        8KiB\n",
    )
    .expect("write input");
    let out = dir.path().join("blk.trace");
    let totals = import::import(
        ImportFormat::Blkparse,
        &input,
        File::create(&out).expect("create"),
    )
    .expect("import");
    assert_eq!(totals.records, 3);
    let (h, got) = read_trace(&out);
    assert_eq!(h.targets[0].name, "7:0");
    let blocks: Vec<BlockRecord> = got
        .into_iter()
        .filter_map(|r| {
            if let Record::Block(b) = r {
                Some(b)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(blocks.len(), 3);
    let w = blocks
        .iter()
        .find(|b| b.offset == 2048 * 512)
        .expect("the write");
    assert_eq!(
        (w.op, w.len, w.pid, w.ts_ns, w.latency_ns),
        (Op::Write, 4096, 4242, 10_000, 200_000)
    );
    assert_eq!(w.flags, block_flags::SYNC);
    let r = blocks
        .iter()
        .find(|b| b.offset == 4096 * 512)
        .expect("the read");
    assert_eq!((r.op, r.len, r.latency_ns), (Op::Read, 8192, 300_000));
    let j = blocks
        .iter()
        .find(|b| b.offset == 8 * 512)
        .expect("the journal write");
    assert_eq!(
        j.flags,
        block_flags::PREFLUSH | block_flags::FUA | block_flags::SYNC
    );
    assert_eq!(j.latency_ns, 0, "never completed: latency unknown");
}

#[test]
fn msr_csv_imports_with_filetime_and_response_time() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("msr.csv");
    std::fs::write(
        &input,
        "128166372003061629,prxy,0,Write,1321172992,4096,1418\n\
         128166372013061629,prxy,0,Read,8192,65536,300\n\
         128166372013061630,prxy,1,Write,0,512,10\n",
    )
    .expect("write");
    let out = dir.path().join("msr.trace");
    import::import(
        ImportFormat::Msr,
        &input,
        File::create(&out).expect("create"),
    )
    .expect("import");
    let (h, got) = read_trace(&out);
    assert_eq!(
        h.targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["prxy/0", "prxy/1"]
    );
    assert_eq!(h.targets[0].size_bytes, 1_321_172_992 + 4096);
    let Record::Block(second) = &got[1] else {
        panic!("block")
    };
    assert_eq!(
        (
            second.ts_ns,
            second.op,
            second.offset,
            second.len,
            second.latency_ns
        ),
        (1_000_000_000, Op::Read, 8192, 65536, 30_000)
    );
    let Record::Block(third) = &got[2] else {
        panic!("block")
    };
    assert_eq!(third.target, 1);
}

#[test]
fn malformed_imports_name_the_line() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("bad.csv");
    std::fs::write(
        &input,
        "128166372003061629,prxy,0,Write,notanumber,4096,1418\n",
    )
    .expect("write");
    let err = import::import(ImportFormat::Msr, &input, std::io::sink()).expect_err("bad offset");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1: offset \"notanumber\" is not a number",
            input.display()
        )
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "CPU0 (7,0):\n").expect("write");
    let err = import::import(ImportFormat::Blkparse, &empty, std::io::sink())
        .expect_err("nothing to import");
    assert!(
        err.to_string().contains("holds no blkparse I/O events"),
        "{err}"
    );
}

/// fio replays `iolog`; it must succeed; returns its JSON report.
fn fio_replay(iolog: &Path) -> serde_json::Value {
    let out = Command::new("fio")
        .args(["--name=replay", "--ioengine=psync", "--output-format=json"])
        .arg(format!("--read_iolog={}", iolog.display()))
        .output()
        .expect("fio runs (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fio json")
}

#[test]
fn fio_replays_an_exported_iolog() {
    let dir = tempfile::tempdir().expect("dir");
    let orig = dir.path().join("a.trace");
    // Half a second of I/O so the timed replay stays short.
    let records: Vec<Record> = sample()
        .into_iter()
        .filter(|r| r.ts_ns() < 500_000_000)
        .collect();
    write_trace(&orig, &records);
    let target = dir.path().join("replay.img");
    File::create(&target)
        .expect("create")
        .set_len(64 << 20)
        .expect("size");
    let iolog = dir.path().join("replay.iolog");
    let reader =
        TraceReader::new(BufReader::new(File::open(&orig).expect("open"))).expect("header");
    let ios = export::to_fio_iolog(reader, File::create(&iolog).expect("create"), |_| {
        target.display().to_string()
    })
    .expect("export");
    let blocks = records
        .iter()
        .filter(|r| matches!(r, Record::Block(_)))
        .count() as u64;
    assert_eq!(ios, blocks);
    let v = fio_replay(&iolog);
    let job = &v["jobs"][0];
    let reads = records
        .iter()
        .filter(|r| matches!(r, Record::Block(b) if b.op == Op::Read))
        .count() as u64;
    let writes = records
        .iter()
        .filter(|r| matches!(r, Record::Block(b) if matches!(b.op, Op::Write | Op::WriteZeroes)))
        .count() as u64;
    assert_eq!(job["read"]["total_ios"].as_u64(), Some(reads));
    assert_eq!(job["write"]["total_ios"].as_u64(), Some(writes));
}

/// A real ext4 trace holds writes without data: the cache flushes
/// (`REQ_PREFLUSH`) of fsync and the journal. fio 3.33 aborts on a
/// zero-length I/O; the export replays them as syncs.
#[test]
fn fio_replays_an_export_holding_the_kernels_empty_preflush_writes() {
    let dir = tempfile::tempdir().expect("dir");
    let orig = dir.path().join("a.trace");
    let mut records = Vec::new();
    for i in 0..200u64 {
        let flush = i % 10 == 9;
        records.push(Record::Block(BlockRecord {
            ts_ns: i * 100_000,
            offset: if flush { 0 } else { (i * 7919 % 8000) * 4096 },
            latency_ns: 1000,
            len: if flush { 0 } else { 4096 },
            pid: 100,
            flags: if flush {
                block_flags::PREFLUSH | block_flags::SYNC
            } else {
                0
            },
            target: 0,
            op: if i % 3 == 0 && !flush {
                Op::Read
            } else {
                Op::Write
            },
        }));
    }
    write_trace(&orig, &records);
    let target = dir.path().join("replay.img");
    File::create(&target)
        .expect("create")
        .set_len(64 << 20)
        .expect("size");
    let iolog = dir.path().join("replay.iolog");
    let st = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["trace", "export", "--format", "fio-iolog"])
        .arg(&orig)
        .arg("--out")
        .arg(&iolog)
        .arg("--replay-on")
        .arg(&target)
        .status()
        .expect("tern runs");
    assert!(st.success());
    let v = fio_replay(&iolog);
    let count = |op| {
        records
            .iter()
            .filter(|r| matches!(r, Record::Block(b) if b.op == op && b.len > 0))
            .count() as u64
    };
    assert_eq!(
        v["jobs"][0]["read"]["total_ios"].as_u64(),
        Some(count(Op::Read))
    );
    assert_eq!(
        v["jobs"][0]["write"]["total_ios"].as_u64(),
        Some(count(Op::Write))
    );
}

/// A failed import must leave the trace that was at `--out` as it was, and
/// a failed first import must leave nothing behind.
#[test]
fn a_failed_import_never_destroys_or_leaves_a_trace() {
    let dir = tempfile::tempdir().expect("dir");
    let existing = dir.path().join("existing.trace");
    write_trace(&existing, &sample());
    let before = std::fs::read(&existing).expect("read");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "this is not,a trace\n1,2,3\n").expect("write");
    let import = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["trace", "import", "--format", "csv"])
            .arg(&bad)
            .arg("--out")
            .arg(out)
            .output()
            .expect("tern runs")
    };
    let o = import(&existing);
    assert!(!o.status.success(), "a bad CSV must fail");
    assert_eq!(std::fs::read(&existing).expect("read"), before, "untouched");
    let fresh = dir.path().join("fresh.trace");
    assert!(!import(&fresh).status.success());
    assert!(!fresh.exists(), "no empty trace left behind");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temporary left: {names:?}");
}
