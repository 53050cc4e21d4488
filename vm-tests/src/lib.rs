//! The harness of Tern's QEMU VM tests: guests built from Debian kernels and a
//! busybox initramfs, booted under TCG with one vCPU, driven over QMP, and
//! the `tern` processes around them.
//!
//! This is test support: every failure panics with what went wrong, and every
//! process, socket and file it makes is removed on every path (guards that
//! kill on drop, children that die with the thread that started them).

pub mod guest;
pub mod lab;
pub mod libvirt;
pub mod libvirt_scenario;
pub mod process;
pub mod scenario;
pub mod vm;

use std::path::PathBuf;

/// Where downloaded kernels are kept between runs (`TERN_VM_CACHE` overrides).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TERN_VM_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/tern-vm"), PathBuf::from)
}

/// A scratch directory for one test, removed when dropped.
pub fn scratch(name: &str) -> tempfile::TempDir {
    // Paths go into shell commands (Tern's hooks): keep them to a plain slug.
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    tempfile::Builder::new()
        .prefix(&format!("tern-vm-{slug}-"))
        .tempdir_in("/var/tmp")
        .expect("a scratch directory in /var/tmp")
}

/// Whether this machine can run the VM tier (root, QEMU, busybox).
pub fn missing_prerequisite() -> Option<String> {
    if !process::is_root() {
        return Some("the VM tests need root (tracing, QEMU sockets)".to_owned());
    }
    for tool in [
        "/usr/bin/qemu-system-x86_64",
        "/bin/busybox",
        "/usr/bin/cpio",
        "/usr/sbin/mkfs.ext4",
    ] {
        if !std::path::Path::new(tool).exists() {
            return Some(format!("{tool} is missing; run `cargo xtask setup`"));
        }
    }
    None
}

/// Saves a result (a table) where `cargo xtask vm-test` prints it from:
/// `$CARGO_TARGET_DIR/vm/NAME` (or `target/vm/NAME`).
pub fn write_result(name: &str, text: &str) {
    std::fs::write(result_path(name), text).expect("write a VM test result");
}

/// Where a VM test result named `name` goes: `target/vm/` (`CARGO_TARGET_DIR`
/// respected), created if missing.
pub fn result_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("vm");
    std::fs::create_dir_all(&dir).expect("create target/vm");
    dir.join(name)
}
