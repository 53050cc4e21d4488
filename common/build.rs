//! Builds the eBPF object from `ebpf/` with Debian's clang and generates the
//! Rust mirror of `ebpf/tern_event.h` with bindgen, so the two cannot drift.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_tool(env_name: &str, candidates: &[&str]) -> PathBuf {
    if let Ok(p) = env::var(env_name) {
        return PathBuf::from(p);
    }
    for c in candidates {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
            let p = Path::new(dir).join(c);
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "{} not found (looked for {candidates:?}); run `cargo xtask setup` to install the eBPF toolchain, or set {env_name}",
        candidates[0]
    );
}

fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Derives `Pod` for the event types, so a padding hole fails the build.
#[derive(Debug)]
struct PodDerives;
impl bindgen::callbacks::ParseCallbacks for PodDerives {
    fn add_derives(&self, info: &bindgen::callbacks::DeriveInfo<'_>) -> Vec<String> {
        if info.name.starts_with("tern_") {
            vec!["bytemuck::Pod".into(), "bytemuck::Zeroable".into()]
        } else {
            vec![]
        }
    }
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest
        .join("../ebpf")
        .canonicalize()
        .expect("ebpf/ sits beside common/");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={}", ebpf.display());
    println!("cargo:rerun-if-env-changed=TERN_CLANG");
    println!("cargo:rerun-if-env-changed=TERN_BPFTOOL");
    println!("cargo:rerun-if-env-changed=TERN_VMLINUX_BTF");

    // Kernel types for CO-RE: relocations make the object portable to other kernels.
    let btf = env::var("TERN_VMLINUX_BTF").unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".into());
    assert!(
        Path::new(&btf).exists(),
        "{btf} is missing: this kernel has no BTF; build on a kernel with CONFIG_DEBUG_INFO_BTF or point TERN_VMLINUX_BTF at a BTF file"
    );
    let bpftool = find_tool("TERN_BPFTOOL", &["bpftool"]);
    let vmlinux = run(
        Command::new(&bpftool).args(["btf", "dump", "file", &btf, "format", "c"]),
        "bpftool btf dump",
    );
    std::fs::write(out.join("vmlinux.h"), vmlinux).expect("write vmlinux.h to OUT_DIR");

    let clang = find_tool("TERN_CLANG", &["clang-19", "clang"]);
    let obj = out.join("tern.bpf.o");
    run(
        Command::new(&clang)
            .args([
                "-target",
                "bpf",
                "-O2",
                "-g",
                "-Wall",
                "-Werror",
                "-D__TARGET_ARCH_x86",
            ])
            .arg(format!("-I{}", out.display()))
            .arg(format!("-I{}", ebpf.display()))
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-c")
            .arg(ebpf.join("tern.bpf.c"))
            .arg("-o")
            .arg(&obj),
        "clang (eBPF)",
    );

    let bindings = bindgen::Builder::default()
        .header(ebpf.join("tern_event.h").display().to_string())
        .clang_arg("-I/usr/include/x86_64-linux-gnu")
        .use_core()
        .ctypes_prefix("core::ffi")
        .allowlist_type("tern_.*")
        .allowlist_var("TERN_.*")
        .derive_default(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(PodDerives))
        .generate()
        .expect("bindgen could not read ebpf/tern_event.h (is libclang installed? run `cargo xtask setup`)");
    bindings
        .write_to_file(out.join("event_abi.rs"))
        .expect("write event_abi.rs to OUT_DIR");
}
