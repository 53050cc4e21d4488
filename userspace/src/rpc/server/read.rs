//! The read side of the replica service: ranges read from the image and
//! sent back as extents (rollback, health checks, on-demand fetches).

use std::sync::Arc;

use futures::{StreamExt, stream};
use tonic::Status;

use crate::rpc::extent::EncodedExtent;
use crate::rpc::pb::{self};
use crate::rpc::{MAX_EXTENT_LEN, RpcError};

use super::{Inner, RangeFault, ReadTx, range_fault};

pub(super) fn check_read_range(range: &pb::ReadRange, size: u64) -> Result<(), RpcError> {
    let pb::ReadRange { offset, length } = *range;
    match range_fault(offset, length, size) {
        None => Ok(()),
        Some(RangeFault::Empty) => Err(RpcError::EmptyRange { offset }),
        Some(RangeFault::TooLong) => Err(RpcError::RangeTooLong {
            offset,
            len: length,
            max: MAX_EXTENT_LEN,
        }),
        Some(RangeFault::OutOfBounds) => Err(RpcError::RangeOutOfBounds {
            offset,
            len: length,
            size,
        }),
    }
}

/// Answers one `Read` call: reads and encodes up to `max_reads_in_flight`
/// ranges concurrently and sends them in request order. Stops when the
/// client goes away, at shutdown (UNAVAILABLE) or at the first failure.
pub(super) async fn run_read(
    inner: Arc<Inner>,
    ranges: Vec<pb::ReadRange>,
    zstd_level: Option<i32>,
    tx: ReadTx,
) {
    let asked = ranges.len();
    let mut sent = 0usize;
    let mut bytes = 0u64;
    let mut extents = stream::iter(ranges.into_iter().zip(0u64..))
        .map(|(range, seq)| read_extent(Arc::clone(&inner), range, seq, zstd_level))
        .buffered(inner.opts.max_reads_in_flight.max(1));
    let outcome: Result<(), RpcError> = loop {
        let next = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break Err(RpcError::ShuttingDown),
            // The client went away: nobody to answer.
            () = tx.closed() => break Ok(()),
            next = extents.next() => next,
        };
        let extent = match next {
            None => break Ok(()),
            Some(Ok(extent)) => extent,
            Some(Err(err)) => break Err(err),
        };
        let length = u64::from(extent.length);
        let reply = pb::ReadResponse {
            extent: Some(extent),
        };
        tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break Err(RpcError::ShuttingDown),
            delivered = tx.send(Ok(reply)) => if delivered.is_err() { break Ok(()) },
        }
        sent += 1;
        bytes += length;
        inner.metrics.bytes_read.add(length);
    };
    tracing::info!(
        ranges = asked,
        sent,
        bytes,
        ok = outcome.is_ok(),
        "read stream ended"
    );
    match outcome {
        Ok(()) => {}
        // Best effort: a client that stopped reading must not hold up shutdown.
        Err(err @ RpcError::ShuttingDown) => {
            let _ = tx.try_send(Err(Status::from(err)));
        }
        Err(err) => {
            // The receiver may be gone; nothing more to tell it then.
            let _ = tx.send(Err(Status::from(err))).await;
        }
    }
}

/// Reads one (validated) range and encodes it like a write-stream extent.
async fn read_extent(
    inner: Arc<Inner>,
    range: pb::ReadRange,
    seq: u64,
    zstd_level: Option<i32>,
) -> Result<pb::Extent, RpcError> {
    let pb::ReadRange { offset, length } = range;
    // In a post-copy, a unit still on the source is waited for, never read old.
    inner
        .presence
        .before_read(offset, u64::from(length))
        .await
        .map_err(RpcError::PostCopy)?;
    let data = inner
        .image
        .read_at(offset, length)
        .await
        .map_err(|source| RpcError::Image {
            action: "read",
            offset,
            source,
        })?;
    // Zero detection, hashing and compression are CPU work: off the async workers.
    let extent =
        tokio::task::spawn_blocking(move || EncodedExtent::encode(offset, data, zstd_level))
            .await??;
    Ok(extent.into_message(seq))
}
