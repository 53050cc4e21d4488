//! `cargo xtask vm-test`: the QEMU VM tier (`vm-tests/`), run after the rest
//! of the suite. Its tests are `#[ignore]`d so that `cargo test --workspace`
//! (which builds every member, default or not) stays fast; this runs them
//! with `--ignored`.

use anyhow::Result;

use crate::sh::{self, cargo, run};

pub fn run_all() -> Result<()> {
    sh::setup(sh::Need::All)?;
    sh::require_root("cargo xtask vm-test (QEMU, eBPF tracing)")?;
    // The tests drive the real `tern` binary.
    run(cargo().args(["build", "-p", "tern", "--bin", "tern"]))?;
    // One VM test at a time: each runs two 1-vCPU VMs, which fill two cores.
    run(cargo().args([
        "test",
        "-p",
        "tern-vm-tests",
        "--no-fail-fast",
        "--",
        "--ignored",
        "--test-threads=1",
    ]))?;
    print_results();
    Ok(())
}

/// Prints the tables the tests left in `target/vm/`.
fn print_results() {
    let target = crate::target_dir();
    let Ok(dir) = std::fs::read_dir(target.join("vm")) else {
        return;
    };
    let mut files: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "md"))
    {
        if let Ok(text) = std::fs::read_to_string(f) {
            eprintln!("\n{}\n{text}", f.display());
        }
    }
}
