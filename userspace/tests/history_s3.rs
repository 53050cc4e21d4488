//! History in object storage against a real S3 server (Garage on loopback):
//! round trip with multipart segments, listing, the CLI with environment
//! credentials, retention, and a server killed in the middle of an upload.
//! Figures (upload throughput, restart recovery) are printed; run with
//! `cargo test -p tern --test history_s3 -- --nocapture --test-threads 1`.

#[path = "support/garage.rs"]
mod garage;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use garage::Garage;
use tern::history::{
    Backoff, HistoryStore, Query, Retention, RollPolicy, SegmentWriter, StoreOptions, TimeRange,
    UploadOptions, Uploader,
};
use tern::trace::format::{Target, TargetKind, TraceHeader};
use tern::trace::record::{BlockRecord, Gap, Op, Record};
use tern::trace::{TraceReader, tracer::monotonic_ns};

fn store(g: &Garage, prefix: &str) -> HistoryStore {
    HistoryStore::open_with(
        &g.url(prefix),
        &StoreOptions {
            endpoint: Some(g.endpoint()),
            region: Some(garage::REGION.into()),
            access_key_id: Some(garage::KEY_ID.into()),
            secret_access_key: Some(garage::SECRET.into()),
            // A dead server must fail a request fast: the uploader retries it.
            request_retries: 1,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            ..StoreOptions::default()
        },
    )
    .expect("the store opens")
}

fn header(start_wall: u64, start_mono: u64) -> TraceHeader {
    TraceHeader {
        kernel_release: "6.18.0-test".into(),
        hostname: "src-host".into(),
        start_wall_unix_ns: start_wall,
        start_monotonic_ns: start_mono,
        sector_size: 512,
        targets: vec![Target {
            name: "/dev/loop9".into(),
            kind: TargetKind::Device,
            dev: Some("7:9".into()),
            size_bytes: 1 << 40,
            logical_block_size: 512,
        }],
        fault_pids: vec![],
        source: "ebpf".into(),
        cpu_targets: vec![],
        host_cpus: 0,
    }
}

fn wall_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64
}

/// Record `i` at `ts`: every 50 000th is a gap; the pid holds `i` so order can be checked.
fn rec(i: u64, ts: u64) -> Record {
    if i % 50_000 == 49_999 {
        return Record::Gap(Gap {
            start_ns: ts,
            end_ns: ts + 1_000_000,
            lost_block: i,
            lost_fault: 1,
        });
    }
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Record::Block(BlockRecord {
        ts_ns: ts,
        offset: (h >> 24) % (1 << 28) * 4096,
        latency_ns: 10_000 + (h >> 50),
        len: 4096 << (h % 4),
        pid: i as u32,
        flags: 0,
        target: 0,
        op: if h.is_multiple_of(3) {
            Op::Read
        } else {
            Op::Write
        },
    })
}

/// Reads the whole history back and checks it is exactly `rec(i, ts[i])` for every `i`.
async fn assert_every_record(store: &HistoryStore, ts: &[u64]) {
    let mut stream = store.records(&Query::default()).await.expect("records");
    let mut i = 0usize;
    while let Some(r) = stream.next_record().await.expect("a record") {
        assert!(i < ts.len(), "more records than were written");
        assert_eq!(r, rec(i as u64, ts[i]), "record {i}");
        i += 1;
    }
    assert_eq!(i, ts.len(), "records lost");
    assert_eq!(stream.synthesized_gaps(), 0);
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario read top to bottom: upload, list, read back every record"
)]
fn s3_history_round_trips_multipart_segments_lists_and_reads_back_every_record() {
    let g = Garage::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let spool = tempfile::tempdir().expect("spool");
    let store = store(&g, "round-trip");
    let session = wall_now();
    let mut w = SegmentWriter::new(
        spool.path(),
        header(session, 0),
        RollPolicy {
            every: Duration::from_secs(5),
            max_bytes: 64 << 20,
        },
    )
    .expect("writer");
    // 1.2 M records over 12 s of trace time: windows 0-5, 5-10, 10-12.
    let n = 1_200_000u64;
    let ts: Vec<u64> = (0..n).map(|i| i * 10_000).collect();
    for (i, t) in ts.iter().enumerate() {
        w.push(&rec(i as u64, *t)).expect("push");
    }
    w.finish(12_000_000_000).expect("finish");
    let mut opts = UploadOptions::new(spool.path().to_owned());
    opts.part_size = 5 << 20;
    let up = Uploader::new(store.clone(), opts).expect("uploader");
    let started = Instant::now();
    let uploaded = rt.block_on(up.upload_pending()).expect("uploads");
    let took = started.elapsed();
    let counts = up.counts();
    eprintln!(
        "FIGURE upload to Garage: {} segments, {:.1} MB in {:.2} s = {:.1} MB/s ({} multipart parts)",
        uploaded,
        counts.bytes as f64 / 1e6,
        took.as_secs_f64(),
        counts.bytes as f64 / 1e6 / took.as_secs_f64(),
        counts.parts
    );
    assert_eq!(uploaded, 3);
    assert!(
        counts.parts >= 4,
        "the two big segments go in parts: {counts:?}"
    );
    assert_eq!(counts.waiting, 0);

    // Listing: three windows, each with its summary, in time order.
    let segs = rt
        .block_on(store.segments(&Query::default()))
        .expect("lists");
    let windows: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| {
            (
                (s.key.start_unix_ns - session) / 1_000_000_000,
                (s.key.end_unix_ns - session) / 1_000_000_000,
            )
        })
        .collect();
    assert_eq!(windows, vec![(0, 5), (5, 10), (10, 12)]);
    assert!(segs.iter().all(|s| s.summary_bytes.is_some()));
    // Each with its Parquet table, put with a plain PUT whatever its size.
    assert!(segs.iter().all(|s| s.table_bytes.is_some()));
    assert_eq!((counts.tables, counts.table_failures), (3, 0));
    assert_eq!(segs[0].key.host, "src-host");
    assert_eq!(segs[0].key.device, "dev-loop9");
    let sums = rt
        .block_on(store.summaries(&Query::default()))
        .expect("summaries");
    let gaps = n / 50_000;
    assert_eq!(sums.iter().map(|s| s.block_events).sum::<u64>(), n - gaps);
    assert_eq!(sums.iter().map(|s| s.gaps).sum::<u64>(), gaps);
    assert_eq!(
        sums.iter().map(|s| s.segment_bytes).sum::<u64>(),
        segs.iter().map(|s| s.bytes).sum::<u64>()
    );
    // A range listing picks the overlapping windows only.
    let q = Query {
        range: TimeRange {
            from_unix_ns: Some(session + 6_000_000_000),
            to_unix_ns: Some(session + 7_000_000_000),
        },
        ..Query::default()
    };
    assert_eq!(rt.block_on(store.segments(&q)).expect("lists").len(), 1);

    rt.block_on(assert_every_record(&store, &ts));

    // The operator's CLI, with credentials and endpoint from the environment.
    let tern = env!("CARGO_BIN_EXE_tern");
    let out = Command::new("timeout")
        .args(["60", tern, "history", "ls", &g.url("round-trip"), "--json"])
        .envs(g.env())
        .output()
        .expect("tern runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["summary"]["gaps"], serde_json::json!(10));
    let trace = spool.path().join("window.trace");
    let from =
        humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(session + 4_000_000_000))
            .to_string();
    let to =
        humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(session + 6_000_000_000))
            .to_string();
    let out = Command::new("timeout")
        .args([
            "60",
            tern,
            "history",
            "get",
            &g.url("round-trip"),
            "--from",
            &from,
            "--to",
            &to,
            "--out",
        ])
        .arg(&trace)
        .envs(g.env())
        .output()
        .expect("tern runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reader =
        TraceReader::new(std::fs::File::open(&trace).expect("the trace")).expect("a trace");
    let got = reader
        .filter(|r| matches!(r, Ok(Record::Block(_) | Record::Gap(_))))
        .count();
    // 2 s of trace at 100 000 records a second, and the gap that began
    // 10 us before the range and lasts into it.
    assert_eq!(got, 200_001);
}

#[test]
fn s3_retention_deletes_old_segments_and_their_summaries() {
    let g = Garage::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let spool = tempfile::tempdir().expect("spool");
    let store = store(&g, "retention");
    // The hour ended 100 s ago (for the CLI's prune, which uses the clock).
    let session = wall_now() - 3_700_000_000_000;
    let mut w = SegmentWriter::new(
        spool.path(),
        header(session, 0),
        RollPolicy {
            every: Duration::from_mins(10),
            max_bytes: 64 << 20,
        },
    )
    .expect("writer");
    // An hour of history in six 10-minute windows.
    for i in 0..36_000u64 {
        w.push(&rec(i, i * 100_000_000)).expect("push");
    }
    w.finish(3_600_000_000_000).expect("finish");
    let up = Uploader::new(store.clone(), UploadOptions::new(spool.path().to_owned()))
        .expect("uploader");
    assert_eq!(rt.block_on(up.upload_pending()).expect("uploads"), 6);
    let now = session + 3_600_000_000_000;
    let keep_25m = "25m".parse::<Retention>().expect("retention");
    let report = rt
        .block_on(store.prune(&keep_25m, None, now, false))
        .expect("prune");
    assert_eq!((report.deleted_segments, report.kept_segments), (3, 3));
    let left = rt
        .block_on(store.segments(&Query::default()))
        .expect("lists");
    assert_eq!(left.len(), 3);
    assert!(
        left.iter()
            .all(|s| s.key.end_unix_ns >= now - 1_500_000_000_000)
    );
    // By size: only the newest fits.
    let newest = &left[2];
    let budget = newest.bytes + newest.summary_bytes.unwrap_or(0) + newest.table_bytes.unwrap_or(0);
    let report = rt
        .block_on(store.prune(
            &Retention {
                max_age: None,
                max_bytes: Some(budget),
            },
            Some(("src-host", "dev-loop9")),
            now,
            false,
        ))
        .expect("prune");
    assert_eq!((report.deleted_segments, report.kept_segments), (2, 1));
    let left = rt
        .block_on(store.segments(&Query::default()))
        .expect("lists");
    assert_eq!(left.len(), 1);
    // Their summaries went with them.
    let sums = rt
        .block_on(store.summaries(&Query::default()))
        .expect("summaries");
    assert_eq!(sums.len(), 1);
    let out = Command::new("timeout")
        .args([
            "60",
            env!("CARGO_BIN_EXE_tern"),
            "history",
            "prune",
            &g.url("retention"),
            "--retention",
            "1s",
            "--dry-run",
        ])
        .envs(g.env())
        .output()
        .expect("tern runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["deleted_segments"], serde_json::json!(1));
    assert_eq!(
        rt.block_on(store.segments(&Query::default()))
            .expect("lists")
            .len(),
        1
    );
}

/// Is a multipart upload with at least one finished part saved in the spool?
fn multipart_in_flight(spool: &std::path::Path) -> bool {
    let dir = spool.join("src-host").join("dev-loop9");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().ends_with(".upload.json")
            && std::fs::read_to_string(e.path()).is_ok_and(|s| !s.contains("\"parts\":[]"))
    })
}

#[test]
fn s3_server_killed_mid_upload_restarts_and_the_writer_loses_nothing() {
    let mut g = Garage::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let spool = tempfile::tempdir().expect("spool");
    let store = store(&g, "restart");
    let mut opts = UploadOptions::new(spool.path().to_owned());
    opts.part_size = 5 << 20;
    opts.roll = RollPolicy {
        // Closed by size, so every segment goes in two parts whatever the machine's speed.
        every: Duration::from_mins(1),
        max_bytes: 6 << 20,
    };
    opts.backoff = Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let up = Uploader::new(store.clone(), opts).expect("uploader");
    let handle = {
        let _guard = rt.enter();
        up.spawn(tokio_util::sync::CancellationToken::new())
    };
    let start_mono = monotonic_ns();
    let session = wall_now();
    let mut observer = up.observer(&header(session, start_mono)).expect("observer");

    // The tracer's side: records as fast as a busy disk gives them, with real timestamps.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let producer = {
        let stop = Arc::clone(&stop);
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            let mut ts_log = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let ts = monotonic_ns() - start_mono;
                // About 100 000 records (2 MB) a second: below what the store takes,
                // so the spool drains once it is back.
                for _ in 0..1_000 {
                    observer(&rec(i, ts));
                    ts_log.push(ts);
                    i += 1;
                }
                written.store(i, Ordering::Release);
                std::thread::sleep(Duration::from_millis(10));
            }
            // Dropping the observer closes the last segment, as the tracker does.
            drop(observer);
            ts_log
        })
    };

    let deadline = Instant::now() + Duration::from_mins(1);
    while !multipart_in_flight(spool.path()) {
        assert!(Instant::now() < deadline, "no multipart upload started");
        std::thread::sleep(Duration::from_millis(5));
    }
    g.kill();
    let killed_at = written.load(Ordering::Acquire);
    let failures_before = up.counts().failures;
    // The writer goes on while the store is gone: segments pile up in the spool.
    std::thread::sleep(Duration::from_secs(4));
    let down = up.counts();
    assert!(down.waiting >= 1, "segments wait in the spool: {down:?}");
    assert!(down.failures > failures_before, "{down:?}");
    let restarted = Instant::now();
    g.restart();
    let listening = restarted.elapsed();
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut drained = None;
    while drained.is_none() {
        assert!(
            Instant::now() < deadline,
            "the spool did not drain: {:?}",
            up.counts()
        );
        let c = up.counts();
        if c.waiting == 0 && c.segments > down.segments {
            drained = Some(restarted.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let ts = producer.join().expect("the producer ends");
    let counts = rt.block_on(handle.shutdown(Duration::from_mins(1)));
    eprintln!(
        "FIGURE restart: {} records written ({} before the kill), {} segments / {:.1} MB uploaded, \
         {} failed attempts while down, {} multipart uploads resumed; Garage listening {:.0} ms after restart, \
         spool drained {:.0} ms after restart (with {} segments waiting)",
        ts.len(),
        killed_at,
        counts.segments,
        counts.bytes as f64 / 1e6,
        counts.failures,
        counts.resumed,
        listening.as_secs_f64() * 1e3,
        drained.map_or(0.0, |d| d.as_secs_f64() * 1e3),
        down.waiting
    );
    assert_eq!(counts.waiting, 0, "{counts:?}");
    assert!(
        counts.resumed >= 1,
        "the upload in flight resumed: {counts:?}"
    );
    rt.block_on(assert_every_record(&store, &ts));
}

#[test]
fn the_source_tracker_records_a_loop_devices_writes_into_s3_history() {
    let g = Garage::start();
    let dev = support::LoopDev::new("64M");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let spool = tempfile::tempdir().expect("spool");
    let store = store(&g, "tracker");
    let mut opts = UploadOptions::new(spool.path().join("spool"));
    opts.roll = RollPolicy {
        every: Duration::from_secs(1),
        max_bytes: 32 << 20,
    };
    let up = Uploader::new(store.clone(), opts).expect("uploader");
    let handle = {
        let _guard = rt.enter();
        up.spawn(tokio_util::sync::CancellationToken::new())
    };
    let dirty = Arc::new(tern::dirty::DirtyMap::new(64 << 20, 4096).expect("dirty map"));
    let hook = Arc::clone(&up);
    let tracker = tern::replicate::Tracker::start_observed(
        tern::trace::session::SessionConfig {
            devices: vec![dev.dev.clone()],
            image: None,
            pids: Vec::new(),
            faults: false,
            fault_range: None,
            duration: None,
            ring_bytes: 16 << 20,
            out: spool.path().join("source.trace"),
            progress: false,
            cpu: vec![tern::trace::cpu::CpuTarget::Host],
        },
        vec![Arc::clone(&dirty)],
        Vec::new(),
        Some(Box::new(move |h| hook.observer(h))),
    )
    .expect("the tracker starts (root, eBPF)");
    // 60 direct 4 KiB writes at known offsets, over about 3 s: several windows.
    let offsets: Vec<u64> = (0..60u64).map(|k| (k * 37 % 256) * 65_536).collect();
    for (i, off) in offsets.iter().enumerate() {
        support::sh(
            Command::new("timeout")
                .args(["10", "dd", "if=/dev/urandom", "bs=4096", "count=1"])
                .arg(format!("of={}", dev.path()))
                .arg(format!("seek={}", off / 4096))
                .args(["oflag=direct", "conv=notrunc", "status=none"]),
        );
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    rt.block_on(tracker.sync()).expect("the tracker caught up");
    tracker.stop().expect("the tracker stops");
    let counts = rt.block_on(handle.shutdown(Duration::from_secs(30)));
    assert_eq!(counts.waiting, 0, "{counts:?}");
    assert!(counts.segments >= 3, "{counts:?}");

    let mut stream = rt
        .block_on(store.records(&Query::default()))
        .expect("records");
    let header = stream.header().expect("a header").clone();
    assert_eq!(header.targets[0].name, dev.path());
    // The CPU profile travels with the I/O, across segments.
    assert_eq!(header.cpu_targets, ["host"]);
    let mut cpu_samples = 0;
    let mut written = std::collections::BTreeSet::new();
    while let Some(r) = rt.block_on(stream.next_record()).expect("a record") {
        if let Record::Cpu(c) = &r {
            assert_eq!(c.target, 0);
            cpu_samples += 1;
        }
        if let Record::Block(b) = r
            && b.op == Op::Write
        {
            let mut at = b.offset;
            while at < b.offset + u64::from(b.len) {
                written.insert(at);
                at += 4096;
            }
        }
    }
    for off in &offsets {
        assert!(
            written.contains(off),
            "the write at {off} is in the history"
        );
    }
    // About 3 s at 4 samples a second.
    assert!(cpu_samples >= 8, "{cpu_samples} CPU samples");
    let summaries = rt
        .block_on(store.summaries(&Query::default()))
        .expect("summaries");
    assert!(
        summaries
            .iter()
            .map(|s| s.op(Op::Write).requests)
            .sum::<u64>()
            >= 60
    );
}
