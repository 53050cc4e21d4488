//! The source's I/O history in object storage: the tracer's records rolled
//! into time-windowed trace segments, each with a JSON summary and a Parquet
//! table of its records (for `DuckDB`, Spark, pandas), kept in a local directory
//! (the default) or S3, pruned by age and size, and read back
//! as one record stream for the analyzer and the predictor.
//!
//! Writing: a [`SegmentWriter`] (on the tracer's thread) writes records into
//! a spool directory; an [`Uploader`] (an async task) moves closed segments
//! from the spool to the store, resuming multipart uploads and retrying with
//! backoff while the store is down. Nothing is dropped: a segment stays in the
//! spool until the store has it.
//!
//! Reading — the API the analyzer and the predictor use:
//!
//! ```no_run
//! use tern::history::{HistoryReader, Query, TimeRange};
//! # fn main() -> Result<(), tern::history::HistoryError> {
//! // From plain (non-async) code; async code uses `HistoryStore::records`.
//! let query = Query { range: TimeRange::last(std::time::Duration::from_secs(3600)), ..Query::default() };
//! let mut history = HistoryReader::open("s3://bucket/tern", &query)?;
//! // Targets and start time, like a trace file's header (`None`: no history in the range).
//! let header = history.header().cloned();
//! for record in &mut history {
//!     let record = record?; // block, fault, gap and process records, in the header's time base
//! }
//! # Ok(()) }
//! ```
//!
//! The object layout, retention and resume semantics are in `docs/history.md`.

mod key;
mod location;
mod put;
mod read;
mod retention;
mod spool;
mod summary;
mod table;
mod upload;
mod writer;

use std::io;
use std::path::PathBuf;

pub use key::{SegmentKey, format_time, parse_time, sanitize};
pub use location::{HistoryStore, StoreOptions};
pub use put::put_trace;
pub use read::{HistoryReader, Query, RecordStream, SegmentInfo, TimeRange};
pub use retention::{PruneReport, Retention};
pub use summary::{OpSummary, SummaryHook, WindowSummary};
pub use table::{TableError, parquet_schema, write_parquet};
pub use upload::{Backoff, UploadCounts, UploadOptions, Uploader, UploaderHandle};
pub use writer::{HistoryWriter, RollPolicy, SegmentWriter};

use crate::trace::TraceFileError;

/// Errors of the history store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// A URL that names no store we can open.
    #[error("history location {url:?} is not usable: {why}")]
    BadUrl { url: String, why: String },
    /// The store client could not be built.
    #[error("cannot open the object store at {url}: {source}")]
    Open {
        url: String,
        source: object_store::Error,
    },
    /// A store operation failed (after the client's own retries).
    #[error("object store: {op} {path} failed: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: object_store::Error,
    },
    /// The local spool directory cannot be used.
    #[error("history spool {path}: {source}")]
    Spool { path: PathBuf, source: io::Error },
    /// A segment that is not a readable trace.
    #[error("history segment {name}: {source}")]
    Segment {
        name: String,
        source: TraceFileError,
    },
    /// A segment whose Parquet table cannot be made.
    #[error("history segment {name}: cannot make its Parquet table: {source}")]
    Table {
        name: String,
        #[source]
        source: TableError,
    },
    /// A summary that is not valid JSON.
    #[error("history summary {name}: {source}")]
    Summary {
        name: String,
        source: serde_json::Error,
    },
    /// A retention setting that cannot be parsed.
    #[error(
        "retention {0:?} is not valid: give an age (7d, 12h), a total size (50G) or both (7d,50G)"
    )]
    BadRetention(String),
    /// A time that cannot be parsed.
    #[error(
        "time {0:?} is not valid: give RFC 3339 (2026-11-25T19:00:00Z) or an age before now (2h)"
    )]
    BadTime(String),
    /// Records were asked for a query that matches several devices.
    #[error("the history at {url} holds several devices ({devices}): choose one (--host/--device)")]
    SeveralDevices { url: String, devices: String },
    /// The blocking reader's runtime could not start.
    #[error("cannot start the history reader's runtime: {0}")]
    Runtime(io::Error),
    /// The segments read together trace more targets than a record can name.
    #[error("history segment {name}: the history read so far traces more than 65536 targets")]
    TooManyTargets { name: String },
    /// A spooled trace too large to upload from this machine's address space.
    #[error("history upload of {path}: the {what} does not fit in memory here")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::num::TryFromIntError,
    },
}
