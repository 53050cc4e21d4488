//! The destination agent: one image, written by the replica gRPC service
//! (mutual TLS), exported read-only over NBD until cutover makes it writable,
//! with a Prometheus `/metrics` endpoint.
//!
//! Shutdown (SIGTERM/SIGINT, or the caller's token): stop accepting, let
//! write streams finish the extents in flight, stop NBD connections after
//! their in-flight requests, flush the image, return `Ok`.
//!
//! NBD requires TLS (STARTTLS, the `tls_dir` certificates, a client
//! certificate from the same authority) when `nbd_tls` is set; without it,
//! it listens on loopback or a unix socket unless `insecure_nbd` is set,
//! which logs a warning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::checktree::saved;
use crate::image::{Image, ImageChanges, ImageError, ImageOptions};
use crate::metrics::{self, MetricsError, ReplicaMetrics, Sources};
use crate::nbd::{Export, ListenAddr, NbdError, NbdServer};
use crate::postcopy::Presence;
use crate::rpc::{
    ExportControl, Fence, ReplicaService, RpcError, ServeOptions, TlsError, TlsMaterial,
};

/// Default NBD export name.
pub const DEFAULT_EXPORT: &str = "tern";

/// Settings of `tern agent --role destination`.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Image file (created or grown to `size`) or block device.
    pub image: PathBuf,
    /// Size to create or check; `None` uses the existing image as is.
    pub size: Option<u64>,
    /// Try `O_DIRECT` for the image.
    pub direct: bool,
    /// gRPC listen address.
    pub grpc: SocketAddr,
    /// NBD listen address; `None` serves no NBD export.
    pub nbd: Option<ListenAddr>,
    /// NBD export name.
    pub export_name: String,
    /// Advertise the NBD export writable before cutover (writes still get
    /// `EPERM` until then), so a destination VM can open its disk early.
    pub nbd_advertise_writable: bool,
    /// Directory from `tern certs init` (`ca.pem`, `cert.pem`, `key.pem`): mutual TLS.
    pub tls_dir: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address.
    pub insecure: bool,
    /// Allow NBD without TLS on a non-loopback address.
    pub insecure_nbd: bool,
    /// Require TLS on the NBD export with the `tls_dir` material.
    pub nbd_tls: bool,
    /// Prometheus endpoint address.
    pub metrics: Option<SocketAddr>,
    /// Extents of one write stream in flight.
    pub max_in_flight: usize,
    /// Byte ranges read into the page cache when the export turns writable
    /// (cutover), most likely read first: a prediction's read-hot extents.
    pub warm: Vec<std::ops::Range<u64>>,
    /// In a post-copy, how long a read waits for a unit still on the
    /// source before it fails (never with old data).
    pub postcopy_wait: std::time::Duration,
    /// Promote the replica to primary when its standby source has been
    /// silent this long (`None`: only `tern failover` promotes).
    pub failover_after: Option<std::time::Duration>,
    /// A shell command that must exit 0 before an automatic promotion (the
    /// source's host confirmed down: its power off, its address gone); a
    /// failure waits another `failover_after`. `None`: the silence decides.
    pub failover_check: Option<String>,
    /// Apply a migration staged in this object store (`tern migrate --via`).
    pub from: Option<crate::staging::ApplyOptions>,
}

impl DestinationConfig {
    /// A configuration with the defaults for everything but the image and gRPC address.
    pub fn new(image: PathBuf, grpc: SocketAddr) -> DestinationConfig {
        DestinationConfig {
            image,
            size: None,
            direct: false,
            grpc,
            nbd: None,
            export_name: DEFAULT_EXPORT.to_owned(),
            nbd_advertise_writable: false,
            tls_dir: None,
            insecure: false,
            insecure_nbd: false,
            nbd_tls: false,
            metrics: None,
            max_in_flight: ServeOptions::default().max_in_flight,
            warm: Vec::new(),
            postcopy_wait: crate::postcopy::presence::DEFAULT_WAIT,
            failover_after: None,
            failover_check: None,
            from: None,
        }
    }
}

/// Errors of the destination agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Staging(#[from] crate::staging::StagingError),
    /// Plaintext gRPC on a reachable address.
    #[error(
        "refusing to serve gRPC without TLS on {addr}, which is not loopback; pass --tls-dir DIR (see `tern certs init`) or --insecure"
    )]
    InsecureGrpc { addr: SocketAddr },
    /// TLS on NBD asked for without certificates.
    #[error("TLS on the NBD export (--nbd-tls) needs the certificates of --tls-dir")]
    NbdTlsWithoutDir,
    /// NBD on a reachable address.
    #[error(transparent)]
    InsecureNbd(#[from] crate::nbd::InsecureNbd),
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The image could not be opened or flushed.
    #[error("{action} the image {path}: {source}")]
    Image {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}; pick a free port")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The replica service failed (or its epoch file is unusable).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The NBD server failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// The metrics endpoint failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A service task panicked.
    #[error("a service task of the agent stopped abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The saved map of a post-copy under way is unusable.
    #[error(transparent)]
    PostCopy(#[from] crate::postcopy::PresenceError),
}

/// A destination with every listener bound, not yet serving.
pub struct Destination {
    image: Image,
    image_path: PathBuf,
    /// Where the checksum tree is saved at shutdown and restored at start.
    tree_path: PathBuf,
    /// Whether a saved tree matched the image at start.
    tree_restored: bool,
    service: ReplicaService,
    tls: Option<TlsMaterial>,
    grpc: tokio::net::TcpListener,
    grpc_addr: SocketAddr,
    nbd: Option<(Arc<NbdServer>, NbdListener)>,
    nbd_addr: Option<ListenAddr>,
    metrics: Option<(tokio::net::TcpListener, Sources)>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    failover_after: Option<std::time::Duration>,
    failover_check: Option<String>,
    from: Option<crate::staging::ApplyOptions>,
}

enum NbdListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Runs the destination agent until `cancel`, then drains and flushes.
pub async fn run_destination(
    cfg: DestinationConfig,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    Destination::bind(cfg).await?.run(cancel).await
}

/// The NBD export as the replica service's cutover switch.
struct NbdExportControl {
    server: Arc<NbdServer>,
    name: String,
    writable: AtomicBool,
    /// The image and the ranges to warm at cutover (taken once).
    warm: std::sync::Mutex<Option<(PathBuf, Vec<std::ops::Range<u64>>)>>,
}

/// Reads `ranges` of the file at `path` in order (through the page cache),
/// so the first reads after cutover find them there; returns the bytes read.
pub fn warm_cache(path: &std::path::Path, ranges: &[std::ops::Range<u64>]) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            // More than usize can hold is more than the buffer: saturate.
            let want = usize::try_from(r.end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            at += n as u64;
            total += n as u64;
        }
    }
    Ok(total)
}

impl ExportControl for NbdExportControl {
    fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    fn set_writable(&self, writable: bool) -> Result<(), NbdError> {
        self.server.try_set_read_only(&self.name, !writable)?;
        self.writable.store(writable, Ordering::Release);
        let warm = if writable {
            self.warm.lock().ok().and_then(|mut w| w.take())
        } else {
            None
        };
        if let Some((path, ranges)) = warm {
            // Off the cutover's path: the switch answers at once.
            let spawned = std::thread::Builder::new()
                .name("tern-warm".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    match warm_cache(&path, &ranges) {
                        Ok(bytes) => tracing::info!(
                            bytes,
                            extents = ranges.len(),
                            seconds = started.elapsed().as_secs_f64(),
                            "warmed the predicted read-hot extents"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "warming the predicted extents failed");
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the warm-up thread");
            }
        }
        Ok(())
    }
}

impl Destination {
    /// Checks the security settings, opens the image and binds every listener.
    #[expect(
        clippy::too_many_lines,
        reason = "binds every listener and checks its exposure in the order failures must be reported; split, it would hand half-built state around"
    )]
    pub async fn bind(cfg: DestinationConfig) -> Result<Destination, AgentError> {
        if cfg.tls_dir.is_none() && !cfg.grpc.ip().is_loopback() && !cfg.insecure {
            return Err(AgentError::InsecureGrpc { addr: cfg.grpc });
        }
        if cfg.nbd_tls && cfg.tls_dir.is_none() {
            return Err(AgentError::NbdTlsWithoutDir);
        }
        if let Some(nbd) = &cfg.nbd {
            nbd.check_exposure(cfg.insecure_nbd, cfg.nbd_tls)?;
        }
        let tls = cfg.tls_dir.as_deref().map(TlsMaterial::load).transpose()?;
        let nbd_tls = match &tls {
            Some(material) if cfg.nbd_tls => Some(material.rustls_server_config()?),
            _ => None,
        };
        if tls.is_none() {
            tracing::warn!(addr = %cfg.grpc, "gRPC served without TLS: any local process can write the image");
        }
        let image = Image::open(
            &cfg.image,
            &ImageOptions {
                size: cfg.size,
                read_only: false,
                direct: cfg.direct,
                // The replica's bulk copy streams to the disk instead of
                // piling up dirty pages for the final flush.
                bulk_direct: true,
            },
        )
        .map_err(|source| AgentError::Image {
            action: "cannot open",
            path: cfg.image.clone(),
            source,
        })?;
        let fence = Fence::load(&Fence::path_for(&cfg.image))?;
        // A promoted replica is the primary: its export is writable again
        // after a restart, as it was before.
        let promoted = fence.promotion().is_some();

        let replica_metrics = Arc::new(ReplicaMetrics::default());
        let mut sources = Sources::default().with(Arc::clone(&replica_metrics) as _);

        // NBD writes after cutover reach the replica service's checksum tree
        // through this, so a rollback can find them.
        let changes = ImageChanges::new();
        // One gate for the export and the replica service: a post-copy's
        // fills and the export's reads and writes meet in it.
        let presence = Presence::new(
            cfg.postcopy_wait,
            Some(Presence::map_for(&cfg.image)),
            Some(image.clone()),
        );
        // An agent restarted during a post-copy takes it up: the image is
        // primary (the switch happened), its missing units still come from
        // the source, which reconnects.
        let resumed = presence.resume(image.size())?;
        let (nbd, nbd_addr, export) = match &cfg.nbd {
            None => (None, None, None),
            Some(listen) => {
                let mut server = NbdServer::new(vec![Export {
                    name: cfg.export_name.clone(),
                    description: format!("tern destination {}", cfg.image.display()),
                    image: image.clone(),
                    read_only: true,
                    changes: changes.clone(),
                    presence: presence.clone(),
                }]);
                if let Some(config) = nbd_tls.clone() {
                    server = server.with_tls(config);
                }
                let server = Arc::new(server);
                if cfg.nbd_advertise_writable {
                    server.set_advertise_writable(&cfg.export_name, true)?;
                }
                sources = sources.with(Arc::clone(&server) as _);
                let (listener, bound) = bind_nbd(listen).await?;
                let export: Arc<dyn ExportControl> = Arc::new(NbdExportControl {
                    server: Arc::clone(&server),
                    name: cfg.export_name.clone(),
                    writable: AtomicBool::new(false),
                    warm: std::sync::Mutex::new(
                        (!cfg.warm.is_empty() && !cfg.direct)
                            .then(|| (cfg.image.clone(), cfg.warm.clone())),
                    ),
                });
                if resumed || promoted {
                    export.set_writable(true).map_err(AgentError::Nbd)?;
                }
                (Some((server, listener)), Some(bound), Some(export))
            }
        };

        let shutdown = CancellationToken::new();
        let service = ReplicaService::new(
            image.clone(),
            fence,
            export,
            replica_metrics,
            shutdown.clone(),
            ServeOptions {
                max_in_flight: cfg.max_in_flight,
                ..ServeOptions::default()
            },
        )
        .with_presence(presence);
        let service = match &nbd_addr {
            Some(bound) => service.with_nbd(crate::rpc::NbdExport {
                address: reachable_here(bound),
                name: cfg.export_name.clone(),
                tls: cfg.nbd_tls,
                advertised_writable: cfg.nbd_advertise_writable,
            }),
            None => service,
        };
        service.watch_changes(&changes);
        let sources = sources.with(Arc::new(service.clone()) as _);
        let tree_path = saved::path_for(&cfg.image);
        let tree_restored = service.restore_tree(&tree_path);
        let grpc = tokio::net::TcpListener::bind(cfg.grpc)
            .await
            .map_err(|source| AgentError::Bind {
                what: "gRPC",
                addr: cfg.grpc.to_string(),
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| AgentError::Bind {
            what: "gRPC",
            addr: cfg.grpc.to_string(),
            source,
        })?;
        let (metrics, metrics_addr) = match cfg.metrics {
            None => (None, None),
            Some(addr) => {
                let listener = metrics::bind(addr).await?;
                let bound = listener.local_addr().map_err(|source| AgentError::Bind {
                    what: "metrics",
                    addr: addr.to_string(),
                    source,
                })?;
                (Some((listener, sources)), Some(bound))
            }
        };
        Ok(Destination {
            image,
            image_path: cfg.image,
            tree_path,
            tree_restored,
            service,
            tls,
            grpc,
            grpc_addr,
            nbd,
            nbd_addr,
            metrics,
            metrics_addr,
            shutdown,
            failover_after: cfg.failover_after,
            failover_check: cfg.failover_check.clone(),
            from: cfg.from.clone(),
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound NBD address, if NBD is served.
    pub fn nbd_addr(&self) -> Option<&ListenAddr> {
        self.nbd_addr.as_ref()
    }

    /// Whether the checksum tree saved by the previous agent on this image
    /// was restored (the image was checked to be unchanged since), so the
    /// first delta sync does not read the image whole.
    pub fn tree_restored(&self) -> bool {
        self.tree_restored
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves until `cancel`, then drains every service and flushes the image.
    /// If one service fails, the others are stopped and its error returned.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let Destination {
            image,
            image_path,
            tree_path,
            tree_restored: _,
            service,
            tls,
            grpc,
            grpc_addr,
            nbd,
            nbd_addr,
            metrics,
            metrics_addr,
            shutdown,
            failover_after,
            failover_check,
            from,
        } = self;
        tracing::info!(
            image = %image_path.display(),
            size = image.size(),
            epoch = service.epoch(),
            grpc = %grpc_addr,
            tls = tls.is_some(),
            nbd = ?nbd_addr,
            metrics = ?metrics_addr,
            "destination agent serving"
        );
        let mut tasks: JoinSet<Result<(), AgentError>> = JoinSet::new();
        let trees = service.clone();
        let watch = failover_after.map(|after| (after, failover_check));
        tasks.spawn(watch_source(service.clone(), watch, shutdown.clone()));
        spawn_applier(&mut tasks, from.as_ref(), &service, &image_path, &shutdown)?;
        let served = shutdown.clone();
        tasks.spawn(
            async move { Ok(crate::rpc::serve(grpc, service, tls.as_ref(), served).await?) },
        );
        let mut unix_socket = None;
        if let Some((server, listener)) = nbd {
            let shutdown = shutdown.clone();
            match listener {
                NbdListener::Tcp(l) => {
                    tasks.spawn(async move { Ok(server.serve_tcp(l, shutdown).await?) });
                }
                NbdListener::Unix(l, path) => {
                    unix_socket = Some(path);
                    tasks.spawn(async move { Ok(server.serve_unix(l, shutdown).await?) });
                }
            }
        }
        if let Some((listener, sources)) = metrics {
            let shutdown = shutdown.clone();
            tasks.spawn(async move { Ok(metrics::serve(listener, sources, shutdown).await?) });
        }

        let mut first_error = None;
        loop {
            tokio::select! {
                () = cancel.cancelled(), if !shutdown.is_cancelled() => {
                    tracing::info!("stopping: no new connections, draining in-flight writes");
                    shutdown.cancel();
                }
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { break };
                    let result = joined.map_err(AgentError::from).and_then(|r| r);
                    if let Err(err) = result {
                        tracing::error!(error = %err, "a destination service failed; stopping the others");
                        first_error.get_or_insert(err);
                        shutdown.cancel();
                    } else if !shutdown.is_cancelled() {
                        // A service ended on its own: stop the rest rather than run half an agent.
                        shutdown.cancel();
                    }
                }
            }
        }
        if let Some(path) = unix_socket {
            // Best effort: a stale socket file only blocks the next bind, which says so.
            let _ = std::fs::remove_file(path);
        }
        let flushed = image.flush().await.map_err(|source| AgentError::Image {
            action: "cannot flush",
            path: image_path.clone(),
            source,
        });
        match (first_error, flushed) {
            (Some(err), _) | (None, Err(err)) => Err(err),
            (None, Ok(())) => {
                // Nothing writes the image any more: its tree can be saved.
                match trees.save_tree(&tree_path).await {
                    Ok(Some(region_size)) => {
                        tracing::info!(tree = %tree_path.display(), region_size, "checksum tree saved for the next run");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "checksum tree not saved; the next run hashes the image");
                    }
                }
                tracing::info!(image = %image_path.display(), "destination agent stopped; image flushed");
                Ok(())
            }
        }
    }
}

/// Applies the staging store `from` (`--from`), if any, into the image until `shutdown`.
fn spawn_applier(
    tasks: &mut JoinSet<Result<(), AgentError>>,
    from: Option<&crate::staging::ApplyOptions>,
    service: &ReplicaService,
    image: &std::path::Path,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let Some(from) = from else { return Ok(()) };
    let applier = crate::staging::Applier::new(from, service.clone(), image, shutdown.clone())?;
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(applier.run(stop).await?) });
    Ok(())
}

/// How often the failover watch looks at the source's silence.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Promotes the replica once its standby source has been silent for
/// `after` (a source that said goodbye, or none heard yet, is not lost; a
/// replica whose export is writable is the primary already). A failed
/// promotion is logged and tried again after another `after`. Without
/// `after`, waits for `shutdown` (only `tern failover` promotes).
async fn watch_source(
    service: ReplicaService,
    watch: Option<(std::time::Duration, Option<String>)>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let Some((after, check)) = watch else {
        shutdown.cancelled().await;
        return Ok(());
    };
    let mut next_try = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let Some(silent) = service.liveness().silent_for() else {
            continue;
        };
        if silent < after || service.export_writable() || tokio::time::Instant::now() < next_try {
            continue;
        }
        if service.liveness().last_heard().consistent_as_of_unix_ms == 0 {
            // The source died before its replica was ever complete: not a
            // replica to run on without an operator's word (`--force`).
            tracing::error!(
                "failover: the source is silent, but no heartbeat ever said the replica was complete; not promoting it (tern failover --force would)"
            );
            next_try = tokio::time::Instant::now() + after;
            continue;
        }
        let silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX);
        let mut reason = format!(
            "the source was silent for {} (--failover-after {})",
            humantime::format_duration(std::time::Duration::from_millis(silent_ms)),
            humantime::format_duration(after)
        );
        if let Some(check) = &check {
            if let Err(e) = confirm_down(check, silent_ms).await {
                tracing::warn!(check = %check, error = %e, "failover: the source is silent, but the failover check did not confirm it is down; not promoting (trying again later)");
                next_try = tokio::time::Instant::now() + after;
                continue;
            }
            reason = format!("{reason} and `{check}` confirmed it down");
        }
        match service.promote(reason, true).await {
            Ok(p) => tracing::warn!(
                epoch = p.epoch,
                rpo_ms = ?p.rpo_ms(),
                source_backlog_bytes = p.source_backlog_bytes,
                "failover: the replica was promoted to primary"
            ),
            Err(e) => {
                tracing::error!(error = %e, "failover: promoting the replica failed; trying again");
                next_try = tokio::time::Instant::now() + after;
            }
        }
    }
}

/// How long a failover check may run.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a failover check did not confirm the source down.
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    #[error("it could not be started")]
    Spawn(#[source] std::io::Error),
    #[error("it exited with {0}")]
    Exit(std::process::ExitStatus),
    #[error("it ran longer than {CHECK_TIMEOUT:?} and was killed")]
    Timeout,
}

/// Runs the operator's `--failover-check` (`sh -c`, with
/// `TERN_SOURCE_SILENT_MS` set): the source is down when it exits 0.
async fn confirm_down(check: &str, silent_ms: u64) -> Result<(), CheckFailed> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(check)
        .env("TERN_SOURCE_SILENT_MS", silent_ms.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(CHECK_TIMEOUT, status).await {
        Err(_) => Err(CheckFailed::Timeout),
        Ok(Err(e)) => Err(CheckFailed::Spawn(e)),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(CheckFailed::Exit(status)),
    }
}

/// The bound NBD address as a client on this host dials it: a wildcard
/// address becomes loopback of its family.
fn reachable_here(bound: &ListenAddr) -> String {
    match bound {
        ListenAddr::Unix(path) => path.display().to_string(),
        ListenAddr::Tcp(addr) => {
            let mut addr = *addr;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            addr.to_string()
        }
    }
}

async fn bind_nbd(listen: &ListenAddr) -> Result<(NbdListener, ListenAddr), AgentError> {
    let bind_err = |source| AgentError::Bind {
        what: "NBD",
        addr: format!("{listen:?}"),
        source,
    };
    match listen {
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_err)?;
            let bound = listener.local_addr().map_err(bind_err)?;
            Ok((NbdListener::Tcp(listener), ListenAddr::Tcp(bound)))
        }
        ListenAddr::Unix(path) => {
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            Ok((
                NbdListener::Unix(listener, path.clone()),
                ListenAddr::Unix(path.clone()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::warm_cache;

    #[test]
    fn warming_reads_the_ranges_given_and_stops_at_the_end_of_the_image() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 3 << 20]).expect("write");
        let bytes = warm_cache(&path, &[0..1 << 20, (2 << 20)..(5 << 19)]).expect("warm");
        assert_eq!(bytes, (1 << 20) + (1 << 19));
        let past_end =
            warm_cache(&path, std::slice::from_ref(&((5 << 19)..(8 << 20)))).expect("warm");
        assert_eq!(past_end, 1 << 19, "only what the image holds");
    }
}
