//! Reading history back: segment listings, summaries, and one record stream
//! over a time range, as if it were one trace file.

use std::collections::VecDeque;
use std::io::Cursor;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

use super::key::SegmentKey;
use super::summary::WindowSummary;
use super::{HistoryError, HistoryStore, StoreOptions};
use crate::trace::TraceReader;
use crate::trace::format::TraceHeader;
use crate::trace::record::{Gap, Record};

/// A wall-clock range `[from, to)`, nanoseconds since the Unix epoch; open ends are unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub from_unix_ns: Option<u64>,
    pub to_unix_ns: Option<u64>,
}

pub(super) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl TimeRange {
    /// Everything.
    pub fn all() -> TimeRange {
        TimeRange::default()
    }

    /// The last `d` before now.
    pub fn last(d: Duration) -> TimeRange {
        TimeRange {
            from_unix_ns: Some(
                now_unix_ns().saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            ),
            to_unix_ns: None,
        }
    }

    fn bounds(self) -> (u64, u64) {
        (
            self.from_unix_ns.unwrap_or(0),
            self.to_unix_ns.unwrap_or(u64::MAX),
        )
    }

    /// Parses a time for the CLI: RFC 3339, or an age before now (`2h`).
    pub fn parse_time(s: &str) -> Result<u64, HistoryError> {
        if let Ok(age) = humantime::parse_duration(s) {
            return Ok(
                now_unix_ns().saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX))
            );
        }
        humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            // Past 2554 does not fit the nanosecond clock: a bad time, not a wrapped one.
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .ok_or_else(|| HistoryError::BadTime(s.to_owned()))
    }
}

/// Which history to read: a time range, and optionally one host and device
/// (names as in segment keys: `dev-loop0`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub range: TimeRange,
    pub host: Option<String>,
    pub device: Option<String>,
}

/// A stored segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub key: SegmentKey,
    /// Size of the segment object.
    pub bytes: u64,
    /// Size of its summary object, if it has one.
    pub summary_bytes: Option<u64>,
    /// Size of its Parquet table, if it has one.
    pub table_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Trace,
    Summary,
    /// The segment's Parquet table: for other tools, never read back here.
    Table,
}

/// One listed object of the history.
pub(super) struct StoredObject {
    pub key: SegmentKey,
    pub kind: Kind,
    pub path: ObjectPath,
    pub size: u64,
}

impl HistoryStore {
    /// Every segment, summary and table object under the prefix (or one host / device).
    pub(super) async fn objects(
        &self,
        host: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<StoredObject>, HistoryError> {
        let mut parts = Vec::new();
        parts.extend(host);
        if host.is_some() {
            parts.extend(device);
        }
        let prefix = self.path(parts);
        let listed: Vec<object_store::ObjectMeta> =
            match self.store.list(Some(&prefix)).try_collect().await {
                Ok(l) => l,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(source) => {
                    return Err(HistoryError::Store {
                        op: "list",
                        path: prefix.to_string(),
                        source,
                    });
                }
            };
        let mut out = Vec::new();
        for meta in listed {
            let Some(rel) = self.relative(&meta.location) else {
                continue;
            };
            let [h, d, name] = rel.as_slice() else {
                continue;
            };
            if device.is_some_and(|want| want != d) {
                continue;
            }
            let (stem, kind) = if let Some(s) = name.strip_suffix(".trace") {
                (s, Kind::Trace)
            } else if let Some(s) = name.strip_suffix(".json") {
                (s, Kind::Summary)
            } else if let Some(s) = name.strip_suffix(".parquet") {
                (s, Kind::Table)
            } else {
                continue;
            };
            if let Some(key) = SegmentKey::from_stem(h, d, stem) {
                out.push(StoredObject {
                    key,
                    kind,
                    path: meta.location,
                    size: meta.size,
                });
            }
        }
        Ok(out)
    }

    /// Segments whose window overlaps the query's range, by host, device and time.
    pub async fn segments(&self, query: &Query) -> Result<Vec<SegmentInfo>, HistoryError> {
        let (from, to) = query.range.bounds();
        let objects = self
            .objects(query.host.as_deref(), query.device.as_deref())
            .await?;
        let mut by_stem: std::collections::BTreeMap<SegmentKey, SegmentInfo> =
            std::collections::BTreeMap::new();
        let mut beside = Vec::new();
        for o in objects {
            match o.kind {
                Kind::Trace => {
                    by_stem.insert(
                        o.key.clone(),
                        SegmentInfo {
                            key: o.key,
                            bytes: o.size,
                            summary_bytes: None,
                            table_bytes: None,
                        },
                    );
                }
                Kind::Summary | Kind::Table => beside.push(o),
            }
        }
        for o in beside {
            if let Some(s) = by_stem.get_mut(&o.key) {
                match o.kind {
                    Kind::Summary => s.summary_bytes = Some(o.size),
                    Kind::Table => s.table_bytes = Some(o.size),
                    Kind::Trace => {}
                }
            }
        }
        let mut out: Vec<SegmentInfo> = by_stem
            .into_values()
            .filter(|s| s.key.overlaps(from, to))
            .collect();
        out.sort_by(|a, b| {
            (
                &a.key.host,
                &a.key.device,
                a.key.start_unix_ns,
                a.key.session,
                a.key.seq,
            )
                .cmp(&(
                    &b.key.host,
                    &b.key.device,
                    b.key.start_unix_ns,
                    b.key.session,
                    b.key.seq,
                ))
        });
        Ok(out)
    }

    fn object(&self, key: &SegmentKey, ext: &str) -> ObjectPath {
        let name = format!("{}.{ext}", key.stem());
        self.path([key.host.as_str(), key.device.as_str(), name.as_str()])
    }

    async fn get_bytes(&self, path: &ObjectPath) -> Result<Bytes, HistoryError> {
        let err = |source| HistoryError::Store {
            op: "get",
            path: path.to_string(),
            source,
        };
        self.store
            .get(path)
            .await
            .map_err(err)?
            .bytes()
            .await
            .map_err(err)
    }

    /// The segment's bytes: a trace file (`tern trace stat` reads it).
    pub async fn segment(&self, key: &SegmentKey) -> Result<Bytes, HistoryError> {
        self.get_bytes(&self.object(key, "trace")).await
    }

    /// The segment's summary.
    pub async fn summary(&self, key: &SegmentKey) -> Result<WindowSummary, HistoryError> {
        let bytes = self.get_bytes(&self.object(key, "json")).await?;
        serde_json::from_slice(&bytes).map_err(|source| HistoryError::Summary {
            name: key.stem(),
            source,
        })
    }

    /// The summaries of the segments in the query, in time order (segments
    /// without one, or with a corrupt one, are skipped; a corrupt one with a warning).
    pub async fn summaries(&self, query: &Query) -> Result<Vec<WindowSummary>, HistoryError> {
        let mut out = Vec::new();
        for s in self.segments(query).await? {
            if s.summary_bytes.is_some() {
                match self.summary(&s.key).await {
                    Ok(summary) => out.push(summary),
                    // A corrupt summary is left out, not the whole history.
                    Err(e @ HistoryError::Summary { .. }) => {
                        tracing::warn!(error = %e, "a corrupt window summary is skipped");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// The records of the query's range as one stream; see [`RecordStream`].
    pub async fn records(&self, query: &Query) -> Result<RecordStream, HistoryError> {
        let all = self
            .segments(&Query {
                range: TimeRange::all(),
                ..query.clone()
            })
            .await?;
        let mut devices: Vec<String> = all
            .iter()
            .map(|s| format!("{}/{}", s.key.host, s.key.device))
            .collect();
        devices.dedup();
        if devices.len() > 1 {
            return Err(HistoryError::SeveralDevices {
                url: self.url().to_owned(),
                devices: devices.join(", "),
            });
        }
        let (from, to) = query.range.bounds();
        // The segment after the range holds requests issued in it that completed after it.
        let mut selected = VecDeque::new();
        let mut after = false;
        for s in all {
            if s.key.overlaps(from, to) {
                selected.push_back(s);
            } else if !selected.is_empty() && !after && s.key.start_unix_ns >= to {
                selected.push_back(s);
                after = true;
            }
        }
        let mut stream = RecordStream {
            store: self.clone(),
            segments: selected,
            header: None,
            from,
            to,
            current: None,
            prev: None,
            pending: None,
            synthesized_gaps: 0,
            corrupt_segments: 0,
        };
        stream.load_next().await?;
        Ok(stream)
    }
}

/// The segment being read.
struct Current {
    name: String,
    reader: TraceReader<Cursor<Bytes>>,
    session: u64,
    /// Segment target index → stream target index.
    targets: Vec<u16>,
    /// The same for CPU targets.
    cpu_targets: Vec<u16>,
    /// The segment's window (wall clock) and its last record's time: a
    /// corrupt rest of it becomes a gap from there to the window's end.
    window_end: u64,
    last_wall: u64,
}

/// History as one trace: [`RecordStream::header`] is the first segment's
/// header (targets grow if a later session traced more), and record
/// timestamps count from its `start_wall_unix_ns`. Block, fault, gap and
/// process records come out in segment order; the per-segment end records do
/// not. Time the tracer did not watch (between sessions, or a segment gone
/// missing) comes out as a gap with zero lost counts, never as idle time.
/// Memory: one segment at a time.
pub struct RecordStream {
    store: HistoryStore,
    segments: VecDeque<SegmentInfo>,
    header: Option<TraceHeader>,
    from: u64,
    to: u64,
    current: Option<Current>,
    /// Session, sequence and window end of the last segment read.
    prev: Option<(u64, u64, u64)>,
    pending: Option<Record>,
    synthesized_gaps: u64,
    /// Segments (or their tails) that could not be read, skipped as gaps.
    corrupt_segments: u64,
}

impl RecordStream {
    /// The stream's header; `None` when the range holds no segment.
    pub fn header(&self) -> Option<&TraceHeader> {
        self.header.as_ref()
    }

    /// Gaps made for unwatched time so far.
    pub fn synthesized_gaps(&self) -> u64 {
        self.synthesized_gaps
    }

    /// Segments found corrupt so far (each one's unreadable part came out
    /// as a gap, with a warning).
    pub fn corrupt_segments(&self) -> u64 {
        self.corrupt_segments
    }

    /// A gap over `[start, end)` (wall clock) clipped to the range, for a
    /// segment or its tail that could not be read.
    fn corrupt_gap(&mut self, name: &str, error: &dyn std::fmt::Display, start: u64, end: u64) {
        tracing::warn!(segment = name, %error, "a corrupt history segment: what could not be read comes out as a gap");
        self.corrupt_segments += 1;
        let (start, end) = (start.max(self.from), end.min(self.to));
        if start < end {
            let base = self.base();
            self.pending = Some(Record::Gap(Gap {
                start_ns: start.saturating_sub(base),
                end_ns: end.saturating_sub(base),
                lost_block: 0,
                lost_fault: 0,
            }));
            self.synthesized_gaps += 1;
        }
    }

    fn base(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| h.start_wall_unix_ns)
    }

    /// Downloads the next segment; false when there is none.
    async fn load_next(&mut self) -> Result<bool, HistoryError> {
        let Some(seg) = self.segments.pop_front() else {
            return Ok(false);
        };
        let name = seg.key.stem();
        let bytes = self.store.segment(&seg.key).await?;
        let reader = match TraceReader::new(Cursor::new(bytes)) {
            Ok(reader) => reader,
            Err(e) => {
                // A header that cannot be read: the whole window is a gap
                // (once a header is known to count time from).
                if self.header.is_some() {
                    self.prev = Some((seg.key.session, seg.key.seq, seg.key.end_unix_ns));
                    self.corrupt_gap(&name, &e, seg.key.start_unix_ns, seg.key.end_unix_ns);
                } else {
                    tracing::warn!(segment = %name, error = %e, "a corrupt history segment is skipped");
                    self.corrupt_segments += 1;
                }
                return Ok(true);
            }
        };
        let header = self.header.get_or_insert_with(|| reader.header().clone());
        let targets = reader
            .header()
            .targets
            .iter()
            .map(|t| {
                let i = header
                    .targets
                    .iter()
                    .position(|have| have.name == t.name)
                    .unwrap_or_else(|| {
                        header.targets.push(t.clone());
                        header.targets.len() - 1
                    });
                // Records name their target by a u16 index.
                u16::try_from(i).map_err(|_| HistoryError::TooManyTargets { name: name.clone() })
            })
            .collect::<Result<_, _>>()?;
        let cpu_targets = reader
            .header()
            .cpu_targets
            .iter()
            .map(|t| {
                let i = header
                    .cpu_targets
                    .iter()
                    .position(|have| have == t)
                    .unwrap_or_else(|| {
                        header.cpu_targets.push(t.clone());
                        header.cpu_targets.len() - 1
                    });
                u16::try_from(i).map_err(|_| HistoryError::TooManyTargets { name: name.clone() })
            })
            .collect::<Result<_, _>>()?;
        if header.host_cpus == 0 {
            header.host_cpus = reader.header().host_cpus;
        }
        let key = &seg.key;
        if let Some((session, seq, end)) = self.prev {
            let contiguous = key.session == session && key.seq == seq + 1;
            if !contiguous
                && key.start_unix_ns > end
                && end < self.to
                && key.start_unix_ns > self.from
            {
                let base = self.base();
                self.pending = Some(Record::Gap(Gap {
                    start_ns: end.saturating_sub(base),
                    end_ns: key.start_unix_ns.saturating_sub(base),
                    lost_block: 0,
                    lost_fault: 0,
                }));
                self.synthesized_gaps += 1;
            }
        }
        self.prev = Some((key.session, key.seq, key.end_unix_ns));
        self.current = Some(Current {
            name,
            reader,
            session: key.session,
            targets,
            cpu_targets,
            window_end: key.end_unix_ns,
            last_wall: key.start_unix_ns,
        });
        Ok(true)
    }

    /// The next record, or `None` at the end of the range.
    pub async fn next_record(&mut self) -> Result<Option<Record>, HistoryError> {
        loop {
            if let Some(gap) = self.pending.take() {
                return Ok(Some(gap));
            }
            let base = self.base();
            let (from, to) = (self.from, self.to);
            let Some(cur) = self.current.as_mut() else {
                if self.load_next().await? {
                    continue;
                }
                return Ok(None);
            };
            let rec = match cur.reader.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // A segment cut short: what it did not hold is a gap.
                    let cut = cur.reader.cut_at();
                    let (name, start, end) = (cur.name.clone(), cur.last_wall, cur.window_end);
                    self.current = None;
                    if let Some(at) = cut {
                        let error = format!("the segment is cut at byte {at}");
                        self.corrupt_gap(&name, &error, start, end);
                    }
                    continue;
                }
                Err(source) => {
                    // The rest of this segment is unreadable: a gap stands
                    // for it, and the next segment is read.
                    let (name, start, end) = (cur.name.clone(), cur.last_wall, cur.window_end);
                    self.current = None;
                    self.corrupt_gap(&name, &source, start, end);
                    continue;
                }
            };
            if matches!(rec, Record::Block(_) | Record::Fault(_) | Record::Cpu(_)) {
                cur.last_wall = cur.last_wall.max(cur.session.saturating_add(rec.ts_ns()));
            }
            let session = cur.session;
            let targets = &cur.targets;
            let cpu_targets = &cur.cpu_targets;
            let wall = |ts: u64| session.saturating_add(ts);
            let rebase = |ts: u64| wall(ts).saturating_sub(base);
            let rec = match rec {
                Record::End(_) => continue,
                Record::Gap(g) => {
                    if wall(g.end_ns) <= from || wall(g.start_ns) >= to {
                        continue;
                    }
                    Record::Gap(Gap {
                        start_ns: rebase(g.start_ns),
                        end_ns: rebase(g.end_ns),
                        ..g
                    })
                }
                Record::Process(mut p) => {
                    // Names are kept from before the range: later records refer to them.
                    if wall(p.ts_ns) >= to {
                        continue;
                    }
                    p.ts_ns = rebase(p.ts_ns);
                    Record::Process(p)
                }
                Record::Block(mut b) => {
                    if !(from..to).contains(&wall(b.ts_ns)) {
                        continue;
                    }
                    b.ts_ns = rebase(b.ts_ns);
                    b.target = targets
                        .get(usize::from(b.target))
                        .copied()
                        .unwrap_or(b.target);
                    Record::Block(b)
                }
                Record::Fault(mut f) => {
                    if !(from..to).contains(&wall(f.ts_ns)) {
                        continue;
                    }
                    f.ts_ns = rebase(f.ts_ns);
                    Record::Fault(f)
                }
                Record::Cpu(mut c) => {
                    if !(from..to).contains(&wall(c.ts_ns)) {
                        continue;
                    }
                    c.ts_ns = rebase(c.ts_ns);
                    c.target = cpu_targets
                        .get(usize::from(c.target))
                        .copied()
                        .unwrap_or(c.target);
                    Record::Cpu(c)
                }
            };
            return Ok(Some(rec));
        }
    }
}

/// History as a blocking iterator of records, for code that is not async
/// (the analyzer, the predictor, the CLI). It runs its own small runtime: use
/// it from a plain thread or `spawn_blocking`, not from inside async code
/// (there, use [`HistoryStore::records`]).
pub struct HistoryReader {
    runtime: tokio::runtime::Runtime,
    stream: RecordStream,
    done: bool,
}

impl HistoryReader {
    /// Opens the history at `url` (see [`HistoryStore::open`]) for `query`.
    pub fn open(url: &str, query: &Query) -> Result<HistoryReader, HistoryError> {
        let opts = StoreOptions {
            create_dir: false,
            ..StoreOptions::default()
        };
        HistoryReader::open_with(url, &opts, query)
    }

    /// [`HistoryReader::open`] with explicit store options.
    pub fn open_with(
        url: &str,
        opts: &StoreOptions,
        query: &Query,
    ) -> Result<HistoryReader, HistoryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(HistoryError::Runtime)?;
        // The store's connections belong to this runtime: build it here.
        let store = HistoryStore::open_with(url, opts)?;
        let stream = runtime.block_on(store.records(query))?;
        Ok(HistoryReader {
            runtime,
            stream,
            done: false,
        })
    }

    /// The header of the history as one trace; `None` when the range is empty.
    pub fn header(&self) -> Option<&TraceHeader> {
        self.stream.header()
    }

    /// Gaps made for time the tracer did not watch, so far.
    pub fn synthesized_gaps(&self) -> u64 {
        self.stream.synthesized_gaps()
    }
}

impl Iterator for HistoryReader {
    type Item = Result<Record, HistoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.runtime.block_on(self.stream.next_record());
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}
