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
//!   `qemu-postcopy:SOCKET@URI` the same with QEMU's `postcopy-ram`: the VM
//!   stops after QEMU's first pass over RAM, and runs on the destination
//!   while QEMU fetches its remaining pages on demand;
//! - `cmd:PAUSE;;RESUME`: two shell commands;
//! - a libvirt domain ([`LibvirtMigration`], not typed on a command line):
//!   libvirt's own migration with `--suspend`; the pause returns when the
//!   source has stopped (`pre-switchover`), and the switch waits until the
//!   destination holds the domain, paused;
//! - a [`PauseGroup`] (not typed on a command line): one of the above shared
//!   by the migrations of one VM's disks, paused once, switched all or none.
//!
//! Not covered: the agent itself dying (SIGKILL) while the workload is paused
//! runs no destructor; a watchdog outside the process is needed for that.
//!
//! One file per back end (`fsfreeze`, `cgroup`, `qmp`, `qemu_migrate`,
//! `command`), and the QMP client they share in `qmp_client`; this file holds
//! the target, the error and the [`Paused`] guard that resumes.

mod cgroup;
mod command;
mod fsfreeze;
mod group;
mod libvirt;
mod qemu_migrate;
mod qmp;
mod qmp_client;
mod virsh;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

pub use group::{GroupAbort, PauseGroup, Step};
pub use libvirt::LibvirtMigration;
pub use qmp::ignore_shared_ram;
pub use qmp_client::Qmp;
pub use virsh::{Virsh, VirshError};

/// The accepted forms, quoted by every parse error.
const FORMS: &str = "fsfreeze:/mnt/data, cgroup:/sys/fs/cgroup/app, qmp:/run/vm.qmp, \
     qemu:/run/vm.qmp@tcp:dst:4444, qemu-postcopy:/run/vm.qmp@tcp:dst:4444 or \
     cmd:PAUSE_CMD;;RESUME_CMD";

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
    /// The group of migrations this one belongs to gave up (another disk
    /// failed, or the pause did): the workload runs on the source.
    #[error("the VM's migration gave up: {0}")]
    GroupAborted(#[source] GroupAbort),
    /// The group's hand-over of the workload failed (one part made it for all).
    #[error("handing the VM over failed: {0}")]
    GroupHandOver(#[source] std::sync::Arc<PauseError>),
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
    /// libvirt (through virsh) failed.
    #[error(transparent)]
    Virsh(#[from] VirshError),
    /// A libvirt domain was not in the state the operation starts from.
    #[error("domain {domain} is {state}, expected running; Tern migrates a running domain")]
    DomainState { domain: String, state: String },
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
    /// With `postcopy_ram`, QEMU's RAM goes in post-copy (`postcopy-ram`):
    /// the VM stops after the first pass, the rest is fetched on demand.
    QemuMigrate {
        socket: PathBuf,
        uri: String,
        postcopy_ram: bool,
    },
    /// Run `pause` to pause and `resume` to resume, each through `sh -c`.
    Command { pause: String, resume: String },
    /// Migrate a libvirt domain with libvirt (`--suspend`): paused once the
    /// source has stopped; switched once the destination holds the domain.
    Libvirt(LibvirtMigration),
    /// A member of a group of migrations sharing one pause of the workload.
    Group(std::sync::Arc<PauseGroup>),
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
            "qemu" | "qemu-postcopy" => {
                let (socket, uri) = rest.split_once('@').ok_or_else(|| {
                    bad("qemu: needs SOCKET@URI (the destination's -incoming URI)")
                })?;
                if socket.is_empty() || uri.is_empty() {
                    return Err(bad("the socket or the URI is empty"));
                }
                Ok(Self::QemuMigrate {
                    socket: PathBuf::from(socket),
                    uri: uri.to_owned(),
                    postcopy_ram: kind == "qemu-postcopy",
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
            Self::QemuMigrate {
                socket,
                uri,
                postcopy_ram,
            } => write!(
                f,
                "{}:{}@{uri}",
                if *postcopy_ram {
                    "qemu-postcopy"
                } else {
                    "qemu"
                },
                socket.display()
            ),
            Self::Command { pause, resume } => write!(f, "cmd:{pause};;{resume}"),
            Self::Libvirt(m) => write!(f, "libvirt:{}@{}", m.domain, m.destination_uri),
            Self::Group(g) => write!(f, "{} (shared by {})", g.target(), g.members()),
        }
    }
}

impl PauseTarget {
    /// Pauses the workload. Dropping the future part way leaves it running.
    #[tracing::instrument(skip_all, fields(target = %self))]
    pub async fn pause(&self) -> Result<Paused, PauseError> {
        let started = Instant::now();
        let paused = match self {
            Self::Fsfreeze(mount) => fsfreeze::freeze(mount).await?,
            Self::Cgroup(dir) => cgroup::freeze(dir).await?,
            Self::Qmp(socket) => qmp::stop(socket).await?,
            Self::QemuMigrate {
                socket,
                uri,
                postcopy_ram,
            } => qemu_migrate::start(socket, uri, *postcopy_ram).await?,
            Self::Command { pause, resume } => command::pause(pause, resume).await?,
            Self::Libvirt(m) => libvirt::start(m).await?,
            Self::Group(group) => group.pause().await?,
        };
        tracing::info!(took = ?started.elapsed(), "workload paused");
        Ok(paused)
    }

    /// Whether the workload keeps running for a while inside [`PauseTarget::pause`]
    /// (QEMU's RAM precopy), so that replication should go on meanwhile.
    pub fn runs_while_pausing(&self) -> bool {
        // A group member waits for the others while the workload runs.
        matches!(
            self,
            Self::QemuMigrate { .. } | Self::Libvirt(_) | Self::Group(_)
        )
    }

    /// Resumes a workload that an earlier process paused and left paused
    /// (`tern rollback --resume` after a `tern migrate` that cut over).
    pub async fn resume_now(&self) -> Result<(), PauseError> {
        match self {
            Self::Fsfreeze(mount) => {
                let dir = File::open(mount).map_err(io_err("open", mount))?;
                fsfreeze::thaw(mount, &dir)
            }
            Self::Cgroup(dir) => cgroup::thaw(dir),
            Self::Qmp(socket) | Self::QemuMigrate { socket, .. } => {
                let mut qmp = Qmp::connect(socket).await?;
                qmp::cont(&mut qmp, socket).await
            }
            Self::Command { resume, .. } => command::run_shell(resume).await,
            Self::Libvirt(m) => libvirt::back(m, None).await,
            Self::Group(group) => Box::pin(group.target().resume_now()).await,
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
        /// The hand-over ends at `postcopy-active`, not `completed`.
        postcopy_ram: bool,
    },
    Command {
        resume: String,
    },
    /// The source stopped at `pre-switchover`; libvirt's migration goes on
    /// until the destination holds the domain, and `virsh migrate` returns
    /// after libvirt ended the source.
    Libvirt {
        m: Box<LibvirtMigration>,
        migration: libvirt::Migration,
    },
    /// A share of a group's one hold.
    Group(std::sync::Arc<PauseGroup>),
}

impl fmt::Debug for Paused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.hold {
            Some(Hold::Fsfreeze { mount, .. }) => format!("fsfreeze:{}", mount.display()),
            Some(Hold::Cgroup { dir }) => format!("cgroup:{}", dir.display()),
            Some(Hold::Qmp { socket, .. }) => format!("qmp:{}", socket.display()),
            Some(Hold::QemuMigrate { socket, .. }) => format!("qemu:{}", socket.display()),
            Some(Hold::Command { resume }) => format!("cmd:;;{resume}"),
            Some(Hold::Libvirt { m, .. }) => format!("libvirt:{}", m.domain),
            Some(Hold::Group(g)) => format!("group of {}: {}", g.members(), g.target()),
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
            Some(Hold::Fsfreeze { mount, dir }) => fsfreeze::thaw(mount, dir),
            Some(Hold::Cgroup { dir }) => cgroup::thaw(dir),
            Some(Hold::Qmp { socket, qmp }) => qmp::cont(qmp, socket).await,
            Some(Hold::QemuMigrate { socket, qmp, .. }) => qemu_migrate::cancel(qmp, socket).await,
            Some(Hold::Command { resume }) => command::run_shell(resume).await,
            Some(Hold::Libvirt { m, migration }) => libvirt::back(m, Some(migration)).await,
            Some(Hold::Group(group)) => group.resume().await,
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
    /// completed; for libvirt the destination resumes; the others stay
    /// paused for good ([`Paused::keep`]). A failed hand-over leaves the VM
    /// as it is, never resumed here: its disk has switched (`tern rollback
    /// --resume` brings a `qemu:` VM back; docs/migration.md says how for
    /// libvirt).
    pub async fn hand_over(mut self) -> Result<(), PauseError> {
        if let Some(Hold::Group(group)) = &self.hold {
            // The group hands over once every member is here; never resumed
            // from here (the disks have switched).
            let group = std::sync::Arc::clone(group);
            self.hold = None;
            return group.hand_over().await;
        }
        if let Some(Hold::Libvirt { m, migration }) = &self.hold {
            let started = Instant::now();
            let result = libvirt::hand_over(m, migration).await;
            // Never migrated back from here: the disks have switched.
            self.hold = None;
            result?;
            tracing::info!(took = ?started.elapsed(), "the domain runs on the destination");
            return Ok(());
        }
        if let Some(Hold::QemuMigrate {
            socket,
            qmp,
            postcopy_ram,
        }) = self.hold.as_mut()
        {
            let started = Instant::now();
            match qemu_migrate::continue_to_completion(qmp, socket, *postcopy_ram).await {
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

    /// This member's say in a decision of its group (see [`PauseGroup`]):
    /// every member's `ok`, or false once the group gave up. Outside a
    /// group, `ok` itself.
    pub async fn agree(&self, step: Step, ok: bool) -> bool {
        // A switch also needs the workload's own hand-over to be possible
        // (libvirt: the destination holds the domain).
        let ok = if step == Step::Switch && ok {
            self.ready_to_switch().await
        } else {
            ok
        };
        match &self.hold {
            Some(Hold::Group(group)) => group.agree(step, ok).await,
            _ => ok,
        }
    }

    /// Whether the workload can be handed over once the disks switch:
    /// always, but for libvirt, whose migration goes on past the pause
    /// until the destination holds the domain (false: it failed first).
    async fn ready_to_switch(&self) -> bool {
        match &self.hold {
            Some(Hold::Libvirt { migration, .. }) => migration.held().await,
            Some(Hold::Group(group)) => match group.held_migration() {
                Some(held) => held.await,
                None => true,
            },
            _ => true,
        }
    }

    /// For a group: a future telling whether the hold's libvirt migration
    /// reached the destination (see [`Paused::ready_to_switch`]).
    fn held_migration(&self) -> Option<impl std::future::Future<Output = bool> + use<>> {
        match &self.hold {
            Some(Hold::Libvirt { migration, .. }) => {
                let migration = migration.clone();
                Some(async move { migration.held().await })
            }
            _ => None,
        }
    }

    /// Why this part's group gave up, if it did (and this is a group's part).
    pub fn group_abort(&self) -> Option<GroupAbort> {
        match &self.hold {
            Some(Hold::Group(group)) => group.why(),
            _ => None,
        }
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
            Hold::Fsfreeze { mount, dir } => fsfreeze::thaw(&mount, &dir),
            Hold::Cgroup { dir } => cgroup::thaw(&dir),
            Hold::Qmp { socket, qmp } => qmp.commands_blocking(&socket, &["cont"]),
            // Cancelling resumes the VM; `cont` makes sure of it.
            Hold::QemuMigrate { socket, qmp, .. } => {
                qmp.commands_blocking(&socket, &["migrate_cancel", "cont"])
            }
            Hold::Command { resume } => command::run_shell_blocking(&resume),
            Hold::Libvirt { m, migration } => libvirt::back_blocking(&m, &migration),
            Hold::Group(group) => {
                group.abandon();
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
                uri: "tcp:dst:4444".into(),
                postcopy_ram: false,
            }
        );
        let post = "qemu-postcopy:/run/vm.qmp@unix:/run/m.sock";
        let t = post.parse::<PauseTarget>().expect("valid");
        assert_eq!(
            t,
            PauseTarget::QemuMigrate {
                socket: "/run/vm.qmp".into(),
                uri: "unix:/run/m.sock".into(),
                postcopy_ram: true,
            }
        );
        assert_eq!(t.to_string(), post);
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
            "qemu-postcopy:/run/vm.qmp",
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
}
