//! Summary figures of a trace, for `tern trace stat` and the end of a session.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Serialize;

use super::format::{TraceFileError, TraceHeader, TraceReader};
use super::record::{EndRecord, Op, Record};

/// Per-operation totals.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct OpTotals {
    pub requests: u64,
    pub bytes: u64,
}

/// What a trace holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceStats {
    pub source: String,
    pub kernel_release: String,
    pub targets: Vec<String>,
    pub duration_ns: u64,
    pub block_events: u64,
    pub fault_events: u64,
    pub fault_writes: u64,
    pub ops: BTreeMap<String, OpTotals>,
    pub gaps: u64,
    pub lost_events: u64,
    /// Nanoseconds covered by gaps: no claim can be made about them.
    pub gap_ns: u64,
    pub processes: BTreeMap<u32, String>,
    /// Whose CPU the trace profiles, and its CPU samples.
    pub cpu_targets: Vec<String>,
    pub cpu_samples: u64,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    /// The trace has its end record (the tracer stopped cleanly).
    pub complete: bool,
    /// Where the file ends inside a chunk, if it does (its records before
    /// that byte were read).
    pub cut_at: Option<u64>,
    pub end: Option<EndSummary>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EndSummary {
    pub outside_image: u64,
}

/// Log2 latency histogram: memory stays constant whatever the trace length.
struct LatencyHistogram([u64; 64]);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram([0; 64])
    }
}

impl LatencyHistogram {
    fn add(&mut self, ns: u64) {
        self.0[63 - ns.max(1).leading_zeros() as usize] += 1;
    }
    /// Upper bound of the bucket holding quantile `q`.
    fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return 0;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a rank: q is a fraction, so the product lies in 0..=total, and `as` saturates (NaN to 0)"
        )]
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= want {
                return 1u64 << (i + 1).min(63);
            }
        }
        u64::MAX
    }
}

impl TraceStats {
    pub fn from_reader<R: Read>(mut reader: TraceReader<R>) -> Result<TraceStats, TraceFileError> {
        let header: TraceHeader = reader.header().clone();
        let mut s = TraceStats {
            source: header.source.clone(),
            kernel_release: header.kernel_release.clone(),
            targets: header.targets.iter().map(|t| t.name.clone()).collect(),
            cpu_targets: header.cpu_targets.clone(),
            ..TraceStats::default()
        };
        let mut hist = LatencyHistogram::default();
        let mut last_ts = 0;
        while let Some(r) = reader.next_record()? {
            last_ts = last_ts.max(r.ts_ns());
            match r {
                Record::Block(b) => {
                    s.block_events += 1;
                    let t = s.ops.entry(b.op.name().to_string()).or_default();
                    t.requests += 1;
                    t.bytes += u64::from(b.len);
                    if b.latency_ns > 0 {
                        hist.add(b.latency_ns);
                    }
                }
                Record::Fault(f) => {
                    s.fault_events += 1;
                    s.fault_writes += u64::from(f.is_write());
                }
                Record::Gap(g) => {
                    s.gaps += 1;
                    s.lost_events += g.lost_block + g.lost_fault;
                    s.gap_ns += g.end_ns - g.start_ns;
                    last_ts = last_ts.max(g.end_ns);
                }
                Record::Process(p) => {
                    if s.processes.len() < 10_000 {
                        s.processes.insert(p.pid, p.comm);
                    }
                }
                Record::Cpu(_) => s.cpu_samples += 1,
                Record::End(EndRecord { outside_image, .. }) => {
                    s.complete = true;
                    s.end = Some(EndSummary { outside_image });
                }
            }
        }
        s.duration_ns = last_ts;
        s.cut_at = reader.cut_at();
        s.latency_p50_ns = hist.quantile(0.5);
        s.latency_p99_ns = hist.quantile(0.99);
        Ok(s)
    }

    pub fn op(&self, op: Op) -> OpTotals {
        self.ops.get(op.name()).copied().unwrap_or_default()
    }

    /// The processes' names, each once, in the order of their lowest pid, with
    /// how many pids bore it when more than one did (a backup's `dd` runs
    /// hundreds of times: one name, not hundreds).
    fn process_names(&self) -> String {
        let mut names: Vec<(&str, usize)> = Vec::new();
        for name in self.processes.values() {
            match names.iter_mut().find(|(n, _)| *n == name.as_str()) {
                Some((_, count)) => *count += 1,
                None => names.push((name, 1)),
            }
        }
        names
            .iter()
            .map(|&(name, count)| {
                if count > 1 {
                    format!("{name} ({count} pids)")
                } else {
                    name.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A human summary, several lines.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let secs = self.duration_ns as f64 / 1e9;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace of {} ({}, kernel {})",
            self.targets.join(", "),
            self.source,
            self.kernel_release
        );
        let _ = writeln!(
            out,
            "  duration {:.2} s, {} block requests, {} page faults ({} writes)",
            secs, self.block_events, self.fault_events, self.fault_writes
        );
        for (name, t) in &self.ops {
            let _ = writeln!(
                out,
                "  {:<13} {:>10} requests {:>12} {:>14}",
                name,
                t.requests,
                crate::units::human_bytes(t.bytes as f64),
                crate::units::human_rate(if secs > 0.0 {
                    t.bytes as f64 / secs
                } else {
                    0.0
                })
            );
        }
        if self.latency_p50_ns > 0 {
            let _ = writeln!(
                out,
                "  latency p50 <= {:.1} us, p99 <= {:.1} us",
                self.latency_p50_ns as f64 / 1e3,
                self.latency_p99_ns as f64 / 1e3
            );
        }
        let _ = writeln!(out, "  processes: {}", self.process_names());
        if self.gaps > 0 {
            let _ = writeln!(
                out,
                "  GAPS: {} windows, {} events lost over {:.3} s: treat those windows as all-dirty",
                self.gaps,
                self.lost_events,
                self.gap_ns as f64 / 1e9
            );
        } else {
            let _ = writeln!(out, "  no events lost");
        }
        if let Some(end) = self.end
            && end.outside_image > 0
        {
            let _ = writeln!(
                out,
                "  {} device requests fell outside the image (file-system metadata, other files)",
                end.outside_image
            );
        }
        if let Some(at) = self.cut_at {
            let _ = writeln!(
                out,
                "  WARNING: the file is cut at byte {at}, inside a chunk: every record before that chunk was read, the chunk's are lost"
            );
        } else if !self.complete {
            let _ = writeln!(
                out,
                "  WARNING: no end record: the tracer did not stop cleanly; the tail may be missing"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_name_is_listed_once_with_its_pid_count() {
        let stats = TraceStats {
            processes: [(30, "dd"), (7, "tar"), (31, "dd"), (12, "dd"), (40, "sync")]
                .into_iter()
                .map(|(pid, name)| (pid, name.to_owned()))
                .collect(),
            ..TraceStats::default()
        };
        assert_eq!(stats.process_names(), "tar, dd (3 pids), sync");
        assert!(
            stats
                .render()
                .contains("  processes: tar, dd (3 pids), sync\n")
        );
    }
}
