//! Azurite, Microsoft's Azure Storage emulator, which the `az://` history and
//! staging tests run against, with the Azure SDK's blob client (the tests make
//! their container with it): npm packages installed once in
//! `~/.cache/tern/azurite` (the tests find them there).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::sh::run;

/// The versions installed: pinned, so every run tests against the same emulator.
const PACKAGES: &[&str] = &["azurite@3.37.0", "@azure/storage-blob@12.34.0"];

/// Where the packages go.
pub fn dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
        PathBuf::from,
    );
    cache.join("tern/azurite")
}

/// Installs Azurite unless it is already there.
pub fn install() -> Result<()> {
    let dir = dir();
    if dir.join("node_modules/.bin/azurite-blob").is_file()
        && dir.join("node_modules/@azure/storage-blob").is_dir()
    {
        return Ok(());
    }
    if Command::new("npm").arg("--version").output().is_err() {
        bail!(
            "npm is not installed: the az:// tests need it to install Azurite (install Node.js with npm)"
        );
    }
    eprintln!(
        "xtask: installing Azurite (the Azure Blob Storage emulator of the az:// tests) in {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&dir)
        .args(PACKAGES))
}
