//! `ReplicaService`: the destination's implementation of `tern.v1.Replica`.
//!
//! A write stream is a pipeline: extents are validated (decompressed and
//! checksummed on the blocking pool) and written concurrently, up to
//! `max_in_flight`, and acknowledged strictly in the order received. An extent
//! overlapping one still in flight waits for it, so the image ends up as if
//! the extents had been applied one after another. A barrier waits for every
//! earlier extent, then flushes.

use std::collections::VecDeque;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::epoch::{Fence, Lease};
use super::extent::{EncodedExtent, decode_and_verify};
use super::pb::{self, replica_server, write_request, write_response};
use super::{MAX_EXTENT_LEN, MAX_MESSAGE_LEN, MAX_NODES_PER_CALL, RpcError};
use crate::checktree::{self, CheckTree, Shape};
use crate::image::{ChangeListener, Image, ImageChanges};
use crate::metrics::ReplicaMetrics;

/// Switches the destination's NBD export between read-only and writable
/// (cutover). Implemented by the agent over the NBD server.
pub trait ExportControl: Send + Sync + 'static {
    fn writable(&self) -> bool;
    fn set_writable(&self, writable: bool) -> Result<(), String>;
}

/// Tuning of the service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Extents of one stream validated and written concurrently.
    pub max_in_flight: usize,
    /// Ranges of one `Read` call read and encoded concurrently (each up to
    /// 8 MiB held in memory until sent).
    pub max_reads_in_flight: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_in_flight: 32,
            max_reads_in_flight: 8,
        }
    }
}

/// The replica service. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaService {
    inner: Arc<Inner>,
}

struct Inner {
    image: Image,
    fence: Fence,
    export: Option<Arc<dyn ExportControl>>,
    metrics: Arc<ReplicaMetrics>,
    trees: Arc<TreeCache>,
    shutdown: CancellationToken,
    opts: ServeOptions,
}

impl ReplicaService {
    /// A service writing into `image`, fenced by `fence`. Write streams end
    /// (after draining their in-flight writes) when `shutdown` is cancelled.
    pub fn new(
        image: Image,
        fence: Fence,
        export: Option<Arc<dyn ExportControl>>,
        metrics: Arc<ReplicaMetrics>,
        shutdown: CancellationToken,
        opts: ServeOptions,
    ) -> ReplicaService {
        ReplicaService {
            inner: Arc::new(Inner {
                image,
                fence,
                export,
                metrics,
                trees: Arc::default(),
                shutdown,
                opts,
            }),
        }
    }

    /// The tonic service, with message limits that fit the largest extent.
    pub fn into_server(self) -> replica_server::ReplicaServer<ReplicaService> {
        replica_server::ReplicaServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_LEN)
            .max_encoding_message_size(MAX_MESSAGE_LEN)
    }

    /// Keeps the checksum tree current with writes made to the image by
    /// others (the NBD export after cutover) that report to `changes`.
    /// The service's own write streams mark the tree themselves.
    pub fn watch_changes(&self, changes: &ImageChanges) {
        changes.subscribe(Arc::clone(&self.inner.trees) as Arc<dyn ChangeListener>);
    }

    /// The highest epoch accepted.
    pub fn epoch(&self) -> u64 {
        self.inner.fence.highest()
    }
}

/// Name of the service for the health service (`tern.v1.Replica`).
pub const SERVICE_NAME: &str =
    <replica_server::ReplicaServer<ReplicaService> as tonic::server::NamedService>::NAME;

/// HTTP/2 windows large enough that one stream can carry gigabytes per second.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Serves the replica service and the standard gRPC health service on
/// `listener` until `shutdown` is cancelled. With `tls`, every connection
/// must present a client certificate signed by the directory's CA.
///
/// On shutdown: the listener closes, write streams stop reading, finish the
/// writes in flight and end with UNAVAILABLE; this returns once every
/// connection is closed. The caller then flushes the image.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: ReplicaService,
    tls: Option<&super::TlsMaterial>,
    shutdown: CancellationToken,
) -> Result<(), RpcError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<replica_server::ReplicaServer<ReplicaService>>()
        .await;
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server_config())
            .map_err(|source| RpcError::Serve { source })?;
    }
    let incoming = nodelay_incoming(listener);
    let signal = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            health
                .set_not_serving::<replica_server::ReplicaServer<ReplicaService>>()
                .await;
        }
    };
    builder
        .add_service(health_service)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, signal)
        .await
        .map_err(|source| RpcError::Serve { source })
}

/// The accepted connections of `listener`, each with `TCP_NODELAY`. A
/// builder's `tcp_nodelay` applies only to listeners tonic binds itself;
/// without it Nagle holds a response's trailers until the client's delayed
/// ACK: ~40 ms per read stream or small reply, measured at the cutover.
pub(crate) fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |stream| {
            let stream = stream?;
            stream.set_nodelay(true)?;
            Ok(stream)
        },
    )
}

type ReadTx = mpsc::Sender<Result<pb::ReadResponse, Status>>;
type AckFuture = Pin<Box<dyn Future<Output = Result<u64, RpcError>> + Send>>;
type WriteTx = mpsc::Sender<Result<pb::WriteResponse, Status>>;

#[tonic::async_trait]
impl replica_server::Replica for ReplicaService {
    #[tracing::instrument(skip_all)]
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let inner = &self.inner;
        Ok(Response::new(pb::InfoResponse {
            image_size: inner.image.size(),
            epoch: inner.fence.highest(),
            export_writable: inner.export.as_ref().is_some_and(|e| e.writable()),
            max_extent_len: MAX_EXTENT_LEN,
        }))
    }

    type WriteStream = ReceiverStream<Result<pb::WriteResponse, Status>>;

    #[tracing::instrument(skip_all, fields(epoch))]
    async fn write(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.msg)
            .ok_or(RpcError::NoOpen)?;
        let write_request::Msg::Open(open) = first else {
            return Err(RpcError::NoOpen.into());
        };
        tracing::Span::current().record("epoch", open.epoch);
        let lease = self.inner.fence.acquire(open.epoch).await?;
        let (tx, rx) = mpsc::channel(2 * self.inner.opts.max_in_flight.max(1));
        let opened = pb::WriteResponse {
            msg: Some(write_response::Msg::Opened(pb::Opened {
                epoch: lease.epoch,
                image_size: self.inner.image.size(),
                max_extent_len: MAX_EXTENT_LEN,
            })),
        };
        // The channel is empty: this cannot wait.
        if tx.send(Ok(opened)).await.is_err() {
            return Err(RpcError::StreamClosed { what: "write" }.into());
        }
        tokio::spawn(run_write_stream(
            Arc::clone(&self.inner),
            inbound,
            lease,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(region_size = request.get_ref().region_size, level = request.get_ref().level))]
    async fn get_checksum_tree(
        &self,
        request: Request<pb::ChecksumTreeRequest>,
    ) -> Result<Response<pb::ChecksumTreeResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        let tree = inner.trees.refresh(&inner.image, req.region_size).await?;
        let shape = *tree.shape();
        let nodes = tree.level(req.level).map_err(RpcError::from)?;
        let asked = if req.indices.is_empty() {
            nodes.len() as u64
        } else {
            req.indices.len() as u64
        };
        if asked > MAX_NODES_PER_CALL {
            return Err(RpcError::TooManyNodes {
                asked,
                max: MAX_NODES_PER_CALL,
            }
            .into());
        }
        let hashes = if req.indices.is_empty() {
            nodes.iter().map(|h| Bytes::copy_from_slice(h)).collect()
        } else {
            req.indices
                .iter()
                .map(|&i| {
                    tree.node(req.level, i)
                        .map(|h| Bytes::copy_from_slice(&h))
                        .map_err(RpcError::from)
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Response::new(pb::ChecksumTreeResponse {
            image_size: shape.image_size(),
            region_size: shape.region_size(),
            leaf_count: shape.leaf_count(),
            levels: shape.levels(),
            level: req.level,
            hashes,
        }))
    }

    #[tracing::instrument(skip_all, fields(epoch = request.get_ref().epoch, writable = request.get_ref().writable))]
    async fn set_export_writable(
        &self,
        request: Request<pb::SetExportWritableRequest>,
    ) -> Result<Response<pb::SetExportWritableResponse>, Status> {
        let req = request.into_inner();
        let export = self.inner.export.as_ref().ok_or(RpcError::NoExport)?;
        // Fenced like a writer; the lease is dropped at once, it only proves the epoch.
        let lease = self.inner.fence.acquire(req.epoch).await?;
        export
            .set_writable(req.writable)
            .map_err(RpcError::Export)?;
        tracing::info!(
            epoch = lease.epoch,
            writable = req.writable,
            "NBD export mode changed"
        );
        Ok(Response::new(pb::SetExportWritableResponse {
            epoch: lease.epoch,
            export_writable: export.writable(),
        }))
    }

    type ReadStream = ReceiverStream<Result<pb::ReadResponse, Status>>;

    #[tracing::instrument(skip_all, fields(ranges = request.get_ref().ranges.len()))]
    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let req = request.into_inner();
        // The whole request is checked first, so a bad range ends the call
        // before any data is sent.
        let size = self.inner.image.size();
        for range in &req.ranges {
            check_read_range(range, size)?;
        }
        if let Some(level) = req.zstd_level {
            let levels = zstd::compression_level_range();
            if !levels.contains(&level) {
                return Err(RpcError::BadZstdLevel {
                    level,
                    min: *levels.start(),
                    max: *levels.end(),
                }
                .into());
            }
        }
        // Reads already run `max_reads_in_flight` ahead; a short channel is enough.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_read(
            Arc::clone(&self.inner),
            req.ranges,
            req.zstd_level,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn check_read_range(range: &pb::ReadRange, size: u64) -> Result<(), RpcError> {
    let pb::ReadRange { offset, length } = *range;
    if length == 0 {
        return Err(RpcError::EmptyRange { offset });
    }
    if length > MAX_EXTENT_LEN {
        return Err(RpcError::RangeTooLong {
            offset,
            len: length,
            max: MAX_EXTENT_LEN,
        });
    }
    if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size)
    {
        return Err(RpcError::RangeOutOfBounds {
            offset,
            len: length,
            size,
        });
    }
    Ok(())
}

/// Answers one `Read` call: reads and encodes up to `max_reads_in_flight`
/// ranges concurrently and sends them in request order. Stops when the
/// client goes away, at shutdown (UNAVAILABLE) or at the first failure.
async fn run_read(
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

/// Counters of one stream, logged once at its end (never per extent).
#[derive(Debug, Default)]
struct StreamCounts {
    extents: u64,
    barriers: u64,
}

async fn run_write_stream(
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
    if length == 0 {
        return Err(RpcError::EmptyExtent { offset });
    }
    if length > MAX_EXTENT_LEN {
        return Err(RpcError::ExtentTooLong {
            offset,
            len: length,
            max: MAX_EXTENT_LEN,
        });
    }
    if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size)
    {
        return Err(RpcError::ExtentOutOfBounds {
            offset,
            len: length,
            size,
        });
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

/// The checksum tree of the last region size asked for, kept current by
/// marking the regions each completed write touched and rehashing only those.
#[derive(Default)]
struct TreeCache {
    state: Mutex<Option<CachedTree>>,
    /// One refresh at a time; queries wait for the running one.
    refresh: tokio::sync::Mutex<()>,
}

struct CachedTree {
    tree: CheckTree,
    /// One bit per region: rehash before answering.
    dirty: Vec<u64>,
}

impl TreeCache {
    /// Marks the regions of a completed write. Called after the write, so a
    /// refresh that started earlier cannot hide it.
    fn mark_dirty(&self, offset: u64, len: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = state.as_mut() {
            for region in cached.tree.shape().regions_touching(offset, len) {
                cached.dirty[(region / 64) as usize] |= 1 << (region % 64);
            }
        }
    }

    /// Brings the tree for `region_size` up to date and returns a copy.
    async fn refresh(&self, image: &Image, region_size: u64) -> Result<CheckTree, RpcError> {
        let _one_at_a_time = self.refresh.lock().await;
        let shape = Shape::new(image.size(), region_size)?;
        let dirty = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let reuse = state.as_ref().is_some_and(|c| *c.tree.shape() == shape);
            if !reuse {
                let leaves = vec![[0u8; checktree::HASH_LEN]; shape.leaf_count() as usize];
                let mut dirty = vec![u64::MAX; shape.leaf_count().div_ceil(64) as usize];
                if let Some(last) = dirty.last_mut() {
                    let used = shape.leaf_count() % 64;
                    if used != 0 {
                        *last = (1u64 << used) - 1;
                    }
                }
                *state = Some(CachedTree {
                    tree: CheckTree::from_leaves(shape, leaves)?,
                    dirty,
                });
            }
            let cached = state.as_mut().expect("cache filled just above");
            // Taken (cleared) before reading: a write completing from now on marks again.
            std::mem::replace(
                &mut cached.dirty,
                vec![0; shape.leaf_count().div_ceil(64) as usize],
            )
        };
        let mut updates = Vec::new();
        for run in dirty_runs(&dirty, shape.leaf_count()) {
            let hashes = checktree::hash_regions(image, &shape, run.clone()).await;
            let hashes = match hashes {
                Ok(h) => h,
                Err(err) => {
                    // Put the bits back so the next query retries these regions.
                    self.remark(&dirty);
                    return Err(err.into());
                }
            };
            updates.extend(run.zip(hashes));
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = state.as_mut().expect("only refresh replaces the cache");
        if !updates.is_empty() {
            cached.tree.update_leaves(&updates)?;
        }
        Ok(cached.tree.clone())
    }

    fn remark(&self, bits: &[u64]) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = state.as_mut() {
            for (word, bits) in cached.dirty.iter_mut().zip(bits) {
                *word |= bits;
            }
        }
    }
}

impl ChangeListener for TreeCache {
    fn changed(&self, offset: u64, len: u64) {
        self.mark_dirty(offset, len);
    }
}

/// Contiguous runs of set bits, as region ranges.
fn dirty_runs(bits: &[u64], count: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        if word == 0 {
            continue;
        }
        for b in 0..64 {
            let i = w as u64 * 64 + b;
            if i >= count {
                break;
            }
            if word & (1 << b) != 0 {
                match runs.last_mut() {
                    Some(run) if run.end == i => run.end = i + 1,
                    _ => runs.push(i..i + 1),
                }
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_groups_adjacent_bits_across_words() {
        let mut bits = vec![0u64; 3];
        for i in [1u64, 2, 3, 63, 64, 65, 130] {
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        assert_eq!(dirty_runs(&bits, 140), vec![1..4, 63..66, 130..131]);
    }
}
