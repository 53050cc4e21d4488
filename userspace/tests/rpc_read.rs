//! `Read` over mutual TLS returns what write streams put into the image,
//! byte-exact and in the order asked, and refuses bad ranges before sending
//! anything.

mod rpc_support;

use bytes::Bytes;
use futures::TryStreamExt;
use rpc_support::{Destination, noise};
use tern::rpc::{EncodedExtent, MAX_EXTENT_LEN, ReplicaClient};
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn read_all(
    client: &mut ReplicaClient,
    ranges: &[(u64, u32)],
    zstd_level: Option<i32>,
) -> Vec<(u64, Bytes)> {
    client
        .read_ranges(ranges, zstd_level)
        .await
        .expect("read call")
        .try_collect()
        .await
        .expect("read stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_returns_written_data_zero_and_compressible_ranges_byte_exact() {
    let size = 16 * MIB;
    let dst = Destination::start(size).await;
    let mut client = dst.client().await;

    // Noise over 0..6 MiB, text over 2..4 MiB, a zero extent over 4..5 MiB.
    let mut expected = vec![0u8; size as usize];
    let mut writer = client.open_writer(5, 8).await.expect("open");
    let noisy = noise(6 * MIB as usize, 21);
    for (i, chunk) in noisy.chunks(MIB as usize).enumerate() {
        let offset = i as u64 * MIB;
        writer
            .send(
                EncodedExtent::encode(offset, Bytes::copy_from_slice(chunk), None).expect("encode"),
            )
            .await
            .expect("send");
    }
    expected[..noisy.len()].copy_from_slice(&noisy);
    let text = "rollback copies these bytes back ".repeat((2 * MIB as usize) / 33 + 1);
    let text = &text.as_bytes()[..2 * MIB as usize];
    writer
        .send(
            EncodedExtent::encode(2 * MIB, Bytes::copy_from_slice(text), Some(1)).expect("encode"),
        )
        .await
        .expect("send");
    expected[2 * MIB as usize..4 * MIB as usize].copy_from_slice(text);
    writer
        .send(EncodedExtent::zero(4 * MIB, MIB as u32))
        .await
        .expect("send");
    expected[4 * MIB as usize..5 * MIB as usize].fill(0);
    writer.finish().await.expect("finish");

    let ranges: Vec<(u64, u32)> = vec![
        (0, MIB as u32),           // noise: raw
        (2 * MIB, 2 * MIB as u32), // text: zstd
        (4 * MIB, MIB as u32),     // written zeroes: zero
        (10 * MIB, MIB as u32),    // never written: zero
        (4 * MIB - 777, 5000),     // text into zeroes
        (size - 4096, 4096),       // the last page
        (8 * MIB, MAX_EXTENT_LEN), // the longest range, to the end
        (123, 1),                  // one byte
        (0, MIB as u32),           // the same range again
    ];
    for level in [None, Some(1), Some(3)] {
        let got = read_all(&mut client, &ranges, level).await;
        assert_eq!(got.len(), ranges.len(), "zstd level {level:?}");
        for ((offset, data), &(want_offset, len)) in got.iter().zip(&ranges) {
            assert_eq!(*offset, want_offset);
            let want = &expected[want_offset as usize..(want_offset + u64::from(len)) as usize];
            assert!(
                data.as_ref() == want,
                "range {want_offset}+{len} differs (zstd level {level:?})"
            );
        }
    }
    assert_eq!(
        dst.metrics.bytes_read.get(),
        3 * ranges.iter().map(|&(_, len)| u64::from(len)).sum::<u64>()
    );
    dst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_ranges_come_back_in_the_order_asked() {
    let size = 4 * MIB;
    let dst = Destination::start(size).await;
    let mut client = dst.client().await;
    let data = noise(size as usize, 8);
    let mut writer = client.open_writer(1, 8).await.expect("open");
    writer
        .send(EncodedExtent::encode(0, Bytes::from(data.clone()), None).expect("encode"))
        .await
        .expect("send");
    writer.finish().await.expect("finish");

    // Backwards and of varying lengths, so a reordering would show.
    let ranges: Vec<(u64, u32)> = (0..200u64)
        .rev()
        .map(|i| (i * 20_000, 1000 + (i as u32 % 7) * 1111))
        .collect();
    let got = read_all(&mut client, &ranges, Some(1)).await;
    assert_eq!(got.len(), ranges.len());
    for ((offset, bytes), &(want, len)) in got.iter().zip(&ranges) {
        assert_eq!(*offset, want);
        assert!(bytes.as_ref() == &data[want as usize..(want + u64::from(len)) as usize]);
    }
    assert!(read_all(&mut client, &[], None).await.is_empty());
    dst.stop().await;
}

type Case = (&'static [(u64, u32)], Option<i32>, Code);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_are_refused_before_any_data_with_the_right_code() {
    const SIZE: u64 = MIB;
    let dst = Destination::start(SIZE).await;
    let mut client = dst.client().await;
    // (ranges, zstd level, expected code)
    let cases: [Case; 7] = [
        (&[(SIZE - 4096, 4097)], None, Code::OutOfRange),
        (&[(SIZE, 1)], None, Code::OutOfRange),
        (&[(u64::MAX, 2)], None, Code::OutOfRange),
        // A good range first does not let the call start.
        (&[(0, 4096), (4096, 0)], None, Code::InvalidArgument),
        (&[(0, MAX_EXTENT_LEN + 1)], None, Code::InvalidArgument),
        (&[(0, 4096)], Some(1000), Code::InvalidArgument),
        (&[(0, 4096), (SIZE - 1, 2)], Some(1), Code::OutOfRange),
    ];
    for (ranges, level, code) in cases {
        let Err(err) = client.read_ranges(ranges, level).await else {
            panic!("{ranges:?} at level {level:?} was accepted");
        };
        assert_eq!(err.code(), Some(code), "{ranges:?}: {err}");
    }
    // The service is still fine afterwards.
    assert_eq!(read_all(&mut client, &[(0, 10)], None).await.len(), 1);
    dst.stop().await;
}
