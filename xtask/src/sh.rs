//! Running commands, and installing what Tern needs on a fresh Debian machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Debian packages the build and the demo need, and nothing more: the demo is
/// a new user's first command (`Need::Demo`).
const DEMO_PACKAGES: &[&str] = &[
    // the eBPF object (common/build.rs): clang, the kernel's types, libbpf's headers, bindgen
    "clang-19",
    "libclang-19-dev",
    "libbpf-dev",
    "bpftool",
    // the demo's workload and checks
    "fio",
    "sqlite3",
    "e2fsprogs",
    "util-linux",
];

/// What the tests, VM tests and benchmarks add to the demo's packages.
const TEST_PACKAGES: &[&str] = &[
    "llvm-19",
    "bpftrace",
    "blktrace",
    "nbdkit",
    "libnbd-bin",
    "rsync",
    // the README's metrics example (`cargo xtask readme`)
    "curl",
    "iproute2",
    "busybox-static",
    "cpio",
    "xz-utils",
    // real programs traced by `cargo xtask traces` and the analyzer's tests
    "postgresql",
    "postgresql-contrib",
    "git",
    "make",
    "gcc",
    // the heatmaps' axis labels
    "fonts-dejavu-core",
    "gdisk",
    "fdisk",
    "binutils",
    // `systemd-analyze verify` of the agents' units (packaging/systemd)
    "systemd",
    // the libvirt VM test's two private daemons (vm-tests/src/libvirt.rs),
    // started by hand: nothing here needs systemd running
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
];

/// Packages that must come from `bookworm-backports` on Debian 12: bookworm's
/// own QEMU is 7.2, and installing its `qemu-system-x86` beside a backports
/// `qemu-utils` (10.x) removes `qemu-utils`. Taking both from backports keeps
/// them at one version. On later releases they come from the main suite.
/// The demo needs only `qemu-img` (its NBD compare).
const DEMO_BACKPORTS: &[&str] = &["qemu-utils"];
const TEST_BACKPORTS: &[&str] = &["qemu-system-x86"];
const BACKPORTS_SUITE: &str = "bookworm-backports";
/// Written only when no apt source mentions the backports suite yet.
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/tern-bookworm-backports.sources";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo_root());
    c
}

/// Runs a command, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run it with sudo (or as root, as CI does)");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// apt-get with retries while another apt holds the lock.
fn apt(args: &[&str]) -> Result<()> {
    for attempt in 1..=30 {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("cannot run apt-get (is this Debian?)")?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("lock") && attempt < 30 {
            eprintln!("xtask: apt is busy (lock held), retrying in 5 s ({attempt}/30)");
            std::thread::sleep(Duration::from_secs(5));
            continue;
        }
        bail!("apt-get {} failed: {}\n{err}", args.join(" "), out.status);
    }
    bail!("apt-get {}: the apt lock stayed busy", args.join(" "))
}

/// What a command needs installed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The build and the demo.
    Demo,
    /// Everything: tests, VM tests, benchmarks, trace recordings (Garage included).
    All,
}

/// Installs missing packages and mounts tracefs; does nothing when all is there.
pub fn setup(need: Need) -> Result<()> {
    let wanted = |demo: &[&'static str], test: &[&'static str]| -> Vec<&'static str> {
        let mut v = demo.to_vec();
        if need == Need::All {
            v.extend_from_slice(test);
        }
        v.retain(|p| !installed(p));
        v
    };
    let missing = wanted(DEMO_PACKAGES, TEST_PACKAGES);
    let missing_bpo = wanted(DEMO_BACKPORTS, TEST_BACKPORTS);
    if !missing.is_empty() || !missing_bpo.is_empty() {
        require_root("installing packages")?;
        eprintln!(
            "xtask: installing {}",
            [&missing[..], &missing_bpo[..]].concat().join(" ")
        );
        let bookworm = debian_codename().as_deref() == Some("bookworm");
        if bookworm && !missing_bpo.is_empty() {
            add_backports_source()?;
        }
        apt(&["update", "-qq"])?;
        let install = ["install", "-y", "-qq", "--no-install-recommends"];
        if !missing.is_empty() {
            apt(&[&install[..], &missing[..]].concat())?;
        }
        if !missing_bpo.is_empty() {
            let suite: &[&str] = if bookworm {
                &["-t", BACKPORTS_SUITE]
            } else {
                &[]
            };
            apt(&[&install[..], suite, &missing_bpo[..]].concat())?;
        }
    }
    if is_root() && !Path::new("/sys/kernel/tracing/events").exists() {
        run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }
    if need == Need::All {
        crate::garage::install()?;
        crate::azurite::install()?;
    }
    Ok(())
}

/// `VERSION_CODENAME` from /etc/os-release.
fn debian_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
}

/// Adds `bookworm-backports` beside the machine's own Debian source (same
/// mirror, same keyring), unless some source already names it; idempotent.
fn add_backports_source() -> Result<()> {
    let mut sources = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        sources.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    let texts: Vec<String> = sources
        .iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "list" || e == "sources")
                || p.ends_with("sources.list")
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    if texts.iter().any(|t| {
        t.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains(BACKPORTS_SUITE))
    }) {
        return Ok(());
    }
    let (uri, keyring) = texts
        .iter()
        .find_map(|t| debian_source(t))
        .context("no Debian bookworm apt source found to add bookworm-backports beside")?;
    let signed_by = keyring
        .map(|k| format!("Signed-By: {k}\n"))
        .unwrap_or_default();
    let stanza = format!(
        "Types: deb\nURIs: {uri}\nSuites: {BACKPORTS_SUITE}\nComponents: main\n{signed_by}"
    );
    eprintln!("xtask: adding {BACKPORTS_SUITE} ({uri}) in {BACKPORTS_SOURCE}");
    std::fs::write(BACKPORTS_SOURCE, stanza)
        .with_context(|| format!("cannot write {BACKPORTS_SOURCE}"))
}

/// The mirror URI and keyring of the plain `bookworm` suite in one source
/// file, deb822 (`.sources`) or one-line (`.list`) format.
fn debian_source(text: &str) -> Option<(String, Option<String>)> {
    // deb822: blank-line separated stanzas of `Key: value`.
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
            })
        };
        let suites = field("Suites").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == "bookworm") {
            let uri = field("URIs")?.split_whitespace().next()?.to_owned();
            return Some((uri, field("Signed-By")));
        }
    }
    // One-line: `deb [signed-by=K] URI bookworm main ...`.
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let (opts, rest) = match rest.trim_start().strip_prefix('[') {
            Some(r) => r.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some("bookworm")) = (words.next(), words.next()) else {
            continue;
        };
        let keyring = opts
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_owned);
        return Some((uri.to_owned(), keyring));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::debian_source;

    #[test]
    fn finds_the_bookworm_source_in_deb822_and_one_line_form() {
        let deb822 = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            debian_source(deb822),
            Some((
                "http://mirror.invalid/debian".to_owned(),
                Some("/usr/share/keyrings/debian-archive-keyring.gpg".to_owned())
            ))
        );
        let one_line = "deb http://security.invalid/ bookworm-security main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://mirror/debian bookworm main\n";
        assert_eq!(
            debian_source(one_line),
            Some(("http://mirror/debian".to_owned(), Some("/k.gpg".to_owned())))
        );
        assert_eq!(debian_source("deb http://x/ trixie main\n"), None);
    }
}
