//! Pre-copy or post-copy: the controller's rule, for a recorded workload
//! (`tern plan`) and for a running migration's measured figures
//! (`tern migrate --mode auto`), so both say the same thing for the same
//! workload and link.
//!
//! Pre-copy shrinks the delta by the ratio of the dirty rate to the link's
//! rate each round: a workload that dirties half the link or more needs
//! many rounds to reach a short pause, and one that dirties it all never
//! does. Post-copy has no such limit but leaves the only complete copy split
//! across two hosts until its push ends, so it is chosen only where
//! pre-copy does not fit.

use serde::Serialize;

use super::Mode;
use super::simulate::Model;
use crate::analyze::cpu::CpuReport;
use crate::units::{human_bytes, human_rate};

/// Post-copy when the workload dirties at least this share of the link.
pub const POSTCOPY_SHARE: f64 = 0.5;

/// A running migration's figures, measured by its delta rounds.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Unique bytes dirtied per second (a floor: a unit rewritten counts once).
    pub dirty_rate_bps: f64,
    /// The last delta round's rate (scattered extents, per-extent costs in).
    pub bandwidth_bps: f64,
    /// Bytes dirty now.
    pub dirty_bytes: u64,
    /// The downtime budget in seconds.
    pub budget_s: f64,
    /// Delta rounds still allowed.
    pub rounds_left: u64,
}

/// The controller's choice and why, in a sentence an operator can check
/// (after "post-copy because").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    pub mode: Mode,
    pub why: String,
}

/// Rounds pre-copy needs from `dirty` bytes to a final delta of at most
/// `fits` bytes when each round leaves `share` of the last: `None` when
/// it never gets there.
pub fn rounds_to_fit(dirty: f64, fits: f64, share: f64) -> Option<u64> {
    if dirty <= fits {
        return Some(0);
    }
    if share >= 1.0 || share.is_nan() || fits <= 0.0 {
        return None;
    }
    if share <= 0.0 {
        return Some(1);
    }
    let rounds = ((fits / dirty).ln() / share.ln()).ceil();
    // At most a few hundred: the ratio of two finite positive figures.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive count of rounds, bounded by the logs of finite byte counts"
    )]
    Some(rounds.max(1.0) as u64)
}

/// The controller's rule on a running migration's measured figures.
pub fn advise(m: &Measured) -> Advice {
    let share = m.dirty_rate_bps / m.bandwidth_bps.max(1.0);
    #[expect(
        clippy::cast_precision_loss,
        reason = "byte counts compared with a rate times seconds"
    )]
    let dirty = m.dirty_bytes as f64;
    let fits = m.bandwidth_bps * m.budget_s;
    let rates = format!(
        "the workload dirties {} against a measured link of {} ({:.0}%)",
        human_rate(m.dirty_rate_bps),
        human_rate(m.bandwidth_bps),
        100.0 * share
    );
    let needed = rounds_to_fit(dirty, fits, share);
    match needed {
        Some(0) => Advice {
            mode: Mode::PreCopy,
            why: format!(
                "{rates}; the {} delta fits the {:.0} ms pause",
                human_bytes(dirty),
                m.budget_s * 1e3
            ),
        },
        Some(n) if share < POSTCOPY_SHARE && n <= m.rounds_left => Advice {
            mode: Mode::PreCopy,
            why: format!(
                "{rates}; about {n} more round{} bring the {} delta within the {:.0} ms pause",
                if n == 1 { "" } else { "s" },
                human_bytes(dirty),
                m.budget_s * 1e3
            ),
        },
        Some(n) if n > m.rounds_left => Advice {
            mode: Mode::PostCopy,
            why: format!(
                "{rates}; pre-copy would need about {n} more rounds (the limit leaves {}) to fit the {:.0} ms pause",
                m.rounds_left,
                m.budget_s * 1e3
            ),
        },
        Some(_) => Advice {
            mode: Mode::PostCopy,
            why: format!(
                "{rates}, at least {:.0}% of it: each round leaves most of the last one's delta dirty again",
                100.0 * POSTCOPY_SHARE
            ),
        },
        None => Advice {
            mode: Mode::PostCopy,
            why: format!(
                "{rates}: pre-copy never brings the {} delta within the {:.0} ms pause",
                human_bytes(dirty),
                m.budget_s * 1e3
            ),
        },
    }
}

/// Whether compressing on the source pays, from the host's CPU profile:
/// zstd needs `link / ratio / per-core rate` cores to keep the link full;
/// it pays when the data shrinks and the cores the host left idle in 90 %
/// of its samples can compress faster than the link sends raw (taking no
/// CPU the workload used). `None` without a host profile.
pub fn compression(host: &CpuReport, model: &Model) -> Option<Compression> {
    let idle = host.idle_cores_p10?;
    let link = model.bandwidth * model.efficiency;
    let ratio = model.compression;
    let need = link / ratio.max(0.01) / model.compress_rate_per_core.max(1.0);
    let cores = format!(
        "{idle:.2} of the host's {} cores were idle in 90% of the samples; keeping the {} link full takes {need:.2} core",
        host.host_cpus.unwrap_or(0),
        human_rate(link),
    );
    let (compress, why) = if ratio >= 0.95 {
        (
            false,
            format!(
                "send raw: the data does not shrink (wire/payload {ratio:.2}, --compression); {cores}"
            ),
        )
    } else if idle * model.compress_rate_per_core > link {
        (
            true,
            format!("compress: the data shrinks to {ratio:.2} and {cores}"),
        )
    } else {
        (
            false,
            format!(
                "send raw: compressing would take CPU the workload uses ({cores}, and {idle:.2} core compresses only {})",
                human_rate(idle * model.compress_rate_per_core)
            ),
        )
    };
    Some(Compression { compress, why })
}

/// The workload's CPU use from which its dirtying is taken to follow its
/// CPU (a VM's vCPUs, a program computing what it writes): a CPU quota then
/// slows it where a write limit reaches only its own direct writes.
pub const CPU_BOUND_CORES: f64 = 0.5;

/// Which lever `--converge throttle` should pull, from the workload's CPU
/// profile (its cgroup or process, not the host).
pub fn throttle_lever(workload: &CpuReport) -> Lever {
    let busy = workload.p90_cores;
    if busy >= CPU_BOUND_CORES {
        Lever {
            by: "cpu",
            why: format!(
                "throttle by CPU: {} kept {busy:.2} cores busy in 90% of the samples (at least {CPU_BOUND_CORES}): its dirtying follows its CPU, which a quota slows, as QEMU's auto-converge slows vCPUs",
                workload.target
            ),
        }
    } else {
        Lever {
            by: "writes",
            why: format!(
                "throttle by writes: {} used at most {busy:.2} cores in 90% of the samples: its writes, not its CPU, are what to limit",
                workload.target
            ),
        }
    }
}

/// The controller's call on the throttle's lever.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lever {
    /// `writes` or `cpu` (`tern migrate --throttle-by`).
    pub by: &'static str,
    pub why: String,
}

/// The controller's call on compression.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Compression {
    pub compress: bool,
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(rate_mbs: f64, link_mbs: f64, dirty_mb: f64) -> Measured {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "test figures: whole megabytes"
        )]
        let dirty_bytes = (dirty_mb * 1e6) as u64;
        Measured {
            dirty_rate_bps: rate_mbs * 1e6,
            bandwidth_bps: link_mbs * 1e6,
            dirty_bytes,
            budget_s: 0.05,
            rounds_left: 28,
        }
    }

    #[test]
    fn a_light_writer_stays_in_pre_copy() {
        // 1000 IOPS of 4 KiB against 1 Gbit/s: 4 MB/s of 125.
        let a = advise(&measured(4.1, 125.0, 8.0));
        assert_eq!(a.mode, Mode::PreCopy, "{}", a.why);
        assert!(a.why.contains("3%"), "{}", a.why);
    }

    #[test]
    fn a_writer_near_the_link_goes_post_copy() {
        // 5000 IOPS of 4 KiB against scattered extents at 22 MB/s.
        let a = advise(&measured(20.5, 22.0, 40.0));
        assert_eq!(a.mode, Mode::PostCopy, "{}", a.why);
        let a = advise(&measured(30.0, 22.0, 40.0));
        assert_eq!(a.mode, Mode::PostCopy, "{}", a.why);
        assert!(a.why.contains("never"), "{}", a.why);
    }

    #[test]
    fn too_few_rounds_left_goes_post_copy() {
        let mut m = measured(40.0, 100.0, 500.0);
        // 0.4 per round: 500 MB to 5 MB takes ln(0.01)/ln(0.4) ≈ 5.03 → 6 rounds.
        assert_eq!(advise(&m).mode, Mode::PreCopy);
        m.rounds_left = 5;
        let a = advise(&m);
        assert_eq!(a.mode, Mode::PostCopy, "{}", a.why);
        assert!(a.why.contains("about 6 more rounds"), "{}", a.why);
    }

    fn host(cpus: u32, idle: f64) -> CpuReport {
        CpuReport {
            target: "host".into(),
            samples: 40,
            seconds: 10.0,
            mean_cores: f64::from(cpus) - idle,
            p50_cores: f64::from(cpus) - idle,
            p90_cores: f64::from(cpus) - idle,
            max_cores: f64::from(cpus),
            wait_share: Some(0.0),
            throttled_share: None,
            host_cpus: Some(cpus),
            idle_cores_p10: Some(idle),
        }
    }

    #[test]
    fn compression_pays_only_with_idle_cores_and_data_that_shrinks() {
        let model = Model {
            compression: 0.4,
            ..Model::default()
        };
        // 1 Gbit/s: 118.75 MB/s on the wire at 0.4 is 297 MB/s to compress,
        // 0.59 core at 500 MB/s.
        let c = compression(&host(2, 1.5), &model).expect("advice");
        assert!(c.compress, "{}", c.why);
        assert!(c.why.contains("0.59 core"), "{}", c.why);
        // A host the workload keeps busy: 0.1 core compresses 50 MB/s.
        let c = compression(&host(2, 0.1), &model).expect("advice");
        assert!(!c.compress, "{}", c.why);
        assert!(c.why.contains("CPU the workload uses"), "{}", c.why);
        // Data that does not shrink is sent raw whatever the CPU.
        let c = compression(&host(2, 2.0), &Model::default()).expect("advice");
        assert!(!c.compress, "{}", c.why);
        // No host profile, no advice.
        let mut h = host(2, 1.0);
        h.idle_cores_p10 = None;
        assert_eq!(compression(&h, &model), None);
    }

    #[test]
    fn a_cpu_bound_workload_is_throttled_by_its_cpu() {
        let mut w = host(4, 1.0);
        w.target = "cgroup:/sys/fs/cgroup/vm".into();
        w.host_cpus = None;
        w.p90_cores = 1.8;
        let l = throttle_lever(&w);
        assert_eq!(l.by, "cpu", "{}", l.why);
        w.p90_cores = 0.13;
        let l = throttle_lever(&w);
        assert_eq!(l.by, "writes", "{}", l.why);
        assert!(l.why.contains("cgroup:/sys/fs/cgroup/vm"), "{}", l.why);
    }

    #[test]
    fn rounds_to_fit_follows_the_geometric_shrink() {
        assert_eq!(rounds_to_fit(100.0, 100.0, 0.9), Some(0));
        assert_eq!(rounds_to_fit(100.0, 50.0, 0.5), Some(1));
        assert_eq!(rounds_to_fit(100.0, 24.0, 0.5), Some(3));
        assert_eq!(rounds_to_fit(100.0, 1.0, 1.0), None);
        assert_eq!(rounds_to_fit(100.0, 0.0, 0.5), None);
        assert_eq!(rounds_to_fit(100.0, 1.0, 0.0), Some(1));
    }
}
