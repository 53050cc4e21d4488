//! Maps device bytes to offsets inside a disk image through FIEMAP, so that a
//! trace of the device under an image speaks in image coordinates.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::device::{BlockDevice, DeviceError};

/// Errors mapping an image's extents.
#[derive(Debug, thiserror::Error)]
pub enum FiemapError {
    /// The image cannot be opened.
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file system does not support FIEMAP.
    #[error(
        "FIEMAP on {path} failed: {source} (the image must live on a local file system such as ext4 or xfs)"
    )]
    Ioctl {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The device under the image cannot be resolved.
    #[error("cannot resolve the device under {path}: {source}")]
    Device { path: PathBuf, source: DeviceError },
}

// Linux uapi: <linux/fiemap.h>.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
/// Extents whose physical address is not a plain device location.
const UNMAPPABLE: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_NOT_ALIGNED;
const BATCH: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
#[allow(clippy::struct_field_names)] // the kernel's names
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
#[allow(clippy::struct_field_names)] // the kernel's names
struct FiemapRequest {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; BATCH],
}

const _: () = assert!(core::mem::size_of::<FiemapExtent>() == 56);

/// One run of the image on the whole disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the whole disk.
    pub disk: u64,
    /// Byte offset inside the image.
    pub image: u64,
    pub len: u64,
}

/// The image's extents, sorted by disk offset.
#[derive(Debug)]
pub struct ImageMap {
    path: PathBuf,
    file: File,
    /// Where the file system's device starts on its whole disk.
    base: u64,
    extents: Vec<Extent>,
    pub device: BlockDevice,
    pub image_size: u64,
}

impl ImageMap {
    /// Maps `path`, syncing delayed allocations first so every written byte has a place.
    pub fn open(path: &Path) -> Result<Self, FiemapError> {
        let file = File::open(path).map_err(|source| FiemapError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| FiemapError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let device = BlockDevice::from_numbers(libc::major(meta.dev()), libc::minor(meta.dev()))
            .map_err(|source| FiemapError::Device {
                path: path.to_path_buf(),
                source,
            })?;
        let mut map = ImageMap {
            path: path.to_path_buf(),
            file,
            base: device.start_bytes,
            extents: Vec::new(),
            device,
            image_size: meta.len(),
        };
        map.refresh_with(FIEMAP_FLAG_SYNC)?;
        Ok(map)
    }

    /// Re-reads the extents (without forcing writeback, which would disturb the workload).
    pub fn refresh(&mut self) -> Result<(), FiemapError> {
        self.refresh_with(0)
    }

    fn refresh_with(&mut self, flags: u32) -> Result<(), FiemapError> {
        let mut extents = Vec::new();
        let mut start = 0u64;
        let mut req = Box::new(FiemapRequest {
            fm_start: 0,
            fm_length: 0,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: 0,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); BATCH],
        });
        'outer: loop {
            req.fm_start = start;
            req.fm_length = u64::MAX - start;
            req.fm_flags = flags;
            req.fm_mapped_extents = 0;
            req.fm_extent_count = u32::try_from(BATCH).expect("BATCH (256) fits u32");
            // SAFETY: `req` is a properly laid out `struct fiemap` with room for
            // `fm_extent_count` extents, it outlives the call, and the fd is open.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), FS_IOC_FIEMAP, &raw mut *req) };
            if rc < 0 {
                return Err(FiemapError::Ioctl {
                    path: self.path.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
            let n = req.fm_mapped_extents as usize;
            if n == 0 {
                break;
            }
            for e in &req.fm_extents[..n.min(BATCH)] {
                if e.fe_flags & UNMAPPABLE == 0 && e.fe_length > 0 {
                    extents.push(Extent {
                        disk: self.base + e.fe_physical,
                        image: e.fe_logical,
                        len: e.fe_length,
                    });
                }
                start = e.fe_logical + e.fe_length;
                if e.fe_flags & FIEMAP_EXTENT_LAST != 0 {
                    break 'outer;
                }
            }
        }
        extents.sort_by_key(|e| e.disk);
        self.extents = extents;
        self.image_size = self.file.metadata().map_or(self.image_size, |m| m.len());
        Ok(())
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The parts of a disk byte range that belong to the image, as (image offset, length).
    /// Bytes outside the image (metadata, other files) are left out.
    pub fn map(&self, disk: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = disk.saturating_add(len);
        let first = self.extents.partition_point(|e| e.disk + e.len <= disk);
        self.extents[first..]
            .iter()
            .take_while(move |e| e.disk < end)
            .filter_map(move |e| {
                let lo = disk.max(e.disk);
                let hi = end.min(e.disk + e.len);
                (lo < hi).then(|| (e.image + (lo - e.disk), hi - lo))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(extents: Vec<Extent>) -> ImageMap {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        ImageMap {
            path: f.path().to_path_buf(),
            file: f.reopen().expect("reopen"),
            base: 0,
            extents,
            device: BlockDevice::from_numbers(7, 0).expect("loop0 exists"),
            image_size: 1 << 20,
        }
    }

    #[test]
    fn ranges_split_across_extents_and_skip_foreign_bytes() {
        let m = map_with(vec![
            Extent {
                disk: 1000,
                image: 0,
                len: 100,
            },
            Extent {
                disk: 5000,
                image: 100,
                len: 100,
            },
        ]);
        assert_eq!(m.map(0, 1000).collect::<Vec<_>>(), vec![]);
        assert_eq!(m.map(1050, 20).collect::<Vec<_>>(), vec![(50, 20)]);
        assert_eq!(
            m.map(1090, 3960).collect::<Vec<_>>(),
            vec![(90, 10), (100, 50)]
        );
        assert_eq!(m.map(6000, 10).collect::<Vec<_>>(), vec![]);
    }
}
