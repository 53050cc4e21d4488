//! Child processes that cannot outlive the test: killed on drop, and killed
//! by the kernel if the thread that started them dies without dropping.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Whether we run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `cmd`'s child die (SIGKILL) when the spawning thread exits.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs a command to its end within `limit`, collecting its output as it
/// comes (a full pipe must not stall it); panics if it cannot start or runs
/// over (it is killed then). The exit status is the caller's to judge.
pub fn run_for(cmd: &mut Command, limit: Duration) -> Output {
    let child = die_with_parent(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(limit) else {
        // SAFETY: kill(2) on our own child's pid; the waiter thread has not
        // reaped it (it is still waiting), so the pid is still ours.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = waiter.join();
        panic!("{cmd:?} ran over {limit:?}");
    };
    let _ = waiter.join();
    out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// Runs a command that must succeed within `limit`; returns its stdout.
pub fn sh(cmd: &mut Command, limit: Duration) -> String {
    let what = format!("{cmd:?}");
    let out = run_for(cmd, limit);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running child, killed and reaped when dropped.
pub struct Guard {
    child: Option<Child>,
    /// For messages: what this child is.
    pub name: String,
}

impl Guard {
    pub fn new(child: Child, name: &str) -> Guard {
        Guard {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    /// Spawns `cmd` so that it dies with this thread, and guards it.
    pub fn spawn(cmd: &mut Command, name: &str) -> Guard {
        let child = die_with_parent(cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Guard::new(child, name)
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The child's exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waitpid on our own child"))
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Hands the child over; the guard no longer kills it.
    pub fn take(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}
