//! The workload as a time series of windows: operations, bytes, and at each
//! resolution the units dirtied in the window (the dirty rate) and those
//! written for the first time (the growth of the written set). A window a gap
//! touched is marked unknown: lost events mean anything may have happened.
//!
//! The series is bounded: past `max_windows` entries, neighbouring windows are
//! merged in pairs and the stored window doubles. Dirty units are still counted
//! per base window, so a merged window's dirty rate is the mean of its base
//! windows' rates.

use serde::Serialize;

use super::LEVELS;

/// One window of the series.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub reads: u32,
    pub writes: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub faults: u32,
    /// Units (of each resolution) dirtied, summed over the base windows in this one.
    pub dirty_units: [u32; LEVELS],
    /// Units written for the first time in the trace.
    pub new_units: [u32; LEVELS],
    /// A gap overlapped this window: its figures are a lower bound.
    pub unknown: bool,
}

impl Window {
    fn merge(&mut self, o: &Window) {
        self.reads = self.reads.saturating_add(o.reads);
        self.writes = self.writes.saturating_add(o.writes);
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
        self.faults = self.faults.saturating_add(o.faults);
        for l in 0..LEVELS {
            self.dirty_units[l] = self.dirty_units[l].saturating_add(o.dirty_units[l]);
            self.new_units[l] = self.new_units[l].saturating_add(o.new_units[l]);
        }
        self.unknown |= o.unknown;
    }
}

/// The bounded series.
#[derive(Debug)]
pub struct Series {
    /// The base window: the dirty rate's unit of time.
    pub base_ns: u64,
    /// The stored window: `base_ns` times a power of two.
    pub window_ns: u64,
    pub windows: Vec<Window>,
    max_windows: usize,
}

impl Series {
    pub fn new(base_ns: u64, max_windows: usize) -> Series {
        Series {
            base_ns,
            window_ns: base_ns,
            windows: Vec::new(),
            max_windows: max_windows.max(2),
        }
    }

    pub fn bytes(&self) -> usize {
        self.windows.capacity() * std::mem::size_of::<Window>()
    }

    /// The window holding `ts`, created (and the series coarsened) as needed.
    #[inline]
    pub fn at(&mut self, ts: u64) -> &mut Window {
        let mut i = window_index(ts, self.window_ns);
        while i >= self.max_windows {
            self.coarsen();
            i = window_index(ts, self.window_ns);
        }
        if i >= self.windows.len() {
            self.windows.resize(i + 1, Window::default());
        }
        &mut self.windows[i]
    }

    fn coarsen(&mut self) {
        let merged: Vec<Window> = self
            .windows
            .chunks(2)
            .map(|pair| {
                let mut w = pair[0];
                if let Some(b) = pair.get(1) {
                    w.merge(b);
                }
                w
            })
            .collect();
        self.windows = merged;
        self.window_ns *= 2;
    }

    /// Marks every window overlapping `[start, end]` unknown.
    pub fn mark_unknown(&mut self, start: u64, end: u64) {
        self.at(end).unknown = true;
        let (a, b) = (
            window_index(start, self.window_ns),
            window_index(end, self.window_ns),
        );
        for w in &mut self.windows[a..=b] {
            w.unknown = true;
        }
    }

    /// Base windows per stored window.
    pub fn bases_per_window(&self) -> u64 {
        self.window_ns / self.base_ns
    }

    /// The full windows of a trace `duration_ns` long (the last one is cut
    /// short and left out, but there is at least one), idle ones included.
    pub fn full_windows(&self, duration_ns: u64) -> Vec<Window> {
        let full = usize::try_from(duration_ns / self.window_ns)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut padded: Vec<Window> = self.windows.iter().take(full).copied().collect();
        padded.resize(full, Window::default());
        padded
    }

    /// The dirty rate at resolution `level` (unit `unit`) of a trace
    /// `duration_ns` long: dirty bytes per second in each full window that
    /// no gap touched (a merged window counts the mean of its base windows).
    pub fn dirty_rate(&self, level: usize, unit: u64, duration_ns: u64) -> Percentiles {
        let secs = self.window_ns as f64 / 1e9;
        Percentiles::of(
            self.full_windows(duration_ns)
                .iter()
                .filter(|w| !w.unknown)
                .map(|w| f64::from(w.dirty_units[level]) * unit as f64 / secs)
                .collect(),
        )
    }
}

/// The index of the window of `window_ns` holding `ts`; past `usize` it
/// saturates (the series then coarsens until it fits).
pub(crate) fn window_index(ts: u64, window_ns: u64) -> usize {
    usize::try_from(ts / window_ns).unwrap_or(usize::MAX)
}

/// The nearest rank of quantile `q` among `len` sorted values, 1-based.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "q is in 0..=1, so the rank is in 0..=len (as saturates, then clamps)"
)]
pub(crate) fn nearest_rank(len: usize, q: f64) -> usize {
    ((len as f64 * q).ceil() as usize).clamp(1, len.max(1))
}

/// Percentiles of a set of values (nearest rank).
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[nearest_rank(v.len(), q) - 1];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // whole numbers, exact in f64
mod tests {
    use super::*;

    #[test]
    fn coarsening_keeps_totals_and_doubles_the_window() {
        let mut s = Series::new(1_000, 4);
        for t in 0..4u64 {
            s.at(t * 1_000).writes += 1;
        }
        s.at(4_000).writes += 10;
        assert_eq!(s.window_ns, 2_000);
        assert_eq!(s.windows.len(), 3);
        assert_eq!(s.windows.iter().map(|w| w.writes).sum::<u32>(), 14);
        // Reaching 9000 coarsens again: windows of 4000.
        s.mark_unknown(4_500, 9_000);
        assert_eq!(s.window_ns, 4_000);
        assert_eq!(s.windows.len(), 3);
        assert!(!s.windows[0].unknown && s.windows[1].unknown && s.windows[2].unknown);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
    }
}
