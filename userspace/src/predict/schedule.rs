//! When a model that learns from its own past windows opens one, and which
//! of its open windows have ended: one rule for the `learned` table and the
//! chooser. A window opens every quarter horizon (the first half an interval
//! after the first access, so a history barely longer than the horizon
//! still has one ended window), the interval doubling every 64 windows up to
//! one horizon (a long history stays cheap to replay); after a long quiet
//! time one window opens at once rather than one per missed interval.

/// Windows opened before the interval doubles.
const PER_DOUBLING: u64 = 64;

/// The opening times of a model's windows.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    horizon_ns: u64,
    interval: u64,
    next: Option<u64>,
    opened: u64,
}

impl Schedule {
    /// Windows of `horizon_ns`, a quarter horizon apart at first.
    pub(crate) fn quarter(horizon_ns: u64) -> Schedule {
        Schedule {
            horizon_ns,
            interval: horizon_ns / 4,
            next: None,
            opened: 0,
        }
    }

    /// The horizon changed: windows are that long from now on.
    pub(crate) fn set_horizon(&mut self, horizon_ns: u64) {
        self.horizon_ns = horizon_ns;
    }

    /// The next window due by `t` (an access's time), if one is: call until
    /// `None`, opening a window at each time returned.
    pub(crate) fn due(&mut self, t: u64) -> Option<u64> {
        let next = *self
            .next
            .get_or_insert_with(|| t.saturating_add(self.interval.max(2) / 2));
        if t < next {
            return None;
        }
        let at = if t - next > self.interval.saturating_mul(4) {
            t
        } else {
            next
        };
        self.opened += 1;
        if self.opened.is_multiple_of(PER_DOUBLING) && self.interval < self.horizon_ns {
            self.interval = self.interval.saturating_mul(2);
        }
        self.next = Some(at.saturating_add(self.interval.max(1)));
        Some(at)
    }
}

/// Whether `t` falls in the window opened at `at`.
pub(crate) fn within(at: u64, t: u64, horizon_ns: u64) -> bool {
    t >= at && t < at.saturating_add(horizon_ns)
}

/// Takes out of `open` the windows that have ended by `now` (`at` gives a
/// window's opening time).
pub(crate) fn ended<P>(
    open: &mut Vec<P>,
    now: u64,
    horizon_ns: u64,
    at: impl Fn(&P) -> u64,
) -> Vec<P> {
    let (done, still): (Vec<P>, Vec<P>) = std::mem::take(open)
        .into_iter()
        .partition(|p| at(p).saturating_add(horizon_ns) <= now);
    *open = still;
    done
}

/// Drops the windows a gap `[start_ns, end_ns)` overlaps: what happened in
/// them is not known.
pub(crate) fn drop_gapped<P>(
    open: &mut Vec<P>,
    (start_ns, end_ns): (u64, u64),
    horizon_ns: u64,
    at: impl Fn(&P) -> u64,
) {
    open.retain(|p| {
        !(start_ns < at(p).saturating_add(horizon_ns) && at(p) < end_ns.max(start_ns + 1))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_a_quarter_horizon_apart_after_half_an_interval_and_once_after_a_quiet_time() {
        let mut s = Schedule::quarter(400);
        assert_eq!(s.due(1000), None); // the first access: the first window at 1050
        assert_eq!(s.due(1049), None);
        assert_eq!(s.due(1060), Some(1050));
        assert_eq!(s.due(1060), None);
        assert_eq!(s.due(1200), Some(1150));
        assert_eq!(s.due(1200), None);
        // Quiet until 5000: one window at 5000, not one per 100.
        assert_eq!(s.due(5000), Some(5000));
        assert_eq!(s.due(5000), None);
    }

    #[test]
    fn the_interval_doubles_every_64_windows_up_to_a_horizon() {
        let mut s = Schedule::quarter(400);
        let mut t = 0;
        let mut opened = Vec::new();
        while opened.len() < 64 * 4 {
            t += 1;
            while let Some(at) = s.due(t) {
                opened.push(at);
            }
        }
        let gaps: Vec<u64> = opened.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[10], 100);
        assert_eq!(gaps[70], 200);
        assert_eq!(gaps[140], 400);
        assert_eq!(gaps[250], 400);
    }

    #[test]
    fn ended_and_gapped_windows_leave_the_open_ones() {
        let mut open = vec![0u64, 100, 200];
        assert_eq!(ended(&mut open, 450, 300, |&a| a), vec![0, 100]);
        assert_eq!(open, vec![200]);
        open.push(600);
        drop_gapped(&mut open, (450, 460), 300, |&a| a);
        assert_eq!(open, vec![600]);
        assert!(within(600, 899, 300) && !within(600, 900, 300));
    }
}
