//! The workload's CPU profile from a trace's CPU records: per target (the
//! host, the workload's cgroup or process) how many cores it kept busy,
//! how long it waited for a CPU when it could have run, and how long a CPU
//! limit held it back. Memory is a fixed histogram per target.

use serde::Serialize;

use crate::trace::CpuRecord;
use crate::trace::format::TraceHeader;

/// Bins per core of the core-use histogram.
const BINS_PER_CORE: f64 = 32.0;
/// Core use above this lands in the last bin.
const MAX_CORES: f64 = 256.0;
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a small positive constant"
)]
const BINS: usize = (MAX_CORES * BINS_PER_CORE) as usize + 1;

/// What one target's records add up to.
#[derive(Debug, Clone)]
struct Accumulated {
    interval_ns: u64,
    usage_ns: u64,
    wait_ns: Option<u64>,
    throttled_ns: Option<u64>,
    samples: u64,
    /// Samples by cores used (1/32 core bins).
    cores: Vec<u32>,
    max_cores: f64,
}

impl Default for Accumulated {
    fn default() -> Self {
        Accumulated {
            interval_ns: 0,
            usage_ns: 0,
            wait_ns: None,
            throttled_ns: None,
            samples: 0,
            cores: vec![0; BINS],
            max_cores: 0.0,
        }
    }
}

/// The CPU records of a trace, accumulated.
#[derive(Debug, Clone, Default)]
pub struct CpuProfile {
    targets: Vec<String>,
    host_cpus: u32,
    acc: Vec<Accumulated>,
}

/// One target's profile, in cores (1.0: one CPU busy all the time).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuReport {
    pub target: String,
    pub samples: u64,
    pub seconds: f64,
    pub mean_cores: f64,
    pub p50_cores: f64,
    pub p90_cores: f64,
    pub max_cores: f64,
    /// Of the time it could run, the share it waited for a CPU (`None`: the
    /// kernel did not say).
    pub wait_share: Option<f64>,
    /// Of the wall time, the share a CPU limit held it back.
    pub throttled_share: Option<f64>,
    /// For the host: its CPUs, and those left idle in 90 % of the samples.
    pub host_cpus: Option<u32>,
    pub idle_cores_p10: Option<f64>,
}

impl CpuProfile {
    /// An empty profile for the CPU targets of a trace with `header`.
    pub fn for_header(header: &TraceHeader) -> CpuProfile {
        CpuProfile {
            targets: header.cpu_targets.clone(),
            host_cpus: header.host_cpus,
            acc: vec![Accumulated::default(); header.cpu_targets.len()],
        }
    }

    pub fn observe(&mut self, c: &CpuRecord) {
        let Some(a) = self.acc.get_mut(usize::from(c.target)) else {
            return;
        };
        if c.interval_ns == 0 {
            return;
        }
        a.interval_ns = a.interval_ns.saturating_add(c.interval_ns);
        a.usage_ns = a.usage_ns.saturating_add(c.usage_ns);
        if let Some(w) = c.wait_ns {
            a.wait_ns = Some(a.wait_ns.unwrap_or(0).saturating_add(w));
        }
        if let Some(t) = c.throttled_ns {
            a.throttled_ns = Some(a.throttled_ns.unwrap_or(0).saturating_add(t));
        }
        a.samples += 1;
        let cores = ratio(c.usage_ns, c.interval_ns);
        a.max_cores = a.max_cores.max(cores);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to the histogram's range first"
        )]
        let bin = (cores.clamp(0.0, MAX_CORES) * BINS_PER_CORE).round() as usize;
        a.cores[bin.min(BINS - 1)] += 1;
    }

    /// Whether the trace had CPU records at all.
    pub fn is_empty(&self) -> bool {
        self.acc.iter().all(|a| a.samples == 0)
    }

    /// The host's profile, when the trace recorded it.
    pub fn host(&self) -> Option<CpuReport> {
        let i = self.targets.iter().position(|t| t == "host")?;
        self.report_of(i)
    }

    /// Every target's profile, in the trace's order (targets without a
    /// sample are left out).
    pub fn reports(&self) -> Vec<CpuReport> {
        (0..self.targets.len())
            .filter_map(|i| self.report_of(i))
            .collect()
    }

    fn report_of(&self, i: usize) -> Option<CpuReport> {
        let a = self.acc.get(i)?;
        if a.samples == 0 {
            return None;
        }
        let quantile = |q: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a rank among at most u64 samples, rounded up"
            )]
            let rank = ((a.samples as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0u64;
            for (bin, &n) in a.cores.iter().enumerate() {
                seen += u64::from(n);
                if seen >= rank {
                    #[expect(clippy::cast_precision_loss, reason = "a bin index below 8193")]
                    return bin as f64 / BINS_PER_CORE;
                }
            }
            MAX_CORES
        };
        let target = self.targets[i].clone();
        let host = target == "host" && self.host_cpus > 0;
        let p90 = quantile(0.9);
        Some(CpuReport {
            samples: a.samples,
            seconds: ratio(a.interval_ns, 1_000_000_000),
            mean_cores: ratio(a.usage_ns, a.interval_ns),
            p50_cores: quantile(0.5),
            p90_cores: p90,
            max_cores: a.max_cores,
            wait_share: a
                .wait_ns
                .map(|w| ratio(w, a.usage_ns.saturating_add(w).max(1))),
            throttled_share: a.throttled_ns.map(|t| ratio(t, a.interval_ns)),
            host_cpus: host.then_some(self.host_cpus),
            idle_cores_p10: host.then(|| (f64::from(self.host_cpus) - p90).max(0.0)),
            target,
        })
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "nanosecond totals as a ratio: precision is irrelevant"
)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// `host (2 CPUs): 1.2 cores mean, …` lines for a report.
pub fn render(reports: &[CpuReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let name = match r.host_cpus {
            Some(n) => format!("{} ({n} CPUs)", r.target),
            None => r.target.clone(),
        };
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "    {name}: {:.2} cores mean, p50 {:.2}, p90 {:.2}, max {:.2} over {:.0} s",
            r.mean_cores, r.p50_cores, r.p90_cores, r.max_cores, r.seconds
        );
        if let Some(w) = r.wait_share {
            let _ = write!(
                out,
                "; waited for a CPU {:.1}% of its runnable time",
                100.0 * w
            );
        }
        if let Some(t) = r.throttled_share {
            let _ = write!(out, "; held by its CPU limit {:.1}% of the time", 100.0 * t);
        }
        if let Some(idle) = r.idle_cores_p10 {
            let _ = write!(out, "; {idle:.2} cores idle in 90% of the samples");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(targets: &[&str], cpus: u32) -> CpuProfile {
        let mut h = crate::trace::format::tests::header(1);
        h.cpu_targets = targets.iter().map(|s| (*s).to_owned()).collect();
        h.host_cpus = cpus;
        CpuProfile::for_header(&h)
    }

    fn rec(target: u16, usage_ms: u64, wait_ms: Option<u64>) -> CpuRecord {
        CpuRecord {
            ts_ns: 0,
            target,
            interval_ns: 250_000_000,
            usage_ns: usage_ms * 1_000_000,
            wait_ns: wait_ms.map(|w| w * 1_000_000),
            throttled_ns: None,
        }
    }

    #[test]
    fn cores_waits_and_idle_add_up() {
        let mut p = profile(&["host", "cgroup:/w"], 2);
        assert!(p.is_empty());
        // The host: 9 samples at 1 core, one at 2; the workload: half a core
        // that waits as long as it runs.
        for i in 0..10 {
            p.observe(&rec(0, if i == 9 { 500 } else { 250 }, Some(25)));
            p.observe(&rec(1, 125, Some(125)));
        }
        let host = p.host().expect("host");
        assert!((host.mean_cores - 1.1).abs() < 1e-9, "{host:?}");
        assert!((host.p50_cores - 1.0).abs() < 1e-9, "{host:?}");
        assert!((host.p90_cores - 1.0).abs() < 1e-9, "{host:?}");
        assert!((host.max_cores - 2.0).abs() < 1e-9, "{host:?}");
        assert_eq!(host.idle_cores_p10, Some(1.0));
        let w = &p.reports()[1];
        assert!((w.mean_cores - 0.5).abs() < 1e-9, "{w:?}");
        assert_eq!(w.wait_share, Some(0.5));
        assert_eq!(w.host_cpus, None);
        assert!(render(&p.reports()).contains("waited for a CPU 50.0%"));
        // A record naming a target the header lacks is ignored.
        p.observe(&rec(7, 250, None));
        assert_eq!(p.reports().len(), 2);
    }
}
