//! Rollback: the source becomes primary again after a cutover, with every
//! write the destination accepted copied back.

use std::path::Path;
use std::time::Instant;

use futures::TryStreamExt;

use crate::checktree::{CheckTree, Shape, hash_regions};
use crate::image::{Image, ImageOptions};
use crate::replicate::ReplicateError;
use crate::rpc::ReplicaClient;

use super::CutoverError;

/// What a rollback did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RollbackReport {
    pub epoch: u64,
    pub regions: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Makes the source primary again after a cutover: fences the destination
/// (a higher epoch, export read-only), finds the regions the destination
/// changed since (its checksum tree against the source's), copies them back
/// into the source and flushes it. The caller resumes the workload after.
/// `local` is the source's tree at the pause, if known (else it is computed).
pub async fn rollback(
    client: &mut ReplicaClient,
    source_path: &Path,
    local: Option<&CheckTree>,
) -> Result<RollbackReport, CutoverError> {
    let started = Instant::now();
    let source_err = |action: &'static str| {
        move |e: crate::image::ImageError| CutoverError::Source {
            action,
            path: source_path.display().to_string(),
            source: Box::new(e),
        }
    };
    let info = client.info().await?;
    // Only a destination that took over holds writes the source lacks; any
    // other's copy is older than the source.
    if !info.export_writable {
        return Err(CutoverError::NotPrimary { epoch: info.epoch });
    }
    let fence = info.epoch + 1;
    client.set_export_writable(fence, false).await?;
    let source = Image::open(
        source_path,
        &ImageOptions {
            direct: true,
            bulk_direct: false,
            ..ImageOptions::default()
        },
    )
    .map_err(source_err("open"))?;
    if source.size() != info.image_size {
        return Err(ReplicateError::SizeMismatch {
            source_size: source.size(),
            dest_size: info.image_size,
        }
        .into());
    }
    let tree = match local {
        Some(tree) => tree.clone(),
        None => CheckTree::from_image(&source, 1 << 20).await?,
    };
    let differing = client.diff_regions(&tree).await?;
    let shape: Shape = *tree.shape();
    let mut bytes = 0;
    let ranges: Vec<(u64, u32)> = differing
        .iter()
        .map(|&i| {
            let r = shape.region(i);
            let len = u32::try_from(r.end - r.start)
                .expect("a region is at most MAX_REGION_SIZE (1 GiB), which fits u32");
            (r.start, len)
        })
        .collect();
    for batch in ranges.chunks(64) {
        let mut extents = std::pin::pin!(client.read_ranges(batch, Some(1)).await?);
        while let Some((offset, data)) = extents.try_next().await? {
            bytes += data.len() as u64;
            source
                .write_at(offset, data, false)
                .await
                .map_err(source_err("write"))?;
        }
    }
    source.flush().await.map_err(source_err("flush"))?;
    // Check: with the copied regions rehashed, the source's root is the destination's.
    let mut tree = tree;
    let mut leaves = Vec::with_capacity(differing.len());
    for &i in &differing {
        let hash = hash_regions(&source, &shape, i..i + 1).await?;
        leaves.push((i, hash[0]));
    }
    tree.update_leaves(&leaves)?;
    let remote = client
        .tree_nodes(shape.region_size(), shape.levels() - 1, &[0])
        .await?;
    if remote.hashes.first() != Some(&tree.root()) {
        return Err(CutoverError::VerifyFailed {
            attempts: 1,
            regions: differing.len() as u64,
        });
    }
    tracing::info!(
        regions = differing.len(),
        bytes,
        epoch = fence,
        "rolled back: the source holds every write the destination accepted"
    );
    Ok(RollbackReport {
        epoch: fence,
        regions: differing.len() as u64,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
