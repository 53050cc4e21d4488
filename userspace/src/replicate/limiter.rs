//! The wire's rate limit (`--max-rate`).

use std::time::{Duration, Instant};

/// Paces the wire to `rate` bytes per second.
pub(super) struct Limiter {
    rate: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Limiter {
    pub(super) async fn take(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if let Some(wait) = due.checked_sub(elapsed) {
            tokio::time::sleep(wait).await;
        }
        // Keep the window short so a pause does not turn into a burst later.
        if elapsed > Duration::from_secs(2) {
            self.started = Instant::now();
            self.bytes = 0;
        }
    }
}

impl Limiter {
    /// A limiter of `rate` bytes per second; `None` (or 0) for none.
    pub(super) fn new(rate: Option<u64>) -> Limiter {
        Limiter {
            rate,
            started: Instant::now(),
            bytes: 0,
        }
    }
}
