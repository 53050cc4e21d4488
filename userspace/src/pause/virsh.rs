//! One libvirt connection, driven through `virsh`.
//!
//! Why virsh and not libvirt's C library: building Tern then needs no
//! libvirt headers, and virsh is installed wherever libvirtd is. A call is a
//! command whose stderr is the error's text; [`Virsh::run`] bounds it in
//! time, the migration's callers bound theirs, and [`Virsh::run_blocking`]
//! (for destructors) is not bounded.

use std::process::Stdio;
use std::time::Duration;

/// How long one virsh command may take (but `migrate`, which its caller
/// times: RAM precopy lasts as long as it lasts).
const VIRSH_LIMIT: Duration = Duration::from_mins(2);

/// Errors of running virsh.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    /// virsh could not be started.
    #[error("cannot run virsh: {0} (install libvirt-clients; Tern drives libvirt through virsh)")]
    Spawn(#[source] std::io::Error),
    /// virsh ran and failed.
    #[error("`virsh {command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    /// virsh took longer than its limit.
    #[error("`virsh {command}` did not finish within {limit:?}")]
    TimedOut { command: String, limit: Duration },
}

/// One libvirt connection, as virsh opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virsh {
    /// `None`: virsh's default (`LIBVIRT_DEFAULT_URI`, else `qemu:///system`
    /// for root).
    uri: Option<String>,
}

impl Virsh {
    pub fn new(uri: Option<&str>) -> Virsh {
        Virsh {
            uri: uri.map(str::to_owned),
        }
    }

    /// `virsh [-c URI] ARGS`, ready to run.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("virsh");
        if let Some(uri) = &self.uri {
            cmd.args(["-c", uri]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `virsh ARGS` and returns its standard output.
    pub async fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        let out = tokio::time::timeout(VIRSH_LIMIT, self.command(args).output())
            .await
            .map_err(|_| VirshError::TimedOut {
                command: args.join(" "),
                limit: VIRSH_LIMIT,
            })?
            .map_err(VirshError::Spawn)?;
        self.checked(args, &out)
    }

    /// [`Virsh::run`] for a destructor, which cannot await.
    pub fn run_blocking(&self, args: &[&str]) -> Result<String, VirshError> {
        let mut cmd = std::process::Command::new("virsh");
        if let Some(uri) = &self.uri {
            cmd.args(["-c", uri]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(VirshError::Spawn)?;
        self.checked(args, &out)
    }

    /// The output of a finished virsh, or its failure.
    pub fn checked(&self, args: &[&str], out: &std::process::Output) -> Result<String, VirshError> {
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(VirshError::Failed {
            command: self
                .uri
                .iter()
                .flat_map(|u| ["-c", u.as_str()])
                .chain(args.iter().copied())
                .collect::<Vec<_>>()
                .join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// The domain's state word (`running`, `paused`, `shut off`, …).
    pub async fn state(&self, name: &str) -> Result<String, VirshError> {
        Ok(self.run(&["domstate", name]).await?.trim().to_owned())
    }
}
