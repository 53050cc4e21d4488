//! Converting a trace to other tools' formats: CSV, and fio's iolog (v3) for replay.

use std::io::{Read, Write};

use super::format::{TraceFileError, TraceReader};
use super::record::{Op, Record, block_flags, fault_flags};

/// Errors exporting a trace.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Trace(#[from] TraceFileError),
    /// Writing the output failed.
    #[error("writing the export failed: {0}")]
    Write(#[from] std::io::Error),
}

/// The CSV columns, in order. Gaps are rows of their own: a gap must stay visible.
pub const CSV_HEADER: &str =
    "kind,ts_ns,end_ns,target,op,offset,len,latency_ns,pid,tid,ip,flags,comm,lost";

pub fn fault_flag_names(flags: u32) -> String {
    let mut v = Vec::new();
    if flags & fault_flags::WRITE != 0 {
        v.push("write");
    }
    if flags & fault_flags::PRESENT != 0 {
        v.push("present");
    }
    if flags & fault_flags::INSTR != 0 {
        v.push("instr");
    }
    v.join("|")
}

/// Writes every record as CSV; returns the number of rows.
pub fn to_csv<R: Read, W: Write>(
    mut reader: TraceReader<R>,
    mut out: W,
) -> Result<u64, ExportError> {
    let header = reader.header().clone();
    let mut comms = std::collections::HashMap::new();
    writeln!(out, "{CSV_HEADER}")?;
    let mut rows = 0;
    while let Some(r) = reader.next_record()? {
        match r {
            Record::Block(b) => {
                let target = header.target(b.target).map_or("?", |t| t.name.as_str());
                let comm: &str = comms.get(&b.pid).map_or("", String::as_str);
                writeln!(
                    out,
                    "block,{},,{},{},{},{},{},{},,,{},{},",
                    b.ts_ns,
                    csv_field(target),
                    b.op.name(),
                    b.offset,
                    b.len,
                    b.latency_ns,
                    b.pid,
                    block_flags::format(b.flags),
                    csv_field(comm)
                )?;
            }
            Record::Fault(f) => writeln!(
                out,
                "fault,{},,,{},{},4096,,{},{},{},{},,",
                f.ts_ns,
                if f.is_write() { "write" } else { "read" },
                f.address,
                f.pid,
                f.tid,
                f.ip,
                fault_flag_names(f.flags)
            )?,
            Record::Gap(g) => writeln!(
                out,
                "gap,{},{},,,,,,,,,,,{}",
                g.start_ns,
                g.end_ns,
                g.lost_block + g.lost_fault
            )?,
            Record::Process(p) => {
                comms.insert(p.pid, p.comm);
                continue;
            }
            // The CSV holds the I/O; the CPU profile is `tern analyze report`'s.
            Record::Cpu(_) | Record::End(_) => continue,
        }
        rows += 1;
    }
    out.flush()?;
    Ok(rows)
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes a fio iolog (version 3, timestamps in microseconds) that replays the
/// block requests against `path_for(target name)`; returns the number of I/Os.
/// Write-zeroes replays as a write, discard as trim, flush as sync. A write
/// without data is a cache flush (`REQ_PREFLUSH`) and replays as a sync:
/// fio cannot replay a zero-length I/O (3.33 aborts on it).
pub fn to_fio_iolog<R: Read, W: Write>(
    mut reader: TraceReader<R>,
    mut out: W,
    path_for: impl Fn(&str) -> String,
) -> Result<u64, ExportError> {
    let header = reader.header().clone();
    let paths: Vec<String> = header.targets.iter().map(|t| path_for(&t.name)).collect();
    writeln!(out, "fio version 3 iolog")?;
    for p in &paths {
        writeln!(out, "0 {p} add")?;
    }
    for p in &paths {
        writeln!(out, "0 {p} open")?;
    }
    let mut ios = 0;
    let mut last_us = 0;
    while let Some(r) = reader.next_record()? {
        let Record::Block(b) = r else { continue };
        let Some(path) = paths.get(usize::from(b.target)) else {
            continue;
        };
        let us = b.ts_ns / 1000;
        last_us = last_us.max(us);
        match b.op {
            Op::Write if b.len == 0 => writeln!(out, "{us} {path} sync 0 0")?,
            Op::Read | Op::Write | Op::WriteZeroes | Op::Discard if b.len == 0 => continue,
            Op::Read => writeln!(out, "{us} {path} read {} {}", b.offset, b.len)?,
            Op::Write | Op::WriteZeroes => {
                writeln!(out, "{us} {path} write {} {}", b.offset, b.len)?;
            }
            Op::Discard => writeln!(out, "{us} {path} trim {} {}", b.offset, b.len)?,
            Op::Flush => writeln!(out, "{us} {path} sync 0 0")?,
            Op::Other => continue,
        }
        ios += 1;
    }
    for p in &paths {
        writeln!(out, "{last_us} {p} close")?;
    }
    out.flush()?;
    Ok(ios)
}
