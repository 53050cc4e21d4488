//! The replication engine: rounds that take the dirty units, read them from
//! the source with `io_uring`, encode them (zero detection, zstd, blake3) and
//! stream them to the destination with many extents in flight, under a rate
//! limit, surviving a lost connection without starting over.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::dirty::DirtyMap;
use crate::image::Image;
use crate::rpc::{
    BATCH_BYTES, EncodedExtent, Encoding, ExtentWriter, MAX_BATCH_EXTENTS, MAX_LEAF_SIZE,
    ReplicaClient, RpcError, TlsMaterial,
};

use super::ReplicateError;
use super::compression::{Chooser, CompressWhen};
use super::limiter::Limiter;
use super::local_tree::{LocalTree, zero_tree};
use super::pipeline::{Encoded, MapRuns, Reader, Runs};
use super::stats::{Round, Stats};

/// Read and encoded runs waiting for the sender at most (also bounded in
/// bytes by the reader's read-ahead budget): enough for whole batches of
/// small extents.
/// Bytes sent between two requests that the destination bring its tree up
/// to date ([`Replicator::warm_remote_tree`]): it then hashes what it wrote
/// while the copy goes on, instead of all of it at the final comparison of
/// roots (354 ms of a 2.4 s full copy of 1 GiB, measured).
const WARM_EVERY: u64 = 64 << 20;

const READY_EXTENTS: usize = 2 * MAX_BATCH_EXTENTS as usize;

/// How to reach the destination agent.
#[derive(Clone)]
pub struct Peer {
    pub addr: String,
    pub tls: Option<TlsMaterial>,
    /// Name checked in the destination's certificate (default: the host of `addr`).
    pub domain: Option<String>,
    /// A destination served in this process (a staged migration's relay):
    /// reached through this channel, `addr` only names it in messages.
    pub channel: Option<tonic::transport::Channel>,
}

impl Peer {
    /// The destination at `addr`, with the mutual-TLS material of `tls_dir`
    /// (from `tern certs init`) when given: how a migration, a standby and a
    /// rollback all reach it.
    pub fn load(
        addr: &str,
        tls_dir: Option<&std::path::Path>,
        domain: Option<&str>,
    ) -> Result<Peer, crate::rpc::TlsError> {
        Ok(Peer {
            addr: addr.to_owned(),
            tls: tls_dir.map(TlsMaterial::load).transpose()?,
            domain: domain.map(str::to_owned),
            channel: None,
        })
    }

    /// A destination served in this process, named `name` in messages.
    pub fn in_process(name: &str, channel: tonic::transport::Channel) -> Peer {
        Peer {
            addr: name.to_owned(),
            tls: None,
            domain: None,
            channel: Some(channel),
        }
    }

    pub async fn connect(&self) -> Result<ReplicaClient, RpcError> {
        match &self.channel {
            Some(channel) => Ok(ReplicaClient::from_channel(channel.clone())),
            None => {
                ReplicaClient::connect(&self.addr, self.tls.as_ref(), self.domain.as_deref()).await
            }
        }
    }
}

/// Knobs of the engine.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Longest extent sent (bytes).
    pub extent_len: u32,
    /// zstd level; `None` sends raw data.
    pub zstd_level: Option<i32>,
    /// With a level: compress always, or only while it moves the data faster.
    pub compress: CompressWhen,
    /// Extents read and encoded concurrently.
    pub workers: usize,
    /// Unacknowledged messages (extents or batches) on the wire.
    pub window: usize,
    /// Payload bytes per second on the wire; `None` for no limit.
    pub max_rate: Option<u64>,
    /// Checksum-tree region size (bytes, power of two).
    pub region_size: u64,
    /// A barrier (durable on the destination) after this many bytes.
    pub barrier_every: u64,
    /// How long to keep reconnecting to a lost destination before giving up.
    pub reconnect_for: Duration,
    /// Zones whose replication unit is larger than the dirty map's (from a
    /// plan): a dirty run there is widened to whole units before it is sent.
    pub unit_zones: Option<Arc<[super::UnitZone]>>,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            extent_len: 1 << 20,
            zstd_level: Some(1),
            compress: CompressWhen::Auto,
            // Scattered 4 KiB extents are bound by read latency, not bandwidth:
            // keep many reads in flight.
            workers: 16,
            window: 32,
            max_rate: None,
            region_size: 1 << 20,
            barrier_every: 256 << 20,
            reconnect_for: Duration::from_mins(2),
            unit_zones: None,
        }
    }
}

/// An order for the next round (from a prediction): these runs first, in
/// this order; the `hold` runs not at all (they are marked dirty again, so a
/// later round sends them once they have been rewritten).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOrder {
    pub first: Vec<Range<u64>>,
    pub hold: Vec<Range<u64>>,
}

/// Adds a data extent's plain length to `data` by how it was encoded (zero
/// extents cost the same either way and are left out).
fn count_data(data: &mut [u64; 2], (extent, compressed): &(EncodedExtent, bool)) {
    if extent.encoding != Encoding::Zero {
        data[usize::from(*compressed)] += u64::from(extent.length);
    }
}

/// Splits `run` into its pieces inside and outside `sorted` (disjoint, by start).
fn split_run(run: &Range<u64>, sorted: &[(Range<u64>, usize)]) -> Vec<(Range<u64>, Option<usize>)> {
    let mut out = Vec::new();
    let mut at = run.start;
    let mut i = sorted.partition_point(|(r, _)| r.end <= run.start);
    while at < run.end {
        match sorted.get(i) {
            Some((r, rank)) if r.start < run.end => {
                if r.start > at {
                    out.push((at..r.start, None));
                    at = r.start;
                }
                let end = r.end.min(run.end);
                out.push((at..end, Some(*rank)));
                at = end;
                i += 1;
            }
            _ => {
                out.push((at..run.end, None));
                at = run.end;
            }
        }
    }
    out
}

/// Whether a failed call may succeed after reconnecting.
fn transient(e: &RpcError) -> bool {
    e.is_transient()
}

/// Whether the destination refused us because a newer epoch owns it.
fn fenced(e: &RpcError) -> bool {
    matches!(e, RpcError::StaleEpoch { .. } | RpcError::Fenced { .. })
        || e.code() == Some(tonic::Code::FailedPrecondition)
}

/// The source side of one replication: a source image, its dirty map, a
/// destination and an epoch.
pub struct Replicator {
    pub(super) source: Image,
    peer: Peer,
    pub(super) client: ReplicaClient,
    writer: Option<ExtentWriter>,
    /// The last write stream opened takes checksums over leaf hashes.
    leaf_checksums: bool,
    epoch: u64,
    pub(super) send: Arc<DirtyMap>,
    pub(super) local: LocalTree,
    pub(super) opts: ReplicateOptions,
    pub(super) stats: Arc<Stats>,
    /// Runs sent since the last barrier: a lost connection marks them again.
    since_barrier: Vec<Range<u64>>,
    since_barrier_bytes: u64,
    limiter: Limiter,
    pub(super) order: Option<SendOrder>,
    /// Rounds read whole checksum regions ([`Replicator::read_whole_regions`]).
    whole_regions: bool,
    /// A request to warm the destination's tree is running (one at a time).
    warming: Arc<AtomicBool>,
    /// Bytes sent since the last one was asked for.
    sent_since_warm: u64,
    /// Whether zstd pays, measured while sending (kept across rounds).
    chooser: Chooser,
    /// Write streams are post-copy fills ([`Replicator::enter_postcopy`]).
    fill: bool,
    /// In a post-copy, the units the demand server answered: an extent
    /// wholly inside them is not pushed again.
    served: Option<Arc<DirtyMap>>,
}

/// The root hash of `client`'s destination for the tree `shape`.
async fn root_of(
    client: &mut ReplicaClient,
    shape: crate::checktree::Shape,
) -> Result<[u8; 32], ReplicateError> {
    let nodes = client
        .tree_nodes(shape.region_size(), shape.levels() - 1, &[0])
        .await?;
    nodes
        .hashes
        .first()
        .copied()
        .ok_or(ReplicateError::Rpc(RpcError::UnexpectedReply {
            want: "the root hash",
            got: "no hashes".into(),
        }))
}

impl Replicator {
    /// Connects to the destination and checks it can hold the source.
    pub async fn connect(
        source: Image,
        peer: Peer,
        send: Arc<DirtyMap>,
        local: LocalTree,
        opts: ReplicateOptions,
    ) -> Result<Replicator, ReplicateError> {
        let mut client = peer.connect().await?;
        let info = client.info().await?;
        if info.image_size != source.size() {
            return Err(ReplicateError::SizeMismatch {
                source_size: source.size(),
                dest_size: info.image_size,
            });
        }
        let limiter = Limiter::new(opts.max_rate);
        let chooser = Chooser::new(opts.zstd_level, opts.compress);
        Ok(Replicator {
            source,
            peer,
            client,
            writer: None,
            leaf_checksums: false,
            epoch: info.epoch,
            send,
            local,
            opts,
            stats: Arc::new(Stats::default()),
            since_barrier: Vec::new(),
            since_barrier_bytes: 0,
            limiter,
            order: None,
            whole_regions: false,
            warming: Arc::new(AtomicBool::new(false)),
            sent_since_warm: 0,
            chooser,
            fill: false,
            served: None,
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn source(&self) -> &Image {
        &self.source
    }

    pub fn send_map(&self) -> &Arc<DirtyMap> {
        &self.send
    }

    pub fn local(&self) -> &LocalTree {
        &self.local
    }

    pub fn client(&mut self) -> &mut ReplicaClient {
        &mut self.client
    }

    pub fn options(&self) -> &ReplicateOptions {
        &self.opts
    }

    /// Takes the write epoch: one above the destination's highest, which
    /// fences any older writer (a previous, crashed source agent).
    pub async fn take_epoch(&mut self) -> Result<u64, ReplicateError> {
        let info = self.client.info().await?;
        // A promoted replica is the primary now: taking a higher epoch
        // would not get past its fence, and must not be tried.
        if let Some(promotion) = info.promotion {
            return Err(ReplicateError::Promoted {
                promotion: Box::new(promotion),
            });
        }
        self.epoch = info.epoch + 1;
        self.writer = None;
        self.open_writer().await?;
        Ok(self.epoch)
    }

    /// After a post-copy switch fenced with `epoch`: every later write
    /// stream is a fill (it lands only where the destination still misses
    /// a unit), rounds read only what they send, and the dirty map holds
    /// what is still to push; an extent wholly inside `served` (units a
    /// demand answered) is not sent.
    pub fn enter_postcopy(&mut self, epoch: u64, served: Arc<DirtyMap>) {
        self.epoch = epoch;
        self.fill = true;
        self.served = Some(served);
        self.writer = None;
        self.whole_regions = false;
    }

    /// How the destination is reached (a second connection: the post-copy
    /// demand stream).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    async fn open_writer(&mut self) -> Result<(), ReplicateError> {
        let writer = if self.fill {
            self.client
                .open_fill_writer(self.epoch, self.opts.window)
                .await
        } else {
            self.client.open_writer(self.epoch, self.opts.window).await
        }
        .map_err(|e| self.classify(e))?;
        self.leaf_checksums = writer.leaf_checksums();
        self.writer = Some(writer);
        Ok(())
    }

    fn classify(&self, e: RpcError) -> ReplicateError {
        if fenced(&e) {
            ReplicateError::Fenced {
                epoch: self.epoch,
                source: Box::new(e),
            }
        } else {
            ReplicateError::Rpc(e)
        }
    }

    /// Re-establishes the connection and the write stream after a transient
    /// failure, marking everything not yet durable dirty again.
    async fn recover(&mut self, cause: RpcError) -> Result<(), ReplicateError> {
        if !transient(&cause) {
            return Err(self.classify(cause));
        }
        self.writer = None;
        for run in self.since_barrier.drain(..) {
            self.send.mark(run.start, run.end - run.start);
        }
        self.stats
            .resent_bytes
            .fetch_add(self.since_barrier_bytes, Ordering::Relaxed);
        self.since_barrier_bytes = 0;
        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %cause, "lost the destination; reconnecting, unacknowledged extents will be sent again");
        let deadline = Instant::now() + self.opts.reconnect_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut client = self.peer.connect().await?;
                let writer = if self.fill {
                    client
                        .open_fill_writer(self.epoch, self.opts.window)
                        .await?
                } else {
                    client.open_writer(self.epoch, self.opts.window).await?
                };
                Ok::<_, RpcError>((client, writer))
            }
            .await;
            match attempt {
                Ok((client, writer)) => {
                    self.client = client;
                    self.leaf_checksums = writer.leaf_checksums();
                    self.writer = Some(writer);
                    tracing::info!("reconnected to the destination");
                    return Ok(());
                }
                Err(e) if transient(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) if transient(&e) => {
                    return Err(ReplicateError::PeerLost {
                        addr: self.peer.addr.clone(),
                        waited: self.opts.reconnect_for,
                        source: Box::new(e),
                    });
                }
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    async fn writer(&mut self) -> Result<&mut ExtentWriter, ReplicateError> {
        if self.writer.is_none() {
            self.open_writer().await?;
        }
        Ok(self.writer.as_mut().expect("opened just above"))
    }

    /// Sends extents (one message where the destination takes batches); on
    /// a transient failure reconnects (their runs are marked dirty again
    /// with everything since the last barrier).
    async fn send_batch(&mut self, batch: Vec<EncodedExtent>) -> Result<(), ReplicateError> {
        let wire: u64 = batch.iter().map(|e| e.payload.len() as u64).sum();
        let plain: u64 = batch.iter().map(|e| u64::from(e.length)).sum();
        let count = batch.len() as u64;
        self.limiter.take(wire).await;
        self.since_barrier.extend(
            batch
                .iter()
                .map(|e| e.offset..e.offset + u64::from(e.length)),
        );
        self.since_barrier_bytes += plain;
        let result = self.writer().await?.send_batch(batch).await;
        if let Err(e) = result {
            // The runs are in `since_barrier`: recovery marks them again.
            return self.recover(e).await;
        }
        self.stats.sent_bytes.fetch_add(plain, Ordering::Relaxed);
        self.stats.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        self.stats.extents.fetch_add(count, Ordering::Relaxed);
        if self.since_barrier_bytes >= self.opts.barrier_every {
            self.barrier().await?;
        }
        Ok(())
    }

    /// Waits until everything sent is durable on the destination.
    pub async fn barrier(&mut self) -> Result<(), ReplicateError> {
        let result = self.writer().await?.barrier().await;
        match result {
            Ok(()) => {
                self.since_barrier.clear();
                self.since_barrier_bytes = 0;
                Ok(())
            }
            // What the barrier covered is dirty again; the caller's next round sends it.
            Err(e) => self.recover(e).await,
        }
    }

    /// One round: sends every unit dirty now, in disk order. With
    /// `skip_zero`, zero extents are not sent (the destination is known blank
    /// there and nothing was sent to them yet).
    pub async fn round(&mut self, skip_zero: bool) -> Result<Round, ReplicateError> {
        let started = Instant::now();
        let before = self.stats.snapshot();
        self.stats
            .round_bytes
            .store(self.send.dirty_bytes(), Ordering::Relaxed);
        self.stats.round_done.store(0, Ordering::Relaxed);
        let runs = match self.order.take() {
            Some(order) => Runs::Ordered(self.ordered_runs(&order).into_iter()),
            None => Runs::Map(MapRuns::new(
                Arc::clone(&self.send),
                u64::from(self.opts.extent_len),
                self.opts.unit_zones.clone(),
            )),
        };
        self.send_runs(runs, skip_zero).await?;
        self.barrier().await?;
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(Round::since(&before, &self.stats.snapshot(), started))
    }

    /// From now on, rounds read the whole checksum regions their runs touch
    /// and hash them from that read (still sending only the runs): the
    /// local tree is then fresh for every region a round sent, and the
    /// verification inside the pause has nothing left to read on this side.
    /// For the rounds of the pause: earlier it would multiply the bytes read.
    pub fn read_whole_regions(&mut self, on: bool) {
        self.whole_regions = on;
    }

    /// Forgets an order given for the next round.
    pub fn clear_order(&mut self) {
        self.order = None;
    }

    /// Orders the next round (once): see [`SendOrder`].
    pub fn set_order(&mut self, order: SendOrder) {
        self.order = Some(order);
    }

    /// Takes every dirty run and orders it: runs in `order.first` by rank,
    /// then the rest in disk order; runs in `order.hold` are marked dirty
    /// again instead (holding wins over first).
    fn ordered_runs(&self, order: &SendOrder) -> Vec<Range<u64>> {
        let sorted = |ranges: &[Range<u64>]| {
            let mut v: Vec<(Range<u64>, usize)> = ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| r.end > r.start)
                .map(|(i, r)| (r.clone(), i))
                .collect();
            v.sort_by_key(|(r, _)| r.start);
            // Keep them disjoint: a range overlapping the one before loses the overlap.
            let mut out: Vec<(Range<u64>, usize)> = Vec::with_capacity(v.len());
            for (r, i) in v {
                let start = out.last().map_or(r.start, |(p, _)| r.start.max(p.end));
                if start < r.end {
                    out.push((start..r.end, i));
                }
            }
            out
        };
        let hold = sorted(&order.hold);
        let first = sorted(&order.first);
        let mut ranked: Vec<(usize, Range<u64>)> = Vec::new();
        let mut rest: Vec<Range<u64>> = Vec::new();
        for run in self.send.take_all(u64::from(self.opts.extent_len)) {
            for (piece, held) in split_run(&run, &hold) {
                if held.is_some() {
                    self.send.mark(piece.start, piece.end - piece.start);
                    self.stats
                        .held_back_bytes
                        .fetch_add(piece.end - piece.start, Ordering::Relaxed);
                    continue;
                }
                for (part, rank) in split_run(&piece, &first) {
                    match rank {
                        Some(rank) => ranked.push((rank, part)),
                        None => rest.push(part),
                    }
                }
            }
        }
        ranked.sort_by_key(|(rank, r)| (*rank, r.start));
        ranked.into_iter().map(|(_, r)| r).chain(rest).collect()
    }

    /// Reads, encodes and sends `runs` (taken from the send map), in order:
    /// a task reads and encodes ahead while this one gathers what is ready
    /// into batches and sends them. On an error, every run taken and not
    /// sent is marked dirty again before it is returned.
    pub(super) async fn send_runs(
        &mut self,
        runs: Runs,
        skip_zero: bool,
    ) -> Result<(), ReplicateError> {
        let reader = Reader {
            source: self.source.clone(),
            send: Arc::clone(&self.send),
            stale: Arc::clone(&self.local.stale),
            shape: *self.local.tree.shape(),
            compression: self.chooser.choice(),
            workers: self.opts.workers,
            whole_regions: self.whole_regions,
            leaf_size: self.leaf_size(),
        };
        self.chooser.new_round();
        let (tx, mut rx) = mpsc::channel(READY_EXTENTS);
        let reading = tokio::spawn(reader.run(runs, tx));
        let sent = self.send_ready(&mut rx, skip_zero).await;
        if sent.is_err() {
            // Stops the reader (it gives back what it still holds); what
            // it already handed over is given back here.
            rx.close();
            while let Some(done) = rx.recv().await {
                self.give_back(&done.run);
            }
        }
        drop(rx);
        reading.await.map_err(RpcError::from)?;
        sent
    }

    /// The leaf size extents' checksums are made at: the local tree's region
    /// size when the destination takes leaf checksums (then neither side
    /// hashes a byte twice), else 0 (the blake3 of the data whole).
    fn leaf_size(&self) -> u32 {
        if !self.leaf_checksums {
            return 0;
        }
        u32::try_from(self.local.tree.shape().region_size())
            .ok()
            .filter(|size| *size <= MAX_LEAF_SIZE)
            .unwrap_or(0)
    }

    /// Sends what the reader hands over, in batches of what is ready.
    async fn send_ready(
        &mut self,
        rx: &mut mpsc::Receiver<Encoded>,
        skip_zero: bool,
    ) -> Result<(), ReplicateError> {
        let mut carry: Option<(EncodedExtent, bool)> = None;
        loop {
            let first = match carry.take() {
                Some(extent) => extent,
                None => loop {
                    let Some(done) = rx.recv().await else {
                        return Ok(());
                    };
                    let compressed = done.compressed;
                    if let Some(extent) = self.accept(done, skip_zero)? {
                        break (extent, compressed);
                    }
                },
            };
            let mut bytes = u64::from(first.0.length);
            // Data bytes by how they were encoded: [raw, zstd tried].
            let mut data = [0u64; 2];
            count_data(&mut data, &first);
            let mut batch = vec![first.0];
            while batch.len() < MAX_BATCH_EXTENTS as usize {
                let Ok(done) = rx.try_recv() else { break };
                let compressed = done.compressed;
                let extent = match self.accept(done, skip_zero) {
                    Ok(Some(extent)) => (extent, compressed),
                    Ok(None) => continue,
                    Err(e) => {
                        // Read, not sent: the next round sends them.
                        self.give_back_extents(&batch);
                        return Err(e);
                    }
                };
                if bytes + u64::from(extent.0.length) > BATCH_BYTES {
                    carry = Some(extent);
                    break;
                }
                bytes += u64::from(extent.0.length);
                count_data(&mut data, &extent);
                batch.push(extent.0);
            }
            if let Err(e) = self.send_batch(batch).await {
                // The batch itself is in `since_barrier` (or the error ends
                // the migration); the extent held for the next batch is not.
                if let Some((extent, _)) = &carry {
                    self.give_back_extents(std::slice::from_ref(extent));
                }
                return Err(e);
            }
            let now = Instant::now();
            for (compressed, plain) in [(false, data[0]), (true, data[1])] {
                if plain > 0 {
                    self.chooser.sent(compressed, plain, now);
                }
            }
            self.sent_since_warm += bytes;
            if self.sent_since_warm >= WARM_EVERY && !self.warming.load(Ordering::Relaxed) {
                self.sent_since_warm = 0;
                self.warm_remote_tree();
            }
        }
    }

    /// How compression was chosen while sending: switches and the rates
    /// measured (plain bytes per second, raw and compressed).
    pub fn compression_choice(&self) -> (u64, Option<f64>, Option<f64>) {
        let (raw, zstd) = self.chooser.rates();
        (self.chooser.switches(), raw, zstd)
    }

    /// Marks the runs of extents taken and not sent dirty again.
    fn give_back_extents(&self, extents: &[EncodedExtent]) {
        for e in extents {
            self.give_back(&(e.offset..e.offset + u64::from(e.length)));
        }
    }

    /// Takes one read run into the local tree and the round's progress; the
    /// extent to send, or `None` for a zero extent skipped.
    fn accept(
        &mut self,
        done: Encoded,
        skip_zero: bool,
    ) -> Result<Option<EncodedExtent>, ReplicateError> {
        let (extent, leaves) = match done.result {
            Ok(encoded) => encoded,
            Err(e) => {
                self.give_back(&done.run);
                return Err(e);
            }
        };
        if !leaves.is_empty() {
            let region_size = self.local.tree.shape().region_size();
            self.stats
                .hashed_bytes
                .fetch_add(leaves.len() as u64 * region_size, Ordering::Relaxed);
            self.local.tree.update_leaves(&leaves)?;
        }
        let len = u64::from(extent.length);
        self.stats.round_done.fetch_add(len, Ordering::Relaxed);
        if skip_zero && extent.encoding == Encoding::Zero {
            self.stats
                .skipped_zero_bytes
                .fetch_add(len, Ordering::Relaxed);
            return Ok(None);
        }
        // Read ahead before a demand answered it: the destination has it.
        if self
            .served
            .as_ref()
            .is_some_and(|served| served.all_marked(extent.offset, len))
        {
            return Ok(None);
        }
        Ok(Some(extent))
    }

    /// Marks a run that was taken but not sent dirty again.
    fn give_back(&self, run: &Range<u64>) {
        self.send.mark(run.start, run.end - run.start);
        self.local.stale.mark(run.start, run.end - run.start);
    }

    /// Rehashes the source's stale regions.
    pub async fn refresh_local(&mut self) -> Result<u64, ReplicateError> {
        self.local.refresh(&self.source, &self.stats).await
    }

    /// The destination's root for our region size.
    pub async fn remote_root(&mut self) -> Result<[u8; 32], ReplicateError> {
        root_of(&mut self.client, *self.local.tree().shape()).await
    }

    /// The local root, refreshed, and the destination's, computed at the
    /// same time: each side rehashes the regions written since it last
    /// looked, and inside a pause the two need not wait for each other.
    pub async fn local_and_remote_roots(&mut self) -> Result<([u8; 32], [u8; 32]), ReplicateError> {
        let shape = *self.local.tree().shape();
        let mut client = self.client.clone();
        let (refreshed, remote) = tokio::join!(
            self.local.refresh(&self.source, &self.stats),
            root_of(&mut client, shape)
        );
        refreshed?;
        Ok((self.local.tree().root(), remote?))
    }

    /// Asks the destination for its root without waiting for the answer:
    /// it rehashes the regions written since it last answered now, while
    /// the workload runs, instead of inside the pause (where the next
    /// question waits for this rehash and finds little left to do).
    pub fn warm_remote_tree(&self) {
        if self.warming.swap(true, Ordering::AcqRel) {
            // One is running; it will take what was written meanwhile or the next will.
            return;
        }
        let mut client = self.client.clone();
        let shape = *self.local.tree().shape();
        let warming = Arc::clone(&self.warming);
        tokio::spawn(async move {
            if let Err(e) = root_of(&mut client, shape).await {
                tracing::debug!(error = %e, "warming the destination's tree failed; the verification rehashes instead");
            }
            warming.store(false, Ordering::Release);
        });
    }

    /// Whether the destination's image is all zeroes (a fresh image).
    pub async fn destination_is_blank(&mut self) -> Result<bool, ReplicateError> {
        let zero = zero_tree(*self.local.tree().shape())?;
        Ok(self.remote_root().await? == zero.root())
    }

    /// Delta sync by checksums: refreshes the local tree, compares it with
    /// the destination's, and marks the differing regions dirty. Returns the
    /// number of differing regions.
    pub async fn mark_differences(&mut self) -> Result<u64, ReplicateError> {
        self.refresh_local().await?;
        let differing = self.client.diff_regions(self.local.tree()).await?;
        let shape = *self.local.tree().shape();
        for &index in &differing {
            let r = shape.region(index);
            self.send.mark(r.start, r.end - r.start);
        }
        Ok(differing.len() as u64)
    }

    /// Closes the write stream cleanly (everything durable).
    pub async fn finish(&mut self) -> Result<(), ReplicateError> {
        if let Some(writer) = self.writer.take() {
            writer.finish().await.map_err(|e| self.classify(e))?;
        }
        self.since_barrier.clear();
        self.since_barrier_bytes = 0;
        let (switches, raw, zstd) = self.compression_choice();
        if raw.is_some() || zstd.is_some() {
            let mb = |r: Option<f64>| r.map_or(-1.0, |r| (r / 1e6).round());
            tracing::info!(
                switches,
                raw_mb_s = mb(raw),
                zstd_mb_s = mb(zstd),
                zstd_now = self.chooser.choice().level().is_some(),
                "compression chosen by measurement"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::split_run;

    #[test]
    fn a_run_splits_into_its_pieces_inside_and_outside_the_ranges_with_their_ranks() {
        let ranges = vec![(10..20, 1), (30..35, 0), (50..60, 2)];
        assert_eq!(
            split_run(&(15..55), &ranges),
            vec![
                (15..20, Some(1)),
                (20..30, None),
                (30..35, Some(0)),
                (35..50, None),
                (50..55, Some(2)),
            ]
        );
        assert_eq!(split_run(&(0..5), &ranges), vec![(0..5, None)]);
        assert_eq!(split_run(&(12..18), &ranges), vec![(12..18, Some(1))]);
        assert_eq!(split_run(&(60..70), &ranges), vec![(60..70, None)]);
    }
}
