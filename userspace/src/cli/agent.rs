//! `tern agent`: the destination agent (receives extents, exports the disk
//! over NBD) or the source agent (a warm standby with a control service).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::args::{parse_size, runtime};
use tern::agent::source::{Prefetch, SourceDisk, SourceOptions};

use super::history::HistoryArgs;
use super::migrate;

#[derive(Args)]
#[command(
    after_help = "Example:\n  tern certs init /etc/tern/pki --host src --host dst\n  tern agent --role destination --image dst.img --size 20G --grpc 0.0.0.0:7443 --tls-dir /etc/tern/pki/dst"
)]
pub struct AgentArgs {
    /// `destination` receives extents and exports the disk; `source` replicates
    /// its disk continuously (a warm standby) until a migration takes over.
    #[arg(long, value_parser = ["destination", "source"])]
    role: String,
    /// The destination image (created or grown to --size).
    #[arg(long, required_if_eq("role", "destination"))]
    image: Option<PathBuf>,
    #[arg(long, value_parser = parse_size)]
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
    /// Source role: record the I/O history (`--history URL` and its knobs).
    #[command(flatten)]
    history: HistoryArgs,
    /// Source role: train the predictor at start on this recorded history and
    /// order the first copy by its plan (hot reads first, rewrites held back).
    #[arg(long, value_name = "URL")]
    prefetch_history: Option<String>,
    /// Source role: how much recent history `--prefetch-history` trains on (an age).
    #[arg(long, default_value = "24h", requires = "prefetch_history")]
    prefetch_window: String,
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
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    warm_budget: u64,
}

/// Runs `tern agent`.
pub fn run(a: AgentArgs) -> Result<()> {
    if a.role == "source" {
        let disk = match (a.device, a.file) {
            (Some(dev), _) => SourceDisk::Device(dev),
            (None, Some(path)) => SourceDisk::File {
                path,
                read_cached: false,
            },
            (None, None) => {
                bail!("--role source needs --device DEV or --file IMAGE, and --peer HOST:PORT")
            }
        };
        let peer = a
            .peer
            .context("--role source needs --peer HOST:PORT (the destination agent)")?;
        let mut opts = SourceOptions::new(disk, peer);
        opts.tls_dir = a.tls_dir;
        opts.domain = a.domain;
        if let Some(out) = a.trace_out {
            opts.trace_out = out;
        }
        opts.history = a.history.recording();
        if let Some(url) = a.prefetch_history {
            opts.prefetch = Prefetch::History {
                url,
                window: a.prefetch_window,
                horizon: tern::agent::source::DEFAULT_PREFETCH_HORIZON,
            };
        }
        let state_dir = a.state_dir.unwrap_or_else(|| PathBuf::from("/run/tern"));
        return migrate::source_agent(&opts, &state_dir, false, a.control);
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
