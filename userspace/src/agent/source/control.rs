//! The standby and its control service (`tern.v1.Control`): a warm
//! standby that replicates its disk continuously, reports status, and on
//! request cuts over or rolls back. Commands reach the agent's task over a
//! channel and run between rounds, never in the middle of one (a round that
//! was cut short would have taken dirty units without sending them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::cutover::{self, CutoverError, CutoverOptions, StatusCell};
use crate::granularity::advice::Advice;
use crate::pause::PauseTarget;
use crate::replicate::{ReplicateError, Replicator, SendOrder, Stats, Tracker};
use crate::rpc::HEARTBEAT_EVERY;
use crate::rpc::pb::{self, control_server};
use crate::throttle::CgroupSpec;

/// Errors of the source agent.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
    #[error(transparent)]
    Cutover(#[from] CutoverError),
    #[error("the control service failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the source agent has stopped; start it again")]
    Stopped,
}

impl From<ControlError> for GrpcStatus {
    fn from(e: ControlError) -> GrpcStatus {
        let code = match &e {
            ControlError::Stopped => tonic::Code::Unavailable,
            ControlError::Cutover(CutoverError::NotConverging { .. })
            | ControlError::Replicate(ReplicateError::Promoted { .. }) => {
                tonic::Code::FailedPrecondition
            }
            ControlError::Replicate(ReplicateError::Fenced { .. }) => tonic::Code::Aborted,
            _ => tonic::Code::Internal,
        };
        GrpcStatus::new(code, e.to_string())
    }
}

/// What the agent's task is asked to do between rounds.
enum Command {
    Cutover(
        CutoverOptions,
        oneshot::Sender<Result<cutover::Report, ControlError>>,
    ),
    Rollback(
        Option<PauseTarget>,
        oneshot::Sender<Result<cutover::RollbackReport, ControlError>>,
    ),
}

/// How often a standby writes back the page cache above its source: data
/// buffered there (a mounted file system, a RAM file) is this much older at
/// most than the standby's copy otherwise says.
const STANDBY_WRITE_BACK: Duration = Duration::from_secs(1);

/// The source side: the tracker, the engine and the status they report.
pub struct SourceAgent {
    pub tracker: Tracker,
    pub repl: Replicator,
    pub status: StatusCell,
    /// Where a write limit on the workload is recorded while it is on.
    pub throttle_record: Option<PathBuf>,
    /// A post-copy's push order: the prediction's hot runs first.
    pub push_order: Option<SendOrder>,
    /// The plan's advice on the mode (`tern plan`), for `--mode auto`.
    pub planned: Option<Advice>,
    /// The plan's throttle lever, when the request names none.
    pub planned_throttle: Option<cutover::ThrottleBy>,
}

fn set(status: &StatusCell, f: impl FnOnce(&mut cutover::Status)) {
    f(&mut status.lock().expect("status lock poisoned"));
}

impl SourceAgent {
    /// What this agent knows for a post-copy the request did not say: the
    /// prediction's push order and the plan's advice.
    pub fn complete(&self, opts: &mut CutoverOptions) {
        if let Some(t) = opts.throttle.as_mut()
            && t.by.is_none()
        {
            t.by = self.planned_throttle;
        }
        let Some(p) = opts.postcopy.as_mut() else {
            return;
        };
        if p.order.is_none() {
            p.order.clone_from(&self.push_order);
        }
        if let cutover::When::Advised { planned } = &mut p.when
            && planned.is_none()
        {
            planned.clone_from(&self.planned);
        }
    }

    /// The initial sync of a standby: a bulk copy to a blank destination, a
    /// delta sync by checksums to one that holds an older copy.
    async fn initial_sync(&mut self) -> Result<(), ControlError> {
        let epoch = self.repl.take_epoch().await?;
        set(&self.status, |s| {
            s.epoch = epoch;
            s.phase = "standby: initial sync";
        });
        if self.repl.destination_is_blank().await? {
            self.repl.send_map().mark_all();
            self.repl.round(true).await?;
        } else {
            self.repl.mark_differences().await?;
            self.repl.round(false).await?;
        }
        Ok(())
    }

    /// One standby step: checksum recovery after lost events, then a round
    /// if anything is dirty. Returns whether it sent anything.
    async fn standby_step(
        &mut self,
        gaps: &mut u64,
        synced_at: &mut Instant,
        written_back: &mut Instant,
    ) -> Result<bool, ControlError> {
        // The RPO is honest only about writes the tracer has seen: write
        // back the page cache above the source now and then, not every
        // step, which would make a mounted file system commit continually.
        if written_back.elapsed() >= STANDBY_WRITE_BACK {
            cutover::write_back(&self.repl).await?;
            *written_back = Instant::now();
        }
        // Every write the disk completed before the tracer is drained is
        // in the dirty map, or at the destination (rounds end flushed).
        let looked = crate::rpc::failover::unix_ms_now();
        self.tracker.sync().await?;
        // A completion the trace does not hold yet (a late event, an unseen
        // one not yet recovered) may be older than the look: no recovery
        // point from this look then.
        let settled = self.tracker.settled();
        if self.tracker.gaps() != *gaps {
            *gaps = self.tracker.gaps();
            self.repl.mark_differences().await?;
        }
        let dirty = self.repl.send_map().dirty_bytes();
        let rpo = if dirty == 0 {
            *synced_at = Instant::now();
            0
        } else {
            u64::try_from(synced_at.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        set(&self.status, |s| {
            s.phase = "standby: replicating";
            s.remaining_bytes = dirty;
            s.rpo_ms = rpo;
            if dirty == 0 && settled {
                s.consistent_as_of_unix_ms = looked;
            }
        });
        if dirty == 0 {
            return Ok(false);
        }
        self.repl.round(false).await?;
        // The round took every unit dirty at the look (the whole map, in
        // disk order) and ended with the destination's barrier: every
        // write completed before the look is there now.
        set(&self.status, |s| {
            s.round += 1;
            if settled {
                s.consistent_as_of_unix_ms = looked;
            }
        });
        Ok(true)
    }

    /// Runs the standby until `shutdown`, serving commands between rounds,
    /// with its heartbeats beside it. A standby whose destination promoted
    /// its replica stops with [`ReplicateError::Promoted`].
    async fn run(
        mut self,
        commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<(), ControlError> {
        let promoted = CancellationToken::new();
        let stop_beats = CancellationToken::new();
        let beats = tokio::spawn(heartbeats(
            self.repl.peer().clone(),
            Arc::clone(&self.status),
            promoted.clone(),
            stop_beats.clone(),
        ));
        let result = self.standby(commands, &shutdown, &promoted).await;
        stop_beats.cancel();
        let heard = beats.await.ok().flatten();
        // A round cut off by the promotion's fence, or the heartbeats'
        // news: either way the destination says what happened.
        let promotion = match (heard, &result) {
            (Some(p), _) => Some(p),
            (None, Err(_)) => self
                .repl
                .client()
                .info()
                .await
                .ok()
                .and_then(|i| i.promotion),
            (None, Ok(())) => None,
        };
        match promotion {
            Some(p) => {
                set(&self.status, |s| {
                    s.phase = "fenced: the replica was promoted";
                });
                Err(ReplicateError::Promoted {
                    promotion: Box::new(p),
                }
                .into())
            }
            None => result,
        }
    }

    /// The standby's rounds, with commands served between them. Without a
    /// control service (no `--control`) nobody sends commands: the channel
    /// is closed from the start, and the standby replicates until `shutdown`.
    async fn standby(
        &mut self,
        commands: mpsc::Receiver<Command>,
        shutdown: &CancellationToken,
        promoted: &CancellationToken,
    ) -> Result<(), ControlError> {
        let mut commands = Some(commands);
        self.initial_sync().await?;
        let mut gaps = self.tracker.gaps();
        let mut synced_at = Instant::now();
        let mut written_back = Instant::now();
        // After a cutover the destination owns the epoch: no more standby rounds.
        let mut replicating = true;
        loop {
            if replicating {
                let sent = self
                    .standby_step(&mut gaps, &mut synced_at, &mut written_back)
                    .await?;
                if sent {
                    // Between rounds: a waiting command goes first.
                    if let Some(rx) = &mut commands {
                        match rx.try_recv() {
                            Ok(cmd) => replicating = self.serve(cmd).await,
                            Err(mpsc::error::TryRecvError::Empty) => {}
                            Err(mpsc::error::TryRecvError::Disconnected) => commands = None,
                        }
                    }
                    if shutdown.is_cancelled() || promoted.is_cancelled() {
                        return Ok(());
                    }
                    continue;
                }
            }
            let idle = tokio::time::sleep(Duration::from_millis(200));
            let next = async {
                match &mut commands {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = promoted.cancelled() => return Ok(()),
                cmd = next => match cmd {
                    Some(cmd) => replicating = self.serve(cmd).await && replicating,
                    None => commands = None,
                },
                () = idle => {}
            }
        }
    }

    /// Serves one command; returns whether standby replication goes on.
    async fn serve(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Cutover(mut opts, reply) => {
                if let Some(t) = &mut opts.throttle {
                    t.record.clone_from(&self.throttle_record);
                }
                self.complete(&mut opts);
                let result =
                    cutover::migrate(&mut self.repl, &self.tracker, &opts, &self.status).await;
                let go_on = match &result {
                    Ok(report) => report.outcome != "cut over",
                    Err(_) => true,
                };
                let _ = reply.send(result.map_err(ControlError::from));
                go_on
            }
            Command::Rollback(resume, reply) => {
                let path = self.repl.source().path().to_path_buf();
                let local = self.repl.local().tree().clone();
                let result = async {
                    let report = cutover::rollback(self.repl.client(), &path, Some(&local)).await?;
                    if let Some(target) = &resume {
                        target.resume_now().await.map_err(CutoverError::from)?;
                    }
                    // The source is primary again: take the epoch back and
                    // replicate (and heartbeat) with it.
                    let epoch = self.repl.take_epoch().await?;
                    set(&self.status, |s| s.epoch = epoch);
                    Ok::<_, ControlError>(report)
                }
                .await;
                let go_on = result.is_ok();
                let _ = reply.send(result);
                go_on
            }
        }
    }
}

/// Tells the destination, every [`HEARTBEAT_EVERY`], that this standby is
/// alive, how much it has not sent yet and up to when the replica is
/// complete; says goodbye (`leaving`) when `stop` is cancelled. Returns the
/// destination's promotion (having cancelled `promoted`) if it refuses
/// heartbeats because its replica was promoted.
async fn heartbeats(
    peer: crate::replicate::Peer,
    status: StatusCell,
    promoted: CancellationToken,
    stop: CancellationToken,
) -> Option<crate::rpc::Promotion> {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut failing = false;
    let said = |status: &StatusCell| {
        let s = status.lock().expect("status lock poisoned");
        (s.epoch, s.remaining_bytes, s.consistent_as_of_unix_ms)
    };
    // A connection of their own: on the replication connection a heartbeat
    // would queue behind the stream's data (HTTP/2 flow control, the TCP
    // send buffer) on a saturated link, and a busy source would read as a
    // lost one. Made (and made again) lazily: the destination may be away.
    let mut client: Option<crate::rpc::ReplicaClient> = None;
    let promotion = loop {
        tokio::select! {
            () = stop.cancelled() => break None,
            _ = tick.tick() => {}
        }
        let (epoch, backlog, as_of) = said(&status);
        if epoch == 0 {
            continue;
        }
        if client.is_none() {
            if let Ok(Ok(c)) = tokio::time::timeout(HEARTBEAT_EVERY, peer.connect()).await {
                client = Some(c);
            } else {
                failed += 1;
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        sent,
                        failed,
                        "heartbeats cannot connect to the destination; it may fail over if this lasts"
                    );
                }
                continue;
            }
        }
        let client = client.as_mut().expect("connected just above");
        let beat = client.heartbeat(epoch, backlog, as_of, false);
        match tokio::time::timeout(HEARTBEAT_EVERY, beat).await {
            Ok(Ok(_)) => {
                sent += 1;
                if std::mem::take(&mut failing) {
                    tracing::info!(sent, failed, "heartbeats reach the destination again");
                }
            }
            Ok(Err(e)) if e.code() == Some(tonic::Code::FailedPrecondition) => {
                // Promoted, or fenced by a newer epoch (a cutover): the
                // destination's Info tells which.
                match client.info().await.map(|i| i.promotion) {
                    Ok(Some(p)) => {
                        promoted.cancel();
                        break Some(p);
                    }
                    Ok(None) => {
                        failed += 1;
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(error = %e, "heartbeats refused: this standby's epoch is fenced");
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            Ok(Err(_)) | Err(_) => {
                failed += 1;
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        sent,
                        failed,
                        "heartbeats do not reach the destination; it may fail over if this lasts"
                    );
                }
            }
        }
    };
    if promotion.is_none() {
        let (epoch, backlog, as_of) = said(&status);
        if epoch > 0
            && let Some(client) = client.as_mut()
        {
            let bye = client.heartbeat(epoch, backlog, as_of, true);
            // Best effort: a destination that cannot hear the goodbye takes
            // the silence for a loss, as it would a crash.
            let _ = tokio::time::timeout(HEARTBEAT_EVERY, bye).await;
        }
    }
    tracing::debug!(sent, failed, "heartbeats ended");
    promotion
}

/// The `tern.v1.Control` service of one source agent.
pub struct ControlService {
    commands: mpsc::Sender<Command>,
    status: StatusCell,
    stats: Arc<Stats>,
    gaps: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Starts the agent's task and returns its control service and the task.
pub fn start(
    agent: SourceAgent,
    shutdown: CancellationToken,
) -> (
    ControlService,
    tokio::task::JoinHandle<Result<(), ControlError>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let service = ControlService {
        commands: tx,
        status: Arc::clone(&agent.status),
        stats: agent.repl.stats(),
        gaps: {
            let counter = agent.tracker.gap_counter();
            Arc::new(move || counter.load(std::sync::atomic::Ordering::Acquire))
        },
    };
    let task = tokio::spawn(agent.run(rx, shutdown));
    (service, task)
}

impl ControlService {
    pub fn into_server(self) -> control_server::ControlServer<ControlService> {
        control_server::ControlServer::new(self)
    }
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> GrpcStatus {
    GrpcStatus::invalid_argument(format!("{what}: {e}"))
}

fn report_json(report: &impl serde::Serialize) -> Result<String, GrpcStatus> {
    serde_json::to_string(report).map_err(|e| GrpcStatus::internal(e.to_string()))
}

#[tonic::async_trait]
impl control_server::Control for ControlService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, GrpcStatus> {
        let s = self.status.lock().expect("status lock poisoned").clone();
        let st = self.stats.snapshot();
        Ok(Response::new(pb::StatusReply {
            phase: s.phase.to_owned(),
            epoch: s.epoch,
            round: s.round,
            sent_bytes: st.sent_bytes,
            wire_bytes: st.wire_bytes,
            remaining_bytes: s.remaining_bytes,
            bandwidth_bps: s.bandwidth_bps,
            dirty_rate_bps: s.dirty_rate_bps,
            estimated_downtime_ms: s.estimated_downtime_ms,
            rpo_ms: s.rpo_ms,
            throttle_bps: s.throttle_bps,
            throttle_cores: s.throttle_cores,
            missing_bytes: s.missing_bytes,
            demands: s.demands,
            demand_wait_p50_us: s.demand_wait_p50_us,
            demand_wait_p99_us: s.demand_wait_p99_us,
            reconnects: st.reconnects,
            gaps: (self.gaps)(),
        }))
    }

    async fn cutover(
        &self,
        request: Request<pb::CutoverRequest>,
    ) -> Result<Response<pb::CutoverReply>, GrpcStatus> {
        let r = request.into_inner();
        let defaults = CutoverOptions::default();
        let pause = (!r.pause.is_empty())
            .then(|| r.pause.parse::<PauseTarget>())
            .transpose()
            .map_err(|e| bad_request("pause", e))?;
        let by = match r.throttle_by.as_str() {
            "" => None,
            "writes" => Some(cutover::ThrottleBy::Writes),
            "cpu" => Some(cutover::ThrottleBy::Cpu),
            other => {
                return Err(GrpcStatus::invalid_argument(format!(
                    "throttle_by {other:?}: give writes or cpu"
                )));
            }
        };
        let opts = CutoverOptions {
            max_downtime: if r.max_downtime_ms == 0 {
                defaults.max_downtime
            } else {
                Duration::from_millis(r.max_downtime_ms)
            },
            max_rounds: if r.max_rounds == 0 {
                defaults.max_rounds
            } else {
                r.max_rounds
            },
            pause,
            health: (!r.health_cmd.is_empty())
                .then_some(cutover::HealthCheck::Command(r.health_cmd))
                .into_iter()
                .chain(std::iter::once(cutover::HealthCheck::Region(
                    cutover::HEALTH_REGION,
                )))
                .collect(),
            switch: !r.no_switch,
            // The standby keeps the destination current: no initial pass.
            initial_sync: false,
            throttle: (!r.throttle_cgroup.is_empty())
                .then(|| r.throttle_cgroup.parse::<CgroupSpec>())
                .transpose()
                .map_err(|e| bad_request("throttle_cgroup", e))?
                .map(|cgroup| cutover::ThrottleOptions {
                    cgroup,
                    // The agent's own record path, set where it runs the cutover.
                    record: None,
                    by,
                }),
            postcopy: match r.mode.as_str() {
                "" | "precopy" if !r.postcopy_if_not_converging => None,
                "" | "precopy" => Some(cutover::PostCopyOptions {
                    when: cutover::When::IfNotConverging,
                    ..cutover::PostCopyOptions::default()
                }),
                "postcopy" => Some(cutover::PostCopyOptions::default()),
                "auto" => Some(cutover::PostCopyOptions {
                    when: cutover::When::Advised { planned: None },
                    ..cutover::PostCopyOptions::default()
                }),
                other => {
                    return Err(GrpcStatus::invalid_argument(format!(
                        "mode {other:?}: give precopy, postcopy or auto"
                    )));
                }
            },
        };
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Cutover(opts, tx))
            .await
            .map_err(|_| GrpcStatus::from(ControlError::Stopped))?;
        let report = rx
            .await
            .map_err(|_| GrpcStatus::from(ControlError::Stopped))??;
        Ok(Response::new(pb::CutoverReply {
            report_json: report_json(&report)?,
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackReply>, GrpcStatus> {
        let r = request.into_inner();
        let resume = (!r.resume.is_empty())
            .then(|| r.resume.parse::<PauseTarget>())
            .transpose()
            .map_err(|e| bad_request("resume", e))?;
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Rollback(resume, tx))
            .await
            .map_err(|_| GrpcStatus::from(ControlError::Stopped))?;
        let report = rx
            .await
            .map_err(|_| GrpcStatus::from(ControlError::Stopped))??;
        Ok(Response::new(pb::RollbackReply {
            report_json: report_json(&report)?,
        }))
    }
}

/// Serves the control service on `listener` (mutual TLS with `tls`) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: ControlService,
    tls: Option<&crate::rpc::TlsMaterial>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    builder
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            crate::rpc::server::nodelay_incoming(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// A client of a source agent's control service.
pub async fn connect(
    addr: &str,
    tls: Option<&crate::rpc::TlsMaterial>,
    domain: Option<&str>,
) -> Result<control_client::ControlClient<tonic::transport::Channel>, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client_config(domain))?;
    }
    Ok(control_client::ControlClient::new(
        endpoint.connect().await?,
    ))
}

pub use pb::control_client;
pub use pb::{CutoverRequest, RollbackRequest, StatusRequest};
