//! Which parts of an image file hold data, from the file system's extent
//! map (`SEEK_DATA`/`SEEK_HOLE`): a hole reads as zeroes, so hashing it needs
//! no read.

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use super::Image;

impl Image {
    /// The parts of `range` that may hold data, in order; everything else in
    /// `range` is a hole and reads as zeroes. `None` when the image cannot
    /// tell (a block device, or a file system without `SEEK_DATA`): then all
    /// of it may hold data.
    pub fn data_ranges(&self, range: Range<u64>) -> io::Result<Option<Vec<Range<u64>>>> {
        self.data_ranges_up_to(range, usize::MAX)
    }

    /// [`Image::data_ranges`], stopping after `max` runs of data: the list
    /// then covers `range` only up to the end of the last run (a caller that
    /// answers in bounded pieces, as NBD's block status does).
    pub fn data_ranges_up_to(
        &self,
        range: Range<u64>,
        max: usize,
    ) -> io::Result<Option<Vec<Range<u64>>>> {
        if self.inner.block_device {
            return Ok(None);
        }
        let end = range.end.min(self.size());
        let fd = self.inner.files.buffered.as_raw_fd();
        let mut out = Vec::new();
        let mut at = range.start;
        while at < end {
            let Some(data) = seek(fd, at, libc::SEEK_DATA)? else {
                break; // no data from `at` to the end of the file
            };
            if data >= end {
                break;
            }
            // SEEK_HOLE always finds one: the end of the file counts as a hole.
            let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
            let stop = hole.min(end);
            out.push(data..stop);
            at = stop;
            if out.len() >= max {
                break;
            }
        }
        Ok(Some(out))
    }
}

/// `lseek(fd, at, whence)`; `None` for `ENXIO` (no data past `at`).
///
/// Moving the shared file offset is harmless: every read and write of an
/// image names its offset (`pread`, `pwrite`, `io_uring`), and the result of a
/// racing `lseek` is still this call's answer.
fn seek(fd: i32, at: u64, whence: i32) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(at)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    // SAFETY: lseek only reads its integer arguments; `fd` is open for the
    // lifetime of the image that owns it.
    let got = unsafe { libc::lseek(fd, at, whence) };
    if got < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(
        u64::try_from(got).expect("lseek returned a non-negative offset"),
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use crate::image::{Image, ImageOptions};

    #[test]
    fn finds_the_written_parts_of_a_sparse_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("sparse.img");
        let file = std::fs::File::create(&path).expect("create the image");
        file.set_len(64 << 20).expect("size the image");
        file.write_all_at(&[7u8; 8192], 8 << 20)
            .expect("write the first data");
        file.write_all_at(&[9u8; 4096], 40 << 20)
            .expect("write the second data");
        file.sync_all().expect("sync the image");
        let image = Image::open(&path, &ImageOptions::default()).expect("open the image");

        let all = image
            .data_ranges(0..64 << 20)
            .expect("seek the image")
            .expect("a file knows its holes");
        // The file system may round data up to its block size, never down.
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all[0].start <= 8 << 20 && all[0].end >= (8 << 20) + 8192,
            "{all:?}"
        );
        assert!(
            all[1].start <= 40 << 20 && all[1].end >= (40 << 20) + 4096,
            "{all:?}"
        );
        assert!(all[0].end < 40 << 20, "{all:?}");

        let part = image
            .data_ranges((8 << 20) + 4096..40 << 20)
            .expect("seek the image")
            .expect("a file knows its holes");
        assert_eq!(part.len(), 1, "{part:?}");
        assert_eq!(
            part[0].start,
            (8 << 20) + 4096,
            "clipped to the range asked"
        );

        let none = image
            .data_ranges(16 << 20..32 << 20)
            .expect("seek the image")
            .expect("a file knows its holes");
        assert!(none.is_empty(), "{none:?}");
    }
}
