//! The delta pass by checksums, pipelined: the source's stale regions are
//! hashed a chunk of the tree at a time by a task that runs ahead, each
//! chunk is compared with the destination's as soon as it is hashed, and
//! what differs in it is sent while the next chunks are hashed. Hashing the
//! whole tree first and sending afterwards made the two wait for each other
//! (a 1 GiB source in 4 KiB regions: ~0.9 s of hashing, then the sending).
//!
//! Why the answers stay true while the pass writes: the destination's nodes
//! of every chunk are asked for before anything is sent, and each round of
//! the pass sends only runs below the end of the chunks already compared,
//! so no chunk is written before it is compared. The workload's own writes
//! (a live source) mark the send map and the stale map as always; the runs
//! past the compared chunks wait for a later chunk's round, or the next
//! round after the pass.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::checktree::{CheckTreeError, Hash, Shape, hash_runs};
use crate::dirty::DirtyMap;
use crate::image::Image;

use super::ReplicateError;
use super::engine::Replicator;
use super::pipeline::{MapRuns, Runs};
use super::stats::Round;

/// A chunk of the tree covers about this many bytes of the image: large
/// enough that a chunk's comparison (one call, two for a chunk that differs)
/// is rare, small enough that sending starts early.
const CHUNK_BYTES: u64 = 32 << 20;
/// Chunks hashed ahead of the comparison at most.
const CHUNKS_AHEAD: usize = 2;

/// What the hashing task hands over: a chunk's index and its fresh leaves.
type Hashed = (u64, Result<Vec<(u64, Hash)>, CheckTreeError>);

/// The tree level whose nodes are the chunks: each covers 2^level regions.
fn chunk_level(shape: &Shape) -> u32 {
    let per_chunk = (CHUNK_BYTES / shape.region_size()).max(1);
    per_chunk.ilog2().min(shape.levels() - 1)
}

/// The regions (leaf indices) of chunk `chunk` at `level`.
fn chunk_regions(shape: &Shape, level: u32, chunk: u64) -> Range<u64> {
    let start = chunk << level;
    start..((chunk + 1) << level).min(shape.leaf_count())
}

/// Hashes the stale regions of every chunk in turn into `tx`. A chunk whose
/// leaves are not handed over (an error, or the pass stopped) is marked
/// stale again: nothing hashed and dropped is believed fresh.
async fn hash_chunks(
    source: Image,
    stale: Arc<DirtyMap>,
    shape: Shape,
    level: u32,
    tx: mpsc::Sender<Hashed>,
) {
    let chunks = shape
        .level_len(level)
        .expect("the level is below the tree's levels");
    for chunk in 0..chunks {
        // Taken before reading: a write from now on marks its region again.
        let taken = stale.take_units(chunk_regions(&shape, level, chunk));
        let result = hash_runs(&source, &shape, &taken).await;
        let failed = result.is_err();
        let handed = tx.send((chunk, result)).await.is_ok();
        if failed || !handed {
            // Its leaves never reach the tree; the chunks not yet taken are still stale.
            for run in &taken {
                stale.mark_units(run.clone());
            }
            return;
        }
    }
}

impl Replicator {
    /// Delta sync by checksums: marks and sends the regions where the
    /// source differs from the destination, comparing and sending chunk by
    /// chunk while the source is still being hashed, then a barrier.
    /// Returns the number of differing regions and the pass as a round.
    /// With a plan's units or an order for the next round it compares
    /// first and sends after, as one round.
    pub async fn delta_pass(&mut self) -> Result<(u64, Round), ReplicateError> {
        if self.opts.unit_zones.is_some() || self.order.is_some() {
            let differing = self.mark_differences().await?;
            return Ok((differing, self.round(false).await?));
        }
        let started = Instant::now();
        let before = self.stats.snapshot();
        let shape = *self.local.tree().shape();
        let level = chunk_level(&shape);
        let chunks: Vec<u64> = (0..shape.level_len(level)?).collect();
        // Asked before anything is sent: see the module's comment.
        let remote_chunks = self.client.nodes_of(shape, level, &chunks).await?;

        let (tx, mut rx) = mpsc::channel(CHUNKS_AHEAD);
        let hashing = tokio::spawn(hash_chunks(
            self.source.clone(),
            self.local.stale_map(),
            shape,
            level,
            tx,
        ));
        let result = self
            .compare_and_send(&shape, level, &remote_chunks, &mut rx)
            .await;
        // Stops the task if the pass failed: it marks what it holds stale again.
        drop(rx);
        hashing.await.map_err(crate::rpc::RpcError::from)?;
        let differing = result?;
        self.barrier().await?;
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        Ok((
            differing,
            Round::since(&before, &self.stats.snapshot(), started),
        ))
    }

    /// The pass's side of the pipeline: takes each hashed chunk into the
    /// local tree, compares it, marks its differing regions and sends what
    /// is marked below its end.
    async fn compare_and_send(
        &mut self,
        shape: &Shape,
        level: u32,
        remote_chunks: &[Hash],
        rx: &mut mpsc::Receiver<Hashed>,
    ) -> Result<u64, ReplicateError> {
        let mut differing = 0;
        self.stats.round_bytes.store(0, Ordering::Relaxed);
        self.stats.round_done.store(0, Ordering::Relaxed);
        while let Some((chunk, leaves)) = rx.recv().await {
            let regions = chunk_regions(shape, level, chunk);
            let leaves = match leaves {
                Ok(leaves) => leaves,
                Err(e) => return Err(e.into()),
            };
            self.stats.hashed_bytes.fetch_add(
                leaves
                    .iter()
                    .map(|&(i, _)| shape.region(i).end - shape.region(i).start)
                    .sum(),
                Ordering::Relaxed,
            );
            self.local.tree.update_leaves(&leaves)?;
            let index = usize::try_from(chunk).expect("a chunk index below the leaf count");
            let mut chunk_bytes = 0;
            if self.local.tree().node(level, chunk)? != remote_chunks[index] {
                let indices: Vec<u64> = regions.clone().collect();
                let remote = self.client.nodes_of(*shape, 0, &indices).await?;
                let local = self.local.tree().level(0)?;
                for (&i, theirs) in indices.iter().zip(&remote) {
                    let ours = local[usize::try_from(i).expect("a leaf index of the local tree")];
                    if ours != *theirs {
                        let r = shape.region(i);
                        self.send.mark(r.start, r.end - r.start);
                        chunk_bytes += r.end - r.start;
                        differing += 1;
                    }
                }
            }
            let end = shape.region(regions.end - 1).end;
            self.stats
                .round_bytes
                .fetch_add(chunk_bytes, Ordering::Relaxed);
            let runs = MapRuns::below(Arc::clone(&self.send), u64::from(self.opts.extent_len), end);
            self.send_runs(Runs::Map(runs), false).await?;
        }
        Ok(differing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_tree_in_aligned_powers_of_two() {
        // 1 GiB in 4 KiB regions: 8192 regions (32 MiB) per chunk.
        let shape = Shape::new(1 << 30, 4096).expect("shape");
        let level = chunk_level(&shape);
        assert_eq!(level, 13);
        assert_eq!(chunk_regions(&shape, level, 1), 8192..16384);
        // A tree smaller than a chunk is one chunk: the root.
        let small = Shape::new(5 << 20, 65536).expect("shape");
        let level = chunk_level(&small);
        assert_eq!(level, small.levels() - 1);
        assert_eq!(small.level_len(level).expect("level"), 1);
        assert_eq!(chunk_regions(&small, level, 0), 0..80);
        // An odd leaf count: the last chunk is short.
        let odd = Shape::new((100 << 20) + 4096, 1 << 20).expect("shape");
        let level = chunk_level(&odd);
        let last = odd.level_len(level).expect("level") - 1;
        assert_eq!(chunk_regions(&odd, level, last).end, odd.leaf_count());
    }
}
