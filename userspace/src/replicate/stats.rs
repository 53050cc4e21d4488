//! The engine's counters (shared with whoever shows progress) and what one
//! round did.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct Stats {
    /// Uncompressed bytes acknowledged or in flight (zero extents included).
    pub sent_bytes: AtomicU64,
    /// Payload bytes on the wire.
    pub wire_bytes: AtomicU64,
    pub extents: AtomicU64,
    /// Zero extents not sent because the destination was known blank there.
    pub skipped_zero_bytes: AtomicU64,
    /// Bytes marked again after a lost connection (they may have to go twice).
    pub resent_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    pub rounds: AtomicU64,
    /// Bytes still dirty at the start of the current round, and done of them.
    pub round_bytes: AtomicU64,
    pub round_done: AtomicU64,
    /// Source bytes hashed for checksum trees.
    pub hashed_bytes: AtomicU64,
    /// Dirty bytes an order held back from the round that took them.
    pub held_back_bytes: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    pub extents: u64,
    pub skipped_zero_bytes: u64,
    pub resent_bytes: u64,
    pub reconnects: u64,
    pub rounds: u64,
    pub round_bytes: u64,
    pub round_done: u64,
    pub hashed_bytes: u64,
    pub held_back_bytes: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            sent_bytes: l(&self.sent_bytes),
            wire_bytes: l(&self.wire_bytes),
            extents: l(&self.extents),
            skipped_zero_bytes: l(&self.skipped_zero_bytes),
            resent_bytes: l(&self.resent_bytes),
            reconnects: l(&self.reconnects),
            rounds: l(&self.rounds),
            round_bytes: l(&self.round_bytes),
            round_done: l(&self.round_done),
            hashed_bytes: l(&self.hashed_bytes),
            held_back_bytes: l(&self.held_back_bytes),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Round {
    /// Uncompressed bytes sent (zero extents included).
    pub bytes: u64,
    pub wire_bytes: u64,
    pub seconds: f64,
}

impl Round {
    /// What was sent since `before` (a snapshot taken when the round began,
    /// at `started`), as of `after`.
    pub fn since(before: &StatsSnapshot, after: &StatsSnapshot, started: Instant) -> Round {
        Round {
            bytes: after.sent_bytes - before.sent_bytes,
            wire_bytes: after.wire_bytes - before.wire_bytes,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// Uncompressed bytes per second this round moved (what the downtime estimate uses).
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds
        } else {
            0.0
        }
    }
}
