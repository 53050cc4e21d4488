//! Traced targets: block devices by path, and what the kernel says about them.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Errors resolving a device or checking the tracer's preconditions.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The path does not exist.
    #[error("device {0} does not exist; list block devices with `lsblk`")]
    Missing(PathBuf),
    /// The path is not a block device.
    #[error(
        "{0} is not a block device; to trace a disk image that lives on a file system, pass it with --file"
    )]
    NotBlock(PathBuf),
    /// Reading sysfs failed.
    #[error("cannot read {path}: {source} (is sysfs mounted at /sys?)")]
    Sysfs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A sysfs value is not what the kernel documents.
    #[error("unexpected content in {path}: {content:?}")]
    SysfsValue { path: PathBuf, content: String },
    /// Stat failed for another reason.
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not running as root.
    #[error(
        "tracing needs root (CAP_BPF and CAP_PERFMON): run it with sudo, or as `cargo xtask run -- ...`"
    )]
    NotRoot,
    /// The kernel has no BTF.
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): Tern's CO-RE tracer needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    /// tracefs is not mounted and mount(8) could not be run.
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({0}); mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Tracefs(#[source] std::io::Error),
    /// tracefs is not mounted and mount(8) failed.
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed (mount exited with {0}); mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    TracefsMount(std::process::ExitStatus),
}

/// How the kernel issues I/O for a device, which decides the hook that sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPath {
    /// blk-mq: requests, seen at `block_rq_issue`/`block_rq_complete`.
    Request,
    /// bio-based (zram, dm, md): seen at `block_bio_queue`.
    Bio,
}

/// A block device as the tracer sees it: the whole disk, plus where a partition starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The whole disk holding this device (itself unless it is a partition).
    pub disk_major: u32,
    pub disk_minor: u32,
    /// Byte offset of this device on its whole disk (partitions), else 0.
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub io_path: IoPath,
}

/// The kernel's internal `dev_t` encoding, which BPF programs see.
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | minor
}

/// `major:minor` of a kernel-encoded `dev_t` ([`kernel_dev`]), for messages.
pub fn kernel_dev_name(dev: u32) -> String {
    format!("{}:{}", dev >> 20, dev & ((1 << 20) - 1))
}

/// The sysfs directory of block device `major:minor`.
pub fn sysfs_dir(major: u32, minor: u32) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

/// Completed write and discard requests in the text of a block device's
/// `stat` file (Documentation/block/stat.rst: fields 5 and 12, counted from
/// 1; kernels before 4.18 have no discard fields). `None` if it is not a
/// list of numbers with at least the write fields.
pub fn completed_writes_and_discards(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((*fields.get(4)?, fields.get(11).copied().unwrap_or(0)))
}

/// Reads and writes in flight in the text of a block device's `inflight`
/// file (two numbers; discards count as writes). `None` if it is not that.
pub fn in_flight_reads_and_writes(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(reads)), Some(Ok(writes))) => Some((reads, writes)),
        _ => None,
    }
}

fn read_sysfs(path: &Path) -> Result<String, DeviceError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DeviceError::Sysfs {
            path: path.to_path_buf(),
            source,
        })
}

fn read_sysfs_num<T: std::str::FromStr>(path: &Path) -> Result<T, DeviceError> {
    let content = read_sysfs(path)?;
    content.parse().map_err(|_| DeviceError::SysfsValue {
        path: path.to_path_buf(),
        content,
    })
}

impl BlockDevice {
    /// Resolves a device node such as `/dev/loop0`.
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        let meta = fs::metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DeviceError::Missing(path.to_path_buf())
            } else {
                DeviceError::Stat {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        if !meta.file_type().is_block_device() {
            return Err(DeviceError::NotBlock(path.to_path_buf()));
        }
        let rdev = meta.rdev();
        let mut dev = Self::from_numbers(libc::major(rdev), libc::minor(rdev))?;
        dev.path = path.to_path_buf();
        Ok(dev)
    }

    /// Resolves a device by its numbers, e.g. the `st_dev` of a file system.
    pub fn from_numbers(major: u32, minor: u32) -> Result<Self, DeviceError> {
        let sys = sysfs_dir(major, minor);
        let real = fs::canonicalize(&sys).map_err(|source| DeviceError::Sysfs {
            path: sys.clone(),
            source,
        })?;
        let is_partition = real.join("partition").exists();
        let (disk_dir, start_bytes) = if is_partition {
            let start = read_sysfs_num::<u64>(&real.join("start"))? * 512;
            let parent = real
                .parent()
                .map_or_else(|| real.clone(), Path::to_path_buf);
            (parent, start)
        } else {
            (real.clone(), 0)
        };
        let disk_dev = read_sysfs(&disk_dir.join("dev"))?;
        let (dmaj, dmin) = disk_dev
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| DeviceError::SysfsValue {
                path: disk_dir.join("dev"),
                content: disk_dev.clone(),
            })?;
        let size_bytes = read_sysfs_num::<u64>(&real.join("size"))? * 512;
        // Parsed as u32 directly: a value past it is not what the kernel documents.
        let logical_block_size: u32 = read_sysfs_num(&disk_dir.join("queue/logical_block_size"))?;
        let io_path = if disk_dir.join("mq").exists() {
            IoPath::Request
        } else {
            IoPath::Bio
        };
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(BlockDevice {
            path: PathBuf::from("/dev").join(name),
            major,
            minor,
            disk_major: dmaj,
            disk_minor: dmin,
            start_bytes,
            size_bytes,
            logical_block_size,
            io_path,
        })
    }

    /// `major:minor` of this device.
    pub fn numbers(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// The `dev_t` the BPF programs report for this device's I/O (its whole disk).
    pub fn kernel_disk_dev(&self) -> u32 {
        kernel_dev(self.disk_major, self.disk_minor)
    }
}

/// Checks what the tracer needs from the system, mounting tracefs if it can.
pub fn check_tracing_preconditions() -> Result<(), DeviceError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DeviceError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(DeviceError::NoBtf);
    }
    let tracing = Path::new("/sys/kernel/tracing");
    if !tracing.join("events").exists() {
        let status = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .map_err(DeviceError::Tracefs)?;
        if !status.success() {
            return Err(DeviceError::TracefsMount(status));
        }
    }
    Ok(())
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// This host's name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_says_how_to_find_one() {
        let err = BlockDevice::open(Path::new("/dev/does-not-exist")).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "device /dev/does-not-exist does not exist; list block devices with `lsblk`"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let err = BlockDevice::open(f.path()).expect_err("not a block device");
        assert!(matches!(err, DeviceError::NotBlock(_)), "{err}");
        assert!(err.to_string().contains("--file"));
    }

    #[test]
    fn loop_devices_are_request_based_and_zram_is_bio_based() {
        let lo = BlockDevice::from_numbers(7, 0).expect("loop0 exists on this machine kind");
        assert_eq!(lo.io_path, IoPath::Request);
        assert_eq!((lo.disk_major, lo.disk_minor), (7, 0));
        if let Ok(z) = BlockDevice::open(Path::new("/dev/zram0")) {
            assert_eq!(z.io_path, IoPath::Bio);
        }
    }
}
