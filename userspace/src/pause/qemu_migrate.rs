//! The `qemu:SOCKET@URI` back end: QEMU's own live migration of RAM and
//! devices to `URI` with `pause-before-switchover`. The pause returns when
//! QEMU has precopied RAM and stopped the VM (`pre-switchover`); the hand-over
//! (`migrate-continue`) sends the device state after the disk has switched;
//! a resume cancels the migration.
//!
//! With `postcopy-ram` (`qemu-postcopy:`), the migration is switched to
//! post-copy as soon as it starts: QEMU makes one pass over RAM, stops the VM
//! at `pre-switchover`, and after the hand-over the VM runs on the
//! destination (`postcopy-active`) while its remaining pages are fetched on
//! demand and pushed; the destination QEMU must have the capability too.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::expect_status;
use super::{Hold, PauseError, Paused, Qmp};

/// Starts QEMU's migration of the running VM at `socket` to `uri` with
/// `pause-before-switchover` and waits until QEMU has precopied RAM and
/// stopped the VM (`pre-switchover`).
pub(super) async fn start(
    socket: &Path,
    uri: &str,
    postcopy_ram: bool,
) -> Result<Paused, PauseError> {
    let began = Instant::now();
    let mut qmp = Qmp::connect(socket).await?;
    expect_status(&mut qmp, socket, true).await?;
    let mut caps = vec![json!({ "capability": "pause-before-switchover", "state": true })];
    if postcopy_ram {
        caps.push(json!({ "capability": "postcopy-ram", "state": true }));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
    )
    .await?;
    // Guard first: once `migrate` is on the wire, any failure must cancel it.
    let mut paused = Paused::new(Hold::QemuMigrate {
        socket: socket.to_path_buf(),
        qmp,
        postcopy_ram,
    });
    let Some(Hold::QemuMigrate { qmp, .. }) = paused.hold.as_mut() else {
        unreachable!("just built as Hold::QemuMigrate");
    };
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    if postcopy_ram {
        // QEMU switches once its first pass over RAM is out.
        qmp.execute("migrate-start-postcopy", None).await?;
    }
    let info = wait(qmp, socket, &["pre-switchover"]).await?;
    if info["status"] != "pre-switchover" {
        return Err(ended(socket, &info));
    }
    // The pause starts when QEMU stopped the VM, not when precopy began.
    paused.since = Instant::now();
    paused.ran_inside = began.elapsed();
    Ok(paused)
}

/// `migrate-continue` from `pre-switchover`, then waits for `completed`
/// (or, in post-copy, `postcopy-active`: the VM runs on the destination).
pub(super) async fn continue_to_completion(
    qmp: &mut Qmp,
    socket: &Path,
    postcopy_ram: bool,
) -> Result<Value, PauseError> {
    qmp.execute(
        "migrate-continue",
        Some(json!({ "state": "pre-switchover" })),
    )
    .await?;
    let also: &[&str] = if postcopy_ram {
        &["postcopy-active"]
    } else {
        &[]
    };
    let info = wait(qmp, socket, also).await?;
    if !matches!(
        info["status"].as_str(),
        Some("completed" | "postcopy-active")
    ) {
        return Err(ended(socket, &info));
    }
    Ok(info)
}

/// Cancels QEMU's migration (which resumes the VM) and makes sure it runs.
pub(super) async fn cancel(qmp: &mut Qmp, socket: &Path) -> Result<(), PauseError> {
    qmp.execute("migrate_cancel", None).await?;
    qmp.execute("cont", None).await?;
    expect_status(qmp, socket, true).await
}

/// Polls `query-migrate` until it ends (`completed`, `failed`, `cancelled`)
/// or reaches one of `also`; reports precopy's progress now and then.
async fn wait(qmp: &mut Qmp, socket: &Path, also: &[&str]) -> Result<Value, PauseError> {
    let mut told = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        let status = info["status"].as_str().unwrap_or("");
        if ["completed", "failed", "cancelled"].contains(&status) || also.contains(&status) {
            return Ok(info);
        }
        if told.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                socket = %socket.display(),
                status,
                ram_remaining_mb = info["ram"]["remaining"].as_u64().unwrap_or(0) / 1_000_000,
                ram_transferred_mb = info["ram"]["transferred"].as_u64().unwrap_or(0) / 1_000_000,
                "QEMU migration in progress"
            );
            told = Instant::now();
        }
        // QMP answers in well under a millisecond; the VM stops at
        // `pre-switchover`, so noticing it late is downtime.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The error for a migration that ended in another state than awaited,
/// with QEMU's own reason from `query-migrate`.
fn ended(socket: &Path, info: &Value) -> PauseError {
    PauseError::QemuMigration {
        path: socket.to_path_buf(),
        status: info["status"].as_str().unwrap_or("unknown").to_owned(),
        desc: info["error-desc"].as_str().unwrap_or("").to_owned(),
    }
}
