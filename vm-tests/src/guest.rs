//! The guest: a Debian kernel fetched with apt, a busybox initramfs whose
//! `/init` (`guest/init.sh`) runs the scenario named on the kernel command
//! line, and ext4 disk images made without mounting.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::sh;

/// The guest's `/init`.
const INIT: &str = include_str!("../guest/init.sh");
/// Sourced by `/init` for the tracer scenario.
const TRACE: &str = include_str!("../guest/trace.sh");

/// Modules the guest needs for a virtio disk with ext4, in load order. The
/// ones a kernel builds in are absent from its package and skipped.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "crc32c_generic",
    "libcrc32c",
    "mbcache",
    "jbd2",
    "ext4",
];

const APT_LIMIT: Duration = Duration::from_mins(5);

/// Which Debian kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// bookworm's own kernel (6.1).
    Bookworm,
    /// The bookworm-backports kernel (6.12 at the time of writing).
    Backports,
}

/// A kernel ready to boot: its image and its modules, uncompressed, in load order.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// Fetches (once; later runs reuse the cache) the suite's current kernel.
    pub fn get(suite: Suite) -> Kernel {
        let package = kernel_package(suite);
        let dir = crate::cache_dir().join(&package);
        if !dir.join("ready").exists() {
            fetch(&package, &dir);
        }
        let release =
            fs::read_to_string(dir.join("ready")).expect("the cache marker names the release");
        let release = release.trim().to_owned();
        let modules = MODULES
            .iter()
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .filter(|p| p.exists())
            .collect();
        Kernel {
            vmlinuz: dir.join("vmlinuz"),
            release,
            modules,
        }
    }
}

/// The versioned package behind `linux-image-amd64` in the suite.
fn kernel_package(suite: Suite) -> String {
    let show = || {
        let out = crate::process::run_for(
            Command::new("apt-cache").args(["show", "linux-image-amd64"]),
            APT_LIMIT,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut text = show();
    if !text.contains("Depends:") {
        sh(Command::new("apt-get").args(["update", "-qq"]), APT_LIMIT);
        text = show();
    }
    let mut best: Option<(String, String)> = None;
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
        };
        let (Some(version), Some(depends)) = (field("Version:"), field("Depends:")) else {
            continue;
        };
        if version.contains("bpo") != (suite == Suite::Backports) {
            continue;
        }
        let Some(pkg) = depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-"))
        else {
            continue;
        };
        let newer = best.as_ref().is_none_or(|(v, _)| version_gt(&version, v));
        if newer {
            best = Some((version, pkg.to_owned()));
        }
    }
    best.map_or_else(|| {
        panic!(
            "no linux-image-amd64 for {suite:?} in apt; add the bookworm-backports source (`cargo xtask setup` does) and run apt-get update"
        )
    }, |(_, p)| p)
}

fn version_gt(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// Downloads the package and keeps only vmlinuz and the modules we load.
fn fetch(package: &str, dir: &Path) {
    let parent = dir.parent().expect("the cache dir has a parent");
    fs::create_dir_all(parent).expect("create the kernel cache");
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(parent)
        .expect("a temp dir in the kernel cache");
    sh(
        Command::new("apt-get")
            .args(["download", "-qq", package])
            .current_dir(work.path()),
        APT_LIMIT,
    );
    let deb = fs::read_dir(work.path())
        .expect("list the download dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("apt-get download {package} left no .deb"));
    let tree = work.path().join("tree");
    fs::create_dir(&tree).expect("mkdir tree");
    // Only the pieces we boot with: the package holds hundreds of MB of modules.
    let mut wanted = vec!["./boot/vmlinuz-*".to_owned()];
    wanted.extend(MODULES.iter().map(|m| format!("*/{m}.ko*")));
    // tar names the patterns that matched nothing (modules a kernel builds
    // in) and exits non-zero; vmlinuz is checked below instead.
    sh(
        Command::new("sh")
            .arg("-c")
            .arg(
                "deb=$1; tree=$2; shift 2; \
                 dpkg-deb --fsys-tarfile \"$deb\" | tar -x -C \"$tree\" --wildcards --no-anchored \"$@\" 2>/dev/null; true",
            )
            .arg("sh")
            .arg(&deb)
            .arg(&tree)
            .args(&wanted),
        APT_LIMIT,
    );
    let out = work.path().join("out");
    fs::create_dir_all(out.join("modules")).expect("mkdir modules");
    let vmlinuz = fs::read_dir(tree.join("boot"))
        .expect("the package has /boot")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .expect("the package has a vmlinuz");
    let release = vmlinuz
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    fs::rename(&vmlinuz, out.join("vmlinuz")).expect("move vmlinuz");
    for module in find_files(&tree.join("lib")) {
        let name = module
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let dest = out.join("modules").join(name.trim_end_matches(".xz"));
        if Path::new(&name).extension().is_some_and(|e| e == "xz") {
            let bytes = crate::process::run_for(
                Command::new("xz").arg("-dc").arg(&module),
                Duration::from_mins(1),
            )
            .stdout;
            fs::write(&dest, bytes).expect("write a module");
        } else {
            fs::rename(&module, &dest).expect("move a module");
        }
    }
    fs::write(out.join("ready"), &release).expect("write the cache marker");
    // Another run may have finished first; either copy is good.
    if fs::rename(&out, dir).is_err() {
        assert!(
            dir.join("ready").exists(),
            "cannot move the kernel into {}",
            dir.display()
        );
    }
}

fn find_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Builds an initramfs for `kernel` at `out`: busybox, `/init`, the modules,
/// and `extra` files (host path, path in the guest).
pub fn initramfs(kernel: &Kernel, extra: &[(PathBuf, String)], out: &Path) {
    let root = tempfile::Builder::new()
        .prefix("tern-vm-initrd-")
        .tempdir_in("/var/tmp")
        .expect("a temp dir for the initramfs tree");
    let r = root.path();
    let put = |src: &Path, dest: &str| {
        let d = r.join(dest.trim_start_matches('/'));
        fs::create_dir_all(d.parent().expect("a parent")).expect("mkdir in the initramfs");
        fs::copy(src, &d)
            .unwrap_or_else(|e| panic!("copy {} into the initramfs: {e}", src.display()));
    };
    put(Path::new("/bin/busybox"), "bin/busybox");
    fs::write(r.join("init"), INIT).expect("write /init");
    fs::write(r.join("trace.sh"), TRACE).expect("write /trace.sh");
    let mut order = String::new();
    for m in &kernel.modules {
        let name = m
            .file_stem()
            .expect("a module name")
            .to_string_lossy()
            .into_owned();
        put(m, &format!("lib/modules/{name}.ko"));
        order.push_str(&name);
        order.push('\n');
    }
    fs::create_dir_all(r.join("lib/modules")).expect("mkdir modules");
    fs::write(r.join("lib/modules/order"), order).expect("write the module order");
    for (src, dest) in extra {
        put(src, dest);
    }
    sh(
        Command::new("chmod").args(["-R", "a+rX,u+w"]).arg(r),
        Duration::from_secs(30),
    );
    sh(
        Command::new("chmod").arg("755").arg(r.join("init")),
        Duration::from_secs(30),
    );
    sh(
        Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find . | cpio -o -H newc --quiet | gzip -1 > \"$2\"")
            .arg("sh")
            .arg(r)
            .arg(out),
        Duration::from_mins(2),
    );
}

/// A raw disk image of `mib` MiB holding ext4 with `seed`'s contents. The
/// file is written in full first (no holes), so its blocks on the host file
/// system do not move while a tracer maps it.
pub fn ext4_image(path: &Path, mib: u64, seed: Option<&Path>) {
    sh(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", path.display()))
            .args([
                "bs=1M",
                &format!("count={mib}"),
                "status=none",
                "conv=fsync",
            ]),
        Duration::from_mins(2),
    );
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E", "nodiscard"]);
    if let Some(seed) = seed {
        mkfs.arg("-d").arg(seed);
    }
    sh(mkfs.arg(path), Duration::from_mins(2));
}

/// `e2fsck -fn` on an image: `Ok` if clean, else its report.
pub fn fsck(path: &Path) -> Result<(), String> {
    let out = crate::process::run_for(
        Command::new("e2fsck").arg("-fn").arg(path),
        Duration::from_mins(2),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A program and the shared libraries it loads (from `ldd`), as initramfs
/// entries at the same paths; the program itself goes to `/bin/NAME`,
/// stripped of debug info to keep the initramfs small.
pub fn program_with_libs(program: &Path, scratch: &Path) -> Vec<(PathBuf, String)> {
    let name = program
        .file_name()
        .expect("a program name")
        .to_string_lossy()
        .into_owned();
    let stripped = scratch.join(&name);
    sh(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(program)
            .arg(&stripped),
        Duration::from_mins(1),
    );
    let mut out = vec![(stripped, format!("bin/{name}"))];
    let ldd = sh(Command::new("ldd").arg(program), Duration::from_secs(30));
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            out.push((PathBuf::from(p), p.trim_start_matches('/').to_owned()));
        }
    }
    out
}
