//! Dirty tracking from the eBPF tracer: a thread drives a tracing session
//! (which also records the source's history as a trace file) and marks every
//! completed write, discard and write-zeroes in the dirty maps.
//!
//! Block events are emitted at completion (`block_rq_complete`), so a write
//! whose data is not yet on the disk when the engine reads a unit is marked
//! after the engine cleared that unit, and the unit goes again. A gap (lost
//! events) marks the `gap_maps` whole and is counted: the engine then falls
//! back to the checksum tree for the send map.

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

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// `sync` requests asked and answered: a drain begun after request N answers N.
    want: AtomicU64,
    done: AtomicU64,
    gaps: Arc<AtomicU64>,
    write_events: AtomicU64,
    written_bytes: AtomicU64,
    /// Shared: the thread returns it too, and every `sync` after reports it.
    failure: Mutex<Option<Arc<SessionError>>>,
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
        let shared = Arc::new(Shared::default());
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
                loop {
                    let want = shared.want.load(Ordering::Acquire);
                    if let Err(e) = session.step(STEP) {
                        let e = Arc::new(e);
                        *shared.failure.lock().expect("failure lock poisoned") =
                            Some(Arc::clone(&e));
                        shared.done.store(u64::MAX, Ordering::Release);
                        return Err(e);
                    }
                    shared.done.store(want, Ordering::Release);
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
        loop {
            let done = self.shared.done.load(Ordering::Acquire);
            if done == u64::MAX {
                return Err(self.failure());
            }
            if done >= ticket {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
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
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
