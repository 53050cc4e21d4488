//! `ReplicaService`: the destination's implementation of `tern.v1.Replica`.
//!
//! A write stream is a pipeline: extents are validated (decompressed and
//! checksummed on the blocking pool) and written concurrently, up to
//! `max_in_flight`, and acknowledged strictly in the order received. An extent
//! overlapping one still in flight waits for it, so the image ends up as if
//! the extents had been applied one after another. A barrier waits for every
//! earlier extent, then flushes.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Future;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::epoch::Fence;
use super::failover::{HEARTBEAT_LOSS, Liveness, Promotion};
use super::pb::{self, replica_server, write_request, write_response};
use super::{MAX_BATCH_EXTENTS, MAX_EXTENT_LEN, MAX_MESSAGE_LEN, MAX_NODES_PER_CALL, RpcError};
use crate::checktree::{HASH_SCHEME, saved};
use crate::image::{ChangeListener, Image, ImageChanges};
use crate::metrics::ReplicaMetrics;
use crate::postcopy::Presence;

mod read;
mod tree_cache;
mod write;

use read::{check_read_range, run_read};
use tree_cache::TreeCache;
use write::run_write_stream;

/// Above this share of stale regions, a shutting-down agent does not rehash
/// them to save its tree: the next run would hash as much, and shutting
/// down should not take a pass over most of the image.
const MAX_STALE_TO_SAVE: f64 = 0.125;

/// What is wrong with a request's byte range (a read's or an extent's).
#[derive(Debug, PartialEq, Eq)]
enum RangeFault {
    Empty,
    TooLong,
    OutOfBounds,
}

/// Checks `length` bytes at `offset` against the image's `size` and the
/// longest extent: the one check behind reads and writes, each of which
/// names the fault in its own error.
fn range_fault(offset: u64, length: u32, size: u64) -> Option<RangeFault> {
    if length == 0 {
        Some(RangeFault::Empty)
    } else if length > MAX_EXTENT_LEN {
        Some(RangeFault::TooLong)
    } else if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size)
    {
        Some(RangeFault::OutOfBounds)
    } else {
        None
    }
}

/// Switches the destination's NBD export between read-only and writable
/// (cutover). Implemented by the agent over the NBD server.
pub trait ExportControl: Send + Sync + 'static {
    fn writable(&self) -> bool;
    fn set_writable(&self, writable: bool) -> Result<(), crate::nbd::NbdError>;
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
    /// The post-copy gate: fills write only where it says, reads wait on it.
    presence: Presence,
    /// Where the NBD export is served, for `Info`.
    nbd: Option<pb::NbdExport>,
    /// What was heard from the source (failover).
    liveness: Arc<Liveness>,
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
                presence: Presence::default(),
                nbd: None,
                liveness: Arc::default(),
            }),
        }
    }

    /// The service with `presence` as its post-copy gate (shared with the
    /// NBD export, which waits on it too). Call on a new service.
    #[must_use]
    pub fn with_presence(mut self, presence: Presence) -> ReplicaService {
        Arc::get_mut(&mut self.inner)
            .expect("with_presence is called on a new service, before it is cloned")
            .presence = presence;
        self
    }

    /// The service reporting its NBD export in `Info`. Call on a new service.
    #[must_use]
    pub fn with_nbd(mut self, nbd: crate::rpc::NbdExport) -> ReplicaService {
        Arc::get_mut(&mut self.inner)
            .expect("with_nbd is called on a new service, before it is cloned")
            .nbd = Some(pb::NbdExport {
            address: nbd.address,
            name: nbd.name,
            tls: nbd.tls,
            advertised_writable: nbd.advertised_writable,
        });
        self
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

    /// Starts the checksum tree from the one saved at `path` if the image
    /// still has the identity it was saved with (see
    /// [`crate::checktree::saved`]); otherwise, or when the source asks for
    /// another region size, the first tree query hashes the image, as
    /// without a saved tree. Call before serving. Returns whether the saved
    /// tree was taken.
    pub fn restore_tree(&self, path: &Path) -> bool {
        let image = &self.inner.image;
        let loaded =
            saved::Identity::of(image.path(), image.size()).and_then(|now| saved::load(path, &now));
        match loaded {
            Ok(tree) => {
                tracing::info!(tree = %path.display(), regions = tree.shape().leaf_count(), "checksum tree restored: the image is unchanged since it was saved");
                self.inner.trees.preload(tree);
                true
            }
            Err(saved::SavedTreeError::Missing { .. }) => false,
            Err(e) => {
                tracing::warn!(error = %e, "saved checksum tree not used");
                false
            }
        }
    }

    /// Brings the checksum tree up to date and saves it at `path`, so the
    /// next agent on this image can skip hashing it. Call only once nothing
    /// writes the image any more (after serving ended and the image was
    /// flushed). Returns the region size saved, or `None` when there was no
    /// tree to save or too much of it was stale to be worth rehashing now
    /// (an old saved tree is removed then: it no longer matches).
    pub async fn save_tree(&self, path: &Path) -> Result<Option<u64>, RpcError> {
        let image = &self.inner.image;
        let Some((region_size, stale)) = self.inner.trees.held() else {
            return Ok(None);
        };
        if stale > MAX_STALE_TO_SAVE {
            saved::remove(path)?;
            return Ok(None);
        }
        // Taken before the regions are read: a write after this moves it.
        let identity = saved::Identity::of(image.path(), image.size())?;
        let tree = self.inner.trees.refresh(image, region_size).await?;
        saved::save(path, &tree, &identity)?;
        Ok(Some(region_size))
    }

    /// The highest epoch accepted.
    pub fn epoch(&self) -> u64 {
        self.inner.fence.highest()
    }

    /// What the service heard from its source (heartbeats, writes).
    pub fn liveness(&self) -> &Liveness {
        &self.inner.liveness
    }

    /// The standing promotion, if the replica was promoted (failover).
    pub fn promotion(&self) -> Option<Promotion> {
        self.inner.fence.promotion()
    }

    /// Whether the NBD export is writable (the replica is the primary).
    pub fn export_writable(&self) -> bool {
        self.inner.export.as_ref().is_some_and(|e| e.writable())
    }

    /// Promotes the replica to primary (failover): a new epoch fences every
    /// older writer, the promotion is persisted, the NBD export turns
    /// writable. Refused while the source was heard within
    /// [`HEARTBEAT_LOSS`] unless `force`. A promoted replica answers with
    /// its standing promotion (and makes sure its export is writable: a
    /// crash may have come between the two).
    pub async fn promote(&self, reason: String, force: bool) -> Result<Promotion, RpcError> {
        let inner = &self.inner;
        if inner.fence.promotion().is_none() && !force {
            if let Some(silent) = inner.liveness.silent_for()
                && silent < HEARTBEAT_LOSS
            {
                return Err(RpcError::SourceAlive {
                    heard_ms: u64::try_from(silent.as_millis()).unwrap_or(u64::MAX),
                });
            }
            if inner.liveness.last_heard().consistent_as_of_unix_ms == 0 {
                return Err(RpcError::NeverConsistent);
            }
        }
        let promotion = inner
            .fence
            .promote(reason, inner.liveness.last_heard())
            .await?;
        if let Some(export) = &inner.export
            && !export.writable()
        {
            export
                .set_writable(true)
                .map_err(|e| RpcError::Export(Box::new(e)))?;
        }
        // Only now: a failed export above leaves the watch to try again.
        inner.liveness.forget();
        Ok(promotion)
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

/// The nodes `req` asks for (every node of its level when it names none)
/// of `tree`: the one answer to `GetChecksumTree`, whoever holds the tree
/// (a destination, or a staged migration's relay).
pub(crate) fn tree_answer(
    tree: &crate::checktree::CheckTree,
    req: &pb::ChecksumTreeRequest,
) -> Result<pb::ChecksumTreeResponse, RpcError> {
    let shape = *tree.shape();
    let nodes = tree.level(req.level)?;
    let asked = if req.indices.is_empty() {
        nodes.len() as u64
    } else {
        req.indices.len() as u64
    };
    if asked > MAX_NODES_PER_CALL {
        return Err(RpcError::TooManyNodes {
            asked,
            max: MAX_NODES_PER_CALL,
        });
    }
    let hashes = if req.indices.is_empty() {
        nodes.iter().map(|h| Bytes::copy_from_slice(h)).collect()
    } else {
        req.indices
            .iter()
            .map(|&i| Ok(Bytes::copy_from_slice(&tree.node(req.level, i)?)))
            .collect::<Result<Vec<_>, RpcError>>()?
    };
    Ok(pb::ChecksumTreeResponse {
        image_size: shape.image_size(),
        region_size: shape.region_size(),
        leaf_count: shape.leaf_count(),
        levels: shape.levels(),
        level: req.level,
        hashes,
        hash_scheme: HASH_SCHEME,
    })
}

/// Most gRPC connections one listener serves at once: each holds a task,
/// buffers and up to an HTTP/2 window of data, so this bounds what many
/// clients (or one opening connections it never uses) can take. A
/// connection over the limit is closed as soon as it is accepted.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// The accepted connections of `listener`, each with `TCP_NODELAY`, at most
/// [`MAX_CONNECTIONS`] at once. A builder's `tcp_nodelay` applies only to
/// listeners tonic binds itself; without it Nagle holds a response's
/// trailers until the client's delayed ACK: ~40 ms per read stream or small
/// reply, measured at the cutover.
pub(crate) fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<Limited>> {
    limited_incoming(listener, MAX_CONNECTIONS)
}

/// [`nodelay_incoming`] with `max` connections at most.
fn limited_incoming(
    listener: tokio::net::TcpListener,
    max: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<Limited>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    let mut refused = 0u64;
    tokio_stream::StreamExt::filter_map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |stream| {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => return Some(Err(e)),
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                // Closed unanswered; logged at powers of two, not per connection.
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(refused, max, "gRPC connections over the limit closed");
                }
                return None;
            };
            Some(stream.set_nodelay(true).map(|()| Limited {
                inner: stream,
                _permit: permit,
            }))
        },
    )
}

/// An accepted connection holding its place under the connection limit
/// until it is dropped.
pub(crate) struct Limited {
    inner: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

type ReadTx = mpsc::Sender<Result<pb::ReadResponse, Status>>;
type AckFuture = Pin<Box<dyn Future<Output = Result<u64, RpcError>> + Send>>;
type WriteTx = mpsc::Sender<Result<pb::WriteResponse, Status>>;
type DemandTx = mpsc::Sender<Result<pb::Demand, Status>>;

#[tonic::async_trait]
impl replica_server::Replica for ReplicaService {
    #[tracing::instrument(skip_all)]
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let inner = &self.inner;
        let mut postcopy = pb::PostCopyState::from(inner.presence.snapshot());
        if request.get_ref().postcopy_map {
            postcopy.missing = Bytes::from(inner.presence.missing_map());
        }
        Ok(Response::new(pb::InfoResponse {
            image_size: inner.image.size(),
            epoch: inner.fence.highest(),
            export_writable: inner.export.as_ref().is_some_and(|e| e.writable()),
            max_extent_len: MAX_EXTENT_LEN,
            max_batch_extents: MAX_BATCH_EXTENTS,
            leaf_checksums: true,
            postcopy: Some(postcopy),
            nbd: inner.nbd.clone(),
            promotion: inner.fence.promotion().as_ref().map(pb::Promotion::from),
        }))
    }

    #[tracing::instrument(skip_all, fields(epoch = request.get_ref().epoch))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let fence = &self.inner.fence;
        if let Some(p) = fence.promotion() {
            return Err(p.refusal().into());
        }
        let highest = fence.highest();
        if req.epoch < highest {
            return Err(RpcError::StaleEpoch {
                epoch: req.epoch,
                highest,
            }
            .into());
        }
        self.inner.liveness.heard(&req);
        Ok(Response::new(pb::HeartbeatResponse { epoch: highest }))
    }

    #[tracing::instrument(skip_all, fields(force = request.get_ref().force))]
    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::Promotion>, Status> {
        let req = request.into_inner();
        let reason = if req.reason.is_empty() {
            "tern failover".to_owned()
        } else {
            req.reason
        };
        let promotion = ReplicaService::promote(self, reason, req.force).await?;
        Ok(Response::new(pb::Promotion::from(&promotion)))
    }

    #[tracing::instrument(skip_all, fields(epoch = request.get_ref().epoch))]
    async fn demote(
        &self,
        request: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::DemoteResponse>, Status> {
        let inner = &self.inner;
        let promotion = inner.fence.promotion().ok_or(RpcError::NotPromoted)?;
        if request.get_ref().epoch < promotion.epoch {
            return Err(RpcError::StaleEpoch {
                epoch: request.get_ref().epoch,
                highest: promotion.epoch,
            }
            .into());
        }
        // The export goes read-only first: no NBD write may land once a
        // source may write again.
        if let Some(export) = &inner.export {
            export
                .set_writable(false)
                .map_err(|e| RpcError::Export(Box::new(e)))?;
        }
        let epoch = match inner.fence.demote(request.get_ref().epoch).await {
            Ok(epoch) => epoch,
            Err(e) => {
                // Still promoted: still the primary, writable again.
                if let Some(export) = &inner.export {
                    let _ = export.set_writable(true);
                }
                return Err(e.into());
            }
        };
        inner.liveness.forget();
        Ok(Response::new(pb::DemoteResponse { epoch }))
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
                max_batch_extents: MAX_BATCH_EXTENTS,
                leaf_checksums: true,
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
            open.fill,
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
        if req.hash_scheme != HASH_SCHEME {
            return Err(RpcError::HashScheme {
                theirs: req.hash_scheme,
                ours: HASH_SCHEME,
            }
            .into());
        }
        let inner = &self.inner;
        let tree = inner.trees.refresh(&inner.image, req.region_size).await?;
        Ok(Response::new(tree_answer(&tree, &req)?))
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
        // Armed before the export turns writable: no write may land in a
        // missing unit ungated.
        let missing_bytes = match &req.postcopy {
            Some(map) => self
                .inner
                .presence
                .arm(self.inner.image.size(), map.unit, &map.missing)
                .map_err(RpcError::PostCopy)?,
            None => 0,
        };
        export
            .set_writable(req.writable)
            .map_err(|e| RpcError::Export(Box::new(e)))?;
        tracing::info!(
            epoch = lease.epoch,
            writable = req.writable,
            "NBD export mode changed"
        );
        if req.postcopy.is_some() {
            tracing::info!(
                epoch = lease.epoch,
                missing_bytes,
                "post-copy armed: missing units are fetched from the source"
            );
        }
        Ok(Response::new(pb::SetExportWritableResponse {
            epoch: lease.epoch,
            export_writable: export.writable(),
            missing_bytes,
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

    type DemandsStream = ReceiverStream<Result<pb::Demand, Status>>;

    #[tracing::instrument(skip_all, fields(epoch = request.get_ref().epoch))]
    async fn demands(
        &self,
        request: Request<pb::DemandsRequest>,
    ) -> Result<Response<Self::DemandsStream>, Status> {
        let req = request.into_inner();
        let lease = self.inner.fence.acquire(req.epoch).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_demands(Arc::clone(&self.inner), lease, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Most demanded ranges one `Demand` message carries.
const DEMANDS_PER_MESSAGE: usize = 64;

/// Forwards the gate's demands to one source until nothing is missing, the
/// source goes away, or a higher epoch fences `lease`.
async fn run_demands(inner: Arc<Inner>, lease: super::epoch::Lease, tx: DemandTx) {
    inner.presence.requeue_demanded();
    let mut sent = 0u64;
    let outcome = loop {
        let next = tokio::select! {
            biased;
            () = lease.fenced.cancelled() => {
                break Err(RpcError::Fenced { epoch: lease.epoch, by: inner.fence.highest() });
            }
            () = inner.shutdown.cancelled() => break Err(RpcError::ShuttingDown),
            () = tx.closed() => break Ok(()),
            next = inner.presence.next_demands(DEMANDS_PER_MESSAGE) => next,
        };
        let Some(ranges) = next else {
            break Ok(());
        };
        let ranges = ranges
            .into_iter()
            .map(|r| pb::ReadRange {
                offset: r.start,
                length: u32::try_from(r.end - r.start)
                    .expect("a demand is one window of at most 64 KiB"),
            })
            .collect::<Vec<_>>();
        sent += ranges.len() as u64;
        if tx.send(Ok(pb::Demand { ranges })).await.is_err() {
            break Ok(());
        }
    };
    tracing::info!(
        epoch = lease.epoch,
        demands = sent,
        ok = outcome.is_ok(),
        "demand stream ended"
    );
    if let Err(err) = outcome {
        let _ = tx.send(Err(Status::from(err))).await;
    }
}

#[cfg(test)]
mod range_tests {
    use super::{MAX_EXTENT_LEN, RangeFault, range_fault};

    #[test]
    fn a_range_is_empty_too_long_past_the_end_or_fine() {
        assert_eq!(range_fault(0, 0, 4096), Some(RangeFault::Empty));
        assert_eq!(
            range_fault(0, MAX_EXTENT_LEN + 1, u64::MAX),
            Some(RangeFault::TooLong)
        );
        assert_eq!(range_fault(4096, 1, 4096), Some(RangeFault::OutOfBounds));
        assert_eq!(
            range_fault(u64::MAX, 1, u64::MAX),
            Some(RangeFault::OutOfBounds)
        );
        assert_eq!(range_fault(0, 4096, 4096), None);
        assert_eq!(range_fault(4095, 1, 4096), None);
    }
}

#[cfg(test)]
mod scheme_tests {
    use super::*;
    use crate::image::ImageOptions;
    use replica_server::Replica as _;

    #[tokio::test]
    async fn a_tree_asked_for_with_another_hash_scheme_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dst.img");
        let opts = ImageOptions {
            size: Some(1 << 20),
            ..ImageOptions::default()
        };
        let image = Image::open(&path, &opts).expect("image");
        let fence = Fence::load(&Fence::path_for(&path)).expect("epoch file");
        let service = ReplicaService::new(
            image,
            fence,
            None,
            Arc::new(ReplicaMetrics::default()),
            CancellationToken::new(),
            ServeOptions::default(),
        );
        let ask = |hash_scheme| {
            Request::new(pb::ChecksumTreeRequest {
                region_size: 65536,
                level: 0,
                indices: vec![0],
                hash_scheme,
            })
        };
        // 0: a source from before schemes were named; 1: the domain-byte scheme.
        for old in [0, 1] {
            let status = service
                .get_checksum_tree(ask(old))
                .await
                .expect_err("another scheme");
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(status.message().contains("same tern release"), "{status:?}");
        }
        let answer = service
            .get_checksum_tree(ask(HASH_SCHEME))
            .await
            .expect("this scheme")
            .into_inner();
        assert_eq!(answer.hash_scheme, HASH_SCHEME);
        assert_eq!(
            answer.hashes[0].as_ref(),
            crate::checktree::zero_leaf_hash(65536)
        );
    }
}

#[cfg(test)]
mod failover_tests {
    use super::*;
    use crate::image::ImageOptions;
    use crate::metrics::Render;
    use replica_server::Replica as _;

    fn service(dir: &Path) -> ReplicaService {
        let path = dir.join("dst.img");
        let opts = ImageOptions {
            size: Some(1 << 20),
            ..ImageOptions::default()
        };
        let image = Image::open(&path, &opts).expect("image");
        let fence = Fence::load(&Fence::path_for(&path)).expect("epoch file");
        ReplicaService::new(
            image,
            fence,
            None,
            Arc::new(ReplicaMetrics::default()),
            CancellationToken::new(),
            ServeOptions::default(),
        )
    }

    fn beat(epoch: u64, leaving: bool) -> Request<pb::HeartbeatRequest> {
        Request::new(pb::HeartbeatRequest {
            epoch,
            backlog_bytes: 8192,
            consistent_as_of_unix_ms: 1000,
            sent_unix_ms: 1001,
            leaving,
        })
    }

    #[tokio::test]
    async fn a_heard_source_blocks_a_promotion_by_hand_until_forced_and_then_every_heartbeat_is_refused()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = service(dir.path());
        let page = |svc: &ReplicaService| {
            let mut out = String::new();
            svc.render(&mut out);
            out
        };
        assert!(page(&svc).contains("tern_replica_promoted 0\n"));
        assert!(!page(&svc).contains("heard_seconds_ago"), "none heard yet");
        svc.heartbeat(beat(0, false)).await.expect("heartbeat");
        assert!(page(&svc).contains("tern_replica_source_backlog_bytes 8192\n"));
        let alive = ReplicaService::promote(&svc, "test".into(), false)
            .await
            .expect_err("the source speaks");
        assert!(matches!(alive, RpcError::SourceAlive { .. }), "{alive}");
        // A goodbye is no loss, and no longer blocks a promotion by hand.
        svc.heartbeat(beat(0, true)).await.expect("goodbye");
        assert_eq!(svc.liveness().silent_for(), None);
        let p = ReplicaService::promote(&svc, "test".into(), false)
            .await
            .expect("promote");
        assert_eq!((p.epoch, p.source_backlog_bytes), (1, 8192));
        assert_eq!(
            p.consistent_as_of_unix_ms, 1000,
            "the last heartbeat's recovery point"
        );
        assert!(page(&svc).contains("tern_replica_promoted 1\n"));
        let refused = svc.heartbeat(beat(1, false)).await.expect_err("promoted");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("tern failback"), "{refused:?}");
        let info = svc
            .info(Request::new(pb::InfoRequest::default()))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.promotion.map(|p| p.epoch), Some(1));
    }
}

#[cfg(test)]
mod limit_tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    use super::limited_incoming;

    /// Whether the server closed `s` (a read sees EOF) within a short wait.
    async fn closed(s: &mut tokio::net::TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_a_freed_place_is_taken_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (drop_one, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
        // The server side: holds what it accepts, drops one on request.
        let server = tokio::spawn(async move {
            let mut incoming = std::pin::pin!(limited_incoming(listener, 2));
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    next = incoming.next() => match next {
                        Some(Ok(c)) => held.push(c),
                        Some(Err(e)) => panic!("accept: {e}"),
                        None => return,
                    },
                    Some(()) = dropped.recv() => { held.remove(0); }
                }
            }
        });
        let connect = || tokio::net::TcpStream::connect(addr);
        let mut first = connect().await.expect("first");
        let mut second = connect().await.expect("second");
        let mut third = connect().await.expect("the connect itself succeeds");
        assert!(closed(&mut third).await, "over the limit: closed");
        assert!(!closed(&mut first).await && !closed(&mut second).await);
        drop_one.send(()).await.expect("drop one");
        assert!(closed(&mut first).await, "the oldest was dropped");
        let mut fourth = connect().await.expect("fourth");
        assert!(!closed(&mut fourth).await, "its place was free again");
        server.abort();
    }
}
