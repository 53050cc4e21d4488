//! Prometheus text endpoint (`GET /metrics`) of the destination agent:
//! replication ingest counters, a write-latency histogram and the NBD
//! server's request counters.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}; pick a free port or drop --metrics")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("the metrics endpoint stopped: {0}")]
    Serve(#[source] std::io::Error),
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency buckets.
const LATENCY_BOUNDS: [f64; 14] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    1.0,
];

/// A latency histogram with fixed buckets (Prometheus `histogram`).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match LATENCY_BOUNDS.get(i) {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Counters of the replica service, updated per extent (atomics, no logging).
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    /// Payload bytes received (compressed size as sent).
    pub bytes_received: Counter,
    /// Uncompressed bytes applied to the image (zero extents included).
    pub bytes_written: Counter,
    pub extents_written: Counter,
    pub zero_extents: Counter,
    pub rejected_extents: Counter,
    pub rejected_streams: Counter,
    /// Barriers completed (each one an fdatasync).
    pub barriers: Counter,
    /// Uncompressed bytes answered to `Read` calls.
    pub bytes_read: Counter,
    /// Image write time of data extents.
    pub write_latency: Histogram,
    /// Receive-to-written time of an extent (decode, verify, write).
    pub extent_latency: Histogram,
}

impl ReplicaMetrics {
    /// Appends the Prometheus text form.
    pub fn render(&self, out: &mut String) {
        let counters = [
            (
                "tern_replica_received_bytes_total",
                "Extent payload bytes received (as sent, compressed).",
                &self.bytes_received,
            ),
            (
                "tern_replica_written_bytes_total",
                "Uncompressed bytes applied to the image.",
                &self.bytes_written,
            ),
            (
                "tern_replica_extents_written_total",
                "Extents applied to the image.",
                &self.extents_written,
            ),
            (
                "tern_replica_zero_extents_total",
                "Zero-marked extents applied.",
                &self.zero_extents,
            ),
            (
                "tern_replica_rejected_extents_total",
                "Extents refused (bounds, checksum, encoding) or failed.",
                &self.rejected_extents,
            ),
            (
                "tern_replica_rejected_streams_total",
                "Write streams ended with an error (fenced, invalid data, shutdown).",
                &self.rejected_streams,
            ),
            (
                "tern_replica_barriers_total",
                "Barriers completed (each one an fdatasync).",
                &self.barriers,
            ),
            (
                "tern_replica_read_bytes_total",
                "Uncompressed bytes answered to Read calls.",
                &self.bytes_read,
            ),
        ];
        for (name, help, counter) in counters {
            render_counter(out, name, help, counter.get());
        }
        self.write_latency.render(
            out,
            "tern_replica_write_seconds",
            "Time to write one data extent into the image.",
        );
        self.extent_latency.render(
            out,
            "tern_replica_extent_seconds",
            "Time from receiving an extent to having it written (decode, verify, write).",
        );
    }
}

fn render_counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {value}");
}

/// Anything that can append its metrics in Prometheus text form.
pub trait Render: Send + Sync + 'static {
    fn render(&self, out: &mut String);
}

impl Render for ReplicaMetrics {
    fn render(&self, out: &mut String) {
        ReplicaMetrics::render(self, out);
    }
}

/// The replica's fencing and failover state, as gauges: its epoch, whether
/// it was promoted, and what its standby source last said.
impl Render for crate::rpc::ReplicaService {
    fn render(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        #[expect(
            clippy::cast_precision_loss,
            reason = "an epoch is a small counter; a gauge is a float"
        )]
        let epoch = self.epoch() as f64;
        gauge(out, "tern_replica_epoch", "Highest epoch accepted.", epoch);
        gauge(
            out,
            "tern_replica_promoted",
            "1 once the replica was promoted to primary (failover), until it is demoted.",
            f64::from(u8::from(self.promotion().is_some())),
        );
        if let Some(ago) = self.liveness().heard_ago() {
            gauge(
                out,
                "tern_replica_source_heard_seconds_ago",
                "Time since the standby source's last heartbeat.",
                ago.as_secs_f64(),
            );
            #[expect(
                clippy::cast_precision_loss,
                reason = "bytes as a gauge: a float, exact below 2^53"
            )]
            let backlog = self.liveness().last_heard().backlog_bytes as f64;
            gauge(
                out,
                "tern_replica_source_backlog_bytes",
                "Bytes the standby source had not sent yet, at its last heartbeat.",
                backlog,
            );
        }
    }
}

impl Render for crate::nbd::NbdServer {
    fn render(&self, out: &mut String) {
        let s = self.stats().snapshot();
        let name = "tern_nbd_requests_total";
        let _ = writeln!(out, "# HELP {name} NBD requests served, by type.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (kind, value) in [
            ("read", s.reads),
            ("write", s.writes),
            ("flush", s.flushes),
            ("trim", s.trims),
            ("write_zeroes", s.write_zeroes),
            ("block_status", s.block_status),
            ("disconnect", s.disconnects),
        ] {
            let _ = writeln!(out, "{name}{{type=\"{kind}\"}} {value}");
        }
        render_counter(
            out,
            "tern_nbd_request_errors_total",
            "NBD requests answered with an error.",
            s.errors,
        );
        render_counter(
            out,
            "tern_nbd_read_bytes_total",
            "Bytes read by NBD clients.",
            s.bytes_read,
        );
        render_counter(
            out,
            "tern_nbd_written_bytes_total",
            "Bytes written by NBD clients.",
            s.bytes_written,
        );
        render_counter(
            out,
            "tern_nbd_connections_total",
            "NBD connections accepted.",
            s.connections_accepted,
        );
        render_counter(
            out,
            "tern_nbd_connections_refused_total",
            "NBD connections closed at once: over the connection or handshake limit.",
            s.connections_refused,
        );
        render_counter(
            out,
            "tern_nbd_handshake_failures_total",
            "NBD connections dropped during the handshake (a timeout among them).",
            s.handshake_failures,
        );
        let _ = writeln!(
            out,
            "# HELP tern_nbd_connections_active NBD connections open now."
        );
        let _ = writeln!(out, "# TYPE tern_nbd_connections_active gauge");
        let _ = writeln!(out, "tern_nbd_connections_active {}", s.connections_active);
    }
}

/// The sources one endpoint exposes.
#[derive(Clone, Default)]
pub struct Sources(Vec<Arc<dyn Render>>);

impl Sources {
    #[must_use]
    pub fn with(mut self, source: Arc<dyn Render>) -> Sources {
        self.0.push(source);
        self
    }

    /// The whole page.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for source in &self.0 {
            source.render(&mut out);
        }
        out
    }
}

/// Binds the metrics listener (before serving, so a bad address fails early).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    sources: Sources,
    cancel: CancellationToken,
) -> Result<(), MetricsError> {
    let app = Router::new()
        .route("/metrics", get(page))
        .with_state(sources);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(MetricsError::Serve)
}

async fn page(State(sources): State<Sources>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sources.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.000025\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[tokio::test]
    async fn endpoint_serves_the_counters() {
        let metrics = Arc::new(ReplicaMetrics::default());
        metrics.extents_written.add(7);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Sources::default().with(metrics),
            cancel.clone(),
        ));
        let body = http_get(addr, "/metrics").await;
        assert!(
            body.contains("tern_replica_extents_written_total 7"),
            "{body}"
        );
        cancel.cancel();
        server.await.expect("join").expect("serve");
    }

    /// A minimal HTTP/1.0 GET over a raw socket (no HTTP client in the deps).
    pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("read");
        body
    }
}
