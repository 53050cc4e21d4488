//! Rolling the tracer's records into segments in the spool directory.
//!
//! Windows are contiguous within a tracing session: segment `n` covers
//! `[start, end)` and segment `n + 1` starts at that `end`, so every moment
//! of a session is in exactly one window (a quiet window gives an empty
//! segment). A record goes into the window open when it arrives; block
//! requests are recorded at completion with their issue time, so a segment may
//! hold records a little older than its start, never any at or after its end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::HistoryError;
use super::key::{SegmentKey, sanitize};
use crate::trace::format::TraceHeader;
use crate::trace::record::{EndRecord, Gap, Record};
use crate::trace::session::Observer;
use crate::trace::tracer::monotonic_ns;
use crate::trace::{TraceFileError, TraceWriter};

/// When a segment is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollPolicy {
    /// Window length.
    pub every: Duration,
    /// A segment closes early once its file reaches this size.
    pub max_bytes: u64,
}

impl Default for RollPolicy {
    fn default() -> Self {
        RollPolicy {
            every: Duration::from_mins(1),
            max_bytes: 32 << 20,
        }
    }
}

/// The open segment.
struct Open {
    writer: TraceWriter<File>,
    path: PathBuf,
    start: u64,
    /// Nominal end: a record at or after it closes the segment first.
    end: u64,
    /// Largest record timestamp so far (a gap counts by its start).
    max_ts: Option<u64>,
    totals: EndRecord,
}

/// Writes one session's records into spool segments (see the module doc).
pub struct SegmentWriter {
    dir: PathBuf,
    host: String,
    device: String,
    header: TraceHeader,
    session: u64,
    policy: RollPolicy,
    seq: u64,
    /// Session-relative start of the next window.
    next_start: u64,
    open: Option<Open>,
    /// Records that could not be spooled: written as a gap into the next segment.
    lost: Option<Gap>,
    closed: u64,
    on_close: Option<Arc<dyn Fn() + Send + Sync>>,
}

fn spool_err(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Spool {
        path: path.to_owned(),
        source,
    }
}

fn file_err(path: &Path) -> impl FnOnce(TraceFileError) -> HistoryError + '_ {
    move |source| HistoryError::Segment {
        name: path.display().to_string(),
        source,
    }
}

/// The device part of segment names for a session's targets.
pub(super) fn device_name(header: &TraceHeader) -> String {
    let names: Vec<&str> = header.targets.iter().map(|t| t.name.as_str()).collect();
    sanitize(&names.join("+"))
}

/// The part-file name of an open segment: session, sequence, session-relative start.
pub(super) fn part_name(session: u64, seq: u64, start: u64) -> String {
    format!("{session:016x}_{seq:06}_{start:020}.part")
}

/// Parses [`part_name`].
pub(super) fn parse_part_name(name: &str) -> Option<(u64, u64, u64)> {
    let stem = name.strip_suffix(".part")?;
    let mut parts = stem.split('_');
    let session = u64::from_str_radix(parts.next()?, 16).ok()?;
    let seq = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((session, seq, start))
}

/// The spool directory of a host and device.
pub(super) fn spool_dir(root: &Path, host: &str, device: &str) -> PathBuf {
    root.join(host).join(device)
}

impl SegmentWriter {
    /// A writer for the session `header` describes, spooling under `spool_root`.
    pub fn new(
        spool_root: &Path,
        header: TraceHeader,
        policy: RollPolicy,
    ) -> Result<SegmentWriter, HistoryError> {
        let host = sanitize(&header.hostname);
        let device = device_name(&header);
        let dir = spool_dir(spool_root, &host, &device);
        std::fs::create_dir_all(&dir).map_err(spool_err(&dir))?;
        Ok(SegmentWriter {
            dir,
            host,
            device,
            session: header.start_wall_unix_ns,
            header,
            policy: RollPolicy {
                every: policy.every.max(Duration::from_millis(1)),
                max_bytes: policy.max_bytes.max(1),
            },
            seq: 0,
            next_start: 0,
            open: None,
            lost: None,
            closed: 0,
            on_close: None,
        })
    }

    /// Calls `f` after each segment is closed (the uploader's wake-up).
    pub fn on_close(&mut self, f: Arc<dyn Fn() + Send + Sync>) {
        self.on_close = Some(f);
    }

    /// The tracing session, as named in segment keys.
    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Segments closed so far.
    pub fn closed(&self) -> u64 {
        self.closed
    }

    fn period(&self) -> u64 {
        u64::try_from(self.policy.every.as_nanos()).map_or(u64::MAX / 4, |ns| ns.min(u64::MAX / 4))
    }

    /// Opens the window starting at `next_start` that holds `ts`.
    fn open_for(&mut self, ts: u64) -> Result<(), HistoryError> {
        let start = self.next_start;
        let period = self.period();
        let windows = if ts >= start {
            (ts - start) / period + 1
        } else {
            1
        };
        let end = start.saturating_add(windows.saturating_mul(period));
        let path = self.dir.join(part_name(self.session, self.seq, start));
        let file = File::create(&path).map_err(spool_err(&path))?;
        let writer = TraceWriter::new(file, &self.header).map_err(file_err(&path))?;
        self.open = Some(Open {
            writer,
            path,
            start,
            end,
            max_ts: None,
            totals: EndRecord::default(),
        });
        Ok(())
    }

    /// Closes the open segment at session-relative `end` and hands it to the uploader.
    fn close(&mut self, end: u64) -> Result<(), HistoryError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let end = end.max(open.start);
        self.next_start = end;
        self.seq += 1;
        let key = SegmentKey {
            host: self.host.clone(),
            device: self.device.clone(),
            start_unix_ns: self.session.saturating_add(open.start),
            end_unix_ns: self.session.saturating_add(end),
            session: self.session,
            seq: self.seq - 1,
        };
        let totals = EndRecord {
            ts_ns: end,
            ..open.totals
        };
        open.writer.finish(totals).map_err(file_err(&open.path))?;
        let done = self.dir.join(format!("{}.trace", key.stem()));
        std::fs::rename(&open.path, &done).map_err(spool_err(&open.path))?;
        self.closed += 1;
        if let Some(f) = &self.on_close {
            f();
        }
        Ok(())
    }

    /// Adds a record, closing and opening segments as its time requires.
    /// On an error the record is counted in a gap written into the next segment.
    pub fn push(&mut self, rec: &Record) -> Result<(), HistoryError> {
        let ts = rec.ts_ns();
        let result = self.try_push(rec, ts);
        if result.is_err() {
            // The open segment may be broken: keep what reached it, count this record as lost.
            let end = self
                .open
                .as_ref()
                .map(|o| o.max_ts.map_or(o.start, |t| t + 1));
            if let Some(end) = end {
                let _ = self.close(end);
                self.open = None;
            }
            let end = match rec {
                Record::Gap(g) => g.end_ns,
                _ => ts,
            };
            let (lost_block, lost_fault) = match rec {
                Record::Block(_) => (1, 0),
                Record::Fault(_) => (0, 1),
                Record::Gap(g) => (g.lost_block, g.lost_fault),
                _ => (0, 0),
            };
            let gap = self.lost.get_or_insert(Gap {
                start_ns: ts,
                end_ns: end,
                lost_block: 0,
                lost_fault: 0,
            });
            gap.start_ns = gap.start_ns.min(ts);
            gap.end_ns = gap.end_ns.max(end);
            gap.lost_block += lost_block;
            gap.lost_fault += lost_fault;
        }
        result
    }

    fn try_push(&mut self, rec: &Record, ts: u64) -> Result<(), HistoryError> {
        if let Some(open) = &self.open {
            if ts >= open.end {
                let end = open.end;
                self.close(end)?;
            } else if open.writer.bytes_written() >= self.policy.max_bytes {
                let end = open
                    .max_ts
                    .map_or(ts, |m| m.saturating_add(1).max(ts))
                    .clamp(open.start, open.end);
                self.close(end)?;
            }
        }
        if self.open.is_none() {
            self.open_for(ts)?;
        }
        let open = self.open.as_mut().expect("a segment was opened above");
        if let Some(gap) = self.lost.take() {
            open.writer
                .push(&Record::Gap(gap))
                .map_err(file_err(&open.path))?;
            open.totals.lost_events += gap.lost_block + gap.lost_fault;
        }
        open.writer.push(rec).map_err(file_err(&open.path))?;
        open.max_ts = Some(open.max_ts.map_or(ts, |m| m.max(ts)));
        match rec {
            Record::Block(_) => open.totals.block_events += 1,
            Record::Fault(_) => open.totals.fault_events += 1,
            Record::Gap(g) => open.totals.lost_events += g.lost_block + g.lost_fault,
            Record::Process(_) | Record::Cpu(_) | Record::End(_) => {}
        }
        Ok(())
    }

    /// Once a second: flushes the open segment (a crash loses at most that
    /// much) and closes every window that ended by session-relative `now`,
    /// writing an empty segment for a quiet one.
    pub fn tick(&mut self, now: u64) -> Result<(), HistoryError> {
        if let Some(open) = &mut self.open {
            if now >= open.end {
                let end = open.end;
                return self.close(end);
            }
            return open.writer.flush().map_err(file_err(&open.path));
        }
        let period = self.period();
        if now >= self.next_start.saturating_add(period) {
            let windows = (now - self.next_start) / period;
            self.open_for(self.next_start)?;
            let end = self.next_start + windows * period;
            self.close(end)?;
        }
        Ok(())
    }

    /// Closes the last window at session-relative `now` (the session's end).
    pub fn finish(&mut self, now: u64) -> Result<(), HistoryError> {
        match &self.open {
            Some(open) => {
                let end = now.max(open.max_ts.map_or(0, |t| t + 1));
                self.close(end)
            }
            None if now > self.next_start => {
                self.open_for(self.next_start)?;
                self.close(now)
            }
            None => Ok(()),
        }
    }
}

/// The history writer of a source agent: builds the [`SegmentWriter`] once
/// the tracer knows its header, feeds it from the tracer's thread, and lets the
/// uploader tick it. Cheap to clone.
#[derive(Clone, Default)]
pub struct HistoryWriter {
    slot: Arc<Mutex<Option<SegmentWriter>>>,
}

/// Finishes the writer when the tracer drops its observer (the session ended).
struct FinishOnDrop(HistoryWriter);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

fn session_now(header: &TraceHeader) -> u64 {
    monotonic_ns().saturating_sub(header.start_monotonic_ns)
}

impl HistoryWriter {
    /// The tracer's observer for the session `header` describes, spooling
    /// under `spool_root`; `on_close` wakes the uploader.
    pub fn observer(
        &self,
        spool_root: &Path,
        header: &TraceHeader,
        policy: RollPolicy,
        on_close: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Observer, HistoryError> {
        let mut writer = SegmentWriter::new(spool_root, header.clone(), policy)?;
        writer.on_close(on_close);
        *self.slot.lock().expect("history writer lock poisoned") = Some(writer);
        let guard = FinishOnDrop(self.clone());
        let mut failing = false;
        Ok(Box::new(move |rec| {
            let mut slot = guard.0.slot.lock().expect("history writer lock poisoned");
            let Some(writer) = slot.as_mut() else {
                return;
            };
            match writer.push(rec) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot spool history records; they are counted in a gap until the spool works again");
                }
                Err(_) => {}
            }
        }))
    }

    /// The session being written, if any.
    pub fn session(&self) -> Option<u64> {
        self.slot
            .lock()
            .expect("history writer lock poisoned")
            .as_ref()
            .map(SegmentWriter::session)
    }

    /// The host and device being written (as named in keys), if any.
    pub fn scope(&self) -> Option<(String, String)> {
        self.slot
            .lock()
            .expect("history writer lock poisoned")
            .as_ref()
            .map(|w| (w.host.clone(), w.device.clone()))
    }

    /// Flushes and closes due windows, on the session's clock.
    pub fn tick(&self) -> Result<(), HistoryError> {
        let mut slot = self.slot.lock().expect("history writer lock poisoned");
        match slot.as_mut() {
            Some(w) => {
                let now = session_now(&w.header);
                w.tick(now)
            }
            None => Ok(()),
        }
    }

    /// Closes the last segment; later records are not written.
    pub fn finish(&self) {
        let writer = self
            .slot
            .lock()
            .expect("history writer lock poisoned")
            .take();
        if let Some(mut w) = writer {
            let now = session_now(&w.header);
            if let Err(e) = w.finish(now) {
                tracing::warn!(error = %e, "cannot close the last history segment; it stays in the spool and is recovered at the next start");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trace::TraceReader;
    use crate::trace::format::tests::header;
    use crate::trace::record::{BlockRecord, Op};

    pub(crate) fn block(ts_ns: u64, offset: u64) -> Record {
        Record::Block(BlockRecord {
            ts_ns,
            offset,
            latency_ns: 1000,
            len: 4096,
            pid: 7,
            flags: 0,
            target: 0,
            op: Op::Write,
        })
    }

    fn closed(dir: &Path) -> Vec<(SegmentKey, Vec<Record>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("spool dir lists") {
            let path = e.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8");
            let Some(stem) = name.strip_suffix(".trace") else {
                continue;
            };
            let key = SegmentKey::from_stem("h", "dev-loop0", stem).expect("a valid stem");
            let reader = TraceReader::new(File::open(&path).expect("opens")).expect("a trace");
            let records = reader.collect::<Result<Vec<_>, _>>().expect("reads");
            out.push((key, records));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn windows_are_contiguous_and_records_land_in_their_window() {
        let dir = tempfile::tempdir().expect("temp dir");
        let h = header(1);
        let session = h.start_wall_unix_ns;
        let mut w = SegmentWriter::new(
            dir.path(),
            h,
            RollPolicy {
                every: Duration::from_secs(10),
                max_bytes: 1 << 30,
            },
        )
        .expect("writer");
        for ts in [S, 5 * S, 12 * S, 11 * S, 45 * S] {
            w.push(&block(ts, ts)).expect("push");
        }
        w.tick(47 * S).expect("tick");
        w.tick(50 * S).expect("tick closes the window that ended");
        w.tick(75 * S)
            .expect("tick writes an empty segment for a quiet window");
        w.finish(78 * S).expect("finish");
        let segs = closed(&dir.path().join("h").join("dev-loop0"));
        let windows: Vec<(u64, u64, u64)> = segs
            .iter()
            .map(|(k, _)| {
                (
                    (k.start_unix_ns - session) / S,
                    (k.end_unix_ns - session) / S,
                    k.seq,
                )
            })
            .collect();
        assert_eq!(
            windows,
            vec![
                (0, 10, 0),
                (10, 20, 1),
                (20, 50, 2),
                (50, 70, 3),
                (70, 78, 4)
            ]
        );
        let ts = |recs: &[Record]| -> Vec<u64> {
            recs.iter()
                .filter(|r| !matches!(r, Record::End(_)))
                .map(|r| r.ts_ns() / S)
                .collect()
        };
        assert_eq!(ts(&segs[0].1), vec![1, 5]);
        assert_eq!(ts(&segs[1].1), vec![12, 11]);
        assert_eq!(ts(&segs[2].1), vec![45]);
        assert!(ts(&segs[3].1).is_empty());
        for (_, recs) in &segs {
            assert!(matches!(recs.last(), Some(Record::End(_))));
        }
    }

    #[test]
    fn a_full_segment_closes_early_without_losing_a_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = SegmentWriter::new(
            dir.path(),
            header(1),
            RollPolicy {
                every: Duration::from_hours(1),
                max_bytes: 256 << 10,
            },
        )
        .expect("writer");
        let n = 100_000u64;
        for i in 0..n {
            w.push(&block(i * 1000, i * 4096)).expect("push");
        }
        w.finish(n * 1000).expect("finish");
        let segs = closed(&dir.path().join("h").join("dev-loop0"));
        assert!(segs.len() >= 4, "{} segments", segs.len());
        let mut all = Vec::new();
        for w in segs.windows(2) {
            assert_eq!(w[0].0.end_unix_ns, w[1].0.start_unix_ns);
        }
        for (_, recs) in segs {
            all.extend(recs.into_iter().filter(|r| !matches!(r, Record::End(_))));
        }
        let want: Vec<Record> = (0..n).map(|i| block(i * 1000, i * 4096)).collect();
        assert_eq!(all, want);
    }

    #[test]
    fn part_names_round_trip() {
        let name = part_name(0xabc, 12, 99);
        assert_eq!(parse_part_name(&name), Some((0xabc, 12, 99)));
        assert_eq!(parse_part_name("x.part"), None);
        assert_eq!(parse_part_name(&name.replace(".part", ".trace")), None);
    }
}
