//! The destination's side of a staged migration: segments replayed, in
//! order, into the agent's own replica service (through an in-process
//! channel, so its epochs, checksum checks, `io_uring` writes and checksum
//! tree are the ones a direct migration uses), the fence's switch made, and
//! the agent's state and tree published back to the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use super::{
    DESTINATION, DESTINATION_TREE, DestinationState, MANIFEST, Manifest, Segment, SegmentId,
    StagingError, StagingStore,
};
use crate::checktree::{HASH_LEN, Shape};
use crate::history::StoreOptions;
use crate::rpc::{ExtentWriter, ReplicaClient, ReplicaService, RpcError};

/// How an applier reaches its store.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub url: String,
    pub store: StoreOptions,
    /// Keep retrying a failing store this long before giving up.
    pub retry_for: Duration,
    /// How often to look for new segments and a switch.
    pub poll: Duration,
}

impl ApplyOptions {
    pub fn new(url: impl Into<String>) -> ApplyOptions {
        ApplyOptions {
            url: url.into(),
            store: StoreOptions::default(),
            retry_for: Duration::from_mins(2),
            poll: Duration::from_millis(100),
        }
    }
}

/// What this agent applied from which store, kept beside its image so that
/// a restarted agent goes on where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    url: String,
    applied: Option<SegmentId>,
    dropped: u64,
}

/// Applies a staging store's segments to the agent's image.
pub struct Applier {
    store: StagingStore,
    client: ReplicaClient,
    record_path: PathBuf,
    record: Record,
    poll: Duration,
    /// The write stream and its epoch.
    writer: Option<(u64, ExtentWriter)>,
    /// What was last published (to publish again only on a change).
    published: Option<DestinationState>,
}

impl Applier {
    /// Serves `service` to the applier inside this process and reads what
    /// was applied to `image` before (`<image>.tern-staged`).
    pub fn new(
        opts: &ApplyOptions,
        service: ReplicaService,
        image: &Path,
        shutdown: CancellationToken,
    ) -> Result<Applier, StagingError> {
        let store = StagingStore::open(&opts.url, &opts.store, opts.retry_for)?;
        let channel =
            crate::rpc::local::serve_in_process(Routes::new(service.into_server()), shutdown);
        let mut name = image.as_os_str().to_owned();
        name.push(".tern-staged");
        let record_path = PathBuf::from(name);
        let record = match std::fs::read(&record_path) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.url == opts.url => r,
                Ok(r) => {
                    tracing::info!(was = %r.url, now = %opts.url, "a new staging store: applying it from its first segment");
                    Record::default()
                }
                Err(e) => {
                    tracing::warn!(path = %record_path.display(), error = %e, "the applied-segment record is damaged: applying from the first segment (applying again is harmless)");
                    Record::default()
                }
            },
            Err(_) => Record::default(),
        };
        Ok(Applier {
            store,
            client: ReplicaClient::from_channel(channel),
            record_path,
            record: Record {
                url: opts.url.clone(),
                ..record
            },
            poll: opts.poll,
            writer: None,
            published: None,
        })
    }

    /// Applies until `cancel`. A failure is published (the source's relay
    /// reports it) and returned.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), StagingError> {
        tracing::info!(url = %self.store.url(), applied = ?self.record.applied, "applying a staged migration");
        loop {
            if let Err(e) = self.step().await {
                let text = super::chain(&e);
                tracing::error!(url = %self.store.url(), error = %text, "applying the staged migration stopped");
                let mut state = self.published.clone().unwrap_or_default();
                state.error = Some(text);
                state.updated_unix_ms = crate::rpc::failover::unix_ms_now();
                // Best effort: the store may be what failed.
                let _ = self.store.put_json(DESTINATION, &state).await;
                return Err(e);
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        if let Some((_, writer)) = self.writer.take() {
            writer.finish().await?;
        }
        Ok(())
    }

    /// One look: apply what is new, make the fence's switch, publish.
    async fn step(&mut self) -> Result<(), StagingError> {
        let manifest = self.store.get_json::<Manifest>(MANIFEST).await?;
        let info = self.client.info().await?;
        if let Some(m) = manifest
            && m.image_size != info.image_size
        {
            return Err(StagingError::SizeMismatch {
                url: self.store.url().to_owned(),
                staged: m.image_size,
                ours: info.image_size,
            });
        }
        let fence = self.store.fence().await?;
        let new = self.store.segments(self.record.applied).await?;
        let mut last_publish = Instant::now();
        for id in new {
            if id.epoch < fence.epoch && id.seq >= fence.from_seq {
                // Written by a source the fence had already replaced.
                tracing::warn!(segment = %id.name(), fence = fence.epoch, "dropping a segment of a fenced epoch");
                self.record.dropped += 1;
            } else {
                self.apply(id).await?;
            }
            self.record.applied = Some(id);
            self.save()?;
            // A long backlog: let the source see progress now and then.
            if last_publish.elapsed() >= Duration::from_secs(5) {
                last_publish = Instant::now();
                self.publish(manifest).await?;
            }
        }
        let caught_up = fence
            .after_seq
            .is_some_and(|after| self.record.applied.is_some_and(|a| a.seq >= after));
        if fence.epoch > 0 && caught_up {
            let info = self.client.info().await?;
            if fence.epoch > info.epoch || info.export_writable != fence.writable {
                // Our own stream would be fenced by the switch's epoch: close it first.
                if let Some((_, writer)) = self.writer.take() {
                    writer.finish().await?;
                }
                self.client
                    .set_export_writable(fence.epoch, fence.writable)
                    .await?;
                tracing::info!(
                    epoch = fence.epoch,
                    writable = fence.writable,
                    "the staged migration's switch is made"
                );
            }
        }
        self.publish(manifest).await
    }

    /// Replays one segment and waits until it is durable.
    async fn apply(&mut self, id: SegmentId) -> Result<(), StagingError> {
        let name = id.name();
        let Some(bytes) = self.store.get(&name).await? else {
            return Err(StagingError::BadSegment {
                url: self.store.url().to_owned(),
                object: name,
                source: super::SegmentError::Short(0),
            });
        };
        let segment = Segment::decode(&bytes, id.seq, id.epoch).map_err(|source| {
            StagingError::BadSegment {
                url: self.store.url().to_owned(),
                object: name.clone(),
                source,
            }
        })?;
        let writer = match self.writer.take() {
            Some((epoch, writer)) if epoch == id.epoch => writer,
            other => {
                if let Some((_, old)) = other {
                    old.finish().await?;
                }
                match self.client.open_writer(id.epoch, 16).await {
                    Ok(w) => w,
                    Err(e) if is_stale(&e) => {
                        tracing::warn!(segment = %name, error = %e, "dropping a segment of an epoch the destination has passed");
                        self.record.dropped += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let mut writer = writer;
        for msg in segment.messages {
            writer.send_recorded(msg).await?;
        }
        writer.barrier().await?;
        self.writer = Some((id.epoch, writer));
        Ok(())
    }

    fn save(&self) -> Result<(), StagingError> {
        let bytes = serde_json::to_vec(&self.record).expect("the record serializes");
        let tmp = self.record_path.with_extension("tern-staged.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, &bytes)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.record_path)
        };
        write().map_err(|source| StagingError::Record {
            path: self.record_path.clone(),
            source,
        })
    }

    /// Publishes the agent's state, and its tree at the manifest's region
    /// size, when either changed (the tree first: a state names its root).
    async fn publish(&mut self, manifest: Option<Manifest>) -> Result<(), StagingError> {
        let info = self.client.info().await?;
        let mut state = DestinationState {
            image_size: info.image_size,
            epoch: info.epoch,
            export_writable: info.export_writable,
            max_extent_len: info.max_extent_len,
            max_batch_extents: info.max_batch_extents,
            leaf_checksums: info.leaf_checksums,
            applied: self.record.applied,
            dropped: self.record.dropped,
            region_size: 0,
            root: String::new(),
            updated_unix_ms: 0,
            nbd: info.nbd.map(|n| (n.address, n.name)),
            error: None,
        };
        if let Some(m) = manifest {
            state.region_size = m.region_size;
        }
        // Unchanged (the root aside, which follows from what was applied): nothing to do.
        if self.published.as_ref().is_some_and(|p| {
            DestinationState {
                root: String::new(),
                ..p.clone()
            } == state
        }) {
            return Ok(());
        }
        let tree = match manifest {
            Some(m) => {
                let shape = Shape::new(m.image_size, m.region_size).map_err(RpcError::from)?;
                let all: Vec<u64> = (0..shape.leaf_count()).collect();
                let leaves = self.client.nodes_of(shape, 0, &all).await?;
                let root = self
                    .client
                    .nodes_of(shape, shape.levels() - 1, &[0])
                    .await?;
                state.root = super::hex(&root[0]);
                Some(leaves)
            }
            None => None,
        };
        if let Some(leaves) = tree {
            let mut bytes = Vec::with_capacity(leaves.len() * HASH_LEN);
            for leaf in &leaves {
                bytes.extend_from_slice(leaf);
            }
            self.store.put(DESTINATION_TREE, Bytes::from(bytes)).await?;
        }
        let compared = state.clone();
        state.updated_unix_ms = crate::rpc::failover::unix_ms_now();
        self.store.put_json(DESTINATION, &state).await?;
        // Compared without the time stamp, which changes on every publish.
        self.published = Some(DestinationState {
            updated_unix_ms: 0,
            ..compared
        });
        Ok(())
    }
}

fn is_stale(e: &RpcError) -> bool {
    matches!(e, RpcError::StaleEpoch { .. } | RpcError::Fenced { .. })
        || e.code() == Some(tonic::Code::FailedPrecondition)
}
