//! Disk images on the destination: a raw image file or a block device, read
//! and written through `io_uring` on one dedicated thread.
//!
//! [`Image`] is a cheap handle (an `Arc`); every clone talks to the same ring
//! thread. Async callers never block: they send the request over a channel,
//! poke the thread's eventfd and await a oneshot with the result.
//!
//! # Direct I/O
//! With [`ImageOptions::direct`] the image is opened twice: once with
//! `O_DIRECT` and once buffered. Requests whose offset, length and buffer
//! address meet the direct-I/O alignment (from `statx(STATX_DIOALIGN)`, else
//! 4 KiB) go through the `O_DIRECT` descriptor; an aligned range in an
//! unaligned buffer is copied into an aligned bounce buffer first; anything
//! else goes through the buffered descriptor. Linux keeps the two coherent:
//! a direct read writes back dirty cached pages of its range first and a
//! direct write invalidates them. When the file system refuses `O_DIRECT`
//! (`EINVAL`, e.g. ramfs) the image silently uses buffered I/O only.
//!
//! With [`ImageOptions::bulk_direct`] instead, only the large aligned writes
//! of [`Image::write_many`] (a replica's bulk copy) go through `O_DIRECT`;
//! everything else, reads included, stays in the page cache, which serves an
//! export better. A bulk copy through the cache leaves gigabytes of dirty
//! pages that the final flush then writes out while the migration waits;
//! written directly, the disk works while the data is still arriving (a full
//! 2 GiB copy: 4.7 s against 6.2–7.8 s, docs/perf.md).

mod allocation;
mod changes;
mod uring;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::oneshot;

pub use changes::{ChangeListener, ImageChanges};
pub use uring::IoBuf;
use uring::{Files, Request, RingThread, Wake};

/// Largest single read or write accepted (NBD caps requests at 32 MiB).
pub const MAX_IO_LEN: u64 = 64 << 20;
/// Chunk size used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;
/// Zero chunks written concurrently by the write-zeroes fallback.
const ZERO_CONCURRENCY: usize = 8;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Create the file, or grow it, to this many bytes. For a block device
    /// this is only checked against the device size.
    pub size: Option<u64>,
    /// Open read-only; writes, trims and zeroes fail with [`ImageError::ReadOnly`].
    pub read_only: bool,
    /// Try `O_DIRECT`; falls back to buffered I/O where the file system refuses it.
    pub direct: bool,
    /// Try `O_DIRECT` for [`Image::write_many`]'s writes of at least
    /// [`BULK_DIRECT_MIN`] aligned bytes only (see the module's docs).
    pub bulk_direct: bool,
}

/// The smallest write [`ImageOptions::bulk_direct`] sends around the page
/// cache: a smaller one (a live delta's 4 KiB block) would wait for the
/// device, where a copy into the cache costs a microsecond, and it is the
/// kind of block written again soon.
pub const BULK_DIRECT_MIN: u64 = 64 << 10;

/// Errors from [`Image`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image could not be opened.
    #[error(
        "could not open the image {path}: {source}; check that it exists and that tern may access it"
    )]
    Open { path: PathBuf, source: io::Error },
    /// The path is neither a regular file nor a block device.
    #[error(
        "{path} is neither a regular file nor a block device; give a raw image file or a block device"
    )]
    NotFileOrDevice { path: PathBuf },
    /// Creating or growing the file failed.
    #[error("could not size the image {path} to {size} bytes: {source}")]
    Resize {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    /// The requested size cannot be met without writing to a read-only image
    /// or growing a block device.
    #[error("the image {path} is {actual} bytes but {wanted} were asked for; {hint}")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        wanted: u64,
        hint: &'static str,
    },
    /// The `io_uring` thread could not start.
    #[error("could not start the io_uring thread for {path}: {source}")]
    Ring { path: PathBuf, source: io::Error },
    /// The range is not inside the image.
    #[error(
        "the range at offset {offset} of {len} bytes lies past the end of {path} ({size} bytes)"
    )]
    OutOfBounds {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A single read or write was larger than [`MAX_IO_LEN`].
    #[error(
        "a single transfer of {len} bytes on {path} exceeds the limit of {max} bytes; split it"
    )]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// The image was opened read-only.
    #[error("the image {path} is read-only; open it writable to change it")]
    ReadOnly { path: PathBuf },
    /// The kernel failed an operation.
    #[error("{op} of {len} bytes at offset {offset} on {path} failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    /// The ring thread is gone (only after a fatal `io_uring` failure).
    #[error("the io_uring thread for {path} has stopped; reopen the image")]
    Closed { path: PathBuf },
}

impl ImageError {
    /// The errno that best describes this error to a block-protocol client.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::ReadOnly { .. } => libc::EPERM,
            ImageError::OutOfBounds { .. } | ImageError::TooLarge { .. } => libc::EINVAL,
            ImageError::Io { source, .. }
            | ImageError::Open { source, .. }
            | ImageError::Resize { source, .. }
            | ImageError::Ring { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ImageError::NotFileOrDevice { .. }
            | ImageError::SizeMismatch { .. }
            | ImageError::Closed { .. } => libc::EIO,
        }
    }
}

/// A raw image file or block device served through `io_uring`.
#[derive(Clone, Debug)]
pub struct Image {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    size: u64,
    /// A block device (no holes to ask about) rather than a file.
    block_device: bool,
    read_only: bool,
    /// Every aligned request goes through `O_DIRECT`.
    direct: bool,
    /// Only [`Image::write_many`]'s large aligned writes do.
    bulk_direct: bool,
    files: Arc<Files>,
    /// Whether `pwritev2(RWF_NOWAIT)` may complete a buffered write; cleared
    /// once the file system answers `EOPNOTSUPP`.
    nowait_writes: AtomicBool,
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    zeroes: OnceLock<Bytes>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish the ops
        // still in flight and exit; join so no I/O outlives the image.
        drop(self.tx.take());
        self.wake.force();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the io_uring thread panicked");
        }
    }
}

impl Image {
    /// Opens (and with [`ImageOptions::size`] creates or grows) an image and
    /// starts its `io_uring` thread.
    #[expect(
        clippy::too_many_lines,
        reason = "opens the descriptors and probes what the file system allows (direct I/O, alignment, punching), each with its own error"
    )]
    pub fn open(path: &Path, opts: &ImageOptions) -> Result<Image, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.size.is_some() && !opts.read_only {
            oo.create(true);
        }
        let mut file = oo.open(path).map_err(open_err)?;
        let file_type = file.metadata().map_err(open_err)?.file_type();
        let size = if file_type.is_block_device() {
            let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
            if let Some(wanted) = opts.size.filter(|&w| w > size) {
                return Err(ImageError::SizeMismatch {
                    path: path.to_path_buf(),
                    actual: size,
                    wanted,
                    hint: "a block device cannot grow; use a larger device",
                });
            }
            size
        } else if file_type.is_file() {
            let size = file.metadata().map_err(open_err)?.len();
            match opts.size {
                Some(wanted) if wanted > size && opts.read_only => {
                    return Err(ImageError::SizeMismatch {
                        path: path.to_path_buf(),
                        actual: size,
                        wanted,
                        hint: "open it writable to grow it",
                    });
                }
                Some(wanted) if wanted > size => {
                    file.set_len(wanted).map_err(|source| ImageError::Resize {
                        path: path.to_path_buf(),
                        size: wanted,
                        source,
                    })?;
                    wanted
                }
                _ => size,
            }
        } else {
            return Err(ImageError::NotFileOrDevice {
                path: path.to_path_buf(),
            });
        };

        let want_direct = opts.direct || (opts.bulk_direct && !opts.read_only);
        let direct = if want_direct {
            let mut doo = OpenOptions::new();
            doo.read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_DIRECT);
            match doo.open(path) {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT refused by the file system; using buffered I/O");
                    None
                }
                Err(e) => return Err(open_err(e)),
            }
        } else {
            None
        };
        let (offset_align, mem_align) = direct
            .as_ref()
            .map_or((4096, 4096), |f| dio_alignment(f).unwrap_or((4096, 4096)));

        let files = Arc::new(Files {
            buffered: OwnedFd::from(file),
            direct: direct.map(OwnedFd::from),
            offset_align,
            mem_align,
        });
        let ring_err = |source| ImageError::Ring {
            path: path.to_path_buf(),
            source,
        };
        let wake_fd = Arc::new(Wake::new(new_eventfd().map_err(ring_err)?));
        let (tx, rx) = mpsc::channel();
        let ring =
            RingThread::new(Arc::clone(&files), rx, Arc::clone(&wake_fd)).map_err(ring_err)?;
        let thread = std::thread::Builder::new()
            .name("tern-image-uring".into())
            .spawn(move || ring.run())
            .map_err(ring_err)?;
        Ok(Image {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                size,
                block_device: file_type.is_block_device(),
                read_only: opts.read_only,
                direct: opts.direct && files.direct.is_some(),
                bulk_direct: files.direct.is_some(),
                files,
                nowait_writes: AtomicBool::new(true),
                tx: Some(tx),
                wake: wake_fd,
                thread: Some(thread),
                punch_hole: AtomicBool::new(true),
                zero_range: AtomicBool::new(true),
                zeroes: OnceLock::new(),
            }),
        })
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Whether aligned requests go through `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_at(&self, offset: u64, len: u32) -> Result<Bytes, ImageError> {
        self.check_len(u64::from(len))?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(data) = self.read_cached(offset, len) {
            return Ok(data);
        }
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Read {
            offset,
            len,
            direct: self.inner.direct,
            reply,
        })?;
        self.wait(rx, "read", offset, u64::from(len)).await
    }

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    pub async fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ImageError> {
        let len = data.len() as u64;
        self.check_writable()?;
        self.check_len(len)?;
        self.check_range(offset, len)?;
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        if !fua && self.write_cached(offset, &data) {
            return Ok(());
        }
        self.write_through_ring(offset, data, fua, self.inner.direct)
            .await
    }

    /// Hands one checked write to the ring thread.
    async fn write_through_ring(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        direct: bool,
    ) -> Result<(), ImageError> {
        let len = data.len() as u64;
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Write {
            offset,
            data,
            fua,
            direct,
            reply,
        })?;
        self.wait(rx, "write", offset, len).await
    }

    /// Starts reading `ranges` into the page cache without waiting, on an
    /// image whose bulk writes go around it ([`ImageOptions::bulk_direct`]):
    /// for the rest of a region that a small write changed, which the
    /// checksum tree will read back soon. Elsewhere (all cached, or all
    /// direct) it does nothing.
    pub fn prefetch(&self, ranges: impl IntoIterator<Item = std::ops::Range<u64>>) {
        if self.inner.direct || !self.inner.bulk_direct {
            return;
        }
        for range in ranges {
            let (Ok(offset), Ok(len)) = (
                i64::try_from(range.start),
                i64::try_from(range.end.saturating_sub(range.start)),
            ) else {
                continue;
            };
            // SAFETY: posix_fadvise(2) takes no pointers; the descriptor
            // stays open while `self.inner` lives. Advice only: a failure
            // costs a slower read later, nothing else.
            unsafe {
                libc::posix_fadvise(
                    self.inner.files.buffered.as_raw_fd(),
                    offset,
                    len,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Whether a write goes around the page cache under
    /// [`ImageOptions::bulk_direct`].
    fn is_bulk(&self, offset: u64, len: u64) -> bool {
        let align = self.inner.files.offset_align;
        len >= BULK_DIRECT_MIN && offset.is_multiple_of(align) && len.is_multiple_of(align)
    }

    /// Writes each `(offset, data)`, in order: an image opened without
    /// `O_DIRECT` takes them all in one hand-off to its ring thread (a 4 KiB
    /// write costs less than the hand-off); with `O_DIRECT` they go to the
    /// ring together, in order where they overlap. With
    /// [`ImageOptions::bulk_direct`], the large aligned ones go to the ring
    /// as direct writes beside one hand-off of the rest, unless some
    /// overlap (then all go through the cache, in order). Everything is
    /// checked before anything is written.
    pub async fn write_many(&self, writes: Vec<(u64, Bytes)>) -> Result<(), ImageError> {
        self.check_writable()?;
        for (offset, data) in &writes {
            self.check_len(data.len() as u64)?;
            self.check_range(*offset, data.len() as u64)?;
        }
        if self.inner.direct {
            if overlapping(&writes) {
                for (offset, data) in writes {
                    self.write_at(offset, data, false).await?;
                }
                return Ok(());
            }
            let all = writes
                .into_iter()
                .map(|(offset, data)| self.write_at(offset, data, false));
            futures::future::try_join_all(all).await?;
            return Ok(());
        }
        if self.inner.bulk_direct
            && writes
                .iter()
                .any(|(offset, data)| self.is_bulk(*offset, data.len() as u64))
            && !overlapping(&writes)
        {
            let (bulk, small): (Vec<_>, Vec<_>) = writes
                .into_iter()
                .partition(|(offset, data)| self.is_bulk(*offset, data.len() as u64));
            let direct = futures::future::try_join_all(
                bulk.into_iter()
                    .map(|(offset, data)| self.write_through_ring(offset, data, false, true)),
            );
            let cached = async {
                if small.is_empty() {
                    Ok(())
                } else {
                    self.write_cached_many(small).await
                }
            };
            futures::future::try_join(direct, cached).await?;
            return Ok(());
        }
        self.write_cached_many(writes).await
    }

    /// Writes checked, non-overlapping-or-ordered writes into the page cache
    /// on the ring thread, in one hand-off.
    async fn write_cached_many(&self, writes: Vec<(u64, Bytes)>) -> Result<(), ImageError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Request::WriteMany { writes, reply })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((offset, len, source))) => Err(ImageError::Io {
                op: "write",
                path: self.inner.path.clone(),
                offset,
                len,
                source,
            }),
            Err(_) => Err(ImageError::Closed {
                path: self.inner.path.clone(),
            }),
        }
    }

    /// Makes every completed write durable (`fdatasync` through `io_uring`).
    pub async fn flush(&self) -> Result<(), ImageError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Fsync { reply })?;
        self.wait(rx, "flush", 0, self.inner.size).await
    }

    /// Makes `len` bytes at `offset` read back as zeroes. With `may_trim` the
    /// range may be deallocated (punched); otherwise it stays allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if may_trim
            && self
                .try_fallocate(
                    &self.inner.punch_hole,
                    offset,
                    len,
                    PUNCH_MODE,
                    "punch hole",
                )
                .await?
        {
            return Ok(());
        }
        let zero_mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self
            .try_fallocate(&self.inner.zero_range, offset, len, zero_mode, "zero range")
            .await?
        {
            return Ok(());
        }
        self.write_zero_data(offset, len).await
    }

    /// Deallocates `len` bytes at `offset` where the file system or device
    /// supports it (the range then reads as zeroes); otherwise does nothing,
    /// which NBD allows for a trim.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.try_fallocate(&self.inner.punch_hole, offset, len, PUNCH_MODE, "trim")
            .await?;
        Ok(())
    }

    /// Runs fallocate unless `supported` says the mode is known not to work.
    /// Returns whether the range was handled.
    async fn try_fallocate(
        &self,
        supported: &AtomicBool,
        offset: u64,
        len: u64,
        mode: i32,
        op: &'static str,
    ) -> Result<bool, ImageError> {
        if !supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Fallocate {
            offset,
            len,
            mode,
            reply,
        })?;
        match self.wait(rx, op, offset, len).await {
            Ok(()) => Ok(true),
            Err(ImageError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV)
                ) =>
            {
                supported.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn write_zero_data(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        let zeroes = self
            .inner
            .zeroes
            .get_or_init(|| IoBuf::zeroed(ZERO_CHUNK).into_bytes())
            .clone();
        let chunks = (0..len.div_ceil(ZERO_CHUNK as u64)).map(move |i| {
            let start = i * ZERO_CHUNK as u64;
            let n = usize::try_from(len - start).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
            (offset + start, zeroes.slice(..n))
        });
        futures::stream::iter(chunks)
            .map(|(at, data)| self.write_at(at, data, false))
            .buffer_unordered(ZERO_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Reads from the page cache on the caller's thread with
    /// `preadv2(RWF_NOWAIT)`, which never waits for the disk: it copies
    /// cached pages or fails with `EAGAIN` (after starting readahead). A hit
    /// skips the hand-off to the ring thread and back, which costs more than
    /// the copy. Only for images without `O_DIRECT`, whose reads all go
    /// through the page cache; `None` sends the request to the ring.
    fn read_cached(&self, offset: u64, len: u32) -> Option<Bytes> {
        if self.inner.direct {
            return None;
        }
        let offset = i64::try_from(offset).ok()?;
        let mut buf = IoBuf::recycled(len as usize);
        let iov = libc::iovec {
            iov_base: buf.as_mut().as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, which is exclusively ours and
        // outlives this synchronous call; the descriptor stays open while
        // `self.inner` lives.
        let n = unsafe {
            libc::preadv2(
                self.inner.files.buffered.as_raw_fd(),
                &raw const iov,
                1,
                offset,
                libc::RWF_NOWAIT,
            )
        };
        // A short read (part of the range not cached, or the file shrank)
        // is redone whole by the ring, which handles both.
        (usize::try_from(n).ok() == Some(buf.len())).then(|| buf.into_bytes())
    }

    /// Writes into the page cache on the caller's thread with
    /// `pwritev2(RWF_NOWAIT)` where the file system supports it (see
    /// [`Image::read_cached`]); `false` sends the write to the ring.
    fn write_cached(&self, offset: u64, data: &[u8]) -> bool {
        if self.inner.direct || !self.inner.nowait_writes.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(offset) = i64::try_from(offset) else {
            return false;
        };
        let iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // SAFETY: one iovec describing `data`, borrowed for this synchronous
        // call; the kernel only reads from it.
        let n = unsafe {
            libc::pwritev2(
                self.inner.files.buffered.as_raw_fd(),
                &raw const iov,
                1,
                offset,
                libc::RWF_NOWAIT,
            )
        };
        if usize::try_from(n).ok() == Some(data.len()) {
            return true;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.inner.nowait_writes.store(false, Ordering::Relaxed);
        }
        // A short write is simply rewritten whole by the ring.
        false
    }

    /// Writes a page-aligned range into the page cache with a plain
    /// `pwrite` on the caller's thread, for images without `O_DIRECT` on
    /// file systems without `RWF_NOWAIT` buffered writes (ext4). Whole pages
    /// need no read from disk, so the call only copies into the cache (or
    /// waits briefly in dirty-page throttling, as nbdkit's threads do);
    /// the hand-off to the ring thread and back cost more than the copy.
    /// Returns `Ok(false)` when the range is not eligible (the caller then
    /// uses [`Image::write_at`]).
    pub fn write_pages_now(&self, offset: u64, data: &[u8]) -> Result<bool, ImageError> {
        const PAGE: u64 = 4096;
        let len = data.len() as u64;
        if self.inner.direct
            || data.is_empty()
            || !offset.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
        {
            return Ok(false);
        }
        self.check_writable()?;
        self.check_len(len)?;
        self.check_range(offset, len)?;
        if self.write_cached(offset, data) {
            return Ok(true);
        }
        let io_err = |source| ImageError::Io {
            op: "write",
            path: self.inner.path.clone(),
            offset,
            len,
            source,
        };
        let mut done = 0usize;
        while done < data.len() {
            let at = i64::try_from(offset + done as u64)
                .map_err(|_| io_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
            let rest = &data[done..];
            // SAFETY: `rest` is a live borrowed slice for this synchronous
            // call; the kernel only reads from it; the descriptor stays open
            // while `self.inner` lives.
            let n = unsafe {
                libc::pwrite(
                    self.inner.files.buffered.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    at,
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Err(io_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_err(e));
                    }
                }
            }
        }
        Ok(true)
    }

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.inner.read_only {
            return Err(ImageError::ReadOnly {
                path: self.inner.path.clone(),
            });
        }
        Ok(())
    }

    fn check_len(&self, len: u64) -> Result<(), ImageError> {
        if len > MAX_IO_LEN {
            return Err(ImageError::TooLarge {
                path: self.inner.path.clone(),
                len,
                max: MAX_IO_LEN,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(ImageError::OutOfBounds {
                path: self.inner.path.clone(),
                offset,
                len,
                size: self.inner.size,
            }),
        }
    }

    fn submit(&self, req: Request) -> Result<(), ImageError> {
        let tx = self
            .inner
            .tx
            .as_ref()
            .expect("the sender lives until Inner drops");
        tx.send(req).map_err(|_| ImageError::Closed {
            path: self.inner.path.clone(),
        })?;
        self.inner.wake.notify();
        Ok(())
    }

    async fn wait<T>(
        &self,
        rx: oneshot::Receiver<io::Result<T>>,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<T, ImageError> {
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(ImageError::Io {
                op,
                path: self.inner.path.clone(),
                offset,
                len,
                source,
            }),
            Err(_) => Err(ImageError::Closed {
                path: self.inner.path.clone(),
            }),
        }
    }
}

/// Whether any two of `writes` touch the same byte.
fn overlapping(writes: &[(u64, Bytes)]) -> bool {
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|(offset, data)| (*offset, offset + data.len() as u64))
        .collect();
    ranges.sort_unstable();
    ranges.windows(2).any(|w| w[1].0 < w[0].1)
}

const PUNCH_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Direct-I/O offset and memory alignment of an `O_DIRECT` descriptor, from
/// `statx(STATX_DIOALIGN)`; `None` when the kernel or file system says nothing.
fn dio_alignment(file: &File) -> Option<(u64, usize)> {
    // SAFETY: `statx` is a plain C struct for which all-zero is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated empty path with AT_EMPTY_PATH,
    // and `stx` is a properly sized, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &raw mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let ok =
        |a: u32| a.is_power_of_two() && usize::try_from(a).is_ok_and(|a| a <= uring::BUF_ALIGN);
    let (offset, mem) = (stx.stx_dio_offset_align, stx.stx_dio_mem_align);
    if !(ok(offset) && ok(mem)) {
        return None;
    }
    Some((u64::from(offset), usize::try_from(mem).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: u64, direct: bool) -> ImageOptions {
        ImageOptions {
            size: Some(size),
            read_only: false,
            direct,
            bulk_direct: false,
        }
    }

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
            .into()
    }

    #[tokio::test]
    async fn written_data_reads_back_aligned_and_unaligned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::open(&dir.path().join("a.img"), &opts(8 << 20, true)).expect("open");
        assert_eq!(img.size(), 8 << 20);
        // Aligned in an aligned buffer, aligned range in an unaligned buffer
        // (bounce), and an unaligned range (buffered descriptor).
        let aligned = IoBuf::copy_from(&pattern(65536, 1)).into_bytes();
        img.write_at(4096, aligned.clone(), false)
            .await
            .expect("aligned write");
        let odd = pattern(8192 + 1, 2).slice(1..);
        img.write_at(1 << 20, odd.clone(), true)
            .await
            .expect("bounce write");
        let tiny = pattern(1001, 3);
        img.write_at(3 * (1 << 20) + 7, tiny.clone(), false)
            .await
            .expect("unaligned write");
        assert_eq!(img.read_at(4096, 65536).await.expect("read"), aligned);
        assert_eq!(img.read_at(1 << 20, 8192).await.expect("read"), odd);
        assert_eq!(
            img.read_at(3 * (1 << 20) + 7, 1001).await.expect("read"),
            tiny
        );
        // A direct read across the unaligned write sees it.
        let around = img.read_at(3 << 20, 4096).await.expect("read");
        assert_eq!(&around[7..1008], &tiny[..]);
        assert!(around[..7].iter().chain(&around[1008..]).all(|&b| b == 0));
        img.flush().await.expect("flush");
    }

    /// Whether every byte of the range is in the page cache, without
    /// reading the disk (`RWF_NOWAIT` fails rather than wait for it).
    fn cached(path: &Path, offset: u64, len: usize) -> bool {
        let file = File::open(path).expect("open for the cache probe");
        // A miss must not read ahead into the ranges probed next.
        // SAFETY: plain advice on a descriptor we own; no pointers.
        let advised =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        assert_eq!(advised, 0, "posix_fadvise");
        let mut buf = vec![0u8; len];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: one iovec over `buf`, alive for this synchronous call.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &raw const iov,
                1,
                i64::try_from(offset).expect("small offset"),
                libc::RWF_NOWAIT,
            )
        };
        usize::try_from(n).ok() == Some(len)
    }

    #[tokio::test]
    async fn bulk_writes_go_around_the_cache_and_the_rest_into_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.img");
        let img = Image::open(
            &path,
            &ImageOptions {
                size: Some(8 << 20),
                read_only: false,
                direct: false,
                bulk_direct: true,
            },
        )
        .expect("open");
        assert!(!img.is_direct(), "reads and small writes stay cached");
        let big = pattern(1 << 20, 1);
        // An aligned range in an unaligned buffer: bounced, still direct.
        let odd_big = pattern((256 << 10) + 1, 2).slice(1..);
        let small = pattern(4096, 3);
        let unaligned = pattern(100_000, 4);
        img.write_many(vec![
            (0, big.clone()),
            (2 << 20, odd_big.clone()),
            (4 << 20, small.clone()),
            ((5 << 20) + 3, unaligned.clone()),
        ])
        .await
        .expect("write");
        assert!(!cached(&path, 0, 1 << 20), "1 MiB written around the cache");
        assert!(!cached(&path, 2 << 20, 256 << 10), "bounced, still direct");
        assert!(cached(&path, 4 << 20, 4096), "a small write is cached");
        assert!(cached(&path, (5 << 20) + 3, 100_000), "unaligned is cached");
        // Overlapping writes all go through the cache, in order.
        img.write_many(vec![
            (6 << 20, pattern(1 << 20, 5)),
            (6 << 20, small.clone()),
        ])
        .await
        .expect("write");
        assert!(cached(&path, 6 << 20, 1 << 20));
        assert_eq!(img.read_at(0, 1 << 20).await.expect("read"), big);
        assert_eq!(
            img.read_at(2 << 20, 256 << 10).await.expect("read"),
            odd_big
        );
        assert_eq!(img.read_at(4 << 20, 4096).await.expect("read"), small);
        assert_eq!(
            img.read_at((5 << 20) + 3, 100_000).await.expect("read"),
            unaligned
        );
        let last = img.read_at(6 << 20, 1 << 20).await.expect("read");
        assert_eq!(&last[..4096], &small[..]);
        assert_eq!(&last[4096..], &pattern(1 << 20, 5)[4096..]);
    }

    #[tokio::test]
    async fn many_concurrent_requests_all_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::open(&dir.path().join("c.img"), &opts(4 << 20, true)).expect("open");
        let writes = (0..512u64).map(|i| {
            let img = img.clone();
            tokio::spawn(async move { img.write_at(i * 4096, pattern(4096, i as u8), false).await })
        });
        for w in futures::future::join_all(writes).await {
            w.expect("join").expect("write");
        }
        let reads = (0..512u64).map(|i| {
            let img = img.clone();
            tokio::spawn(async move { (i, img.read_at(i * 4096, 4096).await) })
        });
        for r in futures::future::join_all(reads).await {
            let (i, data) = r.expect("join");
            assert_eq!(data.expect("read"), pattern(4096, i as u8));
        }
    }

    #[tokio::test]
    async fn write_pages_now_writes_whole_pages_of_a_cached_image_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::open(&dir.path().join("p.img"), &opts(1 << 20, false)).expect("open");
        let data = pattern(8192, 4);
        assert!(img.write_pages_now(4096, &data).expect("aligned write"));
        assert_eq!(img.read_at(4096, 8192).await.expect("read"), data);
        // Unaligned ranges and O_DIRECT images go through write_at instead.
        assert!(!img.write_pages_now(4097, &data).expect("not eligible"));
        assert!(!img.write_pages_now(0, &data[..100]).expect("not eligible"));
        assert!(matches!(
            img.write_pages_now(1 << 20, &data),
            Err(ImageError::OutOfBounds { .. })
        ));
        let direct = Image::open(&dir.path().join("q.img"), &opts(1 << 20, true)).expect("open");
        if direct.is_direct() {
            assert!(!direct.write_pages_now(0, &data).expect("not eligible"));
        }
    }

    #[tokio::test]
    async fn write_zeroes_and_trim_read_back_as_zeroes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::open(&dir.path().join("z.img"), &opts(4 << 20, true)).expect("open");
        img.write_at(0, Bytes::from(vec![0xab; 4 << 20]), false)
            .await
            .expect("fill");
        img.write_zeroes(4096, 8192, false)
            .await
            .expect("zero range");
        img.write_zeroes(100_000, 5000, true).await.expect("punch");
        img.trim(1 << 20, 1 << 20).await.expect("trim");
        let all = img.read_at(0, 4 << 20).await.expect("read");
        let zeroed = |i: usize| (4096..12288).contains(&i) || (100_000..105_000).contains(&i);
        for (i, &b) in all.iter().enumerate() {
            if zeroed(i) {
                assert_eq!(b, 0, "byte {i} should be zero");
            } else if !(1 << 20..2 << 20).contains(&i) {
                assert_eq!(b, 0xab, "byte {i} should be untouched");
            }
        }
    }

    #[tokio::test]
    async fn out_of_range_and_oversized_requests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::open(&dir.path().join("b.img"), &opts(1 << 20, false)).expect("open");
        let err = img.read_at((1 << 20) - 10, 11).await.expect_err("past end");
        assert!(
            matches!(err, ImageError::OutOfBounds { offset, len: 11, .. } if offset == (1 << 20) - 10)
        );
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(matches!(
            img.write_at(u64::MAX, Bytes::from_static(b"x"), false)
                .await,
            Err(ImageError::OutOfBounds { .. })
        ));
        assert!(matches!(
            img.write_zeroes(1 << 20, 1, false).await,
            Err(ImageError::OutOfBounds { .. })
        ));
        assert!(matches!(
            img.read_at(0, u32::MAX).await,
            Err(ImageError::TooLarge { .. })
        ));
        // The end itself is in range.
        assert!(
            img.read_at(1 << 20, 0)
                .await
                .expect("empty read")
                .is_empty()
        );
        assert_eq!(
            img.read_at((1 << 20) - 1, 1)
                .await
                .expect("last byte")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn read_only_image_refuses_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![7u8; 65536]).expect("seed");
        let img = Image::open(
            &path,
            &ImageOptions {
                size: None,
                read_only: true,
                direct: true,
                bulk_direct: false,
            },
        )
        .expect("open");
        assert!(img.is_read_only());
        assert_eq!(
            img.read_at(0, 16).await.expect("read"),
            Bytes::from(vec![7u8; 16])
        );
        let err = img
            .write_at(0, Bytes::from_static(b"no"), false)
            .await
            .expect_err("read-only");
        assert!(matches!(err, ImageError::ReadOnly { .. }));
        assert_eq!(err.errno(), libc::EPERM);
        assert!(img.trim(0, 4096).await.is_err());
        assert!(img.write_zeroes(0, 4096, true).await.is_err());
    }

    #[tokio::test]
    async fn missing_image_error_names_the_path() {
        let err = Image::open(Path::new("/nonexistent/tern.img"), &ImageOptions::default())
            .expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/tern.img"), "{msg}");
        assert!(matches!(err, ImageError::Open { .. }));
    }

    /// Unmounts on every exit path, panics included.
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: umount(2) of the mount made by this test, with a
            // NUL-terminated path.
            unsafe { libc::umount(self.0.as_ptr()) };
        }
    }

    /// ramfs refuses `O_DIRECT` with EINVAL (tmpfs accepts it on 6.x kernels),
    /// so mount one to prove the fallback to buffered I/O.
    #[tokio::test]
    async fn o_direct_refusal_falls_back_to_buffered_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = c"ramfs";
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .expect("no NUL in a temp path");
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a ramfs needs root (run the tests as root): {}",
            io::Error::last_os_error()
        );
        let _unmount = Unmount(target);
        let img = Image::open(&dir.path().join("f.img"), &opts(1 << 20, true)).expect("open");
        assert!(!img.is_direct(), "ramfs should have refused O_DIRECT");
        let data = pattern(4096, 9);
        img.write_at(8192, data.clone(), true).await.expect("write");
        assert_eq!(img.read_at(8192, 4096).await.expect("read"), data);
        img.write_zeroes(8192, 4096, false)
            .await
            .expect("zeroes by data");
        assert!(
            img.read_at(8192, 4096)
                .await
                .expect("read")
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[tokio::test]
    async fn dropping_the_last_handle_drains_inflight_writes() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.img");
        let img = Image::open(&path, &opts(1 << 20, true)).expect("open");
        // The first poll submits the write; the caller then gives up on it.
        let write = img.write_at(0, pattern(65536, 5), false);
        // (Usually still pending after the first poll; either way the data
        // must be on disk once the last handle is gone.)
        let _ = write.now_or_never();
        drop(img);
        let reopened = Image::open(&path, &opts(1 << 20, true)).expect("reopen");
        assert_eq!(
            reopened.read_at(0, 65536).await.expect("read"),
            pattern(65536, 5)
        );
    }
}
