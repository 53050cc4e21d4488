//! Compression where it pays. zstd trades CPU for wire bytes: on a slow link
//! it multiplies the data rate, on loopback or a fast link with busy cores
//! it is what holds the copy back. Neither can be told from the outside
//! (a link's speed, both hosts' spare CPU and the data's ratio all change
//! during a copy), so the sender measures: each choice runs for a window of
//! plain bytes, the one that delivered more plain bytes per second is kept,
//! and the other is tried again now and then (less often each time it loses).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// When zstd is tried on the data sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CompressWhen {
    /// Whichever of compressed and raw moves the data faster, measured
    /// while sending. The default: on a fast link or busy cores it sends
    /// raw (a 2 GiB file system over loopback: 3.4 s against 4.9 s), and on
    /// a slow link its trials of raw cost less than that (6.5 s against
    /// 5.9 s at 1 Gbit/s; docs/perf.md).
    #[default]
    Auto,
    /// Every extent (extents that do not shrink still go raw).
    Always,
}

/// Plain bytes one choice sends before its rate is taken.
const WINDOW_BYTES: u64 = 64 << 20;
/// A window shorter than this is extended: a rate over a few milliseconds
/// measures the pipeline's buffers, not the link or the CPU.
const MIN_WINDOW: Duration = Duration::from_millis(200);
/// Windows of the chosen mode before the other is tried again, at first;
/// doubled each time the other loses again, up to [`MAX_EXPLORE_EVERY`].
const EXPLORE_EVERY: u32 = 8;
const MAX_EXPLORE_EVERY: u32 = 64;
/// The other choice must be this much faster to take over (noise margin).
const MARGIN: f64 = 1.10;

/// The choice the reader reads before encoding each run.
#[derive(Debug)]
pub(super) struct Choice {
    level: Option<i32>,
    on: AtomicBool,
}

impl Choice {
    /// The zstd level to encode the next run with (`None`: raw).
    pub(super) fn level(&self) -> Option<i32> {
        self.level.filter(|_| self.on.load(Ordering::Relaxed))
    }
}

/// The sender's side: measures each choice and flips the shared one.
#[derive(Debug)]
pub(super) struct Chooser {
    choice: Arc<Choice>,
    /// Whether the choice may change (`--compress auto` with a level).
    adaptive: bool,
    /// Plain bytes per second, compressed ([1]) and raw ([0]), smoothed.
    rate: [Option<f64>; 2],
    window: Option<Window>,
    /// Windows of the current choice since the other was last tried.
    since_explore: u32,
    explore_every: u32,
    /// Whether the current choice is a trial of the other.
    exploring: bool,
    switches: u64,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    bytes: u64,
}

impl Chooser {
    /// Starts compressed where there is a level (the common case, a real
    /// link, pays least for a wrong first guess that way).
    pub(super) fn new(level: Option<i32>, when: CompressWhen) -> Chooser {
        Chooser {
            choice: Arc::new(Choice {
                level,
                on: AtomicBool::new(level.is_some()),
            }),
            adaptive: level.is_some() && when == CompressWhen::Auto,
            rate: [None, None],
            window: None,
            since_explore: 0,
            explore_every: EXPLORE_EVERY,
            exploring: false,
            switches: 0,
        }
    }

    pub(super) fn choice(&self) -> Arc<Choice> {
        Arc::clone(&self.choice)
    }

    fn current(&self) -> bool {
        self.choice.on.load(Ordering::Relaxed)
    }

    /// Times the choice changed.
    pub(super) fn switches(&self) -> u64 {
        self.switches
    }

    /// The smoothed rates measured so far, raw and compressed, in plain
    /// bytes per second.
    pub(super) fn rates(&self) -> (Option<f64>, Option<f64>) {
        (self.rate[0], self.rate[1])
    }

    /// A round starts: a window open since the last one would count the
    /// idle time between rounds against the choice of the moment.
    pub(super) fn new_round(&mut self) {
        self.window = None;
    }

    /// Counts `plain` bytes of data (zero extents left out: they cost the
    /// same either way) just sent, encoded compressed or not. Extents
    /// encoded under the previous choice (still in the read-ahead) are not
    /// counted, and the first extent of the new choice only starts its
    /// clock: when it was read is not known here.
    pub(super) fn sent(&mut self, compressed: bool, plain: u64, now: Instant) {
        if !self.adaptive || compressed != self.current() {
            return;
        }
        let Some(window) = self.window.as_mut() else {
            self.window = Some(Window {
                start: now,
                bytes: 0,
            });
            return;
        };
        window.bytes += plain;
        let elapsed = now.duration_since(window.start);
        if window.bytes < WINDOW_BYTES || elapsed < MIN_WINDOW {
            return;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a rate: 52 bits of mantissa are plenty"
        )]
        let rate = window.bytes as f64 / elapsed.as_secs_f64();
        self.window = None;
        self.decide(rate);
    }

    /// Takes one window's rate and picks the choice for the next one.
    fn decide(&mut self, rate: f64) {
        let cur = usize::from(self.current());
        let other = 1 - cur;
        // Half the weight to the newest window: the data and the link change.
        self.rate[cur] = Some(self.rate[cur].map_or(rate, |r| 0.5 * r + 0.5 * rate));
        let here = self.rate[cur].expect("set just above");
        let next = match self.rate[other] {
            // The other has never been measured: one trial window.
            None => {
                self.exploring = true;
                other
            }
            Some(there) if self.exploring => {
                // A trial ends: kept if it won, else back, tried less often.
                self.exploring = false;
                if here > there {
                    self.explore_every = EXPLORE_EVERY;
                    cur
                } else {
                    self.explore_every = (self.explore_every * 2).min(MAX_EXPLORE_EVERY);
                    other
                }
            }
            // The kept choice fell below the other's last rate.
            Some(there) if there > here * MARGIN => other,
            Some(_) => {
                self.since_explore += 1;
                if self.since_explore >= self.explore_every {
                    self.exploring = true;
                    other
                } else {
                    cur
                }
            }
        };
        if next != cur {
            self.since_explore = 0;
            self.switches += 1;
            self.choice.on.store(next == 1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chooser` windows in which compressed data moves at `z` and raw
    /// at `raw` bytes per second; returns the choice after each window.
    fn run(chooser: &mut Chooser, windows: usize, z: f64, raw: f64) -> Vec<bool> {
        let mut now = Instant::now();
        let step = 4 << 20;
        let mut picks = Vec::new();
        for _ in 0..windows {
            let on = chooser.current();
            let rate = if on { z } else { raw };
            // The first extent of a window starts its clock.
            chooser.sent(on, step, now);
            let mut sent = 0;
            while chooser.current() == on && chooser.window.is_some() {
                #[expect(clippy::cast_precision_loss, reason = "test figures")]
                let secs = step as f64 / rate;
                now += Duration::from_secs_f64(secs);
                chooser.sent(on, step, now);
                sent += step;
                assert!(sent <= 2 * WINDOW_BYTES + step, "a window ends");
            }
            picks.push(chooser.current());
        }
        picks
    }

    #[test]
    fn a_slow_link_keeps_compression_and_tries_raw_less_and_less() {
        let mut c = Chooser::new(Some(1), CompressWhen::Auto);
        // Compressed data moves three times faster (a link-bound copy).
        let picks = run(&mut c, 60, 300e6, 100e6);
        let raw_windows = picks.iter().filter(|on| !**on).count();
        assert!(!picks[0], "the first window's end tries raw once");
        assert!(picks[1], "and comes back");
        assert!(
            raw_windows <= 6,
            "raw tried {raw_windows} times in 60 windows"
        );
        assert!(picks[50..].iter().filter(|on| !**on).count() <= 1);
    }

    #[test]
    fn a_cpu_bound_copy_moves_to_raw_and_stays_mostly() {
        let mut c = Chooser::new(Some(1), CompressWhen::Auto);
        let picks = run(&mut c, 60, 150e6, 400e6);
        let compressed = picks.iter().filter(|on| **on).count();
        assert!(!picks[0] && !picks[1], "raw from the first window on");
        assert!(compressed <= 6, "compression tried {compressed} times");
    }

    #[test]
    fn a_change_of_link_is_followed() {
        let mut c = Chooser::new(Some(1), CompressWhen::Auto);
        let before = run(&mut c, 20, 150e6, 400e6);
        assert!(!before[19] || !before[18], "raw while the CPU is the limit");
        // The link slows down: now compression wins.
        let after = run(&mut c, 80, 300e6, 100e6);
        assert!(after[60..].iter().filter(|on| **on).count() >= 18);
    }

    #[test]
    fn the_time_between_rounds_is_not_counted() {
        let mut c = Chooser::new(Some(1), CompressWhen::Auto);
        let start = Instant::now();
        c.sent(true, 4 << 20, start);
        c.sent(true, WINDOW_BYTES / 2, start + Duration::from_millis(300));
        // An idle minute, then the next round sends fast: without the reset
        // the window's rate would be half a window per minute.
        c.new_round();
        let later = start + Duration::from_mins(1);
        c.sent(true, 4 << 20, later);
        c.sent(true, WINDOW_BYTES, later + Duration::from_millis(250));
        let (_, zstd) = c.rates();
        assert!(zstd.is_some_and(|r| r > 200e6), "rate {zstd:?}");
    }

    #[test]
    fn always_and_raw_never_change() {
        let mut c = Chooser::new(Some(1), CompressWhen::Always);
        assert!(run(&mut c, 10, 1e6, 1e9).iter().all(|on| *on));
        assert_eq!(c.choice().level(), Some(1));
        let mut c = Chooser::new(None, CompressWhen::Auto);
        assert!(c.choice().level().is_none());
        c.sent(false, WINDOW_BYTES * 2, Instant::now());
        assert_eq!(c.switches(), 0);
    }
}
