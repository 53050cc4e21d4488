//! Ingest throughput of the replica service over loopback with mutual TLS.
//! Ignored by default (it moves a gigabyte); run in release:
//! `cargo test --release -p tern --test rpc_ingest -- --ignored --nocapture`.
//! Size in MiB from `TERN_BENCH_MIB` (default 1024).

mod rpc_support;

use rpc_support::{Destination, noise};
use tern::rpc::PushOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput measurement: run explicitly in release"]
async fn ingest_throughput_over_mutual_tls() {
    let mib: u64 = std::env::var("TERN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let src_dir = tempfile::tempdir().expect("tempdir");
    for (name, data_kind) in [("incompressible", 0u8), ("text-like", 1)] {
        let src = src_dir.path().join(format!("{name}.img"));
        {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
            let chunk = match data_kind {
                0 => noise(64 << 20, 42),
                _ => "tern replicates disks; "
                    .repeat((64 << 20) / 23)
                    .into_bytes(),
            };
            let mut left = size as usize;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n]).expect("write");
                left -= n;
            }
        }
        for (label, level) in [("raw", None), ("zstd-1", Some(1))] {
            let dst = Destination::start(size).await;
            let mut client = dst.client().await;
            let opts = PushOptions {
                zstd_level: level,
                extent_len: std::env::var("TERN_BENCH_EXTENT_KIB")
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .map_or(1 << 20, |k| k << 10),
                workers: 4,
                window: 32,
                ..PushOptions::default()
            };
            let report = tern::rpc::push_file(&mut client, &src, &opts)
                .await
                .expect("push");
            assert_eq!(report.bytes, size);
            let gbps = report.bytes as f64 / report.seconds / 1e9;
            eprintln!(
                "ingest {name:>14} {label:>6}: {:.2} GB/s ({} MiB in {:.2} s, wire {} MiB)",
                gbps,
                mib,
                report.seconds,
                report.wire_bytes >> 20
            );
            // Spot-check that the data really landed.
            let landed = std::fs::read(&dst.image_path).expect("image");
            let source = std::fs::read(&src).expect("source");
            assert!(landed == source, "destination differs after push");
            dst.stop().await;
        }
    }
}
