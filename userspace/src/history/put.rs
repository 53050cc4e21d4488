//! A recorded trace put into a history store as if an agent had recorded it:
//! its records rolled into the same windows and segments, each stored with its
//! summary and Parquet table. For backfilling history from `tern trace record`
//! files, and for checks that need a real history without a tracer.

use std::path::Path;

use super::upload::{UploadCounts, UploadOptions, Uploader};
use super::writer::{RollPolicy, SegmentWriter};
use super::{HistoryError, HistoryStore};
use crate::trace::TraceReader;
use crate::trace::record::Record;

/// Rolls the trace at `trace` into segments by `roll` in a temporary spool and
/// uploads them to `store` (with Parquet tables if `parquet`). Putting the same
/// trace again stores the same objects: names and contents are its own.
pub async fn put_trace(
    store: HistoryStore,
    trace: &Path,
    roll: RollPolicy,
    parquet: bool,
) -> Result<UploadCounts, HistoryError> {
    let spool = tempfile::tempdir().map_err(|source| HistoryError::Spool {
        path: std::env::temp_dir(),
        source,
    })?;
    let root = spool.path().to_owned();
    let trace = trace.to_owned();
    tokio::task::spawn_blocking(move || spool_trace(&trace, &root, roll))
        .await
        .expect("spooling a trace does not panic")?;
    let mut opts = UploadOptions::new(spool.path().to_owned());
    opts.roll = roll;
    opts.parquet = parquet;
    let uploader = Uploader::new(store, opts)?;
    uploader.upload_pending().await?;
    Ok(uploader.counts())
}

/// Writes the trace's records (not its end record) into closed segments under `spool`.
fn spool_trace(trace: &Path, spool: &Path, roll: RollPolicy) -> Result<(), HistoryError> {
    let seg_err = |source| HistoryError::Segment {
        name: trace.display().to_string(),
        source,
    };
    let file = std::fs::File::open(trace).map_err(|source| HistoryError::Spool {
        path: trace.to_owned(),
        source,
    })?;
    let mut reader = TraceReader::new(std::io::BufReader::new(file)).map_err(seg_err)?;
    let mut writer = SegmentWriter::new(spool, reader.header().clone(), roll)?;
    let mut end = 0;
    while let Some(rec) = reader.next_record().map_err(seg_err)? {
        match rec {
            // The session's end closes the last window where the recording stopped.
            Record::End(e) => end = end.max(e.ts_ns),
            rec => writer.push(&rec)?,
        }
    }
    writer.finish(end)
}
