//! The workload's CPU beside its I/O: CPU time used, time spent runnable
//! but waiting for a CPU (pressure), and time held back by a CPU limit, per
//! target (the host, a cgroup, a process), sampled from the kernel's own
//! counters a few times a second and written into the trace as deltas.
//!
//! Where the counters come from:
//! - the host: `/proc/stat` (busy time of all CPUs) and `/proc/pressure/cpu`
//!   (`some` stall time), when PSI is on;
//! - a cgroup v2 directory: its `cpu.stat` (`usage_usec`, `throttled_usec`)
//!   and `cpu.pressure`;
//! - a cgroup v1 directory (any hierarchy: the freezer a pause uses will
//!   do): its tasks' `/proc/<tid>/schedstat` (time on a CPU, time waiting
//!   on a run queue), and `cpu.stat`'s `throttled_time` in the cpu one;
//! - a process: its threads' `schedstat`.
//!
//! Task sums are kept per thread, so a thread that exits costs only its last
//! interval, never a jump backwards.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::record::CpuRecord;

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Errors of CPU sampling.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{input:?} is not a CPU target: {why} (give host, cgroup:DIR or pid:N)")]
    BadTarget { input: String, why: &'static str },
    #[error("cannot read the CPU counters of {target} from {path}: {source}")]
    Read {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} figure (is this kernel's {what} on?)")]
    Missing {
        path: PathBuf,
        field: &'static str,
        what: &'static str,
    },
    #[error("{0} CPU targets given; a trace holds at most 65536")]
    TooMany(usize),
}

/// Whose CPU is profiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuTarget {
    /// Every CPU of the machine.
    Host,
    /// A cgroup directory (v2, or any v1 hierarchy).
    Cgroup(PathBuf),
    /// A process and its threads.
    Pid(u32),
}

impl FromStr for CpuTarget {
    type Err = CpuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| CpuError::BadTarget {
            input: s.to_owned(),
            why,
        };
        if s == "host" {
            return Ok(CpuTarget::Host);
        }
        if let Some(pid) = s.strip_prefix("pid:") {
            return match pid.parse::<u32>() {
                Ok(p) if p > 0 => Ok(CpuTarget::Pid(p)),
                _ => Err(bad("pid: needs a process id")),
            };
        }
        if let Some(dir) = s.strip_prefix("cgroup:") {
            if !dir.starts_with('/') {
                return Err(bad("a cgroup directory must be an absolute path"));
            }
            return Ok(CpuTarget::Cgroup(PathBuf::from(dir)));
        }
        Err(bad("unknown kind"))
    }
}

impl CpuTarget {
    /// Whether its counters can be read now.
    pub fn readable(&self) -> bool {
        CpuSampler::new(std::slice::from_ref(self)).is_ok()
    }
}

impl fmt::Display for CpuTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuTarget::Host => f.write_str("host"),
            CpuTarget::Cgroup(dir) => write!(f, "cgroup:{}", dir.display()),
            CpuTarget::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}

/// Cumulative counters of one target, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    usage: u64,
    /// Runnable but not running (`None`: this kernel does not say).
    wait: Option<u64>,
    /// Held back by a CPU limit (`None`: no limit controller here).
    throttled: Option<u64>,
}

/// One target's reader, with what it needs between samples.
struct Sampled {
    target: CpuTarget,
    /// Per thread: (run, wait) at the last sample, for task-summed targets.
    tasks: HashMap<u32, (u64, u64)>,
    last: Option<Counters>,
}

/// Samples every target's counters and turns them into records.
pub struct CpuSampler {
    targets: Vec<Sampled>,
    last: Instant,
    /// Nanoseconds of a `/proc/stat` tick.
    tick_ns: u64,
}

impl CpuSampler {
    /// Checks that every target can be read now: a wrong directory or pid
    /// fails at the start, not as an empty profile.
    pub fn new(targets: &[CpuTarget]) -> Result<CpuSampler, CpuError> {
        if u16::try_from(targets.len()).is_err() {
            return Err(CpuError::TooMany(targets.len()));
        }
        let mut sampler = CpuSampler {
            targets: targets
                .iter()
                .map(|t| Sampled {
                    target: t.clone(),
                    tasks: HashMap::new(),
                    last: None,
                })
                .collect(),
            last: Instant::now(),
            tick_ns: tick_ns(),
        };
        let tick = sampler.tick_ns;
        for s in &mut sampler.targets {
            let now = s.read(tick)?;
            s.last = Some(now);
        }
        Ok(sampler)
    }

    /// Whether a sample is due.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= SAMPLE_EVERY
    }

    /// The records of the interval since the last sample, stamped `ts_ns`.
    /// A target that can no longer be read (a process that exited, a cgroup
    /// removed) is skipped, with a count for the log.
    pub fn sample(&mut self, ts_ns: u64) -> (Vec<CpuRecord>, u64) {
        let interval = u64::try_from(self.last.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last = Instant::now();
        let tick = self.tick_ns;
        let mut out = Vec::with_capacity(self.targets.len());
        let mut unreadable = 0;
        for (i, s) in self.targets.iter_mut().enumerate() {
            let Ok(now) = s.read(tick) else {
                unreadable += 1;
                continue;
            };
            let Some(was) = s.last.replace(now) else {
                continue;
            };
            let delta = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
            out.push(CpuRecord {
                ts_ns,
                target: u16::try_from(i).expect("checked at new: at most 65536 targets"),
                interval_ns: interval,
                usage_ns: now.usage.saturating_sub(was.usage),
                wait_ns: delta(now.wait, was.wait),
                throttled_ns: delta(now.throttled, was.throttled),
            });
        }
        (out, unreadable)
    }
}

impl Sampled {
    fn read(&mut self, tick_ns: u64) -> Result<Counters, CpuError> {
        match &self.target {
            CpuTarget::Host => read_host(tick_ns),
            CpuTarget::Cgroup(dir) if dir.join("cgroup.controllers").exists() => {
                read_cgroup_v2(dir, &self.target)
            }
            CpuTarget::Cgroup(dir) => {
                let dir = dir.clone();
                let tids = read_tids_v1(&dir, &self.target)?;
                let mut c = self.tasks_sum(&tids);
                c.throttled = read_field(&dir.join("cpu.stat"), "throttled_time").ok();
                Ok(c)
            }
            CpuTarget::Pid(pid) => {
                let dir = PathBuf::from(format!("/proc/{pid}/task"));
                let tids = read_tids_proc(&dir, &self.target)?;
                Ok(self.tasks_sum(&tids))
            }
        }
    }

    /// Running totals over threads: each thread adds what it ran (and
    /// waited) since it was last seen; threads gone are forgotten.
    fn tasks_sum(&mut self, tids: &[u32]) -> Counters {
        let base = self.last.unwrap_or_default();
        let (mut usage, mut wait) = (base.usage, base.wait.unwrap_or(0));
        let mut seen = HashMap::with_capacity(tids.len());
        for &tid in tids {
            // A thread that exited between the listing and the read: skip it.
            let Ok(text) = std::fs::read_to_string(format!("/proc/{tid}/schedstat")) else {
                continue;
            };
            let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
            let (Some(Ok(run)), Some(Ok(waited))) = (fields.next(), fields.next()) else {
                continue;
            };
            let (run0, wait0) = self.tasks.get(&tid).copied().unwrap_or((0, 0));
            if self.last.is_some() {
                usage = usage.saturating_add(run.saturating_sub(run0));
                wait = wait.saturating_add(waited.saturating_sub(wait0));
            }
            seen.insert(tid, (run, waited));
        }
        self.tasks = seen;
        Counters {
            usage,
            wait: Some(wait),
            throttled: None,
        }
    }
}

fn read(path: &Path, target: &str) -> Result<String, CpuError> {
    std::fs::read_to_string(path).map_err(|source| CpuError::Read {
        target: target.to_owned(),
        path: path.to_path_buf(),
        source,
    })
}

/// `name value` lines (`cpu.stat`): the value of `name`.
fn read_field(path: &Path, name: &'static str) -> Result<u64, CpuError> {
    let text = read(path, "cgroup")?;
    field(&text, name).ok_or(CpuError::Missing {
        path: path.to_path_buf(),
        field: name,
        what: "cgroup accounting",
    })
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// The `some` line's `total=` of a PSI file, in microseconds.
fn psi_some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_ascii_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))?
        .parse()
        .ok()
}

fn us_to_ns(us: u64) -> u64 {
    us.saturating_mul(1000)
}

fn read_host(tick_ns: u64) -> Result<Counters, CpuError> {
    let stat = Path::new("/proc/stat");
    let text = read(stat, "host")?;
    let busy = host_busy_ticks(&text).ok_or(CpuError::Missing {
        path: stat.to_path_buf(),
        field: "cpu",
        what: "procfs",
    })?;
    let wait = std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| psi_some_total(&t))
        .map(us_to_ns);
    Ok(Counters {
        usage: busy.saturating_mul(tick_ns),
        wait,
        throttled: None,
    })
}

/// Busy ticks of all CPUs: the first line of `/proc/stat` less idle and
/// iowait (guest time is already inside user time).
fn host_busy_ticks(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

fn read_cgroup_v2(dir: &Path, target: &CpuTarget) -> Result<Counters, CpuError> {
    let name = target.to_string();
    let stat_path = dir.join("cpu.stat");
    let stat = read(&stat_path, &name)?;
    let usage = field(&stat, "usage_usec").ok_or(CpuError::Missing {
        path: stat_path,
        field: "usage_usec",
        what: "cgroup v2 CPU accounting",
    })?;
    let wait = std::fs::read_to_string(dir.join("cpu.pressure"))
        .ok()
        .and_then(|t| psi_some_total(&t))
        .map(us_to_ns);
    Ok(Counters {
        usage: us_to_ns(usage),
        wait,
        throttled: field(&stat, "throttled_usec").map(us_to_ns),
    })
}

fn read_tids_v1(dir: &Path, target: &CpuTarget) -> Result<Vec<u32>, CpuError> {
    let text = read(&dir.join("tasks"), &target.to_string())?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn read_tids_proc(dir: &Path, target: &CpuTarget) -> Result<Vec<u32>, CpuError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CpuError::Read {
        target: target.to_string(),
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Nanoseconds per `/proc/stat` tick (`USER_HZ`).
fn tick_ns() -> u64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is shared.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match u64::try_from(hz) {
        Ok(hz) if hz > 0 => 1_000_000_000 / hz,
        // USER_HZ is 100 on every Linux ABI Tern runs on.
        _ => 10_000_000,
    }
}

/// The CPUs the host has online now.
pub fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for s in ["host", "cgroup:/sys/fs/cgroup/x", "pid:42"] {
            let t: CpuTarget = s.parse().expect("parses");
            assert_eq!(t.to_string(), s);
        }
        for bad in ["", "pid:0", "pid:x", "cgroup:rel/dir", "/sys/fs/cgroup"] {
            let e = bad.parse::<CpuTarget>().expect_err(bad);
            assert!(e.to_string().contains("host, cgroup:DIR or pid:N"), "{e}");
        }
    }

    #[test]
    fn kernel_text_is_read_as_documented() {
        let stat = "cpu  10 2 30 400 50 6 7 8 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(host_busy_ticks(stat), Some(10 + 2 + 30 + 6 + 7 + 8));
        let psi = "some avg10=1.85 avg60=5.44 avg300=4.93 total=1466618684\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(psi_some_total(psi), Some(1_466_618_684));
        let cpu_stat = "usage_usec 11968302438\nuser_usec 10123697105\nthrottled_usec 17\n";
        assert_eq!(field(cpu_stat, "usage_usec"), Some(11_968_302_438));
        assert_eq!(field(cpu_stat, "throttled_usec"), Some(17));
        assert_eq!(field(cpu_stat, "nr_periods"), None);
    }

    /// This thread's CPU time so far, as the scheduler counts it.
    fn thread_cpu_ns() -> u64 {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
        text.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("schedstat starts with the time on CPU in ns")
    }

    /// A thread that spins for a while is seen using at least that much CPU.
    #[test]
    fn a_spinning_thread_shows_its_cpu_time() {
        let pid = std::process::id();
        let mut sampler =
            CpuSampler::new(&[CpuTarget::Pid(pid), CpuTarget::Host]).expect("sampler");
        // Spin for 350 ms of this thread's own CPU time, not of the clock's:
        // on a busy machine a 300 ms wall-clock spin got less than 200 ms of
        // CPU (3 failures in 8 suite runs). The host's figure is in clock
        // ticks, hence the margin below.
        let from = thread_cpu_ns();
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut x = 0u64;
        while thread_cpu_ns() - from < 350_000_000 {
            assert!(Instant::now() < deadline, "no 350 ms of CPU in a minute");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let (records, unreadable) = sampler.sample(1);
        assert_eq!(unreadable, 0);
        assert_eq!(records.len(), 2);
        let me = &records[0];
        // Other tests' threads run in this process too: at least the spin.
        assert!(
            me.usage_ns >= 350_000_000,
            "a spin of 350 ms on CPU shows {} ns",
            me.usage_ns
        );
        assert!(me.wait_ns.is_some());
        assert!(records[1].usage_ns >= 300_000_000, "{:?}", records[1]);
    }

    #[test]
    fn an_unreadable_target_is_refused_at_the_start() {
        let e = CpuSampler::new(&[CpuTarget::Cgroup("/nonexistent/cgroup".into())])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("/nonexistent/cgroup"), "{e}");
    }
}
