//! Pausing the workload for a migration's cutover.
//!
//! The source agent pauses the workload, sends the final delta, and then
//! either leaves it paused for good (the destination has taken over,
//! [`Paused::keep`]) or resumes it (rollback or an abandoned attempt,
//! [`Paused::resume`]). A [`Paused`] dropped without either resumes the
//! workload, so an error path never leaves an application frozen.
//!
//! Five ways to pause, chosen by a [`PauseTarget`]:
//! - `fsfreeze:MOUNT`: `FIFREEZE` on the file system, which also flushes its
//!   dirty data to the block device;
//! - `cgroup:DIR`: the cgroup v2 freezer (`cgroup.freeze`);
//! - `qmp:SOCKET`: QMP `stop` / `cont` on a QEMU VM;
//! - `qemu:SOCKET@URI`: QEMU's own live migration of RAM and devices to
//!   `URI`, with `pause-before-switchover`: the pause returns when QEMU has
//!   precopied RAM and stopped the VM; [`Paused::hand_over`] sends the device
//!   state after the disk has switched; a resume cancels the migration;
//! - `cmd:PAUSE;;RESUME`: two shell commands.
//!
//! Not covered: the agent itself dying (SIGKILL) while the workload is paused
//! runs no destructor; a watchdog outside the process is needed for that.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The accepted forms, quoted by every parse error.
const FORMS: &str = "fsfreeze:/mnt/data, cgroup:/sys/fs/cgroup/app, qmp:/run/vm.qmp, \
     qemu:/run/vm.qmp@tcp:dst:4444 or cmd:PAUSE_CMD;;RESUME_CMD";

/// How long the cgroup freezer may take to report `frozen 1`.
const CGROUP_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one QMP exchange; QEMU answers `stop`/`cont` in well under that.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the synchronous QMP `cont` sent from `Drop`.
const QMP_DROP_TIMEOUT: Duration = Duration::from_secs(3);
/// How many unread QMP events are kept; older ones are dropped.
const QMP_MAX_EVENTS: usize = 256;
/// How much of a failed command's standard error goes into the error.
const STDERR_TAIL: usize = 512;

/// `FIFREEZE` = `_IOWR('X', 119, int)` from `<linux/fs.h>`.
const FIFREEZE: libc::Ioctl = iowr_int(b'X', 119);
/// `FITHAW` = `_IOWR('X', 120, int)` from `<linux/fs.h>`.
const FITHAW: libc::Ioctl = iowr_int(b'X', 120);

/// The generic `_IOWR(type, nr, int)` encoding: direction bits 30–31
/// (read|write = 3), argument size bits 16–29, type bits 8–15, number bits 0–7.
const fn iowr_int(ty: u8, nr: u8) -> libc::Ioctl {
    (3 << 30)
        | ((size_of::<libc::c_int>() as libc::Ioctl) << 16)
        | ((ty as libc::Ioctl) << 8)
        | nr as libc::Ioctl
}

/// `statfs` magic of a cgroup v2 file system (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

/// Errors of pausing and resuming a workload.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A `--pause` value that is none of the accepted forms.
    #[error("bad pause target {input:?}: {reason}; use one of {FORMS}")]
    BadTarget { input: String, reason: &'static str },
    /// `fsfreeze:` on a path that is not where a file system is mounted.
    #[error(
        "{0} is not a mount point; fsfreeze needs the directory a file system is mounted on (see findmnt)"
    )]
    NotMountPoint(PathBuf),
    /// The file system or cgroup was already frozen by someone else.
    #[error(
        "{0} is already frozen by someone else; thaw it first, Tern will not take over a freeze it did not make"
    )]
    AlreadyFrozen(PathBuf),
    /// `cgroup:` on a directory that is not a non-root cgroup v2.
    #[error(
        "{path} is not a cgroup v2 directory ({why}); give a non-root cgroup under the cgroup2 mount, e.g. /sys/fs/cgroup/app"
    )]
    NotCgroup2 { path: PathBuf, why: &'static str },
    /// The cgroup did not report `frozen 1` in time; it has been thawed again.
    #[error(
        "cgroup {path} did not freeze within {timeout:?} (a task stuck in the kernel?); it was thawed again"
    )]
    CgroupTimeout { path: PathBuf, timeout: Duration },
    /// A system call or file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a QMP command with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    /// The QMP conversation itself failed (socket, framing, timeout).
    #[error("QMP on {path}: {what}")]
    QmpProtocol { path: PathBuf, what: String },
    /// The VM was not in the state the operation starts from.
    #[error(
        "the VM behind {path} is {status}, expected {expected}; Tern pauses only a running VM, and checks it after stop and cont"
    )]
    VmState {
        path: PathBuf,
        status: String,
        expected: &'static str,
    },
    /// QEMU's migration ended without reaching the state Tern waited for.
    #[error(
        "QEMU's migration from {path} ended {status}: {desc}; check the destination QEMU (started with -incoming on the URI given) and its log"
    )]
    QemuMigration {
        path: PathBuf,
        status: String,
        desc: String,
    },
    /// A pause or resume command exited unsuccessfully.
    #[error("command `{command}` failed ({status}): {stderr_tail}")]
    Command {
        command: String,
        status: String,
        stderr_tail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PauseError {
    let path = path.to_path_buf();
    move |source| PauseError::Io {
        action,
        path,
        source,
    }
}

/// What to pause, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseTarget {
    /// Freeze the file system mounted at this directory.
    Fsfreeze(PathBuf),
    /// Freeze this cgroup v2 (all its processes).
    Cgroup(PathBuf),
    /// Stop the QEMU VM whose QMP unix socket this is.
    Qmp(PathBuf),
    /// Migrate the QEMU VM at `socket` to `uri` (RAM by precopy while the
    /// disk converges), stopping at `pre-switchover`.
    QemuMigrate { socket: PathBuf, uri: String },
    /// Run `pause` to pause and `resume` to resume, each through `sh -c`.
    Command { pause: String, resume: String },
}

impl FromStr for PauseTarget {
    type Err = PauseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| PauseError::BadTarget {
            input: s.to_owned(),
            reason,
        };
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad("no kind: prefix"))?;
        let path = || {
            if rest.is_empty() {
                Err(bad("the path is empty"))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        match kind {
            "fsfreeze" => Ok(Self::Fsfreeze(path()?)),
            "cgroup" => Ok(Self::Cgroup(path()?)),
            "qmp" => Ok(Self::Qmp(path()?)),
            "qemu" => {
                let (socket, uri) = rest.split_once('@').ok_or_else(|| {
                    bad("qemu: needs SOCKET@URI (the destination's -incoming URI)")
                })?;
                if socket.is_empty() || uri.is_empty() {
                    return Err(bad("the socket or the URI is empty"));
                }
                Ok(Self::QemuMigrate {
                    socket: PathBuf::from(socket),
                    uri: uri.to_owned(),
                })
            }
            "cmd" => {
                let (pause, resume) = rest.split_once(";;").ok_or_else(|| {
                    bad("cmd: needs the pause and resume commands separated by ;;")
                })?;
                let (pause, resume) = (pause.trim(), resume.trim());
                if pause.is_empty() || resume.is_empty() {
                    return Err(bad("the pause or resume command is empty"));
                }
                Ok(Self::Command {
                    pause: pause.to_owned(),
                    resume: resume.to_owned(),
                })
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

impl fmt::Display for PauseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fsfreeze(p) => write!(f, "fsfreeze:{}", p.display()),
            Self::Cgroup(p) => write!(f, "cgroup:{}", p.display()),
            Self::Qmp(p) => write!(f, "qmp:{}", p.display()),
            Self::QemuMigrate { socket, uri } => write!(f, "qemu:{}@{uri}", socket.display()),
            Self::Command { pause, resume } => write!(f, "cmd:{pause};;{resume}"),
        }
    }
}

impl PauseTarget {
    /// Pauses the workload. Dropping the future part way leaves it running.
    #[tracing::instrument(skip_all, fields(target = %self))]
    pub async fn pause(&self) -> Result<Paused, PauseError> {
        let started = Instant::now();
        let paused = match self {
            Self::Fsfreeze(mount) => {
                let mount = mount.clone();
                // FIFREEZE writes back the file system's dirty data first, so it
                // blocks for as long as that takes. The guard is built inside the
                // closure: if this future is dropped meanwhile, tokio drops the
                // closure's result and the guard thaws.
                tokio::task::spawn_blocking(move || fsfreeze(&mount))
                    .await
                    .expect("the fsfreeze task does not panic")?
            }
            Self::Cgroup(dir) => cgroup_freeze(dir).await?,
            Self::Qmp(socket) => qmp_stop(socket).await?,
            Self::QemuMigrate { socket, uri } => qemu_migrate(socket, uri).await?,
            Self::Command { pause, resume } => {
                // Guard first: a pause command that fails or is cancelled part
                // way may have paused some of the workload; resume runs then.
                let paused = Paused::new(Hold::Command {
                    resume: resume.clone(),
                });
                run_shell(pause).await?;
                paused
            }
        };
        tracing::info!(took = ?started.elapsed(), "workload paused");
        Ok(paused)
    }

    /// Whether the workload keeps running for a while inside [`PauseTarget::pause`]
    /// (QEMU's RAM precopy), so that replication should go on meanwhile.
    pub fn runs_while_pausing(&self) -> bool {
        matches!(self, Self::QemuMigrate { .. })
    }

    /// Resumes a workload that an earlier process paused and left paused
    /// (`tern rollback --resume` after a `tern migrate` that cut over).
    pub async fn resume_now(&self) -> Result<(), PauseError> {
        match self {
            Self::Fsfreeze(mount) => {
                let dir = File::open(mount).map_err(io_err("open", mount))?;
                thaw(mount, &dir)
            }
            Self::Cgroup(dir) => cgroup_write(dir, "0"),
            Self::Qmp(socket) | Self::QemuMigrate { socket, .. } => {
                let mut qmp = Qmp::connect(socket).await?;
                qmp.execute("cont", None).await?;
                expect_status(&mut qmp, socket, true).await
            }
            Self::Command { resume, .. } => run_shell(resume).await,
        }
    }
}

/// Proof that the workload is paused. Resumes it when dropped, unless
/// [`Paused::keep`] was called.
#[must_use = "dropping a Paused resumes the workload at once"]
pub struct Paused {
    since: Instant,
    /// How long the workload still ran inside the pause call (QEMU's RAM
    /// precopy for `qemu:`); zero for the others.
    ran_inside: Duration,
    /// `None` once resumed or kept.
    hold: Option<Hold>,
}

enum Hold {
    /// The open mount point; `FITHAW` goes through it.
    Fsfreeze {
        mount: PathBuf,
        dir: File,
    },
    Cgroup {
        dir: PathBuf,
    },
    /// The connection stays open: QEMU serves one QMP client at a time, so a
    /// second connection for `cont` would wait behind this one.
    Qmp {
        socket: PathBuf,
        qmp: Qmp,
    },
    /// QEMU stopped at `pre-switchover` of a migration; the same connection.
    QemuMigrate {
        socket: PathBuf,
        qmp: Qmp,
    },
    Command {
        resume: String,
    },
}

impl fmt::Debug for Paused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.hold {
            Some(Hold::Fsfreeze { mount, .. }) => format!("fsfreeze:{}", mount.display()),
            Some(Hold::Cgroup { dir }) => format!("cgroup:{}", dir.display()),
            Some(Hold::Qmp { socket, .. }) => format!("qmp:{}", socket.display()),
            Some(Hold::QemuMigrate { socket, .. }) => format!("qemu:{}", socket.display()),
            Some(Hold::Command { resume }) => format!("cmd:;;{resume}"),
            None => "released".to_owned(),
        };
        f.debug_struct("Paused")
            .field("target", &what)
            .field("paused_for", &self.paused_for())
            .finish_non_exhaustive()
    }
}

impl Paused {
    fn new(hold: Hold) -> Self {
        Self {
            since: Instant::now(),
            ran_inside: Duration::ZERO,
            hold: Some(hold),
        }
    }

    /// How long the workload has been paused.
    pub fn paused_for(&self) -> Duration {
        self.since.elapsed()
    }

    /// How long the workload still ran inside the pause call before it
    /// stopped (QEMU's RAM precopy for `qemu:`; zero for the others).
    pub fn ran_inside(&self) -> Duration {
        self.ran_inside
    }

    /// Resumes the workload. If this future is dropped part way, the
    /// `Paused` it owns is dropped too, which resumes synchronously.
    pub async fn resume(mut self) -> Result<(), PauseError> {
        let paused_for = self.paused_for();
        // The hold stays in `self` until the attempt completes, for that drop.
        let result = match self.hold.as_mut() {
            None => Ok(()),
            Some(Hold::Fsfreeze { mount, dir }) => thaw(mount, dir),
            Some(Hold::Cgroup { dir }) => cgroup_write(dir, "0"),
            Some(Hold::Qmp { socket, qmp }) => match qmp.execute("cont", None).await {
                Ok(_) => expect_status(qmp, socket, true).await,
                Err(e) => Err(e),
            },
            Some(Hold::QemuMigrate { socket, qmp }) => cancel_migration(qmp, socket).await,
            Some(Hold::Command { resume }) => run_shell(resume).await,
        };
        // One attempt only: a failed resume is the caller's to handle, and
        // repeating a resume command from `Drop` could do harm.
        self.hold = None;
        result?;
        tracing::info!(?paused_for, "workload resumed");
        Ok(())
    }

    /// Hands the workload over to the destination once its disk has
    /// switched: for `qemu:` QEMU sends the device state and the last dirty
    /// RAM (`migrate-continue`) and this waits until the migration has
    /// completed; the others stay paused for good ([`Paused::keep`]). A
    /// failed hand-over leaves the VM as it is, never resumed here: its disk
    /// has switched (`tern rollback --resume` brings it back).
    pub async fn hand_over(mut self) -> Result<(), PauseError> {
        if let Some(Hold::QemuMigrate { socket, qmp }) = self.hold.as_mut() {
            let started = Instant::now();
            match continue_migration(qmp, socket).await {
                Ok(info) => tracing::info!(
                    took = ?started.elapsed(),
                    downtime_ms = info["downtime"].as_u64().unwrap_or(0),
                    "QEMU sent the device state: the VM runs on the destination"
                ),
                Err(e) => {
                    // The disk has switched: the source VM must not run again
                    // on its own (QEMU may even have completed). Leave it as
                    // it is for `tern rollback` or the operator.
                    self.hold = None;
                    return Err(e);
                }
            }
        }
        self.keep();
        Ok(())
    }

    /// Leaves the workload paused for good (the cutover is done).
    pub fn keep(mut self) {
        // Closing the mount point's descriptor or the QMP socket does not
        // undo the pause, so forgetting the hold is all it takes.
        self.hold = None;
        tracing::info!(paused_for = ?self.paused_for(), "workload left paused for good");
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        tracing::warn!(
            paused_for = ?self.paused_for(),
            "pause abandoned (failed, cancelled or dropped): resuming the workload"
        );
        // Synchronous on purpose: a destructor cannot await, and resuming now
        // matters more than not blocking the runtime thread for a moment.
        let result = match hold {
            Hold::Fsfreeze { mount, dir } => thaw(&mount, &dir),
            Hold::Cgroup { dir } => cgroup_write(&dir, "0"),
            Hold::Qmp { socket, qmp } => qmp.commands_blocking(&socket, &["cont"]),
            // Cancelling resumes the VM; `cont` makes sure of it.
            Hold::QemuMigrate { socket, qmp } => {
                qmp.commands_blocking(&socket, &["migrate_cancel", "cont"])
            }
            Hold::Command { resume } => run_shell_blocking(&resume),
        };
        match result {
            Ok(()) => tracing::warn!("workload resumed after an abandoned pause"),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "cannot resume the workload after an abandoned pause; it may still be paused"
                );
            }
        }
    }
}

// ---- fsfreeze ----

fn fsfreeze(mount: &Path) -> Result<Paused, PauseError> {
    let mount = std::fs::canonicalize(mount).map_err(io_err("resolve", mount))?;
    if !is_mount_point(&mount)? {
        return Err(PauseError::NotMountPoint(mount));
    }
    let dir = File::open(&mount).map_err(io_err("open", &mount))?;
    // SAFETY: `dir` is an open descriptor for the whole call; FIFREEZE takes
    // no argument memory (the int argument is ignored by the kernel).
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(PauseError::AlreadyFrozen(mount));
        }
        return Err(PauseError::Io {
            action: "freeze (FIFREEZE) the file system at",
            path: mount,
            source: e,
        });
    }
    Ok(Paused::new(Hold::Fsfreeze { mount, dir }))
}

fn thaw(mount: &Path, dir: &File) -> Result<(), PauseError> {
    // SAFETY: `dir` is an open descriptor for the whole call; FITHAW takes no
    // argument memory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    if rc != 0 {
        return Err(PauseError::Io {
            action: "thaw (FITHAW) the file system at",
            path: mount.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `path` (canonical) is listed as a mount point in our mount namespace.
fn is_mount_point(path: &Path) -> Result<bool, PauseError> {
    let table = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(table).map_err(io_err("read", table))?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| Path::new(&unescape_mountinfo(field)) == path))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = bytes[i + 1..=i + 3]
                .iter()
                .fold(0u32, |n, b| n * 8 + u32::from(b - b'0'));
            out.push(n as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- cgroup v2 ----

async fn cgroup_freeze(dir: &Path) -> Result<Paused, PauseError> {
    check_cgroup2(dir)?;
    let state = read_trimmed(&dir.join("cgroup.freeze"))?;
    if state == "1" {
        return Err(PauseError::AlreadyFrozen(dir.to_path_buf()));
    }
    // The guard exists before the write: a failure or cancellation from here
    // on thaws.
    let paused = Paused::new(Hold::Cgroup {
        dir: dir.to_path_buf(),
    });
    cgroup_write(dir, "1")?;
    let events = dir.join("cgroup.events");
    let deadline = Instant::now() + CGROUP_FREEZE_TIMEOUT;
    let mut nap = Duration::from_micros(200);
    loop {
        let text = std::fs::read_to_string(&events).map_err(io_err("read", &events))?;
        if text.lines().any(|l| l.trim() == "frozen 1") {
            return Ok(paused);
        }
        if Instant::now() >= deadline {
            drop(paused);
            return Err(PauseError::CgroupTimeout {
                path: dir.to_path_buf(),
                timeout: CGROUP_FREEZE_TIMEOUT,
            });
        }
        // Freezing usually completes within a millisecond; back off gently.
        tokio::time::sleep(nap).await;
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

fn check_cgroup2(dir: &Path) -> Result<(), PauseError> {
    let not = |why| PauseError::NotCgroup2 {
        path: dir.to_path_buf(),
        why,
    };
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| not("the path holds a NUL byte"))?;
    // SAFETY: `statfs` is plain data, so all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string and `st` a valid out
    // pointer, both alive across the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut st) } != 0 {
        return Err(PauseError::Io {
            action: "stat the file system of",
            path: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    if st.f_type as libc::c_long != CGROUP2_SUPER_MAGIC {
        return Err(not("not on a cgroup2 file system"));
    }
    if !dir.join("cgroup.freeze").is_file() {
        // The root cgroup has no cgroup.freeze; it cannot be frozen.
        return Err(not("no cgroup.freeze: the root cgroup, or not a directory"));
    }
    Ok(())
}

fn cgroup_write(dir: &Path, value: &str) -> Result<(), PauseError> {
    let file = dir.join("cgroup.freeze");
    std::fs::write(&file, value).map_err(io_err("write", &file))
}

fn read_trimmed(path: &Path) -> Result<String, PauseError> {
    Ok(std::fs::read_to_string(path)
        .map_err(io_err("read", path))?
        .trim()
        .to_owned())
}

// ---- QMP ----

async fn qmp_stop(socket: &Path) -> Result<Paused, PauseError> {
    let mut qmp = Qmp::connect(socket).await?;
    expect_status(&mut qmp, socket, true).await?;
    // Guard first: once `stop` is on the wire, any failure must `cont`.
    let mut paused = Paused::new(Hold::Qmp {
        socket: socket.to_path_buf(),
        qmp,
    });
    let Some(Hold::Qmp { qmp, .. }) = paused.hold.as_mut() else {
        unreachable!("just built as Hold::Qmp");
    };
    qmp.execute("stop", None).await?;
    expect_status(qmp, socket, false).await?;
    Ok(paused)
}

/// Starts QEMU's migration of the running VM at `socket` to `uri` with
/// `pause-before-switchover` and waits until QEMU has precopied RAM and
/// stopped the VM (`pre-switchover`).
async fn qemu_migrate(socket: &Path, uri: &str) -> Result<Paused, PauseError> {
    let began = Instant::now();
    let mut qmp = Qmp::connect(socket).await?;
    expect_status(&mut qmp, socket, true).await?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(
            json!({ "capabilities": [{ "capability": "pause-before-switchover", "state": true }] }),
        ),
    )
    .await?;
    // Guard first: once `migrate` is on the wire, any failure must cancel it.
    let mut paused = Paused::new(Hold::QemuMigrate {
        socket: socket.to_path_buf(),
        qmp,
    });
    let Some(Hold::QemuMigrate { qmp, .. }) = paused.hold.as_mut() else {
        unreachable!("just built as Hold::QemuMigrate");
    };
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    let info = wait_migration(qmp, socket, &["pre-switchover"]).await?;
    if info["status"] != "pre-switchover" {
        return Err(migration_ended(socket, &info));
    }
    // The pause starts when QEMU stopped the VM, not when precopy began.
    paused.since = Instant::now();
    paused.ran_inside = began.elapsed();
    Ok(paused)
}

/// Polls `query-migrate` until it ends (`completed`, `failed`, `cancelled`)
/// or reaches one of `also`; reports precopy's progress now and then.
async fn wait_migration(qmp: &mut Qmp, socket: &Path, also: &[&str]) -> Result<Value, PauseError> {
    let mut told = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        let status = info["status"].as_str().unwrap_or("");
        if ["completed", "failed", "cancelled"].contains(&status) || also.contains(&status) {
            return Ok(info);
        }
        if told.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                socket = %socket.display(),
                status,
                ram_remaining_mb = info["ram"]["remaining"].as_u64().unwrap_or(0) / 1_000_000,
                ram_transferred_mb = info["ram"]["transferred"].as_u64().unwrap_or(0) / 1_000_000,
                "QEMU migration in progress"
            );
            told = Instant::now();
        }
        // QMP answers in well under a millisecond; the VM stops at
        // `pre-switchover`, so noticing it late is downtime.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `migrate-continue` from `pre-switchover`, then waits for `completed`.
async fn continue_migration(qmp: &mut Qmp, socket: &Path) -> Result<Value, PauseError> {
    qmp.execute(
        "migrate-continue",
        Some(json!({ "state": "pre-switchover" })),
    )
    .await?;
    let info = wait_migration(qmp, socket, &[]).await?;
    if info["status"] != "completed" {
        return Err(migration_ended(socket, &info));
    }
    Ok(info)
}

/// The error for a migration that ended in another state than awaited,
/// with QEMU's own reason from `query-migrate`.
fn migration_ended(socket: &Path, info: &Value) -> PauseError {
    PauseError::QemuMigration {
        path: socket.to_path_buf(),
        status: info["status"].as_str().unwrap_or("unknown").to_owned(),
        desc: info["error-desc"].as_str().unwrap_or("").to_owned(),
    }
}

/// Cancels QEMU's migration (which resumes the VM) and makes sure it runs.
async fn cancel_migration(qmp: &mut Qmp, socket: &Path) -> Result<(), PauseError> {
    qmp.execute("migrate_cancel", None).await?;
    qmp.execute("cont", None).await?;
    expect_status(qmp, socket, true).await
}

async fn expect_status(qmp: &mut Qmp, socket: &Path, running: bool) -> Result<(), PauseError> {
    let status = qmp.execute("query-status", None).await?;
    if status["running"] == Value::Bool(running) {
        return Ok(());
    }
    Err(PauseError::VmState {
        path: socket.to_path_buf(),
        status: status["status"].as_str().unwrap_or("unknown").to_owned(),
        expected: if running { "running" } else { "paused" },
    })
}

/// A QMP client on a QEMU monitor unix socket: one command at a time,
/// asynchronous events set aside for [`Qmp::take_events`].
pub struct Qmp {
    path: PathBuf,
    stream: BufReader<UnixStream>,
    next_id: u64,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, PauseError> {
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| PauseError::QmpProtocol {
                path: path.to_path_buf(),
                what: "connect timed out (is another client holding the monitor?)".to_owned(),
            })?
            .map_err(io_err("connect to QMP socket", path))?;
        let mut qmp = Self {
            path: path.to_path_buf(),
            stream: BufReader::new(stream),
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(QMP_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| qmp.protocol("no greeting (is this a QMP socket?)"))??;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value. A QMP error comes
    /// back as [`PauseError::Qmp`] with QEMU's `desc`.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, PauseError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(QMP_TIMEOUT, async {
            self.stream
                .get_mut()
                .write_all(line.as_bytes())
                .await
                .map_err(io_err("write to QMP socket", &self.path))?;
            loop {
                let reply = self.read_message().await?;
                if reply.get("event").is_some() {
                    self.push_event(reply);
                    continue;
                }
                if reply.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::debug!(%reply, "QMP reply to another command, skipped");
                    continue;
                }
                return reply_result(command, reply, &self.path);
            }
        })
        .await
        .map_err(|_| self.protocol(format!("no reply to {command} within {QMP_TIMEOUT:?}")))?
    }

    /// Events received so far (oldest first), clearing the list.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn push_event(&mut self, event: Value) {
        if self.events.len() == QMP_MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    async fn read_message(&mut self) -> Result<Value, PauseError> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .await
            .map_err(io_err("read from QMP socket", &self.path))?;
        if n == 0 {
            return Err(self.protocol("QEMU closed the connection"));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("bad JSON {line:?}: {e}")))
    }

    fn protocol(&self, what: impl Into<String>) -> PauseError {
        PauseError::QmpProtocol {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// `commands` without a runtime, for `Drop`: the same connection is turned
    /// into a blocking socket (QEMU would not serve a second one meanwhile);
    /// if that fails the socket is closed and a fresh connection is made.
    fn commands_blocking(self, socket: &Path, commands: &[&str]) -> Result<(), PauseError> {
        let leftover = self.stream.buffer().to_vec();
        let (stream, skip_greeting, leftover) = match self.stream.into_inner().into_std() {
            Ok(s) => (s, false, leftover),
            Err(e) => {
                tracing::debug!(error = %e, "QMP socket not reusable, reconnecting");
                let s = std::os::unix::net::UnixStream::connect(socket)
                    .map_err(io_err("connect to QMP socket", socket))?;
                (s, true, Vec::new())
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(io_err("talk QMP on", socket))?;
        stream
            .set_read_timeout(Some(QMP_DROP_TIMEOUT))
            .map_err(io_err("talk QMP on", socket))?;
        stream
            .set_write_timeout(Some(QMP_DROP_TIMEOUT))
            .map_err(io_err("talk QMP on", socket))?;
        let mut reader = std::io::BufReader::new(std::io::Read::chain(&leftover[..], &stream));
        let mut writer = &stream;
        let protocol = |what: String| PauseError::QmpProtocol {
            path: socket.to_path_buf(),
            what,
        };
        let mut commands = commands.to_vec();
        if skip_greeting {
            let mut greeting = String::new();
            reader
                .read_line(&mut greeting)
                .map_err(io_err("read from QMP socket", socket))?;
            commands.insert(0, "qmp_capabilities");
        }
        for (id, command) in commands.into_iter().enumerate() {
            let id = u64::MAX - id as u64;
            writeln!(writer, "{}", json!({ "execute": command, "id": id }))
                .map_err(io_err("write to QMP socket", socket))?;
            loop {
                let mut line = String::new();
                if reader
                    .read_line(&mut line)
                    .map_err(io_err("read from QMP socket", socket))?
                    == 0
                {
                    return Err(protocol("QEMU closed the connection".to_owned()));
                }
                // A partial line left from the async reader cannot parse; skip it.
                let Ok(reply) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if reply.get("id").and_then(Value::as_u64) == Some(id) {
                    reply_result(command, reply, socket)?;
                    break;
                }
            }
        }
        Ok(())
    }
}

fn reply_result(command: &str, reply: Value, path: &Path) -> Result<Value, PauseError> {
    if let Some(error) = reply.get("error") {
        return Err(PauseError::Qmp {
            command: command.to_owned(),
            class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
            desc: error["desc"]
                .as_str()
                .unwrap_or("(no description)")
                .to_owned(),
        });
    }
    match reply {
        Value::Object(mut map) if map.contains_key("return") => {
            Ok(map.remove("return").unwrap_or(Value::Null))
        }
        other => Err(PauseError::QmpProtocol {
            path: path.to_path_buf(),
            what: format!("reply to {command} has neither return nor error: {other}"),
        }),
    }
}

// ---- shell commands ----

async fn run_shell(command: &str) -> Result<(), PauseError> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err("run", Path::new("sh")))?;
    command_result(command, &out)
}

fn run_shell_blocking(command: &str) -> Result<(), PauseError> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_err("run", Path::new("sh")))?;
    command_result(command, &out)
}

fn command_result(command: &str, out: &std::process::Output) -> Result<(), PauseError> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim_end();
    let cut = stderr.len().saturating_sub(STDERR_TAIL);
    let cut = (cut..=stderr.len())
        .find(|&i| stderr.is_char_boundary(i))
        .unwrap_or(stderr.len());
    Err(PauseError::Command {
        command: command.to_owned(),
        status: out.status.to_string(),
        stderr_tail: if stderr.is_empty() {
            "(no output on stderr)".to_owned()
        } else {
            stderr[cut..].to_owned()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_fs_h() {
        assert_eq!(FIFREEZE, 0xC004_5877);
        assert_eq!(FITHAW, 0xC004_5878);
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "fsfreeze:/mnt/data".parse::<PauseTarget>().expect("valid"),
            PauseTarget::Fsfreeze("/mnt/data".into())
        );
        assert_eq!(
            "cgroup:/sys/fs/cgroup/app"
                .parse::<PauseTarget>()
                .expect("valid"),
            PauseTarget::Cgroup("/sys/fs/cgroup/app".into())
        );
        assert_eq!(
            "qmp:/run/vm.qmp".parse::<PauseTarget>().expect("valid"),
            PauseTarget::Qmp("/run/vm.qmp".into())
        );
        assert_eq!(
            "qemu:/run/vm.qmp@tcp:dst:4444"
                .parse::<PauseTarget>()
                .expect("valid"),
            PauseTarget::QemuMigrate {
                socket: "/run/vm.qmp".into(),
                uri: "tcp:dst:4444".into()
            }
        );
        assert_eq!(
            "cmd:docker pause db;;docker unpause db"
                .parse::<PauseTarget>()
                .expect("valid"),
            PauseTarget::Command {
                pause: "docker pause db".into(),
                resume: "docker unpause db".into()
            }
        );
    }

    #[test]
    fn command_keeps_colons_and_splits_at_the_first_double_semicolon() {
        let t: PauseTarget = "cmd:echo a:b;;echo c;;d".parse().expect("valid");
        assert_eq!(
            t,
            PauseTarget::Command {
                pause: "echo a:b".into(),
                resume: "echo c;;d".into()
            }
        );
    }

    #[test]
    fn bad_input_is_one_line_naming_the_accepted_forms() {
        for bad in [
            "",
            "/mnt/data",
            "freeze:/x",
            "fsfreeze:",
            "cgroup:",
            "qmp:",
            "qemu:/run/vm.qmp",
            "qemu:@tcp:dst:4444",
            "qemu:/run/vm.qmp@",
            "cmd:stop",
            "cmd:;;start",
            "cmd:stop;; ",
        ] {
            let e = bad.parse::<PauseTarget>().expect_err(bad).to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(
                e.contains("fsfreeze:/mnt/data") && e.contains("cmd:PAUSE_CMD;;RESUME_CMD"),
                "{e}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "fsfreeze:/a b",
            "cgroup:/sys/fs/cgroup/x",
            "qmp:/run/q",
            "qemu:/run/q@unix:/run/migrate.sock",
            "cmd:a;;b",
        ] {
            assert_eq!(s.parse::<PauseTarget>().expect("valid").to_string(), s);
        }
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/x\\y"), r"/x\\y");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn root_is_a_mount_point_and_proc_self_is_not() {
        assert!(is_mount_point(Path::new("/")).expect("mountinfo readable"));
        assert!(!is_mount_point(Path::new("/proc/self")).expect("mountinfo readable"));
    }

    #[tokio::test]
    async fn fsfreeze_refuses_a_directory_that_is_not_a_mount_point() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = PauseTarget::Fsfreeze(dir.path().into())
            .pause()
            .await
            .expect_err("not a mount point");
        assert!(matches!(e, PauseError::NotMountPoint(_)), "{e}");
    }

    #[tokio::test]
    async fn cgroup_refuses_a_plain_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = PauseTarget::Cgroup(dir.path().into())
            .pause()
            .await
            .expect_err("not a cgroup");
        assert!(matches!(e, PauseError::NotCgroup2 { .. }), "{e}");
    }

    #[tokio::test]
    async fn failing_command_reports_its_stderr_tail() {
        let t: PauseTarget = "cmd:echo first >&2; echo boom >&2; exit 3;;true"
            .parse()
            .expect("valid");
        let e = t.pause().await.expect_err("exit 3").to_string();
        assert!(e.contains("boom") && e.contains('3'), "{e}");
    }

    #[tokio::test]
    async fn command_pause_then_resume_runs_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("log");
        let l = log.display();
        let t = PauseTarget::Command {
            pause: format!("echo pause >> '{l}'"),
            resume: format!("echo resume >> '{l}'"),
        };
        t.pause()
            .await
            .expect("pause")
            .resume()
            .await
            .expect("resume");
        // A dropped Paused resumes too, synchronously.
        drop(t.pause().await.expect("pause"));
        t.pause().await.expect("pause").keep();
        let text = std::fs::read_to_string(&log).expect("log written");
        assert_eq!(text, "pause\nresume\npause\nresume\npause\n");
    }

    #[tokio::test]
    async fn a_pause_command_that_fails_part_way_is_resumed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("log");
        let l = log.display();
        let t = PauseTarget::Command {
            pause: format!("echo pause >> '{l}'; exit 1"),
            resume: format!("echo resume >> '{l}'"),
        };
        t.pause().await.expect_err("exit 1");
        let text = std::fs::read_to_string(&log).expect("log written");
        assert_eq!(text, "pause\nresume\n");
    }
}
