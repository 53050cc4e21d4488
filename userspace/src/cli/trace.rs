//! `tern trace`: record block I/O (and page faults) with eBPF, and work with trace files.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use tern::trace::cpu::CpuTarget;
use tern::trace::export;
use tern::trace::import::{self, ImportFormat};
use tern::trace::session::{self, SessionConfig};
use tern::trace::stats::TraceStats;

use super::args::{open_trace, parse_range, parse_size, runtime, write_out};

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  tern trace --device /dev/loop0 --duration 30s --out loop0.trace\n  tern trace --file /var/lib/vm/disk.img --pid 4242 --out vm.trace\n  tern trace --device /dev/vdb --cpu cgroup:/sys/fs/cgroup/unified/db --duration 10m --out db.trace\n  tern trace stat loop0.trace\n  tern trace export --format fio-iolog loop0.trace --out replay.iolog\n  tern trace import --format msr prxy_0.csv --out prxy.trace"
)]
pub struct TraceArgs {
    #[command(subcommand)]
    command: Option<TraceCommand>,
    #[command(flatten)]
    run: TraceRunArgs,
}

#[derive(Args)]
pub struct TraceRunArgs {
    /// Block device to trace (repeat for several).
    #[arg(long = "device", value_name = "DEV")]
    devices: Vec<PathBuf>,
    /// A disk image on a file system: trace the device under it, in image offsets.
    #[arg(long, value_name = "IMAGE", conflicts_with = "devices")]
    file: Option<PathBuf>,
    /// Only these processes (thread group ids); their page faults are traced too.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// With --pid: do not trace page faults.
    #[arg(long)]
    no_faults: bool,
    /// Keep only faults in this address range, e.g. 0x7f0000000000-0x7f0010000000.
    #[arg(long, value_name = "LO-HI")]
    fault_range: Option<String>,
    /// Stop after this long (e.g. 30s, 5m); otherwise at Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Ring buffer size (a power of two, e.g. 16M).
    #[arg(long, default_value = "16M")]
    ring_size: String,
    /// The trace file to write.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// No live summary on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Also profile this one's CPU (use, waits for a CPU, time held by a
    /// CPU limit): cgroup:DIR or pid:N; repeat for several. The host and
    /// every --pid are profiled anyway.
    #[arg(long = "cpu", value_name = "cgroup:DIR|pid:N")]
    cpu: Vec<CpuTarget>,
    /// Record no CPU profile.
    #[arg(long, conflicts_with = "cpu")]
    no_cpu: bool,
}

impl TraceRunArgs {
    /// The CPU targets: the host, each --pid, each --cpu (once each).
    fn cpu_targets(&self) -> Vec<CpuTarget> {
        if self.no_cpu {
            return Vec::new();
        }
        let mut list = vec![CpuTarget::Host];
        for t in self
            .pids
            .iter()
            .map(|p| CpuTarget::Pid(*p))
            .chain(self.cpu.iter().cloned())
        {
            if !list.contains(&t) {
                list.push(t);
            }
        }
        list
    }
}

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Summarise a trace file.
    #[command(
        after_help = "Examples:\n  tern trace stat loop0.trace\n  tern trace stat loop0.trace --json"
    )]
    Stat {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Convert a trace to CSV or a fio iolog.
    #[command(
        after_help = "Examples:\n  tern trace export --format csv loop0.trace --out loop0.csv\n  tern trace export --format fio-iolog loop0.trace --replay-on /dev/vdc --out replay.iolog\n  fio --name=replay --read_iolog=replay.iolog --direct=1"
    )]
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        file: PathBuf,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// fio-iolog: the file or device fio replays against (default: the traced target's name).
        #[arg(long)]
        replay_on: Option<String>,
    },
    /// Convert another tool's trace into a Tern trace.
    #[command(
        after_help = "Examples:\n  tern trace import --format msr prxy_0.csv --out prxy.trace\n  blkparse -i sda > sda.txt && tern trace import --format blkparse sda.txt --out sda.trace\n  tern trace import --format csv loop0.csv --out loop0.trace   # what `tern trace export --format csv` wrote"
    )]
    Import {
        #[arg(long, value_enum)]
        format: ImportFormat,
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Csv,
    FioIolog,
}

/// Runs `tern trace`: a recording, or one of its subcommands.
pub fn run(t: TraceArgs) -> Result<()> {
    match t.command {
        Some(cmd) => trace_command(cmd),
        None => trace_run(t.run),
    }
}

fn trace_run(args: TraceRunArgs) -> Result<()> {
    let ring_bytes = parse_size(&args.ring_size).with_context(|| {
        format!(
            "--ring-size {:?} is not a size; use e.g. 16M",
            args.ring_size
        )
    })?;
    let cpu = args.cpu_targets();
    let cfg = SessionConfig {
        cpu,
        devices: args.devices,
        image: args.file,
        faults: !args.no_faults && !args.pids.is_empty(),
        pids: args.pids,
        fault_range: args.fault_range.as_deref().map(parse_range).transpose()?,
        duration: args.duration,
        ring_bytes,
        out: args
            .out
            .unwrap_or_else(|| session::default_out().to_path_buf()),
        progress: !args.quiet,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = runtime()?;
    let out = cfg.out.clone();
    let worker_stop = stop.clone();
    let totals = runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut worker = tokio::task::spawn_blocking(move || session::run(&cfg, &worker_stop));
        loop {
            tokio::select! {
                done = &mut worker => break Ok::<_, anyhow::Error>(done.context("the tracing thread panicked")??),
                // A stop flushes everything: the session drains the ring and writes its end record.
                _ = term.recv() => stop.store(true, Ordering::Relaxed),
                _ = int.recv() => stop.store(true, Ordering::Relaxed),
            }
        }
    })?;
    tracing::info!(
        block = totals.block_events,
        faults = totals.fault_events,
        lost = totals.lost_block + totals.lost_fault,
        "trace written"
    );
    let stats = TraceStats::from_reader(open_trace(&out)?)?;
    eprint!("{}", stats.render());
    eprintln!("trace written to {}", out.display());
    Ok(())
}

fn trace_command(cmd: TraceCommand) -> Result<()> {
    match cmd {
        TraceCommand::Stat { file, json } => {
            let stats = TraceStats::from_reader(open_trace(&file)?)
                .with_context(|| format!("{}", file.display()))?;
            write_out(None, |out| {
                if json {
                    serde_json::to_writer_pretty(&mut *out, &stats)?;
                    writeln!(out)?;
                } else {
                    write!(out, "{}", stats.render())?;
                }
                Ok(())
            })?;
        }
        TraceCommand::Export {
            format,
            file,
            out,
            replay_on,
        } => {
            let reader = open_trace(&file)?;
            let n = write_out(out.as_ref(), |sink| {
                Ok(match format {
                    ExportFormat::Csv => export::to_csv(reader, sink)?,
                    ExportFormat::FioIolog => export::to_fio_iolog(reader, sink, |name| {
                        replay_on.clone().unwrap_or_else(|| name.to_string())
                    })?,
                })
            })?;
            eprintln!("exported {n} rows");
        }
        TraceCommand::Import { format, input, out } => {
            let totals = write_out(Some(&out), |sink| Ok(import::import(format, &input, sink)?))?;
            eprintln!(
                "imported {} records into {} ({} other lines passed over)",
                totals.records,
                out.display(),
                totals.skipped_lines
            );
        }
    }
    Ok(())
}
