//! Guest RAM as a shared file (QEMU `memory-backend-file,share=on`), laid out
//! so that the host can see which 4 KiB pages the guest dirties.
//!
//! A guest store dirties the file's page cache; it reaches the disk, and the
//! tracer, only when written back, one folio at a time, and writeback
//! write-protects the folio again so the next store faults and re-dirties it.
//! The page cache allocates large folios on readahead and on mmap faults (2
//! MiB ones for QEMU, which asks for huge pages on guest RAM with
//! `MADV_HUGEPAGE`), so one store would mark a whole large folio: measured in a
//! VM here, 54 MiB/s "dirtied" against 2.4 MiB/s with 4 KiB folios
//! (docs/vm-tests.md). [`prepare`] fills the file's page cache with 4 KiB
//! folios before QEMU maps it: blocks allocated, cached folios dropped, then
//! one 4 KiB buffered read per page with readahead off (`POSIX_FADV_RANDOM`
//! makes the kernel read exactly what is asked, into order-0 folios). QEMU's
//! faults then find those pages and allocate nothing larger.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The unit the guest's RAM is tracked in.
pub const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RamFileError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, more than --size {size}: refusing to cut guest RAM short")]
    Larger { path: PathBuf, len: u64, size: u64 },
    #[error("the size must be a positive multiple of 4 KiB, not {0}")]
    Size(u64),
    #[error(
        "{0} is not a regular file: guest RAM for tracking lives in a file on a block-backed file system"
    )]
    NotAFile(PathBuf),
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Bytes added to reach the size (allocated, reading as zeros).
    pub grown_bytes: u64,
    /// 4 KiB pages now in the page cache.
    pub pages: u64,
}

/// Makes `path` a guest-RAM file of `size` bytes whose page cache holds 4 KiB
/// folios: creates or grows it (existing contents are kept), allocates its
/// blocks, drops its cached folios and reads it back one page at a time.
/// Run it before QEMU maps the file: folios a running mapping holds are not
/// dropped. `progress` is called now and then with the bytes done.
pub fn prepare(
    path: &Path,
    size: u64,
    mut progress: impl FnMut(u64),
) -> Result<Prepared, RamFileError> {
    if size == 0 || !size.is_multiple_of(PAGE) {
        return Err(RamFileError::Size(size));
    }
    let io = |action: &'static str| {
        move |source| RamFileError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("open"))?;
    let meta = file.metadata().map_err(io("stat"))?;
    if !meta.is_file() {
        return Err(RamFileError::NotAFile(path.to_path_buf()));
    }
    let len = meta.len();
    if len > size {
        return Err(RamFileError::Larger {
            path: path.to_path_buf(),
            len,
            size,
        });
    }
    // Allocated blocks: writeback then lands where the tracer's extent map
    // says, instead of allocating (and moving) blocks as the guest runs.
    let len_arg = i64::try_from(size).map_err(|_| RamFileError::Size(size))?;
    // SAFETY: `file` is an open descriptor; mode 0 allocates and keeps data.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_arg) } != 0 {
        return Err(io("allocate")(std::io::Error::last_os_error()));
    }
    file.sync_data().map_err(io("write back"))?;
    advise(&file, libc::POSIX_FADV_DONTNEED).map_err(io("drop cached folios"))?;
    advise(&file, libc::POSIX_FADV_RANDOM).map_err(io("turn readahead off"))?;
    let pages = read_pages(&file, size, &mut progress).map_err(io("read"))?;
    Ok(Prepared {
        grown_bytes: size - len,
        pages,
    })
}

fn advise(file: &File, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `file` is an open descriptor; offset 0 and length 0 mean the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// One buffered 4 KiB read per page: with readahead off each makes one
/// order-0 folio.
fn read_pages(file: &File, size: u64, progress: &mut impl FnMut(u64)) -> std::io::Result<u64> {
    #[expect(clippy::cast_possible_truncation, reason = "PAGE is 4096")]
    let mut page = [0u8; PAGE as usize];
    let mut told = Instant::now();
    let mut at = 0;
    while at < size {
        file.read_exact_at(&mut page, at)?;
        at += PAGE;
        if told.elapsed() >= Duration::from_secs(1) {
            progress(at);
            told = Instant::now();
        }
    }
    progress(size);
    Ok(size / PAGE)
}

#[cfg(test)]
mod tests {
    use super::{RamFileError, prepare};

    #[test]
    fn a_new_file_gets_its_size_and_an_old_one_keeps_its_contents() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("guest.ram");
        let done = prepare(&path, 1 << 20, |_| {}).expect("prepare a new file");
        assert_eq!(done.grown_bytes, 1 << 20);
        assert_eq!(done.pages, 256);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1 << 20);

        let mut data = std::fs::read(&path).expect("read");
        assert!(data.iter().all(|&b| b == 0));
        data[5000] = 7;
        std::fs::write(&path, &data).expect("write");
        let mut last = 0;
        let again = prepare(&path, 2 << 20, |n| last = n).expect("grow");
        assert_eq!(
            (again.grown_bytes, again.pages, last),
            (1 << 20, 512, 2 << 20)
        );
        let data = std::fs::read(&path).expect("read");
        assert_eq!((data.len(), data[5000]), (2 << 20, 7));
    }

    #[test]
    fn bad_sizes_and_shrinking_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("guest.ram");
        assert!(matches!(
            prepare(&path, 0, |_| {}),
            Err(RamFileError::Size(0))
        ));
        assert!(matches!(
            prepare(&path, 5000, |_| {}),
            Err(RamFileError::Size(5000))
        ));
        prepare(&path, 1 << 20, |_| {}).expect("prepare");
        let err = prepare(&path, 4096, |_| {}).expect_err("shrinking is refused");
        assert!(err.to_string().contains("refusing"), "{err}");
        let err = prepare(dir.path(), 4096, |_| {}).expect_err("a directory is refused");
        assert!(
            matches!(err, RamFileError::Io { .. } | RamFileError::NotAFile(_)),
            "{err}"
        );
    }
}
