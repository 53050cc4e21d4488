//! The read side of a round: a task that takes dirty runs, reads them from
//! the source and encodes them, many at a time, ahead of the sender. The
//! sender (the engine) gathers what is ready into batches; reading never
//! waits for an acknowledgement, and sending never waits for a read that
//! could have started earlier.
//!
//! Nothing taken is lost: a run taken from the send map and not handed to
//! the sender (the sender stopped on an error) is marked dirty again.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::checktree::{Hash, Shape, leaf_hash};
use crate::dirty::DirtyMap;
use crate::image::Image;
use crate::rpc::{Checksum, EncodedExtent, RpcError, zero_ends};

use super::compression::Choice;
use super::{ReplicateError, UnitZone};

/// Runs up to this long are encoded (zero check, blake3, zstd) on the async
/// worker: for them the round trip through the blocking pool costs more
/// than the work.
const ENCODE_INLINE: usize = 64 << 10;
/// Bytes read ahead of the sender at most (read, encoded, not yet sent).
const READ_AHEAD_BYTES: u64 = 32 << 20;
/// The read-ahead budget is counted in units of this many bytes.
const PERMIT_BYTES: u64 = 4096;

/// One run, read and encoded (or the error that stopped it), with the
/// leaf hashes of the checksum regions lying wholly inside it.
pub(super) struct Encoded {
    pub run: Range<u64>,
    pub result: Result<(EncodedExtent, Vec<(u64, Hash)>), ReplicateError>,
    /// Encoded with zstd tried (the choice when it was read).
    pub compressed: bool,
    /// Returned to the read-ahead budget when dropped (once sent); held by
    /// the last piece of a read.
    _budget: Option<OwnedSemaphorePermit>,
}

/// Zero blocks at the ends of a read run go as zero extents of their own
/// (skipped outright by a bulk copy into a blank destination): a run that
/// straddles data and zeroes would otherwise send the zeroes as data
/// whenever it goes raw.
const ZERO_BLOCK: usize = 4096;

/// Where a round's runs come from.
pub(super) enum Runs {
    /// Taken beforehand, in this order (a prediction ordered them).
    Ordered(std::vec::IntoIter<Range<u64>>),
    /// Taken from the send map as the reads progress, in disk order.
    Map(MapRuns),
}

/// Runs taken from the send map a chunk at a time, widened to the plan's
/// units where a plan says so.
pub(super) struct MapRuns {
    send: Arc<DirtyMap>,
    cursor: u64,
    /// The unit the runs stop before.
    end: u64,
    taken: VecDeque<Range<u64>>,
    max_run: u64,
    zones: Option<Arc<[UnitZone]>>,
}

impl MapRuns {
    pub(super) fn new(send: Arc<DirtyMap>, max_run: u64, zones: Option<Arc<[UnitZone]>>) -> Self {
        let end = send.units();
        Self::until(send, max_run, zones, end)
    }

    /// The dirty runs below byte `end` only (no plan's units: a run widened
    /// to its unit could reach past `end`).
    pub(super) fn below(send: Arc<DirtyMap>, max_run: u64, end: u64) -> Self {
        let end = end.div_ceil(send.unit()).min(send.units());
        Self::until(send, max_run, None, end)
    }

    /// The runs of the units below unit `end`.
    fn until(send: Arc<DirtyMap>, max_run: u64, zones: Option<Arc<[UnitZone]>>, end: u64) -> Self {
        MapRuns {
            send,
            cursor: 0,
            end,
            taken: VecDeque::new(),
            max_run,
            zones,
        }
    }
}

impl Iterator for MapRuns {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        loop {
            if let Some(run) = self.taken.pop_front() {
                return Some(run);
            }
            if self.cursor >= self.end {
                return None;
            }
            let (runs, next) = self
                .send
                .take_runs(self.cursor..self.end, self.max_run, 256);
            self.cursor = next;
            match &self.zones {
                Some(zones) => {
                    // Widened runs are taken like the dirty units: a write
                    // after this marks them again.
                    let wide = super::units::widen(&runs, zones, self.max_run);
                    for r in &wide {
                        self.send.clear_within(r.start, r.end);
                    }
                    self.taken.extend(wide);
                }
                None => self.taken.extend(runs),
            }
        }
    }
}

impl Runs {
    fn next(&mut self) -> Option<Range<u64>> {
        match self {
            Runs::Ordered(runs) => runs.next(),
            Runs::Map(runs) => runs.next(),
        }
    }

    /// Marks every run taken and not yet read dirty again.
    fn give_back(self, send: &DirtyMap) {
        let rest: Box<dyn Iterator<Item = Range<u64>>> = match self {
            Runs::Ordered(runs) => Box::new(runs),
            Runs::Map(runs) => Box::new(runs.taken.into_iter()),
        };
        for run in rest {
            send.mark(run.start, run.end - run.start);
        }
    }
}

/// What the read task needs.
pub(super) struct Reader {
    pub source: Image,
    pub send: Arc<DirtyMap>,
    /// The local checksum tree's stale regions.
    pub stale: Arc<DirtyMap>,
    pub shape: Shape,
    /// The zstd level of the moment (see [`Choice`]).
    pub compression: Arc<Choice>,
    /// Reads in flight.
    pub workers: usize,
    /// Read each run's whole checksum regions (sending only the run), so
    /// that their leaves are hashed from this read: inside the pause this
    /// spares the verification a second read of every region the final
    /// delta touched.
    pub whole_regions: bool,
    /// Extents carry checksums over leaf hashes at this size (0: of their
    /// data whole), when the destination takes them: at the tree's region
    /// size, a stale region's leaf is its piece's hash, made once.
    pub leaf_size: u32,
}

impl Reader {
    /// Reads and encodes `runs`, in order, into `tx`, until they are all
    /// sent or the receiver is gone (then gives back what it took).
    pub(super) async fn run(self, mut runs: Runs, tx: mpsc::Sender<Encoded>) {
        let budget = Arc::new(Semaphore::new(
            usize::try_from(READ_AHEAD_BYTES / PERMIT_BYTES).expect("a small constant"),
        ));
        let most = u32::try_from(READ_AHEAD_BYTES / PERMIT_BYTES).expect("a small constant");
        let mut inflight = FuturesOrdered::new();
        // A run taken while the budget was spent: read once sends free it.
        let mut waiting: Option<Range<u64>> = None;
        loop {
            while inflight.len() < self.workers.max(1) {
                let Some(run) = waiting.take().or_else(|| runs.next()) else {
                    break;
                };
                let permits = u32::try_from((run.end - run.start).div_ceil(PERMIT_BYTES))
                    .expect("a run is at most a u32 long")
                    .min(most);
                let permit = match Arc::clone(&budget).try_acquire_many_owned(permits) {
                    Ok(permit) => permit,
                    // Hand what is read to the sender first: it frees the budget.
                    Err(_) if !inflight.is_empty() => {
                        waiting = Some(run);
                        break;
                    }
                    Err(_) => Arc::clone(&budget)
                        .acquire_many_owned(permits)
                        .await
                        .expect("the budget is never closed"),
                };
                inflight.push_back(self.read(run, permit));
            }
            let Some(pieces) = inflight.next().await else {
                return;
            };
            let mut pieces = pieces.into_iter();
            let mut refused = None;
            for piece in pieces.by_ref() {
                if let Err(mpsc::error::SendError(piece)) = tx.send(piece).await {
                    refused = Some(piece);
                    break;
                }
            }
            if let Some(done) = refused {
                // The sender stopped: nothing taken may be lost.
                self.give_back(&done.run);
                for done in pieces {
                    self.give_back(&done.run);
                }
                while let Some(pieces) = inflight.next().await {
                    for done in pieces {
                        self.give_back(&done.run);
                    }
                }
                if let Some(run) = waiting {
                    self.give_back(&run);
                }
                runs.give_back(&self.send);
                return;
            }
        }
    }

    /// Marks a run that was taken but will not be sent dirty again (and its
    /// regions stale: their leaves were not updated).
    pub(super) fn give_back(&self, run: &Range<u64>) {
        self.send.mark(run.start, run.end - run.start);
        self.stale.mark(run.start, run.end - run.start);
    }

    fn read(
        &self,
        run: Range<u64>,
        budget: OwnedSemaphorePermit,
    ) -> impl Future<Output = Vec<Encoded>> + Send + 'static {
        let source = self.source.clone();
        let shape = self.shape;
        let level = self.compression.level();
        let leaf_size = self.leaf_size;
        let read = if self.whole_regions {
            let region = shape.region_size();
            (run.start / region * region)
                ..run
                    .end
                    .div_ceil(region)
                    .saturating_mul(region)
                    .min(shape.image_size())
        } else {
            run.clone()
        };
        // The stale whole regions inside the read are hashed from its data,
        // instead of being read again for the local tree; their stale bits
        // are taken before the read, like the send map's. A region that is
        // not stale has its leaf already (a write would have marked it).
        let regions = self.stale.take_within(read.start, read.end);
        async move {
            let result = async {
                let len = u32::try_from(read.end - read.start)
                    .expect("a run (at most extent_len, a u32) widened by two regions");
                let data = source.read_at(read.start, len).await.map_err(|e| {
                    ReplicateError::ReadSource {
                        offset: read.start,
                        len,
                        source: Box::new(e),
                    }
                })?;
                let (start, sent) = (read.start, run.clone());
                let encode =
                    move || encode_read(&data, start, sent, regions, shape, level, leaf_size);
                let encoded = if len as usize <= ENCODE_INLINE {
                    encode()?
                } else {
                    tokio::task::spawn_blocking(encode)
                        .await
                        .map_err(RpcError::from)??
                };
                Ok(encoded)
            }
            .await;
            let compressed = level.is_some();
            match result {
                Ok((pieces, mut leaves)) => {
                    let last = pieces.len().saturating_sub(1);
                    let mut budget = Some(budget);
                    pieces
                        .into_iter()
                        .enumerate()
                        .map(|(i, (run, extent))| Encoded {
                            run,
                            result: Ok((extent, std::mem::take(&mut leaves))),
                            compressed,
                            _budget: if i == last { budget.take() } else { None },
                        })
                        .collect()
                }
                Err(e) => vec![Encoded {
                    run,
                    result: Err(e),
                    compressed,
                    _budget: Some(budget),
                }],
            }
        }
    }
}

/// Pieces of one read run and leaves: see [`encode_read`].
type EncodedRun = (Vec<(Range<u64>, EncodedExtent)>, Vec<(u64, Hash)>);

/// Hashes the stale whole `regions` of a read (`data`, at `start`) and
/// encodes the part of it to send (`sent`): its zero blocks at either end as
/// zero extents, the rest as one extent whose checksum reuses those leaves.
fn encode_read(
    data: &Bytes,
    start: u64,
    sent: Range<u64>,
    regions: Vec<Range<u64>>,
    shape: Shape,
    level: Option<i32>,
    leaf_size: u32,
) -> Result<EncodedRun, RpcError> {
    let (run_start, run_end) = (sent.start, sent.end);
    let mut leaves: Vec<(u64, Hash)> = regions
        .into_iter()
        .flatten()
        .map(|i| {
            let r = shape.region(i);
            let at = usize::try_from(r.start - start)
                .expect("a region inside the read: below its u32 length");
            let len = usize::try_from(r.end - r.start)
                .expect("a region inside the read: below its u32 length");
            (i, leaf_hash(&data[at..at + len]))
        })
        .collect();
    leaves.sort_unstable_by_key(|(i, _)| *i);
    // A piece that is a whole region hashed just above.
    let known = |piece: &Range<u64>| {
        if u64::from(leaf_size) != shape.region_size() {
            return None;
        }
        let index = shape.whole_region(piece)?;
        leaves
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|k| leaves[k].1)
    };
    let checksum = if leaf_size == 0 {
        Checksum::Whole
    } else {
        Checksum::Leaves {
            size: leaf_size,
            known: &known,
        }
    };
    let from = usize::try_from(run_start - start).expect("inside the read");
    let to = usize::try_from(run_end - start).expect("inside the read");
    let sent = data.slice(from..to);
    let (head, tail) = zero_ends(&sent, ZERO_BLOCK);
    let at = |i: usize| run_start + i as u64;
    let mut pieces = Vec::with_capacity(3);
    let zero = |a: usize, b: usize| {
        let len = u32::try_from(b - a).expect("inside a run: a u32 long");
        (at(a)..at(b), EncodedExtent::zero(at(a), len))
    };
    if head > 0 {
        pieces.push(zero(0, head));
    }
    if head < tail {
        let extent = EncodedExtent::encode_with(at(head), sent.slice(head..tail), level, checksum)?;
        pieces.push((at(head)..at(tail), extent));
    }
    if tail < sent.len() && head < tail {
        pieces.push(zero(tail, sent.len()));
    }
    Ok((pieces, leaves))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageOptions;
    use crate::replicate::compression::{Chooser, CompressWhen};

    const SIZE: u64 = 8 << 20;

    /// The source's bytes at `range`: each 4 KiB block its own.
    fn pattern(range: Range<u64>) -> Vec<u8> {
        range
            .map(|i| {
                u8::try_from(i / 4096 % 251).expect("below 251")
                    ^ u8::try_from(i % 7).expect("below 7")
            })
            .collect()
    }

    /// A reader whose every checksum region is stale, and its stale map.
    fn all_stale_reader(dir: &std::path::Path) -> (Arc<DirtyMap>, Reader) {
        let send = Arc::new(DirtyMap::new(SIZE, 4096).expect("map"));
        let stale = Arc::new(DirtyMap::new(SIZE, 65536).expect("map"));
        stale.mark(0, SIZE);
        let reader = reader(dir, &send, &stale);
        (stale, reader)
    }

    fn reader(dir: &std::path::Path, send: &Arc<DirtyMap>, stale: &Arc<DirtyMap>) -> Reader {
        let path = dir.join("src.img");
        std::fs::write(&path, pattern(0..SIZE)).expect("write");
        let opts = ImageOptions {
            size: None,
            read_only: true,
            direct: false,
            bulk_direct: false,
        };
        Reader {
            source: Image::open(&path, &opts).expect("open"),
            send: Arc::clone(send),
            stale: Arc::clone(stale),
            shape: Shape::new(SIZE, 65536).expect("shape"),
            compression: Chooser::new(Some(1), CompressWhen::Always).choice(),
            workers: 4,
            whole_regions: false,
            leaf_size: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_taken_and_not_handed_over_are_dirty_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let send = Arc::new(DirtyMap::new(SIZE, 4096).expect("map"));
        let stale = Arc::new(DirtyMap::new(SIZE, 65536).expect("map"));
        // 1000 scattered 4 KiB runs: more than one chunk of the map's taking.
        for i in 0..1000u64 {
            send.mark(i * 8192, 4096);
        }
        let total = send.dirty_bytes();
        let reader = reader(dir.path(), &send, &stale);
        let (tx, mut rx) = mpsc::channel(8);
        let runs = Runs::Map(MapRuns::new(Arc::clone(&send), 1 << 20, None));
        let task = tokio::spawn(reader.run(runs, tx));
        let mut handed = 0;
        for _ in 0..20 {
            let done = rx.recv().await.expect("a run");
            assert!(done.result.is_ok());
            handed += done.run.end - done.run.start;
        }
        // The sender stops (as on an error); what it holds it gives back itself.
        rx.close();
        let mut held = Vec::new();
        while let Some(done) = rx.recv().await {
            held.push(done.run);
        }
        task.await.expect("the reader ends");
        for run in &held {
            send.mark(run.start, run.end - run.start);
        }
        assert_eq!(send.dirty_bytes(), total - handed, "a taken run was lost");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_blocks_at_the_ends_of_a_run_go_as_zero_extents() {
        use std::os::unix::fs::FileExt;

        use crate::rpc::Encoding;
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, mut reader) = all_stale_reader(dir.path());
        reader.compression = Chooser::new(None, CompressWhen::Auto).choice();
        // Blocks 0–1 and 13–15 of the first 64 KiB zero; all of the next.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("src.img"))
            .expect("open");
        file.write_all_at(&[0; 8192], 0).expect("zero");
        file.write_all_at(&[0; 3 * 4096], 13 * 4096).expect("zero");
        file.write_all_at(&vec![0; 65536], 65536).expect("zero");
        let runs = vec![0..65536, 65536..2 * 65536, 2 * 65536..3 * 65536];
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(reader.run(Runs::Ordered(runs.into_iter()), tx));
        let mut got = Vec::new();
        while let Some(done) = rx.recv().await {
            let (extent, leaves) = done.result.expect("read");
            assert_eq!(
                (extent.offset, u64::from(extent.length)),
                (done.run.start, done.run.end - done.run.start)
            );
            if extent.encoding == Encoding::Raw {
                assert_eq!(
                    extent.payload.as_ref(),
                    pattern(done.run.clone()).as_slice()
                );
            }
            got.push((done.run, extent.encoding, leaves.len()));
        }
        task.await.expect("the reader ends");
        assert_eq!(
            got,
            vec![
                (0..8192, Encoding::Zero, 1),
                (8192..13 * 4096, Encoding::Raw, 0),
                (13 * 4096..65536, Encoding::Zero, 0),
                (65536..2 * 65536, Encoding::Zero, 1),
                (2 * 65536..3 * 65536, Encoding::Raw, 1),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_region_reads_hash_the_regions_and_send_only_the_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stale, mut reader) = all_stale_reader(dir.path());
        reader.whole_regions = true;
        reader.compression = Chooser::new(None, CompressWhen::Auto).choice();
        // One run inside a region, one across two, one at the image's end.
        let runs = vec![
            (65536 + 4096)..(65536 + 8192),
            (3 * 65536 - 4096)..(3 * 65536 + 4096),
            (SIZE - 4096)..SIZE,
        ];
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(reader.run(Runs::Ordered(runs.clone().into_iter()), tx));
        let mut got = Vec::new();
        while let Some(done) = rx.recv().await {
            let (extent, leaves) = done.result.expect("read");
            assert_eq!(
                (extent.offset, u64::from(extent.length)),
                (done.run.start, done.run.end - done.run.start),
                "only the run is sent"
            );
            assert_eq!(
                extent.payload.as_ref(),
                pattern(done.run.clone()).as_slice()
            );
            for (i, leaf) in &leaves {
                let r = i * 65536..((i + 1) * 65536).min(SIZE);
                assert_eq!(*leaf, leaf_hash(&pattern(r)), "leaf {i}");
            }
            got.push(leaves.into_iter().map(|(i, _)| i).collect::<Vec<_>>());
        }
        task.await.expect("the reader ends");
        let last = SIZE / 65536 - 1;
        assert_eq!(got, vec![vec![1], vec![2, 3], vec![last]]);
        assert_eq!(stale.dirty_bytes(), SIZE - 4 * 65536);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_run_is_read_in_order_with_the_leaves_of_its_whole_regions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runs = vec![(1 << 20)..(2 << 20), 0..4096, (4 << 20)..(4 << 20) + 65536];
        let (stale, reader) = all_stale_reader(dir.path());
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(reader.run(Runs::Ordered(runs.clone().into_iter()), tx));
        let mut got = Vec::new();
        while let Some(done) = rx.recv().await {
            let (extent, leaves) = done.result.expect("read");
            assert_eq!(extent.offset, done.run.start);
            got.push((done.run, leaves.len()));
        }
        task.await.expect("the reader ends");
        let want: Vec<(Range<u64>, usize)> = runs.into_iter().zip([16, 0, 1]).collect();
        assert_eq!(got, want);
        // The regions hashed from the reads are no longer stale; the rest are.
        assert_eq!(stale.dirty_bytes(), SIZE - 17 * 65536);
    }

    #[tokio::test]
    async fn leaf_checksums_reuse_the_leaves_hashed_for_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Aligned to the 64 KiB regions; unaligned at both ends (partial pieces).
        let runs = vec![(1 << 20)..(1 << 20) + 262_144, 69_632..(4 << 20) - 8192];
        let (_stale, mut reader) = all_stale_reader(dir.path());
        reader.leaf_size = 65536;
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(reader.run(Runs::Ordered(runs.clone().into_iter()), tx));
        let mut got = Vec::new();
        while let Some(done) = rx.recv().await {
            let (extent, leaves) = done.result.expect("read");
            assert_eq!(extent.leaf_size, 65536);
            let pieces: Vec<Hash> =
                crate::checktree::pieces(done.run.start, done.run.end - done.run.start, 65536)
                    .map(|p| leaf_hash(&pattern(p)))
                    .collect();
            assert_eq!(
                extent.blake3.as_ref(),
                crate::checktree::leaf_list_hash(&pieces)
            );
            // The whole regions' leaves, for the tree, are the same hashes.
            for (i, leaf) in &leaves {
                assert_eq!(*leaf, leaf_hash(&pattern(i * 65536..(i + 1) * 65536)));
            }
            got.push(leaves.len());
        }
        task.await.expect("the reader ends");
        // The second run covers regions 2..=62; the first run took 16..=19.
        assert_eq!(got, vec![4, 57]);
    }
}
