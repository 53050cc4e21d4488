//! The pipelined delta pass against a real destination over mutual TLS:
//! it sends exactly the regions that differ, chunk by chunk (a chunk that
//! is the same on both sides costs no leaf), zeroes included, and leaves
//! both trees equal.

mod rpc_support;

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use rpc_support::{Destination, HOST, noise};
use tern::dirty::DirtyMap;
use tern::image::{Image, ImageOptions};
use tern::replicate::{LocalTree, Peer, ReplicateOptions, Replicator};

const REGION: u64 = 4096;
/// Four chunks of the tree at 4 KiB regions (32 MiB each), the last short
/// and ending in a short region.
const SIZE: u64 = (100 << 20) + 6144;

fn write_at(path: &std::path::Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delta_pass_sends_exactly_the_differing_regions_chunk_by_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("src.img");
    let dst_dir = tempfile::tempdir().expect("tempdir");
    let dst_path = dst_dir.path().join("dst.img");
    // Both sides: sparse, with the same data at the start of every chunk
    // and at the very end.
    for path in [&src_path, &dst_path] {
        std::fs::File::create(path)
            .expect("create")
            .set_len(SIZE)
            .expect("size");
        for (i, offset) in [0u64, 32 << 20, 64 << 20, 96 << 20].into_iter().enumerate() {
            write_at(path, offset, &noise(1 << 20, i as u64 + 1));
        }
        write_at(path, SIZE - 6144, &noise(6144, 9));
    }
    // The destination's old copy differs in chunk 0 (two regions), chunk 2
    // (one region holding data where the source has zeroes) and the short
    // last region; chunk 1 is the same on both sides.
    write_at(&dst_path, 5 * REGION + 100, b"old");
    write_at(&dst_path, 200 * REGION, b"old");
    write_at(&dst_path, (70 << 20) + 3 * REGION, &noise(4096, 20));
    write_at(&dst_path, SIZE - 1, b"x");
    let want_differing = 4;

    let dst = Destination::start_in(dst_dir, SIZE).await;
    let source = Image::open(
        &src_path,
        &ImageOptions {
            size: None,
            read_only: true,
            direct: false,
            bulk_direct: false,
        },
    )
    .expect("open source");
    let send = Arc::new(DirtyMap::new(SIZE, REGION).expect("map"));
    let local = LocalTree::new(SIZE, REGION).expect("tree");
    let peer = Peer {
        addr: dst.addr.to_string(),
        tls: Some(dst.tls.clone()),
        domain: Some(HOST.into()),
        channel: None,
    };
    let opts = ReplicateOptions {
        region_size: REGION,
        ..ReplicateOptions::default()
    };
    let mut repl = Replicator::connect(source, peer, send, local, opts)
        .await
        .expect("connect");
    repl.take_epoch().await.expect("epoch");
    let (differing, pass) = repl.delta_pass().await.expect("delta pass");
    repl.finish().await.expect("finish");
    assert_eq!(differing, want_differing);
    // The short last region is 2048 bytes.
    assert_eq!(pass.bytes, 3 * REGION + 2048);
    let (local_root, remote_root) = repl.local_and_remote_roots().await.expect("roots");
    assert_eq!(local_root, remote_root);
    let again = repl.delta_pass().await.expect("a second pass");
    assert_eq!((again.0, again.1.bytes), (0, 0));
    let kept = dst.stop().await;
    let copy = std::fs::read(kept.path().join("dst.img")).expect("read the copy");
    assert!(std::fs::read(&src_path).expect("read the source") == copy);
}
