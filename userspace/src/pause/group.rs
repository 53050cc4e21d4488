//! One pause for several migrations: the disks (and RAM file) of one VM,
//! each replicated by its own migration in one process, stop together,
//! switch together or not at all, and are handed over once.
//!
//! A [`PauseGroup`] wraps the VM's real pause target. Each member's
//! migration pauses through [`PauseTarget::Group`]: the last to arrive
//! pauses the workload once, and every member gets a [`Paused`] sharing that
//! one hold (the ones waiting keep sending rounds meanwhile, as the
//! workload still runs). From then on the members decide together at each
//! step ([`Step`]): a switch happens only if every member's final delta
//! verified, the destination is kept only if every member is healthy. A
//! member that fails, or a call to [`PauseGroup::abort`], makes every
//! pending and later decision "no", and the first resume resumes the
//! workload once.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Hold, PauseError, PauseTarget, Paused};

/// Why a group gave up (the first reason is kept).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupAbort {
    /// A part's migration failed.
    #[error("part {part} failed: {source}")]
    PartFailed {
        part: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// Pausing the workload failed.
    #[error("pausing the workload failed: {0}")]
    Pause(#[source] Arc<PauseError>),
    /// A part could not go on at a decision (its final delta or health check).
    #[error("a part could not go on at {0:?}")]
    SaidNo(Step),
    /// A part's migration ended without pausing (nothing left to send).
    #[error("part {0} ended before the pause")]
    EndedEarly(String),
    /// A part was cancelled while it waited for the pause.
    #[error("a part stopped before the pause")]
    Left,
    /// A part resumed the workload.
    #[error("the workload was resumed")]
    Resumed,
    /// A part dropped its pause without a resume or a hand-over.
    #[error("a part abandoned its pause")]
    Abandoned,
}

/// A decision the members of a group take together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Every final delta sent and verified: switch every disk.
    Switch,
    /// Every switched disk healthy: keep the destination and hand over.
    Healthy,
}

/// The shared pause of `members` migrations.
pub struct PauseGroup {
    target: PauseTarget,
    members: usize,
    /// QEMU's QMP socket, when QEMU must leave shared RAM out of its stream
    /// (`x-ignore-shared`): set just before the pause, cleared on a resume.
    skip_shared_ram: Option<std::path::PathBuf>,
    state: Mutex<State>,
    changed: Notify,
}

struct Vote {
    step: Step,
    count: usize,
    all: bool,
    decided: Option<bool>,
}

#[derive(Default)]
struct State {
    /// Members that called pause.
    arrived: usize,
    /// The workload's one hold, once paused (taken by the resume or the
    /// hand-over that ends it).
    hold: Option<Paused>,
    /// When the workload stopped, and how long it ran inside the pause call.
    paused_at: Option<(Instant, Duration)>,
    /// Why the group gave up; every decision not yet taken is "no".
    aborted: Option<GroupAbort>,
    /// Per step: votes so far, all yes so far, and the decision once taken
    /// (latched: a later abort does not change it).
    votes: Vec<Vote>,
    /// Every member agreed to switch: from then on the workload resumes
    /// only when every member asked (each rolls its own disk back first).
    switched: bool,
    resumes: usize,
    handovers: usize,
    /// The hand-over's outcome once made (its error shared with the others).
    handed_over: Option<Result<(), Arc<PauseError>>>,
}

impl std::fmt::Debug for PauseGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGroup")
            .field("target", &self.target)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// Identity: a group is equal only to itself.
impl PartialEq for PauseGroup {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for PauseGroup {}

impl PauseGroup {
    /// A group of `members` migrations pausing `target` once.
    pub fn new(target: PauseTarget, members: usize) -> Arc<PauseGroup> {
        PauseGroup::with(target, members, None)
    }

    /// The same, with QEMU (at QMP `socket`) told to leave shared RAM out of
    /// its migration (`x-ignore-shared`) for as short as it can: from just
    /// before the pause until the hand-over, cleared again on a resume.
    pub fn skipping_shared_ram(
        target: PauseTarget,
        members: usize,
        socket: std::path::PathBuf,
    ) -> Arc<PauseGroup> {
        PauseGroup::with(target, members, Some(socket))
    }

    fn with(
        target: PauseTarget,
        members: usize,
        skip_shared_ram: Option<std::path::PathBuf>,
    ) -> Arc<PauseGroup> {
        Arc::new(PauseGroup {
            target,
            members: members.max(1),
            skip_shared_ram,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        })
    }

    /// Sets or clears QEMU's `x-ignore-shared` when this group moves RAM.
    async fn ignore_shared(&self, on: bool) -> Result<(), PauseError> {
        let Some(socket) = &self.skip_shared_ram else {
            return Ok(());
        };
        super::qmp::ignore_shared_ram(socket, on).await
    }

    /// A member's migration ended (either way): if it never paused, the
    /// others must not wait for it.
    pub fn member_done(&self, name: &str) {
        let paused = self.lock().paused_at.is_some();
        if !paused {
            self.abort(GroupAbort::EndedEarly(name.to_owned()));
        }
    }

    /// The real target.
    pub fn target(&self) -> &PauseTarget {
        &self.target
    }

    /// How many members the group waits for.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Gives up: a member failed or was cancelled. Members waiting to pause
    /// get an error (the workload runs on), pending and later decisions
    /// are "no". Does not resume by itself: a member's resume (or the last
    /// hold's drop) does.
    pub fn abort(&self, why: GroupAbort) {
        let mut s = self.lock();
        if s.aborted.is_none() {
            tracing::warn!(why = %why, "the migration group gives up");
            s.aborted = Some(why);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Why the group gave up, if it did.
    pub fn why(&self) -> Option<GroupAbort> {
        self.lock().aborted.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `ready` says the state is final (`Some`), re-checking on
    /// every change.
    async fn wait_for<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = ready(&mut self.lock()) {
                return v;
            }
            notified.await;
        }
    }

    /// A member's pause: the last to arrive pauses the workload.
    pub(super) async fn pause(self: &Arc<Self>) -> Result<Paused, PauseError> {
        let called = Instant::now();
        // Leaving while waiting (the member's task dropped) aborts the group:
        // the others must not wait for it forever.
        let mut guard = LeaveOnDrop(Some(Arc::clone(self)));
        let last = {
            let mut s = self.lock();
            if let Some(why) = &s.aborted {
                return Err(PauseError::GroupAborted(why.clone()));
            }
            s.arrived += 1;
            s.arrived == self.members
        };
        if last {
            let aborted = self.wait_for(|s| s.aborted.clone());
            let pausing = async {
                self.ignore_shared(true).await?;
                Box::pin(self.target.pause()).await
            };
            // A member failing meanwhile ends the pause in progress: dropping
            // it cancels QEMU's migration and resumes the workload.
            let paused = tokio::select! {
                paused = pausing => paused,
                why = aborted => Err(PauseError::GroupAborted(why)),
            };
            if paused.is_err()
                && let Err(e) = self.ignore_shared(false).await
            {
                tracing::warn!(error = %e, "cannot clear x-ignore-shared after a failed pause");
            }
            match paused {
                Ok(hold) => {
                    let mut s = self.lock();
                    let ran = hold.ran_inside();
                    s.paused_at = Some((hold.since, ran));
                    s.hold = Some(hold);
                    drop(s);
                    self.changed.notify_waiters();
                }
                Err(e) => {
                    let e = Arc::new(e);
                    self.abort(GroupAbort::Pause(Arc::clone(&e)));
                    guard.0 = None;
                    return Err(PauseError::GroupAborted(GroupAbort::Pause(e)));
                }
            }
        }
        let outcome = self
            .wait_for(|s| {
                // Paused first: a member that already said no after the
                // pause must not keep another from its share of the hold.
                if let Some(at) = s.paused_at {
                    return Some(Ok(at));
                }
                s.aborted.as_ref().map(|why| Err(why.clone()))
            })
            .await;
        guard.0 = None;
        let (since, ran_inside_target) = outcome.map_err(PauseError::GroupAborted)?;
        // This member "ran inside" its pause call from its call until the
        // workload stopped: the others' convergence, then the target's own.
        let ran_inside = since
            .saturating_duration_since(called)
            .max(ran_inside_target);
        Ok(Paused {
            since,
            ran_inside,
            hold: Some(Hold::Group(Arc::clone(self))),
        })
    }

    /// The hold's libvirt migration, to wait for before a switch (see
    /// [`Paused::agree`]); `None` for other holds or none yet.
    pub(super) fn held_migration(&self) -> Option<impl std::future::Future<Output = bool> + use<>> {
        self.lock().hold.as_ref().and_then(Paused::held_migration)
    }

    /// A member's say in `step`; resolves once every member said (all
    /// "yes": true) or the group gave up (false).
    pub(super) async fn agree(&self, step: Step, ok: bool) -> bool {
        {
            let mut s = self.lock();
            if !ok {
                s.aborted.get_or_insert(GroupAbort::SaidNo(step));
            }
            let aborted = s.aborted.is_some();
            let at = if let Some(at) = s.votes.iter().position(|v| v.step == step) {
                at
            } else {
                s.votes.push(Vote {
                    step,
                    count: 0,
                    all: true,
                    decided: None,
                });
                s.votes.len() - 1
            };
            let vote = &mut s.votes[at];
            vote.count += 1;
            vote.all &= ok;
            if vote.decided.is_none() && (aborted || vote.count >= self.members) {
                // Taken once, under the lock, for every member alike.
                vote.decided = Some(vote.all && !aborted);
            }
            if step == Step::Switch && vote.decided == Some(true) {
                s.switched = true;
            }
        }
        self.changed.notify_waiters();
        self.wait_for(|s| {
            let aborted = s.aborted.is_some();
            let vote = s.votes.iter_mut().find(|v| v.step == step)?;
            if vote.decided.is_none() && aborted {
                vote.decided = Some(false);
            }
            vote.decided
        })
        .await
    }

    /// A member's resume. Before the switch, the first resumes the
    /// workload (nothing switched); after it, the last does, once every
    /// member has rolled its disk back: the workload must not write to a
    /// source another member is still restoring.
    pub(super) async fn resume(&self) -> Result<(), PauseError> {
        let hold = self.take_for_resume(GroupAbort::Resumed);
        self.changed.notify_waiters();
        let Some(hold) = hold else {
            return Ok(());
        };
        let resumed = Box::pin(hold.resume()).await;
        if let Err(e) = self.ignore_shared(false).await {
            tracing::warn!(error = %e, "cannot clear x-ignore-shared after resuming the VM");
        }
        resumed
    }

    /// Counts a resume; the hold when this one is the one to resume.
    fn take_for_resume(&self, why: GroupAbort) -> Option<Paused> {
        let mut s = self.lock();
        s.aborted.get_or_insert(why);
        s.resumes += 1;
        if s.switched && s.resumes < self.members {
            return None;
        }
        s.hold.take()
    }

    /// A member's hand-over: the last to arrive hands the workload over
    /// once; every member gets its outcome.
    pub(super) async fn hand_over(&self) -> Result<(), PauseError> {
        let hold = {
            let mut s = self.lock();
            if let Some(why) = &s.aborted {
                return Err(PauseError::GroupAborted(why.clone()));
            }
            s.handovers += 1;
            if s.handovers == self.members {
                s.hold.take()
            } else {
                None
            }
        };
        if let Some(hold) = hold {
            let result = Box::pin(hold.hand_over()).await;
            if result.is_ok()
                && let Err(e) = self.ignore_shared(false).await
            {
                // The source QEMU stays behind (postmigrate); a later resume of
                // it there must migrate its RAM again.
                tracing::warn!(error = %e, "cannot clear x-ignore-shared on the source after the hand-over");
            }
            let result = result.map_err(Arc::new);
            self.lock().handed_over = Some(result.clone());
            self.changed.notify_waiters();
            return result.map_err(PauseError::GroupHandOver);
        }
        self.wait_for(|s| {
            if let Some(done) = &s.handed_over {
                return Some(done.clone().map_err(PauseError::GroupHandOver));
            }
            s.aborted
                .as_ref()
                .map(|why| Err(PauseError::GroupAborted(why.clone())))
        })
        .await
    }

    /// A member's hold dropped without a resume or hand-over: counted as a
    /// resume (synchronous, through the hold's own drop), and the group
    /// gives up.
    pub(super) fn abandon(&self) {
        let hold = self.take_for_resume(GroupAbort::Abandoned);
        self.changed.notify_waiters();
        drop(hold);
    }
}

/// Aborts the group if a member stops waiting before the pause.
struct LeaveOnDrop(Option<Arc<PauseGroup>>);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            group.abort(GroupAbort::Left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `cmd:` target whose pauses and resumes append to a file.
    fn counted(dir: &std::path::Path) -> (PauseTarget, std::path::PathBuf) {
        let log = dir.join("log");
        let target = PauseTarget::Command {
            pause: format!("echo pause >> {}", log.display()),
            resume: format!("echo resume >> {}", log.display()),
        };
        (target, log)
    }

    fn lines(log: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn three_members_pause_once_agree_and_hand_over_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 3);
        let member = |g: Arc<PauseGroup>| {
            tokio::spawn(async move {
                let paused = PauseTarget::Group(g).pause().await.expect("paused");
                assert!(paused.agree(Step::Switch, true).await);
                assert!(paused.agree(Step::Healthy, true).await);
                paused.hand_over().await.expect("handed over");
            })
        };
        let a = member(Arc::clone(&group));
        let b = member(Arc::clone(&group));
        // Two wait: nothing paused yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(lines(&log).is_empty());
        let c = member(Arc::clone(&group));
        for t in [a, b, c] {
            t.await.expect("member");
        }
        // One pause, no resume: a `cmd:` hand-over keeps it paused.
        assert_eq!(lines(&log), ["pause"]);
    }

    #[tokio::test]
    async fn one_no_makes_every_member_resume_the_workload_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 2);
        let member = |g: Arc<PauseGroup>, ok: bool| {
            tokio::spawn(async move {
                let paused = PauseTarget::Group(g).pause().await.expect("paused");
                let all = paused.agree(Step::Switch, ok).await;
                paused.resume().await.expect("resumed");
                all
            })
        };
        let yes = member(Arc::clone(&group), true);
        let no = member(Arc::clone(&group), false);
        assert!(!yes.await.expect("member"), "one member's no is everyone's");
        assert!(!no.await.expect("member"));
        assert_eq!(lines(&log), ["pause", "resume"]);
    }

    #[tokio::test]
    async fn after_the_switch_the_workload_resumes_once_every_member_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 2);
        let member = |g: Arc<PauseGroup>| {
            tokio::spawn(async move {
                let paused = PauseTarget::Group(g).pause().await.expect("paused");
                assert!(paused.agree(Step::Switch, true).await);
                paused
            })
        };
        let (a, b) = (member(Arc::clone(&group)), member(Arc::clone(&group)));
        let (a, b) = (a.await.expect("a"), b.await.expect("b"));
        // One member's health check failed: it rolled back and resumes.
        assert!(!a.agree(Step::Healthy, false).await);
        a.resume().await.expect("a resumes");
        assert_eq!(lines(&log), ["pause"], "the other is still rolling back");
        assert!(!b.agree(Step::Healthy, true).await);
        b.resume().await.expect("b resumes");
        assert_eq!(lines(&log), ["pause", "resume"]);
    }

    #[tokio::test]
    async fn a_member_ending_without_a_pause_releases_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 2);
        let waiting = {
            let g = Arc::clone(&group);
            tokio::spawn(async move { PauseTarget::Group(g).pause().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The other part finished a leftover post-copy and never paused.
        group.member_done("vd1");
        let err = waiting.await.expect("member").expect_err("released");
        assert!(err.to_string().contains("vd1"), "{err}");
        assert!(lines(&log).is_empty());
    }

    #[tokio::test]
    async fn a_member_failing_before_the_pause_releases_the_others_unpaused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 2);
        let waiting = {
            let g = Arc::clone(&group);
            tokio::spawn(async move { PauseTarget::Group(g).pause().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The other member's migration failed: its orchestrator gives up.
        group.abort(GroupAbort::PartFailed {
            part: "vd1".into(),
            source: Arc::new(std::io::Error::other("the second disk did not converge")),
        });
        let err = waiting
            .await
            .expect("member")
            .expect_err("no pause without every member");
        assert!(err.to_string().contains("did not converge"), "{err}");
        assert!(lines(&log).is_empty(), "the workload was never paused");
    }

    #[tokio::test]
    async fn a_waiting_member_cancelled_aborts_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 2);
        let task = {
            let g = Arc::clone(&group);
            tokio::spawn(async move { PauseTarget::Group(g).pause().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        let _ = task.await;
        let err = PauseTarget::Group(Arc::clone(&group))
            .pause()
            .await
            .expect_err("the group gave up");
        assert!(matches!(err, PauseError::GroupAborted(_)), "{err}");
        assert!(lines(&log).is_empty());
    }

    #[tokio::test]
    async fn a_dropped_member_hold_resumes_the_workload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (target, log) = counted(dir.path());
        let group = PauseGroup::new(target, 1);
        let paused = PauseTarget::Group(Arc::clone(&group))
            .pause()
            .await
            .expect("paused");
        drop(paused);
        assert_eq!(lines(&log), ["pause", "resume"]);
    }
}
