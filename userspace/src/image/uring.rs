//! The `io_uring` thread: one ring, one thread, many operations in flight.
//!
//! Async callers hand a [`Request`] to the thread through a channel and wake
//! it through an eventfd that the ring itself polls, so a request submitted
//! while the thread waits on completions is picked up at once. Every buffer
//! an operation touches is owned by that operation's slot in the thread's
//! table until its completion arrives; that is the invariant the `unsafe`
//! pushes below rely on.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

/// Operations allowed in flight on the ring at once.
pub(crate) const QUEUE_DEPTH: usize = 128;
/// Submission queue size: room for every in-flight op plus the wake-up poll.
const RING_ENTRIES: u32 = 256;
/// `user_data` of the eventfd poll; slot indices never reach it.
const WAKE_TOKEN: u64 = u64::MAX;
/// Alignment of every buffer this module allocates (one page).
pub(crate) const BUF_ALIGN: usize = 4096;

/// A page-aligned heap buffer, suitable for `O_DIRECT`.
///
/// It becomes a [`Bytes`] without a copy through [`IoBuf::into_bytes`].
/// Allocations are rounded up to a power of two and, when dropped, kept in a
/// small process-wide pool for the next buffer of that size class: a fresh
/// 1 MiB allocation per NBD request costs an `mmap`, 256 page faults and a
/// `munmap`, more than the I/O itself on a page-cache hit.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `IoBuf` owns its allocation exclusively (like `Vec<u8>`), so moving
// it to another thread or sharing `&IoBuf` (read-only bytes) is sound.
unsafe impl Send for IoBuf {}
// SAFETY: see `Send`; `&IoBuf` only gives out `&[u8]`.
unsafe impl Sync for IoBuf {}

/// Smallest pooled size class (one page); classes double up to the largest.
const POOL_MIN_SHIFT: u32 = 12;
/// Largest pooled size class: 32 MiB, the NBD request limit.
const POOL_MAX_SHIFT: u32 = 25;
const POOL_CLASSES: usize = (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize;
/// Bytes the pool keeps per size class (at most [`POOL_MAX_BUFS`] buffers).
const POOL_CLASS_BYTES: usize = 64 << 20;
/// Buffers the pool keeps per size class.
const POOL_MAX_BUFS: usize = 64;

/// A free allocation of one size class, owned by the pool.
struct FreeBuf(NonNull<u8>);

// SAFETY: a `FreeBuf` is an allocation nobody else references; moving the
// pointer between threads is as sound as moving a `Box`.
unsafe impl Send for FreeBuf {}

static POOL: [Mutex<Vec<FreeBuf>>; POOL_CLASSES] = [const { Mutex::new(Vec::new()) }; POOL_CLASSES];

/// The pool class and layout for a buffer of `len` bytes; no class for
/// lengths past the largest.
fn class_of(len: usize) -> (Option<usize>, Layout) {
    let size = len.max(1 << POOL_MIN_SHIFT).next_power_of_two();
    let class = size.trailing_zeros().checked_sub(POOL_MIN_SHIFT);
    let class = class
        .and_then(|c| usize::try_from(c).ok())
        .filter(|&c| c < POOL_CLASSES);
    let layout = Layout::from_size_align(size, BUF_ALIGN)
        .expect("an I/O length below isize::MAX with page alignment is a valid layout");
    (class, layout)
}

fn lock_class(class: usize) -> std::sync::MutexGuard<'static, Vec<FreeBuf>> {
    // A poisoned pool only means a panic while pushing or popping a pointer;
    // the vector is still consistent.
    POOL[class]
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl IoBuf {
    /// Allocates `len` zeroed bytes aligned to [`BUF_ALIGN`].
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = IoBuf::recycled(len);
        buf.as_mut().fill(0);
        buf
    }

    /// A buffer of `len` bytes aligned to [`BUF_ALIGN`] whose contents are
    /// unspecified (zeroes or bytes of an earlier buffer): for callers that
    /// overwrite every byte before anyone reads it.
    pub fn recycled(len: usize) -> IoBuf {
        let (class, layout) = class_of(len);
        if let Some(class) = class
            && let Some(FreeBuf(ptr)) = lock_class(class).pop()
        {
            return IoBuf { ptr, len, layout };
        }
        // Fresh memory is zeroed so every byte is initialised.
        // SAFETY: `layout` has a non-zero size (at least one page).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, layout }
    }

    /// Copies `data` into a new aligned buffer.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::recycled(data.len());
        buf.as_mut().copy_from_slice(data);
        buf
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Freezes the buffer into [`Bytes`] without copying.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` bytes that
        // were initialised (zeroed) at first allocation, only ever written
        // with initialised bytes since, and is owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let (class, layout) = class_of(self.len);
        debug_assert_eq!(layout, self.layout);
        if let Some(class) = class {
            let mut free = lock_class(class);
            if free.len() < POOL_MAX_BUFS.min(POOL_CLASS_BYTES / layout.size()).max(1) {
                free.push(FreeBuf(self.ptr));
                return;
            }
        }
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is
        // freed exactly once, here (a pooled pointer is not freed at all).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The descriptors of one image. `direct` is the `O_DIRECT` descriptor when
/// the file system accepted it; `buffered` always exists and serves requests
/// that do not meet the direct-I/O alignment, plus fsync and fallocate.
#[derive(Debug)]
pub(crate) struct Files {
    pub(crate) buffered: OwnedFd,
    pub(crate) direct: Option<OwnedFd>,
    /// Offset and length alignment `O_DIRECT` needs (a power of two).
    pub(crate) offset_align: u64,
    /// Buffer address alignment `O_DIRECT` needs (a power of two).
    pub(crate) mem_align: usize,
}

impl Files {
    /// The descriptor for a transfer of `len` bytes at `offset` from/to
    /// `addr`: the `O_DIRECT` one when the request asks for it (`direct`),
    /// it exists, and everything is aligned.
    fn pick(&self, direct: bool, offset: u64, len: usize, addr: usize) -> RawFd {
        match &self.direct {
            Some(fd)
                if direct
                    && offset.is_multiple_of(self.offset_align)
                    && (len as u64).is_multiple_of(self.offset_align)
                    && addr.is_multiple_of(self.mem_align) =>
            {
                fd.as_raw_fd()
            }
            _ => self.buffered.as_raw_fd(),
        }
    }
}

/// How callers wake the ring thread: an eventfd the ring polls, written
/// only while the thread is (about to be) blocked in the kernel, so a busy
/// ring costs its callers no syscall.
#[derive(Debug)]
pub(crate) struct Wake {
    fd: OwnedFd,
    /// Set by the ring thread before it blocks; the first caller to see it
    /// clears it and writes the eventfd.
    parked: AtomicBool,
}

impl Wake {
    pub(crate) fn new(fd: OwnedFd) -> Wake {
        Wake {
            fd,
            parked: AtomicBool::new(false),
        }
    }

    /// Wakes the ring thread if it may be blocked; call after sending.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `RingThread::run`: either the ring sees
        // the request sent before this, or this sees `parked`.
        fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst) {
            self.force();
        }
    }

    /// Writes the eventfd unconditionally.
    pub(crate) fn force(&self) {
        // SAFETY: eventfd_write on an eventfd we own; it only adds to a
        // counter. Failure (counter overflow) still leaves the eventfd
        // readable, which is all the wake-up needs.
        let _ = unsafe { libc::eventfd_write(self.fd.as_raw_fd(), 1) };
    }
}

/// `pwrite(2)` of all of `data` at `offset`, retried on short writes and
/// `EINTR`.
fn pwrite_all(fd: &OwnedFd, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let at = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `data` is a live borrowed slice of `data.len()` bytes the
        // kernel only reads during this synchronous call.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), at) };
        match usize::try_from(n) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the image accepted no bytes",
                ));
            }
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Starts writing `writes` back to the disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while the next
/// extents cross the network, and the next flush (a barrier, inside the
/// pause for the final delta) waits only for what is left. Advisory: a
/// failure here changes nothing, the flush still makes everything durable.
fn start_writeback(fd: &OwnedFd, writes: &[(u64, Bytes)]) {
    for (offset, data) in writes {
        let (Ok(offset), Ok(len)) = (i64::try_from(*offset), i64::try_from(data.len())) else {
            continue;
        };
        // SAFETY: sync_file_range(2) takes no pointers; `fd` is open for the call.
        unsafe {
            libc::sync_file_range(fd.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

/// What an async caller asks of the ring thread.
pub(crate) enum Request {
    /// `direct`: through `O_DIRECT` where the image has it and the range is
    /// aligned; otherwise through the page cache.
    Read {
        offset: u64,
        len: u32,
        direct: bool,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        direct: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Buffered writes done one after another on the ring thread, with one
    /// reply: many small writes for the price of one hand-off. The first
    /// failure ends it (the writes after it are not made) and names its offset.
    WriteMany {
        writes: Vec<(u64, Bytes)>,
        reply: oneshot::Sender<Result<(), (u64, u64, io::Error)>>,
    },
    Fsync {
        reply: oneshot::Sender<io::Result<()>>,
    },
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// Source of a write: the caller's bytes, or an aligned copy of them when the
/// caller's buffer is not aligned for `O_DIRECT` but the range is.
enum WriteBuf {
    Shared(Bytes),
    Bounce(IoBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Shared(b) => b,
            WriteBuf::Bounce(b) => b.as_ref(),
        }
    }
}

/// One in-flight operation; it owns every buffer the kernel may touch.
enum Op {
    Read {
        offset: u64,
        buf: IoBuf,
        done: usize,
        direct: bool,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        done: usize,
        fua: bool,
        direct: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Simple {
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// Slot table indexed by `user_data`.
struct Slots {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    used: usize,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            ops: (0..QUEUE_DEPTH).map(|_| None).collect(),
            free: (0..QUEUE_DEPTH).rev().collect(),
            used: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn insert(&mut self, op: Op) -> usize {
        let idx = self
            .free
            .pop()
            .expect("caller checked is_full before insert");
        self.ops[idx] = Some(op);
        self.used += 1;
        idx
    }

    fn take(&mut self, idx: usize) -> Option<Op> {
        let op = self.ops.get_mut(idx)?.take()?;
        self.free.push(idx);
        self.used -= 1;
        Some(op)
    }

    fn put_back(&mut self, idx: usize, op: Op) {
        debug_assert!(self.ops[idx].is_none());
        let pos = self
            .free
            .iter()
            .rposition(|&i| i == idx)
            .expect("slot was just freed by take");
        self.free.swap_remove(pos);
        self.ops[idx] = Some(op);
        self.used += 1;
    }
}

/// The ring thread's state.
pub(crate) struct RingThread {
    ring: IoUring,
    files: Arc<Files>,
    rx: Receiver<Request>,
    wake: Arc<Wake>,
    slots: Slots,
}

impl RingThread {
    pub(crate) fn new(
        files: Arc<Files>,
        rx: Receiver<Request>,
        wake: Arc<Wake>,
    ) -> io::Result<RingThread> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)?;
        Ok(RingThread {
            ring,
            files,
            rx,
            wake,
            slots: Slots::new(),
        })
    }

    /// Runs until every handle is gone and every in-flight op completed.
    pub(crate) fn run(mut self) {
        let mut poll_armed = false;
        let mut disconnected = false;
        loop {
            if !poll_armed && !disconnected {
                let entry =
                    opcode::PollAdd::new(types::Fd(self.wake.fd.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(WAKE_TOKEN);
                self.push(&entry);
                poll_armed = true;
            }
            while !disconnected && !self.slots.is_full() {
                match self.rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => disconnected = true,
                }
            }
            if disconnected && self.slots.used == 0 {
                break;
            }
            // About to block: from here callers must write the eventfd. A
            // request sent before they could see the flag is picked up by
            // this second look at the channel.
            self.wake.parked.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            while !disconnected && !self.slots.is_full() {
                match self.rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => disconnected = true,
                }
            }
            let waited = self.ring.submit_and_wait(1);
            self.wake.parked.store(false, Ordering::SeqCst);
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The ring itself is broken: fail everything in flight
                    // and stop; later callers see `Closed`.
                    tracing::error!(error = %e, "io_uring submit failed; stopping the image thread");
                    self.abandon(&e);
                    return;
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (token, res) in cqes {
                if token == WAKE_TOKEN {
                    poll_armed = false;
                    self.drain_wake();
                } else {
                    // Tokens are slot indices; one that is not lands on no
                    // slot, and `complete` logs it as a stray.
                    self.complete(usize::try_from(token).unwrap_or(usize::MAX), res);
                }
            }
        }
        // The only op that can still be in the kernel is the eventfd poll,
        // which references no user memory; dropping the ring cancels it.
    }

    /// Fails every in-flight op after the ring broke. Their buffers are
    /// leaked on purpose: the kernel may still write to them.
    fn abandon(&mut self, err: &io::Error) {
        let fail = || io::Error::new(err.kind(), format!("io_uring failed: {err}"));
        for slot in &mut self.slots.ops {
            match slot.take() {
                Some(Op::Read { buf, reply, .. }) => {
                    std::mem::forget(buf);
                    let _ = reply.send(Err(fail()));
                }
                Some(Op::Write { buf, reply, .. }) => {
                    std::mem::forget(buf);
                    let _ = reply.send(Err(fail()));
                }
                Some(Op::Simple { reply }) => {
                    let _ = reply.send(Err(fail()));
                }
                None => {}
            }
        }
    }

    fn drain_wake(&self) {
        let mut counter = [0u8; 8];
        // SAFETY: plain read(2) of 8 bytes into a stack buffer of 8 bytes
        // on a non-blocking eventfd we own; EAGAIN just means "already zero".
        let _ = unsafe {
            libc::read(
                self.wake.fd.as_raw_fd(),
                counter.as_mut_ptr().cast(),
                counter.len(),
            )
        };
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every entry pushed here points only at memory owned by
            // an `Op` held in `self.slots` (or at none, for poll/fsync/
            // fallocate), and that op stays in its slot until the kernel
            // posts its completion, so the memory outlives the operation.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return;
            }
            // Queue full (cannot happen with RING_ENTRIES > QUEUE_DEPTH + 1,
            // but never drop an op): hand the queue to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }

    fn start(&mut self, req: Request) {
        match req {
            Request::Read {
                offset,
                len,
                direct,
                reply,
            } => {
                let op = Op::Read {
                    offset,
                    buf: IoBuf::recycled(len as usize),
                    done: 0,
                    direct,
                    reply,
                };
                let idx = self.slots.insert(op);
                self.submit_slot(idx);
            }
            Request::Write {
                offset,
                data,
                fua,
                direct,
                reply,
            } => {
                let direct = direct && self.files.direct.is_some();
                if !direct && !fua {
                    // A buffered write is a copy into the page cache, but
                    // io_uring hands it to an io-wq worker on file systems
                    // without non-blocking buffered writes (ext4): one more
                    // thread hop than doing it here.
                    let _ = reply.send(pwrite_all(&self.files.buffered, &data, offset));
                    return;
                }
                let aligned_range = offset.is_multiple_of(self.files.offset_align)
                    && (data.len() as u64).is_multiple_of(self.files.offset_align);
                let aligned_mem = (data.as_ptr() as usize).is_multiple_of(self.files.mem_align);
                let buf = if direct && aligned_range && !aligned_mem {
                    WriteBuf::Bounce(IoBuf::copy_from(&data))
                } else {
                    WriteBuf::Shared(data)
                };
                let op = Op::Write {
                    offset,
                    buf,
                    done: 0,
                    fua,
                    direct,
                    reply,
                };
                let idx = self.slots.insert(op);
                self.submit_slot(idx);
            }
            Request::WriteMany { writes, reply } => {
                let result = writes.iter().try_for_each(|(offset, data)| {
                    pwrite_all(&self.files.buffered, data, *offset)
                        .map_err(|e| (*offset, data.len() as u64, e))
                });
                let written = result.is_ok();
                let _ = reply.send(result);
                if written {
                    start_writeback(&self.files.buffered, &writes);
                }
            }
            Request::Fsync { reply } => {
                let idx = self.slots.insert(Op::Simple { reply });
                let entry = opcode::Fsync::new(types::Fd(self.files.buffered.as_raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(idx as u64);
                self.push(&entry);
            }
            Request::Fallocate {
                offset,
                len,
                mode,
                reply,
            } => {
                let idx = self.slots.insert(Op::Simple { reply });
                let entry = opcode::Fallocate::new(types::Fd(self.files.buffered.as_raw_fd()), len)
                    .offset(offset)
                    .mode(mode)
                    .build()
                    .user_data(idx as u64);
                self.push(&entry);
            }
        }
    }

    /// (Re)submits the remaining part of the read or write in slot `idx`.
    fn submit_slot(&mut self, idx: usize) {
        let files = Arc::clone(&self.files);
        let entry = match self.slots.ops[idx].as_mut() {
            Some(Op::Read {
                offset,
                buf,
                done,
                direct,
                ..
            }) => {
                let pos = *offset + *done as u64;
                let remaining = buf.len() - *done;
                // SAFETY: `done <= buf.len()`, so the pointer stays inside
                // (or one past) the allocation owned by this slot.
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                let fd = files.pick(*direct, pos, remaining, ptr as usize);
                // One op moves at most u32::MAX bytes; a short read resubmits the rest.
                let len = u32::try_from(remaining).unwrap_or(u32::MAX);
                opcode::Read::new(types::Fd(fd), ptr, len)
                    .offset(pos)
                    .build()
            }
            Some(Op::Write {
                offset,
                buf,
                done,
                fua,
                direct,
                ..
            }) => {
                let pos = *offset + *done as u64;
                let slice = &buf.as_slice()[*done..];
                let fd = files.pick(*direct, pos, slice.len(), slice.as_ptr() as usize);
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                // One op moves at most u32::MAX bytes; a short write resubmits the rest.
                let len = u32::try_from(slice.len()).unwrap_or(u32::MAX);
                opcode::Write::new(types::Fd(fd), slice.as_ptr(), len)
                    .offset(pos)
                    .rw_flags(flags)
                    .build()
            }
            _ => unreachable!("submit_slot is only called for reads and writes"),
        };
        self.push(&entry.user_data(idx as u64));
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let Some(op) = self.slots.take(idx) else {
            tracing::error!(slot = idx, "io_uring completion for an empty slot");
            return;
        };
        let retry = res == -libc::EAGAIN || res == -libc::EINTR;
        // The bytes moved; a negative result is an errno, and moved nothing.
        let moved = usize::try_from(res).unwrap_or(0);
        match op {
            Op::Read {
                offset,
                buf,
                mut done,
                direct,
                reply,
            } => {
                if retry {
                    self.slots.put_back(
                        idx,
                        Op::Read {
                            offset,
                            buf,
                            done,
                            direct,
                            reply,
                        },
                    );
                    self.submit_slot(idx);
                } else if res < 0 {
                    let _ = reply.send(Err(io::Error::from_raw_os_error(-res)));
                } else if res == 0 && done < buf.len() {
                    let _ = reply.send(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the image ended before the requested range (was it truncated?)",
                    )));
                } else {
                    done += moved;
                    if done >= buf.len() {
                        let _ = reply.send(Ok(buf.into_bytes()));
                    } else {
                        self.slots.put_back(
                            idx,
                            Op::Read {
                                offset,
                                buf,
                                done,
                                direct,
                                reply,
                            },
                        );
                        self.submit_slot(idx);
                    }
                }
            }
            Op::Write {
                offset,
                buf,
                mut done,
                fua,
                direct,
                reply,
            } => {
                let total = buf.as_slice().len();
                if retry || (moved > 0 && done + moved < total) {
                    if !retry {
                        done += moved;
                    }
                    self.slots.put_back(
                        idx,
                        Op::Write {
                            offset,
                            buf,
                            done,
                            fua,
                            direct,
                            reply,
                        },
                    );
                    self.submit_slot(idx);
                } else if res < 0 {
                    let _ = reply.send(Err(io::Error::from_raw_os_error(-res)));
                } else if res == 0 && total > 0 {
                    let _ = reply.send(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the image accepted no bytes",
                    )));
                } else {
                    let _ = reply.send(Ok(()));
                }
            }
            Op::Simple { reply } => {
                let _ = reply.send(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                });
            }
        }
    }
}
