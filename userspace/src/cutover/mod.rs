//! A migration from start to switch-over: the initial copy (or a delta sync
//! by checksums when the destination holds an older copy), delta rounds
//! until the rest fits the downtime budget, then pause, final delta, verify
//! by checksum roots, fence the source by bumping the epoch, make the
//! destination writable, health-check, and roll back on failure without
//! losing a write.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod health;
mod in_flight;
mod postcopy;
mod rollback;
mod throttling;

pub use health::{HEALTH_REGION, HealthCheck, HealthError};
pub use postcopy::{PostCopyOptions, When};
pub use rollback::{RollbackReport, rollback};
pub use throttling::{ThrottleBy, ThrottleOptions, ThrottleReport};

use crate::granularity::{Mode, advice};
use crate::pause::{PauseError, PauseTarget, Paused, Step};
use crate::postcopy::PushReport;
use crate::replicate::{ReplicateError, Replicator, Tracker};
use crate::rpc::RpcError;
use crate::throttle::cpu::CpuThrottle;
use crate::throttle::{ThrottleError, WriteThrottle};
use throttling::Throttling;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("pausing the workload: {0}")]
    Pause(#[from] PauseError),
    #[error("throttling the workload's writes: {0}")]
    Throttle(#[from] ThrottleError),
    /// The source file changed size during the migration (a qcow2 file
    /// that allocated clusters at its end): what lies past the size
    /// replicated would be lost.
    #[error(
        "the source {} grew from {was} to {now} bytes during the migration (a qcow2 file allocating at its end?); Tern replicates a fixed size: preallocate the image (qemu-img convert -o preallocation=metadata) or give it room first; the workload runs on the source",
        path.display()
    )]
    SourceResized {
        path: std::path::PathBuf,
        was: u64,
        now: u64,
    },
    /// Rollback asked of a destination that is not primary.
    #[error(
        "nothing to roll back: the destination's export is read-only (epoch {epoch}), so it never became primary or a rollback already made the source primary again; copying its data back would overwrite the source's newer writes"
    )]
    NotPrimary { epoch: u64 },
    /// The dirty rate does not let the remaining set fit the budget.
    #[error(
        "not converging after {rounds} rounds: {dirty_mb:.1} MB still dirty, the workload dirties {dirty_rate_mbs:.1} MB/s and the link moves {bandwidth_mbs:.1} MB/s, so the final delta would take about {estimate_ms} ms against a budget of {budget_ms} ms{throttled}. Choose: raise --max-downtime to about {estimate_ms}ms, {remedy}, or lower its write rate; the workload was not paused",
        throttled = throttled_note(.throttled_to.as_deref()),
        remedy = remedy(*.throttling, *.at_floor),
    )]
    NotConverging {
        rounds: u64,
        dirty_mb: f64,
        dirty_rate_mbs: f64,
        bandwidth_mbs: f64,
        estimate_ms: u64,
        budget_ms: u64,
        /// How far the workload was throttled, when it was.
        throttled_to: Option<String>,
        /// `--converge throttle` was asked for.
        throttling: bool,
        /// The limit went as low as it goes.
        at_floor: bool,
    },
    /// A throttled workload's pause waits for the throttle's held writes.
    #[error(
        "--converge throttle by writes needs a --max-downtime above {drain_ms} ms: the pause waits that long for the writes the throttle holds (a CPU quota, --throttle-by cpu, holds none)"
    )]
    BudgetBelowDrain { drain_ms: u128 },
    /// The checksum roots still differed after resending.
    #[error(
        "verification failed: the destination's checksum root differs from the source's after {attempts} attempts ({regions} regions differ); the workload was resumed and the destination stays read-only"
    )]
    VerifyFailed { attempts: u32, regions: u64 },
    /// Source I/O: flushing it, pausing its workload, copying back into it.
    #[error("cannot {action} the source {path}: {source}")]
    Source {
        action: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A checksum tree could not be built.
    #[error(transparent)]
    CheckTree(#[from] crate::checktree::CheckTreeError),
    /// The source's writes in flight at the pause did not complete.
    #[error("{0}; the workload was resumed")]
    InFlight(#[from] in_flight::InFlightError),
    /// Writes kept landing on the source after the pause.
    #[error(
        "writes kept completing on the source after the pause ({bytes} bytes after {attempts} final rounds): the pause does not stop the writer; the workload was resumed and the destination stays read-only"
    )]
    WriterNotStopped { attempts: u32, bytes: u64 },
    /// The post-copy demand server failed.
    #[error("{0}")]
    PostCopy(#[source] Box<crate::postcopy::PushError>),
    /// Units stayed missing on the destination after pushing twice.
    #[error(
        "post-copy: the destination still lacks {missing_bytes} bytes after the whole disk was pushed again; the source keeps them: run `tern migrate` again (only what is missing is sent)"
    )]
    PostCopyIncomplete { missing_bytes: u64 },
    /// Another part of the same VM could not switch: no part switches, the
    /// VM resumes on the source.
    #[error("the VM's parts did not all switch, so none did ({0}); the VM runs on the source")]
    GroupGaveUp(#[source] crate::pause::GroupAbort),
}

/// What a migration does and its limits.
#[derive(Debug, Clone)]
pub struct CutoverOptions {
    pub max_downtime: Duration,
    /// Delta rounds allowed before giving up on convergence.
    pub max_rounds: u64,
    /// `None`: the source is idle (nothing to pause).
    pub pause: Option<PauseTarget>,
    pub health: Vec<HealthCheck>,
    /// Switch over (fence the source, destination writable); `false` only syncs.
    pub switch: bool,
    /// Start with a bulk copy or a delta sync by checksums; `false` when a
    /// standby has kept the destination current and the dirty map is trusted.
    pub initial_sync: bool,
    /// Slow the workload's writes while the rounds do not converge (`None`:
    /// fail with [`CutoverError::NotConverging`] instead).
    pub throttle: Option<ThrottleOptions>,
    /// End in post-copy: switch first, then fetch and push what the
    /// destination lacks (always, or when the rounds do not converge).
    pub postcopy: Option<PostCopyOptions>,
}

impl Default for CutoverOptions {
    fn default() -> Self {
        CutoverOptions {
            max_downtime: Duration::from_millis(100),
            max_rounds: 30,
            pause: None,
            health: Vec::new(),
            switch: true,
            initial_sync: true,
            throttle: None,
            postcopy: None,
        }
    }
}

/// Where a migration is; shared with whoever reports status.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub phase: &'static str,
    pub epoch: u64,
    pub round: u64,
    /// Dirty bytes at the last look.
    pub remaining_bytes: u64,
    /// Measured link rate (uncompressed bytes per second).
    pub bandwidth_bps: f64,
    /// Workload's dirty rate (bytes per second of newly dirtied units).
    pub dirty_rate_bps: f64,
    pub estimated_downtime_ms: u64,
    /// Age of the destination's copy: time since the last round finished.
    pub rpo_ms: u64,
    /// A standby's recovery point (Unix ms, 0: none yet): every write the
    /// disk completed before it is at the destination, flushed.
    pub consistent_as_of_unix_ms: u64,
    /// The write limit on the workload now (0: none).
    pub throttle_bps: u64,
    /// The CPU quota on the workload now, in cores (0: none).
    pub throttle_cores: f64,
    /// Post-copy: bytes the destination still lacks, demands it sent, and
    /// how long its reads waited for them (median, 99th percentile, µs).
    pub missing_bytes: u64,
    pub demands: u64,
    pub demand_wait_p50_us: u64,
    pub demand_wait_p99_us: u64,
}

/// A status cell the CLI polls.
pub type StatusCell = Arc<Mutex<Status>>;

fn set_status(cell: &StatusCell, f: impl FnOnce(&mut Status)) {
    let mut status = cell.lock().expect("status lock poisoned");
    f(&mut status);
}

/// What a migration did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub outcome: &'static str,
    /// "pre-copy" or "post-copy" (the switch came before the last data).
    pub mode: &'static str,
    /// Why this mode: the controller's advice (`--mode auto`), or why a
    /// pre-copy switched in post-copy instead (`--converge postcopy`).
    pub mode_reason: Option<String>,
    /// What the post-copy did after the switch.
    pub postcopy: Option<PushReport>,
    pub epoch: u64,
    pub rounds: u64,
    /// The initial pass was a checksum delta sync (the destination held data).
    pub delta_sync: bool,
    pub differing_regions: u64,
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    /// Of `wire_bytes`, what a standby had sent before this migration was
    /// asked for (`tern agent --role source`): already at the destination,
    /// so `wire_bytes - standby_wire_bytes` is what the migration itself sent.
    pub standby_wire_bytes: u64,
    pub skipped_zero_bytes: u64,
    pub resent_bytes: u64,
    pub reconnects: u64,
    pub hashed_bytes: u64,
    /// Bytes of the first pass (bulk copy or delta sync).
    pub first_round_bytes: u64,
    /// Bytes a prediction held back from the first pass (sent later, once).
    pub held_back_bytes: u64,
    pub gaps: u64,
    pub final_delta_bytes: u64,
    pub downtime_ms: f64,
    /// Inside the pause call, before the workload stopped (QEMU's RAM
    /// precopy for a `qemu:` pause): not downtime.
    pub precopy_ms: f64,
    /// Parts of the downtime: pausing, flushing the source, the final round,
    /// verifying the checksum roots, fencing and switching the export.
    pub pause_ms: f64,
    pub flush_ms: f64,
    pub final_round_ms: f64,
    pub verify_ms: f64,
    pub switch_ms: f64,
    /// The health check after the switch (before the hand-over).
    pub health_ms: f64,
    /// After the health check: handing the workload over (`qemu:` sends
    /// QEMU's device state; the VM runs on the destination after it).
    pub handover_ms: f64,
    pub total_seconds: f64,
    pub root: String,
    /// Set when the migration was rolled back.
    pub rollback: Option<RollbackReport>,
    /// What throttling the workload did (`--converge throttle`).
    pub throttle: Option<ThrottleReport>,
    /// A migration staged through object storage (`--via`): what it stored.
    pub staged: Option<StagedReport>,
    pub failure: Option<String>,
}

/// What a staged migration put in its store.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StagedReport {
    pub url: String,
    pub segments: u64,
    /// Bytes of the segments stored (extents as sent, with their framing).
    pub bytes: u64,
}

/// Verifications before a cutover gives up (each resends what differs).
const ATTEMPTS: u32 = 3;
/// How long a lifted write throttle takes to dispatch the writes it held:
/// its timer fires at the next jiffy (4 ms at 250 Hz, 10 ms at 100 Hz).
const THROTTLE_DRAIN: Duration = Duration::from_millis(25);
/// How long the writes in flight at the pause may take to complete.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(2);

/// Marks differences by checksum when the tracer lost events since `seen`.
async fn recover_gaps(
    repl: &mut Replicator,
    tracker: &Tracker,
    seen: &mut u64,
    report: &mut Report,
) -> Result<(), CutoverError> {
    let gaps = tracker.gaps();
    if gaps != *seen {
        tracing::warn!(
            gaps = gaps - *seen,
            "the tracer lost events: comparing checksum trees instead of trusting the dirty map"
        );
        *seen = gaps;
        report.differing_regions += repl.mark_differences().await?;
    }
    Ok(())
}

/// The initial pass: a blank destination gets everything but zeroes; one
/// that holds an older copy gets only the regions whose checksums differ;
/// a post-copy that switches at once gets nothing (all of it goes after).
/// Returns the pass's rate (0 without one), the first model of the link.
async fn initial_pass(
    repl: &mut Replicator,
    opts: &CutoverOptions,
    status: &StatusCell,
    report: &mut Report,
) -> Result<f64, CutoverError> {
    if opts.postcopy.as_ref().is_some_and(|p| p.skip_first_pass) {
        // Everything is pushed after the switch, in the post-copy's order.
        repl.clear_order();
        repl.send_map().mark_all();
        return Ok(0.0);
    }
    let mut bandwidth = 0.0;
    if opts.initial_sync {
        let blank = repl.destination_is_blank().await?;
        let first = if blank {
            set_status(status, |s| s.phase = "bulk copy");
            repl.send_map().mark_all();
            repl.round(true).await?
        } else {
            set_status(status, |s| s.phase = "delta sync by checksums");
            report.delta_sync = true;
            let (differing, pass) = repl.delta_pass().await?;
            report.differing_regions = differing;
            pass
        };
        bandwidth = first.rate();
        report.first_round_bytes = first.bytes;
    }
    Ok(bandwidth)
}

/// Delta rounds while the workload runs, until the final delta's estimate
/// fits the downtime budget (or at once without a pause). Returns the rounds
/// sent; `bandwidth` ends as the best model of the final delta's rate.
#[expect(
    clippy::too_many_arguments,
    reason = "the migration's state, lent for the rounds: the replicator, tracker, options, status, and what the rounds update"
)]
async fn converge(
    repl: &mut Replicator,
    tracker: &Tracker,
    opts: &CutoverOptions,
    status: &StatusCell,
    started: Instant,
    bandwidth: &mut f64,
    gaps_seen: &mut u64,
    mut throttling: Option<&mut Throttling>,
    report: &mut Report,
) -> Result<Converged, CutoverError> {
    let mut last_round_end = Instant::now();
    let mut last_round_start = started;
    // The local tree is needed at the pause; hash it now, while the workload runs.
    set_status(status, |s| s.phase = "hashing source");
    repl.refresh_local().await?;

    let mut rounds = 0;
    let auto = opts
        .postcopy
        .as_ref()
        .is_some_and(|p| matches!(p.when, When::Advised { .. }));
    // The first delta round after a first pass that held extents back (a
    // prediction) sends those extents, in long runs: a bulk copy, not a
    // model of the final delta. Its rate would overstate the bandwidth the
    // final delta gets, the estimate would pause too early, and the rounds
    // during a `qemu:` precopy would wait for too much dirt.
    let catch_up_rounds =
        u64::from(opts.initial_sync && repl.stats().snapshot().held_back_bytes > 0);
    // Whether both trees were refreshed since the last big round.
    let mut fresh = false;
    // The dirty bytes at the last sprint's look (see below).
    let mut sprint_dirty = u64::MAX;
    loop {
        // Dirty pages in a page cache above the source (a mounted file
        // system, guest RAM in a shared file mapping) reach the tracer only
        // when written back: write them back now, so the dirty map and the
        // downtime estimate hold what the pause would otherwise flush.
        let dirty = look(repl, tracker, gaps_seen, report).await?;
        // Units dirtied since the round began (a unit taken early in the
        // round and written again counts once: a floor on the rate).
        let since = last_round_start.elapsed().as_secs_f64().max(1e-3);
        let figures = Figures {
            rounds,
            dirty,
            dirty_rate: dirty as f64 / since,
            bandwidth: *bandwidth,
            estimate_ms: estimate_ms(dirty, *bandwidth),
            budget_ms: budget_ms(opts.max_downtime, throttling.as_deref()),
        };
        figures.show(status, last_round_end);
        // At least one delta round first, so the estimate rests on one.
        let measured = rounds > catch_up_rounds || dirty == 0;
        if opts.pause.is_none() {
            break;
        }
        if auto
            && measured
            && let Some(why) = advised_postcopy(&figures, opts.max_rounds, report)
        {
            return Ok(Converged::Advised { rounds, why });
        }
        let fits = measured && figures.fits();
        if fits {
            if !fresh {
                // Both trees fresh before the pause, so that the
                // verification inside it rehashes only the last rounds'
                // regions; only once the delta fits (every round, a 4 KiB
                // writer's rounds would read 16 times their bytes again).
                // The refresh took time: look again.
                let step = Instant::now();
                repl.local_and_remote_roots().await?;
                tracing::debug!(refresh_ms = ms(step), "converge: trees refreshed");
                fresh = true;
                sprint_dirty = u64::MAX;
                continue;
            }
            // The sprint: what the workload wrote during the refresh (or
            // the last round) would all be copied inside the pause. Short
            // rounds right before it shrink that to what one short round
            // lets through, for as long as each round halves it.
            if dirty == 0 || dirty.saturating_mul(2) > sprint_dirty {
                break;
            }
            sprint_dirty = dirty;
        } else {
            sprint_dirty = u64::MAX;
            if let Some(t) = throttling.as_deref_mut()
                && measured
            {
                t.slow_down(dirty, *bandwidth)?;
                let (on, cores) = (t.current().unwrap_or(0), t.current_cores().unwrap_or(0.0));
                set_status(status, |s| {
                    s.throttle_bps = on;
                    s.throttle_cores = cores;
                });
            }
        }
        if rounds >= opts.max_rounds {
            if fits {
                break;
            }
            repl.read_whole_regions(false);
            return Err(figures.not_converging(throttling.as_deref()));
        }
        // A sprint round reads the whole checksum regions it touches, so the
        // source's tree stays fresh for them (a few small rounds: cheap), and
        // then has the destination rehash what it wrote while the workload
        // still runs: the verification inside the pause finds both trees
        // nearly current.
        let sprinting = fresh && fits;
        repl.read_whole_regions(sprinting);
        last_round_start = Instant::now();
        let round = repl.round(false).await?;
        tracing::debug!(
            round_ms = ms(last_round_start),
            bytes = round.bytes,
            "converge: round"
        );
        if sprinting {
            repl.warm_remote_tree();
        }
        rounds += 1;
        // A round no bigger than the budget lets through leaves the trees
        // little to rehash inside the pause: they stay fresh enough.
        #[expect(
            clippy::cast_precision_loss,
            reason = "bytes compared with a rate times seconds; precision is irrelevant"
        )]
        let small = (round.bytes as f64) <= *bandwidth * opts.max_downtime.as_secs_f64();
        fresh = fresh && small;
        if rounds > catch_up_rounds && round.bytes > 0 {
            // The last delta round is the best model of the final one: the
            // same scattered extents, not the bulk copy's long runs.
            *bandwidth = round.rate();
        }
        last_round_end = Instant::now();
    }
    Ok(Converged::Fits(rounds))
}

/// Dirty pages in a page cache above the source (a mounted file system,
/// guest RAM in a shared file mapping) reach the tracer only when written
/// back: written back first, so the dirty map and the downtime estimate
/// hold what the pause would otherwise flush. Returns the dirty bytes.
async fn look(
    repl: &mut Replicator,
    tracker: &Tracker,
    gaps_seen: &mut u64,
    report: &mut Report,
) -> Result<u64, CutoverError> {
    let look = Instant::now();
    write_back(repl).await?;
    tracker.sync().await?;
    recover_gaps(repl, tracker, gaps_seen, report).await?;
    let dirty = repl.send_map().dirty_bytes();
    tracing::debug!(look_ms = ms(look), dirty, "converge: looked");
    Ok(dirty)
}

/// What one look between delta rounds measured.
struct Figures {
    rounds: u64,
    dirty: u64,
    dirty_rate: f64,
    bandwidth: f64,
    estimate_ms: u64,
    budget_ms: u64,
}

impl Figures {
    fn show(&self, status: &StatusCell, last_round_end: Instant) {
        set_status(status, |s| {
            s.phase = "converging";
            s.round = self.rounds;
            s.remaining_bytes = self.dirty;
            s.bandwidth_bps = self.bandwidth;
            s.dirty_rate_bps = self.dirty_rate;
            s.estimated_downtime_ms = self.estimate_ms;
            s.rpo_ms = u64::try_from(last_round_end.elapsed().as_millis()).unwrap_or(u64::MAX);
        });
    }

    fn fits(&self) -> bool {
        self.estimate_ms <= self.budget_ms
    }

    fn not_converging(&self, throttling: Option<&Throttling>) -> CutoverError {
        CutoverError::NotConverging {
            rounds: self.rounds,
            dirty_mb: self.dirty as f64 / 1e6,
            dirty_rate_mbs: self.dirty_rate / 1e6,
            bandwidth_mbs: self.bandwidth / 1e6,
            estimate_ms: self.estimate_ms,
            budget_ms: self.budget_ms,
            throttled_to: throttling.and_then(Throttling::lowest),
            throttling: throttling.is_some(),
            at_floor: throttling.is_some_and(Throttling::at_floor),
        }
    }
}

/// `--mode auto`: the controller's advice on one look's figures. Returns
/// why to switch in post-copy now, or keeps why pre-copy goes on.
fn advised_postcopy(figures: &Figures, max_rounds: u64, report: &mut Report) -> Option<String> {
    let advice = advice::advise(&advice::Measured {
        dirty_rate_bps: figures.dirty_rate,
        bandwidth_bps: figures.bandwidth,
        dirty_bytes: figures.dirty,
        budget_s: Duration::from_millis(figures.budget_ms).as_secs_f64(),
        rounds_left: max_rounds.saturating_sub(figures.rounds),
    });
    match advice.mode {
        // Advice to switch first matters only while the delta does not
        // fit: one that fits is copied inside the pause.
        Mode::PostCopy if !figures.fits() => Some(advice.why),
        Mode::PostCopy => None,
        Mode::PreCopy => {
            report.mode_reason = Some(advice.why);
            None
        }
    }
}

/// The phase of a VM's part that converged and waits for the others (and
/// the group's one pause), the VM still running.
pub const WAITING_FOR_GROUP: &str = "converged: waiting for the VM's other parts";

/// How the delta rounds ended.
enum Converged {
    /// The delta fits the pause, after this many rounds.
    Fits(u64),
    /// The controller advised post-copy (`--mode auto`), and why.
    Advised { rounds: u64, why: String },
}

/// Runs a migration to its end: switched over (or only synced when
/// `opts.switch` is false), or rolled back with every write kept.
pub async fn migrate(
    repl: &mut Replicator,
    tracker: &Tracker,
    opts: &CutoverOptions,
    status: &StatusCell,
) -> Result<Report, CutoverError> {
    let started = Instant::now();
    let standby_wire_bytes = repl.stats().snapshot().wire_bytes;
    let mut report = Report {
        standby_wire_bytes,
        mode: "pre-copy",
        ..Report::default()
    };
    // Resolved before anything is sent: a wrong cgroup fails at once.
    let mut throttling = start_throttling(opts, repl)?;

    set_status(status, |s| s.phase = "connecting");
    let epoch = repl.take_epoch().await?;
    report.epoch = epoch;
    set_status(status, |s| s.epoch = epoch);
    // A post-copy whose source stopped: the destination is primary and
    // lacks units only this source has. Finish it; nothing else is safe.
    let order = opts.postcopy.as_ref().and_then(|p| p.order.as_ref());
    if postcopy::resume(repl, order, status, &mut report).await? {
        return Ok(finish_report(report, repl, tracker, 0, started));
    }

    let mut bandwidth = initial_pass(repl, opts, status, &mut report).await?;
    let mut gaps_seen = 0;
    let (mut rounds, in_postcopy) = precopy_rounds(
        repl,
        tracker,
        opts,
        status,
        started,
        &mut bandwidth,
        &mut gaps_seen,
        throttling.as_mut(),
        &mut report,
    )
    .await?;
    // The demand server's connection, made while the workload still runs.
    let connected = if in_postcopy {
        Some(repl.peer().connect().await?)
    } else {
        None
    };
    let stopped = stop_workload(
        repl,
        tracker,
        opts,
        status,
        bandwidth,
        &mut gaps_seen,
        throttling.as_mut(),
        &mut report,
    )
    .await?;
    rounds += stopped.rounds;
    let finished = if in_postcopy {
        postcopy::switch(repl, tracker, &mut gaps_seen, &mut report)
            .await
            .map(Some)
    } else {
        final_delta(repl, tracker, &mut gaps_seen, &mut report)
            .await
            .map(|()| None)
    };
    // The held writes are out: the operator's own limit (if any) goes back
    // before the workload resumes or is handed over, whatever happened.
    lift(throttling.as_mut(), &mut report)?;
    let finished = agree_to_switch(stopped.paused.as_ref(), finished).await;
    let paused = stopped.paused;
    let switched = match finished {
        Ok(switched) => switched,
        Err(e) => {
            // `paused` resumes the workload when dropped; say so explicitly.
            if let Some(p) = paused {
                p.resume().await?;
            }
            return Err(e);
        }
    };
    let step = Instant::now();
    let running = if let Some((fence, missing)) = switched {
        // The switch was made with the map: the downtime ends here.
        report.epoch = fence;
        report.downtime_ms = ms(stopped.at);
        set_status(status, |s| {
            s.epoch = fence;
            s.missing_bytes = missing;
        });
        Some(postcopy::Running::start(repl, connected, fence, missing)?)
    } else if opts.switch {
        // Fence the source: a higher epoch ends our write stream for good
        // and makes the destination's export writable.
        repl.finish().await?;
        let fence = epoch + 1;
        repl.client().set_export_writable(fence, true).await?;
        report.epoch = fence;
        report.switch_ms = ms(step);
        report.downtime_ms = ms(stopped.at);
        set_status(status, |s| s.epoch = fence);
        None
    } else {
        if let Some(p) = paused {
            p.resume().await?;
        }
        report.downtime_ms = ms(stopped.at);
        report.outcome = "synced";
        return Ok(finish_report(report, repl, tracker, rounds, started));
    };
    set_status(status, |s| s.phase = "cut over: health check");
    after_switch(repl, opts, status, paused, running, &mut report).await?;
    Ok(finish_report(report, repl, tracker, rounds, started))
}

/// Puts the operator's own write limit back (a throttled run's), noting it.
fn lift(throttling: Option<&mut Throttling>, report: &mut Report) -> Result<(), CutoverError> {
    if let Some(t) = throttling {
        t.lift()?;
        report.throttle = Some(t.report());
    }
    Ok(())
}

/// The disks of one VM switch all or none: each says whether its final
/// delta went through, and one "no" makes every member resume.
async fn agree_to_switch<T>(
    paused: Option<&Paused>,
    finished: Result<T, CutoverError>,
) -> Result<T, CutoverError> {
    match (paused, finished) {
        // (A group runs pre-copy only: no post-copy switch happened yet.)
        (Some(p), Ok(_)) if !p.agree(Step::Switch, true).await => Err(CutoverError::GroupGaveUp(
            p.group_abort()
                .unwrap_or(crate::pause::GroupAbort::SaidNo(Step::Switch)),
        )),
        (Some(p), Err(e)) => {
            let _ = p.agree(Step::Switch, false).await;
            Err(e)
        }
        (_, finished) => finished,
    }
}

/// The delta rounds of a pre-copy, unless the migration switches in
/// post-copy right after its first pass, or when they do not converge and
/// `--converge postcopy` was asked for. Returns the rounds sent and
/// whether the switch is a post-copy one.
#[expect(
    clippy::too_many_arguments,
    reason = "the migration's state, lent to `converge`"
)]
async fn precopy_rounds(
    repl: &mut Replicator,
    tracker: &Tracker,
    opts: &CutoverOptions,
    status: &StatusCell,
    started: Instant,
    bandwidth: &mut f64,
    gaps_seen: &mut u64,
    throttling: Option<&mut Throttling>,
    report: &mut Report,
) -> Result<(u64, bool), CutoverError> {
    let postcopy = opts.postcopy.as_ref();
    match postcopy.map(|p| &p.when) {
        Some(When::AfterFirstPass) => {
            report.mode = "post-copy";
            return Ok((0, true));
        }
        Some(When::Advised {
            planned: Some(planned),
        }) if planned.mode == Mode::PostCopy => {
            report.mode = "post-copy";
            report.mode_reason = Some(format!("the plan advised it: {}", planned.why));
            return Ok((0, true));
        }
        _ => {}
    }
    let converged = converge(
        repl, tracker, opts, status, started, bandwidth, gaps_seen, throttling, report,
    )
    .await;
    match converged {
        Ok(Converged::Fits(rounds)) => Ok((rounds, false)),
        Ok(Converged::Advised { rounds, why }) => {
            tracing::info!(why, "switching in post-copy on the controller's advice");
            report.mode_reason = Some(why);
            report.mode = "post-copy";
            Ok((rounds, true))
        }
        Err(CutoverError::NotConverging {
            rounds,
            dirty_mb,
            dirty_rate_mbs,
            bandwidth_mbs,
            ..
        }) if postcopy.is_some() => {
            let why = format!(
                "the rounds did not converge after {rounds}: {dirty_mb:.1} MB dirty, the workload dirtying {dirty_rate_mbs:.1} MB/s against a link of {bandwidth_mbs:.1} MB/s"
            );
            tracing::warn!(why, "switching in post-copy");
            report.mode_reason = Some(why);
            report.mode = "post-copy";
            Ok((rounds, true))
        }
        Err(e) => Err(e),
    }
}

/// The workload stopped: its hold, when it stopped, and the rounds sent
/// while a `qemu:` pause still ran it.
struct Stopped {
    paused: Option<Paused>,
    at: Instant,
    rounds: u64,
}

/// Pauses the workload (downtime starts), every write limit released
/// first and its held writes given time to land.
#[expect(
    clippy::too_many_arguments,
    reason = "the migration's state, lent for the pause: the replicator, tracker, options, status, the link's rate, and what the pause updates"
)]
async fn stop_workload(
    repl: &mut Replicator,
    tracker: &Tracker,
    opts: &CutoverOptions,
    status: &StatusCell,
    bandwidth: f64,
    gaps_seen: &mut u64,
    mut throttling: Option<&mut Throttling>,
    report: &mut Report,
) -> Result<Stopped, CutoverError> {
    // The rounds from now on hash what they read, so that the
    // verification inside the pause reads nothing again here.
    repl.read_whole_regions(true);
    // A part of a VM waits for the others while the VM still runs: until
    // the group pauses it, nothing is paused (a signal may stop it cleanly).
    let grouped = matches!(opts.pause, Some(PauseTarget::Group(_)));
    set_status(status, |s| {
        s.phase = if grouped {
            WAITING_FOR_GROUP
        } else {
            "paused: final delta"
        };
    });
    // Every limit goes as the workload stops: a pause that drains or
    // flushes (QMP `stop`, fsfreeze) would otherwise wait for the held
    // writes at the throttled rate, inside the downtime. A `qemu:` pause
    // keeps it through its RAM precopy (the disk still converges) and
    // releases it after.
    let mut released = None;
    if !opts
        .pause
        .as_ref()
        .is_some_and(PauseTarget::runs_while_pausing)
    {
        released = release(throttling.as_deref_mut(), status)?;
    }
    let pause_started = Instant::now();
    let mut rounds = 0;
    let paused = match &opts.pause {
        Some(target) if target.runs_while_pausing() => {
            // A round is worth it once the final delta would take a tenth of
            // the budget: each round ends with a destination barrier, and a
            // round still running when the VM stops is downtime.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a non-negative rate times seconds; `as` saturates, right for a byte threshold"
            )]
            let worth = (bandwidth * opts.max_downtime.as_secs_f64() / 10.0) as u64;
            let (paused, more) =
                pause_while_sending(target, repl, tracker, worth, gaps_seen, report).await?;
            rounds = more;
            Some(paused)
        }
        Some(target) => Some(target.pause().await?),
        None => None,
    };
    if grouped {
        set_status(status, |s| s.phase = "paused: final delta");
    }
    // Downtime runs from the moment the workload stopped: a `qemu:` pause
    // precopies RAM while the VM still runs before it stops it.
    let ran_inside = paused.as_ref().map_or(Duration::ZERO, Paused::ran_inside);
    let at = pause_started + ran_inside;
    report.precopy_ms = ran_inside.as_secs_f64() * 1e3;
    report.pause_ms = ms(at);
    if released.is_none() {
        released = release(throttling, status)?;
    }
    if let Some(at) = released {
        // A write the throttle still held at the pause is in no device's
        // in-flight count: the in-flight wait of the final delta would miss
        // it and it would land after the final delta (seen: one 4 KiB block
        // that differed after a verified cutover). Released, the throttle
        // dispatches what it holds from its timer within a jiffy or two;
        // give it that before looking.
        tokio::time::sleep(THROTTLE_DRAIN.saturating_sub(at.elapsed())).await;
    }
    Ok(Stopped { paused, at, rounds })
}

/// After the fence: the health check decides between keeping the
/// destination (the paused workload is handed over) and rolling back (the
/// source is primary again, the workload resumed, every write kept). In
/// post-copy the destination's demands are answered meanwhile, and the
/// push completes after the hand-over (before a rollback, which reads the
/// destination whole).
async fn after_switch(
    repl: &mut Replicator,
    opts: &CutoverOptions,
    status: &StatusCell,
    paused: Option<Paused>,
    mut running: Option<postcopy::Running>,
    report: &mut Report,
) -> Result<(), CutoverError> {
    let order = opts.postcopy.as_ref().and_then(|p| p.order.as_ref());
    let step = Instant::now();
    let mut health = health::health_check(repl, &opts.health).await;
    // Every disk of a VM healthy, or every one rolled back.
    if let Some(p) = &paused
        && !p.agree(Step::Healthy, health.is_ok()).await
        && health.is_ok()
    {
        health = Err(health::HealthError::GroupUnhealthy(
            p.group_abort()
                .unwrap_or(crate::pause::GroupAbort::SaidNo(Step::Healthy)),
        ));
    }
    report.health_ms = ms(step);
    if let Err(e) = health {
        tracing::error!(reason = %e, "health check failed after cutover; rolling back");
        let postcopied = running.is_some();
        if let Some(run) = running.take() {
            report.postcopy = Some(run.finish(repl, order, status).await?);
        }
        set_status(status, |s| s.phase = "rolling back");
        let source_path = repl.source().path().to_path_buf();
        // After a post-copy the source's tree was never brought up to
        // date: rollback hashes the source afresh.
        let local = (!postcopied).then(|| repl.local().tree().clone());
        let rb = rollback(repl.client(), &source_path, local.as_ref()).await?;
        if let Some(p) = paused {
            p.resume().await?;
        }
        report.outcome = "rolled back";
        report.failure = Some(e.to_string());
        report.rollback = Some(rb);
        set_status(status, |s| s.phase = "rolled back: source is primary");
        return Ok(());
    }
    if let Some(p) = paused {
        let step = Instant::now();
        if let Err(e) = p.hand_over().await {
            tracing::error!(
                error = %e,
                "the disk is on the destination but the workload's hand-over failed: \
                 `tern rollback` makes the source primary again"
            );
            return Err(e.into());
        }
        report.handover_ms = ms(step);
    }
    if let Some(run) = running {
        report.postcopy = Some(run.finish(repl, order, status).await?);
    }
    report.outcome = "cut over";
    set_status(status, |s| s.phase = "cut over: destination is primary");
    Ok(())
}

/// The throttle `opts` asks for, its cgroup and disk resolved (nothing set yet).
fn start_throttling(
    opts: &CutoverOptions,
    repl: &Replicator,
) -> Result<Option<Throttling>, CutoverError> {
    let Some(t) = &opts.throttle else {
        return Ok(None);
    };
    let by = t.by.unwrap_or_default();
    if by == ThrottleBy::Writes && opts.max_downtime <= THROTTLE_DRAIN {
        return Err(CutoverError::BudgetBelowDrain {
            drain_ms: THROTTLE_DRAIN.as_millis(),
        });
    }
    Ok(Some(match by {
        ThrottleBy::Writes => Throttling::writes(WriteThrottle::new(
            &t.cgroup,
            repl.source().path(),
            t.record.as_deref(),
        )?),
        ThrottleBy::Cpu => Throttling::cpu(CpuThrottle::new(&t.cgroup, t.record.as_deref())?),
    }))
}

/// Takes every write limit off the workload (see [`Throttling::release`]);
/// when one was on, the moment it went.
fn release(
    throttling: Option<&mut Throttling>,
    status: &StatusCell,
) -> Result<Option<Instant>, CutoverError> {
    let Some(t) = throttling else {
        return Ok(None);
    };
    let on = t.release()?;
    set_status(status, |s| {
        s.throttle_bps = 0;
        s.throttle_cores = 0.0;
    });
    // A CPU quota holds no writes: nothing to drain.
    Ok((on && t.holds_writes()).then(Instant::now))
}

/// The downtime budget the final delta must fit, in milliseconds: a
/// throttled workload's pause also waits for the throttle to let go of the
/// writes it holds.
fn budget_ms(max_downtime: Duration, throttling: Option<&Throttling>) -> u64 {
    let drain = throttling
        .and_then(Throttling::current)
        .map_or(Duration::ZERO, |_| THROTTLE_DRAIN);
    u64::try_from(max_downtime.saturating_sub(drain).as_millis()).unwrap_or(u64::MAX)
}

/// What to do about a workload that does not converge, for the error.
fn remedy(throttling: bool, at_floor: bool) -> &'static str {
    match (throttling, at_floor) {
        (false, _) => "throttle its writes (--converge throttle, or its cgroup's write limit)",
        (true, false) => {
            "raise --max-rounds so the throttle can go lower (it halves when the dirty set does not)"
        }
        (true, true) => {
            "check that the limit reaches its writes (cgroup v1 does not slow buffered writes: their write-back is not charged to the cgroup)"
        }
    }
}

/// How far the workload was throttled, for the error.
fn throttled_note(lowest: Option<&str>) -> String {
    lowest.map_or(String::new(), |what| format!(" (with {what} throttled)"))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn estimate_ms(dirty: u64, bandwidth: f64) -> u64 {
    if dirty == 0 {
        return 0;
    }
    if bandwidth <= 0.0 {
        return u64::MAX;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "positive here; `as` saturates to u64::MAX, as for no bandwidth above"
    )]
    let ms = (dirty as f64 / bandwidth * 1e3).ceil() as u64;
    ms
}

fn finish_report(
    mut report: Report,
    repl: &Replicator,
    tracker: &Tracker,
    rounds: u64,
    started: Instant,
) -> Report {
    let s = repl.stats().snapshot();
    report.rounds = rounds;
    report.sent_bytes = s.sent_bytes;
    report.wire_bytes = s.wire_bytes;
    report.skipped_zero_bytes = s.skipped_zero_bytes;
    report.resent_bytes = s.resent_bytes;
    report.reconnects = s.reconnects;
    report.hashed_bytes = s.hashed_bytes;
    report.held_back_bytes = s.held_back_bytes;
    report.gaps = tracker.gaps();
    report.total_seconds = started.elapsed().as_secs_f64();
    report
}

/// A pause that lets the workload run a while before it stops it (QEMU's
/// RAM precopy): delta rounds go on meanwhile, so the final delta holds only
/// what was written since the last one, not everything since convergence.
/// A round goes once `worth` bytes are dirty. Returns the pause and the
/// rounds sent while waiting for it.
async fn pause_while_sending(
    target: &PauseTarget,
    repl: &mut Replicator,
    tracker: &Tracker,
    worth: u64,
    gaps_seen: &mut u64,
    report: &mut Report,
) -> Result<(Paused, u64), CutoverError> {
    /// Aborts the pause task if the rounds fail: dropping its future drops
    /// the pause, which cancels QEMU's migration and resumes the VM.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let pausing = target.clone();
    let task = tokio::spawn(async move { pausing.pause().await });
    let _abort = AbortOnDrop(task.abort_handle());
    let mut rounds = 0;
    // Look at the dirty set every 20 ms (a write-back each time), but at
    // the pause every 2 ms: noticing the VM's stop late is downtime.
    let mut looked = None::<Instant>;
    while !task.is_finished() {
        if looked.is_none_or(|t| t.elapsed() >= Duration::from_millis(20)) {
            looked = Some(Instant::now());
            write_back(repl).await?;
            tracker.sync().await?;
            recover_gaps(repl, tracker, gaps_seen, report).await?;
            if repl.send_map().dirty_bytes() >= worth.max(1) {
                repl.round(false).await?;
                rounds += 1;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let paused = task.await.map_err(|e| CutoverError::Source {
        action: "pause",
        path: target.to_string(),
        source: Box::new(e),
    })??;
    Ok((paused, rounds))
}

/// With the workload paused: the writes it left in a page cache above the
/// source written back, and those it issued before it stopped completed,
/// so that the next trace sync holds every one of them.
async fn quiesce(repl: &Replicator, report: &mut Report) -> Result<(), CutoverError> {
    let step = Instant::now();
    // Writes still in a page cache above the source must reach it (and the tracer).
    write_back(repl).await?;
    let path = repl.source().path();
    if let Ok(md) = std::fs::metadata(path)
        && md.is_file()
        && md.len() != repl.source().size()
    {
        return Err(CutoverError::SourceResized {
            path: path.to_path_buf(),
            was: repl.source().size(),
            now: md.len(),
        });
    }
    // And the writes the workload issued before it stopped must have
    // completed, so that the trace sync below holds them (in_flight.rs).
    if let Some((counter, own_device)) = in_flight::counter_for(repl.source().path())? {
        match in_flight::wait_until_quiet(counter, IN_FLIGHT_TIMEOUT).await {
            Ok(waited) if waited > Duration::from_millis(1) => {
                tracing::debug!(
                    waited_ms = waited.as_secs_f64() * 1e3,
                    "writes in flight at the pause completed"
                );
            }
            Ok(_) => {}
            // A block device is the workload's own: still busy means the
            // pause did not stop it. A file's device is shared with every
            // other file on it, whose writers were not paused: go on, and
            // rely on the look after the verification for late writes.
            Err(e) if !own_device => {
                tracing::warn!(error = %e, "the source file's device was never idle; going on");
            }
            Err(e) => return Err(e.into()),
        }
    }
    report.flush_ms = ms(step);
    Ok(())
}

/// With the workload paused: flush the source, collect the last writes,
/// send them, and verify that both checksum roots are equal.
async fn final_delta(
    repl: &mut Replicator,
    tracker: &Tracker,
    gaps_seen: &mut u64,
    report: &mut Report,
) -> Result<(), CutoverError> {
    quiesce(repl, report).await?;
    let step = Instant::now();
    tracker.sync().await?;
    recover_gaps(repl, tracker, gaps_seen, report).await?;
    let round = repl.round(false).await?;
    report.final_delta_bytes = round.bytes;
    report.final_round_ms = ms(step);
    let step = Instant::now();
    for attempt in 1..=ATTEMPTS {
        let (local, remote) = repl.local_and_remote_roots().await?;
        tracing::debug!(roots_ms = ms(step), attempt, "final delta: roots");
        if remote == local {
            // Both trees were refreshed from the dirty map: a write that
            // completed on the source since the round's trace sync is in
            // neither. Look once more; a pause that stops its writer leaves
            // nothing here.
            tracker.sync().await?;
            recover_gaps(repl, tracker, gaps_seen, report).await?;
            let late = repl.send_map().dirty_bytes();
            if late == 0 {
                report.root = hex(&local);
                report.verify_ms = ms(step);
                return Ok(());
            }
            tracing::warn!(
                attempt,
                late_bytes = late,
                "writes completed on the source after the final round; sending them"
            );
            if attempt == ATTEMPTS {
                return Err(CutoverError::WriterNotStopped {
                    attempts: attempt,
                    bytes: late,
                });
            }
            repl.round(false).await?;
            continue;
        }
        // Something the dirty map missed (a bio-based device marks at issue,
        // not completion; a write whose event never reached the ring): the
        // regions found here are only the missed writes that a final read
        // happened to hash. Another missed write leaves the source's leaf as
        // old as the destination's, and equal roots would hide it. So the
        // source's tree is distrusted whole and rehashed (the workload is
        // paused: this costs downtime, not data), then what differs is sent.
        repl.local().stale_map().mark_all();
        let regions = repl.mark_differences().await?;
        tracing::warn!(
            attempt,
            regions,
            "checksum roots differ at cutover; resending the differing regions"
        );
        if attempt == ATTEMPTS {
            return Err(CutoverError::VerifyFailed {
                attempts: attempt,
                regions,
            });
        }
        repl.round(false).await?;
    }
    Ok(())
}

/// Writes back the page cache above the source ([`sync_source`]), off the
/// async threads, so that its dirty pages reach the tracer.
pub async fn write_back(repl: &Replicator) -> Result<(), CutoverError> {
    let path = repl.source().path().to_path_buf();
    tokio::task::spawn_blocking(move || sync_source(&path))
        .await
        .map_err(|e| CutoverError::Source {
            action: "flush",
            path: String::new(),
            source: Box::new(e),
        })?
}

/// Flushes what sits above the source: `syncfs` on every file system
/// mounted from it (a cgroup or command pause leaves their dirty pages in the
/// page cache), then writes back the source's own dirty pages (an image's,
/// a device's buffer cache) with `sync_file_range`, which waits for the
/// writeback but sends no cache flush to the disk below: the reads that
/// follow are `O_DIRECT` and see the data either way. Much cheaper than
/// `sync(2)` (every file system on the host) or `fsync` (a device flush
/// inside the downtime).
fn sync_source(path: &Path) -> Result<(), CutoverError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let err = |action: &'static str, e: std::io::Error| CutoverError::Source {
        action,
        path: path.display().to_string(),
        source: Box::new(e),
    };
    let file = std::fs::File::open(path).map_err(|e| err("open", e))?;
    let meta = file.metadata().map_err(|e| err("stat", e))?;
    if meta.file_type().is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        for mount in mounts_of(major, minor) {
            let dir = std::fs::File::open(&mount).map_err(|e| err("open a mount of", e))?;
            // SAFETY: `dir` is an open descriptor for the duration of the call.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(err("syncfs a mount of", std::io::Error::last_os_error()));
            }
        }
    }
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: `file` is an open descriptor; offset 0 and length 0 mean the whole file.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(err("write back", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mount points (in our mount namespace) of the block device `major:minor`.
fn mounts_of(major: u32, minor: u32) -> Vec<std::path::PathBuf> {
    let want = format!("{major}:{minor}");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let _root = fields.next()?;
            let mount = fields.next()?;
            (dev == want).then(|| std::path::PathBuf::from(mount.replace("\\040", " ")))
        })
        .collect()
}

fn hex(hash: &[u8]) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
