//! Replication from the source: dirty tracking from the eBPF tracer
//! (`tracker`) and the engine that streams dirty extents to the destination
//! (`engine`). `cutover` drives both to a switch-over.

mod compression;
mod delta;
pub mod engine;
mod limiter;
pub mod local_tree;
mod pipeline;
pub mod stats;
pub mod tracker;
pub mod units;

use std::sync::Arc;
use std::time::Duration;

pub use compression::CompressWhen;
pub use engine::{Peer, ReplicateOptions, Replicator, SendOrder};
pub use local_tree::{LocalTree, default_region_size, zero_tree};
pub use stats::{Round, Stats, StatsSnapshot};
pub use tracker::{ObserverFactory, Tracker, TrackerCounts};
pub use units::UnitZone;

use crate::checktree::CheckTreeError;
use crate::dirty::DirtyError;
use crate::history::HistoryError;
use crate::rpc::RpcError;
use crate::trace::session::SessionError;

/// Errors of the source side of replication.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The destination image is not the source's size.
    #[error(
        "the destination image is {dest_size} bytes but the source is {source_size}; start the destination agent with --size {source_size}"
    )]
    SizeMismatch { source_size: u64, dest_size: u64 },
    /// The destination's replica was promoted (failover): this source must
    /// not write into it, and its own disk is left as it is.
    #[error(
        "the destination's replica was promoted to primary at epoch {} ({}{}): it may hold writes this source lacks, so this source stops and leaves its own disk untouched; bring the data home with `tern failback`",
        .promotion.epoch,
        .promotion.reason,
        .promotion.rpo_ms().map(|ms| format!(", recovery point {ms} ms before the source was last heard")).unwrap_or_default()
    )]
    Promoted {
        promotion: Box<crate::rpc::Promotion>,
    },
    /// A newer epoch owns the destination: this source was fenced.
    #[error(
        "the destination refused epoch {epoch}: {source}; another writer (a newer migration or a cutover) owns it now"
    )]
    Fenced {
        epoch: u64,
        #[source]
        source: Box<RpcError>,
    },
    /// The destination stayed unreachable.
    #[error(
        "lost the destination at {addr} and could not reconnect within {waited:?}: {source}; run the migration again to resume it (only what differs is sent)"
    )]
    PeerLost {
        addr: String,
        waited: Duration,
        #[source]
        source: Box<RpcError>,
    },
    /// Reading the source failed.
    #[error("cannot read the source at offset {offset} ({len} bytes): {source}")]
    ReadSource {
        offset: u64,
        len: u32,
        #[source]
        source: Box<crate::image::ImageError>,
    },
    /// The tracer failed or could not start. Shared: the tracker's thread
    /// returns it and every `sync` that finds the thread stopped reports it.
    #[error("dirty tracking: {0}")]
    Tracker(#[source] Arc<SessionError>),
    /// The history recorder could not start with the tracker.
    #[error("dirty tracking: {0}")]
    TrackerHistory(#[source] Box<HistoryError>),
    /// The tracker's thread ended with no error to tell (it panicked).
    #[error("dirty tracking: {0}")]
    TrackerThread(&'static str),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The tracker's wake-up descriptor (an eventfd) could not be made.
    #[error("cannot create the tracker's eventfd: {0}")]
    Wake(#[source] std::io::Error),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    CheckTree(#[from] CheckTreeError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}
