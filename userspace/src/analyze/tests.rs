//! The analyzer on constructed traces whose answers are known.
// Exact float comparisons: the figures are whole byte counts, exact in f64.
#![allow(clippy::float_cmp)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::report::Report;
use super::*;
use crate::trace::format::TraceWriter;
use crate::trace::format::tests::header;
use crate::trace::record::{EndRecord, FaultRecord, Gap, ProcessRecord};

const S: u64 = 1_000_000_000;
const MIB: u64 = 1 << 20;

fn block(ts: u64, op: Op, offset: u64, len: u32) -> Record {
    Record::Block(BlockRecord {
        ts_ns: ts,
        offset,
        latency_ns: 100_000,
        len,
        pid: 10,
        flags: 0,
        target: 0,
        op,
    })
}

fn run(records: &[Record]) -> Report {
    let mut a = Analyzer::for_header(&header(1), 0).expect("analyzer");
    for r in records {
        a.observe(r);
    }
    a.finish();
    Report::of(&a)
}

/// Through a trace file and back, the offline path.
fn offline(records: &[Record]) -> Result<Report, AnalyzeError> {
    let mut w = TraceWriter::new(Vec::new(), &header(1)).expect("writer");
    for r in records {
        w.push(r).expect("push");
    }
    let bytes = w.finish(EndRecord::default()).expect("finish");
    let reader = TraceReader::new(&bytes[..]).expect("reader");
    analyze_reader(reader, 0, None).map(|a| Report::of(&a))
}

#[test]
fn a_known_dirty_rate_is_measured_at_every_resolution() {
    // Each second: 100 writes of 4 KiB, one per MiB, the same blocks every second.
    let mut recs = Vec::new();
    for sec in 0..10 {
        for i in 0..100u64 {
            recs.push(block(sec * S + i * 1_000_000, Op::Write, i * MIB, 4096));
        }
    }
    recs.push(block(10 * S, Op::Read, 0, 4096));
    let r = run(&recs);
    let rate = |l: usize| r.levels[l].dirty_rate;
    assert_eq!(rate(0).p50, 100.0 * 4096.0);
    assert_eq!(rate(0).max, 100.0 * 4096.0);
    assert_eq!(rate(1).p50, 100.0 * 65536.0);
    assert_eq!(rate(2).p50, 100.0 * MIB as f64);
    // 100 MiB span in 16 MiB units: 7 units.
    assert_eq!(rate(3).p50, 7.0 * 16.0 * MIB as f64);
    // First writes only in the first second: 400 KiB over 10 s.
    assert!((r.levels[0].new_bytes_per_s - 40.0 * 1024.0).abs() < 1.0);
    assert_eq!(r.levels[0].written_unique_bytes, 100 * 4096);
    assert_eq!(r.levels[2].written_unique_bytes, 100 * MIB);
    // Each MiB extent is rewritten once a second.
    let p50 = r.levels[2].rewrite_interval_p50_s.expect("rewrites");
    assert!((0.5..=1.1).contains(&p50), "{p50}");
    assert!((r.mix.writes_per_s - 100.0).abs() < 1.0);
    assert_eq!(r.gaps.gaps, 0);
}

#[test]
fn a_pure_sequential_scan_is_one_run() {
    let recs: Vec<Record> = (0..1000u64)
        .map(|i| block(i * 1_000_000, Op::Read, i * 65536, 65536))
        .collect();
    let r = run(&recs);
    assert!((r.sequential.read_fraction - 0.999).abs() < 1e-9);
    assert_eq!(r.sequential.runs, 1);
    assert_eq!(r.sequential.longest_run_bytes, 1000 * 65536);
    assert_eq!(r.mix.read_fraction, 1.0);
    assert_eq!(r.levels[0].read_unique_bytes, 1000 * 65536);
    assert!(r.levels.iter().all(|l| l.dirty_rate.max == 0.0));
}

#[test]
fn a_periodic_job_has_its_period_found() {
    // A burst of 50 writes in 100 ms every 5 s for 200 s, over a trickle of reads.
    let mut recs = Vec::new();
    for t in (0..200 * S).step_by(200_000_000) {
        recs.push(block(t, Op::Read, (t / 1000) % (512 * MIB), 4096));
    }
    for k in 0..40u64 {
        for i in 0..50u64 {
            recs.push(block(
                k * 5 * S + i * 2_000_000,
                Op::Write,
                (k * 50 + i) * 4096,
                4096,
            ));
        }
    }
    recs.sort_by_key(Record::ts_ns);
    let r = run(&recs);
    let p = r.periods.first().expect("a period");
    assert!((p.seconds - 5.0).abs() < 0.1, "{:?}", r.periods);
    assert!(p.strength > 0.5);
}

#[test]
fn random_load_has_no_period() {
    let mut x = 7u64;
    let mut t = 0;
    let mut recs = Vec::new();
    for _ in 0..20_000 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        t += (x >> 44) % 20_000_000;
        recs.push(block(
            t,
            Op::Write,
            (x >> 20) % (1 << 30) / 4096 * 4096,
            4096,
        ));
    }
    assert!(run(&recs).periods.is_empty());
}

#[test]
fn a_fixed_hot_set_is_found_whatever_else_is_read() {
    // 20480 writes spread evenly over 8 MiB at 64 MiB (extents in turn, blocks
    // 97 apart within one), and one cold 256 MiB scan.
    let mut recs = Vec::new();
    for i in 0..20_480u64 {
        let block_no = (i % 8) * 256 + (i / 8 * 97) % 256;
        recs.push(block(
            i * 1_000_000,
            Op::Write,
            64 * MIB + block_no * 4096,
            4096,
        ));
    }
    for i in 0..256u64 {
        recs.push(block(
            i * 10_000_000,
            Op::Read,
            512 * MIB + i * MIB,
            MIB as u32,
        ));
    }
    recs.sort_by_key(Record::ts_ns);
    let r = run(&recs);
    assert_eq!(r.levels[0].written_unique_bytes, 8 * MIB);
    assert_eq!(r.levels[2].written_unique_bytes, 8 * MIB);
    let h = r
        .hot_sets
        .iter()
        .find(|h| h.unit_bytes == MIB)
        .expect("1 MiB");
    // Eight equally written extents: 80 % of the written bytes needs seven.
    assert_eq!(h.write_hot_extents, 7);
    assert_eq!(h.extents_touched, 8 + 256);
    assert!((64 * MIB..72 * MIB).contains(&h.hottest_offset) || h.hottest_bytes == MIB);
    assert!(r.sequential.read_fraction > 0.99);
    assert!(r.sequential.write_fraction < 0.01);
}

#[test]
fn a_gap_is_unknown_not_idle() {
    // A steady writer at 100 new blocks/s; seconds 5..15 lost to a gap.
    let mut recs = Vec::new();
    for sec in (0..5).chain(15..20) {
        for i in 0..100u64 {
            recs.push(block(
                sec * S + i * 1_000_000,
                Op::Write,
                (sec * 100 + i) * 4096,
                4096,
            ));
        }
    }
    recs.push(Record::Gap(Gap {
        start_ns: 5 * S,
        end_ns: 15 * S - 1,
        lost_block: 1000,
        lost_fault: 0,
    }));
    recs.sort_by_key(Record::ts_ns);
    recs.push(block(20 * S, Op::Read, 0, 4096));
    let r = run(&recs);
    assert_eq!(r.gaps.gaps, 1);
    assert_eq!(r.gaps.lost_events, 1000);
    assert_eq!(r.gaps.unknown_windows, 10);
    // Idleness would put the median at zero; unknown windows are left out.
    assert_eq!(r.levels[0].dirty_rate.p50, 100.0 * 4096.0);
    assert_eq!(r.levels[0].dirty_rate.p90, 100.0 * 4096.0);
    // Rates are over the time events were seen.
    assert!(
        (r.mix.writes_per_s - 100.0).abs() < 2.0,
        "{}",
        r.mix.writes_per_s
    );
    assert!(r.render().contains("GAPS: 1 windows, 1000 events lost"));
}

#[test]
fn faults_give_working_sets_per_process() {
    let mut recs = vec![Record::Process(ProcessRecord {
        ts_ns: 0,
        pid: 42,
        comm: "worker".into(),
    })];
    for w in 0..5u64 {
        for p in 0..64u64 {
            recs.push(Record::Fault(FaultRecord {
                ts_ns: w * S + p * 1000,
                address: 0x7f00_0000_0000 + p * 4096,
                ip: 0x5555_0000_1000,
                pid: 42,
                tid: 42,
                flags: crate::trace::record::fault_flags::WRITE,
            }));
        }
    }
    let r = run(&recs);
    let ws = &r.working_sets[0];
    assert_eq!((ws.pid, ws.comm.as_str(), ws.faults), (42, "worker", 320));
    assert_eq!(ws.footprint_bytes, 64 * 4096);
    assert_eq!(ws.window_bytes.p50, 64.0 * 4096.0);
    assert_eq!(r.mix.faults, 320);
}

#[test]
fn live_and_offline_give_the_same_report() {
    let mut recs = Vec::new();
    for i in 0..5000u64 {
        let op = if i % 3 == 0 { Op::Read } else { Op::Write };
        recs.push(block(
            i * 3_000_000,
            op,
            (i * 104_729 % 4096) * 4096,
            4096 * (1 + (i % 4) as u32),
        ));
    }
    recs.push(Record::Gap(Gap {
        start_ns: 4 * S,
        end_ns: 5 * S,
        lost_block: 7,
        lost_fault: 0,
    }));
    recs.sort_by_key(Record::ts_ns);
    let shared = Arc::new(Mutex::new(
        Analyzer::for_header(&header(1), 0).expect("analyzer"),
    ));
    let mut observer = live(Arc::clone(&shared));
    for r in &recs {
        observer(r);
    }
    observer(&Record::End(EndRecord::default()));
    let mut a = shared.lock().expect("lock");
    a.finish();
    let live_report = serde_json::to_value(Report::of(&a)).expect("json");
    let file_report = serde_json::to_value(offline(&recs).expect("offline")).expect("json");
    assert_eq!(live_report, file_report);
}

#[test]
fn bad_input_gets_clear_errors() {
    let e = offline(&[]).expect_err("empty");
    assert!(e.to_string().contains("nothing to analyze"), "{e}");
    let flush_only = [block(0, Op::Flush, 0, 0)];
    assert!(matches!(
        offline(&flush_only),
        Err(AnalyzeError::Empty { .. })
    ));
    let cfg = AnalyzerConfig {
        window: Duration::from_nanos(10),
        ..AnalyzerConfig::default()
    };
    assert!(Analyzer::new(cfg).is_err_and(|e| e.to_string().contains("--window")));
    assert!(matches!(
        Analyzer::for_header(&header(1), 3),
        Err(AnalyzeError::NoSuchTarget {
            target: 3,
            count: 1
        })
    ));
    // An absurd offset is counted and left out, not allocated for.
    let r = run(&[
        block(0, Op::Write, u64::MAX - 8192, 4096),
        block(1, Op::Write, 0, 4096),
    ]);
    assert_eq!(r.mix.writes, 1);
}

#[test]
fn memory_is_bounded_by_the_device_size() {
    // A 1 TiB device: bitmaps at four resolutions plus counters at 1 and 16 MiB.
    let cfg = AnalyzerConfig {
        device_bytes: 1 << 40,
        ..AnalyzerConfig::default()
    };
    let mut a = Analyzer::new(cfg).expect("analyzer");
    let before = a.memory_bytes();
    for i in 0..200_000u64 {
        a.observe(&block(
            i * 1_000_000,
            Op::Write,
            (i * 2_654_435_761 % (1 << 28)) * 4096,
            4096,
        ));
    }
    a.finish();
    let after = a.memory_bytes();
    assert!(before < 200 << 20, "{before}");
    // Recording adds only the bounded series and grids.
    assert!(after - before < 16 << 20, "{before} -> {after}");
}

#[test]
fn the_heatmap_draws_a_png() {
    let mut recs = Vec::new();
    for i in 0..2000u64 {
        recs.push(block(i * 10_000_000, Op::Write, (i % 100) * MIB, 65536));
        recs.push(block(
            i * 10_000_000,
            Op::Read,
            512 * MIB + i * 65536,
            65536,
        ));
    }
    let mut a = Analyzer::for_header(&header(1), 0).expect("analyzer");
    for r in &recs {
        a.observe(r);
    }
    a.finish();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("heat.png");
    a.block_heatmap(&out).expect("drawn");
    let png = std::fs::read(&out).expect("png written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000);
    assert!(matches!(a.fault_heatmap(&out), Err(AnalyzeError::NoFaults)));
}

#[test]
fn the_heatmap_grid_as_data_holds_every_byte_in_its_row() {
    let mut a = Analyzer::for_header(&header(1), 0).expect("analyzer");
    for i in 0..2000u64 {
        a.observe(&block(i * 10_000_000, Op::Write, (i % 100) * MIB, 65536));
        a.observe(&block(
            i * 10_000_000,
            Op::Read,
            512 * MIB + i * 65536,
            65536,
        ));
    }
    // Faults in two regions far apart: two rows, in address order.
    for (k, address) in [(0u64, 0x7f00_0010_0000u64), (1, 0x1000_0000)] {
        for p in 0..10u64 {
            a.observe(&Record::Fault(FaultRecord {
                ts_ns: k * S + p,
                address: address + p * 4096,
                ip: 0,
                pid: 42,
                tid: 42,
                flags: 0,
            }));
        }
    }
    a.finish();
    let d = a.block_heatmap_data().expect("block data");
    assert_eq!((d.kind, d.value, d.version), ("block", "KiB", 1));
    assert_eq!(d.read.len(), d.rows);
    assert!(d.read.iter().chain(&d.write).all(|r| r.len() == d.columns));
    let total = |m: &[Vec<u32>]| m.iter().flatten().map(|&v| u64::from(v)).sum::<u64>();
    assert_eq!(total(&d.read), 2000 * 64);
    assert_eq!(total(&d.write), 2000 * 64);
    assert_eq!((d.saturated_cells, d.dropped), (0, 0));
    for (row, start) in d.row_starts.iter().enumerate() {
        let end = start + d.row_bytes;
        if d.write[row].iter().any(|&v| v > 0) {
            assert!(*start < 100 * MIB, "a write in row {row} at {start}");
        }
        if d.read[row].iter().any(|&v| v > 0) {
            assert!(end > 512 * MIB, "a read in row {row} ending at {end}");
        }
    }
    // 20 s of trace in columns of column_seconds.
    let span = d.columns as f64 * d.column_seconds;
    assert!((19.9..=40.0).contains(&span), "{span} s");
    assert!(d.unknown_columns.is_empty());

    let f = a.fault_heatmap_data().expect("fault data");
    assert_eq!((f.kind, f.rows, f.row_bytes), ("faults", 2, MIB));
    assert_eq!(f.row_starts, vec![0x1000_0000, 0x7f00_0010_0000]);
    assert_eq!(f.read[0].iter().sum::<u32>(), 10, "the low region's faults");
    assert_eq!(f.read[1].iter().sum::<u32>(), 10);
    let json = serde_json::to_value(&f).expect("serializes");
    assert_eq!(json["read"][0].as_array().map(Vec::len), Some(f.columns));
}
