//! The libvirt back end: libvirt's own migration of a domain's RAM and
//! device state (`virsh migrate --live --suspend`) to a destination defined
//! with its disks on Tern's NBD exports.
//!
//! libvirt 9.0 answers QEMU's `pre-switchover` itself within a millisecond,
//! so Tern cannot hold the VM there as it does with `qemu:`. `--suspend`
//! gives the same hold one step later: the destination finishes the
//! incoming migration paused, its disks not yet activated, and the source
//! QEMU has stopped (libvirt ends it next). The pause is that moment; the
//! hand-over resumes the destination once the disks have switched; a resume
//! before that migrates the paused domain back (a second RAM transfer, as
//! the source QEMU is gone) and resumes it there. Before that moment,
//! dropping the pause aborts the job (`domjobabort`), which leaves the
//! source running.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use super::{Hold, PauseError, Paused, Virsh, VirshError};

/// How long after the destination holds the domain the source's STOP event
/// may take to arrive through libvirt's event stream.
const STOP_EVENT_WAIT: Duration = Duration::from_secs(2);
/// How long the event watchers get to register before the migration starts.
const WATCHERS_READY: Duration = Duration::from_millis(300);

/// A libvirt domain and where libvirt migrates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtMigration {
    pub domain: String,
    /// The source's connection; `source_uri` is its URI as the destination's
    /// side names it when migrating back.
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
    /// More `virsh migrate` options for the way there (`--tls`,
    /// `--migrateuri=…`, `--bandwidth=…`).
    pub extra_args: Vec<String>,
}

/// Starts libvirt's migration and waits until the destination has the
/// domain, paused: libvirt's Finish phase is done, so the source QEMU has
/// stopped with its disks flushed and will not run again (libvirt then ends
/// it, which took 2.6 s here: `virsh migrate` is left to return meanwhile).
pub(super) async fn start(m: &LibvirtMigration) -> Result<Paused, PauseError> {
    let began = Instant::now();
    let state = m.source.state(&m.domain).await?;
    if state != "running" {
        return Err(PauseError::VmState {
            path: PathBuf::from(&m.domain),
            status: state,
            expected: "running",
        });
    }
    // The source's STOP event dates the pause; the destination's lifecycle
    // events say when it holds the domain.
    let mut stops = m
        .source
        .command(&[
            "qemu-monitor-event",
            "--domain",
            &m.domain,
            "--event",
            "STOP",
            "--timestamp",
            "--loop",
        ])
        .spawn()
        .map_err(VirshError::Spawn)?;
    let mut lifecycle = m
        .destination
        .command(&["event", "--event", "lifecycle", "--timestamp", "--loop"])
        .spawn()
        .map_err(VirshError::Spawn)?;
    // Both must listen before the migration starts.
    tokio::time::sleep(WATCHERS_READY).await;
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
    let mut migrate = m.source.command(&args).spawn().map_err(VirshError::Spawn)?;
    // Drained from the start: virsh must never find its stderr closed (it
    // may still be ending the source after the pause returned).
    let stderr = migrate.stderr.take().map(|mut err| {
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut text).await;
            text
        })
    });
    let abort = AbortOnDrop(Some(m));
    let held = held_on_destination(lifecycle.stdout.take(), &m.domain);
    let migrate = tokio::select! {
        exit = migrate.wait() => {
            let status = exit.map_err(VirshError::Spawn)?;
            if !status.success() {
                let stderr = match stderr {
                    Some(task) => task.await.unwrap_or_default(),
                    None => String::new(),
                };
                abort.disarm();
                return Err(VirshError::Failed {
                    command: args.join(" "),
                    status: status.to_string(),
                    stderr: stderr.trim().to_owned(),
                }
                .into());
            }
            None
        }
        () = held => Some(migrate),
    };
    abort.disarm();
    let stopped_ago = match stops.stdout.take() {
        Some(stdout) => tokio::time::timeout(STOP_EVENT_WAIT, stop_age(stdout))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    drop((stops, lifecycle));
    let mut paused = Paused::new(Hold::Libvirt {
        m: Box::new(m.clone()),
        migrate,
    });
    if let Some(ago) = stopped_ago {
        paused.since = Instant::now().checked_sub(ago).unwrap_or(paused.since);
    } else {
        tracing::warn!(
            domain = m.domain,
            "no STOP event from the source: the pause is dated from the destination's (shorter than it was)"
        );
    }
    paused.ran_inside = paused.since.saturating_duration_since(began);
    Ok(paused)
}

/// Returns once the destination reports the domain suspended at the end of
/// an incoming migration (`Suspended Paused`); never, if it does not (the
/// migration's own end decides then).
async fn held_on_destination(stdout: Option<tokio::process::ChildStdout>, domain: &str) {
    let Some(stdout) = stdout else {
        return std::future::pending().await;
    };
    let wanted = format!("for domain '{domain}': Suspended Paused");
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(&wanted) {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// How long ago the source stopped, from the first STOP line of
/// `virsh qemu-monitor-event --timestamp`
/// (`2026-12-07 18:20:00.123+0000: event STOP for domain 'web': <null>`).
async fn stop_age(stdout: tokio::process::ChildStdout) -> Option<Duration> {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if !line.contains("event STOP") {
            continue;
        }
        let at = event_time(&line)?;
        return Some(SystemTime::now().duration_since(at).unwrap_or_default());
    }
    None
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

/// Aborts libvirt's migration job if the pause is dropped before `virsh
/// migrate` returned: the source keeps running.
struct AbortOnDrop<'a>(Option<&'a LibvirtMigration>);

impl AbortOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0
            && let Err(e) = m.source.run_blocking(&["domjobabort", &m.domain])
        {
            tracing::error!(error = %e, domain = m.domain, "cannot abort libvirt's migration");
        }
    }
}

/// Resumes the destination: the VM runs there. Then waits for `virsh
/// migrate` to return (libvirt ending the source) and defines the domain on
/// the destination when it was defined on the source.
pub(super) async fn hand_over(
    m: &LibvirtMigration,
    migrate: Option<&mut Child>,
) -> Result<(), PauseError> {
    m.destination.run(&["resume", &m.domain]).await?;
    if let Some(child) = migrate {
        match child.wait().await {
            Ok(status) if status.success() => {}
            // The domain runs on the destination: what failed after is
            // libvirt's cleanup of the source, to be looked at, not undone.
            other => tracing::warn!(
                domain = m.domain,
                status = ?other,
                "virsh migrate failed after the destination took the domain; check the source host"
            ),
        }
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

/// Brings the domain back: once `virsh migrate` has returned, migrates the
/// paused domain back and resumes it on the source (unless libvirt kept it
/// there, running).
pub(super) async fn back(
    m: &LibvirtMigration,
    migrate: Option<&mut Child>,
) -> Result<(), PauseError> {
    if let Some(child) = migrate {
        let _ = child.wait().await;
    }
    if m.source
        .state(&m.domain)
        .await
        .is_ok_and(|s| s == "running")
    {
        return Ok(());
    }
    let xml = m.source_xml.display().to_string();
    let args = back_args(m, &xml);
    let out = m
        .destination
        .command(&args)
        .output()
        .await
        .map_err(VirshError::Spawn)?;
    m.destination.checked(&args, &out)?;
    m.source.run(&["resume", &m.domain]).await?;
    Ok(())
}

/// [`back`] for a destructor.
pub(super) fn back_blocking(
    m: &LibvirtMigration,
    migrate: Option<Child>,
) -> Result<(), PauseError> {
    if let Some(mut child) = migrate {
        // A destructor cannot await: poll the child until it returns.
        while matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if m.source
        .run_blocking(&["domstate", &m.domain])
        .is_ok_and(|s| s.trim() == "running")
    {
        return Ok(());
    }
    let xml = m.source_xml.display().to_string();
    m.destination.run_blocking(&back_args(m, &xml))?;
    m.source.run_blocking(&["resume", &m.domain])?;
    Ok(())
}

fn back_args<'a>(m: &'a LibvirtMigration, xml: &'a str) -> [&'a str; 8] {
    [
        "migrate",
        "--live",
        "--suspend",
        "--unsafe",
        "--xml",
        xml,
        &m.domain,
        &m.source_uri,
    ]
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
