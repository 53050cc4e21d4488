//! The destination's side of post-copy: which units of the image are still
//! on the source only, and the gate every read and write of the export goes
//! through while any are.
//!
//! A unit is *missing* (its data is on the source only), *filling* (a fill
//! from the source is being written into it) or present. A read of a
//! missing unit *demands* it (the source's demand stream hears of it before
//! anything the background push would send) and waits until a fill makes
//! it present; a write waits for fills under way in the units it covers,
//! makes the missing units it covers whole its own (present at once, no
//! fill will touch them again) and demands the missing units it covers in
//! part (their other bytes must come from the source first). Fills take
//! only missing units that no fill holds yet, so a unit is written by the
//! source at most once and never after the destination wrote it.
//!
//! Nothing here waits forever: a read whose units do not arrive within the
//! wait fails with [`PresenceError::Timeout`] rather than return the old
//! bytes under a missing unit.
//!
//! The map survives the agent: it is saved next to the image at the switch
//! and again, after an `fdatasync` of the image, before a write lands in a
//! unit the saved map still calls missing. So a restarted agent never
//! takes a unit the destination wrote for missing (a fill would overwrite
//! the write); it may take a filled unit for missing, and then gets the
//! same bytes again from the source, which does not change.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A read that finds its unit missing asks for the aligned window of this
/// many bytes around it (the missing units of it): the next reads of a
/// scan are then already on their way.
pub const DEMAND_WINDOW: u64 = 64 << 10;
/// How long a read or write waits for a missing unit by default.
pub const DEFAULT_WAIT: Duration = Duration::from_mins(2);
/// How often the map is saved in the background while fills land.
const SAVE_EVERY: Duration = Duration::from_millis(250);
/// Waits kept for the latency percentiles (the first this many).
const MAX_WAITS_KEPT: usize = 1 << 20;

/// Errors of the post-copy gate.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// A missing unit did not arrive in time.
    #[error(
        "post-copy: {len} bytes at offset {offset} are still on the source and did not arrive within {waited:?}; the read fails rather than return the old data (check that `tern migrate` still runs and reaches this agent)"
    )]
    Timeout {
        offset: u64,
        len: u64,
        waited: Duration,
    },
    /// The unit size is not a power of two of at least 4 KiB.
    #[error("post-copy unit {unit} bytes is not valid: give a power of two from 4 KiB to 1 GiB")]
    Unit { unit: u64 },
    /// The missing map does not match the image.
    #[error(
        "the post-copy map holds {got} bytes, but {units} units of {unit} bytes over {size} bytes take {want}: the source and this destination disagree on the image"
    )]
    MapSize {
        got: usize,
        want: usize,
        units: u64,
        unit: u64,
        size: u64,
    },
    /// A second post-copy asked for another unit size.
    #[error(
        "a post-copy in units of {active} bytes is under way; another in units of {asked} cannot join it"
    )]
    OtherUnit { active: u64, asked: u64 },
    /// The saved map could not be written, read or removed.
    #[error("could not {action} the post-copy map {path}: {source}")]
    Map {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The saved map is damaged or is not one.
    #[error(
        "the post-copy map {path} is damaged ({why}): which units of the image are still on the source only is unknown; migrate again from the source into a new image"
    )]
    MapCorrupt { path: PathBuf, why: &'static str },
    /// Flushing the image before the map was saved failed.
    #[error("could not flush the image before saving the post-copy map: {0}")]
    Flush(#[source] crate::image::ImageError),
}

/// Where a post-copy stands on the destination, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PresenceSnapshot {
    /// A post-copy is under way (some unit is missing).
    pub active: bool,
    pub unit: u64,
    /// Bytes still on the source only.
    pub missing_bytes: u64,
    /// Bytes the source filled in.
    pub filled_bytes: u64,
    /// Bytes of missing units the destination wrote whole (never fetched).
    pub local_bytes: u64,
    /// Demands sent to the source (each one window of missing units).
    pub demands: u64,
    /// Reads and writes that waited for a unit, and how long (µs).
    pub waits: u64,
    pub wait_p50_us: u64,
    pub wait_p99_us: u64,
    pub wait_max_us: u64,
}

/// Units a write took whole, held until it landed (dropped after the
/// write, failed or not).
#[derive(Debug)]
#[must_use = "the units are held until the claim is dropped after the write"]
pub struct WriteClaim {
    presence: Option<Presence>,
    units: Vec<Range<u64>>,
}

impl Drop for WriteClaim {
    fn drop(&mut self) {
        if let Some(presence) = self.presence.take() {
            presence.release(&self.units);
        }
    }
}

/// The gate; cheap to clone, all clones share one state. The default is
/// inactive: nothing is missing and every call returns at once.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Some unit is missing: the fast check of every read and write.
    active: AtomicBool,
    state: Mutex<Option<State>>,
    /// A fill finished (or a write made units its own): waiters look again.
    arrived: Notify,
    /// A demand was queued: the source's demand stream looks again.
    demanded: Notify,
    /// How long a read or write waits (zero: [`DEFAULT_WAIT`]).
    wait: Mutex<Duration>,
    /// Where the map is saved while a post-copy is under way.
    map_path: Mutex<Option<PathBuf>>,
    /// The image, flushed before the map is saved (fills durable first).
    image: Mutex<Option<crate::image::Image>>,
    /// One save (or removal) of the map at a time.
    saving: tokio::sync::Mutex<()>,
    filled_bytes: AtomicU64,
    local_bytes: AtomicU64,
    demands: AtomicU64,
    waits: Mutex<Vec<u32>>,
    waits_total: AtomicU64,
}

#[derive(Debug)]
struct State {
    unit_shift: u32,
    size: u64,
    units: u64,
    missing: Vec<u64>,
    /// The missing units as last saved: always a superset of `missing`.
    saved: Vec<u64>,
    filling: Vec<u64>,
    demanded: Vec<u64>,
    missing_units: u64,
    /// Units held by a fill or by a write that took them whole.
    filling_units: u64,
    /// Runs of units demanded and not yet handed to the source.
    queue: VecDeque<Range<u64>>,
}

fn get(words: &[u64], i: u64) -> bool {
    words[word_index(i)] & (1 << (i % 64)) != 0
}

fn set(words: &mut [u64], i: u64, on: bool) {
    let w = &mut words[word_index(i)];
    if on {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

fn word_index(i: u64) -> usize {
    usize::try_from(i / 64).expect("a word of a map held in memory")
}

impl State {
    fn unit(&self) -> u64 {
        1 << self.unit_shift
    }

    /// The units `[offset, offset + len)` touches (clipped to the image).
    fn touched(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        (offset >> self.unit_shift)..((end - 1) >> self.unit_shift) + 1
    }

    /// The units lying wholly inside `[offset, offset + len)` (the image's
    /// end counts as a unit's end).
    fn covered(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(self.unit());
        let last = if end >= self.size {
            self.units
        } else {
            end >> self.unit_shift
        };
        first..last.max(first)
    }

    /// Whether unit `i` is to be asked of the source.
    fn wanted(&self, i: u64) -> bool {
        get(&self.missing, i) && !get(&self.demanded, i) && !get(&self.filling, i)
    }

    fn unit_bytes(&self, i: u64) -> u64 {
        let start = i << self.unit_shift;
        (start + self.unit()).min(self.size) - start
    }

    /// Queues the missing units (not demanded yet, not being filled) of
    /// the demand window around each such unit of `units` outside `skip`
    /// (what a write covers whole needs nothing from the source). Returns
    /// whether any was queued.
    fn demand(&mut self, units: Range<u64>, skip: &Range<u64>) -> bool {
        let window = (DEMAND_WINDOW >> self.unit_shift).max(1);
        let mut queued = false;
        let mut i = units.start;
        while i < units.end {
            if skip.contains(&i) || !self.wanted(i) {
                i += 1;
                continue;
            }
            let from = i / window * window;
            let to = (from + window).min(self.units);
            let mut run: Option<Range<u64>> = None;
            for u in from..to {
                if !skip.contains(&u) && self.wanted(u) {
                    set(&mut self.demanded, u, true);
                    match &mut run {
                        Some(r) if r.end == u => r.end = u + 1,
                        _ => {
                            if let Some(r) = run.take() {
                                self.queue.push_back(r);
                            }
                            run = Some(u..u + 1);
                        }
                    }
                }
            }
            if let Some(r) = run {
                self.queue.push_back(r);
                queued = true;
            }
            i = to.max(i + 1);
        }
        queued
    }
}

impl Presence {
    /// An inactive gate whose reads wait at most `wait` once armed, and
    /// which saves its map at `map` while a post-copy is under way
    /// (flushing `image` first).
    pub fn new(
        wait: Duration,
        map: Option<PathBuf>,
        image: Option<crate::image::Image>,
    ) -> Presence {
        let presence = Presence::default();
        *lock(&presence.inner.wait) = wait;
        *lock(&presence.inner.map_path) = map;
        *lock(&presence.inner.image) = image;
        presence
    }

    /// Where the map of a post-copy into `image` is saved: `<image>.tern-postcopy`.
    pub fn map_for(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_owned();
        name.push(".tern-postcopy");
        PathBuf::from(name)
    }

    /// Whether a post-copy into `image` is under way (or its agent stopped
    /// during one): its map is saved.
    pub fn in_progress(image: &Path) -> bool {
        Presence::map_for(image).exists()
    }

    /// Takes up the post-copy whose map is saved (an agent restarted during
    /// one): returns whether there was one, for an image of `size` bytes.
    pub fn resume(&self, size: u64) -> Result<bool, PresenceError> {
        let Some(path) = lock(&self.inner.map_path).clone() else {
            return Ok(false);
        };
        let Some((saved_size, unit, missing)) = load_map(&path)? else {
            return Ok(false);
        };
        if saved_size != size {
            return Err(PresenceError::MapCorrupt {
                path,
                why: "saved for an image of another size",
            });
        }
        let missing_bytes = self.arm(size, unit, &missing)?;
        tracing::warn!(
            map = %path.display(),
            missing_bytes,
            "a post-copy was under way when the last agent stopped: taking it up (reads of units still on the source wait for them)"
        );
        Ok(true)
    }

    /// Whether some unit is missing.
    pub fn is_active(&self) -> bool {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Starts (or joins) a post-copy: the units whose bit is set in
    /// `missing` (bit `i % 8` of byte `i / 8` for unit `i`) are on the
    /// source only. Joining one under way keeps a unit missing only if both
    /// maps say so: what the destination holds now stays.
    pub fn arm(&self, size: u64, unit: u64, missing: &[u8]) -> Result<u64, PresenceError> {
        if !unit.is_power_of_two() || !(4096..=1 << 30).contains(&unit) {
            return Err(PresenceError::Unit { unit });
        }
        let units = size.div_ceil(unit);
        let want = usize::try_from(units.div_ceil(8)).expect("a map held in memory");
        if missing.len() != want {
            return Err(PresenceError::MapSize {
                got: missing.len(),
                want,
                units,
                unit,
                size,
            });
        }
        let words = word_index(units.div_ceil(64) * 64).max(1);
        let mut bits = vec![0u64; words];
        for (i, byte) in missing.iter().enumerate() {
            bits[i / 8] |= u64::from(*byte) << ((i % 8) * 8);
        }
        // Bits past the last unit mean nothing.
        if !units.is_multiple_of(64) {
            bits[word_index(units)] &= (1u64 << (units % 64)) - 1;
        }
        let mut guard = lock(&self.inner.state);
        let state = match guard.as_mut() {
            Some(state) if state.missing_units > 0 => {
                if state.unit() != unit {
                    return Err(PresenceError::OtherUnit {
                        active: state.unit(),
                        asked: unit,
                    });
                }
                for (have, asked) in state.missing.iter_mut().zip(&bits) {
                    *have &= asked;
                }
                state
            }
            _ => guard.insert(State {
                unit_shift: unit.trailing_zeros(),
                size,
                units,
                saved: bits.clone(),
                missing: bits,
                filling: vec![0; words],
                demanded: vec![0; words],
                missing_units: 0,
                filling_units: 0,
                queue: VecDeque::new(),
            }),
        };
        state.missing_units = state
            .missing
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let missing_units = state.missing_units;
        let missing_bytes = (0..units)
            .filter(|&i| get(&state.missing, i))
            .map(|i| state.unit_bytes(i))
            .sum();
        if missing_units > 0
            && let Some(path) = lock(&self.inner.map_path).clone()
        {
            // Before the export turns writable: nothing is written yet.
            save_map(&path, size, unit, &state.missing, units)?;
            state.saved.clone_from(&state.missing);
            self.spawn_saver();
        }
        self.inner
            .active
            .store(missing_units > 0, Ordering::Release);
        drop(guard);
        self.inner.arrived.notify_waiters();
        Ok(missing_bytes)
    }

    /// Saves the map if the saved one still calls a unit of `range`
    /// (`None`: of the image) missing that is not: before a write lands
    /// there, a restarted agent would let a fill overwrite the write.
    async fn save_stale(&self, range: Option<(u64, u64)>) -> Result<(), PresenceError> {
        let Some(path) = lock(&self.inner.map_path).clone() else {
            return Ok(());
        };
        let stale = |state: &State| {
            let units = match range {
                Some((offset, len)) => state.touched(offset, len),
                None => 0..state.units,
            };
            (state.missing_units > 0 || state.filling_units > 0)
                && units
                    .into_iter()
                    .any(|u| get(&state.saved, u) && !get(&state.missing, u))
        };
        if !lock(&self.inner.state).as_ref().is_some_and(stale) {
            return Ok(());
        }
        let _one = self.inner.saving.lock().await;
        // Another save may have covered it meanwhile.
        let snapshot = {
            let guard = lock(&self.inner.state);
            match guard.as_ref() {
                Some(now) if stale(now) => (now.size, now.unit(), now.missing.clone(), now.units),
                _ => return Ok(()),
            }
        };
        // Fills marked present must be on the disk before the map says so.
        let image = lock(&self.inner.image).clone();
        if let Some(image) = image {
            image.flush().await.map_err(PresenceError::Flush)?;
        }
        let (size, unit, missing, units) = snapshot;
        let saved = missing.clone();
        let file = path.clone();
        tokio::task::spawn_blocking(move || save_map(&file, size, unit, &missing, units))
            .await
            .map_err(|e| PresenceError::Map {
                action: "save",
                path: path.clone(),
                source: std::io::Error::other(e),
            })??;
        if let Some(state) = lock(&self.inner.state).as_mut() {
            // `missing` only shrinks: what was saved still covers it.
            state.saved = saved;
        }
        Ok(())
    }

    /// Saves the map now and then while the post-copy runs, so that a
    /// write into a unit filled since rarely waits for a save of its own.
    fn spawn_saver(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let presence = self.clone();
        drop(handle.spawn(async move {
            while presence.is_active() {
                tokio::time::sleep(SAVE_EVERY).await;
                if let Err(e) = presence.save_stale(None).await {
                    tracing::warn!(error = %e, "saving the post-copy map in the background failed; writes save it themselves");
                }
            }
        }));
    }

    /// Removes the saved map once nothing is missing (after any save under way).
    fn remove_map_when_saved(&self) {
        let Some(path) = lock(&self.inner.map_path).clone() else {
            return;
        };
        let presence = self.clone();
        let shown = path.display().to_string();
        let remove = async move {
            let _one = presence.inner.saving.lock().await;
            if presence.is_active() {
                return;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(map = %path.display(), error = %e, "could not remove the post-copy map of a finished post-copy; remove it by hand before the agent restarts");
                }
            }
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            drop(handle.spawn(remove));
        } else {
            tracing::error!(
                map = shown,
                "no runtime to remove the finished post-copy's map; remove it by hand"
            );
        }
    }

    fn wait(&self) -> Duration {
        let wait = *lock(&self.inner.wait);
        if wait.is_zero() { DEFAULT_WAIT } else { wait }
    }

    /// Waits until every unit `[offset, offset + len)` touches is present,
    /// demanding the missing ones.
    pub async fn before_read(&self, offset: u64, len: u64) -> Result<(), PresenceError> {
        self.gate(offset, len, false).await.map(drop)
    }

    /// Waits until a write of `[offset, offset + len)` may land: no fill
    /// under way in its units, the units it covers in part present; the
    /// missing units it covers whole become the destination's own. Hold
    /// the claim until the write has landed: a read of a unit it took waits
    /// for it (the bytes under it are neither the source's nor the write's).
    pub async fn before_write(&self, offset: u64, len: u64) -> Result<WriteClaim, PresenceError> {
        let units = self.gate(offset, len, true).await?;
        Ok(WriteClaim {
            presence: (!units.is_empty()).then(|| self.clone()),
            units,
        })
    }

    /// Returns the units a write took whole (held as filling).
    async fn gate(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<Range<u64>>, PresenceError> {
        if !self.is_active() {
            return Ok(Vec::new());
        }
        let mut taken = Vec::new();
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.wait());
        let mut waited = false;
        loop {
            // Registered before the look, so a fill that lands after it wakes us.
            let arrived = self.inner.arrived.notified();
            let must_wait = {
                let mut guard = lock(&self.inner.state);
                let Some(state) = guard.as_mut() else {
                    break;
                };
                let touched = state.touched(offset, len);
                let covered = if write {
                    state.covered(offset, len)
                } else {
                    0..0
                };
                let mut busy = false;
                let mut lacking = false;
                for u in touched.clone() {
                    let whole = covered.contains(&u);
                    if get(&state.filling, u) && (write || !whole) {
                        busy = true;
                    }
                    if get(&state.missing, u) && !whole && !get(&state.filling, u) {
                        lacking = true;
                    }
                }
                if lacking {
                    let queued = state.demand(touched.clone(), &covered);
                    if queued {
                        self.inner.demands.fetch_add(1, Ordering::Relaxed);
                        self.inner.demanded.notify_one();
                    }
                }
                if busy || lacking {
                    true
                } else {
                    if write {
                        taken = self.take_whole(state, covered);
                    }
                    false
                }
            };
            if !must_wait {
                break;
            }
            waited = true;
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(PresenceError::Timeout {
                    offset,
                    len,
                    waited: started.elapsed(),
                });
            }
        }
        if write && let Err(e) = self.save_stale(Some((offset, len))).await {
            drop(WriteClaim {
                presence: Some(self.clone()),
                units: taken,
            });
            return Err(e);
        }
        if waited {
            self.record_wait(started.elapsed());
        }
        Ok(taken)
    }

    /// Makes the missing units of `covered` (no fill holds them) the
    /// destination's own, held as filling until the write lands; returns
    /// them as runs of unit indices.
    fn take_whole(&self, state: &mut State, covered: Range<u64>) -> Vec<Range<u64>> {
        let mut taken = 0;
        let mut runs: Vec<Range<u64>> = Vec::new();
        for u in covered {
            if get(&state.missing, u) {
                set(&mut state.missing, u, false);
                set(&mut state.demanded, u, false);
                set(&mut state.filling, u, true);
                taken += state.unit_bytes(u);
                state.missing_units -= 1;
                state.filling_units += 1;
                match runs.last_mut() {
                    Some(r) if r.end == u => r.end = u + 1,
                    _ => runs.push(u..u + 1),
                }
            }
        }
        if taken > 0 {
            self.inner.local_bytes.fetch_add(taken, Ordering::Relaxed);
        }
        runs
    }

    /// Lets go of units a write took (its claim dropped).
    fn release(&self, units: &[Range<u64>]) {
        let mut guard = lock(&self.inner.state);
        if let Some(state) = guard.as_mut() {
            for u in units.iter().flat_map(Clone::clone) {
                if get(&state.filling, u) {
                    set(&mut state.filling, u, false);
                    state.filling_units -= 1;
                }
            }
            self.settle(state);
        }
        drop(guard);
        self.inner.arrived.notify_waiters();
    }

    /// Ends the post-copy once nothing is missing.
    fn settle(&self, state: &mut State) {
        if state.missing_units > 0 || state.filling_units > 0 || !self.is_active() {
            return;
        }
        state.queue.clear();
        self.inner.active.store(false, Ordering::Release);
        self.inner.demanded.notify_waiters();
        self.remove_map_when_saved();
        tracing::info!("post-copy complete: every unit is on the destination");
    }

    fn record_wait(&self, waited: Duration) {
        self.inner.waits_total.fetch_add(1, Ordering::Relaxed);
        let us = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX);
        let mut waits = lock(&self.inner.waits);
        if waits.len() < MAX_WAITS_KEPT {
            waits.push(us);
        }
    }

    /// Takes, for a fill of `[offset, offset + len)`, the units lying wholly
    /// inside it that are missing and held by no other fill; returns them as
    /// byte runs, to be written and then handed to [`Presence::filled`].
    /// Everything else of the fill is to be dropped: the destination holds
    /// it already (filled, or written since the switch).
    pub fn claim_fill(&self, offset: u64, len: u64) -> Vec<Range<u64>> {
        if !self.is_active() {
            return Vec::new();
        }
        let mut guard = lock(&self.inner.state);
        let Some(state) = guard.as_mut() else {
            return Vec::new();
        };
        let mut runs: Vec<Range<u64>> = Vec::new();
        for u in state.covered(offset, len) {
            if get(&state.missing, u) && !get(&state.filling, u) {
                set(&mut state.filling, u, true);
                state.filling_units += 1;
                let start = u << state.unit_shift;
                let end = start + state.unit_bytes(u);
                match runs.last_mut() {
                    Some(r) if r.end == start => r.end = end,
                    _ => runs.push(start..end),
                }
            }
        }
        runs
    }

    /// Ends fills taken by [`Presence::claim_fill`]: written (`ok`), the
    /// units are present; failed, they are missing again (and demanded
    /// again if a read waits for them).
    pub fn filled(&self, runs: &[Range<u64>], ok: bool) {
        if runs.is_empty() {
            return;
        }
        let mut guard = lock(&self.inner.state);
        let Some(state) = guard.as_mut() else {
            return;
        };
        let mut bytes = 0;
        for run in runs {
            for u in state.touched(run.start, run.end - run.start) {
                if get(&state.filling, u) {
                    set(&mut state.filling, u, false);
                    state.filling_units -= 1;
                }
                if ok && get(&state.missing, u) {
                    set(&mut state.missing, u, false);
                    set(&mut state.demanded, u, false);
                    state.missing_units -= 1;
                    bytes += state.unit_bytes(u);
                } else if !ok {
                    set(&mut state.demanded, u, false);
                }
            }
        }
        self.inner.filled_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.settle(state);
        drop(guard);
        self.inner.arrived.notify_waiters();
    }

    /// The next demanded byte ranges for the source, at most `max` runs;
    /// waits for one. `None` once nothing is missing.
    pub async fn next_demands(&self, max: usize) -> Option<Vec<Range<u64>>> {
        loop {
            let queued = self.inner.demanded.notified();
            {
                let mut guard = lock(&self.inner.state);
                let state = guard.as_mut()?;
                if !state.queue.is_empty() {
                    let shift = state.unit_shift;
                    let size = state.size;
                    let n = state.queue.len().min(max.max(1));
                    return Some(
                        state
                            .queue
                            .drain(..n)
                            .map(|r| (r.start << shift)..(r.end << shift).min(size))
                            .collect(),
                    );
                }
                if state.missing_units == 0 {
                    return None;
                }
            }
            queued.await;
        }
    }

    /// Queues again every unit demanded and still missing: a new demand
    /// stream does not know what the last one was told. Runs are cut at
    /// the demand windows, as when they were first asked for.
    pub fn requeue_demanded(&self) {
        let mut guard = lock(&self.inner.state);
        let Some(state) = guard.as_mut() else {
            return;
        };
        state.queue.clear();
        let window = (DEMAND_WINDOW >> state.unit_shift).max(1);
        let mut run: Option<Range<u64>> = None;
        for u in 0..state.units {
            if get(&state.demanded, u) && get(&state.missing, u) {
                match &mut run {
                    Some(r) if r.end == u && u % window != 0 => r.end = u + 1,
                    _ => {
                        if let Some(r) = run.replace(u..u + 1) {
                            state.queue.push_back(r);
                        }
                    }
                }
            }
        }
        if let Some(r) = run {
            state.queue.push_back(r);
        }
        drop(guard);
        self.inner.demanded.notify_one();
    }

    /// The units still missing, as on the wire (`PostCopyMap.missing`);
    /// empty when none are.
    pub fn missing_map(&self) -> Vec<u8> {
        let guard = lock(&self.inner.state);
        let Some(state) = guard.as_ref().filter(|s| s.missing_units > 0) else {
            return Vec::new();
        };
        let bytes = usize::try_from(state.units.div_ceil(8)).expect("a map held in memory");
        state
            .missing
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(bytes)
            .collect()
    }

    /// Where the post-copy stands.
    pub fn snapshot(&self) -> PresenceSnapshot {
        let (unit, missing_bytes) = {
            let guard = lock(&self.inner.state);
            guard.as_ref().map_or((0, 0), |s| {
                let bytes = (0..s.units)
                    .filter(|&i| get(&s.missing, i))
                    .map(|i| s.unit_bytes(i))
                    .sum();
                (s.unit(), bytes)
            })
        };
        let mut waits = lock(&self.inner.waits).clone();
        waits.sort_unstable();
        let at = |q: f64| -> u64 {
            if waits.is_empty() {
                return 0;
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a quantile's index into a list held in memory"
            )]
            let i = ((waits.len() - 1) as f64 * q).round() as usize;
            u64::from(waits[i])
        };
        PresenceSnapshot {
            active: self.is_active(),
            unit,
            missing_bytes,
            filled_bytes: self.inner.filled_bytes.load(Ordering::Relaxed),
            local_bytes: self.inner.local_bytes.load(Ordering::Relaxed),
            demands: self.inner.demands.load(Ordering::Relaxed),
            waits: self.inner.waits_total.load(Ordering::Relaxed),
            wait_p50_us: at(0.5),
            wait_p99_us: at(0.99),
            wait_max_us: waits.last().copied().map_or(0, u64::from),
        }
    }
}

/// What a saved map starts with.
const MAP_MAGIC: &[u8; 8] = b"TERNPC01";

/// Saves the map atomically: the magic, the image size and unit (LE u64),
/// one bit per unit (as on the wire), and the blake3 of all that; a
/// temporary file, synced, renamed over the old one, the directory synced.
fn save_map(
    path: &Path,
    size: u64,
    unit: u64,
    missing: &[u64],
    units: u64,
) -> Result<(), PresenceError> {
    let err = |action| {
        move |source| PresenceError::Map {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let bytes = usize::try_from(units.div_ceil(8)).expect("a map held in memory");
    let mut data = Vec::with_capacity(24 + bytes + 32);
    data.extend_from_slice(MAP_MAGIC);
    data.extend_from_slice(&size.to_le_bytes());
    data.extend_from_slice(&unit.to_le_bytes());
    data.extend(missing.iter().flat_map(|w| w.to_le_bytes()).take(bytes));
    let sum = *blake3::hash(&data).as_bytes();
    data.extend_from_slice(&sum);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &data).map_err(err("write"))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err("sync"))?;
    std::fs::rename(&tmp, path).map_err(err("rename"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("sync the directory of"))?;
    }
    Ok(())
}

/// Loads a map saved by [`save_map`]: the image size, the unit and the
/// bytes of the bits; `None` when there is none.
fn load_map(path: &Path) -> Result<Option<(u64, u64, Vec<u8>)>, PresenceError> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PresenceError::Map {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let corrupt = |why| PresenceError::MapCorrupt {
        path: path.to_path_buf(),
        why,
    };
    if data.len() < 24 + 32 || &data[..8] != MAP_MAGIC {
        return Err(corrupt("not a tern post-copy map"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("its checksum does not match"));
    }
    let word = |at: usize| {
        u64::from_le_bytes(
            body[at..at + 8]
                .try_into()
                .expect("eight bytes of the header"),
        )
    };
    Ok(Some((word(8), word(16), body[24..].to_vec())))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[expect(
    clippy::single_range_in_vec_init,
    reason = "demands and fills are lists of ranges: a list of one is what is expected"
)]
mod tests {
    use super::*;

    const UNIT: u64 = 4096;

    /// A gate over 64 units of 4 KiB with `missing` units missing.
    fn armed(missing: &[u64]) -> Presence {
        let p = Presence::new(Duration::from_secs(5), None, None);
        let mut map = vec![0u8; 8];
        for &u in missing {
            map[usize::try_from(u / 8).expect("small")] |= 1 << (u % 8);
        }
        p.arm(64 * UNIT, UNIT, &map).expect("arm");
        p
    }

    #[tokio::test]
    async fn a_read_of_present_units_passes_and_one_of_a_missing_unit_waits_for_its_fill() {
        let p = armed(&[3]);
        p.before_read(0, 3 * UNIT).await.expect("present");
        let reader = {
            let p = p.clone();
            tokio::spawn(async move { p.before_read(3 * UNIT + 100, 10).await })
        };
        let demands = p.next_demands(8).await.expect("a demand");
        // The window of 64 KiB around unit 3 holds only unit 3 missing.
        assert_eq!(demands, vec![3 * UNIT..4 * UNIT]);
        assert!(!reader.is_finished());
        let runs = p.claim_fill(0, 16 * UNIT);
        assert_eq!(runs, vec![3 * UNIT..4 * UNIT]);
        p.filled(&runs, true);
        reader.await.expect("joined").expect("arrived");
        assert!(!p.is_active());
        let s = p.snapshot();
        assert_eq!(
            (s.missing_bytes, s.filled_bytes, s.demands, s.waits),
            (0, UNIT, 1, 1)
        );
        // Nothing missing: the demand stream ends.
        assert_eq!(p.next_demands(8).await, None);
    }

    #[tokio::test]
    async fn a_whole_unit_write_makes_it_local_and_a_later_fill_drops_it() {
        let p = armed(&[1, 2]);
        let claim = p
            .before_write(UNIT, UNIT)
            .await
            .expect("whole unit: no fetch");
        assert_eq!(p.claim_fill(0, 4 * UNIT), vec![2 * UNIT..3 * UNIT]);
        let s = p.snapshot();
        assert_eq!((s.local_bytes, s.demands), (UNIT, 0));
        // Until the write landed, a read of the unit waits: its bytes are
        // neither the source's nor the write's yet.
        let reader = {
            let p = p.clone();
            tokio::spawn(async move { p.before_read(UNIT, 10).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reader.is_finished());
        drop(claim);
        reader.await.expect("joined").expect("written");
    }

    #[tokio::test]
    async fn a_partial_write_of_a_missing_unit_waits_for_the_rest_of_it() {
        let p = armed(&[5]);
        let writer = {
            let p = p.clone();
            tokio::spawn(async move { p.before_write(5 * UNIT + 512, 512).await })
        };
        assert_eq!(p.next_demands(8).await, Some(vec![5 * UNIT..6 * UNIT]));
        let runs = p.claim_fill(5 * UNIT, UNIT);
        tokio::task::yield_now().await;
        assert!(!writer.is_finished());
        p.filled(&runs, true);
        drop(writer.await.expect("joined").expect("arrived"));
        assert_eq!(p.snapshot().local_bytes, 0);
    }

    #[tokio::test]
    async fn a_write_waits_for_a_fill_under_way_in_its_unit_even_when_it_covers_it() {
        let p = armed(&[7]);
        let runs = p.claim_fill(7 * UNIT, UNIT);
        let writer = {
            let p = p.clone();
            tokio::spawn(async move { p.before_write(7 * UNIT, UNIT).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished(), "the fill would land over the write");
        p.filled(&runs, true);
        drop(writer.await.expect("joined").expect("passes"));
    }

    #[tokio::test]
    async fn a_failed_fill_leaves_the_unit_missing_and_a_read_demands_it_again() {
        let p = armed(&[9]);
        let runs = p.claim_fill(9 * UNIT, UNIT);
        p.filled(&runs, false);
        assert!(p.is_active());
        assert_eq!(p.claim_fill(9 * UNIT, UNIT), vec![9 * UNIT..10 * UNIT]);
    }

    #[tokio::test]
    async fn a_read_times_out_with_a_clear_error_instead_of_old_data() {
        let p = Presence::new(Duration::from_millis(50), None, None);
        p.arm(64 * UNIT, UNIT, &[1, 0, 0, 0, 0, 0, 0, 0])
            .expect("arm");
        let err = p.before_read(0, 512).await.expect_err("never filled");
        assert!(
            matches!(err, PresenceError::Timeout { offset: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("still on the source"), "{err}");
    }

    #[test]
    fn a_map_of_the_wrong_size_or_unit_is_refused_and_a_second_map_only_narrows() {
        let p = Presence::default();
        assert!(matches!(
            p.arm(64 * UNIT, UNIT, &[0; 7]),
            Err(PresenceError::MapSize { want: 8, .. })
        ));
        assert!(matches!(
            p.arm(64 * UNIT, 1000, &[0; 8]),
            Err(PresenceError::Unit { .. })
        ));
        assert_eq!(
            p.arm(64 * UNIT, UNIT, &[0b11, 0, 0, 0, 0, 0, 0, 0])
                .expect("arm"),
            2 * UNIT
        );
        // A retry of the switch with a wider map cannot make unit 2 missing again.
        assert_eq!(
            p.arm(64 * UNIT, UNIT, &[0b111, 0, 0, 0, 0, 0, 0, 0])
                .expect("join"),
            2 * UNIT
        );
        assert!(matches!(
            p.arm(64 * UNIT, 2 * UNIT, &[0; 4]),
            Err(PresenceError::OtherUnit { .. })
        ));
    }

    #[tokio::test]
    async fn the_saved_map_never_calls_a_unit_the_destination_wrote_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let map = Presence::map_for(&image);
        let p = Presence::new(Duration::from_secs(1), Some(map.clone()), None);
        p.arm(64 * UNIT, UNIT, &[0b111, 0, 0, 0, 0, 0, 0, 0])
            .expect("arm");
        assert!(Presence::in_progress(&image));
        // Unit 0 filled: the saved map may still call it missing...
        let runs = p.claim_fill(0, UNIT);
        p.filled(&runs, true);
        let saved = |p: &Presence| {
            let again = Presence::new(Duration::from_secs(1), Some(map.clone()), None);
            assert!(p.is_active());
            assert!(again.resume(64 * UNIT).expect("resume"));
            again.snapshot().missing_bytes
        };
        assert_eq!(saved(&p), 3 * UNIT);
        // ...until the destination writes into it (or makes unit 1 its own).
        drop(p.before_write(100, 10).await.expect("present"));
        assert_eq!(saved(&p), 2 * UNIT);
        drop(p.before_write(UNIT, UNIT).await.expect("whole unit"));
        assert_eq!(saved(&p), UNIT);
        let runs = p.claim_fill(2 * UNIT, UNIT);
        p.filled(&runs, true);
        // Removed once nothing is missing (by a task: let it run).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!Presence::in_progress(&image));
        std::fs::write(
            &map,
            b"TERNPC01 and then nonsense that is long enough to check",
        )
        .expect("write");
        let damaged = Presence::new(Duration::from_secs(1), Some(map.clone()), None);
        assert!(matches!(
            damaged.resume(64 * UNIT),
            Err(PresenceError::MapCorrupt { .. })
        ));
    }

    #[tokio::test]
    async fn a_new_demand_stream_hears_again_of_what_is_still_demanded() {
        let p = armed(&[20, 40]);
        let reader = {
            let p = p.clone();
            tokio::spawn(async move { p.before_read(20 * UNIT, UNIT).await })
        };
        assert_eq!(p.next_demands(8).await, Some(vec![20 * UNIT..21 * UNIT]));
        p.requeue_demanded();
        assert_eq!(p.next_demands(8).await, Some(vec![20 * UNIT..21 * UNIT]));
        let runs = p.claim_fill(20 * UNIT, UNIT);
        p.filled(&runs, true);
        reader.await.expect("joined").expect("arrived");
        // A long read demanded many windows: asked again, each is a window.
        let p = Presence::new(Duration::from_secs(5), None, None);
        p.arm(64 * UNIT, UNIT, &[0xff; 8]).expect("arm");
        let reader = {
            let p = p.clone();
            tokio::spawn(async move { p.before_read(0, 64 * UNIT).await })
        };
        assert_eq!(p.next_demands(64).await.expect("demands").len(), 4);
        p.requeue_demanded();
        let again = p.next_demands(64).await.expect("demands");
        assert_eq!(again.len(), 4, "{again:?}");
        assert!(again.iter().all(|r| r.end - r.start <= DEMAND_WINDOW));
        reader.abort();
    }
}
