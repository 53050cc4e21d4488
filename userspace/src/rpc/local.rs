//! gRPC inside one process: a service served over in-memory pipes and a
//! channel to it. A staged migration needs it twice (its relay on the
//! source, its applier feeding the destination's own replica service), and
//! neither should open a port another local process could write through.

use std::convert::Infallible;

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};

use super::client::{CONNECTION_WINDOW, STREAM_WINDOW};

/// Bytes one pipe buffers each way: a few of the largest messages.
const PIPE_BYTES: usize = 4 << 20;

/// Serves `routes` until `shutdown` and returns a channel to them. Every
/// connection the channel makes (its first, and each after one is lost) is
/// a new pipe handed to the server.
pub fn serve_in_process(routes: Routes, shutdown: CancellationToken) -> Channel {
    let (tx, rx) = mpsc::unbounded_channel::<Result<DuplexStream, Infallible>>();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnboundedReceiverStream::new(rx), shutdown.cancelled())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "an in-process gRPC server stopped");
        }
    });
    Endpoint::from_static("http://in-process.tern")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(PIPE_BYTES);
                tx.send(Ok(server)).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the in-process server has stopped",
                    )
                })?;
                Ok::<_, std::io::Error>(TokioIo::new(client))
            }
        }))
}
