//! The source agent's `GET /metrics`: the engine's counters and where the
//! replication stands (phase, epoch, what is still dirty, the link and dirty
//! rates, the copy's age), read from the same cells `tern status` shows.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::cutover::StatusCell;
use crate::metrics::Render;
use crate::replicate::Stats;

/// What the source agent exposes.
pub struct SourceMetrics {
    pub status: StatusCell,
    pub stats: Arc<Stats>,
}

fn metric(out: &mut String, kind: &str, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

impl Render for SourceMetrics {
    fn render(&self, out: &mut String) {
        self.counters(out);
        self.state(out);
    }
}

impl SourceMetrics {
    /// The engine's counters.
    fn counters(&self, out: &mut String) {
        let s = self.stats.snapshot();
        for (name, help, value) in [
            (
                "tern_source_sent_bytes_total",
                "Uncompressed bytes sent or in flight (zero extents included).",
                s.sent_bytes,
            ),
            (
                "tern_source_wire_bytes_total",
                "Payload bytes on the wire (after compression).",
                s.wire_bytes,
            ),
            ("tern_source_extents_total", "Extents sent.", s.extents),
            (
                "tern_source_skipped_zero_bytes_total",
                "Zero bytes not sent: the destination was known blank there.",
                s.skipped_zero_bytes,
            ),
            (
                "tern_source_resent_bytes_total",
                "Bytes marked again after a lost connection.",
                s.resent_bytes,
            ),
            (
                "tern_source_reconnects_total",
                "Reconnections to the destination.",
                s.reconnects,
            ),
            (
                "tern_source_rounds_total",
                "Replication rounds begun.",
                s.rounds,
            ),
            (
                "tern_source_hashed_bytes_total",
                "Source bytes hashed for checksum trees.",
                s.hashed_bytes,
            ),
        ] {
            metric(out, "counter", name, help, value);
        }
    }

    /// Where the replication stands, as `tern status` shows it.
    fn state(&self, out: &mut String) {
        let st = self.status.lock().expect("status lock poisoned").clone();
        let _ = writeln!(
            out,
            "# HELP tern_source_phase Where the replication stands (1 for the current phase)."
        );
        let _ = writeln!(out, "# TYPE tern_source_phase gauge");
        let phase = if st.phase.is_empty() {
            "starting"
        } else {
            st.phase
        };
        let _ = writeln!(
            out,
            "tern_source_phase{{phase=\"{}\"}} 1",
            phase.replace('\\', "\\\\").replace('"', "\\\"")
        );
        for (name, help, value) in [
            (
                "tern_source_epoch",
                "The destination's epoch this source writes under.",
                st.epoch as f64,
            ),
            (
                "tern_source_remaining_bytes",
                "Dirty bytes not yet at the destination, at the last look.",
                st.remaining_bytes as f64,
            ),
            (
                "tern_source_link_bytes_per_second",
                "Measured link rate (uncompressed bytes per second).",
                st.bandwidth_bps,
            ),
            (
                "tern_source_dirty_bytes_per_second",
                "The workload's dirty rate (newly dirtied bytes per second).",
                st.dirty_rate_bps,
            ),
            (
                "tern_source_estimated_downtime_seconds",
                "The pause a switch now would take, estimated.",
                st.estimated_downtime_ms as f64 / 1e3,
            ),
            (
                "tern_source_rpo_seconds",
                "Age of the destination's copy: time since the last round finished.",
                st.rpo_ms as f64 / 1e3,
            ),
            (
                "tern_source_throttle_bytes_per_second",
                "The write limit on the workload now (0: none).",
                st.throttle_bps as f64,
            ),
            (
                "tern_source_throttle_cores",
                "The CPU quota on the workload now, in cores (0: none).",
                st.throttle_cores,
            ),
            (
                "tern_source_postcopy_missing_bytes",
                "Post-copy: bytes the destination still lacks.",
                st.missing_bytes as f64,
            ),
        ] {
            metric(out, "gauge", name, help, value);
        }
        metric(
            out,
            "counter",
            "tern_source_postcopy_demands_total",
            "Post-copy: the destination's demands for units it lacked.",
            st.demands,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cutover::Status;

    #[test]
    fn the_page_shows_the_counters_and_where_the_replication_stands() {
        let engine = Arc::new(Stats::default());
        engine.sent_bytes.store(4096, Ordering::Relaxed);
        engine.rounds.store(3, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(Status {
            phase: "standby: \"streaming\"",
            epoch: 7,
            remaining_bytes: 65536,
            rpo_ms: 1500,
            ..Status::default()
        }));
        let mut out = String::new();
        SourceMetrics {
            status,
            stats: engine,
        }
        .render(&mut out);
        for line in [
            "tern_source_sent_bytes_total 4096\n",
            "tern_source_rounds_total 3\n",
            "tern_source_phase{phase=\"standby: \\\"streaming\\\"\"} 1\n",
            "tern_source_epoch 7\n",
            "tern_source_remaining_bytes 65536\n",
            "tern_source_rpo_seconds 1.5\n",
            "# TYPE tern_source_rpo_seconds gauge\n",
            "tern_source_postcopy_demands_total 0\n",
        ] {
            assert!(out.contains(line), "{line:?} in:\n{out}");
        }
    }
}
