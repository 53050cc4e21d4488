//! Rollback after cutover: writes a client makes through the destination's
//! writable NBD export (`WRITE`, `WRITE_ZEROES`, `TRIM`, by QEMU) show up in the
//! destination's checksum tree, so the source finds exactly those regions,
//! and `Read` returns the new bytes.

mod rpc_support;

use std::net::SocketAddr;

use bytes::Bytes;
use futures::TryStreamExt;
use rpc_support::noise;
use tern::agent::{Destination, DestinationConfig};
use tern::checktree::CheckTree;
use tern::nbd::ListenAddr;
use tern::rpc::{EncodedExtent, ReplicaClient, TlsMaterial};
use tokio_util::sync::CancellationToken;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const REGION: u64 = 64 * KIB;
const SIZE: u64 = 4 * MIB;

/// Runs one qemu-io command against the export; true if it succeeded.
async fn qemu_io(nbd: SocketAddr, cmd: &str) -> bool {
    let url = format!("nbd://{nbd}/tern");
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", url.as_str(), "-c", cmd])
        .output()
        .await
        .expect("run qemu-io (qemu-utils)");
    // qemu-io exits 0 even when a command fails; failures are printed.
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_writes_after_cutover_are_found_by_the_checksum_tree_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tern::certs::init(&dir.path().join("certs"), &[]).expect("certs");
    let tls_dir = certs.host_dirs[0].clone();
    let mut cfg = DestinationConfig::new(
        dir.path().join("dst.img"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    cfg.size = Some(SIZE);
    cfg.nbd = Some(ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
    cfg.tls_dir = Some(tls_dir.clone());
    let dst = Destination::bind(cfg).await.expect("bind");
    let grpc = dst.grpc_addr();
    let Some(ListenAddr::Tcp(nbd)) = dst.nbd_addr().cloned() else {
        panic!("NBD should listen on TCP");
    };
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));
    let tls = TlsMaterial::load(&tls_dir).expect("tls");
    let mut client = ReplicaClient::connect(&grpc.to_string(), Some(&tls), None)
        .await
        .expect("connect");

    // Replicate the source, then query the tree once so the destination
    // holds it cached: later changes must reach it by marking, not by a rebuild.
    let source = noise(SIZE as usize, 42);
    let mut writer = client.open_writer(1, 8).await.expect("open");
    for (i, chunk) in source.chunks(MIB as usize).enumerate() {
        let extent = EncodedExtent::encode(i as u64 * MIB, Bytes::copy_from_slice(chunk), None)
            .expect("encode");
        writer.send(extent).await.expect("send");
    }
    writer.finish().await.expect("finish");
    let source_tree = CheckTree::from_bytes(&source, REGION).expect("tree");
    assert!(
        client
            .diff_regions(&source_tree)
            .await
            .expect("diff")
            .is_empty()
    );

    // Cutover, then a client writes through NBD.
    assert!(client.set_export_writable(1, true).await.expect("cutover"));
    let mut expected = source.clone();
    // WRITE across a region boundary (regions 14 and 15).
    let at = 15 * REGION - 512;
    assert!(qemu_io(nbd, &format!("write -P 0xab {at} 1024")).await);
    expected[at as usize..(at + 1024) as usize].fill(0xab);
    // WRITE_ZEROES, allocated (regions 32, 33) and allowed to unmap (48).
    assert!(qemu_io(nbd, &format!("write -z {} {}", 32 * REGION, 2 * REGION)).await);
    expected[(32 * REGION) as usize..(34 * REGION) as usize].fill(0);
    assert!(qemu_io(nbd, &format!("write -z -u {} {REGION}", 48 * REGION)).await);
    expected[(48 * REGION) as usize..(49 * REGION) as usize].fill(0);
    // TRIM (region 56): ext4 and tmpfs punch the hole, so it reads as zeroes.
    assert!(qemu_io(nbd, &format!("discard {} {REGION}", 56 * REGION)).await);
    expected[(56 * REGION) as usize..(57 * REGION) as usize].fill(0);

    // What rollback does: the source's tree against the destination's.
    let changed = client.diff_regions(&source_tree).await.expect("diff");
    assert_eq!(changed, vec![14, 15, 32, 33, 48, 56]);
    let expected_tree = CheckTree::from_bytes(&expected, REGION).expect("tree");
    assert!(
        client
            .diff_regions(&expected_tree)
            .await
            .expect("diff")
            .is_empty(),
        "the destination's tree does not match the bytes written through NBD"
    );

    // And the new bytes come back over Read.
    let ranges: Vec<(u64, u32)> = changed
        .iter()
        .map(|&r| (r * REGION, REGION as u32))
        .collect();
    let read: Vec<(u64, Bytes)> = client
        .read_ranges(&ranges, Some(1))
        .await
        .expect("read")
        .try_collect()
        .await
        .expect("read stream");
    assert_eq!(read.len(), ranges.len());
    for (offset, data) in read {
        let want = &expected[offset as usize..(offset + REGION) as usize];
        assert!(data.as_ref() == want, "region at {offset} differs");
    }

    cancel.cancel();
    agent
        .await
        .expect("agent task")
        .expect("agent stopped cleanly");
}
