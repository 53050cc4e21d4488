//! `tern agent`: the destination agent (receives extents, exports the disk
//! over NBD) or the source agent (a warm standby with a control service).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::args::{parse_size, runtime};
use super::migrate::{self, SourceArgs};

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
    /// Source role: the disk, the destination (`--peer` or `--to`) and how to
    /// replicate it, as `tern migrate` takes them (`--tls-dir` serves both roles).
    #[command(flatten)]
    source: SourceArgs,
    /// Source role: serve the control API (`tern status|migrate|rollback --agent`) here.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// NBD listen address: `HOST:PORT` or `unix:/path`.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: tern::nbd::ListenAddr,
    #[arg(long, default_value = tern::agent::DEFAULT_EXPORT)]
    export: String,
    /// Destination role: advertise the NBD export writable before cutover
    /// (writes get EPERM until then), so a VM can open its disk early.
    #[arg(long)]
    nbd_advertise_writable: bool,
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
    /// Destination role, in a post-copy: how long a read (or a write into
    /// part of a unit) waits for a unit still on the source before it fails
    /// with EIO; it never returns the old data.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    postcopy_wait: std::time::Duration,
}

/// Runs `tern agent`.
pub fn run(a: AgentArgs) -> Result<()> {
    if a.role == "source" {
        let opts = a.source.options()?;
        return migrate::source_agent(&opts, a.source.state_dir(), a.source.json(), a.control);
    }
    let (Some(image), Some(grpc)) = (a.image, a.grpc) else {
        bail!("--role destination needs --image and --grpc");
    };
    let mut cfg = tern::agent::DestinationConfig::new(image, grpc);
    cfg.size = a.size;
    cfg.nbd = Some(a.nbd);
    cfg.export_name = a.export;
    cfg.nbd_advertise_writable = a.nbd_advertise_writable;
    cfg.tls_dir = a.source.tls_dir().map(Path::to_path_buf);
    cfg.metrics = a.metrics;
    cfg.insecure = a.insecure;
    cfg.insecure_nbd = a.insecure_nbd;
    cfg.direct = a.direct;
    cfg.postcopy_wait = a.postcopy_wait;
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
