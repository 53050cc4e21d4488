//! Dirty tracking from the eBPF tracer: a thread drives a tracing session
//! (which also records the source's history as a trace file) and marks every
//! completed write, discard and write-zeroes in the dirty maps.
//!
//! Block events are emitted at completion (`block_rq_complete`), so a write
//! whose data is not yet on the disk when the engine reads a unit is marked
//! after the engine cleared that unit, and the unit goes again. A gap (lost
//! events) marks the `gap_maps` whole and is counted: the engine then falls
//! back to the checksum tree for the send map.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::dirty::DirtyMap;
use crate::history::HistoryError;
use crate::trace::Record;
use crate::trace::format::TraceHeader;
use crate::trace::session::{Observer, Session, SessionConfig, SessionError, SessionTotals};

use super::ReplicateError;

/// How long one poll of the ring waits: bounds how late `sync` answers.
const STEP: Duration = Duration::from_millis(5);

struct Shared {
    /// Written by `sync` (and `stop`) so that the thread's wait for events
    /// ends at once: a paused workload sends none, and each `sync` inside
    /// the downtime would otherwise cost up to two waits.
    wake: Wake,
    /// Told when `done` moves.
    answered: tokio::sync::Notify,
    stop: AtomicBool,
    /// `sync` requests asked and answered: a drain begun after request N answers N.
    want: AtomicU64,
    done: AtomicU64,
    gaps: Arc<AtomicU64>,
    /// At the latest answered drain, the trace held every completed write
    /// (`Session::settled`).
    settled: AtomicBool,
    write_events: AtomicU64,
    written_bytes: AtomicU64,
    /// Shared: the thread returns it too, and every `sync` after reports it.
    failure: Mutex<Option<Arc<SessionError>>>,
}

/// An eventfd that ends the tracker thread's wait for events.
struct Wake(OwnedFd);

impl Wake {
    fn new() -> std::io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new
        // descriptor that we own from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Makes the descriptor readable. It cannot fail short of a counter
    /// near 2^64 (EAGAIN), which is readable already.
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our open eventfd.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Makes it unreadable again (EAGAIN when it already is).
    fn reset(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our open, non-blocking eventfd.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

/// Builds an extra observer once the session's header is known; an error
/// stops the tracker from starting.
pub type ObserverFactory = Box<dyn FnOnce(&TraceHeader) -> Result<Observer, HistoryError> + Send>;

/// The running tracker. Dropping it stops the thread (the trace file is closed cleanly by `stop`).
pub struct Tracker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<SessionTotals, Arc<SessionError>>>>,
}

/// Counters of the tracker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerCounts {
    pub write_events: u64,
    pub written_bytes: u64,
    pub gaps: u64,
}

impl Tracker {
    /// Starts tracing `cfg`'s target; writes mark `write_maps`, a gap marks `gap_maps` whole.
    /// Returns once the hooks are attached, so no write after this call is missed.
    pub fn start(
        cfg: SessionConfig,
        write_maps: Vec<Arc<DirtyMap>>,
        gap_maps: Vec<Arc<DirtyMap>>,
    ) -> Result<Tracker, ReplicateError> {
        Tracker::start_observed(cfg, write_maps, gap_maps, None)
    }

    /// [`Tracker::start`], and every record also goes to the observer `extra`
    /// builds from the session's header (the history writer).
    pub fn start_observed(
        cfg: SessionConfig,
        write_maps: Vec<Arc<DirtyMap>>,
        gap_maps: Vec<Arc<DirtyMap>>,
        extra: Option<ObserverFactory>,
    ) -> Result<Tracker, ReplicateError> {
        let shared = Arc::new(Shared {
            wake: Wake::new().map_err(ReplicateError::Wake)?,
            answered: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            want: AtomicU64::new(0),
            done: AtomicU64::new(0),
            gaps: Arc::default(),
            settled: AtomicBool::new(false),
            write_events: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            failure: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tern-tracker".into())
            .spawn(move || {
                let mut session = match Session::start(&cfg) {
                    Ok(s) => s,
                    Err(e) => {
                        let e = Arc::new(e);
                        let _ = ready_tx.send(Err(ReplicateError::Tracker(Arc::clone(&e))));
                        return Err(e);
                    }
                };
                let mut extra = match extra.map(|f| f(session.header())).transpose() {
                    Ok(extra) => extra,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ReplicateError::TrackerHistory(Box::new(e))));
                        return session.finish().map_err(Arc::new);
                    }
                };
                let obs_shared = Arc::clone(&thread_shared);
                session.observe(Box::new(move |rec| {
                    match rec {
                        Record::Block(b) if b.op.modifies() => {
                            obs_shared.write_events.fetch_add(1, Ordering::Relaxed);
                            obs_shared
                                .written_bytes
                                .fetch_add(u64::from(b.len), Ordering::Relaxed);
                            for map in &write_maps {
                                map.mark(b.offset, u64::from(b.len));
                            }
                        }
                        Record::Gap(_) => {
                            obs_shared.gaps.fetch_add(1, Ordering::AcqRel);
                            for map in &gap_maps {
                                map.mark_all();
                            }
                        }
                        _ => {}
                    }
                    // After the dirty maps: replication does not wait on the history.
                    if let Some(extra) = &mut extra {
                        extra(rec);
                    }
                }));
                let _ = ready_tx.send(Ok(()));
                let shared = thread_shared;
                let mut done = 0;
                loop {
                    // Reset before reading `want`: a `sync` that asks after
                    // this read wakes the wait below.
                    shared.wake.reset();
                    let want = shared.want.load(Ordering::Acquire);
                    // Someone waits: drain and answer without waiting for events.
                    let timeout = if want > done { Duration::ZERO } else { STEP };
                    if let Err(e) = session.step_or_woken(timeout, Some(shared.wake.fd())) {
                        let e = Arc::new(e);
                        *shared.failure.lock().expect("failure lock poisoned") =
                            Some(Arc::clone(&e));
                        shared.done.store(u64::MAX, Ordering::Release);
                        shared.answered.notify_waiters();
                        return Err(e);
                    }
                    done = want;
                    shared.settled.store(session.settled(), Ordering::Release);
                    shared.done.store(want, Ordering::Release);
                    shared.answered.notify_waiters();
                    if shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                }
                session.finish().map_err(Arc::new)
            })
            .map_err(ReplicateError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Tracker {
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(ReplicateError::TrackerThread(
                "the tracker thread ended before it started",
            )),
        }
    }

    /// Waits until every write that completed before this call is in the maps.
    pub async fn sync(&self) -> Result<(), ReplicateError> {
        let ticket = self.shared.want.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.wake.ring();
        loop {
            let answered = self.shared.answered.notified();
            tokio::pin!(answered);
            // Registered before `done` is read: an answer after the read wakes it.
            answered.as_mut().enable();
            let done = self.shared.done.load(Ordering::Acquire);
            if done == u64::MAX {
                return Err(self.failure());
            }
            if done >= ticket {
                return Ok(());
            }
            // The bound is a safety net; the thread notifies every answer.
            let _ = tokio::time::timeout(STEP, answered).await;
        }
    }

    fn failure(&self) -> ReplicateError {
        match self
            .shared
            .failure
            .lock()
            .expect("failure lock poisoned")
            .as_ref()
        {
            Some(e) => ReplicateError::Tracker(Arc::clone(e)),
            None => ReplicateError::TrackerThread("the tracker stopped"),
        }
    }

    /// The gap counter itself, for reporters that outlive a borrow of the tracker.
    pub fn gap_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.gaps)
    }

    /// Whether the last [`Tracker::sync`] left no completed write
    /// unaccounted for: every write completed before the sync is in the
    /// dirty maps (or its loss is a gap). A standby's recovery point moves
    /// only then.
    pub fn settled(&self) -> bool {
        self.shared.settled.load(Ordering::Acquire)
    }

    /// Gaps (windows of lost events) seen so far.
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::Acquire)
    }

    pub fn counts(&self) -> TrackerCounts {
        TrackerCounts {
            write_events: self.shared.write_events.load(Ordering::Relaxed),
            written_bytes: self.shared.written_bytes.load(Ordering::Relaxed),
            gaps: self.gaps(),
        }
    }

    /// Stops tracing, closes the trace file and returns the session's totals.
    pub fn stop(mut self) -> Result<SessionTotals, ReplicateError> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.ring();
        let thread = self
            .thread
            .take()
            .expect("the thread is only taken by stop or drop");
        match thread.join() {
            Ok(result) => result.map_err(ReplicateError::Tracker),
            Err(_) => Err(ReplicateError::TrackerThread("the tracker thread panicked")),
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.ring();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
