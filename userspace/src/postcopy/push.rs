//! The source's side of post-copy: the demand server answers the units the
//! destination waits for, on a fill stream of its own, so that a demand
//! never queues behind the background push (which the replicator sends on
//! its own fill stream, in the predictor's order: see
//! [`crate::replicate::Replicator::enter_postcopy`]).
//!
//! The source keeps every unit until the destination holds it: nothing
//! here changes the source, and a unit whose fill was lost is demanded
//! again on the next demand stream (the destination requeues what it still
//! misses), or pushed again by the replicator's reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dirty::DirtyMap;
use crate::image::{Image, ImageError};
use crate::replicate::Peer;
use crate::rpc::{EncodedExtent, ReplicaClient, RpcError};

use super::PresenceSnapshot;
use super::presence::DEMAND_WINDOW;

/// Fill messages of the demand stream in flight (each one demand's ranges).
const WINDOW: usize = 8;

/// Errors of the demand server.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The destination refused or broke a call for good.
    #[error("post-copy demands: {0}")]
    Rpc(#[source] RpcError),
    /// Reading the source failed.
    #[error(
        "cannot read the source at offset {offset} ({len} bytes) for a post-copy demand: {source}"
    )]
    Read {
        offset: u64,
        len: u32,
        #[source]
        source: ImageError,
    },
    /// The destination stayed unreachable.
    #[error(
        "lost the destination at {addr} during post-copy and could not reconnect within {waited:?}: {source}; its reads of units still on the source wait, and fail after their timeout, never with old data: run `tern migrate` again once it is back"
    )]
    Lost {
        addr: String,
        waited: Duration,
        #[source]
        source: RpcError,
    },
}

impl From<RpcError> for PushError {
    fn from(e: RpcError) -> Self {
        PushError::Rpc(e)
    }
}

/// What a post-copy did after the switch.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PushReport {
    /// Missing at the switch.
    pub missing_bytes: u64,
    /// Sent by the background push (what the destination held by then was dropped there).
    pub pushed_bytes: u64,
    /// Ranges the destination demanded and the bytes sent for them.
    pub demand_ranges: u64,
    pub demand_bytes: u64,
    /// Reconnects of the demand stream.
    pub demand_reconnects: u64,
    /// From the switch until the destination held every unit.
    pub push_seconds: f64,
    /// The destination's figures at the end: waits (their latency), units
    /// it wrote itself.
    pub destination: PresenceSnapshot,
}

/// Counters of the demand server, read while it runs.
#[derive(Debug, Default)]
pub struct DemandCounts {
    pub ranges: AtomicU64,
    pub bytes: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The running demand server of one post-copy.
pub struct DemandServer {
    task: JoinHandle<Result<(), PushError>>,
    served: Arc<DirtyMap>,
    cancel: CancellationToken,
    counts: Arc<DemandCounts>,
}

impl DemandServer {
    /// Starts answering the demands of the destination at `peer`, fenced
    /// by `epoch`, with data of `source`; a unit answered is cleared from
    /// `send` and marked in `served` (the push need not send it again).
    /// `connected`: a connection made beforehand (outside the pause: a TLS
    /// handshake costs CPU the workload's hand-over needs), used first.
    pub fn start(
        peer: Peer,
        connected: Option<ReplicaClient>,
        source: Image,
        epoch: u64,
        send: Arc<DirtyMap>,
        served: Arc<DirtyMap>,
        reconnect_for: Duration,
    ) -> DemandServer {
        let cancel = CancellationToken::new();
        let counts = Arc::new(DemandCounts::default());
        let worker = Server {
            peer,
            source,
            epoch,
            send,
            served: Arc::clone(&served),
            connected: std::sync::Mutex::new(connected),
            counts: Arc::clone(&counts),
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(async move { worker.run(reconnect_for).await });
        DemandServer {
            task,
            served,
            cancel,
            counts,
        }
    }

    /// The units it answered (the push skips them).
    pub fn served(&self) -> &DirtyMap {
        &self.served
    }

    pub fn counts(&self) -> &DemandCounts {
        &self.counts
    }

    /// Whether it ended (nothing missing any more, or a failure to collect).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the end: the destination's demand stream ends once it
    /// misses nothing.
    pub async fn join(self) -> Result<(), PushError> {
        let _cancel_on_drop = self.cancel.drop_guard();
        self.task
            .await
            .map_err(|e| PushError::Rpc(RpcError::from(e)))?
    }

    /// Stops it (a failed push, a rollback).
    pub async fn stop(self) -> Result<(), PushError> {
        self.cancel.cancel();
        self.task
            .await
            .map_err(|e| PushError::Rpc(RpcError::from(e)))?
    }
}

struct Server {
    peer: Peer,
    source: Image,
    epoch: u64,
    send: Arc<DirtyMap>,
    served: Arc<DirtyMap>,
    /// The connection made beforehand, taken by the first stream.
    connected: std::sync::Mutex<Option<ReplicaClient>>,
    counts: Arc<DemandCounts>,
    cancel: CancellationToken,
}

impl Server {
    async fn run(&self, reconnect_for: Duration) -> Result<(), PushError> {
        let mut lost_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.serve_once(&mut lost_at).await {
                Ok(()) => return Ok(()),
                Err(PushError::Rpc(e)) if e.is_transient() => {
                    let since = *lost_at.get_or_insert_with(Instant::now);
                    if since.elapsed() >= reconnect_for {
                        return Err(PushError::Lost {
                            addr: self.peer.addr.clone(),
                            waited: since.elapsed(),
                            source: e,
                        });
                    }
                    tracing::warn!(error = %e, "post-copy demand stream lost; reconnecting");
                    tokio::select! {
                        () = self.cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    self.counts.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One demand stream and its fill stream, until the destination misses
    /// nothing (or the server is stopped).
    async fn serve_once(&self, lost_at: &mut Option<Instant>) -> Result<(), PushError> {
        let early = self
            .connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut client = match early {
            Some(client) => client,
            None => self.peer.connect().await?,
        };
        let mut demands = client.demands(self.epoch).await?;
        let mut writer = client.open_fill_writer(self.epoch, WINDOW).await?;
        *lost_at = None;
        loop {
            let next = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Ok(()),
                next = demands.next() => next,
            };
            let Some(ranges) = next else {
                writer.finish().await?;
                return Ok(());
            };
            // Each a window at most (the protocol's bound), whatever was asked.
            let ranges = ranges?.into_iter().flat_map(|r| {
                (r.start..r.end)
                    .step_by(usize::try_from(DEMAND_WINDOW).expect("64 KiB"))
                    .map(move |at| at..(at + DEMAND_WINDOW).min(r.end))
            });
            let reads = ranges.map(|r| self.read(r));
            let extents = futures::future::try_join_all(reads).await?;
            let bytes: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
            let count = extents.len() as u64;
            writer.send_batch(extents).await?;
            self.counts.ranges.fetch_add(count, Ordering::Relaxed);
            self.counts.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Reads one demanded range of the source, raw: a demand is waited
    /// for, and compressing 64 KiB costs more than sending it on a fast link.
    async fn read(&self, range: std::ops::Range<u64>) -> Result<EncodedExtent, PushError> {
        let len = u32::try_from(range.end - range.start).expect("cut to a window above");
        self.send.clear_within(range.start, range.end);
        self.served.mark(range.start, range.end - range.start);
        let data = self
            .source
            .read_at(range.start, len)
            .await
            .map_err(|source| PushError::Read {
                offset: range.start,
                len,
                source,
            })?;
        Ok(EncodedExtent::encode(range.start, data, None)?)
    }
}
