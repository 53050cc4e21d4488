//! The two naive forecasts every model must beat, as models: `last-horizon`
//! claims what was touched in the last horizon, `ever-touched` everything
//! ever touched. They take no parameters and learn nothing, which is what
//! makes them the bar: a forecast that loses to them on a trace has learned
//! less about it than a list of recent blocks holds.

use std::collections::HashMap;

use super::{Access, Model, Scored};

#[derive(Debug, Clone, Copy, Default)]
struct Last {
    read: Option<u64>,
    write: Option<u64>,
}

/// Which of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The units touched in `[now - horizon, now)`.
    LastHorizon,
    /// Every unit ever touched.
    EverTouched,
}

/// A naive forecast over each unit's last read and write.
#[derive(Debug)]
pub struct Naive {
    kind: Kind,
    units: HashMap<u64, Last>,
}

impl Naive {
    /// Claims the units touched in `[now - horizon, now)`.
    pub fn last_horizon() -> Naive {
        Naive {
            kind: Kind::LastHorizon,
            units: HashMap::new(),
        }
    }

    /// Claims every unit ever touched.
    pub fn ever_touched() -> Naive {
        Naive {
            kind: Kind::EverTouched,
            units: HashMap::new(),
        }
    }
}

impl Model for Naive {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::LastHorizon => "last-horizon",
            Kind::EverTouched => "ever-touched",
        }
    }

    fn observe(&mut self, a: &Access) {
        let e = self.units.entry(a.unit).or_default();
        if a.write {
            e.write = Some(a.ts_ns);
        } else {
            e.read = Some(a.ts_ns);
        }
    }

    // What was touched stays touched, whatever was lost beside it.
    fn gap(&mut self, _start_ns: u64, _end_ns: u64) {}

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let since = match self.kind {
            Kind::LastHorizon => now_ns.saturating_sub(horizon_ns),
            Kind::EverTouched => 0,
        };
        // Probability 1 for each op last done in the window, 0 otherwise.
        let hit = |t: Option<u64>| {
            if t.is_some_and(|t| t >= since && t < now_ns) {
                1.0
            } else {
                0.0
            }
        };
        self.units
            .iter()
            .map(|(&unit, l)| Scored {
                unit,
                read: hit(l.read),
                write: hit(l.write),
            })
            .filter(|s| s.any() > 0.0)
            .collect()
    }

    fn state_bytes(&self) -> usize {
        self.units.capacity() * (size_of::<u64>() + size_of::<Last>() + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, claimed, read, write};

    #[test]
    fn the_last_horizon_claims_only_what_it_saw_and_ever_touched_claims_all() {
        let history = [read(0, 1), write(500 * MS, 2), read(900 * MS, 3)];
        let mut last = Naive::last_horizon();
        let mut ever = Naive::ever_touched();
        for ev in &history {
            last.feed(ev);
            ever.feed(ev);
        }
        assert_eq!(claimed(&last.predict(1000 * MS, 600 * MS)), vec![2, 3]);
        assert_eq!(
            claimed(&last.predict(1000 * MS, 50 * MS)),
            Vec::<u64>::new()
        );
        assert_eq!(claimed(&ever.predict(1000 * MS, 50 * MS)), vec![1, 2, 3]);
        let two = ever
            .predict(1000 * MS, 50 * MS)
            .into_iter()
            .find(|s| s.unit == 2)
            .expect("unit 2 was written");
        assert!(two.write > 0.99 && two.read < 0.01, "{two:?}");
    }
}
