//! The `cmd:PAUSE;;RESUME` back end: two shell commands, each run through
//! `sh -c`; a failure reports the tail of its standard error.

use std::path::Path;

use super::{Hold, PauseError, Paused, io_err};

/// How much of a failed command's standard error goes into the error.
const STDERR_TAIL: usize = 512;

/// Runs `pause_command`; the returned [`Paused`] runs `resume_command`.
pub(super) async fn pause(pause_command: &str, resume_command: &str) -> Result<Paused, PauseError> {
    // Guard first: a pause command that fails or is cancelled part
    // way may have paused some of the workload; resume runs then.
    let paused = Paused::new(Hold::Command {
        resume: resume_command.to_owned(),
    });
    run_shell(pause_command).await?;
    Ok(paused)
}

/// Runs `command` through `sh -c`; it is killed if this future is dropped.
pub(super) async fn run_shell(command: &str) -> Result<(), PauseError> {
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

/// [`run_shell`] without a runtime, for `Drop`.
pub(super) fn run_shell_blocking(command: &str) -> Result<(), PauseError> {
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
    use crate::pause::PauseTarget;

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
