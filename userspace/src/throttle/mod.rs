//! Slowing a workload's writes so that a pre-copy converges (QEMU's
//! auto-converge and dirty-limit are the peers): a write-bandwidth limit on
//! the workload's cgroup for the disk its writes land on, set and lowered
//! while the delta rounds fail to shrink, lifted at the pause and on every
//! exit path, the limit that was there before put back.
//!
//! Two kernel interfaces: cgroup v2's `io.max` (`MAJ:MIN wbps=N`) and, on
//! hosts that still mount the v1 blkio hierarchy (it then owns the io
//! controller), `blkio.throttle.write_bps_device` (`MAJ:MIN N`, 0 removes).
//! Both take a whole disk, so a partition's limit goes to its disk; for an
//! image file, to the disk of the file system that holds it. v1 throttles
//! only the writes a task submits itself (direct or synchronous I/O): its
//! page-cache write-back is not charged to the cgroup.
//!
//! A limit is written to a record file before it is set and the record is
//! removed once the limit is lifted, so that a migration killed with the
//! limit on (SIGKILL runs no destructor) is undone by the next one.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

pub mod cpu;

/// Errors of throttling a workload.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Not `DIR` or `pid:N`.
    #[error(
        "bad cgroup {input:?}: {why}; give a cgroup directory (e.g. /sys/fs/cgroup/vm) or pid:N"
    )]
    BadSpec { input: String, why: &'static str },
    /// The directory has neither interface.
    #[error(
        "{cgroup} has no io.max (cgroup v2 io controller) nor blkio.throttle.write_bps_device (cgroup v1 blkio): enable the io controller in its parent's cgroup.subtree_control, or give the writer's blkio cgroup"
    )]
    NoController { cgroup: PathBuf },
    /// The directory has no CPU quota interface.
    #[error(
        "{cgroup} has no cpu.max (cgroup v2 cpu controller) nor cpu.cfs_quota_us (cgroup v1 cpu): enable the cpu controller in its parent's cgroup.subtree_control, or give the workload's v1 cpu cgroup"
    )]
    NoCpuController { cgroup: PathBuf },
    /// The cgroup's CPU use cannot be read.
    #[error("cannot read the workload's CPU use")]
    Usage(#[source] Box<crate::trace::cpu::CpuError>),
    /// The root cgroup: limiting it slows every process on the host.
    #[error(
        "{cgroup} is a root cgroup: a limit there slows the whole host; move the workload into its own cgroup"
    )]
    RootCgroup { cgroup: PathBuf },
    /// No cgroup of the process has a write limit interface.
    #[error(
        "process {pid} is in no cgroup with a write limit ({why}); move it into its own cgroup (v2 with the io controller, or v1 blkio)"
    )]
    NoCgroupOf { pid: u32, why: String },
    /// The source is not on a block device (tmpfs, overlay, a network file system).
    #[error(
        "{path} is not on a block device (device {major}:{minor}): a write limit needs the disk the writes land on"
    )]
    NoBlockDevice {
        path: PathBuf,
        major: u32,
        minor: u32,
    },
    /// The block device's sysfs entries cannot be read.
    #[error(transparent)]
    Device(#[from] crate::trace::device::DeviceError),
    /// Reading or writing a cgroup, sysfs or record file.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cgroup file that is not in the kernel's documented format.
    #[error("unexpected content in {path}: {content:?}")]
    Format { path: PathBuf, content: String },
    /// An earlier, stopped run's limit that cannot be undone.
    #[error(
        "cannot undo the write limit an earlier, stopped migration recorded in {record}: check the cgroup's limit by hand, then remove that file"
    )]
    Undo {
        record: PathBuf,
        #[source]
        source: Box<ThrottleError>,
    },
    /// A record of an earlier limit that cannot be read back.
    #[error(
        "the throttle record {path} is not one Tern wrote; remove it after checking the cgroup's limit by hand"
    )]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Which cgroup to throttle, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSpec {
    /// A cgroup directory (v2, or v1 blkio).
    Dir(PathBuf),
    /// The cgroup a process is in, looked up when the migration starts.
    Pid(u32),
}

impl FromStr for CgroupSpec {
    type Err = ThrottleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ThrottleError::BadSpec {
            input: s.to_owned(),
            why,
        };
        if let Some(pid) = s.strip_prefix("pid:") {
            return match pid.parse::<u32>() {
                Ok(p) if p > 0 => Ok(Self::Pid(p)),
                _ => Err(bad("pid: needs a process id")),
            };
        }
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if !s.starts_with('/') {
            return Err(bad("a cgroup directory must be an absolute path"));
        }
        Ok(Self::Dir(PathBuf::from(s)))
    }
}

impl fmt::Display for CgroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(d) => write!(f, "{}", d.display()),
            Self::Pid(p) => write!(f, "pid:{p}"),
        }
    }
}

/// The kernel interface of a cgroup's write limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Interface {
    /// cgroup v2 `io.max`.
    V2,
    /// cgroup v1 `blkio.throttle.write_bps_device`.
    V1,
}

impl Interface {
    fn of(dir: &Path) -> Option<Interface> {
        if dir.join("io.max").is_file() {
            Some(Self::V2)
        } else if dir.join("blkio.throttle.write_bps_device").is_file() {
            Some(Self::V1)
        } else {
            None
        }
    }

    fn limit_file(self) -> &'static str {
        match self {
            Self::V2 => "io.max",
            Self::V1 => "blkio.throttle.write_bps_device",
        }
    }

    /// The line that sets (`Some`) or removes (`None`) the write limit.
    fn setting(self, device: &str, bps: Option<u64>) -> String {
        match (self, bps) {
            (Self::V2, Some(b)) => format!("{device} wbps={b}"),
            (Self::V2, None) => format!("{device} wbps=max"),
            (Self::V1, Some(b)) => format!("{device} {b}"),
            (Self::V1, None) => format!("{device} 0"),
        }
    }
}

/// The write limit for `device` in the text of a limit file; `None` when
/// there is none. `Err(())` when the text is not the kernel's format.
fn parse_limit(iface: Interface, text: &str, device: &str) -> Result<Option<u64>, ()> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(device) {
            continue;
        }
        return match iface {
            Interface::V1 => match fields.next().map(str::parse::<u64>) {
                Some(Ok(0)) => Ok(None),
                Some(Ok(b)) => Ok(Some(b)),
                _ => Err(()),
            },
            Interface::V2 => {
                let wbps = fields.find_map(|f| f.strip_prefix("wbps=")).ok_or(())?;
                match wbps {
                    "max" => Ok(None),
                    n => n.parse().map(Some).map_err(|_| ()),
                }
            }
        };
    }
    Ok(None)
}

/// Bytes written to `device` in the text of a cgroup's statistics (`io.stat`
/// for v2, `blkio.throttle.io_service_bytes` for v1); 0 when not listed.
fn parse_written(iface: Interface, text: &str, device: &str) -> Option<u64> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(device) {
            continue;
        }
        match iface {
            Interface::V2 => {
                return fields.find_map(|f| f.strip_prefix("wbytes="))?.parse().ok();
            }
            Interface::V1 => {
                if fields.next() == Some("Write") {
                    return fields.next()?.parse().ok();
                }
            }
        }
    }
    Some(0)
}

/// What is recorded while a limit is on, to undo it after a kill.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    cgroup: PathBuf,
    interface: Interface,
    device: String,
    /// The limit before ours (`None`: there was none).
    previous: Option<u64>,
    /// The run that set it: a live one's limit is not undone.
    pid: u32,
}

/// Either record (a write limit's has a device, a CPU quota's a period).
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum AnyRecord {
    Write(Record),
    Cpu(cpu::CpuRecord),
}

/// A write-bandwidth limit on one cgroup for one disk, lifted when dropped.
#[derive(Debug)]
pub struct WriteThrottle {
    cgroup: PathBuf,
    iface: Interface,
    /// `MAJ:MIN` of the whole disk.
    device: String,
    previous: Option<u64>,
    current: Option<u64>,
    record: Option<PathBuf>,
    /// Every limit is off for now (an operator's too); `lift` puts it back.
    released: bool,
    since: Option<Instant>,
    throttled: Duration,
}

impl WriteThrottle {
    /// Resolves the cgroup and the disk under `source` (a block device or an
    /// image file) and reads the limit already there; sets nothing yet.
    /// With a `record` path, first undoes a limit an earlier, killed
    /// migration left on (and says so).
    pub fn new(
        spec: &CgroupSpec,
        source: &Path,
        record: Option<&Path>,
    ) -> Result<WriteThrottle, ThrottleError> {
        if let Some(path) = record {
            undo_recorded(path)?;
        }
        let (cgroup, iface) = match spec {
            CgroupSpec::Dir(dir) => {
                // First: a v2 root has no io.max, and "no controller" would mislead.
                if is_root_cgroup(dir) {
                    return Err(ThrottleError::RootCgroup {
                        cgroup: dir.clone(),
                    });
                }
                let iface = Interface::of(dir).ok_or_else(|| ThrottleError::NoController {
                    cgroup: dir.clone(),
                })?;
                (dir.clone(), iface)
            }
            CgroupSpec::Pid(pid) => cgroup_of(*pid)?,
        };
        let device = whole_disk_of(source)?;
        let file = cgroup.join(iface.limit_file());
        let text = read(&file, "read")?;
        let previous = parse_limit(iface, &text, &device).map_err(|()| ThrottleError::Format {
            path: file,
            content: text,
        })?;
        Ok(WriteThrottle {
            cgroup,
            iface,
            device,
            previous,
            current: None,
            record: record.map(Path::to_path_buf),
            released: false,
            since: None,
            throttled: Duration::ZERO,
        })
    }

    /// The cgroup directory.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// `MAJ:MIN` of the disk the limit is on.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The limit Tern set, if one is on.
    pub fn current(&self) -> Option<u64> {
        self.current
    }

    /// How long limits of Tern's were on, in all.
    pub fn throttled_for(&self) -> Duration {
        self.throttled + self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Limits the cgroup's writes to the disk to `bps` bytes per second
    /// (never above a limit that was already there: that one still holds).
    /// Returns the limit now on, or `None` when it was already that one.
    pub fn limit(&mut self, bps: u64) -> Result<Option<u64>, ThrottleError> {
        let bps = self.previous.map_or(bps, |p| bps.min(p)).max(1);
        if self.current == Some(bps) {
            return Ok(None);
        }
        let first = self.current.is_none() && !self.released;
        if let (Some(path), true) = (&self.record, first) {
            let record = Record {
                cgroup: self.cgroup.clone(),
                interface: self.iface,
                device: self.device.clone(),
                previous: self.previous,
                pid: std::process::id(),
            };
            write_record(path, &record)?;
        }
        if let Err(e) = write_setting(&self.cgroup, self.iface, &self.device, Some(bps)) {
            if let (Some(path), true) = (&self.record, first) {
                // Nothing was set: nothing for a later run to undo.
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        self.current = Some(bps);
        self.released = false;
        self.since.get_or_insert_with(Instant::now);
        Ok(Some(bps))
    }

    /// Removes every write limit (an operator's too) for as long as the
    /// writes the throttle holds need to go out; [`lift`](Self::lift) puts
    /// the operator's back. A no-op when no limit of ours is on.
    pub fn release(&mut self) -> Result<bool, ThrottleError> {
        if self.current.is_none() {
            return Ok(false);
        }
        write_setting(&self.cgroup, self.iface, &self.device, None)?;
        self.current = None;
        self.released = true;
        if let Some(since) = self.since.take() {
            self.throttled += since.elapsed();
        }
        Ok(true)
    }

    /// Puts back the limit that was there before (none, or the operator's)
    /// and removes the record.
    pub fn lift(&mut self) -> Result<(), ThrottleError> {
        if self.current.is_none() && !self.released {
            return Ok(());
        }
        write_setting(&self.cgroup, self.iface, &self.device, self.previous)?;
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

    /// Bytes the cgroup has written to the disk (its kernel statistics), for
    /// the writer's own rate; `None` when the kernel does not say.
    pub fn written_bytes(&self) -> Option<u64> {
        let file = self.cgroup.join(match self.iface {
            Interface::V2 => "io.stat",
            Interface::V1 => "blkio.throttle.io_service_bytes",
        });
        let text = std::fs::read_to_string(file).ok()?;
        parse_written(self.iface, &text, &self.device)
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        if let Err(e) = self.lift() {
            tracing::error!(
                error = %e,
                cgroup = %self.cgroup.display(),
                device = %self.device,
                "cannot lift the write limit: the workload stays slowed until its limit is reset by hand"
            );
        }
    }
}

fn read(path: &Path, action: &'static str) -> Result<String, ThrottleError> {
    std::fs::read_to_string(path).map_err(|source| ThrottleError::Io {
        action,
        path: path.to_path_buf(),
        source,
    })
}

fn write_setting(
    cgroup: &Path,
    iface: Interface,
    device: &str,
    bps: Option<u64>,
) -> Result<(), ThrottleError> {
    let path = cgroup.join(iface.limit_file());
    std::fs::write(&path, iface.setting(device, bps)).map_err(|source| ThrottleError::Io {
        action: "set the write limit in",
        path,
        source,
    })
}

fn remove_record(path: &Path) -> Result<(), ThrottleError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ThrottleError::Io {
            action: "remove the throttle record",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Writes `record` to `path` whole or not at all (a kill between a
/// truncation and a write would leave a record no run can read).
fn write_record(path: &Path, record: &impl serde::Serialize) -> Result<(), ThrottleError> {
    let json =
        serde_json::to_vec(record).expect("a record of paths, strings and numbers serializes");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| ThrottleError::Io {
            action: "write the throttle record",
            path: path.to_path_buf(),
            source,
        })
}

/// How a throttle record's file name ends (`NAME.throttle.json`).
pub const RECORD_SUFFIX: &str = ".throttle.json";

/// Undoes every limit a killed run left recorded beside `record` (the
/// records of other disks' runs in the same state directory, and the one
/// name every run used before records were named per disk): a workload must
/// not stay slowed because the next run there migrates another disk.
pub fn undo_dead_records_beside(record: &Path) -> Result<(), ThrottleError> {
    let Some(dir) = record.parent() else {
        return Ok(());
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ThrottleError::Io {
                action: "list the throttle records",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path == record {
            // This run's own record: a failure to undo it stops the run.
            undo_recorded(&path)?;
        } else if name == "throttle.json" || name.ends_with(RECORD_SUFFIX) {
            // Another run's: one damaged record must not stop every run here.
            if let Err(e) = undo_recorded(&path) {
                tracing::warn!(record = %path.display(), error = %e, "cannot undo another run's throttle record; left as it is");
            }
        }
    }
    Ok(())
}

/// Undoes the limit a killed migration recorded at `path`, if any (not one
/// a migration still running holds).
pub fn undo_recorded(path: &Path) -> Result<(), ThrottleError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ThrottleError::Io {
                action: "read the throttle record",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let record: AnyRecord =
        serde_json::from_slice(&bytes).map_err(|source| ThrottleError::Record {
            path: path.to_path_buf(),
            source,
        })?;
    let pid = match &record {
        AnyRecord::Write(r) => r.pid,
        AnyRecord::Cpu(r) => r.pid(),
    };
    if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
        tracing::warn!(
            record = %path.display(),
            pid,
            "another running migration throttles a workload with this state directory; its limit is left to it"
        );
        return Ok(());
    }
    let record = match record {
        AnyRecord::Write(r) => r,
        AnyRecord::Cpu(r) => {
            r.undo().map_err(|e| ThrottleError::Undo {
                record: path.to_path_buf(),
                source: Box::new(e),
            })?;
            return remove_record(path);
        }
    };
    // The cgroup may be gone with its workload, the disk detached: nothing
    // left to undo.
    if record.cgroup.is_dir() {
        let undone = write_setting(
            &record.cgroup,
            record.interface,
            &record.device,
            record.previous,
        );
        match undone {
            Ok(()) => tracing::warn!(
                cgroup = %record.cgroup.display(),
                device = %record.device,
                "an earlier migration was stopped with the workload's writes throttled: its limit is lifted now"
            ),
            Err(ThrottleError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV)
                    || source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ThrottleError::Undo {
                    record: path.to_path_buf(),
                    source: Box::new(e),
                });
            }
        }
    }
    remove_record(path)
}

/// A cgroup mount's root: its directory is the mount point itself.
fn is_root_cgroup(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    cgroup_mounts().iter().any(|m| m.point == dir)
}

/// A cgroup file system as mounted here.
struct CgroupMount {
    point: PathBuf,
    /// `None` for cgroup2; the v1 controllers otherwise.
    controllers: Option<Vec<String>>,
}

fn cgroup_mounts() -> Vec<CgroupMount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or("");
            let controllers = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(options.split(',').map(str::to_owned).collect()),
                _ => return None,
            };
            Some(CgroupMount {
                point: PathBuf::from(point.replace("\\040", " ")),
                controllers,
            })
        })
        .collect()
}

/// The cgroup of `pid` that carries a write limit: its v2 cgroup when that
/// has `io.max`, else its v1 blkio cgroup.
fn cgroup_of(pid: u32) -> Result<(PathBuf, Interface), ThrottleError> {
    cgroup_with(pid, "blkio", "write limit", Interface::of)
}

/// The cgroup of `pid` whose directory `probe` finds a limit's interface
/// in: its v2 cgroup, else its cgroup in the v1 hierarchy of `controller`
/// (never a hierarchy's root, which would limit the whole host).
fn cgroup_with<I>(
    pid: u32,
    controller: &str,
    limit: &str,
    probe: impl Fn(&Path) -> Option<I>,
) -> Result<(PathBuf, I), ThrottleError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&file).map_err(|e| ThrottleError::NoCgroupOf {
        pid,
        why: format!("{}: {e}", file.display()),
    })?;
    let mounts = cgroup_mounts();
    let mut tried = Vec::new();
    // Lines are `ID:CONTROLLERS:PATH`; v2's is `0::PATH`.
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mount = mounts.iter().find(|m| match &m.controllers {
            None => controllers.is_empty(),
            Some(c) => {
                !controllers.is_empty()
                    && c.iter().any(|o| o == controller)
                    && controllers.split(',').any(|x| x == controller)
            }
        });
        let Some(mount) = mount else { continue };
        let dir = mount.point.join(path.trim_start_matches('/'));
        match probe(&dir) {
            Some(_) if dir == mount.point => tried.push(format!("{} is the root", dir.display())),
            Some(iface) => return Ok((dir, iface)),
            None => tried.push(format!("{} has no {limit}", dir.display())),
        }
    }
    Err(ThrottleError::NoCgroupOf {
        pid,
        why: if tried.is_empty() {
            format!("no cgroup2 or v1 {controller} mount holds it")
        } else {
            tried.join("; ")
        },
    })
}

/// `MAJ:MIN` of the whole disk that `source` (a block device, or a file on
/// a file system) writes land on.
fn whole_disk_of(source: &Path) -> Result<String, ThrottleError> {
    let meta = std::fs::metadata(source).map_err(|e| ThrottleError::Io {
        action: "stat",
        path: source.to_path_buf(),
        source: e,
    })?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if !crate::trace::device::sysfs_dir(major, minor).exists() {
        return Err(ThrottleError::NoBlockDevice {
            path: source.to_path_buf(),
            major,
            minor,
        });
    }
    // The tracer's resolution: a partition's limit goes to its whole disk.
    let disk = crate::trace::device::BlockDevice::from_numbers(major, minor)?;
    Ok(format!("{}:{}", disk.disk_major, disk.disk_minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "/sys/fs/cgroup/vm".parse::<CgroupSpec>().expect("dir"),
            CgroupSpec::Dir("/sys/fs/cgroup/vm".into())
        );
        assert_eq!(
            "pid:42".parse::<CgroupSpec>().expect("pid"),
            CgroupSpec::Pid(42)
        );
        for bad in ["", "pid:", "pid:0", "pid:x", "vm"] {
            assert!(bad.parse::<CgroupSpec>().is_err(), "{bad:?}");
        }
        assert_eq!(CgroupSpec::Pid(7).to_string(), "pid:7");
    }

    #[test]
    fn limits_are_read_from_both_interfaces() {
        let v2 = "8:0 rbps=max wbps=1048576 riops=max wiops=max\n7:2 rbps=5 wbps=max riops=max wiops=max\n";
        assert_eq!(parse_limit(Interface::V2, v2, "8:0"), Ok(Some(1_048_576)));
        assert_eq!(parse_limit(Interface::V2, v2, "7:2"), Ok(None));
        assert_eq!(parse_limit(Interface::V2, v2, "7:3"), Ok(None));
        assert_eq!(parse_limit(Interface::V2, "8:0 rbps=max\n", "8:0"), Err(()));
        let v1 = "7:2 2097152\n8:0 100\n";
        assert_eq!(parse_limit(Interface::V1, v1, "7:2"), Ok(Some(2_097_152)));
        assert_eq!(parse_limit(Interface::V1, v1, "8:0"), Ok(Some(100)));
        assert_eq!(parse_limit(Interface::V1, "", "8:0"), Ok(None));
        assert_eq!(parse_limit(Interface::V1, "8:0 x\n", "8:0"), Err(()));
    }

    #[test]
    fn settings_are_the_kernels_lines() {
        assert_eq!(Interface::V2.setting("8:0", Some(4096)), "8:0 wbps=4096");
        assert_eq!(Interface::V2.setting("8:0", None), "8:0 wbps=max");
        assert_eq!(Interface::V1.setting("7:2", Some(4096)), "7:2 4096");
        assert_eq!(Interface::V1.setting("7:2", None), "7:2 0");
    }

    #[test]
    fn written_bytes_are_read_from_both_interfaces() {
        let v2 = "8:0 rbytes=10 wbytes=4096 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(parse_written(Interface::V2, v2, "8:0"), Some(4096));
        assert_eq!(parse_written(Interface::V2, v2, "7:0"), Some(0));
        let v1 =
            "7:2 Read 0\n7:2 Write 6291456\n7:2 Sync 6291456\n7:2 Total 6291456\nTotal 6291456\n";
        assert_eq!(parse_written(Interface::V1, v1, "7:2"), Some(6_291_456));
        assert_eq!(parse_written(Interface::V1, v1, "8:0"), Some(0));
    }

    #[test]
    fn a_directory_without_a_limit_interface_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let err = WriteThrottle::new(
            &CgroupSpec::Dir(dir.path().to_path_buf()),
            Path::new("/"),
            None,
        )
        .expect_err("not a cgroup");
        assert!(matches!(err, ThrottleError::NoController { .. }), "{err}");
    }
}
