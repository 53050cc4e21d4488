//! The analyzer's throughput and memory, for `cargo xtask bench analyze`:
//! a large generated workload on a 1 TiB device (random 4 KiB writes,
//! sequential 64 KiB reads, page faults), fed to one `Analyzer` on one core,
//! first from records in memory (the analyzer alone), then decoded from a
//! trace file image (reader + analyzer, the offline path). Prints one JSON line.

use std::time::Instant;

use tern::analyze::report::Report;
use tern::analyze::{Analyzer, AnalyzerConfig};
use tern::trace::format::{Target, TargetKind, TraceHeader, TraceWriter};
use tern::trace::record::{BlockRecord, EndRecord, FaultRecord};
use tern::trace::{Op, Record, TraceReader};

const TIB: u64 = 1 << 40;

/// The `i`-th event of the generated workload (deterministic).
fn event(i: u64) -> Record {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let ts = i * 1000;
    match x >> 60 {
        // 1/16 page faults over 1 GiB of address space.
        0 => Record::Fault(FaultRecord {
            ts_ns: ts,
            address: 0x7f00_0000_0000 + ((x >> 20) % (1 << 18)) * 4096,
            ip: 0x5555_0000_0000,
            pid: 100 + (x % 4) as u32,
            tid: 100,
            flags: (x >> 8) as u32 & 2,
        }),
        // 3/16 sequential 64 KiB reads over the whole device.
        1..=3 => Record::Block(BlockRecord {
            ts_ns: ts,
            offset: (i * 65536) % TIB,
            latency_ns: 100_000,
            len: 65536,
            pid: 7,
            flags: 0,
            target: 0,
            op: Op::Read,
        }),
        // 12/16 random 4 KiB writes anywhere on the 1 TiB device.
        _ => Record::Block(BlockRecord {
            ts_ns: ts,
            offset: ((x >> 12) % (TIB / 4096)) * 4096,
            latency_ns: 100_000,
            len: 4096,
            pid: 8,
            flags: 0,
            target: 0,
            op: Op::Write,
        }),
    }
}

fn header() -> TraceHeader {
    TraceHeader {
        kernel_release: "bench".into(),
        hostname: "bench".into(),
        start_wall_unix_ns: 0,
        start_monotonic_ns: 0,
        sector_size: 512,
        targets: vec![Target {
            name: "bench-1TiB".into(),
            kind: TargetKind::Device,
            dev: None,
            size_bytes: TIB,
            logical_block_size: 512,
        }],
        fault_pids: vec![],
        source: "bench".into(),
        cpu_targets: vec![],
        host_cpus: 0,
    }
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// CPU time of this thread: the figure per core, whatever else shares the core.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000_000);
    let cfg = AnalyzerConfig {
        device_bytes: TIB,
        ..AnalyzerConfig::default()
    };
    let rss_before = peak_rss_bytes();
    let mut a = Analyzer::new(cfg).expect("analyzer");
    let memory_empty = a.memory_bytes();

    // The analyzer alone: records generated in chunks, only `observe` timed.
    let chunk = 1 << 20;
    let mut buf = Vec::with_capacity(chunk);
    let mut busy = std::time::Duration::ZERO;
    let mut cpu = std::time::Duration::ZERO;
    let mut i = 0;
    while i < n {
        buf.clear();
        buf.extend((i..(i + chunk as u64).min(n)).map(event));
        let (t0, c0) = (Instant::now(), thread_cpu());
        a.observe_all(&buf);
        busy += t0.elapsed();
        cpu += thread_cpu().saturating_sub(c0);
        i += buf.len() as u64;
    }
    a.finish();
    let t0 = Instant::now();
    let report = Report::of(&a);
    let report_s = t0.elapsed().as_secs_f64();
    let memory_full = a.memory_bytes();
    drop(a);
    drop(buf);

    // The offline path: a trace file image decoded and analyzed.
    let file_events = n.min(5_000_000);
    let mut writer = TraceWriter::new(Vec::new(), &header()).expect("writer");
    for j in 0..file_events {
        writer.push(&event(j)).expect("push");
    }
    let image = writer.finish(EndRecord::default()).expect("finish");
    let (t0, c0) = (Instant::now(), thread_cpu());
    let reader = TraceReader::new(&image[..]).expect("reader");
    let offline = tern::analyze::analyze_reader(reader, 0, None).expect("analysis");
    let offline_s = t0.elapsed().as_secs_f64();
    let offline_cpu_s = thread_cpu().saturating_sub(c0).as_secs_f64();
    let mut decode_only = TraceReader::new(&image[..]).expect("reader");
    let t0 = Instant::now();
    let mut decoded = 0u64;
    while decode_only.next_record().expect("decode").is_some() {
        decoded += 1;
    }
    let decode_s = t0.elapsed().as_secs_f64();
    drop(offline);

    let out = serde_json::json!({
        "events": n,
        "analyzer_events_per_s": n as f64 / busy.as_secs_f64(),
        "analyzer_ns_per_event": busy.as_secs_f64() * 1e9 / n as f64,
        "analyzer_cpu_events_per_s": n as f64 / cpu.as_secs_f64(),
        "offline_cpu_events_per_s": file_events as f64 / offline_cpu_s,
        "report_s": report_s,
        "file_events": file_events,
        "file_bytes": image.len(),
        "offline_events_per_s": file_events as f64 / offline_s,
        "decode_only_events_per_s": decoded as f64 / decode_s,
        "memory_1tib_empty_bytes": memory_empty,
        "memory_1tib_after_bytes": memory_full,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_before,
        "written_unique_bytes_4k": report.levels[0].written_unique_bytes,
        "dirty_rate_p50_4k": report.levels[0].dirty_rate.p50,
        "series_window_s": report.series_window_s,
    });
    // The one line xtask reads.
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
}
