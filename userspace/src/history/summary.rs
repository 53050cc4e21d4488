//! The JSON summary stored beside each segment: what happened in its window,
//! readable without downloading the segment.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::key::SegmentKey;
use crate::trace::stats::TraceStats;

/// A version bump means a reader must not take fields it does not know for granted.
pub const SUMMARY_VERSION: u32 = 1;

/// Requests and bytes of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpSummary {
    pub requests: u64,
    pub bytes: u64,
}

/// One window's summary. New fields come with `#[serde(default)]` so older
/// summaries still read; richer per-window statistics (the analyzer's) go in
/// `extra` under their own key, filled by a [`SummaryHook`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    pub version: u32,
    pub host: String,
    pub device: String,
    /// The window, wall-clock nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub session: u64,
    pub seq: u64,
    /// Size of the segment object.
    pub segment_bytes: u64,
    pub targets: Vec<String>,
    pub block_events: u64,
    pub fault_events: u64,
    pub fault_writes: u64,
    /// By operation name (`read`, `write`, `discard`, …).
    pub ops: BTreeMap<String, OpSummary>,
    /// Gap records in the window, the events they lost and the time they cover.
    pub gaps: u64,
    pub lost_events: u64,
    pub gap_ns: u64,
    /// Upper bounds of the log2 latency buckets holding the median and p99.
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    /// Further statistics, by producer (e.g. `"analyze": {...}`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Adds statistics to a window's summary from its closed segment file (read
/// it with `TraceReader`); runs on a blocking thread of the uploader, once
/// per segment.
pub type SummaryHook =
    Arc<dyn Fn(&Path) -> serde_json::Map<String, serde_json::Value> + Send + Sync>;

impl WindowSummary {
    /// The summary of the segment `key`, from its statistics.
    pub fn from_stats(key: &SegmentKey, segment_bytes: u64, stats: &TraceStats) -> WindowSummary {
        WindowSummary {
            version: SUMMARY_VERSION,
            host: key.host.clone(),
            device: key.device.clone(),
            start_unix_ns: key.start_unix_ns,
            end_unix_ns: key.end_unix_ns,
            session: key.session,
            seq: key.seq,
            segment_bytes,
            targets: stats.targets.clone(),
            block_events: stats.block_events,
            fault_events: stats.fault_events,
            fault_writes: stats.fault_writes,
            ops: stats
                .ops
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        OpSummary {
                            requests: t.requests,
                            bytes: t.bytes,
                        },
                    )
                })
                .collect(),
            gaps: stats.gaps,
            lost_events: stats.lost_events,
            gap_ns: stats.gap_ns,
            latency_p50_ns: stats.latency_p50_ns,
            latency_p99_ns: stats.latency_p99_ns,
            extra: serde_json::Map::new(),
        }
    }

    /// Requests and bytes of `op` (zero when absent).
    pub fn op(&self, op: crate::trace::Op) -> OpSummary {
        self.ops.get(op.name()).copied().unwrap_or_default()
    }
}
