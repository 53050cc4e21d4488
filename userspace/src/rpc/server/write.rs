//! The write side of the replica service: one write stream per epoch lease,
//! extents validated whole and then written, in a pipeline that keeps
//! overlapping extents in order; barriers flush and acknowledge.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tonic::{Status, Streaming};

use crate::rpc::epoch::Lease;
use crate::rpc::extent::decode_and_verify;
use crate::rpc::pb::{self, write_request, write_response};
use crate::rpc::{MAX_EXTENT_LEN, RpcError};

use super::{AckFuture, Inner, RangeFault, WriteTx, range_fault};

/// Counters of one stream, logged once at its end (never per extent).
#[derive(Debug, Default)]
struct StreamCounts {
    extents: u64,
    barriers: u64,
}

pub(super) async fn run_write_stream(
    inner: Arc<Inner>,
    mut inbound: Streaming<pb::WriteRequest>,
    lease: Lease,
    tx: WriteTx,
) {
    let mut pipeline = Pipeline::default();
    let mut counts = StreamCounts::default();
    let max_in_flight = inner.opts.max_in_flight.max(1);
    let outcome: Result<(), RpcError> = loop {
        tokio::select! {
            biased;
            () = lease.fenced.cancelled() => {
                break Err(RpcError::Fenced { epoch: lease.epoch, by: inner.fence.highest() });
            }
            () = inner.shutdown.cancelled() => break Err(RpcError::ShuttingDown),
            Some(done) = pipeline.pending.next(), if !pipeline.pending.is_empty() => {
                pipeline.ranges.pop_front();
                match done {
                    Ok(seq) => {
                        if !send_ack(&tx, extent_ack(seq)).await {
                            break Ok(());
                        }
                    }
                    Err(err) => break Err(err),
                }
            }
            msg = inbound.message(), if pipeline.pending.len() < max_in_flight => {
                let msg = match msg {
                    Ok(Some(msg)) => msg,
                    // The sender finished: drain and end normally.
                    Ok(None) => break Ok(()),
                    Err(status) => {
                        tracing::debug!(%status, "write stream broke off");
                        break Ok(());
                    }
                };
                match msg.msg {
                    Some(write_request::Msg::Extent(extent)) => {
                        counts.extents += 1;
                        let range = extent.offset..extent.offset.saturating_add(u64::from(extent.length));
                        if pipeline.overlaps(&range)
                            && let Err(err) = pipeline.drain(&tx, true).await
                        {
                            break Err(err);
                        }
                        pipeline.ranges.push_back(range);
                        pipeline.pending.push_back(Box::pin(apply_extent(Arc::clone(&inner), extent)));
                    }
                    Some(write_request::Msg::Barrier(barrier)) => {
                        counts.barriers += 1;
                        if let Err(err) = pipeline.drain(&tx, true).await {
                            break Err(err);
                        }
                        if let Err(err) = flush(&inner).await {
                            break Err(err);
                        }
                        let ack = pb::WriteResponse {
                            msg: Some(write_response::Msg::Barrier(pb::BarrierAck { seq: barrier.seq })),
                        };
                        if !send_ack(&tx, ack).await {
                            break Ok(());
                        }
                    }
                    Some(write_request::Msg::Open(_)) => break Err(RpcError::SecondOpen),
                    None => break Err(RpcError::EmptyMessage),
                }
            }
        }
    };
    // Whatever ended the stream, let the writes already issued finish (and
    // acknowledge those that succeeded) before the lease is released: a newer
    // epoch must not race with them.
    // Extents after a bad one are not acknowledged; on fencing or shutdown
    // the ones in flight are good data and are.
    let ack_rest = matches!(
        outcome,
        Ok(()) | Err(RpcError::Fenced { .. } | RpcError::ShuttingDown)
    );
    let drained = pipeline.drain(&tx, ack_rest).await;
    let outcome = outcome.and(drained);
    tracing::info!(
        epoch = lease.epoch,
        extents = counts.extents,
        barriers = counts.barriers,
        ok = outcome.is_ok(),
        "write stream ended"
    );
    if let Err(err) = outcome {
        inner.metrics.rejected_streams.inc();
        // The receiver may be gone; nothing more to tell it then.
        let _ = tx.send(Err(Status::from(err))).await;
    }
    drop(lease);
}

#[derive(Default)]
struct Pipeline {
    pending: FuturesOrdered<AckFuture>,
    ranges: VecDeque<Range<u64>>,
}

impl Pipeline {
    fn overlaps(&self, range: &Range<u64>) -> bool {
        self.ranges
            .iter()
            .any(|r| r.start < range.end && range.start < r.end)
    }

    /// Waits for every pending extent. While `ack` holds and nothing failed,
    /// acknowledges them in order; after a failure the rest still finish (a
    /// write already issued must not outlive the stream's lease) but are not
    /// acknowledged. Returns the first failure.
    async fn drain(&mut self, tx: &WriteTx, ack: bool) -> Result<(), RpcError> {
        let mut first_error = None;
        while let Some(done) = self.pending.next().await {
            self.ranges.pop_front();
            match done {
                Ok(seq) if ack && first_error.is_none() => {
                    // A vanished receiver is not an error of the data.
                    send_ack(tx, extent_ack(seq)).await;
                }
                Ok(_) => {}
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn extent_ack(seq: u64) -> pb::WriteResponse {
    pb::WriteResponse {
        msg: Some(write_response::Msg::Extent(pb::ExtentAck { seq })),
    }
}

/// Sends one acknowledgement; false when the client has gone away.
async fn send_ack(tx: &WriteTx, ack: pb::WriteResponse) -> bool {
    tx.send(Ok(ack)).await.is_ok()
}

async fn flush(inner: &Inner) -> Result<(), RpcError> {
    inner
        .image
        .flush()
        .await
        .map_err(|source| RpcError::Image {
            action: "flush",
            offset: 0,
            source,
        })?;
    inner.metrics.barriers.inc();
    Ok(())
}

/// Validates one extent completely, then writes it. Nothing reaches the
/// image unless the whole extent checks out.
async fn apply_extent(inner: Arc<Inner>, extent: pb::Extent) -> Result<u64, RpcError> {
    let metrics = &inner.metrics;
    let result = apply_extent_inner(&inner, extent).await;
    if result.is_err() {
        metrics.rejected_extents.inc();
    }
    result
}

async fn apply_extent_inner(inner: &Inner, extent: pb::Extent) -> Result<u64, RpcError> {
    let pb::Extent {
        seq,
        offset,
        length,
        encoding,
        payload,
        blake3,
    } = extent;
    let size = inner.image.size();
    match range_fault(offset, length, size) {
        None => {}
        Some(RangeFault::Empty) => return Err(RpcError::EmptyExtent { offset }),
        Some(RangeFault::TooLong) => {
            return Err(RpcError::ExtentTooLong {
                offset,
                len: length,
                max: MAX_EXTENT_LEN,
            });
        }
        Some(RangeFault::OutOfBounds) => {
            return Err(RpcError::ExtentOutOfBounds {
                offset,
                len: length,
                size,
            });
        }
    }
    let encoding = pb::Encoding::try_from(encoding)
        .ok()
        .filter(|e| *e != pb::Encoding::Unspecified)
        .ok_or(RpcError::BadEncoding { offset, encoding })?;
    let wire_len = payload.len() as u64;
    let started = Instant::now();
    if encoding == pb::Encoding::Zero {
        if !payload.is_empty() {
            return Err(RpcError::PayloadLength {
                offset,
                got: payload.len(),
                want: 0,
            });
        }
        inner
            .image
            .write_zeroes(offset, u64::from(length), true)
            .await
            .map_err(|source| RpcError::Image {
                action: "write zeroes into",
                offset,
                source,
            })?;
        inner.metrics.zero_extents.inc();
    } else {
        let expected: [u8; 32] =
            blake3
                .as_ref()
                .try_into()
                .map_err(|_| RpcError::MissingChecksum {
                    offset,
                    got: blake3.len(),
                })?;
        // Decompressing and hashing megabytes is CPU work: off the async workers.
        let data = tokio::task::spawn_blocking(move || {
            decode_and_verify(offset, length, encoding, payload, &expected)
        })
        .await??;
        let write_started = Instant::now();
        inner
            .image
            .write_at(offset, data, false)
            .await
            .map_err(|source| RpcError::Image {
                action: "write",
                offset,
                source,
            })?;
        inner.metrics.write_latency.observe(write_started.elapsed());
    }
    inner.trees.mark_dirty(offset, u64::from(length));
    let m = &inner.metrics;
    m.extents_written.inc();
    m.bytes_written.add(u64::from(length));
    m.bytes_received.add(wire_len);
    m.extent_latency.observe(started.elapsed());
    Ok(seq)
}
