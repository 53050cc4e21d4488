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
    /// NBD listen address: `HOST:PORT` or `unix:/path` [default: 127.0.0.1:10809].
    #[arg(long)]
    nbd: Option<tern::nbd::ListenAddr>,
    /// The NBD export's name [default: tern].
    #[arg(long)]
    export: Option<String>,
    /// Destination role: advertise the NBD export writable before cutover
    /// (writes get EPERM until then), so a VM can open its disk early.
    #[arg(long)]
    nbd_advertise_writable: bool,
    /// Prometheus `GET /metrics` listen address (either role: the destination's
    /// ingest and NBD counters, the source's replication counters and state).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Allow gRPC without TLS on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Allow NBD without TLS on a non-loopback address.
    #[arg(long)]
    insecure_nbd: bool,
    /// Destination role: require TLS on the NBD export (STARTTLS) with the
    /// --tls-dir certificates; clients show a certificate from the same
    /// authority (QEMU: `tls-creds-x509,dir=TLS_DIR`; libnbd: `nbds://…?tls-certificates=TLS_DIR`).
    #[arg(long)]
    nbd_tls: bool,
    /// Use `O_DIRECT` for the image where the file system allows it.
    #[arg(long)]
    direct: bool,
    /// Destination role: a plan from `tern predict`; at cutover the extents
    /// it predicts to be read are read into the page cache first.
    #[arg(long, value_name = "PLAN")]
    warm_plan: Option<PathBuf>,
    /// How much of the plan's read-hot extents to warm [default: 256M].
    #[arg(long, value_parser = parse_size)]
    warm_budget: Option<u64>,
    /// Destination role, in a post-copy: how long a read (or a write into
    /// part of a unit) waits for a unit still on the source before it fails
    /// with EIO; it never returns the old data [default: 2m].
    #[arg(long, value_parser = humantime::parse_duration)]
    postcopy_wait: Option<std::time::Duration>,
    /// Destination role: promote the replica to primary (failover) once its
    /// standby source agent has not been heard for this long (e.g. 10s):
    /// a new epoch fences the source, the export turns writable, the
    /// recovery point is recorded (`tern failover --to` shows it). Without
    /// it only `tern failover` promotes.
    #[arg(long, value_parser = humantime::parse_duration)]
    failover_after: Option<std::time::Duration>,
    /// Destination role, with --failover-after: a shell command that must
    /// exit 0 before the replica promotes itself, confirming the source's
    /// host is down (its power off through IPMI, its address gone), not
    /// only silent to us; `TERN_SOURCE_SILENT_MS` is set. Run for at most
    /// 30 s; a failure waits another --failover-after.
    #[arg(long, value_name = "CMD", requires = "failover_after")]
    failover_check: Option<String>,
    /// Destination role: apply a migration staged in object storage by
    /// `tern migrate --via URL` (a directory, `file:///dir`,
    /// `s3://bucket/prefix` or `az://container/prefix`, credentials from
    /// `AWS_*` or `AZURE_*` variables), and
    /// publish this agent's progress there: no link to the source needed.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
}

/// Defaults of the destination's flags that are options here (so that the
/// source role can tell them given from not given); their help says the same.
const DEFAULT_NBD: &str = "127.0.0.1:10809";
const DEFAULT_WARM_BUDGET: u64 = 256 << 20;
const DEFAULT_POSTCOPY_WAIT: std::time::Duration = std::time::Duration::from_mins(2);

/// Runs `tern agent`.
pub fn run(a: AgentArgs, m: &clap::ArgMatches) -> Result<()> {
    refuse_for_role(&a.role, &others_flags(m, &a.role))?;
    if a.role == "source" {
        let opts = a.source.options()?;
        let listen = tern::agent::source::Listen {
            control: a.control,
            metrics: a.metrics,
        };
        return migrate::source_agent(&opts, &a.source.status_file(), a.source.json(), &listen);
    }
    let (Some(image), Some(grpc)) = (a.image, a.grpc) else {
        bail!("--role destination needs --image and --grpc");
    };
    let mut cfg = tern::agent::DestinationConfig::new(image, grpc);
    cfg.size = a.size;
    cfg.nbd = Some(match a.nbd {
        Some(nbd) => nbd,
        None => DEFAULT_NBD.parse()?,
    });
    cfg.export_name = a
        .export
        .unwrap_or_else(|| tern::agent::DEFAULT_EXPORT.to_owned());
    cfg.nbd_advertise_writable = a.nbd_advertise_writable;
    cfg.tls_dir = a.source.tls_dir().map(Path::to_path_buf);
    cfg.metrics = a.metrics;
    cfg.insecure = a.insecure;
    cfg.insecure_nbd = a.insecure_nbd;
    cfg.nbd_tls = a.nbd_tls;
    cfg.direct = a.direct;
    cfg.postcopy_wait = a.postcopy_wait.unwrap_or(DEFAULT_POSTCOPY_WAIT);
    cfg.from = a.from.map(tern::staging::ApplyOptions::new);
    if let Some(after) = a.failover_after {
        anyhow::ensure!(
            after >= tern::rpc::HEARTBEAT_LOSS,
            "--failover-after {} is shorter than {} (three heartbeats): a busy source would be taken for a lost one",
            humantime::format_duration(after),
            humantime::format_duration(tern::rpc::HEARTBEAT_LOSS)
        );
        cfg.failover_after = Some(after);
        cfg.failover_check.clone_from(&a.failover_check);
    }
    if let Some(plan) = &a.warm_plan {
        anyhow::ensure!(
            !a.direct,
            "--warm-plan reads the predicted extents into the page cache, which --direct bypasses: choose one"
        );
        cfg.warm = tern::predict::Prediction::load(plan)?
            .read_hot(0.5, a.warm_budget.unwrap_or(DEFAULT_WARM_BUDGET));
    }
    runtime()?.block_on(async move {
        let cancel = CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        tern::agent::run_destination(cfg, cancel).await
    })?;
    Ok(())
}

/// The flags given on the command line (or by the settings file, which
/// puts them there) that `role` does not take, by their long names: every
/// flag of the other role, defaults or not, is known to clap.
fn others_flags(m: &clap::ArgMatches, role: &str) -> Vec<String> {
    use clap::Args as _;
    let source: Vec<clap::Id> = SourceArgs::augment_args(clap::Command::new("source"))
        .get_arguments()
        .map(|a| a.get_id().clone())
        .collect();
    let agent = AgentArgs::augment_args(clap::Command::new("agent"));
    // Taken by both roles, or by neither role's work.
    let shared = ["role", "metrics", "tls_dir", "help", "config"];
    let source_only = |id: &clap::Id| id == "control" || source.contains(id);
    agent
        .get_arguments()
        .filter(|a| !shared.contains(&a.get_id().as_str()))
        .filter(|a| source_only(a.get_id()) != (role == "source"))
        .filter(|a| {
            m.value_source(a.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine)
        })
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// A flag the other role takes would be ignored here: refuse it, naming it.
fn refuse_for_role(role: &str, given: &[String]) -> Result<()> {
    if given.is_empty() {
        return Ok(());
    }
    let other = if role == "source" {
        "destination"
    } else {
        "source"
    };
    bail!(
        "{} {} for --role {other}, not --role {role}: drop {} (from the command line, or from \
         the settings file's [agent] table: keep one settings file per role, `tern --config \
         FILE agent`, as packaging/ does)",
        given.join(", "),
        if given.len() == 1 { "is" } else { "are" },
        if given.len() == 1 { "it" } else { "them" }
    )
}
