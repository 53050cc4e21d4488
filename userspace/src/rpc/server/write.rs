//! The write side of the replica service: one write stream per epoch lease,
//! extents validated whole and then written, in a pipeline that keeps
//! overlapping extents in order; barriers flush and acknowledge.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tonic::{Status, Streaming};

use crate::rpc::epoch::Lease;
use crate::rpc::extent::{check_leaf_size, decode_and_verify};
use crate::rpc::pb::{self, write_request, write_response};
use crate::rpc::{MAX_BATCH_BYTES, MAX_BATCH_EXTENTS, MAX_EXTENT_LEN, RpcError};

use super::tree_cache::Written;
use super::{AckFuture, Inner, RangeFault, WriteTx, range_fault};
use crate::checktree::{self, Hash, Shape};

/// Counters of one stream, logged once at its end (never per extent).
#[derive(Debug, Default)]
struct StreamCounts {
    extents: u64,
    batches: u64,
    barriers: u64,
}

pub(super) async fn run_write_stream(
    inner: Arc<Inner>,
    mut inbound: Streaming<pb::WriteRequest>,
    lease: Lease,
    fill: bool,
    tx: WriteTx,
) {
    let mut pipeline = Pipeline {
        fill,
        ..Pipeline::default()
    };
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
                        if let Err(err) = pipeline.start(&inner, &tx, vec![extent]).await {
                            break Err(err);
                        }
                    }
                    Some(write_request::Msg::Batch(batch)) => {
                        counts.batches += 1;
                        counts.extents += batch.extents.len() as u64;
                        if let Err(err) = check_batch(&batch.extents) {
                            break Err(err);
                        }
                        if let Err(err) = pipeline.start(&inner, &tx, batch.extents).await {
                            break Err(err);
                        }
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
        batches = counts.batches,
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

/// Refuses a batch the destination did not offer to take: empty, too many
/// extents, or more plain bytes than it holds in memory for one message.
fn check_batch(extents: &[pb::Extent]) -> Result<(), RpcError> {
    let bytes: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
    if extents.is_empty() {
        return Err(RpcError::EmptyBatch);
    }
    if extents.len() > MAX_BATCH_EXTENTS as usize || bytes > MAX_BATCH_BYTES {
        return Err(RpcError::BatchTooLarge {
            extents: extents.len(),
            bytes,
            max_extents: MAX_BATCH_EXTENTS,
            max_bytes: MAX_BATCH_BYTES,
        });
    }
    Ok(())
}

/// The byte ranges of one message in flight: their bounds, and the ranges
/// sorted by start.
struct Span {
    bounds: Range<u64>,
    ranges: Vec<Range<u64>>,
}

impl Span {
    fn of(extents: &[pb::Extent]) -> Span {
        let mut ranges: Vec<Range<u64>> = extents
            .iter()
            .map(|e| e.offset..e.offset.saturating_add(u64::from(e.length)))
            .collect();
        ranges.sort_unstable_by_key(|r| r.start);
        let start = ranges.first().map_or(0, |r| r.start);
        let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        Span {
            bounds: start..end,
            ranges,
        }
    }

    /// Whether a byte of `self` is a byte of `other`: one pass over both
    /// sorted lists, moving past whichever range ends first.
    fn overlaps(&self, other: &Span) -> bool {
        if self.bounds.start >= other.bounds.end || other.bounds.start >= self.bounds.end {
            return false;
        }
        let (mut i, mut j) = (0, 0);
        while let (Some(a), Some(b)) = (self.ranges.get(i), other.ranges.get(j)) {
            if a.start < b.end && b.start < a.end {
                return true;
            }
            if a.end <= b.start {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }
}

#[derive(Default)]
struct Pipeline {
    pending: FuturesOrdered<AckFuture>,
    ranges: VecDeque<Span>,
    /// A post-copy fill stream: extents land only in missing units.
    fill: bool,
}

impl Pipeline {
    fn overlaps(&self, span: &Span) -> bool {
        self.ranges.iter().any(|r| r.overlaps(span))
    }

    /// Starts writing `extents` (one message): after everything in flight
    /// that they overlap, so the image ends up as if the messages had been
    /// applied one after another.
    async fn start(
        &mut self,
        inner: &Arc<Inner>,
        tx: &WriteTx,
        extents: Vec<pb::Extent>,
    ) -> Result<(), RpcError> {
        let span = Span::of(&extents);
        if self.overlaps(&span) {
            self.drain(tx, true).await?;
        }
        self.ranges.push_back(span);
        self.pending.push_back(Box::pin(apply_extents(
            Arc::clone(inner),
            extents,
            self.fill,
        )));
        Ok(())
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

/// Validates a message's extents completely (ranges, encodings, checksums),
/// then writes them in order. Nothing reaches the image unless every extent
/// of the message checks out. Returns the sequence number to acknowledge
/// (the last extent's).
async fn apply_extents(
    inner: Arc<Inner>,
    extents: Vec<pb::Extent>,
    fill: bool,
) -> Result<u64, RpcError> {
    let count = extents.len() as u64;
    let result = apply_extents_inner(&inner, extents, fill).await;
    if result.is_err() {
        inner.metrics.rejected_extents.add(count);
    }
    result
}

/// Plain data a message's extents decode to, in at most this many bytes, is
/// checked on the async worker: hashing 64 KiB takes less time than the
/// round trip through the blocking pool.
const DECODE_INLINE: u64 = 64 << 10;

async fn apply_extents_inner(
    inner: &Inner,
    extents: Vec<pb::Extent>,
    fill: bool,
) -> Result<u64, RpcError> {
    let started = Instant::now();
    let size = inner.image.size();
    let checked = extents
        .into_iter()
        .map(|e| Checked::new(e, size))
        .collect::<Result<Vec<_>, _>>()?;
    let last_seq = checked.last().map(|c| c.seq).ok_or(RpcError::EmptyBatch)?;
    let plain: u64 = checked.iter().map(|c| u64::from(c.length)).sum();
    let wire: u64 = checked.iter().map(|c| c.payload.len() as u64).sum();
    let extents = checked.len() as u64;
    // Taken before anything is written: see `TreeCache::written`.
    let vouch = inner.trees.vouch();
    let shape = vouch.map(|v| v.shape);
    let decoded = if plain - zero_bytes(&checked) <= DECODE_INLINE {
        decode_all(checked, shape)?
    } else {
        // Decompressing and hashing megabytes is CPU work: off the async workers.
        tokio::task::spawn_blocking(move || decode_all(checked, shape)).await??
    };
    // A fill writes only the units still missing, each taken from the
    // gate until written (a write of the export waits for it meanwhile).
    let (decoded, claimed) = if fill {
        claim_missing(&inner.presence, decoded)
    } else {
        (decoded, Vec::new())
    };
    let write_started = Instant::now();
    let mut written = Vec::with_capacity(decoded.len());
    let mut zeroes = 0u64;
    let result = write_decoded(inner, decoded, &mut written, &mut zeroes).await;
    inner.presence.filled(&claimed, result.is_ok());
    if let Err(err) = result {
        // Some of it may have reached the disk: what it touched is read
        // back before the tree is next believed.
        inner
            .trees
            .mark_dirty_all(written.into_iter().map(|w| w.range));
        return Err(err);
    }
    inner.metrics.write_latency.observe(write_started.elapsed());
    if let Some(vouch) = vouch {
        // The tree will read back the regions written in part; start now.
        inner.image.prefetch(
            written
                .iter()
                .flat_map(|w| w.partial_regions(&vouch.shape))
                .collect::<Vec<_>>(),
        );
    }
    inner.trees.written(vouch, written);
    let m = &inner.metrics;
    m.extents_written.add(extents);
    m.zero_extents.add(zeroes);
    m.bytes_written.add(plain);
    m.bytes_received.add(wire);
    m.extent_latency.observe(started.elapsed());
    inner.liveness.wrote(plain);
    Ok(last_seq)
}

/// The pieces of a fill's `decoded` extents that fall on units the gate
/// still misses, each unit taken for this fill; and the runs taken.
/// Leaf hashes are dropped (a piece need not be a whole region): the tree
/// reads back what was written.
fn claim_missing(
    presence: &crate::postcopy::Presence,
    decoded: Vec<Decoded>,
) -> (Vec<Decoded>, Vec<Range<u64>>) {
    let mut pieces = Vec::new();
    let mut claimed = Vec::new();
    for piece in decoded {
        let (offset, len) = match &piece {
            Decoded::Data(offset, bytes, _) => (*offset, bytes.len() as u64),
            Decoded::Zero(offset, length) => (*offset, u64::from(*length)),
        };
        for run in presence.claim_fill(offset, len) {
            let at = usize::try_from(run.start - offset).expect("inside an extent held in memory");
            let end = usize::try_from(run.end - offset).expect("inside an extent held in memory");
            pieces.push(match &piece {
                Decoded::Data(_, bytes, _) => {
                    Decoded::Data(run.start, bytes.slice(at..end), Vec::new())
                }
                Decoded::Zero(..) => Decoded::Zero(
                    run.start,
                    u32::try_from(end - at).expect("a piece of an extent of a u32 length"),
                ),
            });
            claimed.push(run);
        }
    }
    (pieces, claimed)
}

/// Writes a message's decoded extents in order, noting each in `written`
/// before it is issued.
async fn write_decoded(
    inner: &Inner,
    decoded: Vec<Decoded>,
    written: &mut Vec<Written>,
    zeroes: &mut u64,
) -> Result<(), RpcError> {
    let mut data = Vec::new();
    for piece in decoded {
        match piece {
            Decoded::Data(offset, bytes, leaves) => {
                written.push(Written {
                    range: offset..offset + bytes.len() as u64,
                    leaves,
                });
                data.push((offset, bytes));
            }
            Decoded::Zero(offset, length) => {
                written.push(Written {
                    range: offset..offset + u64::from(length),
                    leaves: Vec::new(),
                });
                // In order: data before a zero extent may overlap it.
                write_data(inner, std::mem::take(&mut data)).await?;
                inner
                    .image
                    .write_zeroes(offset, u64::from(length), true)
                    .await
                    .map_err(|source| RpcError::Image {
                        action: "write zeroes into",
                        offset,
                        source,
                    })?;
                *zeroes += 1;
            }
        }
    }
    write_data(inner, data).await
}

async fn write_data(inner: &Inner, data: Vec<(u64, Bytes)>) -> Result<(), RpcError> {
    let Some(&(offset, _)) = data.first() else {
        return Ok(());
    };
    inner
        .image
        .write_many(data)
        .await
        .map_err(|source| RpcError::Image {
            action: "write",
            offset,
            source,
        })
}

fn zero_bytes(checked: &[Checked]) -> u64 {
    checked
        .iter()
        .filter(|c| c.encoding == pb::Encoding::Zero)
        .map(|c| u64::from(c.length))
        .sum()
}

/// An extent whose range, encoding and checksum field are valid; its data
/// is not decoded yet.
struct Checked {
    seq: u64,
    offset: u64,
    length: u32,
    encoding: pb::Encoding,
    payload: Bytes,
    /// The checksum of the plain data; all zeroes (unused) for a zero extent.
    blake3: [u8; 32],
    /// How the checksum is made (`Extent.leaf_size`).
    leaf_size: u32,
}

impl Checked {
    fn new(extent: pb::Extent, size: u64) -> Result<Checked, RpcError> {
        let pb::Extent {
            seq,
            offset,
            length,
            encoding,
            payload,
            blake3,
            leaf_size,
        } = extent;
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
        check_leaf_size(offset, leaf_size)?;
        let blake3 = if encoding == pb::Encoding::Zero {
            if !payload.is_empty() {
                return Err(RpcError::PayloadLength {
                    offset,
                    got: payload.len(),
                    want: 0,
                });
            }
            [0; 32]
        } else {
            blake3
                .as_ref()
                .try_into()
                .map_err(|_| RpcError::MissingChecksum {
                    offset,
                    got: blake3.len(),
                })?
        };
        Ok(Checked {
            seq,
            offset,
            length,
            encoding,
            payload,
            blake3,
            leaf_size,
        })
    }
}

/// What an extent becomes once its checksum matched: data with the leaf
/// hashes of the whole regions it covers (of the tree held), or zeroes.
enum Decoded {
    Data(u64, Bytes, Vec<(u64, Hash)>),
    Zero(u64, u32),
}

/// Decodes every extent and checks every checksum; the first bad one fails
/// the whole message. With `shape`, hashes the leaves each extent's data
/// makes while it is at hand.
fn decode_all(checked: Vec<Checked>, shape: Option<Shape>) -> Result<Vec<Decoded>, RpcError> {
    checked
        .into_iter()
        .map(|c| {
            if c.encoding == pb::Encoding::Zero {
                return Ok(Decoded::Zero(c.offset, c.length));
            }
            let (data, pieces) = decode_and_verify(
                c.offset,
                c.length,
                c.encoding,
                c.payload,
                &c.blake3,
                c.leaf_size,
            )?;
            let leaves = match shape {
                None => Vec::new(),
                // The checksum's whole pieces are the tree's leaves: hashed once.
                Some(shape) if u64::from(c.leaf_size) == shape.region_size() => pieces
                    .into_iter()
                    .filter_map(|(piece, hash)| Some((shape.whole_region(&piece)?, hash)))
                    .collect(),
                Some(shape) => checktree::leaves_within(&shape, c.offset, &data),
            };
            Ok(Decoded::Data(c.offset, data, leaves))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(offset: u64, length: u32) -> pb::Extent {
        pb::Extent {
            seq: 0,
            offset,
            length,
            encoding: pb::Encoding::Zero.into(),
            payload: Bytes::new(),
            blake3: Bytes::new(),
            leaf_size: 0,
        }
    }

    fn span(ranges: &[(u64, u32)]) -> Span {
        let extents: Vec<pb::Extent> = ranges.iter().map(|&(o, l)| extent(o, l)).collect();
        Span::of(&extents)
    }

    #[test]
    fn spans_overlap_only_where_a_byte_is_shared() {
        let a = span(&[(0, 4096), (65536, 4096), (1 << 20, 4096)]);
        // Interleaved with `a` inside its bounds, touching no byte of it.
        let b = span(&[(4096, 4096), (69632, 8192), (1 << 19, 100)]);
        assert!(!a.overlaps(&b) && !b.overlaps(&a));
        let c = span(&[(8192, 10), (69631, 2)]);
        assert!(a.overlaps(&c) && c.overlaps(&a));
        // Unsorted extents, one covering another of the same message.
        let d = span(&[(2 << 20, 4096), (0, 10 << 20), (4096, 1)]);
        assert!(d.overlaps(&b));
        assert!(!span(&[(3 << 20, 1)]).overlaps(&a));
    }

    #[test]
    fn batches_over_the_limits_or_empty_are_refused() {
        assert!(matches!(check_batch(&[]), Err(RpcError::EmptyBatch)));
        let many: Vec<pb::Extent> = (0..=u64::from(MAX_BATCH_EXTENTS))
            .map(|i| extent(i * 4096, 4096))
            .collect();
        assert!(matches!(
            check_batch(&many),
            Err(RpcError::BatchTooLarge { .. })
        ));
        assert!(check_batch(&many[1..]).is_ok());
        let big = [
            extent(0, MAX_EXTENT_LEN),
            extent(MAX_EXTENT_LEN.into(), 4096),
        ];
        assert!(matches!(
            check_batch(&big),
            Err(RpcError::BatchTooLarge { .. })
        ));
        assert!(check_batch(&big[..1]).is_ok());
    }
}
