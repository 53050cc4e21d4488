//! Baseline: what the kernel's readahead does. Per stream, a read that
//! follows the previous one sequentially doubles the readahead window (up to
//! `read_ahead_kb`, 128 KiB by default); a random read resets it. The claim is
//! the window after each recently active stream's last read. No writes.

use std::collections::HashMap;

use super::{Access, Model, Scored};

#[derive(Debug, Clone, Copy)]
struct StreamState {
    last_unit: u64,
    last_ts: u64,
    /// Readahead window in units.
    window: u64,
    sequential: u32,
}

/// The kernel-style readahead predictor.
#[derive(Debug)]
pub struct Readahead {
    max_window: u64,
    streams: HashMap<u32, StreamState>,
}

impl Readahead {
    /// With the kernel's default `read_ahead_kb` of 128.
    pub fn new(unit: u64) -> Readahead {
        Readahead::with_max(unit, 128 << 10)
    }

    pub fn with_max(unit: u64, max_bytes: u64) -> Readahead {
        Readahead {
            max_window: (max_bytes / unit).max(1),
            streams: HashMap::new(),
        }
    }
}

impl Model for Readahead {
    fn name(&self) -> &'static str {
        "readahead"
    }

    fn observe(&mut self, a: &Access) {
        if a.write {
            return;
        }
        let max = self.max_window;
        let s = self.streams.entry(a.stream).or_insert(StreamState {
            last_unit: a.unit,
            last_ts: a.ts_ns,
            window: 1,
            sequential: 0,
        });
        if a.unit == s.last_unit + 1 || a.unit == s.last_unit {
            if a.unit != s.last_unit {
                s.sequential = s.sequential.saturating_add(1);
                s.window = (s.window * 2).min(max);
            }
        } else {
            s.sequential = 0;
            s.window = 1;
        }
        s.last_unit = a.unit;
        s.last_ts = a.ts_ns;
    }

    fn gap(&mut self, _start_ns: u64, _end_ns: u64) {
        self.streams.clear();
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let mut out = Vec::new();
        for s in self.streams.values() {
            if now_ns.saturating_sub(s.last_ts) > horizon_ns {
                continue;
            }
            let p = 0.5 + 0.4 * f64::from(s.sequential.min(4)) / 4.0;
            for i in 1..=s.window {
                out.push(Scored {
                    unit: s.last_unit + i,
                    read: p,
                    write: 0.0,
                });
            }
        }
        out
    }

    fn state_bytes(&self) -> usize {
        self.streams.capacity() * (size_of::<StreamState>() + 12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, claimed, read};

    #[test]
    fn a_sequential_stream_gets_the_window_after_it_and_a_random_one_a_single_unit() {
        // 64 KiB units, 128 KiB readahead: a window of two units.
        let mut m = Readahead::new(64 << 10);
        for i in 0..10 {
            m.feed(&read(i * MS, 100 + i));
        }
        assert_eq!(claimed(&m.predict(10 * MS, 100 * MS)), vec![110, 111]);
        m.feed(&read(11 * MS, 5000));
        assert_eq!(claimed(&m.predict(12 * MS, 100 * MS)), vec![5001]);
        // An idle stream claims nothing.
        assert!(m.predict(10_000 * MS, 100 * MS).is_empty());
    }
}
