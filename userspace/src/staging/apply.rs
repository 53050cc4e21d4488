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
use crate::checktree::{CheckTree, HASH_LEN, Shape};
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
            store: StoreOptions {
                fsync: true,
                ..StoreOptions::default()
            },
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
    /// The staging's id (`staging.json`): a prefix emptied and staged
    /// into again is a new staging, applied from its first segment.
    #[serde(default)]
    staging_id: String,
    applied: Option<SegmentId>,
    dropped: u64,
    #[serde(default)]
    damaged: u64,
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
    /// The root of the tree last stored (not stored again unchanged).
    tree_root: Option<String>,
    /// When a segment was last applied or a switch made.
    active: Instant,
}

/// How long a failed step waits before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// While segments arrive (a migration running, its cutover near), the
/// applier looks this often: each look at the cutover is downtime. Idle,
/// it looks every `ApplyOptions::poll` (fewer store requests).
const ACTIVE_POLL: Duration = Duration::from_millis(20);
/// How long after the last segment or switch the applier stays active.
const ACTIVE_FOR: Duration = Duration::from_secs(10);

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
            tree_root: None,
            active: Instant::now(),
        })
    }

    /// Applies until `cancel`. A failure never stops the agent (its export
    /// may be serving the workload by then): it is logged, published (the
    /// source's relay reports it, unless the store itself is what failed)
    /// and the step tried again.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), StagingError> {
        tracing::info!(url = %self.store.url(), applied = ?self.record.applied, "applying a staged migration");
        loop {
            let wait = match self.step().await {
                Ok(()) if self.active.elapsed() < ACTIVE_FOR => ACTIVE_POLL,
                Ok(()) => self.poll,
                // Stopping: the in-process service went away under the step.
                Err(_) if cancel.is_cancelled() => break,
                Err(e) => {
                    let text = super::chain(&e);
                    tracing::error!(url = %self.store.url(), error = %text, "applying the staged migration failed; trying again");
                    if !matches!(e, StagingError::Unreachable { .. }) {
                        self.publish_error(text).await;
                    }
                    RETRY_AFTER
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some((_, writer)) = self.writer.take() {
            // Best effort: the service may be stopping too; what was not
            // flushed is applied again by the next run (the record says so).
            let _ = writer.finish().await;
        }
        Ok(())
    }

    /// Says why applying failed; the next published state clears it.
    async fn publish_error(&mut self, text: String) {
        let mut state = self.published.take().unwrap_or_default();
        state.error = Some(text);
        state.updated_unix_ms = crate::rpc::failover::unix_ms_now();
        // Best effort: the store may be failing too.
        let _ = self.store.put_json(DESTINATION, &state).await;
    }

    /// One look: apply what is new, make the fence's switch, publish.
    async fn step(&mut self) -> Result<(), StagingError> {
        let manifest = self.store.get_json::<Manifest>(MANIFEST).await?;
        let info = self.client.info().await?;
        if let Some(p) = &info.promotion {
            // A failover made this replica the primary: nothing staged may
            // land on it (its fence would refuse it anyway).
            return Err(StagingError::Promoted {
                url: self.store.url().to_owned(),
                epoch: p.epoch,
            });
        }
        if let Some(m) = &manifest {
            if m.image_size != info.image_size {
                return Err(StagingError::SizeMismatch {
                    url: self.store.url().to_owned(),
                    staged: m.image_size,
                    ours: info.image_size,
                });
            }
            if m.id != self.record.staging_id {
                if self.record.applied.is_some() {
                    tracing::info!(url = %self.store.url(), "a new staging in this store: applying it from its first segment");
                }
                self.record = Record {
                    url: self.record.url.clone(),
                    staging_id: m.id.clone(),
                    ..Record::default()
                };
                self.tree_root = None;
            }
        }
        let new = self.store.segments(self.record.applied).await?;
        // Read after listing: a segment a fenced source stored before this
        // fence is dropped by it, not applied.
        let fence = self.store.fence().await?;
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
            self.active = Instant::now();
            // A long backlog: let the source see progress now and then.
            if last_publish.elapsed() >= Duration::from_secs(5) {
                last_publish = Instant::now();
                self.publish(manifest.as_ref()).await?;
            }
        }
        // The switch, once what was staged before it is applied.
        if let Some(switch) = fence.switch
            && switch.after <= self.record.applied
        {
            let info = self.client.info().await?;
            if fence.epoch > info.epoch || info.export_writable != switch.writable {
                // Our own stream would be fenced by the switch's epoch: close it first.
                if let Some((_, writer)) = self.writer.take() {
                    writer.finish().await?;
                }
                self.client
                    .set_export_writable(fence.epoch, switch.writable)
                    .await?;
                tracing::info!(
                    epoch = fence.epoch,
                    writable = switch.writable,
                    "the staged migration's switch is made"
                );
                self.active = Instant::now();
            }
        }
        self.publish(manifest.as_ref()).await
    }

    /// Replays one segment and waits until it is durable.
    async fn apply(&mut self, id: SegmentId) -> Result<(), StagingError> {
        let name = id.name();
        let decoded = match self.store.get(&name).await? {
            Some(bytes) => Segment::decode(&bytes, id.seq, id.epoch),
            // Listed, then gone: someone deleted it.
            None => Err(super::SegmentError::Short(0)),
        };
        let segment = match decoded {
            Ok(segment) => segment,
            Err(e) => {
                // Skipped and counted: its regions differ from the source's,
                // which the source's verification finds and sends again.
                tracing::error!(segment = %name, error = %e, "a damaged segment is skipped; the source's checksum comparison resends what it held");
                self.record.damaged += 1;
                return Ok(());
            }
        };
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
    async fn publish(&mut self, manifest: Option<&Manifest>) -> Result<(), StagingError> {
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
            damaged: self.record.damaged,
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
                let mut bytes = Vec::with_capacity(leaves.len() * HASH_LEN);
                for leaf in &leaves {
                    bytes.extend_from_slice(leaf);
                }
                // The root of exactly these leaves: what the relay checks them by.
                let tree = CheckTree::from_leaves(shape, leaves).map_err(RpcError::from)?;
                state.root = super::hex(&tree.root());
                Some(bytes)
            }
            None => None,
        };
        if let Some(bytes) = tree
            && self.tree_root.as_ref() != Some(&state.root)
        {
            self.store.put(DESTINATION_TREE, Bytes::from(bytes)).await?;
            self.tree_root = Some(state.root.clone());
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
