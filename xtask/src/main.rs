//! `cargo xtask`: everything around Tern's build — toolchain setup, the demo,
//! the test suite exactly as CI runs it, and benchmarks against peer tools.

mod bench_migrate;
mod bench_nbd;
mod bench_predict;
mod bench_rpc;
mod bench_tracer;
mod demo;
mod sh;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use sh::{cargo, repo_root, run};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces (clang, bpftool, fio, …) and mount tracefs; idempotent.
    Setup,
    /// Build the workspace (debug; --release for benchmarks).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `tern` with these arguments as root.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Tern's main job end to end: a real workload on ext4 on a loop device, traced.
    Demo,
    /// Exactly what CI runs: setup, format and lint checks, every test.
    Test,
    /// Benchmarks against peer tools; prints a table of figures.
    Bench {
        /// Which: tracer, nbd, rpc, migrate or predict (default: all).
        which: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => sh::setup(),
        Cmd::Build { release } => build(release).map(|_| ()),
        Cmd::Run { args } => {
            let bin = build(false)?;
            sh::require_root("cargo xtask run")?;
            run(std::process::Command::new(bin).args(args))
        }
        Cmd::Demo => {
            sh::setup()?;
            let bin = build(true)?;
            demo::run(&bin)
        }
        Cmd::Test => test(),
        Cmd::Bench { which } => {
            sh::setup()?;
            let bin = build(true)?;
            match which.as_deref() {
                Some("tracer") => bench_tracer::run(&bin),
                Some("nbd") => bench_nbd::run(&bin),
                Some("rpc") => bench_rpc::run(&bin),
                Some("migrate") => bench_migrate::run(&bin),
                Some("predict") => bench_predict::run(&bin),
                None => {
                    bench_tracer::run(&bin)?;
                    bench_nbd::run(&bin)?;
                    bench_rpc::run(&bin)?;
                    bench_migrate::run(&bin)?;
                    bench_predict::run(&bin)
                }
                Some(other) => {
                    bail!("unknown benchmark {other:?}; choose: tracer, nbd, rpc, migrate, predict")
                }
            }
        }
    }
}

/// Builds the workspace and returns the `tern` binary's path.
fn build(release: bool) -> Result<std::path::PathBuf> {
    let mut c = cargo();
    c.args(["build", "--workspace"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(repo_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("tern"))
}

fn test() -> Result<()> {
    sh::setup()?;
    sh::require_root("cargo xtask test (the tracer tests load eBPF programs)")?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // One test binary at a time would be slow; the tests share no devices (each makes its own).
    fuzz(20_000)?;
    // Last, so the test runner's summary closes the log.
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))
}

/// A bounded run of the NBD request-parser fuzzer. cargo-fuzz needs nightly
/// flags; `RUSTC_BOOTSTRAP` lets the machine's stable rustc accept them.
fn fuzz(runs: u32) -> Result<()> {
    if sh::output(std::process::Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    run(cargo()
        .current_dir(repo_root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "nbd_request", "--", &format!("-runs={runs}")]))?;
    Ok(())
}
