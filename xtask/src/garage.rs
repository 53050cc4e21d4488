//! Garage, the S3-compatible server the history tests run against: installed
//! with `cargo install garage --locked` (about 12 minutes once; the binary
//! stays in `~/.cargo/bin`, so later runs skip it).

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::sh::{cargo, run};

/// Where `garage` is: on PATH or in `~/.cargo/bin`.
pub fn find() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

/// Installs Garage unless it is already there.
pub fn install() -> Result<()> {
    if find().is_some() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing garage (the S3 server of the history tests; about 12 minutes once)"
    );
    run(cargo().args(["install", "garage", "--locked"]))
}
