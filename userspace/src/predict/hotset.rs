//! Baseline: the recency/frequency hot set (what an LRU cache keeps). A unit
//! touched `age` ago is claimed with probability `exp(-age / (horizon * (1 +
//! ln(1 + n))))`: recent units are hot, and units touched often stay hot longer.

use std::collections::HashMap;

use super::{Access, MAX_CLAIMS, Model, Scored, top_n};

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    last_read: Option<u64>,
    last_write: Option<u64>,
    reads: u32,
    writes: u32,
}

/// The LRU-like hot set.
#[derive(Debug, Default)]
pub struct HotSet {
    units: HashMap<u64, Entry>,
}

fn recency(last: Option<u64>, count: u32, now: u64, horizon: u64) -> f64 {
    let Some(last) = last else { return 0.0 };
    let age = now.saturating_sub(last) as f64;
    let scale = horizon as f64 * (1.0 + f64::from(count).ln_1p());
    (-age / scale).exp()
}

impl Model for HotSet {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn observe(&mut self, a: &Access) {
        let e = self.units.entry(a.unit).or_default();
        if a.write {
            e.last_write = Some(a.ts_ns);
            e.writes = e.writes.saturating_add(1);
        } else {
            e.last_read = Some(a.ts_ns);
            e.reads = e.reads.saturating_add(1);
        }
    }

    // Recency does not depend on what happened in the gap's shadow.
    fn gap(&mut self, _start_ns: u64, _end_ns: u64) {}

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let scored = self
            .units
            .iter()
            .map(|(&unit, e)| Scored {
                unit,
                read: recency(e.last_read, e.reads, now_ns, horizon_ns),
                write: recency(e.last_write, e.writes, now_ns, horizon_ns),
            })
            .filter(|s| s.any() >= 0.01)
            .collect();
        top_n(scored, MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.units.capacity() * (size_of::<u64>() + size_of::<Entry>() + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, claimed, read, write};

    #[test]
    fn recent_units_are_hot_and_old_ones_cool_off() {
        let mut m = HotSet::default();
        for ev in [read(0, 1), read(800 * MS, 2), write(950 * MS, 3)] {
            m.feed(&ev);
        }
        // Horizon 100 ms at t = 1 s: unit 1 is 10 horizons old.
        let s = m.predict(1000 * MS, 100 * MS);
        assert_eq!(claimed(&s), vec![3]);
        let three = s.iter().find(|s| s.unit == 3).expect("unit 3");
        assert!(three.write > 0.6 && three.read == 0.0);
        // Over a long horizon all three are hot.
        assert_eq!(claimed(&m.predict(1000 * MS, 10_000 * MS)), vec![1, 2, 3]);
    }
}
