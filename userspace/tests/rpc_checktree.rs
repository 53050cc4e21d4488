//! The destination's checksum tree, queried over mutual TLS, finds exactly
//! the regions where the source differs, and stays current as extents land.

mod rpc_support;

use std::collections::BTreeSet;

use bytes::Bytes;
use proptest::prelude::*;
use rpc_support::{Destination, noise};
use tern::checktree::CheckTree;
use tern::rpc::{EncodedExtent, ReplicaClient};

const REGION: u64 = 64 << 10;

async fn push_all(client: &mut ReplicaClient, epoch: u64, data: &[u8]) {
    let mut writer = client.open_writer(epoch, 16).await.expect("open");
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        writer
            .send(
                EncodedExtent::encode((i as u64) << 20, Bytes::copy_from_slice(chunk), Some(1))
                    .expect("encode"),
            )
            .await
            .expect("send");
    }
    writer.finish().await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_finds_exactly_the_changed_regions_and_follows_new_writes() {
    let size = 8 << 20; // 128 regions of 64 KiB
    let dst = Destination::start(size).await;
    let mut client = dst.client().await;
    let mut source = noise(size as usize, 11);
    push_all(&mut client, 1, &source).await;
    let tree = CheckTree::from_bytes(&source, REGION).expect("tree");
    assert!(client.diff_regions(&tree).await.expect("diff").is_empty());

    // Change the source in a few regions (two adjacent bytes on either side of a region boundary).
    for pos in [
        5 * REGION + 7,
        90 * REGION - 1,
        90 * REGION,
        127 * REGION + 100,
    ] {
        source[pos as usize] ^= 0x5a;
    }
    let changed = CheckTree::from_bytes(&source, REGION).expect("tree");
    let found = client.diff_regions(&changed).await.expect("diff");
    assert_eq!(found, vec![5, 89, 90, 127]);

    // Send just those regions; the cached tree must notice the writes.
    let mut writer = client.open_writer(1, 8).await.expect("open");
    for region in found {
        let range = changed.shape().region(region);
        writer
            .send(
                EncodedExtent::encode(
                    range.start,
                    Bytes::copy_from_slice(&source[range.start as usize..range.end as usize]),
                    None,
                )
                .expect("encode"),
            )
            .await
            .expect("send");
    }
    writer.finish().await.expect("finish");
    assert!(
        client
            .diff_regions(&changed)
            .await
            .expect("diff")
            .is_empty()
    );
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_region_size_is_invalid_argument() {
    let dst = Destination::start(1 << 20).await;
    let mut client = dst.client().await;
    let err = client
        .tree_nodes(1000, 0, &[0])
        .await
        .expect_err("1000 is not a power of two");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    let err = client
        .tree_nodes(REGION, 99, &[0])
        .await
        .expect_err("no level 99");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    dst.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn diff_over_rpc_finds_exactly_random_changed_regions(
        regions in 1u64..64,
        tail in 0u64..4096,
        seed in any::<u64>(),
        changes in proptest::collection::vec((any::<u64>(), 1u8..=255), 0..12),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let region = 4096u64;
            let size = regions * region + tail;
            let dst = Destination::start(size).await;
            let mut client = dst.client().await;
            let base = noise(size as usize, seed);
            push_all(&mut client, 1, &base).await;
            let mut changed = base.clone();
            for (pos, flip) in &changes {
                changed[(pos % size) as usize] ^= flip;
            }
            let tree = CheckTree::from_bytes(&changed, region).expect("tree");
            let expected: BTreeSet<u64> = (0..tree.shape().leaf_count())
                .filter(|&r| {
                    let range = tree.shape().region(r);
                    base[range.start as usize..range.end as usize]
                        != changed[range.start as usize..range.end as usize]
                })
                .collect();
            let found = client.diff_regions(&tree).await.expect("diff");
            assert_eq!(found, expected.into_iter().collect::<Vec<_>>());
            dst.stop().await;
        });
    }
}
