//! The source's checksum tree, which the cutover verifies against the
//! destination's, and the tree shapes both sides agree on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::checktree::{CheckTree, Shape, hash_runs, zero_leaf_hash};
use crate::dirty::DirtyMap;
use crate::image::Image;

use super::{ReplicateError, Stats};

/// The source's checksum tree, kept fresh lazily: regions written since
/// they were hashed are marked stale (by the tracker) and rehashed on `refresh`.
pub struct LocalTree {
    pub(super) tree: CheckTree,
    pub(super) stale: Arc<DirtyMap>,
}

impl LocalTree {
    /// A tree whose every region is stale (nothing hashed yet).
    pub fn new(size: u64, region_size: u64) -> Result<LocalTree, ReplicateError> {
        let shape = Shape::new(size, region_size)?;
        let stale = Arc::new(DirtyMap::new(size, region_size)?);
        stale.mark_all();
        let tree = zero_tree(shape)?;
        Ok(LocalTree { tree, stale })
    }

    /// The map the tracker marks when the source is written.
    pub fn stale_map(&self) -> Arc<DirtyMap> {
        Arc::clone(&self.stale)
    }

    pub fn tree(&self) -> &CheckTree {
        &self.tree
    }

    /// Rehashes the stale regions (all at once: scattered regions are read
    /// concurrently); returns the bytes read.
    pub async fn refresh(&mut self, source: &Image, stats: &Stats) -> Result<u64, ReplicateError> {
        let shape = *self.tree.shape();
        let region = shape.region_size();
        let taken = self.stale.take_all(u64::MAX);
        let runs: Vec<std::ops::Range<u64>> = taken
            .iter()
            .map(|r| r.start / region..r.end.div_ceil(region))
            .collect();
        let leaves = match hash_runs(source, &shape, &runs).await {
            Ok(leaves) => leaves,
            Err(e) => {
                // Still stale: a later refresh reads them again.
                for r in &taken {
                    self.stale.mark(r.start, r.end - r.start);
                }
                return Err(e.into());
            }
        };
        self.tree.update_leaves(&leaves)?;
        let hashed: u64 = taken.iter().map(|r| r.end - r.start).sum();
        stats.hashed_bytes.fetch_add(hashed, Ordering::Relaxed);
        Ok(hashed)
    }
}

/// 16 KiB regions, doubled until the tree has at most 2^20 leaves (64 MiB
/// of hashes per side). Small, because a 4 KiB write rehashes its whole
/// region on both sides and the final rounds read it whole: at 5000 IOPS
/// 64 KiB regions left 20-34 ms of downtime, 16 KiB 11-17 ms. Not 4 KiB:
/// a 4 KiB leaf hashes about 40 % slower per byte than a 64 KiB one (its
/// SIMD lanes stay idle), which the bulk copy pays for every byte; 16 KiB
/// costs it about 8 %.
pub fn default_region_size(disk_size: u64) -> u64 {
    let mut region = 16 << 10;
    while disk_size.div_ceil(region) > 1 << 20 {
        region *= 2;
    }
    region
}

/// The tree of an all-zero image of `shape`: what a blank destination answers.
pub fn zero_tree(shape: Shape) -> Result<CheckTree, ReplicateError> {
    let count = shape.leaf_count();
    let full = zero_leaf_hash(shape.region_size());
    let mut leaves =
        vec![full; usize::try_from(count).expect("a tree has at most MAX_LEAVES (2^24)")];
    if let Some(last) = leaves.last_mut() {
        let r = shape.region(count - 1);
        if r.end - r.start != shape.region_size() {
            *last = zero_leaf_hash(r.end - r.start);
        }
    }
    Ok(CheckTree::from_leaves(shape, leaves)?)
}
