//! Sequential runs and strides by majority trend, in the style of Leap
//! (Al Maruf and Chowdhury, ATC '20): per stream (issuer and direction) keep
//! the last deltas between units; look for a delta that is a strict majority
//! of the newest 4, else 8, 16, 32; extend the trend over the horizon at the
//! stream's rate. A repeated unit is not a delta (small requests inside one
//! unit would otherwise look like a trend of 0).

use std::collections::{HashMap, VecDeque};

use super::{Access, MAX_CLAIMS, Model, Scored};

const HISTORY: usize = 32;
const WINDOWS: [usize; 4] = [4, 8, 16, 32];
/// Longest extrapolation, in steps, however fast the stream is.
const MAX_STEPS: u64 = 1 << 16;

#[derive(Debug, Default)]
struct Trend {
    first_ts: u64,
    steps: u64,
    last_unit: u64,
    last_ts: u64,
    deltas: VecDeque<i64>,
    stamps: VecDeque<u64>,
}

impl Trend {
    /// The majority delta and its share in the smallest window that has one.
    fn majority(&self) -> Option<(i64, f64)> {
        for w in WINDOWS {
            if self.deltas.len() < w {
                break;
            }
            let recent = self.deltas.iter().rev().take(w);
            // Boyer-Moore vote, then a count to confirm.
            let (mut cand, mut votes) = (0i64, 0usize);
            for &d in recent.clone() {
                if votes == 0 {
                    cand = d;
                    votes = 1;
                } else if d == cand {
                    votes += 1;
                } else {
                    votes -= 1;
                }
            }
            let count = recent.filter(|&&d| d == cand).count();
            if count * 2 > w {
                return Some((cand, count as f64 / w as f64));
            }
        }
        None
    }

    /// Steps per nanosecond: the lower of the recent rate and the stream's
    /// lifetime rate (over at least one horizon), so a burst (writeback
    /// flushing a run in a few milliseconds) is not extrapolated over a whole
    /// horizon: a stream younger than the horizon is extended by no more
    /// steps than it has taken.
    fn rate(&self, horizon_ns: u64) -> f64 {
        let (Some(first), Some(last)) = (self.stamps.front(), self.stamps.back()) else {
            return 0.0;
        };
        let recent = (self.stamps.len() - 1) as f64 / (last - first).max(1_000) as f64;
        let lifetime = self.steps as f64 / (self.last_ts - self.first_ts).max(horizon_ns) as f64;
        recent.min(lifetime)
    }
}

/// The majority-trend predictor.
#[derive(Debug, Default)]
pub struct Stride {
    trends: HashMap<(u32, bool), Trend>,
}

impl Model for Stride {
    fn name(&self) -> &'static str {
        "stride"
    }

    fn observe(&mut self, a: &Access) {
        let t = self.trends.entry((a.stream, a.write)).or_default();
        if !t.stamps.is_empty() && a.unit == t.last_unit {
            t.last_ts = a.ts_ns;
            return;
        }
        if t.stamps.is_empty() {
            t.first_ts = a.ts_ns;
        } else {
            t.steps += 1;
            // Units (offset / unit size) are far below 2^63, so the delta fits;
            // a jump that did not would only saturate, and extend off the end.
            let bound = if a.unit > t.last_unit {
                i64::MAX
            } else {
                i64::MIN
            };
            let delta = a.unit.checked_signed_diff(t.last_unit).unwrap_or(bound);
            t.deltas.push_back(delta);
            if t.deltas.len() > HISTORY {
                t.deltas.pop_front();
            }
        }
        t.stamps.push_back(a.ts_ns);
        if t.stamps.len() > HISTORY + 1 {
            t.stamps.pop_front();
        }
        t.last_unit = a.unit;
        t.last_ts = a.ts_ns;
    }

    fn gap(&mut self, _start_ns: u64, _end_ns: u64) {
        // A trend across lost events is not a trend.
        self.trends.clear();
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let mut claims: HashMap<u64, Scored> = HashMap::new();
        for (&(_, write), t) in &self.trends {
            if now_ns.saturating_sub(t.last_ts) > horizon_ns {
                continue;
            }
            let Some((delta, share)) = t.majority() else {
                continue;
            };
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "clamped to 1..=MAX_STEPS right away, and `as` saturates (NaN to 0)"
            )]
            let steps =
                ((t.rate(horizon_ns) * horizon_ns as f64).ceil() as u64).clamp(1, MAX_STEPS);
            let mut unit = t.last_unit;
            for _ in 0..steps {
                // The trend stops at either end of the unit space.
                let Some(next) = unit.checked_add_signed(delta) else {
                    break;
                };
                unit = next;
                let c = claims.entry(unit).or_insert(Scored {
                    unit,
                    read: 0.0,
                    write: 0.0,
                });
                if write {
                    c.write = c.write.max(share);
                } else {
                    c.read = c.read.max(share);
                }
            }
            if claims.len() >= MAX_CLAIMS {
                break;
            }
        }
        claims.into_values().collect()
    }

    fn state_bytes(&self) -> usize {
        self.trends.capacity() * (size_of::<Trend>() + 16) + self.trends.len() * HISTORY * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, claimed, read, write};

    #[test]
    fn a_pure_sequential_scan_is_extended_over_the_horizon() {
        let mut m = Stride::default();
        for i in 0..100 {
            m.feed(&read(i * MS, i));
        }
        // One unit per ms: the next 10 ms are units 100..110.
        let s = m.predict(100 * MS, 10 * MS);
        assert_eq!(claimed(&s), (100..110).collect::<Vec<_>>());
    }

    #[test]
    fn a_fixed_stride_with_noise_is_found_by_majority() {
        let mut m = Stride::default();
        let mut unit = 1000;
        for i in 0..64u64 {
            // Every fifth access is a stray one elsewhere.
            if i % 5 == 4 {
                m.feed(&write(i * MS, 50_000 + i));
                continue;
            }
            m.feed(&write(i * MS, unit));
            unit += 8;
        }
        let s = m.predict(64 * MS, 3 * MS);
        let c = claimed(&s);
        assert!(c.contains(&unit), "next stride step {unit} in {c:?}");
        assert!(c.contains(&(unit + 8)));
        assert!(
            s.iter().all(|s| s.read == 0.0),
            "a write stream claims writes"
        );
    }

    #[test]
    fn a_gap_forgets_the_trend() {
        let mut m = Stride::default();
        for i in 0..40 {
            m.feed(&read(i * MS, i));
        }
        m.gap(40 * MS, 41 * MS);
        assert!(m.predict(41 * MS, 10 * MS).is_empty());
    }
}
