//! Write streams: epoch fencing (also across a restart), zero-marked
//! extents, and refusal of damaged extents without touching the image.

mod rpc_support;

use bytes::Bytes;
use rpc_support::{Destination, noise};
use tern::checktree::CheckTree;
use tern::rpc::{Checksum, EncodedExtent, Encoding, ExtentWriter, ReplicaClient};
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn write_one(client: &mut ReplicaClient, epoch: u64, offset: u64, data: &[u8]) {
    let mut writer = client.open_writer(epoch, 8).await.expect("open");
    writer
        .send(EncodedExtent::encode(offset, Bytes::copy_from_slice(data), Some(1)).expect("encode"))
        .await
        .expect("send");
    writer.finish().await.expect("finish");
}

/// Sends one extent and waits for the barrier: the stream's outcome.
async fn send_and_barrier(writer: &mut ExtentWriter, extent: EncodedExtent) -> Option<Code> {
    match writer.send(extent).await {
        Err(e) => Some(e.code().unwrap_or(Code::Unknown)),
        Ok(()) => writer
            .barrier()
            .await
            .err()
            .map(|e| e.code().unwrap_or(Code::Unknown)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_is_refused_with_failed_precondition() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    write_one(&mut client, 5, 0, &noise(4096, 1)).await;
    let err = client
        .open_writer(4, 8)
        .await
        .expect_err("epoch 4 after epoch 5 must be refused");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("epoch 4"), "{err}");
    // The equal epoch (a reconnecting writer) is still admitted.
    write_one(&mut client, 5, 4096, &noise(4096, 2)).await;
    assert_eq!(client.info().await.expect("info").epoch, 5);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_epoch_fences_an_open_older_stream() {
    let dst = Destination::start(MIB).await;
    let mut old_client = dst.client().await;
    let mut new_client = dst.client().await;
    let mut old = old_client.open_writer(7, 8).await.expect("open 7");
    old.send(EncodedExtent::encode(0, Bytes::from(noise(4096, 3)), None).expect("encode"))
        .await
        .expect("send under epoch 7");
    old.barrier().await.expect("barrier under epoch 7");

    let mut new = new_client.open_writer(8, 8).await.expect("open 8");
    let late = EncodedExtent::encode(4096, Bytes::from(vec![0xaa; 4096]), None).expect("encode");
    let code = send_and_barrier(&mut old, late).await;
    assert_eq!(
        code,
        Some(Code::FailedPrecondition),
        "the fenced stream kept writing"
    );
    assert!(
        dst.contents()[4096..8192].iter().all(|&b| b == 0),
        "a fenced write landed"
    );

    new.send(EncodedExtent::encode(4096, Bytes::from(vec![0xbb; 4096]), None).expect("encode"))
        .await
        .expect("send under epoch 8");
    new.finish().await.expect("finish epoch 8");
    assert!(dst.contents()[4096..8192].iter().all(|&b| b == 0xbb));
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_highest_epoch_survives_a_restart() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    write_one(&mut client, 12, 0, &noise(4096, 4)).await;
    drop(client);
    let dir = dst.stop().await;
    let epoch_file =
        std::fs::read_to_string(dir.path().join("dst.img.tern-epoch")).expect("epoch file");
    assert_eq!(epoch_file.trim(), "12");

    let dst = Destination::start_in(dir, MIB).await;
    let mut client = dst.client().await;
    assert_eq!(client.info().await.expect("info").epoch, 12);
    let err = client
        .open_writer(11, 8)
        .await
        .expect_err("stale after restart");
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_marked_extents_zero_the_range_and_nothing_else() {
    let dst = Destination::start(4 * MIB).await;
    let mut client = dst.client().await;
    let before = noise((4 * MIB) as usize, 5);
    let mut writer = client.open_writer(1, 8).await.expect("open");
    for (i, chunk) in before.chunks(MIB as usize).enumerate() {
        writer
            .send(
                EncodedExtent::encode(i as u64 * MIB, Bytes::copy_from_slice(chunk), None)
                    .expect("encode"),
            )
            .await
            .expect("send");
    }
    // Unaligned on purpose: the zeroing must be exact to the byte.
    writer
        .send(EncodedExtent::zero(MIB + 1000, (MIB + 5) as u32))
        .await
        .expect("send zero extent");
    writer.finish().await.expect("finish");
    let mut expected = before;
    expected[(MIB + 1000) as usize..(2 * MIB + 1005) as usize].fill(0);
    assert!(
        dst.contents() == expected,
        "zero extent wrote the wrong bytes"
    );
    assert_eq!(dst.metrics.zero_extents.get(), 1);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checksum_is_refused_and_nothing_is_written() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 8).await.expect("open");
    let mut extent =
        EncodedExtent::encode(8192, Bytes::from(noise(65536, 6)), Some(1)).expect("encode");
    let mut damaged = extent.blake3.to_vec();
    damaged[0] ^= 1;
    extent.blake3 = Bytes::from(damaged);
    let code = send_and_barrier(&mut writer, extent).await;
    assert_eq!(code, Some(Code::DataLoss));
    assert!(
        dst.contents().iter().all(|&b| b == 0),
        "a refused extent reached the image"
    );
    assert_eq!(dst.metrics.rejected_extents.get(), 1);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_zstd_out_of_bounds_and_short_payloads_are_refused() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    let data = noise(4096, 7);
    let hash = Bytes::copy_from_slice(blake3::hash(&data).as_bytes());
    let cases = [
        (
            "garbage zstd",
            EncodedExtent {
                offset: 0,
                length: 4096,
                encoding: Encoding::Zstd,
                payload: Bytes::from_static(b"definitely not a zstd frame"),
                blake3: hash.clone(),
                leaf_size: 0,
            },
            Code::InvalidArgument,
        ),
        (
            "past the end",
            EncodedExtent::encode(MIB - 2048, Bytes::from(data.clone()), None).expect("encode"),
            Code::OutOfRange,
        ),
        (
            "short raw payload",
            EncodedExtent {
                offset: 0,
                length: 4096,
                encoding: Encoding::Raw,
                payload: Bytes::from(data[..4000].to_vec()),
                blake3: hash.clone(),
                leaf_size: 0,
            },
            Code::InvalidArgument,
        ),
        (
            "no checksum",
            EncodedExtent {
                offset: 0,
                length: 4096,
                encoding: Encoding::Raw,
                payload: Bytes::from(data.clone()),
                blake3: Bytes::new(),
                leaf_size: 0,
            },
            Code::InvalidArgument,
        ),
        (
            "leaf size not a power of two",
            EncodedExtent {
                offset: 0,
                length: 4096,
                encoding: Encoding::Raw,
                payload: Bytes::from(data.clone()),
                blake3: hash.clone(),
                leaf_size: 6000,
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, extent, want) in cases {
        let mut writer = client.open_writer(1, 8).await.expect("open");
        let code = send_and_barrier(&mut writer, extent).await;
        assert_eq!(code, Some(want), "{what}");
    }
    assert!(
        dst.contents().iter().all(|&b| b == 0),
        "a refused extent reached the image"
    );
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_extents_in_flight_apply_in_stream_order() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 64).await.expect("open");
    // Many rewrites of the same range, pipelined: the last one must win.
    for round in 0u8..40 {
        let data = Bytes::from(vec![round; 65536]);
        writer
            .send(EncodedExtent::encode(4096, data, None).expect("encode"))
            .await
            .expect("send");
    }
    writer.finish().await.expect("finish");
    let image = dst.contents();
    assert!(image[4096..4096 + 65536].iter().all(|&b| b == 39));
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_applied_in_order_even_where_their_extents_overlap() {
    let dst = Destination::start(4 * MIB).await;
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 2).await.expect("open");
    assert!(
        writer.max_batch_extents() > 1,
        "this destination takes batches"
    );
    let mut expected = vec![0u8; (4 * MIB) as usize];
    let mut extents = Vec::new();
    // More extents than one message holds, scattered, then rewritten in
    // part by later ones of the same call (and by a zero extent): the later
    // write must win, as if each had been applied alone.
    for i in 0..600u64 {
        let offset = (i * 7919 % 1000) * 4096;
        let data = noise(4096, 100 + i);
        expected[offset as usize..offset as usize + 4096].copy_from_slice(&data);
        extents.push(EncodedExtent::encode(offset, Bytes::from(data), Some(1)).expect("encode"));
        if i == 300 {
            extents.push(EncodedExtent::zero(offset + 1000, 5000));
            expected[offset as usize + 1000..offset as usize + 6000].fill(0);
        }
    }
    let text = Bytes::from("tern ".repeat(820).into_bytes());
    expected[4096..4096 + text.len()].copy_from_slice(&text);
    extents.push(EncodedExtent::encode(4096, text, Some(1)).expect("encode"));
    let count = extents.len() as u64;
    writer.send_batch(extents).await.expect("send the batches");
    writer.finish().await.expect("finish");
    assert!(
        dst.contents() == expected,
        "the batches wrote the wrong bytes"
    );
    assert_eq!(dst.metrics.extents_written.get(), count);
    assert_eq!(dst.metrics.zero_extents.get(), 1);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_extent_refuses_its_whole_batch() {
    let dst = Destination::start(MIB).await;
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 8).await.expect("open");
    let mut extents: Vec<EncodedExtent> = (0..10u64)
        .map(|i| {
            EncodedExtent::encode(i * 8192, Bytes::from(noise(4096, 200 + i)), None)
                .expect("encode")
        })
        .collect();
    let mut damaged = extents[6].blake3.to_vec();
    damaged[5] ^= 0x40;
    extents[6].blake3 = Bytes::from(damaged);
    let outcome = match writer.send_batch(extents).await {
        Err(e) => e.code(),
        Ok(()) => writer.barrier().await.err().and_then(|e| e.code()),
    };
    assert_eq!(outcome, Some(Code::DataLoss));
    assert!(
        dst.contents().iter().all(|&b| b == 0),
        "part of a refused batch reached the image"
    );
    assert_eq!(dst.metrics.rejected_extents.get(), 10);
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_checksums_are_checked_and_their_pieces_become_the_trees_leaves() {
    const REGION: u64 = 16 << 10;
    let size = 4 * MIB;
    let dst = Destination::start(size).await;
    let mut client = dst.client().await;
    // The source asks for the tree before it sends: the destination holds one of this shape.
    let before = client.tree_nodes(REGION, 0, &[0]).await.expect("tree");
    let mut writer = client.open_writer(1, 8).await.expect("open");
    assert!(
        writer.leaf_checksums(),
        "this destination takes leaf checksums"
    );
    let leaves = |offset: u64, data: Vec<u8>| {
        EncodedExtent::encode_with(
            offset,
            Bytes::from(data),
            Some(1),
            Checksum::Leaves {
                size: u32::try_from(REGION).expect("small"),
                known: &|_| None,
            },
        )
        .expect("encode")
    };
    // Aligned; unaligned at both ends; inside one region; up to the image's end.
    let cases = [
        (0, 256 << 10),
        (5 * REGION + 4096, 100_000),
        (MIB + 8192, 4096),
        (size - 3 * REGION - 512, 3 * REGION as usize + 512),
    ];
    for (seed, (offset, len)) in (20..).zip(cases) {
        writer
            .send(leaves(offset, noise(len, seed)))
            .await
            .expect("send");
    }
    writer.barrier().await.expect("barrier");
    // The blake3 of the data whole does not pass for a leaf checksum.
    let data = noise(65536, 30);
    let mut whole =
        EncodedExtent::encode(2 * MIB, Bytes::from(data.clone()), None).expect("encode");
    whole.leaf_size = u32::try_from(REGION).expect("small");
    assert_eq!(
        send_and_barrier(&mut writer, whole).await,
        Some(Code::DataLoss)
    );
    let mut client = dst.client().await;
    let mut writer = client.open_writer(1, 8).await.expect("open");
    let mut damaged = leaves(2 * MIB, data);
    let mut sum = damaged.blake3.to_vec();
    sum[5] ^= 0x40;
    damaged.blake3 = Bytes::from(sum);
    assert_eq!(
        send_and_barrier(&mut writer, damaged).await,
        Some(Code::DataLoss)
    );
    // The tree the destination answers with (its leaves taken from the checked pieces,
    // unread) is the tree of what its image holds.
    let image = dst.contents();
    assert!(image[2 * MIB as usize..][..65536].iter().all(|&b| b == 0));
    let want = CheckTree::from_bytes(&image, REGION).expect("tree");
    let after = client.tree_nodes(REGION, 0, &[]).await.expect("tree");
    assert_ne!(before.hashes[0], after.hashes[0]);
    assert_eq!(after.hashes, want.level(0).expect("leaves"));
    dst.stop().await;
}
