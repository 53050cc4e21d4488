//! `cargo xtask`: everything around Tern's build — toolchain setup, the demo,
//! the test suite exactly as CI runs it, and benchmarks against peer tools.

mod azurite;
mod bench_analyze;
mod bench_migrate;
mod bench_nbd;
mod bench_plan;
mod bench_predict;
mod bench_rpc;
mod bench_tracer;
mod boosted;
mod demo;
mod garage;
mod readme;
mod sh;
mod traces;
mod vm_test;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use sh::{Need, cargo, repo_root, run};

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
    /// The QEMU VM tests (`vm-tests/`): guests migrated by Tern and by QEMU, kernel matrix.
    VmTest,
    /// Every command of README.md's sh blocks, run as written in a sandbox
    /// (network and mount namespaces, loop devices, QEMU, Garage).
    Readme,
    /// Benchmarks against peer tools; prints a table of figures.
    Bench {
        /// Which: tracer, nbd, rpc, migrate, analyze, plan or predict (default: all but plan).
        which: Option<String>,
    },
    /// Train the boosted trees Tern ships (userspace/models/boosted.json) on
    /// traces: rows from `tern predict features`, trees from scikit-learn.
    Boosted {
        /// The traces (`cargo xtask traces --out DIR`).
        #[arg(long, env = "TERN_TRACES")]
        traces: std::path::PathBuf,
        /// A python with the analysis package's dependencies (the venv .ci/run makes).
        #[arg(long, default_value = "python3")]
        python: std::path::PathBuf,
        /// Where to write the model (default: userspace/models/boosted.json).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Also evaluate each trace with trees trained without it.
        #[arg(long)]
        leave_one_out: bool,
    },
    /// Record traces of real programs (fio, sqlite3, pgbench, git + build, periodic jobs,
    /// backups, periodic builds) on ext4 on a loop device, a QEMU guest's virtual disk, and
    /// pgbench recorded by bpftrace as MSR Cambridge CSV and imported.
    Traces {
        /// Directory for the traces and their manifest.json.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Only these workloads (repeat): fio, sqlite, pgbench, git-build, cron, backup,
        /// batch-build, vm-guest, sqlite-faults, msr-bpftrace.
        #[arg(long)]
        only: Vec<String>,
        /// How long each traced phase runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => sh::setup(Need::All),
        Cmd::Build { release } => {
            sh::setup(Need::Demo)?;
            build(release).map(|_| ())
        }
        Cmd::Run { args } => {
            sh::setup(Need::Demo)?;
            let bin = build(false)?;
            sh::require_root("cargo xtask run")?;
            run(std::process::Command::new(bin).args(args))
        }
        Cmd::Demo => {
            sh::setup(Need::Demo)?;
            let bin = build(true)?;
            demo::run(&bin)
        }
        Cmd::Test => test(),
        Cmd::VmTest => vm_test::run_all(),
        Cmd::Readme => {
            sh::setup(Need::All)?;
            readme::run(&build(false)?)
        }
        Cmd::Boosted {
            traces,
            python,
            out,
            leave_one_out,
        } => {
            let bin = build(true)?;
            boosted::run_boosted(
                &bin,
                &boosted::Options {
                    traces,
                    python,
                    out,
                    leave_one_out,
                },
            )
        }
        Cmd::Traces { out, only, seconds } => {
            sh::setup(Need::All)?;
            let bin = build(false)?;
            traces::run(&bin, &out, &only, seconds)
        }
        // The analyzer's benchmark builds only what it measures.
        Cmd::Bench { which } if which.as_deref() == Some("analyze") => bench_analyze::run(),
        Cmd::Bench { which } => {
            sh::setup(Need::All)?;
            // TERN_BENCH_BIN: an already built `tern` (skips the release build).
            let bin = match std::env::var_os("TERN_BENCH_BIN") {
                Some(b) => std::path::PathBuf::from(b),
                None => build(true)?,
            };
            match which.as_deref() {
                Some("tracer") => bench_tracer::run(&bin),
                Some("nbd") => bench_nbd::run(&bin),
                Some("rpc") => bench_rpc::run(&bin),
                Some("migrate") => bench_migrate::run(&bin),
                Some("plan") => bench_plan::run(&bin),
                Some("predict") => bench_predict::run(&bin),
                None => {
                    bench_tracer::run(&bin)?;
                    bench_nbd::run(&bin)?;
                    bench_rpc::run(&bin)?;
                    bench_migrate::run(&bin)?;
                    bench_analyze::run()?;
                    bench_predict::run(&bin)
                }
                Some(other) => {
                    bail!(
                        "unknown benchmark {other:?}; choose: tracer, nbd, rpc, migrate, analyze, plan, predict"
                    )
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
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("tern"))
}

/// Where cargo puts what it builds: `$CARGO_TARGET_DIR` when set (relative to
/// the directory cargo runs in, as cargo reads it), else the workspace's `target`.
fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => match std::env::current_dir() {
            Ok(cwd) => cwd.join(dir),
            Err(_) => dir.into(),
        },
        None => repo_root().join("target"),
    }
}

fn test() -> Result<()> {
    sh::setup(Need::All)?;
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
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    // The VM tier last: it is the slowest.
    vm_test::run_all()?;
    // The README's commands, as written, against the debug build.
    readme::run(&build(false)?)
}

/// The fuzz targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: [&str; 2] = ["nbd_request", "trace_file"];

/// A bounded run of each fuzz target. cargo-fuzz needs nightly flags;
/// `RUSTC_BOOTSTRAP` lets the machine's stable rustc accept them.
fn fuzz(runs: u32) -> Result<()> {
    if sh::output(std::process::Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS {
        run(cargo()
            .current_dir(repo_root().join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--", &format!("-runs={runs}")]))?;
    }
    Ok(())
}
