//! The `qmp:SOCKET` back end: QMP `stop` / `cont` on a running QEMU VM, each
//! checked with `query-status`.

use std::path::Path;

use serde_json::{Value, json};

use super::{Hold, PauseError, Paused, Qmp};

/// Stops the running VM behind `socket`. The connection stays open in the
/// returned [`Paused`] for the `cont`.
pub(super) async fn stop(socket: &Path) -> Result<Paused, PauseError> {
    let mut qmp = Qmp::connect(socket).await?;
    expect_status(&mut qmp, socket, true).await?;
    // Guard first: once `stop` is on the wire, any failure must `cont`.
    let mut paused = Paused::new(Hold::Qmp {
        socket: socket.to_path_buf(),
        qmp,
    });
    let Some(Hold::Qmp { qmp, .. }) = paused.hold.as_mut() else {
        unreachable!("just built as Hold::Qmp");
    };
    qmp.execute("stop", None).await?;
    expect_status(qmp, socket, false).await?;
    Ok(paused)
}

/// Resumes the VM (`cont`) and checks that it runs.
pub(super) async fn cont(qmp: &mut Qmp, socket: &Path) -> Result<(), PauseError> {
    qmp.execute("cont", None).await?;
    expect_status(qmp, socket, true).await
}

/// Checks with `query-status` that the VM runs (`running`) or is paused.
pub(super) async fn expect_status(
    qmp: &mut Qmp,
    socket: &Path,
    running: bool,
) -> Result<(), PauseError> {
    let status = qmp.execute("query-status", None).await?;
    if status["running"] == Value::Bool(running) {
        return Ok(());
    }
    Err(PauseError::VmState {
        path: socket.to_path_buf(),
        status: status["status"].as_str().unwrap_or("unknown").to_owned(),
        expected: if running { "running" } else { "paused" },
    })
}

/// Sets (or clears) QEMU's `x-ignore-shared` on the VM behind `socket`:
/// its migration then leaves shared RAM (a file Tern moves) out of its
/// stream. The destination QEMU needs it too (`-incoming defer`, the same
/// command before `migrate-incoming`).
pub async fn ignore_shared_ram(socket: &Path, on: bool) -> Result<(), PauseError> {
    let mut qmp = Qmp::connect(socket).await?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
    )
    .await?;
    Ok(())
}
