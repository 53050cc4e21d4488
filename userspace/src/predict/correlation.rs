//! Block correlations in the style of C-Miner (Li et al., FAST '04), as a
//! first-order model over extents: per stream, a unit followed within the
//! next few distinct units by another counts one occurrence of the pair; the
//! confidence of `a -> b` is that count over the occurrences of `a`. The
//! claim follows the frequent successors of the units touched within the last
//! horizon, two hops deep. Each unit keeps its eight strongest successors, so
//! memory stays linear in the units touched.

use std::collections::{HashMap, VecDeque};

use super::{Access, MAX_CLAIMS, Model, Scored, top_n};

/// Distinct units after `a` that count as following it.
const LOOKAHEAD: usize = 4;
const SUCCESSORS: usize = 8;
/// Recently touched units used as seeds.
const SEEDS: usize = 256;
/// Occurrences of `a` needed before its successors are trusted.
const MIN_SUPPORT: u32 = 2;

#[derive(Debug, Clone, Copy)]
struct Succ {
    unit: u64,
    reads: u32,
    writes: u32,
}

#[derive(Debug, Default)]
struct Node {
    seen: u32,
    succ: Vec<Succ>,
}

impl Node {
    fn add(&mut self, unit: u64, write: bool) {
        let bump = |s: &mut Succ| {
            if write {
                s.writes = s.writes.saturating_add(1);
            } else {
                s.reads = s.reads.saturating_add(1);
            }
        };
        if let Some(s) = self.succ.iter_mut().find(|s| s.unit == unit) {
            bump(s);
            return;
        }
        let mut fresh = Succ {
            unit,
            reads: 0,
            writes: 0,
        };
        bump(&mut fresh);
        if self.succ.len() < SUCCESSORS {
            self.succ.push(fresh);
        } else if let Some(weakest) = self
            .succ
            .iter_mut()
            .filter(|s| s.reads + s.writes <= 1)
            .min_by_key(|s| s.reads + s.writes)
        {
            *weakest = fresh;
        }
    }
}

/// The successor-set model.
#[derive(Debug, Default)]
pub struct Correlation {
    nodes: HashMap<u64, Node>,
    /// Per stream, the last distinct units.
    recent: HashMap<u32, VecDeque<u64>>,
    /// Globally, the last distinct units touched and when.
    seeds: VecDeque<(u64, u64)>,
}

impl Model for Correlation {
    fn name(&self) -> &'static str {
        "correlation"
    }

    fn observe(&mut self, a: &Access) {
        let recent = self.recent.entry(a.stream).or_default();
        if !recent.contains(&a.unit) {
            for &before in recent.iter() {
                self.nodes.entry(before).or_default().add(a.unit, a.write);
            }
            recent.push_back(a.unit);
            if recent.len() > LOOKAHEAD {
                recent.pop_front();
            }
            let node = self.nodes.entry(a.unit).or_default();
            node.seen = node.seen.saturating_add(1);
        }
        if let Some(pos) = self.seeds.iter().position(|&(u, _)| u == a.unit) {
            self.seeds.remove(pos);
        }
        self.seeds.push_back((a.unit, a.ts_ns));
        if self.seeds.len() > SEEDS {
            self.seeds.pop_front();
        }
    }

    fn gap(&mut self, _start_ns: u64, _end_ns: u64) {
        // What came before the gap did not lead to what comes after.
        self.recent.clear();
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let mut claims: HashMap<u64, Scored> = HashMap::new();
        let mut frontier: Vec<(u64, f64)> = self
            .seeds
            .iter()
            .filter(|&&(_, ts)| now_ns.saturating_sub(ts) <= horizon_ns)
            .map(|&(u, _)| (u, 1.0))
            .collect();
        for _hop in 0..2 {
            let mut next = Vec::new();
            for &(a, weight) in &frontier {
                let Some(node) = self.nodes.get(&a) else {
                    continue;
                };
                if node.seen < MIN_SUPPORT {
                    continue;
                }
                let seen = f64::from(node.seen);
                for s in &node.succ {
                    let read = weight * (f64::from(s.reads) / seen).min(1.0);
                    let write = weight * (f64::from(s.writes) / seen).min(1.0);
                    let c = claims.entry(s.unit).or_insert(Scored {
                        unit: s.unit,
                        read: 0.0,
                        write: 0.0,
                    });
                    c.read = c.read.max(read);
                    c.write = c.write.max(write);
                    if read.max(write) >= 0.5 {
                        next.push((s.unit, read.max(write)));
                    }
                }
            }
            if next.is_empty() || claims.len() >= MAX_CLAIMS {
                break;
            }
            frontier = next;
        }
        top_n(claims.into_values().collect(), MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.nodes.capacity() * (size_of::<Node>() + 16)
            + self
                .nodes
                .values()
                .map(|n| n.succ.capacity())
                .sum::<usize>()
                * size_of::<Succ>()
            + self.seeds.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, SEC, claimed, read, write};

    #[test]
    fn a_correlated_pair_of_regions_is_found() {
        let mut model = Correlation::default();
        let first = [10u64, 11, 12];
        let second = [5000u64, 5001, 5002];
        let mut now = 0;
        for round in 0..10u64 {
            // Unrelated accesses between the occurrences of the pair.
            for k in 0..5 {
                model.feed(&read(now, 100_000 + round * 10 + k));
                now += MS;
            }
            now += SEC;
            for &u in &first {
                model.feed(&read(now, u));
                now += MS;
            }
            for &u in &second {
                model.feed(&write(now, u));
                now += MS;
            }
            now += SEC;
        }
        for &u in &first {
            model.feed(&read(now, u));
            now += MS;
        }
        let s = model.predict(now, 100 * MS);
        let c = claimed(&s);
        for u in second {
            assert!(c.contains(&u), "{u} follows the pair's first region: {c:?}");
            let claim = s.iter().find(|s| s.unit == u).expect("claimed");
            assert!(claim.write > 0.9 && claim.read == 0.0);
        }
        assert!(
            c.iter().all(|&u| u < 100_000),
            "no stray unit claimed: {c:?}"
        );
    }

    #[test]
    fn a_gap_breaks_the_chain_of_successors() {
        let mut m = Correlation::default();
        for _ in 0..3 {
            m.feed(&read(0, 1));
            m.gap(1, 2);
            m.feed(&read(3, 2));
            m.gap(4, 5);
        }
        let s = m.predict(6, 100);
        assert!(
            s.iter().all(|s| s.unit != 2 || s.any() < 0.5),
            "1 -> 2 never seen without a gap between"
        );
    }
}
