//! The local spool: closed segments wait here until the store has them.
//!
//! `ROOT/HOST/DEVICE/` holds `SESSION_SEQ_START.part` (the open segment),
//! `STEM.trace` (closed, waiting), `STEM.json` (its summary, once computed),
//! `STEM.parquet` (its Parquet table, once made) and `STEM.upload.json` (a
//! multipart upload in progress). A `.part` left by a session that died is
//! salvaged: its readable records become a closed segment.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::HistoryError;
use super::key::SegmentKey;
use super::writer::parse_part_name;
use crate::trace::record::{EndRecord, Gap, Record};
use crate::trace::{TraceReader, TraceWriter};

/// A closed segment waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SpoolEntry {
    pub key: SegmentKey,
    pub dir: PathBuf,
}

impl SpoolEntry {
    pub fn trace(&self) -> PathBuf {
        self.dir.join(format!("{}.trace", self.key.stem()))
    }
    pub fn summary(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.key.stem()))
    }
    /// Its Parquet table, once made.
    pub fn table(&self) -> PathBuf {
        self.dir.join(format!("{}.parquet", self.key.stem()))
    }
    /// Its Parquet table being written.
    pub fn table_tmp(&self) -> PathBuf {
        self.dir.join(format!("{}.parquet.tmp", self.key.stem()))
    }
    pub fn upload_state(&self) -> PathBuf {
        self.dir.join(format!("{}.upload.json", self.key.stem()))
    }
}

fn spool_err(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Spool {
        path: path.to_owned(),
        source,
    }
}

/// `(host, device, dir)` for every device directory under `root`.
fn device_dirs(root: &Path) -> Result<Vec<(String, String, PathBuf)>, HistoryError> {
    let mut out = Vec::new();
    let hosts = match std::fs::read_dir(root) {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(spool_err(root)(e)),
    };
    for host in hosts {
        let host = host.map_err(spool_err(root))?;
        if !host.file_type().map_err(spool_err(root))?.is_dir() {
            continue;
        }
        let host_name = host.file_name().to_string_lossy().into_owned();
        for dev in std::fs::read_dir(host.path()).map_err(spool_err(&host.path()))? {
            let dev = dev.map_err(spool_err(&host.path()))?;
            if dev.file_type().map_err(spool_err(&dev.path()))?.is_dir() {
                out.push((
                    host_name.clone(),
                    dev.file_name().to_string_lossy().into_owned(),
                    dev.path(),
                ));
            }
        }
    }
    Ok(out)
}

/// Closed segments in the spool, oldest window first.
pub(super) fn ready(root: &Path) -> Result<Vec<SpoolEntry>, HistoryError> {
    let mut out = Vec::new();
    for (host, device, dir) in device_dirs(root)? {
        for e in std::fs::read_dir(&dir).map_err(spool_err(&dir))? {
            let e = e.map_err(spool_err(&dir))?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".trace")) else {
                continue;
            };
            if let Some(key) = SegmentKey::from_stem(&host, &device, stem) {
                out.push(SpoolEntry {
                    key,
                    dir: dir.clone(),
                });
            }
        }
    }
    out.sort_by(|a, b| (a.key.start_unix_ns, &a.key).cmp(&(b.key.start_unix_ns, &b.key)));
    Ok(out)
}

/// Bytes held in the spool (segments, summaries, open parts).
pub(super) fn bytes(root: &Path) -> Result<u64, HistoryError> {
    let mut total = 0;
    for (_, _, dir) in device_dirs(root)? {
        for e in std::fs::read_dir(&dir).map_err(spool_err(&dir))? {
            let e = e.map_err(spool_err(&dir))?;
            total += e.metadata().map_err(spool_err(&e.path()))?.len();
        }
    }
    Ok(total)
}

/// What [`copy_readable`] found.
struct Copied {
    /// Largest record timestamp (a gap by its start).
    max_ts: Option<u64>,
    totals: EndRecord,
    /// The source ended in a damaged or truncated chunk.
    damaged: bool,
}

/// Copies the readable records of the trace at `src` into a new trace at
/// `dst` (without end records), closed with an end record at `end(max_ts)`,
/// after a gap from the last record to that end if the source was damaged.
/// `None` if `src` has no readable header.
fn copy_readable(
    src: &Path,
    dst: &Path,
    end: impl FnOnce(Option<u64>) -> u64,
) -> Result<Option<Copied>, HistoryError> {
    let file = File::open(src).map_err(spool_err(src))?;
    let Ok(mut reader) = TraceReader::new(file) else {
        return Ok(None);
    };
    let out = File::create(dst).map_err(spool_err(dst))?;
    let seg_err = |source| HistoryError::Segment {
        name: dst.display().to_string(),
        source,
    };
    let mut writer = TraceWriter::new(out, reader.header()).map_err(seg_err)?;
    let mut copied = Copied {
        max_ts: None,
        totals: EndRecord::default(),
        damaged: false,
    };
    loop {
        let rec = match reader.next_record() {
            Ok(Some(r)) => r,
            // A file cut inside a chunk (the usual crash) is damaged too.
            Ok(None) => {
                copied.damaged = reader.cut_at().is_some();
                break;
            }
            Err(_) => {
                copied.damaged = true;
                break;
            }
        };
        match &rec {
            Record::End(_) => continue,
            Record::Block(_) => copied.totals.block_events += 1,
            Record::Fault(_) => copied.totals.fault_events += 1,
            Record::Gap(g) => copied.totals.lost_events += g.lost_block + g.lost_fault,
            Record::Process(_) | Record::Cpu(_) => {}
        }
        copied.max_ts = Some(copied.max_ts.map_or(rec.ts_ns(), |m| m.max(rec.ts_ns())));
        writer.push(&rec).map_err(seg_err)?;
    }
    let end = end(copied.max_ts);
    let last = copied.max_ts.map_or(0, |t| t + 1);
    if copied.damaged && end > last {
        // What the damaged tail held is unknown: say so, do not read it as idle.
        writer
            .push(&Record::Gap(Gap {
                start_ns: last,
                end_ns: end,
                lost_block: 0,
                lost_fault: 0,
            }))
            .map_err(seg_err)?;
    }
    writer
        .finish(EndRecord {
            ts_ns: end,
            ..copied.totals
        })
        .map_err(seg_err)?;
    Ok(Some(copied))
}

/// Turns the `.part` files of sessions not in `live` into closed segments;
/// returns how many. Their window ends after the last readable record.
pub(super) fn salvage(root: &Path, live: &HashSet<u64>) -> Result<u64, HistoryError> {
    let mut salvaged = 0;
    for (host, device, dir) in device_dirs(root)? {
        for e in std::fs::read_dir(&dir).map_err(spool_err(&dir))? {
            let e = e.map_err(spool_err(&dir))?;
            let path = e.path();
            let Some((session, seq, start)) = e.file_name().to_str().and_then(parse_part_name)
            else {
                continue;
            };
            if live.contains(&session) {
                continue;
            }
            let tmp = dir.join(format!("{session:016x}_{seq:06}.salvage"));
            let copied = copy_readable(&path, &tmp, |max| max.map_or(start, |t| t + 1).max(start))?;
            if let Some(c) = copied {
                let end = c.max_ts.map_or(start, |t| t + 1).max(start);
                let key = SegmentKey {
                    host: host.clone(),
                    device: device.clone(),
                    start_unix_ns: session.saturating_add(start),
                    end_unix_ns: session.saturating_add(end),
                    session,
                    seq,
                };
                let entry = SpoolEntry {
                    key,
                    dir: dir.clone(),
                };
                std::fs::rename(&tmp, entry.trace()).map_err(spool_err(&tmp))?;
                tracing::info!(segment = %entry.key.stem(), records = c.totals.block_events + c.totals.fault_events, "salvaged a history segment left open by an earlier run");
                salvaged += 1;
            } else {
                tracing::warn!(file = %path.display(), "an open history segment from an earlier run has no readable header; removing it");
                let _ = std::fs::remove_file(&tmp);
            }
            std::fs::remove_file(&path).map_err(spool_err(&path))?;
        }
    }
    Ok(salvaged)
}

/// Rewrites a closed segment that no longer reads (damaged on the local disk)
/// to its readable records and a gap over the rest of its window.
pub(super) fn repair(entry: &SpoolEntry) -> Result<(), HistoryError> {
    let src = entry.trace();
    let tmp = entry.dir.join(format!("{}.repair", entry.key.stem()));
    let end = entry.key.end_unix_ns.saturating_sub(entry.key.session);
    if copy_readable(&src, &tmp, |_| end)?.is_some() {
        std::fs::rename(&tmp, &src).map_err(spool_err(&tmp))?;
    } else {
        tracing::warn!(segment = %entry.key.stem(), "a spooled history segment has no readable header; dropping it");
        std::fs::remove_file(&src).map_err(spool_err(&src))?;
    }
    Ok(())
}

/// Removes a segment and its side files once the store has it.
pub(super) fn remove(entry: &SpoolEntry) -> Result<(), HistoryError> {
    for path in [
        entry.upload_state(),
        entry.table(),
        entry.table_tmp(),
        entry.summary(),
        entry.trace(),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(spool_err(&path)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::writer::tests::block;
    use crate::history::writer::{RollPolicy, SegmentWriter, part_name};
    use crate::trace::format::tests::header;
    use std::io::Write;

    #[test]
    fn a_part_left_by_a_dead_session_is_salvaged_up_to_its_damage() {
        let root = tempfile::tempdir().expect("temp dir");
        let h = header(1);
        let session = h.start_wall_unix_ns;
        let dir = root.path().join("h").join("dev-loop0");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let part = dir.join(part_name(session, 3, 5_000));
        let mut w = TraceWriter::new(File::create(&part).expect("create"), &h).expect("header");
        for i in 0..10_000u64 {
            w.push(&block(10_000 + i, i)).expect("push");
        }
        w.flush().expect("flush");
        let mut file = w.finish(EndRecord::default()).expect("finish");
        // A torn write at the tail, as a crash leaves it.
        file.write_all(b"TCHK\x10\x00").expect("append");
        drop(file);
        let mut live = HashSet::new();
        live.insert(session);
        assert_eq!(salvage(root.path(), &live).expect("salvage"), 0);
        assert!(part.exists(), "a live session's part is left alone");
        live.clear();
        assert_eq!(salvage(root.path(), &live).expect("salvage"), 1);
        assert!(!part.exists());
        let entries = ready(root.path()).expect("ready");
        assert_eq!(entries.len(), 1);
        let key = &entries[0].key;
        assert_eq!(
            (
                key.seq,
                key.start_unix_ns - session,
                key.end_unix_ns - session
            ),
            (3, 5_000, 20_000)
        );
        let reader =
            TraceReader::new(File::open(entries[0].trace()).expect("open")).expect("a trace");
        let recs: Vec<Record> = reader.collect::<Result<_, _>>().expect("reads");
        let blocks: Vec<&Record> = recs
            .iter()
            .filter(|r| matches!(r, Record::Block(_)))
            .collect();
        assert_eq!(blocks.len(), 10_000);
        assert!(matches!(recs.last(), Some(Record::End(e)) if e.block_events == 10_000));
    }

    #[test]
    fn a_damaged_closed_segment_keeps_its_readable_records_and_marks_the_rest_a_gap() {
        let root = tempfile::tempdir().expect("temp dir");
        let h = header(1);
        let session = h.start_wall_unix_ns;
        let mut w = SegmentWriter::new(
            root.path(),
            h,
            RollPolicy {
                every: std::time::Duration::from_secs(100),
                max_bytes: 1 << 30,
            },
        )
        .expect("writer");
        for i in 0..50_000u64 {
            w.push(&block(i * 1000, i)).expect("push");
        }
        w.finish(90_000_000_000).expect("finish");
        let entry = ready(root.path()).expect("ready").remove(0);
        let len = std::fs::metadata(entry.trace()).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(entry.trace())
            .expect("open");
        f.set_len(len - 100).expect("truncate");
        repair(&entry).expect("repair");
        let reader = TraceReader::new(File::open(entry.trace()).expect("open")).expect("a trace");
        let recs: Vec<Record> = reader
            .collect::<Result<_, _>>()
            .expect("a repaired segment reads");
        let gap = recs
            .iter()
            .find_map(|r| match r {
                Record::Gap(g) => Some(*g),
                _ => None,
            })
            .expect("the lost tail is a gap");
        assert_eq!(gap.end_ns, entry.key.end_unix_ns - session);
        let blocks = recs
            .iter()
            .filter(|r| matches!(r, Record::Block(_)))
            .count();
        assert!(blocks > 40_000 && blocks < 50_000, "{blocks}");
    }
}
