//! A cross-check of the trace against the kernel's own I/O counters.
//!
//! The tracer counts what it knows it dropped (a full ring, a skipped
//! program run), but on this machine's kernel (6.18, a loop device, fio at
//! 5000 IOPS) about one write completion in 20 000 fired the tracepoint
//! (ftrace saw it) and never reached the ring, with no counter moved: every
//! such completion seen by ftrace ran in softirq context on top of the
//! tracer's own thread. A write the trace does not hold is a write a
//! migration does not send. So each traced disk's completed writes and
//! discards (`/sys/dev/block/M:m/stat`, counted after the completion
//! tracepoint fired) are compared with the modifying events the trace
//! received: fewer events than completions means events were lost, and the
//! session marks a gap ("treat as dirty").
//!
//! The kernel counts a request once; the trace may count it more (partial
//! completions, split bios), so the check is a lower bound on what was lost.
//! It is off with a pid filter (other processes' writes are then left out
//! on purpose) and for a disk whose `queue/iostats` is 0.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How far apart two looks must be for a shortfall seen at both to count:
/// a record still being written on another CPU can hold back the ones
/// behind it, for microseconds. The tracker looks in quick succession when
/// asked to sync; a shortfall must outlast this.
const LOOKS_APART: Duration = Duration::from_millis(1);

/// One traced disk's counters.
#[derive(Debug)]
struct Disk {
    /// The kernel's `dev_t` encoding the BPF programs report (`major << 20 | minor`).
    dev: u32,
    stat: PathBuf,
    /// The kernel's completed writes and discards when the session started.
    base: u64,
    /// Modifying events received for this disk.
    traced: u64,
    /// The shortfall seen at an earlier look, at least [`LOOKS_APART`] ago
    /// (a record still being written on another CPU can hold back the ones
    /// behind it for a moment).
    previous: i64,
    /// The latest look not yet that old, which becomes `previous` once it is.
    candidate: Option<(i64, Instant)>,
    /// The shortfall already reported as lost.
    reported: i64,
}

/// The per-disk comparison for one session.
#[derive(Debug, Default)]
pub struct CompletionCheck {
    disks: Vec<Disk>,
}

/// The kernel's counts, read before a drain.
#[derive(Debug)]
pub struct Counts(Vec<Option<u64>>);

impl CompletionCheck {
    /// Checks the disks `devs` (kernel `dev_t` encoding) whose counters can
    /// be read; none with a pid filter.
    pub fn new(devs: impl IntoIterator<Item = u32>, pid_filter: bool) -> CompletionCheck {
        if pid_filter {
            return CompletionCheck::default();
        }
        let mut disks = Vec::new();
        for dev in devs {
            let (major, minor) = (dev >> 20, dev & ((1 << 20) - 1));
            let dir = super::device::sysfs_dir(major, minor);
            let iostats = std::fs::read_to_string(dir.join("queue/iostats"));
            if iostats.is_ok_and(|v| v.trim() == "0") {
                tracing::debug!(device = %format!("{major}:{minor}"), "I/O statistics are off: the trace is not cross-checked against them");
                continue;
            }
            let stat = dir.join("stat");
            if let Some(base) = read_modifying(&stat) {
                disks.push(Disk {
                    dev,
                    stat,
                    base,
                    traced: 0,
                    previous: 0,
                    candidate: None,
                    reported: 0,
                });
            }
        }
        CompletionCheck { disks }
    }

    /// Counts a modifying event (write, discard, write-zeroes, other) for `dev`.
    pub fn note(&mut self, dev: u32) {
        if let Some(d) = self.disks.iter_mut().find(|d| d.dev == dev) {
            d.traced += 1;
        }
    }

    /// The kernel's counts now: read them before draining the ring, so that
    /// every completion they include has its event in the ring.
    pub fn read(&self) -> Counts {
        Counts(self.disks.iter().map(|d| read_modifying(&d.stat)).collect())
    }

    /// After the drain: completions (counted in `before`) whose events did
    /// not arrive and were not reported yet. A shortfall counts once it was
    /// seen at two looks at least [`LOOKS_APART`] apart.
    pub fn newly_lost(&mut self, before: &Counts) -> u64 {
        self.newly_lost_at(before, Instant::now())
    }

    fn newly_lost_at(&mut self, before: &Counts, now: Instant) -> u64 {
        let mut lost = 0u64;
        for (d, count) in self.disks.iter_mut().zip(&before.0) {
            let Some(count) = count else { continue };
            let completed = i64::try_from(count.saturating_sub(d.base)).unwrap_or(i64::MAX);
            let traced = i64::try_from(d.traced).unwrap_or(i64::MAX);
            let short = completed - traced;
            let aged = d
                .candidate
                .map(|(s, at)| (s, now.saturating_duration_since(at) >= LOOKS_APART));
            match aged {
                Some((s, true)) => {
                    d.previous = s;
                    d.candidate = Some((short, now));
                }
                Some((_, false)) => {}
                None => d.candidate = Some((short, now)),
            }
            let sure = short.min(d.previous);
            if sure > d.reported {
                lost += u64::try_from(sure - d.reported).expect("positive");
                d.reported = sure;
            }
        }
        lost
    }
}

/// Completed writes plus discards in a `stat` file.
fn read_modifying(stat: &std::path::Path) -> Option<u64> {
    parse_modifying(&std::fs::read_to_string(stat).ok()?)
}

fn parse_modifying(text: &str) -> Option<u64> {
    super::device::completed_writes_and_discards(text).map(|(w, d)| w + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_discards_are_fields_five_and_twelve() {
        let text = "  100 0 800 5   40 1 320 9   0 7   12   3 0 24 2   0 0\n";
        assert_eq!(parse_modifying(text), Some(43));
        // Kernels before 4.18 have no discard fields.
        assert_eq!(parse_modifying("1 0 8 0 40 0 320 0 0 0 0"), Some(40));
        assert_eq!(parse_modifying("garbage"), None);
    }

    fn check_with(count: u64) -> (CompletionCheck, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let stat = dir.path().join("stat");
        std::fs::write(&stat, format!("0 0 0 0 {count} 0 0 0 0 0 0 0")).expect("write");
        let check = CompletionCheck {
            disks: vec![Disk {
                dev: 7 << 20,
                stat,
                base: count,
                traced: 0,
                previous: 0,
                candidate: None,
                reported: 0,
            }],
        };
        (check, dir)
    }

    fn set(check: &CompletionCheck, count: u64) {
        std::fs::write(
            &check.disks[0].stat,
            format!("0 0 0 0 {count} 0 0 0 0 0 0 0"),
        )
        .expect("write");
    }

    #[test]
    fn a_shortfall_seen_twice_is_lost_once_and_a_passing_one_is_not() {
        let (mut check, _dir) = check_with(1000);
        let mut now = Instant::now();
        let mut look = |check: &mut CompletionCheck| {
            now += Duration::from_millis(5);
            let c = check.read();
            check.newly_lost_at(&c, now)
        };
        // Ten completions, ten events: nothing lost.
        set(&check, 1010);
        (0..10).for_each(|_| check.note(7 << 20));
        assert_eq!(look(&mut check), 0);
        // Three more completions, one event held back for a look: not yet lost.
        set(&check, 1013);
        (0..2).for_each(|_| check.note(7 << 20));
        assert_eq!(look(&mut check), 0);
        // It arrives: still nothing lost.
        check.note(7 << 20);
        assert_eq!(look(&mut check), 0);
        // Two completions whose events never come: lost at the second look, once.
        set(&check, 1015);
        assert_eq!(look(&mut check), 0);
        assert_eq!(look(&mut check), 2);
        assert_eq!(look(&mut check), 0);
        // Events of another disk do not count.
        check.note(8 << 20);
        set(&check, 1016);
        look(&mut check);
        assert_eq!(look(&mut check), 1);
    }

    #[test]
    fn a_shortfall_counts_only_when_seen_at_looks_far_enough_apart() {
        let (mut check, _dir) = check_with(1000);
        let start = Instant::now();
        let at = |us: u64| start + Duration::from_micros(us);
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, at(0)), 0);
        // One completion whose event is late: looks 100 µs apart see it
        // missing again and again, and do not call it lost.
        set(&check, 1001);
        for us in [100, 200, 300, 400, 500] {
            let c = check.read();
            assert_eq!(check.newly_lost_at(&c, at(us)), 0, "at {us} µs");
        }
        // Its event arrives before the shortfall is a millisecond old.
        check.note(7 << 20);
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, at(1200)), 0);
        // Another one that never arrives is lost once two looks a
        // millisecond apart both saw it missing (the earlier one is the
        // first look after 1200 µs aged: at 2600 µs).
        set(&check, 1002);
        for us in [1300, 1500, 2600, 2700] {
            let c = check.read();
            assert_eq!(check.newly_lost_at(&c, at(us)), 0, "at {us} µs");
        }
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, at(3700)), 1);
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, at(5000)), 0);
    }

    #[test]
    fn no_check_with_a_pid_filter() {
        assert!(CompletionCheck::new([7 << 20], true).disks.is_empty());
    }
}
