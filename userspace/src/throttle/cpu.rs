//! Slowing a workload by its CPU instead of its writes (QEMU's
//! auto-converge throttles the vCPUs the same way): a CPU quota on the
//! workload's cgroup, for a writer whose dirtying follows its CPU (a VM, a
//! program that computes what it writes) and whose writes a block limit
//! would not reach (page-cache write-back under cgroup v1).
//!
//! Two kernel interfaces: cgroup v2's `cpu.max` (`QUOTA PERIOD`, `max` for
//! none) and the v1 cpu hierarchy's `cpu.cfs_quota_us` (`-1` for none) with
//! `cpu.cfs_period_us`. The quota before ours is put back when lifted, and a
//! record file makes a killed run's quota undone by the next one, as for the
//! write limit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CgroupSpec, ThrottleError, is_root_cgroup, read, remove_record};
use crate::trace::cpu::{CpuSampler, CpuTarget};

/// The kernel interface of a cgroup's CPU quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum CpuInterface {
    /// cgroup v2 `cpu.max`.
    V2,
    /// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`.
    V1,
}

impl CpuInterface {
    fn of(dir: &Path) -> Option<CpuInterface> {
        if dir.join("cpu.max").is_file() {
            Some(Self::V2)
        } else if dir.join("cpu.cfs_quota_us").is_file() {
            Some(Self::V1)
        } else {
            None
        }
    }
}

/// What is recorded while a quota is on, to undo it after a kill.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct CpuRecord {
    cgroup: PathBuf,
    cpu_interface: CpuInterface,
    period_us: u64,
    /// The quota before ours, µs per period (`None`: there was none).
    previous_quota_us: Option<u64>,
    pid: u32,
}

impl CpuRecord {
    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Puts the recorded quota back (a cgroup gone with its workload has
    /// nothing left to undo).
    pub(super) fn undo(&self) -> Result<(), ThrottleError> {
        if !self.cgroup.is_dir() {
            return Ok(());
        }
        write_quota(
            &self.cgroup,
            self.cpu_interface,
            self.period_us,
            self.previous_quota_us,
        )?;
        tracing::warn!(
            cgroup = %self.cgroup.display(),
            "an earlier migration was stopped with the workload's CPU throttled: its quota is lifted now"
        );
        Ok(())
    }
}

/// A CPU quota on one cgroup, lifted when dropped.
pub struct CpuThrottle {
    cgroup: PathBuf,
    iface: CpuInterface,
    period_us: u64,
    previous: Option<u64>,
    current: Option<u64>,
    record: Option<PathBuf>,
    released: bool,
    since: Option<Instant>,
    throttled: Duration,
    /// The cgroup's CPU use, for its rate.
    usage: CpuSampler,
}

impl std::fmt::Debug for CpuThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuThrottle")
            .field("cgroup", &self.cgroup)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl CpuThrottle {
    /// Resolves the cgroup and reads the quota already there; sets nothing
    /// yet. With a `record` path, first undoes what a killed run left on.
    pub fn new(spec: &CgroupSpec, record: Option<&Path>) -> Result<CpuThrottle, ThrottleError> {
        if let Some(path) = record {
            super::undo_recorded(path)?;
        }
        let (cgroup, iface) = match spec {
            CgroupSpec::Dir(dir) => {
                if is_root_cgroup(dir) {
                    return Err(ThrottleError::RootCgroup {
                        cgroup: dir.clone(),
                    });
                }
                let iface =
                    CpuInterface::of(dir).ok_or_else(|| ThrottleError::NoCpuController {
                        cgroup: dir.clone(),
                    })?;
                (dir.clone(), iface)
            }
            CgroupSpec::Pid(pid) => cpu_cgroup_of(*pid)?,
        };
        let (previous, period_us) = read_quota(&cgroup, iface)?;
        let usage = CpuSampler::new(&[CpuTarget::Cgroup(cgroup.clone())])
            .map_err(|source| ThrottleError::Usage(Box::new(source)))?;
        Ok(CpuThrottle {
            cgroup,
            iface,
            period_us,
            previous,
            current: None,
            record: record.map(Path::to_path_buf),
            released: false,
            since: None,
            throttled: Duration::ZERO,
            usage,
        })
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The quota Tern set, in cores (1.0: one CPU's worth per period).
    pub fn current_cores(&self) -> Option<f64> {
        self.current.map(|q| self.cores(q))
    }

    #[expect(
        clippy::cast_precision_loss,
        reason = "microseconds of a period, as a fraction"
    )]
    fn cores(&self, quota_us: u64) -> f64 {
        quota_us as f64 / self.period_us.max(1) as f64
    }

    /// How long quotas of Tern's were on, in all.
    pub fn throttled_for(&self) -> Duration {
        self.throttled + self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Cores the cgroup used since the last call (or since `new`).
    pub fn usage_cores(&mut self) -> Option<f64> {
        let (records, _) = self.usage.sample(0);
        let r = records.first()?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "nanoseconds as a ratio: precision is irrelevant"
        )]
        let cores = r.usage_ns as f64 / r.interval_ns.max(1) as f64;
        Some(cores)
    }

    /// Caps the cgroup at `cores` (never above a quota already there: that
    /// one still holds). Returns the quota now on, in cores, or `None` when
    /// it was already that one.
    pub fn limit(&mut self, cores: f64) -> Result<Option<f64>, ThrottleError> {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a positive fraction of a period in µs; `as` saturates"
        )]
        let quota = (cores.max(0.0) * self.period_us as f64) as u64;
        // The kernel's smallest quota is 1 ms.
        let quota = self.previous.map_or(quota, |p| quota.min(p)).max(1000);
        if self.current == Some(quota) {
            return Ok(None);
        }
        let first = self.current.is_none() && !self.released;
        if let (Some(path), true) = (&self.record, first) {
            let record = CpuRecord {
                cgroup: self.cgroup.clone(),
                cpu_interface: self.iface,
                period_us: self.period_us,
                previous_quota_us: self.previous,
                pid: std::process::id(),
            };
            super::write_record(path, &record)?;
        }
        if let Err(e) = write_quota(&self.cgroup, self.iface, self.period_us, Some(quota)) {
            if let (Some(path), true) = (&self.record, first) {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        self.current = Some(quota);
        self.released = false;
        self.since.get_or_insert_with(Instant::now);
        Ok(Some(self.cores(quota)))
    }

    /// Removes every quota (an operator's too) while the workload pauses;
    /// [`lift`](Self::lift) puts the operator's back.
    pub fn release(&mut self) -> Result<bool, ThrottleError> {
        if self.current.is_none() {
            return Ok(false);
        }
        write_quota(&self.cgroup, self.iface, self.period_us, None)?;
        self.current = None;
        self.released = true;
        if let Some(since) = self.since.take() {
            self.throttled += since.elapsed();
        }
        Ok(true)
    }

    /// Puts back the quota that was there before and removes the record.
    pub fn lift(&mut self) -> Result<(), ThrottleError> {
        if self.current.is_none() && !self.released {
            return Ok(());
        }
        write_quota(&self.cgroup, self.iface, self.period_us, self.previous)?;
        self.current = None;
        self.released = false;
        if let Some(since) = self.since.take() {
            self.throttled += since.elapsed();
        }
        if let Some(path) = &self.record {
            remove_record(path)?;
        }
        Ok(())
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        if let Err(e) = self.lift() {
            tracing::error!(
                error = %e,
                cgroup = %self.cgroup.display(),
                "cannot lift the CPU quota: the workload stays slowed until its quota is reset by hand"
            );
        }
    }
}

/// The quota (µs per period, `None`: none) and the period (µs).
fn read_quota(cgroup: &Path, iface: CpuInterface) -> Result<(Option<u64>, u64), ThrottleError> {
    let bad = |path: PathBuf, content: String| ThrottleError::Format { path, content };
    match iface {
        CpuInterface::V2 => {
            let path = cgroup.join("cpu.max");
            let text = read(&path, "read")?;
            parse_cpu_max(&text).ok_or_else(|| bad(path, text))
        }
        CpuInterface::V1 => {
            let path = cgroup.join("cpu.cfs_quota_us");
            let text = read(&path, "read")?;
            let quota = match text.trim().parse::<i64>() {
                Ok(-1) => None,
                Ok(q) => Some(u64::try_from(q).map_err(|_| bad(path.clone(), text.clone()))?),
                Err(_) => return Err(bad(path, text)),
            };
            let path = cgroup.join("cpu.cfs_period_us");
            let text = read(&path, "read")?;
            let period = text.trim().parse().map_err(|_| bad(path, text.clone()))?;
            Ok((quota, period))
        }
    }
}

/// `cpu.max`: `max 100000` or `50000 100000`.
fn parse_cpu_max(text: &str) -> Option<(Option<u64>, u64)> {
    let mut f = text.split_whitespace();
    let quota = match f.next()? {
        "max" => None,
        q => Some(q.parse().ok()?),
    };
    Some((quota, f.next()?.parse().ok()?))
}

fn write_quota(
    cgroup: &Path,
    iface: CpuInterface,
    period_us: u64,
    quota_us: Option<u64>,
) -> Result<(), ThrottleError> {
    let (file, text) = match (iface, quota_us) {
        (CpuInterface::V2, Some(q)) => ("cpu.max", format!("{q} {period_us}")),
        (CpuInterface::V2, None) => ("cpu.max", format!("max {period_us}")),
        (CpuInterface::V1, Some(q)) => ("cpu.cfs_quota_us", q.to_string()),
        (CpuInterface::V1, None) => ("cpu.cfs_quota_us", "-1".to_owned()),
    };
    let path = cgroup.join(file);
    std::fs::write(&path, text).map_err(|source| ThrottleError::Io {
        action: "set the CPU quota in",
        path,
        source,
    })
}

/// The cgroup of `pid` that carries a CPU quota: its v2 cgroup when that
/// has `cpu.max`, else its v1 cpu cgroup.
fn cpu_cgroup_of(pid: u32) -> Result<(PathBuf, CpuInterface), ThrottleError> {
    super::cgroup_with(pid, "cpu", "CPU quota", CpuInterface::of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_read_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_max("max 100000\n"), Some((None, 100_000)));
        assert_eq!(
            parse_cpu_max("50000 100000\n"),
            Some((Some(50_000), 100_000))
        );
        assert_eq!(parse_cpu_max("x 1"), None);
        assert_eq!(parse_cpu_max("max"), None);
    }

    /// A v1 cpu cgroup of its own: a quota set, lowered, lifted back to the
    /// operator's, and a killed run's undone from its record.
    #[test]
    fn a_quota_is_set_and_the_operators_put_back() {
        // This host mounts the v1 cpu hierarchy (shared/TOOLCHAIN.md).
        let root = Path::new("/sys/fs/cgroup/cpu");
        let dir = root.join(format!("tern-quota-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cgroup");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "80000").expect("operator's quota");
        let state = tempfile::tempdir().expect("dir");
        let record = state.path().join("throttle.json");
        let spec = CgroupSpec::Dir(dir.clone());
        let mut t = CpuThrottle::new(&spec, Some(&record)).expect("throttle");
        let quota = || {
            std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .expect("quota")
                .trim()
                .to_owned()
        };
        // Above the operator's 0.8 core: the operator's holds.
        assert_eq!(t.limit(2.0).expect("limit"), Some(0.8));
        assert_eq!(t.limit(0.25).expect("limit"), Some(0.25));
        assert_eq!(quota(), "25000");
        assert!(record.exists());
        t.lift().expect("lift");
        assert_eq!(quota(), "80000");
        assert!(!record.exists());
        // A run that dies with its quota on: the next one undoes it.
        t.limit(0.1).expect("limit");
        std::mem::forget(t);
        // The record names this (live) process: pretend it died.
        let text = std::fs::read_to_string(&record).expect("record");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["pid"] = serde_json::json!(u32::MAX);
        std::fs::write(&record, v.to_string()).expect("record");
        assert_eq!(quota(), "10000");
        super::super::undo_recorded(&record).expect("undo");
        assert_eq!(quota(), "80000");
        assert!(!record.exists());
        // Another disk's run dies throttled; the next run, of this disk,
        // finds its record beside its own name and undoes it too.
        let mut t = CpuThrottle::new(&spec, Some(&record)).expect("throttle");
        t.limit(0.1).expect("limit");
        std::mem::forget(t);
        let text = std::fs::read_to_string(&record).expect("record");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["pid"] = serde_json::json!(u32::MAX);
        std::fs::remove_file(&record).expect("move the record");
        let other = state.path().join("dev-vdz.throttle.json");
        std::fs::write(&other, v.to_string()).expect("record");
        assert_eq!(quota(), "10000");
        super::super::undo_dead_records_beside(&state.path().join("dev-vdb.throttle.json"))
            .expect("undo");
        assert_eq!(quota(), "80000");
        assert!(!other.exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
