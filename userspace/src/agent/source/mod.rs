//! The source agent: the entry point of the source wing, as
//! [`run_destination`](super::run_destination) is the destination's. One
//! [`SourceOptions`] says what to replicate, to whom and how;
//! [`Source::bind`] opens the disk, starts the tracer (with the history
//! recorder), connects the engine and orders the first copy by a prediction;
//! then [`Source::migrate`] runs one migration to its end, or
//! [`Source::run`] keeps a warm standby with its control service
//! ([`control`]) until it is cut over, rolled back or stopped.

pub mod control;
mod metrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use metrics::SourceMetrics;

pub use control::{
    ControlError, ControlService, CutoverRequest, RollbackRequest, SourceAgent, StatusRequest,
    connect, control_client, serve, start,
};

use crate::cutover::{self, CutoverError, CutoverOptions, Status, StatusCell};
use crate::dirty::{DirtyError, DirtyMap};
use crate::granularity::{EnginePlan, GranularityError};
use crate::history::{
    self, HistoryError, HistoryStore, Retention, RollPolicy, UploadOptions, Uploader,
    UploaderHandle,
};
use crate::image::{Image, ImageError, ImageOptions};
use crate::predict::{self, PredictError, PredictOptions, Prediction};
use crate::replicate::{
    CompressWhen, LocalTree, ObserverFactory, Peer, ReplicateError, ReplicateOptions, Replicator,
    Stats, Tracker,
};
use crate::rpc::{MAX_EXTENT_LEN, TlsError, TlsMaterial};
use crate::staging::{Relay, RelayOptions, StagingError};
use crate::trace::cpu::CpuTarget;
use crate::trace::session::SessionConfig;

/// Defaults of the source's knobs (the CLI's flags show the same).
pub const DEFAULT_UNIT: u64 = 4 << 10;
pub const DEFAULT_EXTENT: u64 = 1 << 20;
pub const DEFAULT_RING_BYTES: u64 = 16 << 20;
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_mins(2);
pub const DEFAULT_TRACE_OUT: &str = "/var/tmp/tern-source.trace";
pub const DEFAULT_PREFETCH_HORIZON: Duration = Duration::from_mins(10);

/// Errors of the source agent before and around a migration.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Plan(#[from] GranularityError),
    #[error(
        "the plan {plan} is for a {plan_bytes} byte disk but {disk} has {disk_bytes} bytes; run `tern plan` with --device-size {disk_bytes}"
    )]
    PlanSize {
        plan: PathBuf,
        plan_bytes: u64,
        disk: PathBuf,
        disk_bytes: u64,
    },
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A killed run's write limit on the workload could not be undone.
    #[error("undoing an earlier run's write limit on the workload: {0}")]
    Throttle(#[from] crate::throttle::ThrottleError),
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
    #[error("cannot use the history spool {spool} (choose another with --history-spool)")]
    Spool {
        spool: PathBuf,
        #[source]
        source: Box<HistoryError>,
    },
    #[error("opening the history {url}")]
    History {
        url: String,
        #[source]
        source: Box<HistoryError>,
    },
    #[error(transparent)]
    Predict(#[from] PredictError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--extent must be from 4K to 8M, not {0} bytes")]
    Extent(u64),
    #[error(transparent)]
    Cutover(#[from] CutoverError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot listen on {addr} for the control service")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(
        "a standby source agent keeps a replica over a link; a staged migration (--via) is one `tern migrate --via URL`"
    )]
    StagedStandby,
    #[error("the source agent's {what} panicked")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The disk a source replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceDisk {
    /// A block device, traced and read with `O_DIRECT`.
    Device(PathBuf),
    /// A disk image on a file system, traced on the device under it. With
    /// `read_cached` it is read through the page cache (guest RAM in a file,
    /// whose pages are in memory).
    File { path: PathBuf, read_cached: bool },
}

impl SourceDisk {
    pub fn path(&self) -> &Path {
        match self {
            SourceDisk::Device(p) | SourceDisk::File { path: p, .. } => p,
        }
    }
}

/// How the first copy is ordered.
#[derive(Debug, Clone, Default)]
pub enum Prefetch {
    /// Disk order.
    #[default]
    None,
    /// A plan from `tern predict`.
    Plan(PathBuf),
    /// Train the predictor at start on this source's recorded history: the
    /// store's URL, how far back (an age or a time, as `history ls --from`)
    /// and how far ahead to predict.
    History {
        url: String,
        window: String,
        horizon: Duration,
    },
}

/// Recording the source's I/O history into object storage while replicating.
#[derive(Debug, Clone)]
pub struct HistoryRecording {
    pub url: String,
    pub retention: Option<Retention>,
    /// Where segments wait until the store has them.
    pub spool: PathBuf,
    /// Window length of one segment, and the size that closes one early.
    pub roll: RollPolicy,
    /// Each segment also as a Parquet table.
    pub parquet: bool,
}

/// Everything a source agent is built from.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub disk: SourceDisk,
    /// The destination agent's gRPC address (`host:port`).
    pub to: String,
    /// Mutual TLS material (from `tern certs init`); plaintext without.
    pub tls_dir: Option<PathBuf>,
    /// Name checked in the destination's certificate (default: the host of `to`).
    pub domain: Option<String>,
    /// A plan from `tern plan --out`: its unit, region size, extent length
    /// and per-zone units replace the three below.
    pub plan: Option<PathBuf>,
    /// Dirty-tracking unit.
    pub unit: u64,
    /// Checksum-tree region size (default: [`crate::replicate::default_region_size`]).
    pub region_size: Option<u64>,
    /// Longest extent on the wire.
    pub extent_len: u64,
    /// zstd level; `None` sends data uncompressed.
    pub zstd_level: Option<i32>,
    /// With a level: always, or only while compression moves the data faster.
    pub compress: CompressWhen,
    /// Bandwidth limit on the wire in bytes per second.
    pub max_rate: Option<u64>,
    /// How long to keep reconnecting to a lost destination.
    pub reconnect_for: Duration,
    /// Tracer ring buffer size.
    pub ring_bytes: u64,
    /// The source's I/O history as a trace file.
    pub trace_out: PathBuf,
    pub prefetch: Prefetch,
    pub history: Option<HistoryRecording>,
    /// Where a write limit on the workload (`--converge throttle`) is
    /// recorded while it is on, so that the next run undoes a killed run's.
    pub throttle_record: Option<PathBuf>,
    /// Whose CPU the source's trace (and history) profiles beside the I/O.
    pub cpu: Vec<CpuTarget>,
    /// Stage the migration through object storage instead of a link to the
    /// destination (`to` is then only the store's name in messages).
    pub via: Option<RelayOptions>,
}

impl SourceOptions {
    /// Options for replicating `disk` to the agent at `to`, every other knob
    /// at its default.
    pub fn new(disk: SourceDisk, to: impl Into<String>) -> SourceOptions {
        SourceOptions {
            disk,
            to: to.into(),
            tls_dir: None,
            domain: None,
            plan: None,
            unit: DEFAULT_UNIT,
            region_size: None,
            extent_len: DEFAULT_EXTENT,
            zstd_level: Some(1),
            compress: CompressWhen::Auto,
            max_rate: None,
            reconnect_for: DEFAULT_RECONNECT_FOR,
            ring_bytes: DEFAULT_RING_BYTES,
            trace_out: PathBuf::from(DEFAULT_TRACE_OUT),
            prefetch: Prefetch::None,
            history: None,
            throttle_record: None,
            cpu: vec![CpuTarget::Host],
            via: None,
        }
    }
}

/// A bound source: tracing, connected, ready to migrate or to stand by.
pub struct Source {
    agent: SourceAgent,
    /// The staging relay of a migration staged through object storage.
    relay: Option<Relay>,
    uploader: Option<UploaderHandle>,
    /// The TLS material the control service serves with too.
    tls: Option<TlsMaterial>,
}

/// Runs a warm standby until it is cut over, rolled back or `cancel`led:
/// the source side's counterpart of [`run_destination`](super::run_destination).
pub async fn run_source(
    opts: &SourceOptions,
    listen: &Listen,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    if opts.via.is_some() {
        return Err(SourceError::StagedStandby);
    }
    Source::bind(opts).await?.run(listen, cancel).await
}

/// Where a standby source agent serves, besides replicating.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listen {
    /// The control service (`tern status|migrate|rollback --agent`).
    pub control: Option<SocketAddr>,
    /// Prometheus `GET /metrics` ([`SourceMetrics`]).
    pub metrics: Option<SocketAddr>,
}

impl Source {
    /// Opens the disk, starts tracing (before the first read: no write after
    /// this point is missed) and history recording, connects to the
    /// destination and, with a prefetch, orders the first copy.
    #[expect(
        clippy::too_many_lines,
        reason = "the source's start-up in its one safe order (tracing before the first read); each step is a few lines"
    )]
    pub async fn bind(opts: &SourceOptions) -> Result<Source, SourceError> {
        // A run killed with the workload throttled left its record: the
        // workload must not stay slowed, whatever this run does (and
        // whichever disk it moves).
        if let Some(record) = &opts.throttle_record {
            crate::throttle::undo_dead_records_beside(record)?;
        }
        let path = opts.disk.path();
        let read_cached = matches!(
            opts.disk,
            SourceDisk::File {
                read_cached: true,
                ..
            }
        );
        let image = Image::open(
            path,
            &ImageOptions {
                read_only: true,
                direct: !read_cached,
                bulk_direct: false,
                ..ImageOptions::default()
            },
        )?;
        let plan = opts.plan.as_deref().map(EnginePlan::load).transpose()?;
        if let (Some(p), Some(file)) = (&plan, &opts.plan)
            && p.device_size != image.size()
        {
            return Err(SourceError::PlanSize {
                plan: file.clone(),
                plan_bytes: p.device_size,
                disk: path.to_path_buf(),
                disk_bytes: image.size(),
            });
        }
        let unit = plan.as_ref().map_or(opts.unit, |p| p.unit);
        let send = Arc::new(DirtyMap::new(image.size(), unit)?);
        let region_size = plan
            .as_ref()
            .map(|p| p.region_size)
            .or(opts.region_size)
            .unwrap_or_else(|| crate::replicate::default_region_size(image.size()));
        // Zones whose unit is coarser than the dirty map's are widened when sent.
        let unit_zones = plan.as_ref().and_then(|p| p.unit_zones(unit));
        let extent = plan.as_ref().map_or(opts.extent_len, |p| p.extent_len);
        let extent_len = u32::try_from(extent)
            .ok()
            .filter(|e| (4096..=MAX_EXTENT_LEN).contains(e))
            .ok_or(SourceError::Extent(extent))?;
        let local = LocalTree::new(image.size(), region_size)?;
        let (history, uploader) = opts
            .history
            .as_ref()
            .map(start_history)
            .transpose()?
            .unzip();
        let (devices, file) = match &opts.disk {
            SourceDisk::Device(p) => (vec![p.clone()], None),
            SourceDisk::File { path, .. } => (Vec::new(), Some(path.clone())),
        };
        let tracker = Tracker::start_observed(
            SessionConfig {
                devices,
                image: file,
                pids: Vec::new(),
                faults: false,
                fault_range: None,
                duration: None,
                ring_bytes: opts.ring_bytes,
                out: opts.trace_out.clone(),
                progress: false,
                cpu: opts.cpu.clone(),
            },
            vec![Arc::clone(&send), local.stale_map()],
            vec![local.stale_map()],
            history,
        )?;
        // The plan's CPU profile says whether compressing pays on this
        // host; an operator's --compress always stands.
        let zstd_level = match (plan.as_ref().and_then(|p| p.compress), opts.compress) {
            (Some(false), CompressWhen::Auto) if opts.zstd_level.is_some() => {
                tracing::info!("sending raw: the plan found compressing does not pay here");
                None
            }
            _ => opts.zstd_level,
        };
        let repl_opts = ReplicateOptions {
            extent_len,
            zstd_level,
            compress: opts.compress,
            max_rate: opts.max_rate,
            region_size,
            reconnect_for: opts.reconnect_for,
            unit_zones,
            ..ReplicateOptions::default()
        };
        let (peer, relay) = match &opts.via {
            Some(via) => {
                let relay = Relay::start(via, image.size(), region_size).await?;
                // Served as long as the process runs: the engine may reconnect to it.
                (relay.serve(CancellationToken::new()), Some(relay))
            }
            None => (
                Peer::load(&opts.to, opts.tls_dir.as_deref(), opts.domain.as_deref())?,
                None,
            ),
        };
        let tls = peer.tls.clone();
        let mut repl = Replicator::connect(image, peer, send, local, repl_opts).await?;
        let prediction = match &opts.prefetch {
            Prefetch::None => None,
            Prefetch::Plan(file) => Some(Prediction::load(file)?),
            Prefetch::History {
                url,
                window,
                horizon,
            } => Some(train_on_history(url, window, *horizon, opts.region_size, path).await?),
        };
        let mut push_order = None;
        if let Some(prediction) = prediction {
            let order = prediction.send_order(0.5);
            tracing::info!(
                first = order.first.len(),
                hold = order.hold.len(),
                model = %prediction.model,
                "ordering the first copy by the prediction"
            );
            push_order = Some(prediction.postcopy_order());
            repl.set_order(order);
        }
        Ok(Source {
            agent: SourceAgent {
                tracker,
                repl,
                status: Arc::new(Mutex::new(Status::default())),
                throttle_record: opts.throttle_record.clone(),
                push_order,
                planned: plan.as_ref().and_then(EnginePlan::advice),
                planned_throttle: plan
                    .as_ref()
                    .and_then(|p| p.throttle_by.as_deref())
                    .map(|by| {
                        if by == "cpu" {
                            cutover::ThrottleBy::Cpu
                        } else {
                            cutover::ThrottleBy::Writes
                        }
                    }),
            },
            relay,
            uploader,
            tls,
        })
    }

    /// The phase and figures a status reporter shows.
    pub fn status(&self) -> StatusCell {
        Arc::clone(&self.agent.status)
    }

    /// The destination agent's NBD export, as a client on its host reaches
    /// it (`None`: the agent serves none).
    pub async fn destination_nbd(&mut self) -> Result<Option<crate::rpc::NbdExport>, SourceError> {
        let info = self
            .agent
            .repl
            .client()
            .info()
            .await
            .map_err(crate::replicate::ReplicateError::from)?;
        Ok(info.nbd)
    }

    /// The engine's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.agent.repl.stats()
    }

    /// Runs one migration to its end (see [`cutover::migrate`]), then closes
    /// the source's trace and uploads the rest of its history.
    pub async fn migrate(self, opts: &CutoverOptions) -> Result<cutover::Report, SourceError> {
        let mut opts = opts.clone();
        self.agent.complete(&mut opts);
        let Source {
            agent:
                SourceAgent {
                    tracker,
                    mut repl,
                    status,
                    ..
                },
            uploader,
            relay,
            ..
        } = self;
        let mut report = cutover::migrate(&mut repl, &tracker, &opts, &status).await?;
        if let Some(relay) = relay {
            let up = relay.uploaded();
            report.staged = Some(cutover::StagedReport {
                url: relay.url().to_owned(),
                segments: up.segments,
                bytes: up.bytes,
            });
        }
        let totals = tracker.stop()?;
        tracing::info!(
            events = totals.block_events,
            gaps = totals.gaps,
            "source trace closed"
        );
        stop_history(uploader).await;
        Ok(report)
    }

    /// Keeps a warm standby, serving the control API on `control` (with the
    /// TLS material of the options, if any), until a cutover or rollback
    /// ends it or `cancel` stops it.
    pub async fn run(self, listen: &Listen, cancel: CancellationToken) -> Result<(), SourceError> {
        if self.relay.is_some() {
            return Err(SourceError::StagedStandby);
        }
        // Both ports bound before anything starts: a taken one fails the
        // start, clearly, with nothing left running.
        let control = match listen.control {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| SourceError::Listen { addr, source })?,
            ),
            None => None,
        };
        let metrics = match listen.metrics {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let Source {
            agent,
            uploader,
            tls,
            ..
        } = self;
        let metrics = metrics.map(|listener| {
            let page = crate::metrics::Sources::default().with(Arc::new(SourceMetrics {
                status: Arc::clone(&agent.status),
                stats: agent.repl.stats(),
            }));
            tokio::spawn(crate::metrics::serve(listener, page, cancel.clone()))
        });
        let (service, task) = start(agent, cancel.clone());
        let server = control.map(|listener| {
            let shutdown = cancel.clone();
            tokio::spawn(async move { serve(listener, service, tls.as_ref(), shutdown).await })
        });
        let ended = async {
            task.await.map_err(|source| SourceError::Task {
                what: "task",
                source,
            })??;
            // The task dropped the tracker: the last history segment is closed.
            stop_history(uploader).await;
            cancel.cancel();
            if let Some(server) = server {
                server.await.map_err(|source| SourceError::Task {
                    what: "control server",
                    source,
                })??;
            }
            if let Some(server) = metrics {
                server.await.map_err(|source| SourceError::Task {
                    what: "metrics endpoint",
                    source,
                })??;
            }
            Ok(())
        }
        .await;
        cancel.cancel();
        ended
    }
}

/// Starts the history uploader and returns the tracker's observer factory for it.
fn start_history(rec: &HistoryRecording) -> Result<(ObserverFactory, UploaderHandle), SourceError> {
    let store = HistoryStore::open(&rec.url).map_err(|source| SourceError::History {
        url: rec.url.clone(),
        source: Box::new(source),
    })?;
    let mut opts = UploadOptions::new(rec.spool.clone());
    opts.roll = rec.roll;
    opts.retention = rec.retention;
    opts.parquet = rec.parquet;
    let uploader = Uploader::new(store, opts).map_err(|source| SourceError::Spool {
        spool: rec.spool.clone(),
        source: Box::new(source),
    })?;
    let handle = uploader.spawn(CancellationToken::new());
    let factory: ObserverFactory = Box::new(move |header| uploader.observer(header));
    tracing::info!(url = %rec.url, spool = %rec.spool.display(), "recording history");
    Ok((factory, handle))
}

/// Uploads what is left (the tracker must have stopped) and reports.
async fn stop_history(handle: Option<UploaderHandle>) {
    if let Some(h) = handle {
        let counts = h.shutdown(Duration::from_secs(30)).await;
        tracing::info!(
            segments = counts.segments,
            bytes = counts.bytes,
            waiting = counts.waiting,
            failures = counts.failures,
            parquet_failures = counts.table_failures,
            "history uploader stopped"
        );
    }
}

/// Trains the predictor on `url`'s history of `source` (this host, this
/// device, since `window`) off the async threads, and says what it cost.
async fn train_on_history(
    url: &str,
    window: &str,
    horizon: Duration,
    region_size: Option<u64>,
    source: &Path,
) -> Result<Prediction, SourceError> {
    let query = history::Query {
        range: history::TimeRange {
            from_unix_ns: Some(history::TimeRange::parse_time(window).map_err(|source| {
                SourceError::History {
                    url: url.to_owned(),
                    source: Box::new(source),
                }
            })?),
            to_unix_ns: None,
        },
        host: Some(history::sanitize(&crate::trace::device::hostname())),
        device: Some(history::sanitize(&source.to_string_lossy())),
    };
    // The checksum region is the unit the first copy is ordered in.
    let defaults = PredictOptions::default();
    let opts = PredictOptions {
        unit: region_size.unwrap_or(defaults.unit),
        ..defaults
    };
    let horizon = u64::try_from(horizon.as_nanos()).unwrap_or(u64::MAX);
    let url = url.to_owned();
    let started = Instant::now();
    let plan = tokio::task::spawn_blocking(move || -> Result<Prediction, SourceError> {
        let reader =
            history::HistoryReader::open(&url, &query).map_err(|source| SourceError::History {
                url,
                source: Box::new(source),
            })?;
        Ok(predict::predict_future_io(reader, horizon, &opts)?)
    })
    .await
    .map_err(|source| SourceError::Task {
        what: "training thread",
        source,
    })??;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        extents = plan.extents.len(),
        model = %plan.model,
        "trained on the recorded history"
    );
    Ok(plan)
}
