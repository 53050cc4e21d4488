//! The destination's checksum tree, kept current by marking the regions each
//! completed write touches and rehashing only those when asked. A replica
//! write that covers whole regions brings their leaf hashes along, taken
//! from the data it wrote, so they need not be read back.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::checktree::{self, CheckTree, Hash, Shape};
use crate::image::{ChangeListener, Image};
use crate::rpc::RpcError;

/// The checksum tree of the last region size asked for, kept current by
/// marking the regions each completed write touched and rehashing only those.
#[derive(Default)]
pub(super) struct TreeCache {
    state: Mutex<Option<CachedTree>>,
    /// One refresh at a time; queries wait for the running one.
    refresh: tokio::sync::Mutex<()>,
    /// Writes that came another way (NBD), counted: a replica write that
    /// one completed beside cannot vouch for its leaves (the two may have
    /// reached the disk in either order).
    foreign: AtomicU64,
}

/// One write of a replica message, for [`TreeCache::written`]: its range,
/// and the leaf hashes of the whole regions it covers, from its data.
pub(super) struct Written {
    pub(super) range: Range<u64>,
    pub(super) leaves: Vec<(u64, Hash)>,
}

impl Written {
    /// The regions this write touches but does not cover whole (at most
    /// its first and last), as byte ranges: their leaves need a read.
    pub(super) fn partial_regions(&self, shape: &Shape) -> impl Iterator<Item = Range<u64>> {
        let touched = shape.regions_touching(self.range.start, self.range.end - self.range.start);
        let known = |index: u64| self.leaves.iter().any(|&(i, _)| i == index);
        let first = (!touched.is_empty()).then_some(touched.start);
        let last = (touched.end > touched.start + 1).then(|| touched.end - 1);
        first
            .into_iter()
            .chain(last)
            .filter(move |&index| !known(index))
            .map(|index| shape.region(index))
    }
}

/// What a replica message may know of the tree before it is written.
#[derive(Debug, Clone, Copy)]
pub(super) struct Vouch {
    /// The shape of the tree held, whose leaves the writes hash.
    pub(super) shape: Shape,
    /// [`TreeCache`]'s count of foreign writes before the message's writes
    /// were issued.
    foreign: u64,
}

struct CachedTree {
    /// Shared with the answers being built: a query takes a reference, not a
    /// copy (a tree of 4 KiB regions is tens of MiB, and a descent asks ~20 times).
    tree: Arc<CheckTree>,
    /// One bit per region: rehash before answering.
    dirty: Vec<u64>,
    /// Leaves hashed from the data a write just put there: set before
    /// answering, without a read. A region is never both here and dirty.
    known: HashMap<u64, Hash>,
}

impl CachedTree {
    fn mark(&mut self, region: u64) {
        self.dirty[(region / 64) as usize] |= 1 << (region % 64);
        self.known.remove(&region);
    }

    fn know(&mut self, region: u64, hash: Hash) {
        self.dirty[(region / 64) as usize] &= !(1 << (region % 64));
        self.known.insert(region, hash);
    }
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
                    cached.mark(region);
                }
            }
        }
    }

    /// What a replica message about to be written should hash its whole
    /// regions for; `None` while no tree is held (nothing to keep current).
    pub(super) fn vouch(&self) -> Option<Vouch> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let shape = *state.as_ref()?.tree.shape();
        Some(Vouch {
            shape,
            foreign: self.foreign.load(Ordering::SeqCst),
        })
    }

    /// Records a replica message's completed writes, in the message's
    /// order: the regions whose leaves came along take them, every other
    /// region touched is marked. The leaves are dropped (and their regions
    /// marked) when the tree changed shape or another writer completed
    /// since `vouch` was taken.
    pub(super) fn written(&self, vouch: Option<Vouch>, writes: Vec<Written>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(cached) = state.as_mut() else {
            return;
        };
        let shape = *cached.tree.shape();
        let trusted = vouch
            .is_some_and(|v| v.shape == shape && v.foreign == self.foreign.load(Ordering::SeqCst));
        for write in writes {
            let mut leaves = write.leaves.into_iter().peekable();
            let len = write.range.end - write.range.start;
            for region in shape.regions_touching(write.range.start, len) {
                match leaves.next_if(|&(index, _)| index == region) {
                    Some((_, hash)) if trusted => cached.know(region, hash),
                    _ => cached.mark(region),
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
            known: HashMap::new(),
        });
    }

    /// The region size of the tree held and the share of its regions that
    /// must be rehashed before it is current (0.0 to 1.0), if a tree is held.
    pub(super) fn held(&self) -> Option<(u64, f64)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.as_ref().map(|c| {
            // Known leaves cost no read: not stale.
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
                    known: HashMap::new(),
                });
            }
            let cached = state.as_mut().expect("cache filled just above");
            // Taken (cleared) before reading: a write completing from now on marks again.
            (
                std::mem::replace(&mut cached.dirty, vec![0; leaf_count.div_ceil(64)]),
                std::mem::take(&mut cached.known),
            )
        };
        let (dirty, known) = dirty;
        let runs = dirty_runs(&dirty, shape.leaf_count());
        let mut updates = match checktree::hash_runs(image, &shape, &runs).await {
            Ok(updates) => updates,
            Err(err) => {
                // Put the bits back so the next query retries these regions,
                // and the known leaves no newer write replaced.
                self.remark(&dirty, known);
                return Err(err.into());
            }
        };
        // Disjoint from the regions just read: a region is dirty or known.
        updates.extend(known);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = state.as_mut().expect("only refresh replaces the cache");
        if !updates.is_empty() {
            // Copies only if an answer still holds the old tree.
            Arc::make_mut(&mut cached.tree).update_leaves(&updates)?;
        }
        Ok(Arc::clone(&cached.tree))
    }

    fn remark(&self, bits: &[u64], known: HashMap<u64, Hash>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = state.as_mut() {
            for (word, bits) in cached.dirty.iter_mut().zip(bits) {
                *word |= bits;
            }
            for (region, hash) in known {
                let bit = 1 << (region % 64);
                let dirty = cached.dirty[(region / 64) as usize] & bit != 0;
                if !dirty {
                    cached.known.entry(region).or_insert(hash);
                }
            }
        }
    }
}

impl ChangeListener for TreeCache {
    fn changed(&self, offset: u64, len: u64) {
        // Counted first: a replica write completing from now on sees it.
        self.foreign.fetch_add(1, Ordering::SeqCst);
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
    use bytes::Bytes;

    use super::*;
    use crate::image::ImageOptions;

    const REGION: u64 = 16 << 10;

    fn fill(byte: u8) -> Bytes {
        Bytes::from(vec![byte; REGION as usize])
    }

    /// What the tree says of region `index` after a refresh.
    async fn leaf(cache: &TreeCache, image: &Image, index: u64) -> Hash {
        let tree = cache.refresh(image, REGION).await.expect("refresh");
        tree.node(0, index).expect("leaf")
    }

    fn whole(index: u64, claimed: u8) -> Written {
        let shape = Shape::new(4 * REGION, REGION).expect("shape");
        Written {
            range: index * REGION..(index + 1) * REGION,
            leaves: checktree::leaves_within(&shape, index * REGION, &fill(claimed)),
        }
    }

    fn part(index: u64) -> Written {
        Written {
            range: index * REGION + 512..index * REGION + 1024,
            leaves: Vec::new(),
        }
    }

    /// The leaves a replica write brings are taken without a read (the test
    /// tells it a hash of data the disk does not hold, so a read would
    /// show), and any later or concurrent write that brings none sends the
    /// region back to the disk.
    #[tokio::test]
    async fn leaves_from_a_replica_write_spare_the_read_and_yield_to_other_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = Image::open(
            &dir.path().join("t.img"),
            &ImageOptions {
                size: Some(4 * REGION),
                ..ImageOptions::default()
            },
        )
        .expect("open");
        for i in 0..4u8 {
            image
                .write_at(u64::from(i) * REGION, fill(i), false)
                .await
                .expect("write");
        }
        let cache = TreeCache::default();
        assert!(cache.vouch().is_none(), "nothing to keep current yet");
        let disk = |i: u8| checktree::leaf_hash(&fill(i));
        assert_eq!(leaf(&cache, &image, 1).await, disk(1));

        // Known leaves are used as they are.
        let vouch = cache.vouch();
        cache.written(vouch, vec![whole(1, 0xaa), whole(2, 0xbb)]);
        assert_eq!(leaf(&cache, &image, 1).await, disk(0xaa));
        assert_eq!(leaf(&cache, &image, 2).await, disk(0xbb));

        // A foreign write completed after the vouch: every region is read.
        let vouch = cache.vouch();
        cache.changed(3 * REGION, 1);
        cache.written(vouch, vec![whole(1, 0xcc)]);
        assert_eq!(leaf(&cache, &image, 1).await, disk(1));

        // A later write without leaves wins; so does a later one with them.
        let vouch = cache.vouch();
        cache.written(vouch, vec![whole(2, 0xdd)]);
        cache.written(vouch, vec![part(2)]);
        assert_eq!(leaf(&cache, &image, 2).await, disk(2));
        cache.written(vouch, vec![part(0), whole(0, 0xee)]);
        assert_eq!(leaf(&cache, &image, 0).await, disk(0xee));
        // In one message too: its order is the order written.
        cache.written(vouch, vec![whole(0, 0xee), part(0)]);
        assert_eq!(leaf(&cache, &image, 0).await, disk(0));

        // A tree of another region size cannot take them.
        let other = Vouch {
            shape: Shape::new(4 * REGION, 2 * REGION).expect("shape"),
            foreign: cache.foreign.load(Ordering::SeqCst),
        };
        cache.written(Some(other), vec![whole(3, 0x11)]);
        assert_eq!(leaf(&cache, &image, 3).await, disk(3));
    }

    #[test]
    fn only_the_ends_a_write_covers_in_part_need_a_read() {
        let shape = Shape::new(4 * REGION, REGION).expect("shape");
        let regions = |w: &Written| w.partial_regions(&shape).collect::<Vec<_>>();
        assert_eq!(regions(&part(2)), vec![2 * REGION..3 * REGION]);
        assert!(regions(&whole(1, 0)).is_empty());
        let across = |start: u64, end: u64| {
            let data = vec![0u8; usize::try_from(end - start).expect("small")];
            Written {
                range: start..end,
                leaves: checktree::leaves_within(&shape, start, &data),
            }
        };
        // Regions 0 and 3 in part, 1 and 2 whole.
        assert_eq!(
            regions(&across(100, 3 * REGION + 5)),
            vec![0..REGION, 3 * REGION..4 * REGION]
        );
        // Starts on a boundary: only the end is partial.
        assert_eq!(
            regions(&across(REGION, 2 * REGION + 1)),
            vec![2 * REGION..3 * REGION]
        );
    }

    #[test]
    fn dirty_runs_groups_adjacent_bits_across_words() {
        let mut bits = vec![0u64; 3];
        for i in [1u64, 2, 3, 63, 64, 65, 130] {
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        assert_eq!(dirty_runs(&bits, 140), vec![1..4, 63..66, 130..131]);
    }
}
