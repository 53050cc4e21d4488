//! Periods found in the data, not assumed: the activity (requests and faults
//! per bin) is kept as a bounded series, and its autocorrelation is searched
//! for peaks. Bins a gap touched are left out of every product, so lost
//! events are neither activity nor idleness. A period needs at least three
//! repetitions in the trace; of peaks of similar strength the shortest lag
//! wins (its multiples correlate too).

use serde::Serialize;

use super::dirty_rate::window_index;

/// The finest bin; the series doubles its bin when full.
pub const FIRST_BIN_NS: u64 = 10_000_000;
/// Bins kept while recording, and at most analysed (merged down to this).
const MAX_BINS: usize = 8192;
const ANALYSED_BINS: usize = 4096;
/// An autocorrelation below this is not a period.
const MIN_STRENGTH: f64 = 0.3;

/// A detected period.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Period {
    pub seconds: f64,
    /// Autocorrelation at that lag, 0..1.
    pub strength: f64,
    /// How many times it repeats in the trace.
    pub repetitions: f64,
}

#[derive(Debug)]
pub struct Activity {
    pub bin_ns: u64,
    counts: Vec<f32>,
    unknown: Vec<bool>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            bin_ns: FIRST_BIN_NS,
            counts: Vec::new(),
            unknown: Vec::new(),
        }
    }
}

impl Activity {
    pub fn bytes(&self) -> usize {
        self.counts.capacity() * 4 + self.unknown.capacity()
    }

    fn index(&mut self, ts: u64) -> usize {
        let mut i = window_index(ts, self.bin_ns);
        while i >= MAX_BINS {
            self.counts = merge_pairs(&self.counts);
            self.unknown = self
                .unknown
                .chunks(2)
                .map(|p| p.iter().any(|&u| u))
                .collect();
            self.bin_ns *= 2;
            i = window_index(ts, self.bin_ns);
        }
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0.0);
            self.unknown.resize(i + 1, false);
        }
        i
    }

    #[inline]
    pub fn event(&mut self, ts: u64) {
        let i = self.index(ts);
        self.counts[i] += 1.0;
    }

    pub fn mark_unknown(&mut self, start: u64, end: u64) {
        let b = self.index(end);
        let a = window_index(start, self.bin_ns);
        for u in &mut self.unknown[a..=b] {
            *u = true;
        }
    }

    /// Periods, strongest first (at most three, none a multiple of a stronger one).
    pub fn periods(&self) -> Vec<Period> {
        periods_of(self.counts.clone(), self.unknown.clone(), self.bin_ns)
    }
}

/// The periods of an activity series (events per bin of `bin_ns`; bins a
/// gap touched are `unknown`), strongest first: at most three, none a
/// multiple of a stronger one. The one period finder: the analyzer's report
/// and the predictor's periodic model both ask it.
pub fn periods_of(mut x: Vec<f32>, mut unknown: Vec<bool>, mut bin: u64) -> Vec<Period> {
    while x.len() > ANALYSED_BINS {
        x = merge_pairs(&x);
        unknown = unknown.chunks(2).map(|p| p.iter().any(|&u| u)).collect();
        bin *= 2;
    }
    // A [1, 2, 1] smoothing: a period that is not a whole number of bins
    // splits its bursts over two neighbouring bins; smoothing joins them.
    let smooth: Vec<f32> = (0..x.len())
        .map(|i| {
            let at = |j: usize| x.get(j).copied().unwrap_or(x[i]);
            (at(i.wrapping_sub(1)) + 2.0 * x[i] + at(i + 1)) / 4.0
        })
        .collect();
    detect(&smooth, &unknown, bin)
}

fn merge_pairs(v: &[f32]) -> Vec<f32> {
    v.chunks(2).map(|p| p.iter().sum()).collect()
}

/// Autocorrelation of `x` at lags `0..max_lag`, over pairs of known bins.
fn autocorrelation(x: &[f32], unknown: &[bool], max_lag: usize) -> Vec<f64> {
    let known: Vec<f64> = x
        .iter()
        .zip(unknown)
        .filter(|(_, u)| !**u)
        .map(|(v, _)| f64::from(*v))
        .collect();
    if known.len() < 2 {
        return Vec::new();
    }
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    let var = known.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / known.len() as f64;
    if var <= 0.0 {
        return Vec::new();
    }
    let d: Vec<f64> = x
        .iter()
        .zip(unknown)
        .map(|(v, u)| if *u { f64::NAN } else { f64::from(*v) - mean })
        .collect();
    (0..max_lag)
        .map(|lag| {
            let (mut sum, mut n) = (0.0, 0u32);
            for i in 0..d.len() - lag {
                let p = d[i] * d[i + lag];
                if !p.is_nan() {
                    sum += p;
                    n += 1;
                }
            }
            if n == 0 {
                0.0
            } else {
                sum / f64::from(n) / var
            }
        })
        .collect()
}

/// Peaks of the autocorrelation, as periods.
pub fn detect(x: &[f32], unknown: &[bool], bin_ns: u64) -> Vec<Period> {
    let n = x.len();
    let max_lag = n / 3 + 2;
    let acf = autocorrelation(x, unknown, max_lag.min(n));
    if acf.len() < 4 {
        return Vec::new();
    }
    // Local maxima above the floor, past the first descent (lag 1 is always high
    // for bursty data): start after the ACF first drops below half its floor.
    let start = acf
        .iter()
        .position(|&r| r < MIN_STRENGTH / 2.0)
        .unwrap_or(acf.len());
    let mut peaks: Vec<(usize, f64)> = (start.max(2)..acf.len() - 1)
        .filter(|&l| acf[l] >= MIN_STRENGTH && acf[l] >= acf[l - 1] && acf[l] > acf[l + 1])
        .map(|l| (l, acf[l]))
        .collect();
    peaks.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out: Vec<Period> = Vec::new();
    let mut taken: Vec<f64> = Vec::new();
    for &(lag, r) in &peaks {
        // Prefer the shortest lag among peaks nearly as strong: multiples of a period correlate too.
        let lag = peaks
            .iter()
            .filter(|(l, s)| *s >= 0.6 * r && *l <= lag && is_multiple(lag as f64, *l as f64))
            .map(|(l, _)| *l)
            .min()
            .unwrap_or(lag);
        let refined = refine(&acf, lag);
        if taken.iter().any(|&t| is_multiple(refined, t)) {
            continue;
        }
        taken.push(refined);
        let seconds = refined * bin_ns as f64 / 1e9;
        out.push(Period {
            seconds,
            strength: acf[lag],
            repetitions: n as f64 / refined,
        });
        if out.len() == 3 {
            break;
        }
    }
    out
}

/// Is `a` close to an integer multiple (≥ 1) of `b`?
fn is_multiple(a: f64, b: f64) -> bool {
    if b <= 0.0 {
        return false;
    }
    let k = (a / b).round();
    k >= 1.0 && (a - k * b).abs() <= 0.06 * a.max(2.0)
}

/// The peak's lag to a fraction of a bin, by a parabola through its neighbours.
fn refine(acf: &[f64], lag: usize) -> f64 {
    let (a, b, c) = (acf[lag - 1], acf[lag], acf[lag + 1]);
    let den = a - 2.0 * b + c;
    if den.abs() < 1e-12 {
        return lag as f64;
    }
    lag as f64 + (0.5 * (a - c) / den).clamp(-0.5, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_every_7_bins_has_period_7() {
        let x: Vec<f32> = (0..600)
            .map(|i| if i % 7 == 0 { 50.0 } else { 1.0 })
            .collect();
        let unknown = vec![false; x.len()];
        let p = detect(&x, &unknown, 1_000_000_000);
        assert!(!p.is_empty());
        assert!((p[0].seconds - 7.0).abs() < 0.2, "{p:?}");
        assert!(p[0].strength > 0.9);
    }

    #[test]
    fn noise_and_constant_load_have_no_period() {
        let mut s = 1u64;
        let x: Vec<f32> = (0..2000)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 40) as f32
            })
            .collect();
        assert!(detect(&x, &vec![false; 2000], 1).is_empty());
        assert!(detect(&[5.0; 100], &[false; 100], 1).is_empty());
    }

    #[test]
    fn unknown_bins_do_not_read_as_idleness() {
        // A burst every 10 bins; a long stretch lost to a gap, filled with zeros.
        let mut x: Vec<f32> = (0..1000)
            .map(|i| if i % 10 == 0 { 40.0 } else { 0.0 })
            .collect();
        let mut unknown = vec![false; 1000];
        for i in 300..700 {
            x[i] = 0.0;
            unknown[i] = true;
        }
        let p = detect(&x, &unknown, 1_000_000_000);
        assert!((p[0].seconds - 10.0).abs() < 0.2, "{p:?}");
    }
}
