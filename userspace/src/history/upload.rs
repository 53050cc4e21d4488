//! Moving closed segments from the spool to the store.
//!
//! Segments go oldest first, each before its summary. A segment larger than
//! one part goes as an S3 multipart upload whose id and finished parts are
//! kept in the spool (`STEM.upload.json`), so after the store (or the agent)
//! restarts only the missing parts are sent. While the store is down the
//! uploader retries with exponential backoff; nothing leaves the spool until
//! the store has it.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use object_store::multipart::PartId;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::read::now_unix_ns;
use super::retention::Retention;
use super::spool::{self, SpoolEntry};
use super::summary::{SummaryHook, WindowSummary};
use super::table::{TableError, write_parquet};
use super::writer::{HistoryWriter, RollPolicy};
use super::{HistoryError, HistoryStore};
use crate::trace::TraceReader;
use crate::trace::format::TraceHeader;
use crate::trace::session::Observer;
use crate::trace::stats::TraceStats;

/// Waits between failed upload attempts: doubling from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// How the uploader works.
#[derive(Clone)]
pub struct UploadOptions {
    /// The local spool directory.
    pub spool: PathBuf,
    pub roll: RollPolicy,
    /// Multipart part size (S3 wants at least 5 MiB); larger segments go in parts.
    pub part_size: u64,
    pub backoff: Backoff,
    /// Applied to this agent's device after uploads, at most every `prune_every`.
    pub retention: Option<Retention>,
    pub prune_every: Duration,
    pub summary_hook: Option<SummaryHook>,
    /// Also store each segment's records as a Parquet table (`STEM.parquet`)
    /// for `DuckDB`, Spark and pandas.
    pub parquet: bool,
}

impl UploadOptions {
    pub fn new(spool: PathBuf) -> UploadOptions {
        UploadOptions {
            spool,
            roll: RollPolicy::default(),
            part_size: 8 << 20,
            backoff: Backoff::default(),
            retention: None,
            prune_every: Duration::from_mins(10),
            summary_hook: None,
            parquet: true,
        }
    }
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    bytes: AtomicU64,
    parts: AtomicU64,
    resumed: AtomicU64,
    failures: AtomicU64,
    salvaged: AtomicU64,
    pruned: AtomicU64,
    tables: AtomicU64,
    table_failures: AtomicU64,
}

/// What the uploader has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UploadCounts {
    /// Segments the store has (with their summaries), and their bytes.
    pub segments: u64,
    pub bytes: u64,
    /// Multipart parts sent.
    pub parts: u64,
    /// Multipart attempts that continued a saved upload rather than starting over.
    pub resumed: u64,
    /// Upload attempts that failed (and were retried).
    pub failures: u64,
    /// Open segments of earlier runs turned into closed ones at start.
    pub salvaged: u64,
    /// Segments deleted by retention.
    pub pruned: u64,
    /// Parquet tables the store has beside their segments.
    pub tables: u64,
    /// Segments whose Parquet table could not be made: their trace was stored without it.
    pub table_failures: u64,
    /// Closed segments still waiting in the spool.
    pub waiting: u64,
    /// Bytes in the spool (waiting segments and the open one).
    pub spool_bytes: u64,
}

/// A multipart upload in progress, saved after every part.
#[derive(Debug, Serialize, Deserialize)]
struct UploadState {
    upload_id: String,
    part_size: u64,
    size: u64,
    parts: Vec<String>,
}

/// The uploader of one agent's history (see the module doc).
pub struct Uploader {
    store: HistoryStore,
    opts: UploadOptions,
    writer: HistoryWriter,
    counters: Counters,
    wake: Notify,
}

fn spool_err(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Spool {
        path: path.to_owned(),
        source,
    }
}

fn store_err(
    op: &'static str,
    path: &ObjectPath,
) -> impl FnOnce(object_store::Error) -> HistoryError {
    let path = path.to_string();
    move |source| HistoryError::Store { op, path, source }
}

async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HistoryError> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(spool_err(&tmp))?;
    tokio::fs::rename(&tmp, path).await.map_err(spool_err(path))
}

/// The summary of a spooled segment; a segment damaged on the local disk is repaired first.
fn summarize(
    entry: &SpoolEntry,
    hook: Option<&SummaryHook>,
) -> Result<WindowSummary, HistoryError> {
    let read = |path: &Path| -> Result<TraceStats, HistoryError> {
        let file = std::fs::File::open(path).map_err(spool_err(path))?;
        let seg_err = |source| HistoryError::Segment {
            name: entry.key.stem(),
            source,
        };
        TraceStats::from_reader(TraceReader::new(std::io::BufReader::new(file)).map_err(seg_err)?)
            .map_err(seg_err)
    };
    let path = entry.trace();
    let stats = match read(&path) {
        Ok(s) => s,
        Err(HistoryError::Segment { .. }) => {
            tracing::warn!(segment = %entry.key.stem(), "a spooled history segment is damaged; keeping its readable records");
            spool::repair(entry)?;
            read(&path)?
        }
        Err(e) => return Err(e),
    };
    let size = std::fs::metadata(&path).map_err(spool_err(&path))?.len();
    let mut summary = WindowSummary::from_stats(&entry.key, size, &stats);
    if let Some(hook) = hook {
        summary.extra = hook(&path);
    }
    Ok(summary)
}

/// The segment's Parquet table, kept in the spool (`STEM.parquet`) so a
/// retry while the store is down does not make it again.
fn make_table(entry: &SpoolEntry) -> Result<bytes::Bytes, HistoryError> {
    let path = entry.table();
    match std::fs::read(&path) {
        Ok(bytes) => return Ok(bytes.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(spool_err(&path)(e)),
    }
    let trace = entry.trace();
    let file = std::fs::File::open(&trace).map_err(spool_err(&trace))?;
    let table_err = |source| HistoryError::Table {
        name: entry.key.stem(),
        source,
    };
    let reader = TraceReader::new(std::io::BufReader::new(file))
        .map_err(|source| table_err(TableError::Trace { source }))?;
    let mut bytes = Vec::new();
    write_parquet(reader, &entry.key, &mut bytes).map_err(table_err)?;
    // Only a cache: if the spool cannot hold it, a retry makes it again.
    let tmp = entry.table_tmp();
    if std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(bytes.into())
}

impl Uploader {
    /// An uploader from `opts.spool` to `store`. Salvages what an earlier run
    /// left open in the spool (no writer of this run exists yet).
    pub fn new(store: HistoryStore, opts: UploadOptions) -> Result<Arc<Uploader>, HistoryError> {
        std::fs::create_dir_all(&opts.spool).map_err(spool_err(&opts.spool))?;
        let salvaged = spool::salvage(&opts.spool, &std::collections::HashSet::new())?;
        let up = Uploader {
            store,
            opts,
            writer: HistoryWriter::default(),
            counters: Counters::default(),
            wake: Notify::new(),
        };
        up.counters.salvaged.store(salvaged, Ordering::Relaxed);
        Ok(Arc::new(up))
    }

    /// The writer the tracer feeds.
    pub fn writer(&self) -> &HistoryWriter {
        &self.writer
    }

    pub fn store(&self) -> &HistoryStore {
        &self.store
    }

    /// The tracer's observer for a session with `header`: records go to the
    /// spool, and each closed segment wakes this uploader.
    pub fn observer(self: &Arc<Self>, header: &TraceHeader) -> Result<Observer, HistoryError> {
        let me = Arc::downgrade(self);
        let wake = Arc::new(move || {
            if let Some(me) = me.upgrade() {
                me.wake.notify_one();
            }
        });
        self.writer
            .observer(&self.opts.spool, header, self.opts.roll, wake)
    }

    pub fn counts(&self) -> UploadCounts {
        let c = &self.counters;
        UploadCounts {
            segments: c.segments.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            parts: c.parts.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            salvaged: c.salvaged.load(Ordering::Relaxed),
            pruned: c.pruned.load(Ordering::Relaxed),
            tables: c.tables.load(Ordering::Relaxed),
            table_failures: c.table_failures.load(Ordering::Relaxed),
            waiting: spool::ready(&self.opts.spool).map_or(0, |r| r.len() as u64),
            spool_bytes: spool::bytes(&self.opts.spool).unwrap_or(0),
        }
    }

    /// Uploads every closed segment in the spool, oldest first; stops at the
    /// first failure (the rest waits for the next attempt). Returns how many went.
    pub async fn upload_pending(&self) -> Result<u64, HistoryError> {
        let spool = self.opts.spool.clone();
        let entries = tokio::task::spawn_blocking(move || spool::ready(&spool))
            .await
            .expect("listing the spool does not panic")?;
        let mut n = 0;
        for entry in entries {
            self.upload(&entry).await?;
            n += 1;
        }
        Ok(n)
    }

    async fn upload(&self, entry: &SpoolEntry) -> Result<(), HistoryError> {
        let summary = match tokio::fs::read(entry.summary()).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let e2 = entry.clone();
                let hook = self.opts.summary_hook.clone();
                let summary = tokio::task::spawn_blocking(move || summarize(&e2, hook.as_ref()))
                    .await
                    .expect("summarizing a segment does not panic")?;
                let bytes = serde_json::to_vec_pretty(&summary).map_err(|source| {
                    HistoryError::Summary {
                        name: entry.key.stem(),
                        source,
                    }
                })?;
                write_atomic(&entry.summary(), &bytes).await?;
                bytes
            }
            Err(e) => return Err(spool_err(&entry.summary())(e)),
        };
        let trace = entry.trace();
        let size = tokio::fs::metadata(&trace)
            .await
            .map_err(spool_err(&trace))?
            .len();
        let stem = entry.key.stem();
        let host = entry.key.host.as_str();
        let device = entry.key.device.as_str();
        let seg_path = self
            .store
            .path([host, device, format!("{stem}.trace").as_str()]);
        let sum_path = self
            .store
            .path([host, device, format!("{stem}.json").as_str()]);
        let table = if self.opts.parquet {
            self.table(entry).await
        } else {
            None
        };
        let result = if self.store.multipart.is_some() && size > self.opts.part_size {
            self.put_multipart(entry, &seg_path, size).await
        } else {
            let data = tokio::fs::read(&trace).await.map_err(spool_err(&trace))?;
            self.store
                .store
                .put(&seg_path, data.into())
                .await
                .map(drop)
                .map_err(store_err("put", &seg_path))
        };
        if let Err(e) = result {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        if let Some(table) = &table {
            let path = self
                .store
                .path([host, device, format!("{stem}.parquet").as_str()]);
            if let Err(e) = self
                .store
                .store
                .put(&path, table.clone().into())
                .await
                .map_err(store_err("put", &path))
            {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        }
        if let Err(e) = self
            .store
            .store
            .put(&sum_path, summary.into())
            .await
            .map_err(store_err("put", &sum_path))
        {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        spool::remove(entry)?;
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(size, Ordering::Relaxed);
        if table.is_some() {
            self.counters.tables.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The segment's Parquet table; `None` when it cannot be made: the trace
    /// is what history is, so it goes on without its table (counted, logged).
    async fn table(&self, entry: &SpoolEntry) -> Option<bytes::Bytes> {
        let e2 = entry.clone();
        let made = tokio::task::spawn_blocking(move || make_table(&e2))
            .await
            .expect("making a Parquet table does not panic");
        match made {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.counters.table_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(segment = %entry.key.stem(), error = %e, "cannot make the segment's Parquet table; storing its trace without it");
                None
            }
        }
    }

    async fn put_multipart(
        &self,
        entry: &SpoolEntry,
        path: &ObjectPath,
        size: u64,
    ) -> Result<(), HistoryError> {
        let mp = self
            .store
            .multipart
            .as_ref()
            .expect("put_multipart is only called for stores with multipart");
        let state_path = entry.upload_state();
        let part_size = self.opts.part_size.max(5 << 20);
        let saved: Option<UploadState> = match tokio::fs::read(&state_path).await {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(_) => None,
        };
        let mut state = match saved {
            Some(s) if s.part_size == part_size && s.size == size => {
                if !s.parts.is_empty() {
                    self.counters.resumed.fetch_add(1, Ordering::Relaxed);
                }
                s
            }
            _ => {
                let upload_id = mp
                    .create_multipart(path)
                    .await
                    .map_err(store_err("create multipart", path))?;
                let s = UploadState {
                    upload_id,
                    part_size,
                    size,
                    parts: Vec::new(),
                };
                self.save_state(&state_path, &s).await?;
                s
            }
        };
        let parts = size.div_ceil(part_size);
        let trace = entry.trace();
        let mut file = tokio::fs::File::open(&trace)
            .await
            .map_err(spool_err(&trace))?;
        let too_large = |what: &'static str| {
            let path = trace.clone();
            move |source| HistoryError::TooLarge { path, what, source }
        };
        for idx in state.parts.len() as u64..parts {
            let offset = idx * part_size;
            let len = part_size.min(size - offset);
            let mut buf = vec![0u8; usize::try_from(len).map_err(too_large("part"))?];
            file.seek(SeekFrom::Start(offset))
                .await
                .map_err(spool_err(&trace))?;
            file.read_exact(&mut buf).await.map_err(spool_err(&trace))?;
            let part_no = usize::try_from(idx).map_err(too_large("part number"))?;
            match mp
                .put_part(path, &state.upload_id, part_no, buf.into())
                .await
            {
                Ok(part) => {
                    state.parts.push(part.content_id);
                    self.save_state(&state_path, &state).await?;
                    self.counters.parts.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(self.forget_if_gone(&state_path, path, e).await),
            }
        }
        let ids = state
            .parts
            .iter()
            .map(|c| PartId {
                content_id: c.clone(),
            })
            .collect();
        if let Err(e) = mp.complete_multipart(path, &state.upload_id, ids).await {
            return Err(self.forget_if_gone(&state_path, path, e).await);
        }
        Ok(())
    }

    /// An upload the store no longer knows (expired, or completed just before
    /// a crash) starts over next time.
    async fn forget_if_gone(
        &self,
        state_path: &Path,
        path: &ObjectPath,
        e: object_store::Error,
    ) -> HistoryError {
        if matches!(e, object_store::Error::NotFound { .. }) {
            let _ = tokio::fs::remove_file(state_path).await;
        }
        store_err("multipart upload", path)(e)
    }

    async fn save_state(&self, path: &Path, state: &UploadState) -> Result<(), HistoryError> {
        let bytes = serde_json::to_vec(state).map_err(|source| HistoryError::Summary {
            name: path.display().to_string(),
            source,
        })?;
        write_atomic(path, &bytes).await
    }

    /// Applies the retention to the history of the device being written.
    async fn prune(&self, retention: &Retention) -> Result<(), HistoryError> {
        let Some((host, device)) = self.writer.scope() else {
            return Ok(());
        };
        let report = self
            .store
            .prune(retention, Some((&host, &device)), now_unix_ns(), false)
            .await?;
        self.counters
            .pruned
            .fetch_add(report.deleted_segments, Ordering::Relaxed);
        if report.deleted_segments > 0 {
            tracing::info!(
                deleted = report.deleted_segments,
                bytes = report.deleted_bytes,
                "history retention deleted old segments"
            );
        }
        Ok(())
    }

    /// Runs until `cancel`: uploads as segments close, retries with backoff
    /// while the store is down, prunes now and then; ticks the writer each
    /// second on its own thread.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) -> UploaderHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let writer = self.writer.clone();
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("tern-history-tick".into())
                .spawn(move || {
                    let mut warned = false;
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(100));
                        if last.elapsed() < Duration::from_secs(1) {
                            continue;
                        }
                        last = Instant::now();
                        match writer.tick() {
                            Ok(()) => warned = false,
                            Err(e) if !warned => {
                                warned = true;
                                tracing::warn!(error = %e, "cannot flush the history segment");
                            }
                            Err(_) => {}
                        }
                    }
                })
                .ok()
        };
        let me = Arc::clone(self);
        let loop_cancel = cancel.clone();
        let task = tokio::spawn(async move { me.run(loop_cancel).await });
        UploaderHandle {
            uploader: Arc::clone(self),
            task,
            cancel,
            stop,
            ticker,
        }
    }

    async fn run(&self, cancel: CancellationToken) {
        let mut backoff = self.opts.backoff.first;
        let mut down_since: Option<Instant> = None;
        let mut last_prune: Option<Instant> = None;
        loop {
            match self.upload_pending().await {
                Ok(_) => {
                    if let Some(since) = down_since.take() {
                        tracing::info!(
                            after_ms =
                                u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                            "history store reachable again; the spool is uploaded"
                        );
                    }
                    backoff = self.opts.backoff.first;
                    if let Some(r) = &self.opts.retention
                        && last_prune.is_none_or(|t| t.elapsed() >= self.opts.prune_every)
                    {
                        last_prune = Some(Instant::now());
                        if let Err(e) = self.prune(r).await {
                            tracing::warn!(error = %e, "history retention failed; trying again later");
                        }
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(error = %e, "cannot upload history; segments wait in the spool and are retried");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.opts.backoff.max);
                }
            }
        }
    }
}

/// A running uploader.
pub struct UploaderHandle {
    uploader: Arc<Uploader>,
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl UploaderHandle {
    pub fn uploader(&self) -> &Arc<Uploader> {
        &self.uploader
    }

    /// Stops: closes the last segment (stop the tracer first) and tries to
    /// upload what is left for up to `grace`. What does not make it stays in
    /// the spool for the next run.
    pub async fn shutdown(mut self, grace: Duration) -> UploadCounts {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.cancel.cancel();
        let _ = (&mut self.task).await;
        self.uploader.writer.finish();
        let deadline = Instant::now() + grace;
        let mut backoff = self.uploader.opts.backoff.first;
        loop {
            match self.uploader.upload_pending().await {
                Ok(_) => break,
                Err(e) => {
                    if Instant::now() + backoff > deadline {
                        tracing::warn!(error = %e, "history segments left in the spool; the next run uploads them");
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.uploader.opts.backoff.max);
                }
            }
        }
        self.uploader.counts()
    }
}

impl Drop for UploaderHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::read::{HistoryReader, Query, TimeRange};
    use crate::history::writer::SegmentWriter;
    use crate::history::writer::tests::block;
    use crate::trace::format::tests::header;
    use crate::trace::record::{Gap, Record};

    const S: u64 = 1_000_000_000;

    fn policy() -> RollPolicy {
        RollPolicy {
            every: Duration::from_secs(10),
            max_bytes: 1 << 30,
        }
    }

    /// Two sessions of a device with a gap record in the first, an unwatched
    /// stretch between them; returns what was pushed (as wall-clock records).
    fn write_two_sessions(spool: &Path) -> (u64, Vec<(u64, Record)>) {
        let h1 = header(1);
        let s1 = h1.start_wall_unix_ns;
        let mut pushed = Vec::new();
        let mut w = SegmentWriter::new(spool, h1.clone(), policy()).expect("writer");
        for i in 0..1000u64 {
            let r = block(i * 50_000_000, i * 4096);
            w.push(&r).expect("push");
            pushed.push((s1 + r.ts_ns(), r));
        }
        let gap = Record::Gap(Gap {
            start_ns: 50 * S,
            end_ns: 51 * S,
            lost_block: 17,
            lost_fault: 0,
        });
        w.push(&gap).expect("push gap");
        pushed.push((s1 + 50 * S, gap));
        w.finish(52 * S).expect("finish");
        // The agent was down for 100 s, then a new session began.
        let h2 = crate::trace::format::TraceHeader {
            start_wall_unix_ns: s1 + 152 * S,
            ..h1
        };
        let s2 = h2.start_wall_unix_ns;
        let mut w = SegmentWriter::new(spool, h2, policy()).expect("writer");
        for i in 0..500u64 {
            let r = block(i * 40_000_000, (i + 7) * 4096);
            w.push(&r).expect("push");
            pushed.push((s2 + r.ts_ns(), r));
        }
        w.finish(25 * S).expect("finish");
        (s1, pushed)
    }

    #[test]
    fn local_history_round_trips_every_record_and_marks_unwatched_time() {
        let spool = tempfile::tempdir().expect("spool");
        let root = tempfile::tempdir().expect("store");
        let url = root.path().to_str().expect("utf-8").to_owned();
        let (s1, pushed) = write_two_sessions(spool.path());
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let store = HistoryStore::open(&url).expect("store");
        let mut opts = UploadOptions::new(spool.path().to_owned());
        // A producer of richer statistics, as the analyzer plugs in.
        let hook: SummaryHook = Arc::new(|path: &Path| {
            let records = TraceReader::new(std::fs::File::open(path).expect("segment"))
                .expect("a trace")
                .count();
            let mut extra = serde_json::Map::new();
            extra.insert("test".into(), serde_json::json!({ "records": records }));
            extra
        });
        opts.summary_hook = Some(hook);
        let up = Uploader::new(store.clone(), opts).expect("uploader");
        let n = rt.block_on(up.upload_pending()).expect("uploads");
        // 0-10-20-30-40-50-52 and 0-10-25 (the last window ends when the session does).
        assert_eq!(n, 8);
        assert_eq!(up.counts().waiting, 0);
        let segs = rt
            .block_on(store.segments(&Query::default()))
            .expect("lists");
        assert_eq!(segs.len(), 8);
        assert!(segs.iter().all(|s| s.summary_bytes.is_some()));
        assert!(segs.iter().all(|s| s.table_bytes.is_some()));
        assert_eq!((up.counts().tables, up.counts().table_failures), (8, 0));
        let sums = rt
            .block_on(store.summaries(&Query::default()))
            .expect("summaries");
        assert_eq!(sums.iter().map(|s| s.block_events).sum::<u64>(), 1500);
        assert_eq!(sums.iter().map(|s| s.gaps).sum::<u64>(), 1);
        assert_eq!(sums.iter().map(|s| s.lost_events).sum::<u64>(), 17);
        // Every record and each segment's end record, counted by the hook.
        let hooked: u64 = sums
            .iter()
            .map(|s| {
                s.extra["test"]["records"]
                    .as_u64()
                    .expect("the hook's figure")
            })
            .sum();
        assert_eq!(hooked, 1501 + 8);
        drop(rt);

        let mut reader = HistoryReader::open(&url, &Query::default()).expect("reader");
        let base = reader.header().expect("a header").start_wall_unix_ns;
        assert_eq!(base, s1);
        let back: Vec<Record> = (&mut reader).collect::<Result<_, _>>().expect("reads");
        assert_eq!(reader.synthesized_gaps(), 1);
        let unwatched = Record::Gap(Gap {
            start_ns: 52 * S,
            end_ns: 152 * S,
            lost_block: 0,
            lost_fault: 0,
        });
        let mut want: Vec<Record> = Vec::new();
        for (wall, r) in &pushed {
            if *wall == s1 + 152 * S && !want.contains(&unwatched) {
                want.push(unwatched.clone());
            }
            let mut r = r.clone();
            match &mut r {
                Record::Block(b) => b.ts_ns = wall - base,
                Record::Gap(g) => {
                    g.end_ns = g.end_ns + wall - base - g.start_ns;
                    g.start_ns = wall - base;
                }
                _ => {}
            }
            want.push(r);
        }
        assert_eq!(back, want);

        // A range: only the records inside it, plus the unwatched stretch it overlaps.
        let q = Query {
            range: TimeRange {
                from_unix_ns: Some(s1 + 40 * S),
                to_unix_ns: Some(s1 + 160 * S),
            },
            ..Query::default()
        };
        let ranged: Vec<Record> = HistoryReader::open(&url, &q)
            .expect("reader")
            .collect::<Result<_, _>>()
            .expect("reads");
        let inside = want
            .iter()
            .filter(|r| match r {
                Record::Gap(g) => g.end_ns > 40 * S && g.start_ns < 160 * S,
                r => (40 * S..160 * S).contains(&r.ts_ns()),
            })
            .count();
        assert_eq!(ranged.len(), inside);
        assert!(ranged.contains(&unwatched));
    }

    #[test]
    fn retention_deletes_the_oldest_by_age_and_by_size() {
        let spool = tempfile::tempdir().expect("spool");
        let root = tempfile::tempdir().expect("store");
        let url = root.path().to_str().expect("utf-8").to_owned();
        let (s1, _) = write_two_sessions(spool.path());
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let store = HistoryStore::open(&url).expect("store");
        let up = Uploader::new(store.clone(), UploadOptions::new(spool.path().to_owned()))
            .expect("uploader");
        rt.block_on(up.upload_pending()).expect("uploads");
        let all = rt
            .block_on(store.segments(&Query::default()))
            .expect("lists");
        // Age: "now" is 30 s after the first session ended; keep 60 s.
        let now = s1 + 82 * S;
        let by_age = Retention {
            max_age: Some(Duration::from_mins(1)),
            max_bytes: None,
        };
        let dry = rt
            .block_on(store.prune(&by_age, None, now, true))
            .expect("dry run");
        assert_eq!(dry.deleted_segments, 2, "windows ending at 10 s and 20 s");
        assert_eq!(
            rt.block_on(store.segments(&Query::default()))
                .expect("lists")
                .len(),
            8,
            "a dry run deletes nothing"
        );
        let report = rt
            .block_on(store.prune(&by_age, None, now, false))
            .expect("prune");
        assert_eq!(report.deleted_segments, 2);
        let left = rt
            .block_on(store.segments(&Query::default()))
            .expect("lists");
        assert_eq!(left.len(), 6);
        assert!(left.iter().all(|s| s.key.end_unix_ns >= now - 60 * S));
        // Size: keep the newest segments that fit in the budget.
        let newest3: u64 = {
            let mut by_end = all.clone();
            by_end.sort_by_key(|s| std::cmp::Reverse(s.key.end_unix_ns));
            by_end[..3]
                .iter()
                .map(|s| s.bytes + s.summary_bytes.unwrap_or(0) + s.table_bytes.unwrap_or(0))
                .sum()
        };
        let by_size = Retention {
            max_age: None,
            max_bytes: Some(newest3),
        };
        let report = rt
            .block_on(store.prune(&by_size, None, now, false))
            .expect("prune");
        assert_eq!(report.kept_segments, 3);
        assert_eq!(report.kept_bytes, newest3);
        let left = rt
            .block_on(store.segments(&Query::default()))
            .expect("lists");
        assert_eq!(left.len(), 3);
        // No summary or table is left behind without its segment.
        let files = walk(root.path());
        assert_eq!(files.len(), 9, "{files:?}");
    }

    #[test]
    fn a_segment_whose_table_cannot_be_made_is_stored_without_it() {
        let spool = tempfile::tempdir().expect("spool");
        let root = tempfile::tempdir().expect("store");
        let url = root.path().to_str().expect("utf-8").to_owned();
        // Past 2262: a trace holds it, Parquet's nanosecond timestamps do not.
        let mut h = header(1);
        h.start_wall_unix_ns = u64::try_from(i64::MAX).expect("fits");
        let mut w = SegmentWriter::new(spool.path(), h, policy()).expect("writer");
        for i in 0..100u64 {
            w.push(&block(i * 50_000_000, i * 4096)).expect("push");
        }
        w.finish(5 * S).expect("finish");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let store = HistoryStore::open(&url).expect("store");
        let up = Uploader::new(store.clone(), UploadOptions::new(spool.path().to_owned()))
            .expect("uploader");
        assert_eq!(rt.block_on(up.upload_pending()).expect("uploads"), 1);
        let c = up.counts();
        assert_eq!(
            (c.segments, c.tables, c.table_failures, c.waiting),
            (1, 0, 1, 0)
        );
        let segs = rt
            .block_on(store.segments(&Query::default()))
            .expect("lists");
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].table_bytes, None);
        let records = HistoryReader::open(&url, &Query::default())
            .expect("reader")
            .count();
        assert_eq!(records, 100, "the trace is all there");
    }

    #[test]
    fn without_parquet_only_segments_and_summaries_are_stored() {
        let spool = tempfile::tempdir().expect("spool");
        let root = tempfile::tempdir().expect("store");
        write_two_sessions(spool.path());
        let store = HistoryStore::open(root.path().to_str().expect("utf-8")).expect("store");
        let mut opts = UploadOptions::new(spool.path().to_owned());
        opts.parquet = false;
        let up = Uploader::new(store, opts).expect("uploader");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        assert_eq!(rt.block_on(up.upload_pending()).expect("uploads"), 8);
        let files = walk(root.path());
        assert_eq!(files.len(), 16, "{files:?}");
        assert!(
            files
                .iter()
                .all(|f| f.extension().is_some_and(|e| e != "parquet"))
        );
        assert_eq!(up.counts().tables, 0);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("lists") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_store_that_is_down_leaves_segments_in_the_spool() {
        let spool = tempfile::tempdir().expect("spool");
        let root = tempfile::tempdir().expect("store");
        let url = root.path().join("h").to_str().expect("utf-8").to_owned();
        write_two_sessions(spool.path());
        let store = HistoryStore::open(&url).expect("store");
        // The store's directory becomes unwritable: a file where a directory must go.
        std::fs::remove_dir_all(root.path().join("h")).expect("rm");
        std::fs::write(root.path().join("h"), b"not a directory").expect("write");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let up =
            Uploader::new(store, UploadOptions::new(spool.path().to_owned())).expect("uploader");
        assert!(rt.block_on(up.upload_pending()).is_err());
        assert_eq!(up.counts().waiting, 8);
        assert_eq!(up.counts().failures, 1);
        // The first segment's table waits made, beside it.
        let spooled = walk(spool.path());
        assert_eq!(
            spooled
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .count(),
            1,
            "{spooled:?}"
        );
        std::fs::remove_file(root.path().join("h")).expect("rm");
        std::fs::create_dir(root.path().join("h")).expect("mkdir");
        assert_eq!(rt.block_on(up.upload_pending()).expect("uploads"), 8);
        assert_eq!(up.counts().waiting, 0);
        assert_eq!(up.counts().tables, 8);
        assert!(walk(spool.path()).is_empty(), "nothing left in the spool");
    }
}
