//! The `cgroup:DIR` back end: the cgroup v2 freezer (`cgroup.freeze`), which
//! stops every process of a non-root cgroup until it is thawed.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Hold, PauseError, Paused, io_err};

/// How long the cgroup freezer may take to report `frozen 1`.
const CGROUP_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// `statfs` magic of a cgroup v2 file system (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

/// Freezes the cgroup `dir` and waits until it reports `frozen 1`.
pub(super) async fn freeze(dir: &Path) -> Result<Paused, PauseError> {
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
    write_freeze(dir, "1")?;
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

/// Thaws the cgroup `dir`.
pub(super) fn thaw(dir: &Path) -> Result<(), PauseError> {
    write_freeze(dir, "0")
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

fn write_freeze(dir: &Path, value: &str) -> Result<(), PauseError> {
    let file = dir.join("cgroup.freeze");
    std::fs::write(&file, value).map_err(io_err("write", &file))
}

fn read_trimmed(path: &Path) -> Result<String, PauseError> {
    Ok(std::fs::read_to_string(path)
        .map_err(io_err("read", path))?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pause::PauseTarget;

    #[tokio::test]
    async fn cgroup_refuses_a_plain_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = PauseTarget::Cgroup(dir.path().into())
            .pause()
            .await
            .expect_err("not a cgroup");
        assert!(matches!(e, PauseError::NotCgroup2 { .. }), "{e}");
    }
}
