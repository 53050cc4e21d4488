//! The destination's checksum tree, kept current by marking the regions each
//! completed write touches and rehashing only those when asked.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use crate::checktree::{self, CheckTree, Shape};
use crate::image::{ChangeListener, Image};
use crate::rpc::RpcError;

/// The checksum tree of the last region size asked for, kept current by
/// marking the regions each completed write touched and rehashing only those.
#[derive(Default)]
pub(super) struct TreeCache {
    state: Mutex<Option<CachedTree>>,
    /// One refresh at a time; queries wait for the running one.
    refresh: tokio::sync::Mutex<()>,
}

struct CachedTree {
    /// Shared with the answers being built: a query takes a reference, not a
    /// copy (a tree of 4 KiB regions is tens of MiB, and a descent asks ~20 times).
    tree: Arc<CheckTree>,
    /// One bit per region: rehash before answering.
    dirty: Vec<u64>,
}

impl TreeCache {
    /// Marks the regions of a completed write. Called after the write, so a
    /// refresh that started earlier cannot hide it.
    pub(super) fn mark_dirty(&self, offset: u64, len: u64) {
        self.mark_dirty_all(std::iter::once(offset..offset + len));
    }

    /// Marks the regions of several completed writes, under one lock.
    pub(super) fn mark_dirty_all(&self, writes: impl IntoIterator<Item = Range<u64>>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = state.as_mut() {
            let shape = *cached.tree.shape();
            for write in writes {
                for region in shape.regions_touching(write.start, write.end - write.start) {
                    cached.dirty[(region / 64) as usize] |= 1 << (region % 64);
                }
            }
        }
    }

    /// Starts from `tree` (a saved tree the image was checked to still
    /// match): nothing to rehash until the image is written.
    pub(super) fn preload(&self, tree: CheckTree) {
        let leaf_count = usize::try_from(tree.shape().leaf_count())
            .expect("a tree has at most MAX_LEAVES (2^24) leaves");
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = Some(CachedTree {
            tree: Arc::new(tree),
            dirty: vec![0; leaf_count.div_ceil(64)],
        });
    }

    /// The region size of the tree held and the share of its regions that
    /// must be rehashed before it is current (0.0 to 1.0), if a tree is held.
    pub(super) fn held(&self) -> Option<(u64, f64)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.as_ref().map(|c| {
            let stale_regions: u32 = c.dirty.iter().map(|w| w.count_ones()).sum();
            let count = u32::try_from(c.tree.shape().leaf_count().max(1))
                .expect("a tree has at most MAX_LEAVES (2^24) leaves");
            (
                c.tree.shape().region_size(),
                f64::from(stale_regions) / f64::from(count),
            )
        })
    }

    /// Brings the tree for `region_size` up to date and returns it.
    pub(super) async fn refresh(
        &self,
        image: &Image,
        region_size: u64,
    ) -> Result<Arc<CheckTree>, RpcError> {
        let _one_at_a_time = self.refresh.lock().await;
        let shape = Shape::new(image.size(), region_size)?;
        let leaf_count = usize::try_from(shape.leaf_count())
            .expect("a tree has at most MAX_LEAVES (2^24) leaves");
        let dirty = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let reuse = state.as_ref().is_some_and(|c| *c.tree.shape() == shape);
            if !reuse {
                let leaves = vec![[0u8; checktree::HASH_LEN]; leaf_count];
                let mut dirty = vec![u64::MAX; leaf_count.div_ceil(64)];
                if let Some(last) = dirty.last_mut() {
                    let used = shape.leaf_count() % 64;
                    if used != 0 {
                        *last = (1u64 << used) - 1;
                    }
                }
                *state = Some(CachedTree {
                    tree: Arc::new(CheckTree::from_leaves(shape, leaves)?),
                    dirty,
                });
            }
            let cached = state.as_mut().expect("cache filled just above");
            // Taken (cleared) before reading: a write completing from now on marks again.
            std::mem::replace(&mut cached.dirty, vec![0; leaf_count.div_ceil(64)])
        };
        let runs = dirty_runs(&dirty, shape.leaf_count());
        let updates = match checktree::hash_runs(image, &shape, &runs).await {
            Ok(updates) => updates,
            Err(err) => {
                // Put the bits back so the next query retries these regions.
                self.remark(&dirty);
                return Err(err.into());
            }
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = state.as_mut().expect("only refresh replaces the cache");
        if !updates.is_empty() {
            // Copies only if an answer still holds the old tree.
            Arc::make_mut(&mut cached.tree).update_leaves(&updates)?;
        }
        Ok(Arc::clone(&cached.tree))
    }

    fn remark(&self, bits: &[u64]) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = state.as_mut() {
            for (word, bits) in cached.dirty.iter_mut().zip(bits) {
                *word |= bits;
            }
        }
    }
}

impl ChangeListener for TreeCache {
    fn changed(&self, offset: u64, len: u64) {
        self.mark_dirty(offset, len);
    }
}

/// Contiguous runs of set bits, as region ranges.
fn dirty_runs(bits: &[u64], count: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        if word == 0 {
            continue;
        }
        for b in 0..64 {
            let i = w as u64 * 64 + b;
            if i >= count {
                break;
            }
            if word & (1 << b) != 0 {
                match runs.last_mut() {
                    Some(run) if run.end == i => run.end = i + 1,
                    _ => runs.push(i..i + 1),
                }
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_groups_adjacent_bits_across_words() {
        let mut bits = vec![0u64; 3];
        for i in [1u64, 2, 3, 63, 64, 65, 130] {
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        assert_eq!(dirty_runs(&bits, 140), vec![1..4, 63..66, 130..131]);
    }
}
