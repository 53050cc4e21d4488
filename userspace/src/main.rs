//! The `tern` command: a thin layer over the `tern` library.

mod cli_analyze;
mod cli_history;
mod cli_migrate;
mod cli_plan;
mod cli_predict;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tern::trace::TraceReader;
use tern::trace::export;
use tern::trace::import::{self, ImportFormat};
use tern::trace::session::{self, SessionConfig};
use tern::trace::stats::TraceStats;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Live migration of a running server's disk, guided by eBPF tracing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trace block I/O (and page faults) with eBPF, or work with trace files.
    Trace(TraceArgs),
    /// Run an agent: `--role destination` receives extents and exports the disk over NBD.
    Agent(AgentArgs),
    /// Certificates for mutual TLS between agents.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Replica client operations against a destination agent.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// A standalone NBD server for one image.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Live-migrate a disk to a destination agent: copy, converge, pause, final delta, verify, switch.
    Migrate(cli_migrate::MigrateArgs),
    /// Make the source primary again: copy back what the destination accepted, fence it.
    Rollback(cli_migrate::RollbackArgs),
    /// The running migration's (or source agent's) phase, bytes, rates, downtime estimate, RPO.
    Status(cli_migrate::StatusArgs),
    /// The I/O history a source agent recorded into object storage (`--history`).
    #[command(subcommand)]
    History(cli_history::HistoryCommand),
    /// Analyze a trace: heatmaps and the workload's profile.
    #[command(subcommand)]
    Analyze(cli_analyze::AnalyzeCommand),
    /// What-if table of replication units for a trace, and the plan `migrate --plan` takes.
    Plan(cli_plan::PlanArgs),
    /// Forecast the next horizon's reads and writes from a trace (`eval`: measure the models).
    Predict(cli_predict::PredictArgs),
    /// Prepare a guest-RAM file (QEMU memory-backend-file, share=on) so that Tern sees each
    /// 4 KiB page the guest dirties; run before QEMU maps it, then `migrate --file` it.
    RamFile(RamFileArgs),
}

#[derive(Args)]
#[command(
    after_help = "Example:\n  tern ram-file /var/lib/vm/guest.ram --size 4G\n  qemu-system-x86_64 -machine q35,memory-backend=ram0 -m 4G \\\n    -object memory-backend-file,id=ram0,size=4G,mem-path=/var/lib/vm/guest.ram,share=on ..."
)]
struct RamFileArgs {
    /// The RAM file, on a block-backed file system (created or grown; contents kept).
    path: PathBuf,
    /// The guest's RAM size (QEMU's -m).
    #[arg(long, value_parser = tern::agent::parse_size)]
    size: u64,
}

fn ram_file(a: &RamFileArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let started = std::time::Instant::now();
    let done = tern::ramfile::prepare(&a.path, a.size, |bytes| {
        tracing::info!(
            done_mib = bytes >> 20,
            total_mib = a.size >> 20,
            "reading the RAM file into 4 KiB pages"
        );
    })?;
    writeln!(
        std::io::stdout().lock(),
        "{}: {} MiB ready, {} pages of 4 KiB in the page cache ({} MiB added) in {:.1} s",
        a.path.display(),
        a.size >> 20,
        done.pages,
        done.grown_bytes >> 20,
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

#[derive(Args)]
#[command(
    after_help = "Example:\n  tern certs init /etc/tern/pki --host src --host dst\n  tern agent --role destination --image dst.img --size 20G --grpc 0.0.0.0:7443 --tls-dir /etc/tern/pki/dst"
)]
struct AgentArgs {
    /// `destination` receives extents and exports the disk; `source` replicates
    /// its disk continuously (a warm standby) until a migration takes over.
    #[arg(long, value_parser = ["destination", "source"])]
    role: String,
    /// The destination image (created or grown to --size).
    #[arg(long, required_if_eq("role", "destination"))]
    image: Option<PathBuf>,
    #[arg(long, value_parser = tern::agent::parse_size)]
    size: Option<u64>,
    /// gRPC listen address for the replica service.
    #[arg(long, required_if_eq("role", "destination"))]
    grpc: Option<SocketAddr>,
    /// Source role: the block device to replicate.
    #[arg(long, value_name = "DEV")]
    device: Option<PathBuf>,
    /// Source role: a disk image on a file system to replicate.
    #[arg(long, value_name = "IMAGE", conflicts_with = "device")]
    file: Option<PathBuf>,
    /// Source role: the destination agent's gRPC address.
    #[arg(long, value_name = "HOST:PORT", required_if_eq("role", "source"))]
    peer: Option<String>,
    /// Source role: the name checked in the destination's certificate.
    #[arg(long)]
    domain: Option<String>,
    /// Source role: where the status file for `tern status` lives.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Source role: the source's I/O history, recorded while replicating.
    #[arg(long)]
    trace_out: Option<PathBuf>,
    /// Source role: serve the control API (`tern status|migrate|rollback --agent`) here.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Source role: record the I/O history into a directory, `file:///dir` or `s3://bucket/prefix`.
    #[arg(long, value_name = "URL")]
    history: Option<String>,
    /// Source role: how much history to keep: an age (7d), a size (50G) or both (7d,50G).
    #[arg(long, value_name = "AGE,SIZE", requires = "history")]
    history_retention: Option<String>,
    /// Source role: where history segments wait until the store has them.
    #[arg(long, value_name = "DIR", requires = "history")]
    history_spool: Option<PathBuf>,
    /// Source role: train the predictor at start on this recorded history and
    /// order the first copy by its plan (hot reads first, rewrites held back).
    #[arg(long, value_name = "URL")]
    prefetch_history: Option<String>,
    /// Source role: how much recent history `--prefetch-history` trains on (an age).
    #[arg(long, requires = "prefetch_history")]
    prefetch_window: Option<String>,
    /// NBD listen address: `HOST:PORT` or `unix:/path`.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: tern::nbd::ListenAddr,
    #[arg(long, default_value = tern::agent::DEFAULT_EXPORT)]
    export: String,
    /// Destination role: advertise the NBD export writable before cutover
    /// (writes get EPERM until then), so a VM can open its disk early.
    #[arg(long)]
    nbd_advertise_writable: bool,
    /// Directory with ca.pem, cert.pem, key.pem (from `tern certs init`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Prometheus /metrics listen address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Allow gRPC without TLS on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Allow NBD (which has no TLS here) on a non-loopback address.
    #[arg(long)]
    insecure_nbd: bool,
    /// Use `O_DIRECT` for the image where the file system allows it.
    #[arg(long)]
    direct: bool,
    /// Destination role: a plan from `tern predict`; at cutover the extents
    /// it predicts to be read are read into the page cache first.
    #[arg(long, value_name = "PLAN")]
    warm_plan: Option<PathBuf>,
    /// How much of the plan's read-hot extents to warm.
    #[arg(long, default_value = "256M", value_parser = tern::agent::parse_size)]
    warm_budget: u64,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a small CA and one certificate per host, for a test or a lab.
    Init {
        dir: PathBuf,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Stream a whole file into a destination agent; prints a JSON report.
    Push(PushArgs),
}

#[derive(Args)]
struct PushArgs {
    #[arg(long)]
    from: PathBuf,
    /// host:port of the destination's gRPC service.
    #[arg(long)]
    to: String,
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Name checked in the server certificate.
    #[arg(long)]
    domain: Option<String>,
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Longest extent on the wire (as `tern migrate --extent`).
    #[arg(long, default_value = "1M", value_parser = tern::agent::parse_size)]
    extent: u64,
    #[arg(long, default_value_t = 1, conflicts_with = "raw")]
    zstd_level: i32,
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 32)]
    window: usize,
}

#[derive(Subcommand)]
enum NbdCommand {
    /// Export one raw image or block device until SIGINT/SIGTERM.
    Serve {
        #[arg(long)]
        image: PathBuf,
        #[arg(long, default_value = "tern")]
        name: String,
        /// `HOST:PORT` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long, value_parser = tern::agent::parse_size)]
        size: Option<u64>,
        /// Buffered I/O instead of `O_DIRECT`.
        #[arg(long)]
        no_direct: bool,
        /// Serve on a non-loopback address although NBD is plaintext and
        /// unauthenticated (anyone who reaches the port can read and write).
        #[arg(long)]
        insecure_nbd: bool,
    },
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  tern trace --device /dev/loop0 --duration 30s --out loop0.trace\n  tern trace --file /var/lib/vm/disk.img --pid 4242 --out vm.trace\n  tern trace stat loop0.trace\n  tern trace export --format fio-iolog loop0.trace --out replay.iolog\n  tern trace import --format msr prxy_0.csv --out prxy.trace"
)]
struct TraceArgs {
    #[command(subcommand)]
    command: Option<TraceCommand>,
    #[command(flatten)]
    run: TraceRunArgs,
}

#[derive(Args)]
struct TraceRunArgs {
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
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Summarise a trace file.
    Stat {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Convert a trace to CSV or a fio iolog.
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
    Import {
        #[arg(long, value_enum)]
        format: ImportFormat,
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Csv,
    FioIolog,
}

fn parse_range(s: &str) -> Result<(u64, u64)> {
    let (lo, hi) = s
        .split_once('-')
        .context("--fault-range takes LO-HI, e.g. 0x7f0000000000-0x7f0010000000")?;
    let p = |v: &str| -> Result<u64> {
        let v = v.trim();
        let n = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        n.with_context(|| format!("--fault-range: {v:?} is not a number"))
    };
    let (lo, hi) = (p(lo)?, p(hi)?);
    if lo >= hi {
        bail!("--fault-range: the start must be below the end");
    }
    Ok((lo, hi))
}

fn open_trace(path: &PathBuf) -> Result<TraceReader<BufReader<File>>> {
    let f = File::open(path).with_context(|| format!("cannot open trace {}", path.display()))?;
    TraceReader::new(BufReader::with_capacity(256 * 1024, f))
        .with_context(|| format!("{}", path.display()))
}

/// Runs `write` into the file `out` (in place only once complete: a failure
/// leaves what was there) or into standard output.
fn write_out<T>(
    out: Option<&PathBuf>,
    write: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    let Some(p) = out else {
        let mut w = BufWriter::new(std::io::stdout().lock());
        let done = write(&mut w)?;
        w.flush()?;
        return Ok(done);
    };
    let mut file = tern::outfile::OutFile::create(p)?;
    let mut w = BufWriter::new(&mut file);
    let done = write(&mut w)?;
    w.flush()
        .with_context(|| format!("cannot write {}", p.display()))?;
    drop(w);
    file.commit()?;
    Ok(done)
}

fn trace_run(args: TraceRunArgs) -> Result<()> {
    let ring_bytes = session::parse_size(&args.ring_size).with_context(|| {
        format!(
            "--ring-size {:?} is not a size; use e.g. 16M",
            args.ring_size
        )
    })?;
    let cfg = SessionConfig {
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn agent(a: AgentArgs) -> Result<()> {
    if a.role == "source" {
        let mut given: Vec<(&str, &std::ffi::OsStr)> = Vec::new();
        let paths = [
            ("--device", a.device.as_deref()),
            ("--file", a.file.as_deref()),
            ("--tls-dir", a.tls_dir.as_deref()),
            ("--state-dir", a.state_dir.as_deref()),
            ("--trace-out", a.trace_out.as_deref()),
            ("--history-spool", a.history_spool.as_deref()),
        ];
        for (flag, value) in paths {
            if let Some(v) = value {
                given.push((flag, v.as_os_str()));
            }
        }
        for (flag, value) in [
            ("--to", a.peer.as_deref()),
            ("--domain", a.domain.as_deref()),
            ("--history", a.history.as_deref()),
            ("--history-retention", a.history_retention.as_deref()),
            ("--prefetch-history", a.prefetch_history.as_deref()),
            ("--prefetch-window", a.prefetch_window.as_deref()),
        ] {
            if let Some(v) = value {
                given.push((flag, std::ffi::OsStr::new(v)));
            }
        }
        let source = cli_migrate::SourceArgs::for_agent(&given)?;
        return cli_migrate::source_agent(&source, a.control);
    }
    let (Some(image), Some(grpc)) = (a.image, a.grpc) else {
        bail!("--role destination needs --image and --grpc");
    };
    let mut cfg = tern::agent::DestinationConfig::new(image, grpc);
    cfg.size = a.size;
    cfg.nbd = Some(a.nbd);
    cfg.export_name = a.export;
    cfg.nbd_advertise_writable = a.nbd_advertise_writable;
    cfg.tls_dir = a.tls_dir;
    cfg.metrics = a.metrics;
    cfg.insecure = a.insecure;
    cfg.insecure_nbd = a.insecure_nbd;
    cfg.direct = a.direct;
    if let Some(plan) = &a.warm_plan {
        anyhow::ensure!(
            !a.direct,
            "--warm-plan reads the predicted extents into the page cache, which --direct bypasses: choose one"
        );
        cfg.warm = tern::predict::Prediction::load(plan)?.read_hot(0.5, a.warm_budget);
    }
    runtime()?.block_on(async move {
        let cancel = CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        tern::agent::run_destination(cfg, cancel).await
    })?;
    Ok(())
}

fn certs(cmd: CertsCommand) -> Result<()> {
    let CertsCommand::Init { dir, hosts } = cmd;
    let report = tern::certs::init(&dir, &hosts)?;
    for d in &report.host_dirs {
        eprintln!(
            "certificates for {} in {} (pass it as --tls-dir)",
            d.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            d.display()
        );
    }
    Ok(())
}

fn replica(cmd: ReplicaCommand) -> Result<()> {
    let ReplicaCommand::Push(p) = cmd;
    let tls = p
        .tls_dir
        .as_deref()
        .map(tern::rpc::TlsMaterial::load)
        .transpose()?;
    let extent_len = u32::try_from(p.extent)
        .ok()
        .filter(|e| (4096..=tern::rpc::MAX_EXTENT_LEN).contains(e))
        .context("--extent must be from 4K to 8M")?;
    let report = runtime()?.block_on(async {
        let mut c =
            tern::rpc::ReplicaClient::connect(&p.to, tls.as_ref(), p.domain.as_deref()).await?;
        let opts = tern::rpc::PushOptions {
            epoch: p.epoch,
            extent_len,
            zstd_level: (!p.raw).then_some(p.zstd_level),
            workers: p.workers,
            window: p.window,
        };
        tern::rpc::push_file(&mut c, &p.from, &opts).await
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

fn nbd(cmd: NbdCommand) -> Result<()> {
    let NbdCommand::Serve {
        image,
        name,
        listen,
        read_only,
        size,
        no_direct,
        insecure_nbd,
    } = cmd;
    let opts = tern::nbd::StandaloneOptions {
        image,
        name,
        listen,
        read_only,
        size,
        direct: !no_direct,
        insecure: insecure_nbd,
    };
    runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        tern::nbd::serve_standalone(&opts, cancel).await
    })?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace(t) => match t.command {
            Some(cmd) => trace_command(cmd),
            None => trace_run(t.run),
        },
        Command::Agent(a) => agent(a),
        Command::Certs(c) => certs(c),
        Command::Replica(r) => replica(r),
        Command::Nbd(n) => nbd(n),
        Command::Migrate(m) => cli_migrate::migrate(&m),
        Command::Rollback(r) => cli_migrate::rollback(&r),
        Command::Status(s) => cli_migrate::status(&s),
        Command::History(h) => cli_history::run(h),
        Command::Analyze(a) => cli_analyze::run(a),
        Command::Plan(p) => cli_plan::plan(&p),
        Command::Predict(p) => cli_predict::predict(p),
        Command::RamFile(r) => ram_file(&r),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what to do; the cause chain follows the colon.
            eprintln!("tern: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: the library's
/// errors name their cause in their own message too (so a log line of one
/// error is whole), so a cause the text already holds is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory (os error 2)",
        );
        let open = tern::image::ImageError::Open {
            path: "/x.img".into(),
            source: io,
        };
        let e = anyhow::Error::new(open).context("starting the destination agent");
        let line = super::one_line(&e);
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        assert!(
            line.starts_with("starting the destination agent: could not open the image /x.img"),
            "{line}"
        );
    }
}
