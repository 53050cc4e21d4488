//! The libvirt back end: libvirt's own migration of a domain's RAM and
//! device state (`virsh migrate --live --suspend`) to a destination defined
//! with its disks on Tern's NBD exports.
//!
//! libvirt 9.0 answers QEMU's `pre-switchover` itself within a millisecond,
//! so Tern cannot hold the VM there as it does with `qemu:`. `--suspend`
//! gives a hold one step later: the destination finishes the incoming
//! migration paused, its disks not yet activated, and libvirt then ends the
//! source QEMU. Tern's pause ends earlier, at the source's `pre-switchover`
//! (the VM stopped, its disks flushed), so that its final deltas run beside
//! libvirt's device state; its switch waits until the destination holds the
//! domain ([`Migration::held`]). The hand-over resumes the destination; a
//! resume before it migrates the paused domain back (a second RAM transfer,
//! as the source QEMU is gone) and resumes it there. Before the pause,
//! dropping it aborts the job (`domjobabort`), which leaves the source
//! running; if the job was past that point, the domain is brought back.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::{Hold, PauseError, Paused, Virsh, VirshError};

/// How long the event watchers get to register before the migration starts
/// (before the pause: no downtime).
const WATCHERS_READY: Duration = Duration::from_millis(300);
/// How long, after the source stopped, libvirt may take to hand the domain
/// to the destination (device state and Finish: milliseconds when well)
/// or to end `virsh migrate` (ending the source QEMU: seconds).
const AFTER_STOP_LIMIT: Duration = Duration::from_mins(2);

/// A libvirt domain and where libvirt migrates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtMigration {
    pub domain: String,
    /// The source's connection; `source_uri` is where a migration back goes
    /// (opened by virsh on this host, as the way there).
    pub source: Virsh,
    pub source_uri: String,
    pub destination: Virsh,
    pub destination_uri: String,
    /// The destination's definition (its disks on Tern's exports).
    pub destination_xml: PathBuf,
    /// The source's own definition (`dumpxml --migratable`), to come back to.
    pub source_xml: PathBuf,
    /// Define the domain on the destination after the hand-over (it was
    /// defined on the source).
    pub persistent: bool,
    /// More `virsh migrate` options (`--tls`, `--migrateuri=…`,
    /// `--bandwidth=…`); those naming an address are for the way there only
    /// ([`back_args`]).
    pub extra_args: Vec<String>,
}

/// libvirt's migration once the source has stopped: it goes on (device
/// state, the destination's Finish, the end of the source QEMU) while Tern
/// sends its final deltas; the switch waits for [`Migration::held`].
#[derive(Clone)]
pub(super) struct Migration {
    /// The destination holds the domain, paused (its Finish phase is done).
    held: watch::Receiver<bool>,
    /// `virsh migrate` returned: `Ok`, or its error.
    ended: watch::Receiver<Option<Result<(), VirshError>>>,
}

impl Migration {
    /// Whether the destination took the domain: true once it holds it (or
    /// `virsh migrate` succeeded), false if the migration failed first or
    /// did neither within [`AFTER_STOP_LIMIT`].
    pub(super) async fn held(&self) -> bool {
        let (mut held, mut ended) = (self.held.clone(), self.ended.clone());
        let deadline = tokio::time::Instant::now() + AFTER_STOP_LIMIT;
        let mut watching = true;
        loop {
            match &*ended.borrow_and_update() {
                Some(Ok(())) => return true,
                Some(Err(_)) => return false,
                None => {}
            }
            if watching && *held.borrow_and_update() {
                return true;
            }
            tokio::select! {
                // A lost watcher is no answer: the migration's end decides.
                r = held.changed(), if watching => watching = r.is_ok(),
                r = ended.changed() => if r.is_err() { return false },
                () = tokio::time::sleep_until(deadline) => {
                    tracing::error!(
                        limit = ?AFTER_STOP_LIMIT,
                        "libvirt did not hand the domain to the destination in time: not switching"
                    );
                    return false;
                }
            }
        }
    }

    /// Waits (at most [`AFTER_STOP_LIMIT`]) until `virsh migrate` returned;
    /// its error, if it failed or did not return.
    async fn end(&self) -> Option<VirshError> {
        let mut ended = self.ended.clone();
        match tokio::time::timeout(AFTER_STOP_LIMIT, ended.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => match outcome.as_ref() {
                Some(Err(e)) => Some(copy(e)),
                _ => None,
            },
            Ok(Err(_)) => None,
            Err(_) => Some(VirshError::TimedOut {
                command: "migrate".to_owned(),
                limit: AFTER_STOP_LIMIT,
            }),
        }
    }

    /// [`Migration::end`] for a destructor (which cannot await): whether
    /// it succeeded, `None` if it did not return in time.
    fn end_blocking(&self) -> Option<bool> {
        let deadline = Instant::now() + AFTER_STOP_LIMIT;
        loop {
            if let Some(outcome) = self.ended.borrow().as_ref() {
                return Some(outcome.is_ok());
            }
            if self.ended.has_changed().is_err() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A virsh error again (the watch keeps the original).
fn copy(e: &VirshError) -> VirshError {
    match e {
        VirshError::Spawn(io) => VirshError::Spawn(std::io::Error::new(io.kind(), io.to_string())),
        VirshError::Failed {
            command,
            status,
            stderr,
        } => VirshError::Failed {
            command: command.clone(),
            status: status.clone(),
            stderr: stderr.clone(),
        },
        VirshError::TimedOut { command, limit } => VirshError::TimedOut {
            command: command.clone(),
            limit: *limit,
        },
    }
}

/// Starts libvirt's migration and returns once the source QEMU has stopped
/// with its disks drained and flushed (its `pre-switchover`, which libvirt
/// continues from at once): Tern's final deltas go on from there, beside
/// the device state, and its switch waits for the destination to hold the
/// domain (libvirt's Finish phase done, so the source will not run again;
/// libvirt then ends it, which took 2.6 s here).
pub(super) async fn start(m: &LibvirtMigration) -> Result<Paused, PauseError> {
    let began = Instant::now();
    let state = m.source.state(&m.domain).await?;
    if state != "running" {
        return Err(PauseError::DomainState {
            domain: m.domain.clone(),
            state,
        });
    }
    // The source's QMP events (STOP dates the pause, `pre-switchover` ends
    // it), and the destination's lifecycle (when it holds the domain).
    let mut events = m
        .source
        .command(&[
            "qemu-monitor-event",
            "--domain",
            &m.domain,
            "--timestamp",
            "--loop",
        ])
        .spawn()
        .map_err(VirshError::Spawn)?;
    let lifecycle = m
        .destination
        .command(&["event", "--event", "lifecycle", "--timestamp", "--loop"])
        .spawn()
        .map_err(VirshError::Spawn)?;
    // Both must listen before the migration starts.
    tokio::time::sleep(WATCHERS_READY).await;
    let held = watch_held(lifecycle, &m.domain);
    let ended = spawn_migrate(m)?;
    let migration = Migration { held, ended };
    let abort = AbortOnDrop(Some((m, migration.clone())));
    let stopped = until_stopped(&mut events, &migration).await;
    drop(events);
    if stopped.is_none() {
        // No pre-switchover seen (the event stream ended): wait for the
        // migration itself.
        let _ = migration.ended.clone().wait_for(Option::is_some).await;
    }
    if let Some(e) = migration
        .ended
        .borrow()
        .as_ref()
        .and_then(|r| r.as_ref().err())
    {
        // Failed before the destination took the domain: the source runs.
        abort.disarm();
        return Err(copy(e).into());
    }
    abort.disarm();
    let mut paused = Paused::new(Hold::Libvirt {
        m: Box::new(m.clone()),
        migration,
    });
    if let Some(ago) = stopped.and_then(|at| SystemTime::now().duration_since(at).ok()) {
        paused.since = Instant::now().checked_sub(ago).unwrap_or(paused.since);
    } else {
        tracing::warn!(
            domain = m.domain,
            "no STOP event from the source: the pause is dated from Tern's noticing it (shorter than it was)"
        );
    }
    paused.ran_inside = paused.since.saturating_duration_since(began);
    Ok(paused)
}

/// Watches the destination's lifecycle events (the watcher's process is
/// kept by the task) for the domain held paused after its incoming
/// migration.
fn watch_held(mut lifecycle: tokio::process::Child, domain: &str) -> watch::Receiver<bool> {
    let (held_tx, held) = watch::channel(false);
    if let Some(stdout) = lifecycle.stdout.take() {
        let wanted = format!("for domain '{domain}': Suspended Paused");
        tokio::spawn(async move {
            let _lifecycle = lifecycle;
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(&wanted) {
                    let _ = held_tx.send(true);
                    return;
                }
            }
        });
    }
    held
}

/// Starts `virsh migrate --live --suspend` in a task that reports its end.
fn spawn_migrate(
    m: &LibvirtMigration,
) -> Result<watch::Receiver<Option<Result<(), VirshError>>>, VirshError> {
    let xml = m.destination_xml.display().to_string();
    let mut args = vec![
        "migrate",
        "--live",
        "--suspend",
        // The disks are Tern's to move: libvirt would refuse local files
        // that are not on shared storage.
        "--unsafe",
        "--xml",
        &xml,
    ];
    args.extend(m.extra_args.iter().map(String::as_str));
    args.extend([m.domain.as_str(), m.destination_uri.as_str()]);
    let child = m.source.command(&args).spawn().map_err(VirshError::Spawn)?;
    let (ended_tx, ended) = watch::channel(None);
    let (command, virsh) = (args.join(" "), m.source.clone());
    // The output is read to the end: virsh must never find its pipes
    // closed (it may still be ending the source after the pause).
    tokio::spawn(async move {
        let outcome = match child.wait_with_output().await {
            Ok(out) => virsh.checked(&[command.as_str()], &out).map(drop),
            Err(e) => Err(VirshError::Spawn(e)),
        };
        let _ = ended_tx.send(Some(outcome));
    });
    Ok(ended)
}

/// Reads the source's QMP events until its `pre-switchover` (the VM
/// stopped, its disks drained and flushed) or the migration's end; the
/// time of its STOP.
async fn until_stopped(
    events: &mut tokio::process::Child,
    migration: &Migration,
) -> Option<SystemTime> {
    let stdout = events.stdout.take()?;
    let mut lines = BufReader::new(stdout).lines();
    let mut stopped_at = None;
    let mut ended = migration.ended.clone();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if line.contains("event STOP ") {
                        stopped_at = event_time(&line);
                    } else if line.contains("event MIGRATION ")
                        && line.contains(r#""status":"pre-switchover""#)
                    {
                        return stopped_at;
                    }
                }
                // No events: the migration's end decides.
                _ => return None,
            },
            _ = ended.wait_for(Option::is_some) => return stopped_at,
        }
    }
}

/// The wall-clock time at the start of an event line.
fn event_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split(": ").next()?;
    // `%z`: ±HHMM after the milliseconds.
    let (local, zone) = stamp.split_at(stamp.len().checked_sub(5)?);
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let hours: u64 = zone.get(1..3)?.parse().ok()?;
    let minutes: u64 = zone.get(3..5)?.parse().ok()?;
    let at = humantime::parse_rfc3339_weak(local).ok()?;
    let offset = Duration::from_secs((hours * 60 + minutes) * 60);
    // Local = UTC + offset.
    if sign > 0 {
        at.checked_sub(offset)
    } else {
        at.checked_add(offset)
    }
}

/// Aborts libvirt's migration job if the pause is dropped before it
/// returned (a group gave up meanwhile): the source keeps running. A job
/// already past the point `domjobabort` can stop ends on the destination:
/// the domain is brought back ([`back_blocking`]).
struct AbortOnDrop<'a>(Option<(&'a LibvirtMigration, Migration)>);

impl AbortOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        let Some((m, migration)) = self.0.take() else {
            return;
        };
        if let Err(e) = m.source.run_blocking(&["domjobabort", &m.domain]) {
            tracing::warn!(error = %e, domain = m.domain, "cannot abort libvirt's migration; bringing the domain back once it ends");
        }
        if let Err(e) = back_blocking(m, &migration) {
            tracing::error!(error = %e, domain = m.domain, "the domain may be paused: check both hosts");
        }
    }
}

/// Resumes the destination: the VM runs there (the switch waited for it
/// to hold the domain). Then waits for `virsh migrate` to return (libvirt
/// ending the source) and defines the domain on the destination when it was
/// defined on the source. Should libvirt have resumed the source instead (a
/// Finish whose answer was lost makes its Confirm cancel), the source is
/// suspended at once: the disks are the destination's now.
pub(super) async fn hand_over(
    m: &LibvirtMigration,
    migration: &Migration,
) -> Result<(), PauseError> {
    let failed = migration
        .ended
        .borrow()
        .as_ref()
        .and_then(|r| r.as_ref().err())
        .map(copy);
    if let Some(e) = failed {
        return Err(e.into());
    }
    m.destination.run(&["resume", &m.domain]).await?;
    if let Some(e) = migration.end().await {
        if m.source
            .state(&m.domain)
            .await
            .is_ok_and(|s| s == "running")
        {
            tracing::error!(domain = m.domain, error = %e, "libvirt resumed the source after the destination took the domain: suspending the source");
            m.source.run(&["suspend", &m.domain]).await?;
            return Err(e.into());
        }
        // The domain runs on the destination only: what failed is
        // libvirt's clean-up of the source, to be looked at, not undone.
        tracing::warn!(domain = m.domain, error = %e, "virsh migrate failed after the destination took the domain; check the source host");
    }
    if m.persistent {
        // After the resume: a failure here leaves a running VM that is only
        // transient on the destination, which the operator can define.
        let xml = m
            .destination
            .run(&["dumpxml", "--migratable", &m.domain])
            .await?;
        let file = m.destination_xml.with_extension("defined.xml");
        std::fs::write(&file, xml).map_err(super::io_err("write", &file))?;
        m.destination
            .run(&["define", &file.display().to_string()])
            .await?;
    }
    Ok(())
}

/// Brings the domain back once `virsh migrate` has returned: nothing to do
/// if the source runs (the migration failed and libvirt resumed it); the
/// domain migrated back and resumed if the destination holds it; else the
/// source resumed (a migration that failed late leaves it paused).
pub(super) async fn back(
    m: &LibvirtMigration,
    migration: Option<&Migration>,
) -> Result<(), PauseError> {
    if let Some(migration) = migration
        && let Some(e) = migration.end().await
    {
        tracing::info!(domain = m.domain, error = %e, "libvirt's migration ended in error");
    }
    if m.source
        .state(&m.domain)
        .await
        .is_ok_and(|s| s == "running")
    {
        return Ok(());
    }
    if m.destination.state(&m.domain).await.is_ok() {
        let xml = m.source_xml.display().to_string();
        let args = back_args(m, &xml);
        let out = m
            .destination
            .command(&args)
            .output()
            .await
            .map_err(VirshError::Spawn)?;
        m.destination.checked(&args, &out)?;
    }
    m.source.run(&["resume", &m.domain]).await?;
    Ok(())
}

/// [`back`] for a destructor.
pub(super) fn back_blocking(m: &LibvirtMigration, migration: &Migration) -> Result<(), PauseError> {
    if migration.end_blocking().is_none() {
        tracing::warn!(
            domain = m.domain,
            "virsh migrate did not return in time; bringing the domain back as things stand"
        );
    }
    let state = |virsh: &Virsh| virsh.run_blocking(&["domstate", &m.domain]);
    if state(&m.source).is_ok_and(|s| s.trim() == "running") {
        return Ok(());
    }
    if state(&m.destination).is_ok() {
        let xml = m.source_xml.display().to_string();
        m.destination.run_blocking(&back_args(m, &xml))?;
    }
    m.source.run_blocking(&["resume", &m.domain])?;
    Ok(())
}

/// `virsh migrate` back to the source, with the options given for the way
/// there but those naming an address (theirs is the destination's).
fn back_args<'a>(m: &'a LibvirtMigration, xml: &'a str) -> Vec<&'a str> {
    const THERE_ONLY: [&str; 4] = [
        "--migrateuri",
        "--listen-address",
        "--disks-uri",
        "--graphicsuri",
    ];
    let mut args = vec!["migrate", "--live", "--suspend", "--unsafe", "--xml", xml];
    args.extend(
        m.extra_args
            .iter()
            .map(String::as_str)
            .filter(|a| !THERE_ONLY.iter().any(|o| a.starts_with(o))),
    );
    args.extend([m.domain.as_str(), m.source_uri.as_str()]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_is_dated_in_utc() {
        let utc = event_time("2026-12-07 18:20:00.250+0000: event STOP for domain 'web': <null>")
            .expect("dated");
        let expected = humantime::parse_rfc3339("2026-12-07T18:20:00.250Z").expect("valid");
        assert_eq!(utc, expected);
        let east = event_time("2026-12-07 19:20:00.250+0100: event STOP for domain 'web': <null>")
            .expect("dated");
        assert_eq!(east, expected);
        let west = event_time("2026-12-07 17:50:00.250-0030: event STOP for domain 'web': <null>")
            .expect("dated");
        assert_eq!(west, expected);
        assert_eq!(event_time("event STOP for domain 'web'"), None);
    }
}
