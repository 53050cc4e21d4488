//! Time-of-day and other periods found in the history: the nightly backup
//! touches the same region at 02:00. The access count per 100 ms bin is the
//! series; `augurs`' periodogram proposes periods, and a period is kept when
//! the series' autocorrelation at that lag confirms it (a spike train's
//! harmonics do not). A day is always a candidate once two days are known.
//! A unit is claimed with the share of past cycles (up to eight) in which it
//! was touched in the same phase window; cycles whose window fell in a gap are
//! not counted either way.

use std::collections::HashMap;

use augurs::seasons::PeriodogramDetector;

use super::{Access, MAX_CLAIMS, Model, Scored, top_n};

const BIN_NS: u64 = 100_000_000;
const DAY_NS: u64 = 86_400_000_000_000;
/// Bins of the series the detector sees (older series are summed into coarser bins).
const DETECT_POINTS: usize = 4096;
/// Per unit, the newest touched bins kept.
const KEPT_BINS: usize = 128;
const CYCLES: u64 = 8;
const MIN_ACF: f64 = 0.3;

/// A touched bin: index, and bit 0 read / bit 1 write.
type Touch = (u32, u8);

/// The period model.
#[derive(Debug, Default)]
pub struct Periodic {
    start_ns: Option<u64>,
    counts: Vec<f64>,
    units: HashMap<u64, Vec<Touch>>,
    gaps: Vec<(u64, u64)>,
    /// Periods (ns) confirmed at the series length in `.1`.
    cached: Option<(Vec<u64>, usize)>,
}

fn acf(series: &[f64], lag: usize) -> f64 {
    if lag == 0 || lag >= series.len() {
        return 0.0;
    }
    let n = series.len() as f64;
    let mean = series.iter().sum::<f64>() / n;
    let var: f64 = series.iter().map(|x| (x - mean).powi(2)).sum();
    if var == 0.0 {
        return 0.0;
    }
    let cov: f64 = series[lag..]
        .iter()
        .zip(series)
        .map(|(a, b)| (a - mean) * (b - mean))
        .sum();
    cov / var
}

impl Periodic {
    fn bin(&self, ts: u64) -> u64 {
        ts.saturating_sub(self.start_ns.unwrap_or(0)) / BIN_NS
    }

    /// Confirmed periods in nanoseconds, strongest autocorrelation first.
    fn periods(&mut self) -> Vec<u64> {
        if let Some((p, len)) = &self.cached
            && self.counts.len() < len + len / 4 + 1
        {
            return p.clone();
        }
        let factor = self.counts.len().div_ceil(DETECT_POINTS).max(1);
        let series: Vec<f64> = self
            .counts
            .chunks(factor)
            .map(|c| c.iter().sum::<f64>())
            .collect();
        let mut found: Vec<u64> = Vec::new();
        if series.len() >= 12 {
            // The periodogram's periods are quantized to its FFT bins
            // (segment length / k): refine each peak to the lag between its
            // neighbours where the autocorrelation is highest.
            let detector = PeriodogramDetector::builder().min_period(2).build();
            let peaks: Vec<_> = detector.periodogram(&series).peaks(0.5).collect();
            let mut lags: Vec<(usize, f64)> = Vec::new();
            for peak in peaks.iter().rev().take(4) {
                let lo = peak.prev_period.min(peak.next_period).max(2) as usize;
                let hi = (peak.prev_period.max(peak.next_period) as usize)
                    .max(peak.period as usize)
                    .min(series.len() / 2);
                if let Some(best) = (lo..=hi)
                    .map(|lag| (lag, acf(&series, lag)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                {
                    lags.push(best);
                }
            }
            // Welch's periodogram smears a sparse spike train (a job that
            // runs briefly each period) over many bins: also take the
            // strongest local maxima of the autocorrelation itself.
            let acfs: Vec<f64> = (0..=series.len() / 2).map(|l| acf(&series, l)).collect();
            let mut maxima: Vec<(usize, f64)> = (2..acfs.len().saturating_sub(1))
                .filter(|&l| acfs[l] >= acfs[l - 1] && acfs[l] > acfs[l + 1])
                .map(|l| (l, acfs[l]))
                .collect();
            maxima.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            lags.extend(maxima.into_iter().take(2));
            lags.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (lag, r) in lags {
                let ns = lag as u64 * factor as u64 * BIN_NS;
                if r >= MIN_ACF && !found.contains(&ns) {
                    found.push(ns);
                }
            }
        }
        let span = self.counts.len() as u64 * BIN_NS;
        if span >= 2 * DAY_NS && !found.contains(&DAY_NS) {
            found.push(DAY_NS);
        }
        self.cached = Some((found.clone(), self.counts.len()));
        found
    }

    fn in_gap(&self, from: u64, to: u64) -> bool {
        self.gaps.iter().any(|&(s, e)| s < to && from < e)
    }
}

impl Model for Periodic {
    fn name(&self) -> &'static str {
        "periodic"
    }

    fn observe(&mut self, a: &Access) {
        let start = *self.start_ns.get_or_insert(a.ts_ns);
        if a.ts_ns < start {
            return;
        }
        let bin = self.bin(a.ts_ns);
        if bin as usize >= self.counts.len() {
            self.counts.resize(bin as usize + 1, 0.0);
        }
        self.counts[bin as usize] += 1.0;
        let touches = self.units.entry(a.unit).or_default();
        let bit = if a.write { 2 } else { 1 };
        match touches.last_mut() {
            Some(t) if u64::from(t.0) == bin => t.1 |= bit,
            _ => {
                if touches.len() >= KEPT_BINS {
                    touches.remove(0);
                }
                touches.push((bin as u32, bit));
            }
        }
    }

    fn gap(&mut self, start_ns: u64, end_ns: u64) {
        self.gaps.push((start_ns, end_ns));
    }

    fn predict(&mut self, now_ns: u64, horizon_ns: u64) -> Vec<Scored> {
        let Some(start) = self.start_ns else {
            return Vec::new();
        };
        let mut claims: HashMap<u64, Scored> = HashMap::new();
        for period in self.periods() {
            if period < horizon_ns {
                continue;
            }
            // The phase windows of past cycles that the history covers cleanly.
            let windows: Vec<(u64, u64)> = (1..=CYCLES)
                .filter_map(|c| {
                    let from = now_ns.checked_sub(c * period)?;
                    (from >= start && !self.in_gap(from, from + horizon_ns))
                        .then(|| (self.bin(from), self.bin(from + horizon_ns - 1)))
                })
                .collect();
            if windows.len() < 2 {
                continue;
            }
            // One period: the strongest usable (its multiples would hide
            // the cycles in between).
            let n = windows.len() as f64;
            for (&unit, touches) in &self.units {
                let (mut reads, mut writes) = (0u32, 0u32);
                for &(lo, hi) in &windows {
                    let i = touches.partition_point(|t| u64::from(t.0) < lo);
                    let mask = touches[i..]
                        .iter()
                        .take_while(|t| u64::from(t.0) <= hi)
                        .fold(0u8, |m, t| m | t.1);
                    reads += u32::from(mask & 1);
                    writes += u32::from(mask >> 1);
                }
                if reads + writes == 0 {
                    continue;
                }
                let c = claims.entry(unit).or_insert(Scored {
                    unit,
                    read: 0.0,
                    write: 0.0,
                });
                c.read = c.read.max(f64::from(reads) / n);
                c.write = c.write.max(f64::from(writes) / n);
            }
            break;
        }
        top_n(claims.into_values().collect(), MAX_CLAIMS)
    }

    fn state_bytes(&self) -> usize {
        self.counts.capacity() * 8
            + self.units.capacity() * 40
            + self.units.values().map(Vec::capacity).sum::<usize>() * size_of::<Touch>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::testkit::{MS, SEC, claimed, read, write};

    /// A job every 60 s reads units 100..110 and writes 200; between runs, a
    /// steady trickle of reads elsewhere.
    fn periodic_history(cycles: u64, lost: Option<u64>) -> (Periodic, u64) {
        let mut m = Periodic::default();
        let mut noise = 10_000;
        for c in 0..cycles {
            let base = c * 60 * SEC;
            if lost == Some(c) {
                m.feed(&read(base + 30 * SEC, noise));
                noise += 1;
                continue;
            }
            for (k, u) in (100..110).enumerate() {
                m.feed(&read(base + k as u64 * MS, u));
            }
            m.feed(&write(base + 20 * MS, 200));
            for s in (1..60).step_by(3) {
                m.feed(&read(base + s * SEC, noise));
                noise += 1;
            }
        }
        (m, cycles * 60 * SEC)
    }

    #[test]
    fn a_periodic_job_is_predicted_just_before_it_runs() {
        let (mut m, end) = periodic_history(12, None);
        let periods = m.periods();
        assert!(periods.contains(&(60 * SEC)), "60 s found: {periods:?}");
        // Predict from 1 s before the next run, for 2 s.
        let s = m.predict(end - SEC, 2 * SEC);
        let mut want: Vec<u64> = (100..110).collect();
        want.push(200);
        assert_eq!(claimed(&s), want);
        let job_write = s.iter().find(|s| s.unit == 200).expect("200");
        assert!(job_write.write > 0.9 && job_write.read == 0.0);
        // Mid-cycle, the job is not claimed.
        let mid = m.predict(end - 30 * SEC, 2 * SEC);
        assert!(claimed(&mid).iter().all(|&u| u >= 10_000));
    }

    #[test]
    fn cycles_lost_in_a_gap_are_not_counted_against_the_unit() {
        // The last cycle's run is missing: without a gap that is a miss (7 of 8)...
        let (mut m, end) = periodic_history(12, Some(11));
        let s = m.predict(end - SEC, 2 * SEC);
        let job = s.iter().find(|s| s.unit == 105).expect("105");
        assert!((job.read - 7.0 / 8.0).abs() < 1e-9, "{job:?}");
        // ...but when the tracer lost events then, the cycle is not counted.
        let (mut m, end) = periodic_history(12, Some(11));
        m.gap(end - 61 * SEC, end - 58 * SEC);
        let s = m.predict(end - SEC, 2 * SEC);
        let job = s.iter().find(|s| s.unit == 105).expect("105");
        assert!((job.read - 1.0).abs() < 1e-9, "{job:?}");
    }
}
