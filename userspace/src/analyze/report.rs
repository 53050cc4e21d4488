//! The workload's profile, from an analyzer's state: R/W mix, footprint and
//! hot set, dirty-rate percentiles per resolution, intervals, sequentiality,
//! periods, gaps and working sets. `--json` prints the same struct.

use std::fmt::Write as _;

use serde::Serialize;

use super::Analyzer;
use super::cpu::CpuReport;
use super::dirty_rate::Percentiles;
use super::periodicity::Period;
use super::sequential::SequentialSummary;
use super::working_set::WorkingSet;
use crate::units::{human_bytes, human_secs};

/// Read/write mix over the whole volume.
#[derive(Debug, Clone, Serialize)]
pub struct Mix {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Reads over all requests (over all bytes).
    pub read_fraction: f64,
    pub read_bytes_fraction: f64,
    /// Means over the time events were seen (gap time left out).
    pub reads_per_s: f64,
    pub writes_per_s: f64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
    pub flushes: u64,
    pub discards: u64,
    pub faults: u64,
    pub fault_writes: u64,
}

/// One resolution's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub unit_bytes: u64,
    /// Distinct bytes read / written (whole units).
    pub read_unique_bytes: u64,
    pub written_unique_bytes: u64,
    /// Bytes dirtied per second, over known windows.
    pub dirty_rate: Percentiles,
    /// Bytes written for the first time, per second on average.
    pub new_bytes_per_s: f64,
    /// Median inter-access and rewrite intervals (coarse resolutions only; log2 buckets).
    pub access_interval_p50_s: Option<f64>,
    pub rewrite_interval_p50_s: Option<f64>,
}

/// The hot set at one resolution: the fewest extents that carry 80 % of the bytes.
#[derive(Debug, Clone, Serialize)]
pub struct HotSet {
    pub unit_bytes: u64,
    pub extents_touched: u64,
    pub hot_extents: u64,
    pub hot_bytes: u64,
    pub write_hot_extents: u64,
    pub write_hot_bytes: u64,
    /// The hottest extent: its offset, I/O bytes and mean rewrite interval.
    pub hottest_offset: u64,
    pub hottest_bytes: u64,
    pub hottest_rewrite_s: Option<f64>,
}

/// Lost events, as the trace marked them.
#[derive(Debug, Clone, Serialize)]
pub struct GapReport {
    pub gaps: u64,
    pub lost_events: u64,
    pub unknown_s: f64,
    /// Windows of the series left out of rates because a gap touched them.
    pub unknown_windows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub source: String,
    pub device_bytes: u64,
    pub duration_s: f64,
    /// The dirty rate's window.
    pub window_s: f64,
    /// The series' stored window (a multiple of `window_s` on long traces).
    pub series_window_s: f64,
    pub complete: bool,
    pub mix: Mix,
    pub levels: Vec<LevelReport>,
    pub hot_sets: Vec<HotSet>,
    pub sequential: SequentialSummary,
    pub periods: Vec<Period>,
    pub gaps: GapReport,
    pub working_sets: Vec<WorkingSet>,
    /// CPU per profiled target (empty: the trace recorded none).
    pub cpu: Vec<CpuReport>,
    pub other_target_requests: u64,
    pub analyzer_memory_bytes: u64,
}

/// The fewest extents carrying `share` of `bytes` (sorted descending): (count, bytes).
fn cover(mut bytes: Vec<u64>, share: f64) -> (u64, u64) {
    bytes.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = bytes.iter().sum();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "share is a fraction, so the product lies in 0..=total, and `as` saturates (NaN to 0)"
    )]
    let want = (total as f64 * share).ceil() as u64;
    let mut acc = 0;
    for (i, b) in bytes.iter().enumerate() {
        if acc >= want {
            return (i as u64, acc);
        }
        acc += b;
    }
    (bytes.len() as u64, acc)
}

impl Report {
    #[expect(
        clippy::too_many_lines,
        reason = "one figure per field of the report, in the report's order"
    )]
    pub fn of(a: &Analyzer) -> Report {
        let t = &a.totals;
        let duration_ns = t.last_ns.max(1);
        let seen_s = (duration_ns.saturating_sub(t.gap_ns)).max(1) as f64 / 1e9;
        let frac = |x: u64, y: u64| {
            if x + y == 0 {
                0.0
            } else {
                x as f64 / (x + y) as f64
            }
        };
        let mix = Mix {
            reads: t.reads,
            writes: t.writes,
            read_bytes: t.read_bytes,
            write_bytes: t.write_bytes,
            read_fraction: frac(t.reads, t.writes),
            read_bytes_fraction: frac(t.read_bytes, t.write_bytes),
            reads_per_s: t.reads as f64 / seen_s,
            writes_per_s: t.writes as f64 / seen_s,
            read_bytes_per_s: t.read_bytes as f64 / seen_s,
            write_bytes_per_s: t.write_bytes as f64 / seen_s,
            flushes: t.flushes,
            discards: t.discards,
            faults: t.faults,
            fault_writes: t.fault_writes,
        };
        // Full windows only (the last one is cut short), but at least one.
        let series = &a.series;
        let padded = series.full_windows(duration_ns);
        let known = padded.iter().filter(|w| !w.unknown).count().max(1);
        let secs_w = series.window_ns as f64 / 1e9;
        let levels = a
            .levels
            .iter()
            .enumerate()
            .map(|(l, level)| {
                let unit = level.unit();
                let new: f64 = padded
                    .iter()
                    .filter(|w| !w.unknown)
                    .map(|w| f64::from(w.new_units[l]) * unit as f64)
                    .sum();
                let p50 = |h: &super::extent::IntervalHistogram| {
                    h.quantile(0.5).map(|ns| ns as f64 / 1e9)
                };
                LevelReport {
                    unit_bytes: unit,
                    read_unique_bytes: level.read_ever.ones() * unit,
                    written_unique_bytes: level.written_ever.ones() * unit,
                    dirty_rate: series.dirty_rate(l, unit, duration_ns),
                    new_bytes_per_s: new / (known as f64 * secs_w),
                    access_interval_p50_s: p50(&level.access_intervals),
                    rewrite_interval_p50_s: p50(&level.rewrite_intervals),
                }
            })
            .collect();
        let hot_sets = a
            .levels
            .iter()
            .filter_map(|level| {
                let stats = level.stats.as_ref()?;
                let touched: Vec<(usize, &super::extent::ExtentStats)> = stats
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.accesses() > 0)
                    .collect();
                let (hot_extents, hot_bytes) =
                    cover(touched.iter().map(|(_, s)| s.bytes()).collect(), 0.8);
                let (write_hot_extents, write_hot_bytes) = cover(
                    touched
                        .iter()
                        .map(|(_, s)| s.write_bytes)
                        .filter(|&b| b > 0)
                        .collect(),
                    0.8,
                );
                let hottest = touched.iter().max_by_key(|(_, s)| s.bytes());
                Some(HotSet {
                    unit_bytes: level.unit(),
                    extents_touched: touched.len() as u64,
                    hot_extents,
                    hot_bytes: hot_extents * level.unit(),
                    write_hot_extents,
                    write_hot_bytes: write_hot_extents * level.unit(),
                    hottest_offset: hottest.map_or(0, |(i, _)| *i as u64 * level.unit()),
                    hottest_bytes: hottest.map_or(0, |(_, s)| s.bytes()),
                    hottest_rewrite_s: hottest
                        .and_then(|(_, s)| s.mean_rewrite_ns())
                        .map(|ns| ns as f64 / 1e9),
                })
                .filter(|_| hot_bytes > 0 || write_hot_bytes > 0 || !touched.is_empty())
            })
            .collect();
        let unknown_windows = padded.iter().filter(|w| w.unknown).count() as u64;
        Report {
            target: a.name.clone(),
            source: a.source.clone(),
            device_bytes: a.cfg.device_bytes,
            duration_s: duration_ns as f64 / 1e9,
            window_s: series.base_ns as f64 / 1e9,
            series_window_s: secs_w,
            complete: t.complete,
            mix,
            levels,
            hot_sets,
            sequential: a.sequential.summary(),
            periods: a.activity.periods(),
            gaps: GapReport {
                gaps: t.gaps,
                lost_events: t.lost_events,
                unknown_s: t.gap_ns as f64 / 1e9,
                unknown_windows,
            },
            working_sets: a.working_sets.summary(),
            cpu: a.cpu.reports(),
            other_target_requests: t.other_targets,
            analyzer_memory_bytes: a.memory_bytes() as u64,
        }
    }

    /// The profile for people, several lines.
    #[expect(
        clippy::too_many_lines,
        reason = "one paragraph per section, in the order the report reads"
    )]
    pub fn render(&self) -> String {
        let mut o = String::new();
        let rate = |b: f64| format!("{}/s", human_bytes(b));
        let _ = writeln!(
            o,
            "workload profile of {} ({}), {} traced, device {}",
            self.target,
            self.source,
            human_secs(self.duration_s),
            if self.device_bytes > 0 {
                human_bytes(self.device_bytes as f64)
            } else {
                "of unknown size".into()
            }
        );
        let m = &self.mix;
        let _ = writeln!(
            o,
            "  mix: {:.0} % of requests are reads ({:.0} % of bytes); reads {:.1}/s {}, writes {:.1}/s {}; {} flushes, {} discards",
            m.read_fraction * 100.0,
            m.read_bytes_fraction * 100.0,
            m.reads_per_s,
            rate(m.read_bytes_per_s),
            m.writes_per_s,
            rate(m.write_bytes_per_s),
            m.flushes,
            m.discards
        );
        if let Some(l) = self.levels.first() {
            let _ = writeln!(
                o,
                "  footprint (at {}): {} read, {} written",
                human_bytes(l.unit_bytes as f64),
                human_bytes(l.read_unique_bytes as f64),
                human_bytes(l.written_unique_bytes as f64)
            );
        }
        for h in &self.hot_sets {
            let _ = writeln!(
                o,
                "  hot set at {}: 80 % of I/O bytes in {} of {} extents touched ({}); 80 % of written bytes in {} ({}); hottest at {} ({}{})",
                human_bytes(h.unit_bytes as f64),
                h.hot_extents,
                h.extents_touched,
                human_bytes(h.hot_bytes as f64),
                h.write_hot_extents,
                human_bytes(h.write_hot_bytes as f64),
                human_bytes(h.hottest_offset as f64),
                human_bytes(h.hottest_bytes as f64),
                h.hottest_rewrite_s
                    .map(|s| format!(", rewritten every {}", human_secs(s)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            o,
            "  dirty rate (unique bytes dirtied per {} window)    p50        p90        p99        max   first-write mean",
            human_secs(self.window_s)
        );
        for l in &self.levels {
            let d = &l.dirty_rate;
            let _ = writeln!(
                o,
                "    unit {:>8}  {:>32} {:>10} {:>10} {:>10} {:>10}",
                human_bytes(l.unit_bytes as f64),
                rate(d.p50),
                rate(d.p90),
                rate(d.p99),
                rate(d.max),
                rate(l.new_bytes_per_s)
            );
        }
        for l in self
            .levels
            .iter()
            .filter(|l| l.rewrite_interval_p50_s.is_some())
        {
            let _ = writeln!(
                o,
                "  intervals at {}: inter-access p50 {}, rewrite p50 {}",
                human_bytes(l.unit_bytes as f64),
                l.access_interval_p50_s.map_or("-".into(), human_secs),
                l.rewrite_interval_p50_s.map_or("-".into(), human_secs)
            );
        }
        let s = &self.sequential;
        let _ = writeln!(
            o,
            "  sequential: {:.0} % of read bytes, {:.0} % of written bytes; {} runs ({} of 1 MiB or more), longest {}, median {}",
            s.read_fraction * 100.0,
            s.write_fraction * 100.0,
            s.runs,
            s.runs_over_1mib,
            human_bytes(s.longest_run_bytes as f64),
            human_bytes(s.median_run_bytes as f64)
        );
        if self.periods.is_empty() {
            let _ = writeln!(o, "  periods: none found");
        } else {
            let list: Vec<String> = self
                .periods
                .iter()
                .map(|p| {
                    format!(
                        "{} (strength {:.2}, {:.0} repetitions)",
                        human_secs(p.seconds),
                        p.strength,
                        p.repetitions
                    )
                })
                .collect();
            let _ = writeln!(o, "  periods: {}", list.join("; "));
        }
        let g = &self.gaps;
        if g.gaps == 0 {
            let _ = writeln!(o, "  gaps: none, every event was seen");
        } else {
            let _ = writeln!(
                o,
                "  GAPS: {} windows, {} events lost over {} ({:.1} % of the trace): those {} windows are unknown and left out of rates and periods; unique and dirty bytes are lower bounds",
                g.gaps,
                g.lost_events,
                human_secs(g.unknown_s),
                100.0 * g.unknown_s / self.duration_s.max(1e-9),
                g.unknown_windows
            );
        }
        for w in &self.working_sets {
            let _ = writeln!(
                o,
                "  working set of pid {} {}: {} faults ({} writes), footprint {}, per {} window p50 {} max {}{}",
                w.pid,
                w.comm,
                w.faults,
                w.write_faults,
                human_bytes(w.footprint_bytes as f64),
                human_secs(w.window_s),
                human_bytes(w.window_bytes.p50),
                human_bytes(w.window_bytes.max),
                if w.saturated {
                    " (page cap reached: lower bounds)"
                } else {
                    ""
                }
            );
        }
        if self.cpu.is_empty() {
            let _ = writeln!(o, "  cpu: not recorded (trace with --cpu)");
        } else {
            let _ = writeln!(o, "  cpu:");
            o.push_str(&super::cpu::render(&self.cpu));
        }
        if self.other_target_requests > 0 {
            let _ = writeln!(
                o,
                "  {} requests to other targets left out (choose with --target)",
                self.other_target_requests
            );
        }
        if !self.complete {
            let _ = writeln!(
                o,
                "  WARNING: no end record: the tracer did not stop cleanly; the tail may be missing"
            );
        }
        let _ = writeln!(
            o,
            "  analyzer memory: {}",
            human_bytes(self.analyzer_memory_bytes as f64)
        );
        o
    }
}
