//! Checksum tree: blake3 over fixed-size regions of an image, combined into a
//! binary Merkle tree, so two hosts can find the regions that differ by
//! exchanging only the hashes along differing paths.
//!
//! Level 0 holds one hash per region (the last region may be short); each
//! higher level hashes pairs of the level below, and a node without a right
//! sibling is carried up unchanged. The top level holds the root.

pub mod saved;

use std::ops::Range;

use futures::{StreamExt, TryStreamExt, stream};

use crate::image::{Image, ImageError};

/// Length of one node hash.
pub const HASH_LEN: usize = 32;
/// One node hash.
pub type Hash = [u8; HASH_LEN];
/// Smallest region size accepted.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size accepted.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Most regions a tree may have (bounds memory: 32 B each, plus the upper levels).
pub const MAX_LEAVES: u64 = 1 << 24;

/// Largest single read while hashing an image.
const READ_CHUNK: u64 = 4 << 20;
/// Reads in flight while hashing an image.
const READS_IN_FLIGHT: usize = 4;

/// The tree's hash definition, named on the wire (`hash_scheme`) so that two
/// agents that would hash the same bytes differently refuse to compare.
/// 1 (earlier versions) put a domain byte before each hash's input, which
/// shifts the data off blake3's 1 KiB chunk grid and halves its speed on
/// 4–16 KiB regions (1.3 against 2.5 GB/s at 4 KiB, 2.1 against 4.8 at 16
/// KiB, measured here); 2 separates the domains by key instead.
pub const HASH_SCHEME: u32 = 2;

/// blake3 keys (32 bytes each) that keep leaves, nodes and an extent's leaf
/// list apart: no input of one kind hashes to a value of another.
const LEAF_KEY: &[u8; 32] = b"tern checksum tree 2: a leaf    ";
const NODE_KEY: &[u8; 32] = b"tern checksum tree 2: a node    ";
/// An extent's checksum over its pieces' leaf hashes (`Extent.leaf_size`).
const LEAF_LIST_KEY: &[u8; 32] = b"tern checksum tree 2: leaf list ";

/// Errors of the checksum tree.
#[derive(Debug, thiserror::Error)]
pub enum CheckTreeError {
    /// The region size is unusable.
    #[error(
        "region size {0} is not a power of two between {MIN_REGION_SIZE} and {MAX_REGION_SIZE}; pick one such as 1048576"
    )]
    BadRegionSize(u64),
    /// Too many regions for the image size.
    #[error(
        "an image of {image_size} bytes has more than {MAX_LEAVES} regions of {region_size} bytes; use a larger region size"
    )]
    TooManyRegions { image_size: u64, region_size: u64 },
    /// A level index out of range.
    #[error("level {level} does not exist: the tree has {levels} levels (0 = leaves)")]
    NoSuchLevel { level: u32, levels: u32 },
    /// A node index out of range.
    #[error("node {index} does not exist at level {level}, which has {len} nodes")]
    NoSuchNode { level: u32, index: u64, len: u64 },
    /// The wrong number of leaves for the shape.
    #[error("{got} leaf hashes given for a tree of {want} regions; pass one hash per region")]
    LeafCount { got: u64, want: u64 },
    /// The peer answered with the wrong number of hashes.
    #[error("{got} hashes fed for {want} asked nodes at level {level}; answer every asked node")]
    AnswerCount { level: u32, got: usize, want: usize },
    /// Two trees of different shapes cannot be compared.
    #[error(
        "cannot compare trees of different shapes ({a_size} bytes in {a_region}-byte regions vs {b_size} bytes in {b_region}-byte regions); hash both images with the same region size"
    )]
    ShapeMismatch {
        a_size: u64,
        a_region: u64,
        b_size: u64,
        b_region: u64,
    },
    /// Reading the image failed.
    #[error("cannot read {len} bytes at offset {offset} of the image to hash it: {source}")]
    Read {
        offset: u64,
        len: u64,
        #[source]
        source: ImageError,
    },
    /// A hashing task died.
    #[error("a hashing task stopped before finishing: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Image size and region size: everything that fixes a tree's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    image_size: u64,
    region_size: u64,
    leaf_count: u64,
    levels: u32,
}

impl Shape {
    /// Checks the region size and computes the layout.
    pub fn new(image_size: u64, region_size: u64) -> Result<Shape, CheckTreeError> {
        if !region_size.is_power_of_two()
            || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
        {
            return Err(CheckTreeError::BadRegionSize(region_size));
        }
        // An empty image still has one (empty) region, so every tree has a root.
        let leaf_count = image_size.div_ceil(region_size).max(1);
        if leaf_count > MAX_LEAVES {
            return Err(CheckTreeError::TooManyRegions {
                image_size,
                region_size,
            });
        }
        let mut levels = 1;
        let mut len = leaf_count;
        while len > 1 {
            len = len.div_ceil(2);
            levels += 1;
        }
        Ok(Shape {
            image_size,
            region_size,
            leaf_count,
            levels,
        })
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions (level-0 nodes).
    pub fn leaf_count(&self) -> u64 {
        self.leaf_count
    }

    /// Number of levels, leaves included; `levels() - 1` is the root's level.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Number of nodes at `level`.
    pub fn level_len(&self, level: u32) -> Result<u64, CheckTreeError> {
        if level >= self.levels {
            return Err(CheckTreeError::NoSuchLevel {
                level,
                levels: self.levels,
            });
        }
        let mut len = self.leaf_count;
        for _ in 0..level {
            len = len.div_ceil(2);
        }
        Ok(len)
    }

    /// Byte range of region `index` in the image.
    pub fn region(&self, index: u64) -> Range<u64> {
        let start = (index * self.region_size).min(self.image_size);
        let end = (start + self.region_size).min(self.image_size);
        start..end
    }

    /// The index of the region that is exactly `piece` (the short last region
    /// included), or `None` when `piece` is part of one or spans several.
    pub fn whole_region(&self, piece: &Range<u64>) -> Option<u64> {
        let index = piece.start / self.region_size;
        (self.region(index) == *piece && piece.start < piece.end).then_some(index)
    }

    /// Indices of the regions that overlap `offset..offset + len`.
    pub fn regions_touching(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.region_size;
        let last = (offset + len - 1) / self.region_size;
        first.min(self.leaf_count)..(last + 1).min(self.leaf_count)
    }
}

/// Hash of one region's data.
pub fn leaf_hash(data: &[u8]) -> Hash {
    *blake3::keyed_hash(LEAF_KEY, data).as_bytes()
}

/// The leaf hashes of the regions wholly inside `data`, written at
/// `offset`: the leaves a write of it makes, known without reading back.
pub fn leaves_within(shape: &Shape, offset: u64, data: &[u8]) -> Vec<(u64, Hash)> {
    let end = offset + data.len() as u64;
    shape
        .regions_touching(offset, data.len() as u64)
        .filter_map(|index| {
            let region = shape.region(index);
            let inside = region.start >= offset && region.end <= end && region.start < region.end;
            inside.then(|| {
                let at = usize::try_from(region.start - offset).expect("inside `data`");
                let to = usize::try_from(region.end - offset).expect("inside `data`");
                (index, leaf_hash(&data[at..to]))
            })
        })
        .collect()
}

/// The pieces of `offset..offset + len` cut at every multiple of
/// `leaf_size` (a power of two): whole regions of a tree of that region
/// size, with a partial piece at either end when the range is not aligned.
pub fn pieces(offset: u64, len: u64, leaf_size: u64) -> impl Iterator<Item = Range<u64>> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let next = (at / leaf_size + 1).saturating_mul(leaf_size).min(end);
            let piece = at..next;
            at = next;
            piece
        })
    })
}

/// The checksum of an extent cut into pieces ([`pieces`]), from their leaf
/// hashes in order: what an extent with a `leaf_size` carries, so that
/// neither side hashes its bytes twice (once for the checksum, once for the
/// tree).
pub fn leaf_list_hash<'a>(leaves: impl IntoIterator<Item = &'a Hash>) -> Hash {
    let mut hasher = blake3::Hasher::new_keyed(LEAF_LIST_KEY);
    for leaf in leaves {
        hasher.update(leaf);
    }
    *hasher.finalize().as_bytes()
}

/// Hash of a region of `len` zero bytes (a hole), without allocating `len` bytes.
pub fn zero_leaf_hash(len: u64) -> Hash {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut hasher = blake3::Hasher::new_keyed(LEAF_KEY);
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(ZEROES.len(), |l| l.min(ZEROES.len()));
        hasher.update(&ZEROES[..n]);
        left -= n as u64;
    }
    *hasher.finalize().as_bytes()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut both = [0u8; 64];
    both[..32].copy_from_slice(left);
    both[32..].copy_from_slice(right);
    *blake3::keyed_hash(NODE_KEY, &both).as_bytes()
}

/// A complete checksum tree of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTree {
    shape: Shape,
    /// `levels[0]` are the leaves, the last level is `[root]`.
    levels: Vec<Vec<Hash>>,
}

impl CheckTree {
    /// Builds the tree from one hash per region.
    pub fn from_leaves(shape: Shape, leaves: Vec<Hash>) -> Result<CheckTree, CheckTreeError> {
        if leaves.len() as u64 != shape.leaf_count {
            return Err(CheckTreeError::LeafCount {
                got: leaves.len() as u64,
                want: shape.leaf_count,
            });
        }
        let mut tree = CheckTree {
            shape,
            levels: vec![leaves],
        };
        tree.rebuild_upper_levels();
        Ok(tree)
    }

    /// Hashes an in-memory image.
    pub fn from_bytes(data: &[u8], region_size: u64) -> Result<CheckTree, CheckTreeError> {
        let shape = Shape::new(data.len() as u64, region_size)?;
        let leaves = (0..shape.leaf_count)
            .map(|i| {
                let r = shape.region(i);
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "the regions lie within `data`, whose length is a usize"
                )]
                let r = r.start as usize..r.end as usize;
                leaf_hash(&data[r])
            })
            .collect();
        CheckTree::from_leaves(shape, leaves)
    }

    /// Hashes every region of `image`.
    pub async fn from_image(image: &Image, region_size: u64) -> Result<CheckTree, CheckTreeError> {
        let shape = Shape::new(image.size(), region_size)?;
        let leaves = hash_regions(image, &shape, 0..shape.leaf_count).await?;
        CheckTree::from_leaves(shape, leaves)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The nodes at `level`.
    pub fn level(&self, level: u32) -> Result<&[Hash], CheckTreeError> {
        self.levels
            .get(level as usize)
            .map(Vec::as_slice)
            .ok_or(CheckTreeError::NoSuchLevel {
                level,
                levels: self.shape.levels,
            })
    }

    /// One node.
    pub fn node(&self, level: u32, index: u64) -> Result<Hash, CheckTreeError> {
        let nodes = self.level(level)?;
        usize::try_from(index)
            .ok()
            .and_then(|i| nodes.get(i))
            .copied()
            .ok_or(CheckTreeError::NoSuchNode {
                level,
                index,
                len: nodes.len() as u64,
            })
    }

    pub fn root(&self) -> Hash {
        self.levels[self.levels.len() - 1][0]
    }

    /// Replaces some leaves and recomputes the levels above them.
    pub fn update_leaves(&mut self, leaves: &[(u64, Hash)]) -> Result<(), CheckTreeError> {
        let mut touched = Vec::with_capacity(leaves.len());
        for &(index, hash) in leaves {
            let len = self.levels[0].len() as u64;
            let (i, slot) = usize::try_from(index)
                .ok()
                .and_then(|i| Some((i, self.levels[0].get_mut(i)?)))
                .ok_or(CheckTreeError::NoSuchNode {
                    level: 0,
                    index,
                    len,
                })?;
            *slot = hash;
            touched.push(i);
        }
        // Only the paths above the changed leaves are rehashed: O(k log n),
        // so a caller may update a few leaves at a time on a huge tree.
        touched.sort_unstable();
        touched.dedup();
        for level in 1..self.levels.len() {
            touched = touched.iter().map(|i| i / 2).collect();
            touched.dedup();
            let (lower, upper) = self.levels.split_at_mut(level);
            let below = &lower[level - 1];
            for &parent in &touched {
                let left = 2 * parent;
                upper[0][parent] = match below.get(left + 1) {
                    Some(right) => node_hash(&below[left], right),
                    None => below[left],
                };
            }
        }
        Ok(())
    }

    fn rebuild_upper_levels(&mut self) {
        while self.levels[self.levels.len() - 1].len() > 1 {
            let below = &self.levels[self.levels.len() - 1];
            let above = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [lone] => *lone,
                    _ => unreachable!("chunks(2) yields one or two nodes"),
                })
                .collect();
            self.levels.push(above);
        }
    }

    /// Indices of the regions whose hashes differ between `self` and
    /// `other`, found by descending only into differing subtrees.
    pub fn diff(&self, other: &CheckTree) -> Result<Vec<u64>, CheckTreeError> {
        if self.shape != other.shape {
            return Err(CheckTreeError::ShapeMismatch {
                a_size: self.shape.image_size,
                a_region: self.shape.region_size,
                b_size: other.shape.image_size,
                b_region: other.shape.region_size,
            });
        }
        let mut descent = Descent::new(self);
        while let Some((level, indices)) = descent.want() {
            let answer = indices
                .iter()
                .map(|&i| other.node(level, i))
                .collect::<Result<Vec<_>, _>>()?;
            descent.feed(&answer)?;
        }
        Ok(descent.finish())
    }
}

/// Hashes the regions `range` of `image`, in order (see [`hash_runs`]).
pub async fn hash_regions(
    image: &Image,
    shape: &Shape,
    range: Range<u64>,
) -> Result<Vec<Hash>, CheckTreeError> {
    Ok(hash_runs(image, shape, std::slice::from_ref(&range))
        .await?
        .into_iter()
        .map(|(_, hash)| hash)
        .collect())
}

/// Hashes the regions of every run of region indices in `runs`, with their
/// indices, in order. Consecutive regions smaller than a read are read
/// together, [`READ_CHUNK`] at a time, and the reads of every run go on at
/// once: a read and a hand-off per 4 KiB region, one run after another,
/// cost more than the hashing (a 1 GiB image in 4 KiB regions took ~50 s).
///
/// Regions that lie wholly in a hole of the image file are not read: they
/// hash as zeroes (a blank destination costs nothing to hash).
pub async fn hash_runs(
    image: &Image,
    shape: &Shape,
    runs: &[Range<u64>],
) -> Result<Vec<(u64, Hash)>, CheckTreeError> {
    let (runs, holes) = skip_holes(image, shape, runs);
    let mut hashed = hash_data_runs(image, shape, &runs).await?;
    if !holes.is_empty() {
        hashed.extend(holes);
        hashed.sort_unstable_by_key(|&(index, _)| index);
    }
    Ok(hashed)
}

/// Splits `runs` into the runs that must be read and the leaves of the
/// regions that lie wholly in holes. If the holes cannot be known, every
/// region is read.
fn skip_holes(
    image: &Image,
    shape: &Shape,
    runs: &[Range<u64>],
) -> (Vec<Range<u64>>, Vec<(u64, Hash)>) {
    let mut to_read = Vec::with_capacity(runs.len());
    let mut holes = Vec::new();
    let mut full_zero = None;
    for run in runs.iter().filter(|r| !r.is_empty()) {
        let bytes = shape.region(run.start).start..shape.region(run.end - 1).end;
        let data = match image.data_ranges(bytes) {
            Ok(Some(data)) => data,
            Ok(None) => {
                to_read.push(run.clone());
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the image for its holes; reading every region");
                to_read.push(run.clone());
                continue;
            }
        };
        let mut data = data.into_iter().peekable();
        let mut reading: Option<Range<u64>> = None;
        for index in run.clone() {
            let region = shape.region(index);
            while data.next_if(|d| d.end <= region.start).is_some() {}
            let has_data = data.peek().is_some_and(|d| d.start < region.end);
            if has_data {
                match reading.as_mut() {
                    Some(r) => r.end = index + 1,
                    None => reading = Some(index..index + 1),
                }
                continue;
            }
            to_read.extend(reading.take());
            let len = region.end - region.start;
            let hash = if len == shape.region_size() {
                *full_zero.get_or_insert_with(|| zero_leaf_hash(len))
            } else {
                zero_leaf_hash(len)
            };
            holes.push((index, hash));
        }
        to_read.extend(reading);
    }
    (to_read, holes)
}

async fn hash_data_runs(
    image: &Image,
    shape: &Shape,
    runs: &[Range<u64>],
) -> Result<Vec<(u64, Hash)>, CheckTreeError> {
    let shape = *shape;
    if shape.region_size() >= READ_CHUNK {
        let indices: Vec<u64> = runs.iter().flat_map(Clone::clone).collect();
        return stream::iter(indices)
            .map(|index| {
                let image = image.clone();
                async move {
                    hash_region(&image, shape.region(index))
                        .await
                        .map(|h| (index, h))
                }
            })
            .buffered(READS_IN_FLIGHT)
            .try_collect()
            .await;
    }
    let per_read = READ_CHUNK / shape.region_size();
    let mut groups: Vec<Range<u64>> = Vec::new();
    for run in runs {
        let mut first = run.start;
        while first < run.end {
            let end = (first + per_read).min(run.end);
            groups.push(first..end);
            first = end;
        }
    }
    let hashed: Vec<Vec<(u64, Hash)>> = stream::iter(groups)
        .map(|group| hash_group(image.clone(), shape, group))
        .buffered(GROUPS_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(hashed.into_iter().flatten().collect())
}

/// Reads of regions grouped by [`hash_runs`] in flight: many, since most
/// are single small regions (a delta's scattered writes) bound by latency.
const GROUPS_IN_FLIGHT: usize = 16;
/// Reads up to this long are hashed on the async worker: the hand-off to
/// the blocking pool costs more.
const HASH_INLINE: u64 = 64 << 10;

/// Hashes the consecutive regions `group`, all within one read.
async fn hash_group(
    image: Image,
    shape: Shape,
    group: Range<u64>,
) -> Result<Vec<(u64, Hash)>, CheckTreeError> {
    let start = shape.region(group.start).start;
    let end = shape.region(group.end - 1).end;
    let len = end - start;
    let data = image
        .read_at(
            start,
            u32::try_from(len).expect("at most READ_CHUNK (4 MiB)"),
        )
        .await
        .map_err(|source| CheckTreeError::Read {
            offset: start,
            len,
            source,
        })?;
    let hash_all = move || {
        group
            .map(|i| {
                let r = shape.region(i);
                let at = usize::try_from(r.start - start).expect("inside the read");
                let to = usize::try_from(r.end - start).expect("inside the read");
                (i, leaf_hash(&data[at..to]))
            })
            .collect::<Vec<_>>()
    };
    if len <= HASH_INLINE {
        return Ok(hash_all());
    }
    // Hashing megabytes is CPU work: keep it off the async workers.
    Ok(tokio::task::spawn_blocking(hash_all).await?)
}

async fn hash_region(image: &Image, region: Range<u64>) -> Result<Hash, CheckTreeError> {
    let mut hasher = blake3::Hasher::new_keyed(LEAF_KEY);
    let mut offset = region.start;
    while offset < region.end {
        let len = (region.end - offset).min(READ_CHUNK);
        let data =
            image
                .read_at(offset, len as u32)
                .await
                .map_err(|source| CheckTreeError::Read {
                    offset,
                    len,
                    source,
                })?;
        // Hashing megabytes is CPU work: keep it off the async workers.
        hasher = tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            hasher
        })
        .await?;
        offset += len;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// A walk from the root towards the differing leaves, one level at a time,
/// against a tree known only through answers to `want()` (e.g. a peer).
#[derive(Debug)]
pub struct Descent<'a> {
    local: &'a CheckTree,
    level: u32,
    frontier: Vec<u64>,
    done: bool,
    compared: u64,
}

impl<'a> Descent<'a> {
    pub fn new(local: &'a CheckTree) -> Descent<'a> {
        Descent {
            local,
            level: local.shape.levels - 1,
            frontier: vec![0],
            done: false,
            compared: 0,
        }
    }

    /// The level and node indices whose remote hashes are needed next, or
    /// `None` when the descent is over.
    pub fn want(&self) -> Option<(u32, &[u64])> {
        (!self.done).then_some((self.level, self.frontier.as_slice()))
    }

    /// Takes the remote hashes of the nodes last returned by `want()`.
    pub fn feed(&mut self, remote: &[Hash]) -> Result<(), CheckTreeError> {
        if remote.len() != self.frontier.len() {
            return Err(CheckTreeError::AnswerCount {
                level: self.level,
                got: remote.len(),
                want: self.frontier.len(),
            });
        }
        self.compared += remote.len() as u64;
        let nodes = self.local.level(self.level)?;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the frontier holds indices of the local tree's nodes, which fit usize"
        )]
        let differing = self
            .frontier
            .iter()
            .zip(remote)
            .filter(|&(&i, hash)| nodes[i as usize] != *hash)
            .map(|(&i, _)| i);
        if self.level == 0 {
            self.frontier = differing.collect();
            self.done = true;
            return Ok(());
        }
        let below = self.local.shape.level_len(self.level - 1)?;
        self.frontier = differing
            .flat_map(|i| [2 * i, 2 * i + 1])
            .filter(|&child| child < below)
            .collect();
        self.level -= 1;
        if self.frontier.is_empty() {
            self.done = true;
        }
        Ok(())
    }

    /// Remote nodes compared so far.
    pub fn compared(&self) -> u64 {
        self.compared
    }

    /// The differing region indices, ascending.
    pub fn finish(self) -> Vec<u64> {
        if self.done && self.level == 0 {
            self.frontier
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REGION: u64 = 4096;

    #[test]
    fn region_size_must_be_a_power_of_two_of_at_least_4k() {
        assert!(Shape::new(1 << 20, 4095).is_err());
        assert!(Shape::new(1 << 20, 6144).is_err());
        assert!(Shape::new(1 << 20, 2048).is_err());
        assert!(Shape::new(1 << 20, 8192).is_ok());
    }

    #[test]
    fn shape_counts_a_short_last_region_and_levels() {
        let shape = Shape::new(5 * REGION + 1, REGION).expect("valid shape");
        assert_eq!(shape.leaf_count(), 6);
        // 6 → 3 → 2 → 1
        assert_eq!(shape.levels(), 4);
        assert_eq!(shape.level_len(1).expect("level 1"), 3);
        assert_eq!(shape.region(5), 5 * REGION..5 * REGION + 1);
        assert_eq!(shape.regions_touching(REGION - 1, 2), 0..2);
        assert_eq!(shape.regions_touching(0, 0), 0..0);
    }

    #[test]
    fn a_whole_region_is_named_by_its_index_and_nothing_else_is() {
        let shape = Shape::new(5 * REGION + 1, REGION).expect("valid shape");
        assert_eq!(shape.whole_region(&(REGION..2 * REGION)), Some(1));
        // The short last region is whole at its own length.
        assert_eq!(shape.whole_region(&(5 * REGION..5 * REGION + 1)), Some(5));
        assert_eq!(shape.whole_region(&(REGION..2 * REGION - 1)), None);
        assert_eq!(shape.whole_region(&(REGION + 1..2 * REGION)), None);
        assert_eq!(shape.whole_region(&(REGION..3 * REGION)), None);
        assert_eq!(shape.whole_region(&(5 * REGION + 1..5 * REGION + 1)), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scattered_runs_hash_like_each_region_alone() {
        // Not a multiple of any region size: the last region is short.
        let size: u64 = (9 << 20) + 12_288;
        let data: Vec<u8> = (0..size)
            .map(|i| u8::try_from((i / 4096 * 31 + i % 13) % 256).expect("below 256"))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, &data).expect("write");
        let image = Image::open(
            &path,
            &crate::image::ImageOptions {
                size: None,
                read_only: true,
                direct: false,
                bulk_direct: false,
            },
        )
        .expect("open");
        for region in [4096u64, 65536, 8 << 20] {
            let shape = Shape::new(size, region).expect("shape");
            let n = shape.leaf_count();
            let runs = vec![0..1, 3..(n / 2).max(4).min(n), (n - 1)..n];
            let got = hash_runs(&image, &shape, &runs).await.expect("hash");
            assert_eq!(got, leaves_of(&data, &shape, &runs), "region size {region}");
        }
    }

    /// The leaves of `runs`, hashed from `data` one region at a time.
    fn leaves_of(data: &[u8], shape: &Shape, runs: &[Range<u64>]) -> Vec<(u64, Hash)> {
        runs.iter()
            .flat_map(Clone::clone)
            .map(|i| {
                let r = shape.region(i);
                let slice = &data[usize::try_from(r.start).expect("small")
                    ..usize::try_from(r.end).expect("small")];
                (i, leaf_hash(slice))
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn regions_in_holes_hash_as_zeroes_without_changing_any_leaf() {
        use std::os::unix::fs::FileExt as _;
        // Data at a few places of a sparse file, one of them straddling two
        // 64 KiB regions, one in the short last region.
        let size: u64 = (16 << 20) + 12_288;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(size).expect("size");
        let mut data = vec![0u8; usize::try_from(size).expect("small")];
        for (at, len, byte) in [
            (0u64, 4096usize, 1u8),
            ((3 << 20) + 61_440, 8192, 2),
            (9 << 20, 100_000, 3),
            (size - 4096, 4096, 4),
        ] {
            let block = vec![byte; len];
            file.write_all_at(&block, at).expect("write");
            let at = usize::try_from(at).expect("small");
            data[at..at + len].copy_from_slice(&block);
        }
        file.sync_all().expect("sync");
        let image = Image::open(&path, &crate::image::ImageOptions::default()).expect("open");
        for region in [4096u64, 65536, 1 << 20] {
            let shape = Shape::new(size, region).expect("shape");
            let n = shape.leaf_count();
            let whole: Vec<Range<u64>> = std::iter::once(0..n).collect();
            for runs in [whole, vec![1..3, 40..(n / 2), (n - 2)..n]] {
                let got = hash_runs(&image, &shape, &runs).await.expect("hash");
                assert_eq!(
                    got,
                    leaves_of(&data, &shape, &runs),
                    "region size {region}, runs {runs:?}"
                );
            }
        }
        assert_eq!(zero_leaf_hash(200_000), leaf_hash(&vec![0u8; 200_000]));
    }

    #[test]
    fn identical_images_have_equal_roots_and_no_diff() {
        let data: Vec<u8> = (0..10 * REGION).map(|i| (i % 251) as u8).collect();
        let a = CheckTree::from_bytes(&data, REGION).expect("tree a");
        let b = CheckTree::from_bytes(&data, REGION).expect("tree b");
        assert_eq!(a.root(), b.root());
        assert!(a.diff(&b).expect("same shape").is_empty());
    }

    #[test]
    fn one_changed_byte_is_found_comparing_few_nodes() {
        let a_data = vec![7u8; (1024 * REGION) as usize];
        let mut b_data = a_data.clone();
        b_data[(700 * REGION + 13) as usize] ^= 1;
        let a = CheckTree::from_bytes(&a_data, REGION).expect("tree a");
        let b = CheckTree::from_bytes(&b_data, REGION).expect("tree b");
        let mut descent = Descent::new(&a);
        while let Some((level, idx)) = descent.want() {
            let answer: Vec<Hash> = idx
                .iter()
                .map(|&i| b.node(level, i).expect("node"))
                .collect();
            descent.feed(&answer).expect("feed");
        }
        // Root plus two children per level below it: far fewer than 1024 leaves.
        assert_eq!(descent.compared(), 1 + 2 * 10);
        assert_eq!(descent.finish(), vec![700]);
    }

    #[test]
    fn update_leaves_matches_a_fresh_tree() {
        let mut data = vec![0u8; (9 * REGION) as usize];
        let mut tree = CheckTree::from_bytes(&data, REGION).expect("tree");
        data[(4 * REGION) as usize] = 9;
        let r = tree.shape().region(4);
        tree.update_leaves(&[(4, leaf_hash(&data[r.start as usize..r.end as usize]))])
            .expect("update");
        assert_eq!(tree, CheckTree::from_bytes(&data, REGION).expect("fresh"));
    }

    proptest::proptest! {
        #[test]
        fn updating_any_leaves_of_any_shape_matches_a_fresh_tree(
            regions in 1u64..40,
            tail in 0u64..REGION,
            changes in proptest::collection::vec((0u64..40, 1u8..=255), 1..8),
        ) {
            let size = (regions - 1) * REGION + tail.max(1);
            let mut data = vec![0u8; size as usize];
            let mut tree = CheckTree::from_bytes(&data, REGION).expect("tree");
            let count = tree.shape().leaf_count();
            // A region changed twice: the later hash wins, as in the data.
            let mut latest = std::collections::BTreeMap::new();
            for (i, byte) in changes {
                let i = i % count;
                let r = tree.shape().region(i);
                data[r.start as usize] = byte;
                latest.insert(i, leaf_hash(&data[r.start as usize..r.end as usize]));
            }
            let leaves: Vec<(u64, Hash)> = latest.into_iter().collect();
            tree.update_leaves(&leaves).expect("update");
            proptest::prop_assert_eq!(tree, CheckTree::from_bytes(&data, REGION).expect("fresh"));
        }
    }

    #[test]
    fn trees_of_different_shapes_refuse_to_diff() {
        let a = CheckTree::from_bytes(&[0; 8192], REGION).expect("a");
        let b = CheckTree::from_bytes(&[0; 8192], 8192).expect("b");
        assert!(matches!(
            a.diff(&b),
            Err(CheckTreeError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn empty_image_has_one_root() {
        let a = CheckTree::from_bytes(&[], REGION).expect("empty");
        assert_eq!(a.shape().levels(), 1);
        assert!(a.diff(&a.clone()).expect("diff").is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn diff_finds_exactly_the_changed_regions(
            regions in 1u64..300,
            tail in 0u64..REGION,
            seed in any::<u64>(),
            changes in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..20),
        ) {
            let size = regions * REGION + tail;
            let mut a = vec![0u8; size as usize];
            let mut x = seed | 1;
            for byte in &mut a {
                // xorshift: cheap random content
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *byte = x as u8;
            }
            let mut b = a.clone();
            let shape = Shape::new(size, REGION).expect("shape");
            let mut expected = std::collections::BTreeSet::new();
            for (pos, flip) in &changes {
                let pos = pos % size;
                let flip = flip | 1; // never a no-op
                b[pos as usize] ^= flip;
                expected.insert(pos / REGION);
            }
            // A region changed twice at the same byte by the same flip is back to equal:
            // recompute the truth from the bytes, not from the change list.
            expected.retain(|&r| {
                let range = shape.region(r);
                a[range.start as usize..range.end as usize] != b[range.start as usize..range.end as usize]
            });
            let ta = CheckTree::from_bytes(&a, REGION).expect("a");
            let tb = CheckTree::from_bytes(&b, REGION).expect("b");
            let found = ta.diff(&tb).expect("same shape");
            prop_assert_eq!(found, expected.into_iter().collect::<Vec<_>>());
        }
    }
}
