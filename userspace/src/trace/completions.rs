//! A cross-check of the trace against the kernel's own I/O counters.
//!
//! The tracer counts what it knows it dropped (a full ring, a skipped
//! program run), but on this machine's kernel (6.18, a loop device, fio at
//! 5000 IOPS) about one write completion in 20 000 fires the tracepoint
//! (ftrace sees it) and never reaches the ring, with no counter moved. They
//! come in batches: one block softirq's completions (1 to 8 of them), run
//! on top of a thread of another process, lost together. A write the trace
//! does not hold is a write a migration does not send. So each traced
//! disk's completed writes and discards (`/sys/dev/block/M:m/stat`, counted
//! after the completion tracepoint fired) are compared with the modifying
//! events the trace received: fewer events than completions means events
//! were lost. A lost completion leaves its request's record in the
//! tracer's in-flight map; those come back as events marked unseen (at the
//! request's reuse, or taken once the disk has no write in flight:
//! [`CompletionCheck::short_and_quiet`]). Only a shortfall they do not
//! explain is a gap ("treat as dirty").
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

/// How long a completion can take from its tracepoint to the kernel's count
/// (the same call chain, at most an interrupt between): a completion that
/// close to a read of the counts may be on either side of it.
const IN_TRANSIT_NS: u64 = 100_000;

/// Reads of the counts tried as the base before one is taken despite
/// completions close to it (a disk never idle for 100 µs).
const BASE_TRIES: u32 = 200;

/// A read of a disk's count that may become the base every comparison
/// starts from. The events that count against it are those whose
/// completion is at or after `t0`; it is taken once no completion fell
/// within [`IN_TRANSIT_NS`] of the read, as then the count holds exactly
/// the completions before `t0`. (A base read once, after the tracer was
/// attached, counted the completions between the attach and the read in
/// the trace but not in the kernel's delta: 20-33 at 5000 IOPS, which hid
/// as many lost events.)
#[derive(Debug, Clone, Copy)]
struct BaseRead {
    count: u64,
    /// Monotonic ns right before and right after the read.
    t0: u64,
    t1: u64,
    /// Events received so far that completed at or after `t0`.
    traced: u64,
    /// A completion fell within [`IN_TRANSIT_NS`] of the read.
    ambiguous: bool,
}

/// One traced disk's counters.
#[derive(Debug)]
struct Disk {
    /// The kernel's `dev_t` encoding the BPF programs report (`major << 20 | minor`).
    dev: u32,
    stat: PathBuf,
    /// Its requests in flight (`inflight`), read when its count is short.
    in_flight: PathBuf,
    /// The base, once one is taken; until then, the read being tried.
    base: Option<BaseRead>,
    trying: Option<BaseRead>,
    tries: u32,
    /// The shortfall seen at an earlier look, at least [`LOOKS_APART`] ago
    /// (a record still being written on another CPU can hold back the ones
    /// behind it for a moment).
    previous: i64,
    /// The latest look not yet that old, which becomes `previous` once it is.
    candidate: Option<(i64, Instant)>,
    /// The shortfall already reported as lost.
    reported: i64,
    /// The shortfall at the latest look, reported or not.
    latest: i64,
}

impl Disk {
    fn new(dev: u32, stat: PathBuf) -> Disk {
        Disk {
            dev,
            in_flight: stat.with_file_name("inflight"),
            stat,
            base: None,
            trying: None,
            tries: 0,
            previous: 0,
            candidate: None,
            reported: 0,
            latest: 0,
        }
    }

    /// At a read of the counts (`count` over `[t0, t1]`): takes the read
    /// being tried as the base once every completion up to its end has had
    /// time to arrive and none was close to it, or tries this one instead.
    fn look(&mut self, count: Option<u64>, t0: u64, t1: u64) {
        if self.base.is_some() {
            return;
        }
        let settled = u64::try_from(LOOKS_APART.as_nanos()).expect("a millisecond");
        if let Some(tried) = self.trying
            && t0 >= tried.t1 + settled
        {
            self.tries += 1;
            if !tried.ambiguous || self.tries >= BASE_TRIES {
                if tried.ambiguous {
                    tracing::debug!(
                        device = %super::device::kernel_dev_name(self.dev),
                        "no quiet moment to read the completion count at: its base may be off by the completions in flight"
                    );
                }
                self.base = Some(tried);
                self.trying = None;
                return;
            }
            self.trying = None;
        }
        if self.trying.is_none()
            && let Some(count) = count
        {
            self.trying = Some(BaseRead {
                count,
                t0,
                t1,
                traced: 0,
                ambiguous: false,
            });
        }
    }

    fn note(&mut self, completed_ns: u64) {
        if let Some(base) = &mut self.base {
            if completed_ns >= base.t0 {
                base.traced += 1;
            }
        } else if let Some(tried) = &mut self.trying {
            if completed_ns >= tried.t0 {
                tried.traced += 1;
            }
            if (tried.t0.saturating_sub(IN_TRANSIT_NS)..=tried.t1).contains(&completed_ns) {
                tried.ambiguous = true;
            }
        }
    }
}

/// The per-disk comparison for one session.
#[derive(Debug, Default)]
pub struct CompletionCheck {
    disks: Vec<Disk>,
}

/// The kernel's counts, read before a drain.
#[derive(Debug)]
pub struct Counts {
    counts: Vec<Option<u64>>,
}

impl CompletionCheck {
    /// Checks the disks `devs` (kernel `dev_t` encoding) whose counters can
    /// be read; none with a pid filter.
    pub fn new(devs: impl IntoIterator<Item = u32>, pid_filter: bool) -> CompletionCheck {
        if pid_filter {
            return CompletionCheck::default();
        }
        let mut disks = Vec::new();
        for dev in devs {
            let dir = super::device::sysfs_dir(dev >> 20, dev & ((1 << 20) - 1));
            let iostats = std::fs::read_to_string(dir.join("queue/iostats"));
            if iostats.is_ok_and(|v| v.trim() == "0") {
                tracing::debug!(device = %super::device::kernel_dev_name(dev), "I/O statistics are off: the trace is not cross-checked against them");
                continue;
            }
            let stat = dir.join("stat");
            if read_modifying(&stat).is_some() {
                disks.push(Disk::new(dev, stat));
            }
        }
        CompletionCheck { disks }
    }

    /// Counts a modifying event (write, discard, write-zeroes, other) for
    /// `dev` whose completion fired at `completed_ns` (monotonic).
    pub fn note(&mut self, dev: u32, completed_ns: u64) {
        if let Some(d) = self.disks.iter_mut().find(|d| d.dev == dev) {
            d.note(completed_ns);
        }
    }

    /// The kernel's counts now: read them before draining the ring, so that
    /// every completion they include has its event in the ring.
    pub fn read(&mut self) -> Counts {
        self.read_with(super::tracer::monotonic_ns)
    }

    fn read_with(&mut self, mut clock: impl FnMut() -> u64) -> Counts {
        let mut counts = Vec::with_capacity(self.disks.len());
        for d in &mut self.disks {
            let t0 = clock();
            let count = read_modifying(&d.stat);
            let t1 = clock();
            d.look(count, t0, t1);
            counts.push(count);
        }
        Counts { counts }
    }

    /// After the drain: completions (counted in `before`) whose events did
    /// not arrive and were not reported yet. A shortfall counts once it was
    /// seen at two looks at least [`LOOKS_APART`] apart.
    pub fn newly_lost(&mut self, before: &Counts) -> u64 {
        self.newly_lost_at(before, Instant::now())
    }

    /// The disks whose trace is short of the kernel's `before` count right
    /// now and that had no write in flight at a read of their `inflight`,
    /// with the time (monotonic ns) right before that read: every request
    /// issued before it has completed, so the tracer's in-flight records
    /// older than it are completions it never saw
    /// ([`super::tracer::Tracer::take_unseen`]).
    pub fn short_and_quiet(&self, before: &Counts) -> Vec<(u32, u64)> {
        self.short_and_quiet_with(before, super::tracer::monotonic_ns)
    }

    fn short_and_quiet_with(
        &self,
        before: &Counts,
        mut clock: impl FnMut() -> u64,
    ) -> Vec<(u32, u64)> {
        let mut quiet = Vec::new();
        for (d, count) in self.disks.iter().zip(&before.counts) {
            let (Some(count), Some(base)) = (count, d.base) else {
                continue;
            };
            if count.saturating_sub(base.count) <= base.traced {
                continue;
            }
            let t = clock();
            let writes = std::fs::read_to_string(&d.in_flight)
                .ok()
                .and_then(|text| super::device::in_flight_reads_and_writes(&text))
                .map(|(_, writes)| writes);
            if writes == Some(0) {
                quiet.push((d.dev, t));
            }
        }
        quiet
    }

    /// Whether, at the latest look, every completion the kernel counted is
    /// in the trace or already reported lost: no shortfall is still waiting
    /// to be explained (by a late event or an unseen completion) or
    /// declared a gap. Until it is, the trace may lack a write that has
    /// completed.
    pub fn settled(&self) -> bool {
        self.disks.iter().all(|d| d.latest <= d.reported)
    }

    /// Per disk: `(dev, completed, traced)` since the base, as of the
    /// kernel's counts `at`; for the session's closing summary.
    pub fn tally(&self, at: &Counts) -> Vec<(u32, u64, u64)> {
        self.disks
            .iter()
            .zip(&at.counts)
            .filter_map(|(d, c)| {
                let base = d.base?;
                c.map(|c| (d.dev, c.saturating_sub(base.count), base.traced))
            })
            .collect()
    }

    fn newly_lost_at(&mut self, before: &Counts, now: Instant) -> u64 {
        let mut lost = 0u64;
        for (d, count) in self.disks.iter_mut().zip(&before.counts) {
            let (Some(count), Some(base)) = (count, d.base) else {
                continue;
            };
            let completed = i64::try_from(count.saturating_sub(base.count)).unwrap_or(i64::MAX);
            let traced = i64::try_from(base.traced).unwrap_or(i64::MAX);
            let short = completed - traced;
            d.latest = short;
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
        let mut disk = Disk::new(7 << 20, stat);
        disk.base = Some(BaseRead {
            count,
            t0: 0,
            t1: 0,
            traced: 0,
            ambiguous: false,
        });
        (CompletionCheck { disks: vec![disk] }, dir)
    }

    fn set(check: &CompletionCheck, count: u64) {
        std::fs::write(
            &check.disks[0].stat,
            format!("0 0 0 0 {count} 0 0 0 0 0 0 0"),
        )
        .expect("write");
    }

    #[test]
    fn a_short_disk_is_offered_for_its_in_flight_records_only_when_it_has_no_write_in_flight() {
        let (mut check, dir) = check_with(1000);
        let in_flight = dir.path().join("inflight");
        let clock = || 77;
        // Nothing short: nothing to look for, whatever is in flight.
        std::fs::write(&in_flight, "       0        0\n").expect("write");
        set(&check, 1002);
        (0..2).for_each(|_| check.note(7 << 20, 1));
        let c = check.read();
        assert!(check.short_and_quiet_with(&c, clock).is_empty());
        // One short with a write in flight: that write may be the one.
        set(&check, 1003);
        std::fs::write(&in_flight, "       0        1\n").expect("write");
        let c = check.read();
        assert!(check.short_and_quiet_with(&c, clock).is_empty());
        // Quiet (reads in flight do not matter): offered, with the time before the read.
        std::fs::write(&in_flight, "       4        0\n").expect("write");
        assert_eq!(check.short_and_quiet_with(&c, clock), [(7 << 20, 77)]);
        // An unreadable count is not quiet.
        std::fs::write(&in_flight, "gone").expect("write");
        assert!(check.short_and_quiet_with(&c, clock).is_empty());
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
        (0..10).for_each(|_| check.note(7 << 20, 1));
        assert_eq!(look(&mut check), 0);
        // Three more completions, one event held back for a look: not yet lost.
        set(&check, 1013);
        (0..2).for_each(|_| check.note(7 << 20, 1));
        assert_eq!(look(&mut check), 0);
        // It arrives: still nothing lost.
        check.note(7 << 20, 1);
        assert_eq!(look(&mut check), 0);
        // Two completions whose events never come: lost at the second look, once.
        set(&check, 1015);
        assert_eq!(look(&mut check), 0);
        assert_eq!(look(&mut check), 2);
        assert_eq!(look(&mut check), 0);
        // Events of another disk do not count.
        check.note(8 << 20, 1);
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
        check.note(7 << 20, 1);
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
    fn the_base_is_a_read_no_completion_came_close_to_and_earlier_completions_never_count() {
        let (mut check, _dir) = check_with(0);
        check.disks[0].base = None;
        let dev = 7 << 20;
        let ms = |n: u64| n * 1_000_000;
        // A read at 10 ms: completions before it that arrive late are in
        // its count already; one 50 µs before it may or may not be.
        set(&check, 500);
        let mut t = ms(10);
        check.read_with(|| {
            t += 1000;
            t
        });
        check.note(dev, ms(9));
        assert!(!check.disks[0].trying.expect("tried").ambiguous);
        check.note(dev, ms(10) - 50_000);
        assert!(check.disks[0].trying.expect("tried").ambiguous);
        // Not the base: the next read a millisecond on is tried instead.
        set(&check, 510);
        let mut t = ms(12);
        check.read_with(|| {
            t += 1000;
            t
        });
        assert!(check.disks[0].base.is_none());
        let tried = check.disks[0].trying.expect("tried");
        assert_eq!((tried.count, tried.traced), (510, 0));
        // Completions long before it, and after it: only the later count.
        check.note(dev, ms(11));
        check.note(dev, ms(13));
        check.note(dev, ms(14));
        set(&check, 513);
        let mut t = ms(15);
        let c = check.read_with(|| {
            t += 1000;
            t
        });
        let base = check.disks[0]
            .base
            .expect("taken: nothing came close to it");
        assert_eq!((base.count, base.traced), (510, 2));
        // Three completed since, two arrived: one is late or lost; lost
        // once a look a millisecond later still sees it missing.
        let now = Instant::now();
        assert_eq!(check.newly_lost_at(&c, now), 0);
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, now + Duration::from_millis(2)), 1);
        let c = check.read();
        assert_eq!(check.newly_lost_at(&c, now + Duration::from_millis(4)), 0);
        assert_eq!(check.tally(&c), vec![(dev, 3, 2)]);
    }

    #[test]
    fn a_disk_never_quiet_still_gets_a_base() {
        let (mut check, _dir) = check_with(0);
        check.disks[0].base = None;
        let mut t = 0;
        for _ in 0..=BASE_TRIES {
            t += 2_000_000;
            let at = t;
            check.read_with(|| at);
            check.note(7 << 20, t);
        }
        assert!(check.disks[0].base.is_some());
    }

    #[test]
    fn no_check_with_a_pid_filter() {
        assert!(CompletionCheck::new([7 << 20], true).disks.is_empty());
    }
}
