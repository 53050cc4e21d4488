//! The post-copy end of a migration: with the workload paused, the map of
//! what the destination still lacks goes over with the switch itself (no
//! data copy inside the pause); after it, the destination's demands are
//! answered first and the rest is pushed in the predictor's order, until
//! the destination holds every unit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CutoverError, Report, StatusCell, ms, quiesce, set_status};
use crate::dirty::DirtyMap;
use crate::granularity::advice::Advice;
use crate::postcopy::{DemandServer, PushReport};
use crate::replicate::{Replicator, SendOrder, Tracker};
use crate::rpc::ReplicaClient;

/// Looks at the dirty map before the switch: it must stop growing (a
/// writer the pause did not stop would write where the map says the
/// destination is current).
const LOOKS: u32 = 3;
/// The destination's post-copy figures are read this often for status.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// After the push, how long what the destination lacks may stay the same
/// (fills of the demand stream still landing) before its map is asked for.
const SETTLE_FOR: Duration = Duration::from_secs(2);

/// How a post-copy migration goes.
#[derive(Debug, Clone, Default)]
pub struct PostCopyOptions {
    /// Switch before even the first pass: everything is pushed after it.
    pub skip_first_pass: bool,
    /// When the switch comes.
    pub when: When,
    /// The push's order (predicted-hot runs first); `None`: disk order.
    pub order: Option<SendOrder>,
}

/// When a migration that may end in post-copy switches.
#[derive(Debug, Clone, Default)]
pub enum When {
    /// Right after the first pass (`--mode postcopy`).
    #[default]
    AfterFirstPass,
    /// Only when the delta rounds do not converge (`--converge postcopy`).
    IfNotConverging,
    /// When the controller advises it (`--mode auto`): from a plan of the
    /// recorded workload (`tern plan`), or from the rounds' measured dirty
    /// rate and link rate; and when the rounds do not converge.
    Advised { planned: Option<Advice> },
}

/// The switch: the workload is paused. Returns the fence epoch and the
/// bytes the destination lacks.
pub(super) async fn switch(
    repl: &mut Replicator,
    tracker: &Tracker,
    gaps_seen: &mut u64,
    report: &mut Report,
) -> Result<(u64, u64), CutoverError> {
    quiesce(repl, report).await?;
    let step = Instant::now();
    // Everything sent so far durable, the old stream closed: nothing of
    // it may land after the switch.
    repl.finish().await?;
    let mut count = u64::MAX;
    let mut looks = 0;
    loop {
        tracker.sync().await?;
        let gaps = tracker.gaps();
        if gaps != *gaps_seen {
            // A lost event: any unit may be dirty. Inside the pause no
            // tree comparison: the push sends it all (fills drop what the
            // destination holds).
            *gaps_seen = gaps;
            report.gaps = gaps;
            repl.send_map().mark_all();
        }
        let now = repl.send_map().count();
        if now == count {
            break;
        }
        looks += 1;
        if looks > LOOKS {
            return Err(CutoverError::WriterNotStopped {
                attempts: looks,
                bytes: repl.send_map().dirty_bytes(),
            });
        }
        count = now;
    }
    let map = repl.send_map();
    let (unit, missing) = (map.unit(), map.to_bytes());
    let fence = repl.epoch() + 1;
    let missing_bytes = repl.client().switch_postcopy(fence, unit, missing).await?;
    report.switch_ms = ms(step);
    Ok((fence, missing_bytes))
}

/// Takes up a post-copy whose source stopped after the switch (the
/// destination says units are missing): nothing is paused or switched,
/// what the destination lacks is pushed while its demands are answered.
/// Returns whether there was one.
pub(super) async fn resume(
    repl: &mut Replicator,
    order: Option<&SendOrder>,
    status: &StatusCell,
    report: &mut Report,
) -> Result<bool, CutoverError> {
    let under_way = repl.client().info().await?.postcopy;
    if !under_way.active {
        return Ok(false);
    }
    let missing_bytes = under_way.missing_bytes;
    tracing::warn!(
        missing_bytes,
        "the destination is in a post-copy whose source stopped: taking it up"
    );
    report.mode = "post-copy";
    report.mode_reason = Some(format!(
        "the destination was already switched in post-copy and still lacked {missing_bytes} bytes: taken up where it stopped"
    ));
    repl.clear_order();
    // What the destination lacks, when it counts in our units; else all.
    match repl.client().missing_map().await? {
        Some((unit, missing)) if unit == repl.send_map().unit() => {
            repl.send_map().mark_bytes(&missing);
        }
        _ => repl.send_map().mark_all(),
    }
    let fence = repl.epoch();
    let running = Running::start(repl, None, fence, missing_bytes)?;
    report.postcopy = Some(running.finish(repl, order, status).await?);
    report.outcome = "cut over";
    Ok(true)
}

/// A post-copy after its switch: the demand server answering, the push to
/// run.
pub(super) struct Running {
    demands: DemandServer,
    started: Instant,
    missing_bytes: u64,
}

impl Running {
    /// Starts answering demands (before anything else after the switch:
    /// the destination's first reads wait for them).
    /// `connected`: a connection to the destination made before the pause.
    pub(super) fn start(
        repl: &mut Replicator,
        connected: Option<ReplicaClient>,
        fence: u64,
        missing_bytes: u64,
    ) -> Result<Running, CutoverError> {
        let map = repl.send_map();
        let served = Arc::new(DirtyMap::new(map.disk_size(), map.unit()).map_err(|e| {
            CutoverError::Source {
                action: "map the post-copy of",
                path: repl.source().path().display().to_string(),
                source: Box::new(e),
            }
        })?);
        repl.enter_postcopy(fence, Arc::clone(&served));
        let demands = DemandServer::start(
            repl.peer().clone(),
            connected,
            repl.source().clone(),
            fence,
            Arc::clone(repl.send_map()),
            served,
            repl.options().reconnect_for,
        );
        Ok(Running {
            demands,
            started: Instant::now(),
            missing_bytes,
        })
    }

    /// Pushes everything still missing, `order` first, and waits until the
    /// destination holds every unit.
    pub(super) async fn finish(
        self,
        repl: &mut Replicator,
        order: Option<&SendOrder>,
        status: &StatusCell,
    ) -> Result<PushReport, CutoverError> {
        set_status(status, |s| s.phase = "post-copy: pushing");
        let watch = watch_status(repl, status.clone());
        let pushed = push_until_complete(repl, order, &self.demands).await;
        watch.abort();
        let (destination, pushed_bytes) = match pushed {
            Ok(done) => done,
            Err(e) => {
                if let Err(stop) = self.demands.stop().await {
                    tracing::warn!(error = %stop, "post-copy demand server");
                }
                return Err(e);
            }
        };
        let counts = self.demands.counts();
        let report = PushReport {
            missing_bytes: self.missing_bytes,
            pushed_bytes,
            demand_ranges: counts.ranges.load(std::sync::atomic::Ordering::Relaxed),
            demand_bytes: counts.bytes.load(std::sync::atomic::Ordering::Relaxed),
            demand_reconnects: counts.reconnects.load(std::sync::atomic::Ordering::Relaxed),
            push_seconds: self.started.elapsed().as_secs_f64(),
            destination,
        };
        // Nothing is missing: its demand stream ends by itself.
        self.demands
            .join()
            .await
            .map_err(|e| CutoverError::PostCopy(Box::new(e)))?;
        set_status(status, |s| {
            s.phase = "post-copy: complete";
            s.missing_bytes = 0;
        });
        Ok(report)
    }
}

/// Pushes the dirty map (the units missing at the switch, less those
/// demanded since) and waits for the destination to hold everything; when
/// units stay missing with nothing on the way (a destination restarted
/// from a map saved before its last fills), pushes what its map still
/// lacks. Returns the destination's final figures and the bytes pushed.
async fn push_until_complete(
    repl: &mut Replicator,
    order: Option<&SendOrder>,
    demands: &DemandServer,
) -> Result<(crate::postcopy::PresenceSnapshot, u64), CutoverError> {
    let mut pushed = 0;
    let mut best = u64::MAX;
    let mut fruitless = 0;
    loop {
        if let Some(order) = order {
            repl.set_order(order.clone());
        }
        pushed += repl.round(false).await?.bytes;
        let mut last = u64::MAX;
        let mut since = Instant::now();
        loop {
            let info = repl.client().info().await?;
            if !info.postcopy.active {
                return Ok((info.postcopy, pushed));
            }
            let missing = info.postcopy.missing_bytes;
            if missing < last {
                last = missing;
                since = Instant::now();
            } else if since.elapsed() > SETTLE_FOR || demands.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Pushes that do not shrink what is missing end it: the destination
        // drops them, so something else is wrong.
        if last < best {
            best = last;
            fruitless = 0;
        } else {
            fruitless += 1;
            if fruitless >= 2 {
                return Err(CutoverError::PostCopyIncomplete {
                    missing_bytes: last,
                });
            }
        }
        let Some((unit, missing)) = repl.client().missing_map().await? else {
            continue;
        };
        if unit == repl.send_map().unit() {
            repl.send_map().mark_bytes(&missing);
            // A demand answered for them did not land (a lost stream): the
            // push must not skip them as answered.
            demands.served().clear_bytes(&missing);
        } else {
            // Another unit than ours (a post-copy taken up by another
            // source): push the whole disk.
            repl.send_map().mark_all();
            demands.served().clear_within(0, u64::MAX);
        }
        tracing::warn!(
            missing_bytes = last,
            "post-copy: units still missing after the push; pushing what the destination lacks"
        );
    }
}

/// Copies the destination's post-copy figures into the status while the
/// push runs.
fn watch_status(repl: &Replicator, status: StatusCell) -> tokio::task::JoinHandle<()> {
    let peer = repl.peer().clone();
    let send = Arc::clone(repl.send_map());
    tokio::spawn(async move {
        let Ok(mut client) = peer.connect().await else {
            return;
        };
        loop {
            if let Ok(info) = client.info().await {
                let p = info.postcopy;
                set_status(&status, |s| {
                    s.missing_bytes = p.missing_bytes;
                    s.demands = p.demands;
                    s.demand_wait_p50_us = p.wait_p50_us;
                    s.demand_wait_p99_us = p.wait_p99_us;
                    s.remaining_bytes = send.dirty_bytes();
                });
            }
            tokio::time::sleep(STATUS_EVERY).await;
        }
    })
}
