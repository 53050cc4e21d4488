//! Slowing the workload while the delta rounds do not converge
//! (`--converge throttle`). Like QEMU's auto-converge, only after two
//! strikes: two looks in a row whose dirty set shrank by less than a quarter
//! since the look before. Then the first limit is half of what the link
//! moves (or of what the writer writes, if less) for a write limit, or half
//! of the CPU the workload used for a CPU quota (`--throttle-by cpu`), and
//! each further pair of strikes halves it, down to a floor. Released at the
//! pause. A writer that converges alone, if slowly, is left alone.

use std::path::PathBuf;
use std::time::Instant;

use crate::throttle::cpu::CpuThrottle;
use crate::throttle::{CgroupSpec, ThrottleError, WriteThrottle};

/// Whose writes to slow, and where to record a limit while it is on.
#[derive(Debug, Clone)]
pub struct ThrottleOptions {
    pub cgroup: CgroupSpec,
    /// Written while a limit is on and removed when lifted, so that a killed
    /// migration's limit is undone by the next run (`None`: not recorded).
    pub record: Option<PathBuf>,
    /// What is limited (`None`: the plan's lever, else the writes).
    pub by: Option<ThrottleBy>,
}

/// What a throttle limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThrottleBy {
    /// The cgroup's writes to the source's disk (`io.max`, v1 blkio).
    #[default]
    Writes,
    /// The cgroup's CPU (`cpu.max`, v1 `cpu.cfs_quota_us`): QEMU's
    /// auto-converge, for a writer whose dirtying follows its CPU.
    Cpu,
}

/// What throttling did, in the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ThrottleReport {
    pub cgroup: String,
    pub by: ThrottleBy,
    /// `MAJ:MIN` of the disk the limit was on (a write limit).
    pub device: String,
    /// Times the limit was set or lowered.
    pub steps: u64,
    /// The lowest write limit set, bytes per second (0: never limited).
    pub lowest_bps: u64,
    /// The lowest CPU quota set, in cores (a CPU quota).
    pub lowest_cores: Option<f64>,
    /// The workload's CPU use when the quota was first set, in cores.
    pub cpu_before_cores: Option<f64>,
    /// How long a limit was on.
    pub throttled_ms: f64,
}

/// Looks in a row that barely shrink the dirty set before a step.
const STRIKES: u32 = 2;

/// Whether the dirty set shrank by less than a quarter since the last look
/// (`last` is `u64::MAX` before the first look: not a strike).
fn stalled(dirty: u64, last: u64) -> bool {
    u128::from(dirty) * 4 > u128::from(last) * 3
}

/// The lowest limit: below it a writer's single requests stall for long.
const FLOOR_BPS: u64 = 1 << 20;
/// The lowest CPU quota: 2 % of a core (QEMU's auto-converge stops at 99 %
/// throttled).
const FLOOR_CORES: f64 = 0.02;

/// The limit itself.
#[derive(Debug)]
enum Lever {
    Writes(WriteThrottle),
    Cpu {
        quota: CpuThrottle,
        /// The CPU the workload used before the first quota, in cores.
        before: Option<f64>,
        lowest: Option<f64>,
    },
}

/// The throttle and the looks it steps on.
#[derive(Debug)]
pub(super) struct Throttling {
    lever: Lever,
    /// Dirty bytes at the previous look (`u64::MAX` before the first).
    last_dirty: u64,
    /// Looks in a row that barely shrank the dirty set, since the last step.
    strikes: u32,
    /// The cgroup's written bytes and when they were read, for its rate.
    written: Option<(u64, Instant)>,
    steps: u64,
    lowest: Option<u64>,
}

impl Throttling {
    pub(super) fn writes(throttle: WriteThrottle) -> Throttling {
        let written = throttle.written_bytes().map(|b| (b, Instant::now()));
        Throttling::with(Lever::Writes(throttle), written)
    }

    pub(super) fn cpu(quota: CpuThrottle) -> Throttling {
        Throttling::with(
            Lever::Cpu {
                quota,
                before: None,
                lowest: None,
            },
            None,
        )
    }

    fn with(lever: Lever, written: Option<(u64, Instant)>) -> Throttling {
        Throttling {
            lever,
            last_dirty: u64::MAX,
            strikes: 0,
            written,
            steps: 0,
            lowest: None,
        }
    }

    /// The write limit on now (bytes per second).
    pub(super) fn current(&self) -> Option<u64> {
        match &self.lever {
            Lever::Writes(t) => t.current(),
            Lever::Cpu { .. } => None,
        }
    }

    /// Whether the limit holds writes back (a write limit does; a CPU quota
    /// only stops the tasks, whose submitted writes go on).
    pub(super) fn holds_writes(&self) -> bool {
        matches!(self.lever, Lever::Writes(_))
    }

    /// The CPU quota on now (cores).
    pub(super) fn current_cores(&self) -> Option<f64> {
        match &self.lever {
            Lever::Writes(_) => None,
            Lever::Cpu { quota, .. } => quota.current_cores(),
        }
    }

    /// How far the workload was throttled, for a person.
    pub(super) fn lowest(&self) -> Option<String> {
        match &self.lever {
            Lever::Writes(_) =>
            {
                #[expect(clippy::cast_precision_loss, reason = "a rate for a person to read")]
                self.lowest
                    .map(|b| format!("its writes down to {}", crate::units::human_rate(b as f64)))
            }
            Lever::Cpu { lowest, .. } => lowest.map(|c| format!("its CPU down to {c:.2} core")),
        }
    }

    /// Bytes per second the cgroup wrote since the last reading.
    fn writer_rate(&mut self) -> Option<f64> {
        let Lever::Writes(t) = &self.lever else {
            return None;
        };
        let now = t.written_bytes()?;
        let (then, at) = self.written.replace((now, Instant::now()))?;
        let secs = at.elapsed().as_secs_f64();
        #[expect(
            clippy::cast_precision_loss,
            reason = "a byte count over seconds, for a rate"
        )]
        let rate = now.saturating_sub(then) as f64 / secs.max(1e-3);
        (rate > 0.0).then_some(rate)
    }

    /// At a look whose final delta would not fit the budget: lowers the
    /// limit at the second look in a row that barely shrank the dirty set.
    /// `bandwidth` is the link's measured rate (bytes per second).
    pub(super) fn slow_down(&mut self, dirty: u64, bandwidth: f64) -> Result<(), ThrottleError> {
        let writer = self.writer_rate();
        let stalled = stalled(dirty, self.last_dirty);
        self.last_dirty = dirty;
        self.strikes = if stalled { self.strikes + 1 } else { 0 };
        // Shrinking (or the first look): the rounds converge as they are.
        if self.strikes < STRIKES {
            return Ok(());
        }
        self.strikes = 0;
        match &mut self.lever {
            Lever::Writes(t) => {
                let next = if let Some(on) = t.current() {
                    on / 2
                } else if let Some(first) = first_limit(writer, bandwidth) {
                    first
                } else {
                    // Neither rate is known yet: the next look will tell.
                    return Ok(());
                }
                .max(FLOOR_BPS);
                // At the floor (or an operator's lower limit) already.
                let Some(set) = t.limit(next)? else {
                    return Ok(());
                };
                self.steps += 1;
                self.lowest = Some(self.lowest.map_or(set, |l| l.min(set)));
                tracing::info!(
                    cgroup = %t.cgroup().display(),
                    device = t.device(),
                    limit_bps = set,
                    dirty,
                    "not converging: the workload's writes are throttled"
                );
            }
            Lever::Cpu {
                quota,
                before,
                lowest,
            } => {
                let next = if let Some(on) = quota.current_cores() {
                    on / 2.0
                } else {
                    // Half of what it used since the migration began.
                    match quota.usage_cores() {
                        Some(used) if used > 0.0 => {
                            *before = Some(used);
                            used / 2.0
                        }
                        _ => return Ok(()),
                    }
                }
                .max(FLOOR_CORES);
                let Some(set) = quota.limit(next)? else {
                    return Ok(());
                };
                self.steps += 1;
                *lowest = Some(lowest.map_or(set, |l: f64| l.min(set)));
                tracing::info!(
                    cgroup = %quota.cgroup().display(),
                    cores = set,
                    dirty,
                    "not converging: the workload's CPU is throttled"
                );
            }
        }
        Ok(())
    }

    /// Takes every limit off while the workload pauses, so that what the
    /// throttle holds goes out now; `true` when a limit of ours was on.
    pub(super) fn release(&mut self) -> Result<bool, ThrottleError> {
        match &mut self.lever {
            Lever::Writes(t) => t.release(),
            Lever::Cpu { quota, .. } => quota.release(),
        }
    }

    /// Puts back the limit that was there before (the migration ends).
    pub(super) fn lift(&mut self) -> Result<(), ThrottleError> {
        match &mut self.lever {
            Lever::Writes(t) => t.lift(),
            Lever::Cpu { quota, .. } => quota.lift(),
        }
    }

    /// Whether the limit is as low as it goes.
    pub(super) fn at_floor(&self) -> bool {
        match &self.lever {
            Lever::Writes(_) => self.lowest.is_some_and(|l| l <= FLOOR_BPS),
            Lever::Cpu { lowest, .. } => lowest.is_some_and(|l| l <= FLOOR_CORES),
        }
    }

    pub(super) fn report(&self) -> ThrottleReport {
        match &self.lever {
            Lever::Writes(t) => ThrottleReport {
                cgroup: t.cgroup().display().to_string(),
                by: ThrottleBy::Writes,
                device: t.device().to_owned(),
                steps: self.steps,
                lowest_bps: self.lowest.unwrap_or(0),
                lowest_cores: None,
                cpu_before_cores: None,
                throttled_ms: t.throttled_for().as_secs_f64() * 1e3,
            },
            Lever::Cpu {
                quota,
                before,
                lowest,
            } => ThrottleReport {
                cgroup: quota.cgroup().display().to_string(),
                by: ThrottleBy::Cpu,
                device: String::new(),
                steps: self.steps,
                lowest_bps: 0,
                lowest_cores: *lowest,
                cpu_before_cores: *before,
                throttled_ms: quota.throttled_for().as_secs_f64() * 1e3,
            },
        }
    }
}

/// The first limit: half of the link's rate, or of the writer's own when it
/// writes slower (a limit above what it writes would not slow it).
fn first_limit(writer: Option<f64>, bandwidth: f64) -> Option<u64> {
    let base = match writer {
        Some(w) if bandwidth > 0.0 => w.min(bandwidth),
        Some(w) => w,
        None => bandwidth,
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive rate; `as` saturates, right for a limit"
    )]
    (base > 0.0).then(|| (base / 2.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::{first_limit, stalled};

    #[test]
    fn a_look_is_a_strike_when_the_dirty_set_shrank_by_less_than_a_quarter() {
        assert!(!stalled(100, u64::MAX), "the first look");
        assert!(stalled(100, 100));
        assert!(stalled(120, 100));
        assert!(stalled(76, 100));
        assert!(!stalled(75, 100));
        assert!(!stalled(10, 100));
        assert!(!stalled(0, 0), "an empty dirty set is no strike");
        assert!(stalled(u64::MAX, u64::MAX), "no overflow");
    }

    #[test]
    fn the_first_limit_halves_the_slower_of_the_link_and_the_writer() {
        assert_eq!(first_limit(Some(100.0), 40.0), Some(20));
        assert_eq!(first_limit(Some(10.0), 40.0), Some(5));
        assert_eq!(first_limit(None, 40.0), Some(20));
        assert_eq!(first_limit(Some(10.0), 0.0), Some(5));
        assert_eq!(first_limit(None, 0.0), None);
    }
}
