//! The two agents, one per wing of a migration: the source agent
//! ([`source`]: traces and replicates its disk, a warm standby with a control
//! service, and the entry point of a migration) and the destination agent
//! ([`destination`]: receives extents, exports the disk over NBD).

pub mod destination;
pub mod source;

use tokio_util::sync::CancellationToken;

pub use destination::{
    AgentError, DEFAULT_EXPORT, Destination, DestinationConfig, run_destination, warm_cache,
};

/// Cancels `cancel` on SIGTERM or SIGINT (for `main`).
pub fn cancel_on_signals(cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => Some(term),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the agent");
                    None
                }
            };
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        tracing::info!("signal received: draining and stopping");
        cancel.cancel();
    })
}
