//! A migration staged through object storage: no link between the hosts,
//! only a bucket (or a directory) both reach, as AWS MGN stages through S3.
//!
//! The source runs its usual migration against a [`relay`]: the replica
//! protocol served inside the source process, which records each write
//! stream into *segments* (objects of up to [`SEGMENT_BYTES`] of the
//! stream's own messages: extents zero-skipped and compressed by the
//! engine, each with its checksum, the object with one over all of it) and
//! answers the engine's questions (the destination's size, epoch, checksum
//! tree, the switch) from what the destination publishes in the store. The
//! destination agent (`--from URL`) runs an [`apply`]er that replays the
//! segments, in order, into its own replica service, so that its epochs,
//! checksums and tree work as for a direct migration, and publishes its
//! state and tree after each step.
//!
//! Objects under the URL's prefix:
//! - `staging.json`: the image size and the tree's region size ([`Manifest`]);
//! - `segments/SEQ-EPOCH`: the data, applied in order of `SEQ` (then `EPOCH`);
//! - `fence.json`: the source's epoch, from which segment it holds, and the
//!   switch ([`FenceRecord`]); a segment of an older epoch from that segment
//!   on is not applied, and a source that finds a newer epoch stops;
//! - `destination.json` and `destination.tree`: what the destination has
//!   applied, its epoch and export, and its checksum tree ([`DestinationState`]).

pub mod apply;
pub mod relay;
mod segment;

use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::history::{HistoryError, HistoryStore, StoreOptions};

pub use apply::{Applier, ApplyOptions};
pub use relay::{Relay, RelayOptions};
pub use segment::{SEGMENT_BYTES, Segment, SegmentError};

/// The manifest's object.
pub const MANIFEST: &str = "staging.json";
/// The fence's object.
pub const FENCE: &str = "fence.json";
/// What the destination publishes.
pub const DESTINATION: &str = "destination.json";
/// The destination's checksum-tree leaves (32 bytes each, in order).
pub const DESTINATION_TREE: &str = "destination.tree";
/// The directory of segments.
pub const SEGMENTS: &str = "segments";

/// Errors of a staged migration.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("opening the staging store {url}")]
    Open {
        url: String,
        #[source]
        source: Box<HistoryError>,
    },
    #[error("the staging store {url} failed on {object} for {waited:?}")]
    Unreachable {
        url: String,
        object: String,
        waited: Duration,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("the staging store {url} refused {object}")]
    Refused {
        url: String,
        object: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("{object} in the staging store {url} is not valid")]
    BadRecord {
        url: String,
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("segment {object} in the staging store {url} is damaged")]
    BadSegment {
        url: String,
        object: String,
        #[source]
        source: SegmentError,
    },
    #[error(
        "the staging store {url} is for a {staged} byte image, but this one has {ours} bytes; stage into another prefix"
    )]
    SizeMismatch { url: String, staged: u64, ours: u64 },
    #[error(
        "waited {waited:?} for {what}: is `tern agent --role destination --from {url}` running?"
    )]
    NoDestination {
        url: String,
        what: String,
        waited: Duration,
    },
    #[error("the destination agent stopped applying {url}: {error}")]
    DestinationFailed { url: String, error: String },
    #[error("the staging store {url} is fenced by epoch {fence}, newer than this source's {epoch}")]
    Fenced { url: String, epoch: u64, fence: u64 },
    #[error(
        "the destination was promoted (failover, epoch {epoch}): it takes nothing staged in {url} any more"
    )]
    Promoted { url: String, epoch: u64 },
    #[error(transparent)]
    Rpc(#[from] crate::rpc::RpcError),
    #[error("writing the applied-segment record {path}")]
    Record {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a staging prefix holds: written by the source when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Made when the staging starts: an emptied prefix staged into again
    /// is a new staging, whatever a destination applied before.
    pub id: String,
    pub image_size: u64,
    /// The checksum tree's region size both sides compare at.
    pub region_size: u64,
}

/// The writer's fence: the highest epoch a source took, from which segment
/// it writes, and whether (after which segment) the destination switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub epoch: u64,
    /// The first segment this epoch may have written: an older epoch's
    /// segment from here on was written after the takeover and is dropped.
    pub from_seq: u64,
    /// The export's mode to set: writable (the switch) or read-only (a rollback).
    pub switch: Option<Switch>,
}

/// A change of the destination's export, made after the segments before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub writable: bool,
    /// Made once every segment up to this one is applied (`None`: none was written).
    pub after: Option<SegmentId>,
}

/// A segment's place in the order of application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentId {
    pub seq: u64,
    pub epoch: u64,
}

impl SegmentId {
    /// The object's name below the prefix.
    pub fn name(self) -> String {
        format!("{SEGMENTS}/{:020}-{:020}", self.seq, self.epoch)
    }

    /// The id a segment's object name carries (`None`: not a segment).
    pub fn parse(name: &str) -> Option<SegmentId> {
        let (seq, epoch) = name.split_once('-')?;
        if seq.len() != 20 || epoch.len() != 20 {
            return None;
        }
        Some(SegmentId {
            seq: seq.parse().ok()?,
            epoch: epoch.parse().ok()?,
        })
    }
}

/// What the destination agent publishes after each step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationState {
    pub image_size: u64,
    pub epoch: u64,
    pub export_writable: bool,
    pub max_extent_len: u32,
    pub max_batch_extents: u32,
    pub leaf_checksums: bool,
    /// The last segment applied (or dropped as stale), in order.
    pub applied: Option<SegmentId>,
    /// Segments dropped: of an epoch the fence had moved past.
    pub dropped: u64,
    /// Segments skipped as damaged (their regions are found different by
    /// the source's verification and sent again).
    pub damaged: u64,
    /// Region size and root (hex) of `destination.tree`.
    pub region_size: u64,
    pub root: String,
    pub updated_unix_ms: u64,
    /// The agent's NBD export (address, name), if it serves one.
    pub nbd: Option<(String, String)>,
    /// Why applying stopped, if it did.
    pub error: Option<String>,
}

/// A staging prefix, opened: small JSON records and segments, each call
/// retried on a failing store until `retry_for` has passed.
#[derive(Debug, Clone)]
pub struct StagingStore {
    store: HistoryStore,
    retry_for: Duration,
}

impl StagingStore {
    /// Opens `url` (a directory, `file:///dir` or `s3://bucket/prefix`).
    pub fn open(
        url: &str,
        opts: &StoreOptions,
        retry_for: Duration,
    ) -> Result<StagingStore, StagingError> {
        let store = HistoryStore::open_with(url, opts).map_err(|e| StagingError::Open {
            url: url.to_owned(),
            source: Box::new(e),
        })?;
        Ok(StagingStore { store, retry_for })
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    fn path(&self, name: &str) -> object_store::path::Path {
        self.store.path(name.split('/'))
    }

    /// Runs `call` until it succeeds, fails for good, or the store has
    /// failed for `retry_for` (a store restarting, a network blip).
    async fn retried<T, F, Fut>(&self, object: &str, mut call: F) -> Result<T, StagingError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match call().await {
                Ok(v) => {
                    if warned {
                        // A warning too: an operator who saw the failure sees its end.
                        tracing::warn!(url = %self.url(), object, failed_s = started.elapsed().as_secs_f64(), "the staging store answers again");
                    }
                    return Ok(v);
                }
                Err(e @ object_store::Error::Generic { .. }) => {
                    if started.elapsed() >= self.retry_for {
                        return Err(StagingError::Unreachable {
                            url: self.url().to_owned(),
                            object: object.to_owned(),
                            waited: started.elapsed(),
                            source: Box::new(e),
                        });
                    }
                    if !warned {
                        warned = true;
                        tracing::warn!(url = %self.url(), object, error = %e, "the staging store failed; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(StagingError::Refused {
                        url: self.url().to_owned(),
                        object: object.to_owned(),
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    /// Stores `bytes` as `name` (whole: a reader never sees a part of it).
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StagingError> {
        let path = self.path(name);
        let store = &self.store.store;
        self.retried(name, || {
            let payload = PutPayload::from(bytes.clone());
            let path = path.clone();
            async move { store.put(&path, payload).await.map(|_| ()) }
        })
        .await
    }

    /// The object `name`, or `None` if there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Bytes>, StagingError> {
        let path = self.path(name);
        let store = &self.store.store;
        let got = self
            .retried(name, || {
                let path = path.clone();
                async move {
                    match store.get(&path).await {
                        Ok(r) => r.bytes().await.map(Some),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        Ok(got)
    }

    pub async fn put_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StagingError> {
        let bytes = serde_json::to_vec_pretty(value).expect("staging records serialize");
        self.put(name, Bytes::from(bytes)).await
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StagingError> {
        let Some(bytes) = self.get(name).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StagingError::BadRecord {
                url: self.url().to_owned(),
                object: name.to_owned(),
                source,
            })
    }

    /// Every segment in the store after `after` (all with `None`), in the
    /// order of application. Listed from `after` on (S3's `start-after`),
    /// so a poll costs what is new, not the whole migration's segments.
    pub async fn segments(&self, after: Option<SegmentId>) -> Result<Vec<SegmentId>, StagingError> {
        use futures::TryStreamExt;
        let dir = self.path(SEGMENTS);
        let offset = after.map(|id| self.path(&id.name()));
        let store = &self.store.store;
        let listed: Vec<object_store::ObjectMeta> = self
            .retried(SEGMENTS, || {
                let dir = dir.clone();
                let offset = offset.clone();
                async move {
                    match &offset {
                        Some(offset) => {
                            store
                                .list_with_offset(Some(&dir), offset)
                                .try_collect()
                                .await
                        }
                        None => store.list(Some(&dir)).try_collect().await,
                    }
                }
            })
            .await?;
        let mut ids: Vec<SegmentId> = listed
            .iter()
            .filter_map(|meta| {
                let parts = self.store.relative(&meta.location)?;
                SegmentId::parse(parts.last()?)
            })
            .collect();
        ids.retain(|id| Some(*id) > after);
        ids.sort_unstable();
        Ok(ids)
    }

    pub(crate) async fn fence(&self) -> Result<FenceRecord, StagingError> {
        Ok(self.get_json(FENCE).await?.unwrap_or_default())
    }
}

/// An error with its causes, for a status message (which carries no source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn hex(hash: &[u8]) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_in_the_order_of_application_and_parse_back() {
        let ids = [
            SegmentId { seq: 2, epoch: 1 },
            SegmentId { seq: 10, epoch: 1 },
            SegmentId { seq: 10, epoch: 3 },
        ];
        let mut names: Vec<String> = ids.iter().map(|id| id.name()).collect();
        names.sort();
        let back: Vec<SegmentId> = names
            .iter()
            .map(|n| SegmentId::parse(n.rsplit('/').next().expect("a name")).expect("parses"))
            .collect();
        assert_eq!(back, ids);
        assert_eq!(SegmentId::parse("12-3"), None);
        assert_eq!(SegmentId::parse("garbage"), None);
    }
}
