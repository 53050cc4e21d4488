//! The source's side of a staged migration: `tern.v1.Replica` served inside
//! the source process over a staging store. The engine and the cutover run
//! unchanged against it: its write streams become segments, its questions
//! about the destination (size, epoch, checksum tree, the switch) are
//! answered from what the destination agent publishes, waiting for it to
//! have applied every segment written so far where the answer depends on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use super::{
    DESTINATION, DESTINATION_TREE, DestinationState, FENCE, FenceRecord, MANIFEST, Manifest,
    SEGMENT_BYTES, Segment, SegmentId, StagingError, StagingStore, Switch,
};
use crate::checktree::{CheckTree, HASH_LEN, HASH_SCHEME, Hash, Shape};
use crate::history::StoreOptions;
use crate::replicate::Peer;
use crate::rpc::pb::{self, replica_server, write_request, write_response};
use crate::rpc::{MAX_EXTENT_LEN, RpcError};

/// The manifest's format.
const VERSION: u32 = 1;

/// How a relay reaches its store and waits for the destination.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub url: String,
    pub store: StoreOptions,
    /// Keep retrying a failing store this long before the migration fails.
    pub retry_for: Duration,
    /// Wait this long for the destination agent to publish or catch up.
    pub wait_for: Duration,
    /// How often to look at what the destination published.
    pub poll: Duration,
}

impl RelayOptions {
    pub fn new(url: impl Into<String>) -> RelayOptions {
        RelayOptions {
            url: url.into(),
            // A barrier's segment is durable in a directory store too.
            store: StoreOptions {
                fsync: true,
                ..StoreOptions::default()
            },
            retry_for: Duration::from_mins(2),
            wait_for: Duration::from_mins(10),
            // Its waits are short and inside the pause at the cutover.
            poll: Duration::from_millis(25),
        }
    }
}

/// Where the relay's writing stands.
#[derive(Debug)]
struct Written {
    next_seq: u64,
    /// The last segment in the store this relay knows of (its own or one
    /// found at start): the destination has caught up once it applied it.
    last: Option<SegmentId>,
}

struct Inner {
    store: StagingStore,
    manifest: Manifest,
    opts: RelayOptions,
    written: Mutex<Written>,
    /// The destination's tree last read, by its root (hex).
    tree: Mutex<Option<(String, CheckTree)>>,
    segments: AtomicU64,
    bytes: AtomicU64,
}

/// A staging relay. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

/// What a relay stored: segments and their bytes (what crossed to the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uploaded {
    pub segments: u64,
    pub bytes: u64,
}

impl Relay {
    /// Opens the store and starts (or resumes) staging an image of
    /// `image_size` bytes compared at `region_size`.
    pub async fn start(
        opts: &RelayOptions,
        image_size: u64,
        region_size: u64,
    ) -> Result<Relay, StagingError> {
        let store = StagingStore::open(&opts.url, &opts.store, opts.retry_for)?;
        let manifest = match store.get_json::<Manifest>(MANIFEST).await? {
            Some(old) if old.image_size != image_size => {
                return Err(StagingError::SizeMismatch {
                    url: opts.url.clone(),
                    staged: old.image_size,
                    ours: image_size,
                });
            }
            Some(old) if old.region_size == region_size && old.version == VERSION => old,
            old => {
                // A new staging, or the same one at another region size
                // (the destination publishes its tree at this one now).
                let manifest = Manifest {
                    version: VERSION,
                    id: old.map_or_else(new_id, |o| o.id),
                    image_size,
                    region_size,
                };
                store.put_json(MANIFEST, &manifest).await?;
                manifest
            }
        };
        let last = store.segments(None).await?.last().copied();
        if let Some(last) = last {
            tracing::info!(url = %opts.url, segments = last.seq + 1, "resuming a staged migration: the destination's tree says what is still to send");
        }
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                manifest,
                opts: opts.clone(),
                written: Mutex::new(Written {
                    next_seq: last.map_or(0, |l| l.seq + 1),
                    last,
                }),
                tree: Mutex::new(None),
                segments: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
        })
    }

    /// Serves the relay in this process until `shutdown`: the engine's way to it.
    pub fn serve(&self, shutdown: CancellationToken) -> Peer {
        let server = replica_server::ReplicaServer::new(self.clone())
            .max_decoding_message_size(crate::rpc::MAX_MESSAGE_LEN)
            .max_encoding_message_size(crate::rpc::MAX_MESSAGE_LEN);
        let channel = crate::rpc::local::serve_in_process(Routes::new(server), shutdown);
        Peer::in_process(&self.inner.opts.url, channel)
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// What this relay stored so far.
    pub fn uploaded(&self) -> Uploaded {
        Uploaded {
            segments: self.inner.segments.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn url(&self) -> &str {
        &self.opts.url
    }

    /// What the destination published once `ready` says it will do.
    async fn destination(
        &self,
        what: &str,
        ready: impl Fn(&DestinationState) -> bool,
    ) -> Result<DestinationState, StagingError> {
        let started = Instant::now();
        let mut told = Instant::now();
        loop {
            if let Some(state) = self.store.get_json::<DestinationState>(DESTINATION).await? {
                if let Some(error) = state.error {
                    return Err(StagingError::DestinationFailed {
                        url: self.url().to_owned(),
                        error,
                    });
                }
                if state.image_size != self.manifest.image_size {
                    return Err(StagingError::SizeMismatch {
                        url: self.url().to_owned(),
                        staged: state.image_size,
                        ours: self.manifest.image_size,
                    });
                }
                if ready(&state) {
                    return Ok(state);
                }
            }
            if started.elapsed() >= self.opts.wait_for {
                return Err(StagingError::NoDestination {
                    url: self.url().to_owned(),
                    what: what.to_owned(),
                    waited: started.elapsed(),
                });
            }
            if told.elapsed() >= Duration::from_secs(10) {
                told = Instant::now();
                tracing::info!(url = %self.url(), waited_s = started.elapsed().as_secs(), "waiting for the destination agent: {what}");
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    /// What the destination published once it has applied every segment
    /// this relay knows of, its tree at the staged region size.
    async fn caught_up(&self) -> Result<DestinationState, StagingError> {
        let last = self.written.lock().await.last;
        self.destination("it to apply every staged segment", |d| {
            d.applied >= last && d.region_size == self.manifest.region_size
        })
        .await
    }

    /// The destination's tree once it has applied every segment this relay
    /// knows of.
    async fn caught_up_tree(&self) -> Result<CheckTree, StagingError> {
        let shape = Shape::new(self.manifest.image_size, self.manifest.region_size)
            .map_err(RpcError::from)?;
        let started = Instant::now();
        loop {
            let state = self.caught_up().await?;
            if let Some((root, tree)) = &*self.tree.lock().await
                && *root == state.root
            {
                return Ok(tree.clone());
            }
            if let Some(bytes) = self.store.get(DESTINATION_TREE).await?
                && let Some(tree) = tree_of(shape, &bytes)
                && super::hex(&tree.root()) == state.root
            {
                *self.tree.lock().await = Some((state.root.clone(), tree.clone()));
                return Ok(tree);
            }
            // The tree and the state were published between our two reads
            // (or the tree is not there yet): look again, for a while.
            if started.elapsed() >= self.opts.wait_for {
                return Err(StagingError::NoDestination {
                    url: self.url().to_owned(),
                    what: "its checksum tree to match the state it published".to_owned(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    /// Stores `segment` as the next one (nothing if it is empty), unless a
    /// newer epoch has taken the fence.
    async fn flush(&self, segment: &mut Segment) -> Result<(), StagingError> {
        if segment.is_empty() {
            return Ok(());
        }
        let mut written = self.written.lock().await;
        let fence = self.store.fence().await?;
        if fence.epoch > segment.epoch {
            return Err(StagingError::Fenced {
                url: self.url().to_owned(),
                epoch: segment.epoch,
                fence: fence.epoch,
            });
        }
        let id = SegmentId {
            seq: written.next_seq,
            epoch: segment.epoch,
        };
        let bytes = segment.encode(id.seq);
        let len = bytes.len() as u64;
        self.store.put(&id.name(), bytes).await?;
        written.next_seq += 1;
        written.last = Some(id);
        self.segments.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        *segment = Segment::new(segment.epoch);
        Ok(())
    }

    /// Takes the fence for `epoch` (refused below the fence's epoch); with
    /// `switch`, also records the export's new mode after the last segment.
    async fn take_fence(&self, epoch: u64, switch: Option<bool>) -> Result<(), StagingError> {
        let mut written = self.written.lock().await;
        let fence = self.store.fence().await?;
        if epoch < fence.epoch {
            return Err(StagingError::Fenced {
                url: self.url().to_owned(),
                epoch,
                fence: fence.epoch,
            });
        }
        let mut next = if epoch == fence.epoch {
            fence
        } else {
            // Taking over: whatever an older source stored up to now stays
            // below this epoch's first segment (and is applied); what it
            // stores from here on is dropped.
            if let Some(newest) = self.store.segments(written.last).await?.last() {
                written.next_seq = written.next_seq.max(newest.seq + 1);
                written.last = written.last.max(Some(*newest));
            }
            FenceRecord {
                epoch,
                from_seq: written.next_seq,
                ..FenceRecord::default()
            }
        };
        if let Some(writable) = switch {
            next.switch = Some(Switch {
                writable,
                after: written.last,
            });
        }
        if next != fence {
            self.store.put_json(FENCE, &next).await?;
        }
        Ok(())
    }
}

/// A staging's id: unique enough to tell an emptied prefix's new staging
/// from the one a destination applied before.
fn new_id() -> String {
    let mut seed = Vec::new();
    seed.extend_from_slice(
        &std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    super::hex(&blake3::hash(&seed).as_bytes()[..12])
}

/// A 32-byte hash from its 64 hex digits (`None` if it is not one).
fn unhex(text: &str) -> Option<Hash> {
    if text.len() != 2 * HASH_LEN {
        return None;
    }
    let mut hash = [0u8; HASH_LEN];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// The tree whose leaves are `bytes` (`None` if they are not `shape`'s).
fn tree_of(shape: Shape, bytes: &Bytes) -> Option<CheckTree> {
    if bytes.len() as u64 != shape.leaf_count() * HASH_LEN as u64 {
        return None;
    }
    let leaves: Vec<Hash> = bytes
        .chunks_exact(HASH_LEN)
        .map(|c| c.try_into().expect("chunks of HASH_LEN"))
        .collect();
    CheckTree::from_leaves(shape, leaves).ok()
}

/// A staging error as the engine sees it. A fence is `FAILED_PRECONDITION`
/// (the engine stops as fenced); the rest must not read as transient,
/// which would have the engine reconnect to this relay forever.
fn status(e: &StagingError) -> Status {
    let text = super::chain(e);
    match e {
        StagingError::Fenced { .. } => Status::failed_precondition(text),
        StagingError::NoDestination { .. } => Status::not_found(text),
        StagingError::SizeMismatch { .. } => Status::invalid_argument(text),
        StagingError::BadRecord { .. } | StagingError::BadSegment { .. } => Status::data_loss(text),
        StagingError::Refused { .. } | StagingError::Open { .. } => Status::permission_denied(text),
        _ => Status::resource_exhausted(text),
    }
}

fn not_staged(what: &str, url: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not available in a migration staged through {url}: the hosts have no link; migrate directly for it"
    ))
}

/// Checks a recorded extent's range: the destination checks everything
/// again (and its checksum) when it applies it; a bad one here is refused
/// before it is stored.
fn check_extent(e: &pb::Extent, size: u64) -> Result<(), Status> {
    let fits = e.length > 0
        && e.length <= MAX_EXTENT_LEN
        && e.offset
            .checked_add(u64::from(e.length))
            .is_some_and(|end| end <= size);
    if fits {
        Ok(())
    } else {
        Err(Status::out_of_range(format!(
            "extent at {} of {} bytes is outside the {size} byte image",
            e.offset, e.length
        )))
    }
}

async fn run_stream(
    inner: Arc<Inner>,
    mut inbound: Streaming<pb::WriteRequest>,
    epoch: u64,
    tx: mpsc::Sender<Result<pb::WriteResponse, Status>>,
) {
    let size = inner.manifest.image_size;
    let mut segment = Segment::new(epoch);
    let ack = |msg| pb::WriteResponse { msg: Some(msg) };
    loop {
        let next = match inbound.message().await {
            Ok(Some(request)) => request.msg,
            Ok(None) => {
                // The stream's end: what it sent is stored.
                if let Err(e) = inner.flush(&mut segment).await {
                    let _ = tx.send(Err(status(&e))).await;
                }
                return;
            }
            // The engine is gone: what it sent since its last barrier was
            // never acknowledged as stored, and it sends it again.
            Err(_) => return,
        };
        let reply = match next {
            Some(write_request::Msg::Extent(e)) => {
                if let Err(s) = check_extent(&e, size) {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                let seq = e.seq;
                segment
                    .push(write_request::Msg::Extent(e))
                    .expect("an extent is data");
                write_response::Msg::Extent(pb::ExtentAck { seq })
            }
            Some(write_request::Msg::Batch(b)) => {
                let Some(seq) = b.extents.last().map(|e| e.seq) else {
                    let _ = tx.send(Err(RpcError::EmptyBatch.into())).await;
                    return;
                };
                if let Some(s) = b.extents.iter().find_map(|e| check_extent(e, size).err()) {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                segment
                    .push(write_request::Msg::Batch(b))
                    .expect("a batch is data");
                write_response::Msg::Extent(pb::ExtentAck { seq })
            }
            Some(write_request::Msg::Barrier(b)) => {
                if let Err(e) = inner.flush(&mut segment).await {
                    let _ = tx.send(Err(status(&e))).await;
                    return;
                }
                write_response::Msg::Barrier(pb::BarrierAck { seq: b.seq })
            }
            Some(write_request::Msg::Open(_)) | None => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "a write stream's later messages are extents, batches or barriers",
                    )))
                    .await;
                return;
            }
        };
        if segment.len() >= SEGMENT_BYTES
            && let Err(e) = inner.flush(&mut segment).await
        {
            let _ = tx.send(Err(status(&e))).await;
            return;
        }
        if tx.send(Ok(ack(reply))).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl replica_server::Replica for Relay {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let inner = &self.inner;
        let state = inner
            .destination("it to start", |_| true)
            .await
            .map_err(|e| status(&e))?;
        let fence = inner.store.fence().await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::InfoResponse {
            image_size: state.image_size,
            epoch: state.epoch.max(fence.epoch),
            export_writable: state.export_writable,
            max_extent_len: state.max_extent_len,
            max_batch_extents: state.max_batch_extents,
            leaf_checksums: state.leaf_checksums,
            postcopy: None,
            nbd: state.nbd.map(|(address, name)| pb::NbdExport {
                address,
                name,
                tls: false,
                advertised_writable: false,
            }),
            promotion: None,
        }))
    }

    type WriteStream = ReceiverStream<Result<pb::WriteResponse, Status>>;

    async fn write(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let inner = &self.inner;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.msg)
            .ok_or(RpcError::NoOpen)?;
        let write_request::Msg::Open(open) = first else {
            return Err(RpcError::NoOpen.into());
        };
        if open.fill {
            return Err(not_staged("post-copy", inner.url()));
        }
        let state = inner
            .destination("it to start", |_| true)
            .await
            .map_err(|e| status(&e))?;
        if open.epoch < state.epoch {
            return Err(RpcError::StaleEpoch {
                epoch: open.epoch,
                highest: state.epoch,
            }
            .into());
        }
        inner
            .take_fence(open.epoch, None)
            .await
            .map_err(|e| status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        let opened = pb::WriteResponse {
            msg: Some(write_response::Msg::Opened(pb::Opened {
                epoch: open.epoch,
                image_size: inner.manifest.image_size,
                max_extent_len: state.max_extent_len,
                max_batch_extents: state.max_batch_extents,
                leaf_checksums: state.leaf_checksums,
            })),
        };
        if tx.send(Ok(opened)).await.is_err() {
            return Err(RpcError::StreamClosed { what: "write" }.into());
        }
        tokio::spawn(run_stream(Arc::clone(inner), inbound, open.epoch, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_checksum_tree(
        &self,
        request: Request<pb::ChecksumTreeRequest>,
    ) -> Result<Response<pb::ChecksumTreeResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        if req.hash_scheme != HASH_SCHEME {
            return Err(RpcError::HashScheme {
                theirs: req.hash_scheme,
                ours: HASH_SCHEME,
            }
            .into());
        }
        if req.region_size != inner.manifest.region_size {
            return Err(Status::invalid_argument(format!(
                "a staged migration compares trees at its region size {}, not {}",
                inner.manifest.region_size, req.region_size
            )));
        }
        // The root alone (the verification inside the pause asks for it):
        // the published state names it; the tree is not fetched.
        let shape = Shape::new(inner.manifest.image_size, inner.manifest.region_size)
            .map_err(RpcError::from)?;
        if req.level + 1 == shape.levels() && matches!(req.indices.as_slice(), [] | [0]) {
            let state = inner.caught_up().await.map_err(|e| status(&e))?;
            if let Some(root) = unhex(&state.root) {
                return Ok(Response::new(pb::ChecksumTreeResponse {
                    image_size: shape.image_size(),
                    region_size: shape.region_size(),
                    leaf_count: shape.leaf_count(),
                    levels: shape.levels(),
                    level: req.level,
                    hashes: vec![Bytes::copy_from_slice(&root)],
                    hash_scheme: HASH_SCHEME,
                }));
            }
        }
        let tree = inner.caught_up_tree().await.map_err(|e| status(&e))?;
        Ok(Response::new(crate::rpc::server::tree_answer(&tree, &req)?))
    }

    async fn set_export_writable(
        &self,
        request: Request<pb::SetExportWritableRequest>,
    ) -> Result<Response<pb::SetExportWritableResponse>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        if req.postcopy.is_some() {
            return Err(not_staged("a post-copy switch", inner.url()));
        }
        inner
            .take_fence(req.epoch, Some(req.writable))
            .await
            .map_err(|e| status(&e))?;
        let waited = inner
            .destination(
                if req.writable {
                    "it to apply the last segment and switch"
                } else {
                    "it to make its export read-only"
                },
                |d| d.epoch >= req.epoch && d.export_writable == req.writable,
            )
            .await;
        let state = match waited {
            Ok(state) => state,
            Err(e) if req.writable => {
                // The source gives up and resumes its workload: the switch
                // must not happen later on its own (two primaries). A newer
                // epoch asks for the export read-only instead; if the
                // destination switched meanwhile, it switches back.
                let revoked = inner.take_fence(req.epoch + 1, Some(false)).await;
                tracing::error!(error = %e, revoked = revoked.is_ok(), "the staged switch did not complete; revoked it with a newer epoch");
                return Err(status(&e));
            }
            Err(e) => return Err(status(&e)),
        };
        Ok(Response::new(pb::SetExportWritableResponse {
            epoch: state.epoch,
            export_writable: state.export_writable,
            missing_bytes: 0,
        }))
    }

    type ReadStream = ReceiverStream<Result<pb::ReadResponse, Status>>;

    async fn read(
        &self,
        _request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        Err(not_staged("reading the destination back", self.inner.url()))
    }

    type DemandsStream = ReceiverStream<Result<pb::Demand, Status>>;

    async fn demands(
        &self,
        _request: Request<pb::DemandsRequest>,
    ) -> Result<Response<Self::DemandsStream>, Status> {
        Err(not_staged("post-copy", self.inner.url()))
    }

    async fn heartbeat(
        &self,
        _request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Err(not_staged("a standby's heartbeat", self.inner.url()))
    }

    async fn promote(
        &self,
        _request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::Promotion>, Status> {
        Err(not_staged("failover", self.inner.url()))
    }

    async fn demote(
        &self,
        _request: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::DemoteResponse>, Status> {
        Err(not_staged("failback", self.inner.url()))
    }
}

#[cfg(test)]
mod tests {
    use super::unhex;

    #[test]
    fn a_published_root_reads_back_and_anything_else_is_none() {
        let hash = blake3::hash(b"tern");
        assert_eq!(
            unhex(&super::super::hex(hash.as_bytes())),
            Some(*hash.as_bytes())
        );
        assert_eq!(unhex(""), None);
        assert_eq!(unhex(&"zz".repeat(32)), None);
        assert_eq!(unhex(&"ab".repeat(31)), None);
    }
}
