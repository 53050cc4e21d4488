//! Shared by the tracer's integration tests: commands and throwaway loop devices.
#![allow(dead_code)]

pub mod lab;
pub mod migration;

use std::path::PathBuf;
use std::process::Command;

/// Runs a command that must succeed; returns its trimmed standard output.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a sparse file in its own directory, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
    pub dir: tempfile::TempDir,
}

impl LoopDev {
    pub fn new(size: &str) -> LoopDev {
        let dir = tempfile::Builder::new()
            .prefix("tern-test")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let img = dir.path().join("disk.img");
        sh(Command::new("truncate").args(["-s", size]).arg(&img));
        let dev = sh(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        LoopDev {
            dev: PathBuf::from(dev),
            dir,
        }
    }

    pub fn path(&self) -> &str {
        self.dev.to_str().expect("device paths are UTF-8")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
