//! gRPC replica service (`tern.v1.Replica`): the destination side of disk
//! replication, served over mutual TLS, and the typed client the source uses.
//!
//! Wire protocol: `docs/replication-protocol.md`. Generated code stays private;
//! the message types a caller needs are re-exported below.

use std::path::PathBuf;

use crate::checktree::CheckTreeError;
use crate::image::ImageError;

/// Generated code, private: the rest of the crate uses the re-exports below.
pub(crate) mod pb {
    #![allow(clippy::pedantic, clippy::nursery, missing_docs)]
    tonic::include_proto!("tern.v1");
}

/// The post-copy figures on the wire (`PostCopyState`, without the map)
/// and back: the one place both sides convert them.
impl From<crate::postcopy::PresenceSnapshot> for pb::PostCopyState {
    fn from(s: crate::postcopy::PresenceSnapshot) -> Self {
        pb::PostCopyState {
            active: s.active,
            unit: s.unit,
            missing_bytes: s.missing_bytes,
            filled_bytes: s.filled_bytes,
            local_bytes: s.local_bytes,
            demands: s.demands,
            waits: s.waits,
            wait_p50_us: s.wait_p50_us,
            wait_p99_us: s.wait_p99_us,
            wait_max_us: s.wait_max_us,
            missing: bytes::Bytes::new(),
        }
    }
}

impl From<&pb::PostCopyState> for crate::postcopy::PresenceSnapshot {
    fn from(s: &pb::PostCopyState) -> Self {
        crate::postcopy::PresenceSnapshot {
            active: s.active,
            unit: s.unit,
            missing_bytes: s.missing_bytes,
            filled_bytes: s.filled_bytes,
            local_bytes: s.local_bytes,
            demands: s.demands,
            waits: s.waits,
            wait_p50_us: s.wait_p50_us,
            wait_p99_us: s.wait_p99_us,
            wait_max_us: s.wait_max_us,
        }
    }
}

pub mod client;
pub mod epoch;
mod extent;
pub mod failover;
pub mod local;
pub mod server;
mod status;
pub mod tls;

pub use client::{
    ExtentWriter, Info, NbdExport, PushOptions, PushReport, ReplicaClient, TreeNodes, push_file,
};
pub use epoch::Fence;
pub use extent::{Checksum, EncodedExtent, MAX_LEAF_SIZE, zero_ends};
pub use failover::{HEARTBEAT_EVERY, HEARTBEAT_LOSS, Liveness, Promotion};
pub use pb::Encoding;
pub use server::{ExportControl, ReplicaService, SERVICE_NAME, ServeOptions, serve};
pub use tls::{TlsError, TlsMaterial};

/// Largest uncompressed extent the destination accepts.
pub const MAX_EXTENT_LEN: u32 = 8 << 20;
/// Largest gRPC message either side decodes: one maximal raw extent plus framing.
pub const MAX_MESSAGE_LEN: usize = MAX_EXTENT_LEN as usize + (64 << 10);
/// Most extents one `ExtentBatch` carries (the destination says its own
/// limit in `Opened`).
pub const MAX_BATCH_EXTENTS: u32 = 256;
/// Most uncompressed bytes one batch carries, on the destination: a batch is
/// held in memory whole, like one maximal extent.
pub const MAX_BATCH_BYTES: u64 = MAX_EXTENT_LEN as u64;
/// Uncompressed bytes a sender gathers into one batch at most: beyond
/// this, batching saves nothing (a 1 MiB extent is one message anyway).
pub const BATCH_BYTES: u64 = 1 << 20;
/// Most checksum-tree nodes one `GetChecksumTree` call returns.
pub const MAX_NODES_PER_CALL: u64 = 1 << 16;

/// Errors of the replica service and its client. `status.rs` maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// A write stream began with something other than `open`.
    #[error("the first message of a write stream must be `open` carrying the epoch")]
    NoOpen,
    /// `open` sent twice on one stream.
    #[error("`open` may only be the first message of a write stream; open a new stream instead")]
    SecondOpen,
    /// A request without a body.
    #[error("a write-stream message carried no `open`, `extent`, `batch` or `barrier`")]
    EmptyMessage,
    /// The epoch is below the highest accepted one.
    #[error(
        "epoch {epoch} is stale: this destination already accepted epoch {highest}; the writer was fenced, stop writing"
    )]
    StaleEpoch { epoch: u64, highest: u64 },
    /// A newer epoch took over while this stream was open.
    #[error("this stream (epoch {epoch}) was fenced by epoch {by}; stop writing")]
    Fenced { epoch: u64, by: u64 },
    /// The destination is stopping.
    #[error("the destination is shutting down; reconnect to it once it is back")]
    ShuttingDown,
    /// A batch without extents.
    #[error("an extent batch carried no extents; send at least one")]
    EmptyBatch,
    /// A batch over the destination's limits.
    #[error(
        "an extent batch of {extents} extents and {bytes} bytes is over the limit of {max_extents} extents and {max_bytes} bytes; send smaller batches"
    )]
    BatchTooLarge {
        extents: usize,
        bytes: u64,
        max_extents: u32,
        max_bytes: u64,
    },
    /// An extent of length zero.
    #[error("extent at offset {offset} has length 0; send only non-empty extents")]
    EmptyExtent { offset: u64 },
    /// An extent longer than the limit.
    #[error("extent at offset {offset} is {len} bytes, over the {max}-byte limit; split it")]
    ExtentTooLong { offset: u64, len: u32, max: u32 },
    /// An extent past the end of the image.
    #[error(
        "extent {offset}+{len} ends past the image end ({size} bytes); the images differ in size"
    )]
    ExtentOutOfBounds { offset: u64, len: u32, size: u64 },
    /// An unknown encoding value.
    #[error("extent at offset {offset} has unknown encoding {encoding}; use RAW, ZSTD or ZERO")]
    BadEncoding { offset: u64, encoding: i32 },
    /// The payload size does not fit the encoding.
    #[error("extent at offset {offset} carries {got} payload bytes where {want} are required")]
    PayloadLength {
        offset: u64,
        got: usize,
        want: usize,
    },
    /// No 32-byte blake3 on a data extent.
    #[error("extent at offset {offset} carries a {got}-byte checksum; send the 32-byte blake3")]
    MissingChecksum { offset: u64, got: usize },
    /// A leaf size the protocol does not allow.
    #[error(
        "extent at offset {offset} gives leaf size {leaf_size}; use 0 or a power of two from 4096 to 2^30"
    )]
    BadLeafSize { offset: u64, leaf_size: u32 },
    /// The two sides hash their checksum trees differently.
    #[error(
        "the other agent hashes checksum trees with scheme {theirs} and this one with {ours}: every hash would differ; run the same tern release on both hosts"
    )]
    HashScheme { theirs: u32, ours: u32 },
    /// Leaf checksums to a destination that did not announce them.
    #[error(
        "the destination does not take leaf checksums (an older agent); the extents must carry the blake3 of their data"
    )]
    LeafChecksumsUnsupported,
    /// The data does not match its checksum.
    #[error(
        "extent {offset}+{len} does not match its blake3 checksum; it was not written, resend it"
    )]
    ChecksumMismatch { offset: u64, len: u32 },
    /// The zstd frame could not be decompressed.
    #[error("extent at offset {offset} is not a valid zstd frame: {source}")]
    BadZstd {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The zstd frame decompressed to the wrong size.
    #[error("extent at offset {offset} decompressed to {got} bytes instead of {want}")]
    ZstdLength { offset: u64, got: usize, want: u32 },
    /// An image operation failed.
    #[error("cannot {action} the image at offset {offset}: {source}")]
    Image {
        action: &'static str,
        offset: u64,
        #[source]
        source: ImageError,
    },
    /// The epoch file could not be read or written.
    #[error(
        "cannot {action} the epoch file {path}: {source}; check the image directory is writable"
    )]
    EpochFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The epoch file holds garbage.
    #[error(
        "the epoch file {path} holds {content:?}, not a number; restore it or remove it only if no older writer can still reach this host"
    )]
    EpochFileCorrupt { path: PathBuf, content: String },
    /// A write, or an epoch change, into a promoted replica.
    #[error(
        "this replica was promoted to primary at epoch {epoch} ({reason}): it may hold writes its old source lacks, so no source may write into it; bring the data home with `tern failback`, which demotes it"
    )]
    Promoted { epoch: u64, reason: String },
    /// A promotion by hand while the source still speaks.
    #[error(
        "the source was heard {heard_ms} ms ago: it is alive, and promoting its replica now would make two primaries; stop the source (or cut it off) first, or pass --force"
    )]
    SourceAlive { heard_ms: u64 },
    /// A promotion by hand of a replica no heartbeat vouched for.
    #[error(
        "no heartbeat since this agent started said the replica was complete (a recovery point): its source may have died during the first copy, and the replica may be partly blank; pass --force to promote it anyway"
    )]
    NeverConsistent,
    /// `Demote` of a replica that is not promoted.
    #[error("this replica is not promoted; there is nothing to demote")]
    NotPromoted,
    /// The promotion file could not be read or written.
    #[error("cannot {action} the promotion file {path}: {source}")]
    PromotionFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The promotion file holds garbage.
    #[error(
        "the promotion file {path} is not a promotion ({source}); the replica may be the primary: restore the file, or remove it only once no workload uses this replica"
    )]
    PromotionFileCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A read range of length zero.
    #[error("read range at offset {offset} has length 0; ask only for non-empty ranges")]
    EmptyRange { offset: u64 },
    /// A read range longer than the limit.
    #[error("read range at offset {offset} is {len} bytes, over the {max}-byte limit; split it")]
    RangeTooLong { offset: u64, len: u32, max: u32 },
    /// A read range past the end of the image.
    #[error("read range {offset}+{len} ends past the image end ({size} bytes)")]
    RangeOutOfBounds { offset: u64, len: u32, size: u64 },
    /// A zstd level zstd does not have.
    #[error("zstd level {level} is outside zstd's range {min}..={max}")]
    BadZstdLevel { level: i32, min: i32, max: i32 },
    /// A checksum-tree query failed.
    #[error("checksum tree: {0}")]
    CheckTree(#[from] CheckTreeError),
    /// Saving the checksum tree beside the image failed.
    #[error("{0}")]
    SavedTree(#[from] crate::checktree::saved::SavedTreeError),
    /// Too many nodes asked for in one call.
    #[error(
        "{asked} checksum-tree nodes asked in one call, over the limit of {max}; ask in batches"
    )]
    TooManyNodes { asked: u64, max: u64 },
    /// `SetExportWritable` on a destination without an NBD export.
    #[error("this destination has no NBD export to make writable")]
    NoExport,
    /// The export refused the change.
    #[error("cannot change the NBD export: {0}")]
    Export(#[source] Box<crate::nbd::NbdError>),
    /// A blocking task died.
    #[error("a worker task stopped before finishing: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The gRPC server failed.
    #[error("the replica gRPC server failed: {source}")]
    Serve {
        #[source]
        source: tonic::transport::Error,
    },
    /// The client could not reach the server.
    #[error(
        "cannot connect to the replica service at {addr}: {}",
        status::with_causes("check the address, the port and the TLS directory", .source)
    )]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS connection closed under the first call: the server refused
    /// this client's certificate.
    #[error(
        "the replica service at {addr} closed the connection under the first call ({transport}); \
         the TLS handshake failed: it refused this host's certificate: both hosts need certificates from the same CA \
         (`tern certs init DIR --host SRC --host DST`) and each side its own host's directory as --tls-dir"
    )]
    CertificateRefused { addr: String, transport: String },
    /// A call failed with a gRPC status.
    #[error("{call} failed: {}", status::describe(.status))]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    /// The server closed a stream before answering.
    #[error(
        "the destination closed the {what} stream early; reconnect and resend unacknowledged extents (or ask again for unanswered ranges)"
    )]
    StreamClosed { what: &'static str },
    /// The server answered out of protocol.
    #[error(
        "the destination answered {got} where {want} was expected; check both sides run the same protocol version"
    )]
    UnexpectedReply { want: &'static str, got: String },
    /// A local file could not be read (client side).
    #[error("cannot read {path}: {source}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The post-copy gate refused (a map that does not fit, or a unit that
    /// did not arrive in time).
    #[error("{0}")]
    PostCopy(#[source] crate::postcopy::PresenceError),
    /// zstd compression failed (client side).
    #[error("cannot compress the extent at offset {offset}: {source}")]
    Compress {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

impl RpcError {
    /// Whether a failed call may succeed after reconnecting.
    pub fn is_transient(&self) -> bool {
        match self {
            RpcError::Connect { .. } | RpcError::StreamClosed { .. } | RpcError::ShuttingDown => {
                true
            }
            RpcError::Call { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::Internal
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
            ),
            _ => false,
        }
    }

    /// The gRPC code a failed call returned, if this error is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            RpcError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}
