//! Converting other tools' traces into Tern traces: blkparse text, Tern's own
//! CSV, and MSR-Cambridge-style CSV. Each input is read twice: once to learn
//! the targets (the header comes first), once to convert, streaming.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::format::{Target, TargetKind, TraceFileError, TraceHeader, TraceWriter};
use super::record::{
    BlockRecord, EndRecord, FaultRecord, Gap, Op, ProcessRecord, Record, block_flags, fault_flags,
};

/// Errors importing a trace.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not in the format.
    #[error("{path}:{line}: {what}")]
    Parse {
        path: PathBuf,
        line: u64,
        what: String,
    },
    /// Nothing importable was found.
    #[error("{path} holds no {format} I/O events; is it the right --format?")]
    Empty { path: PathBuf, format: &'static str },
    #[error(transparent)]
    Trace(#[from] TraceFileError),
    /// More devices than a trace can name.
    #[error("{path} names {count} devices; a trace holds at most 65536")]
    TooManyTargets { path: PathBuf, count: usize },
}

/// The formats `tern trace import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// blktrace's blkparse default text output.
    Blkparse,
    /// Tern's own CSV export.
    Csv,
    /// MSR-Cambridge-style CSV: Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime.
    Msr,
}

impl ImportFormat {
    fn name(self) -> &'static str {
        match self {
            ImportFormat::Blkparse => "blkparse",
            ImportFormat::Csv => "csv",
            ImportFormat::Msr => "msr",
        }
    }
}

/// Counts of an import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportTotals {
    pub records: u64,
    /// Lines that are not events (summaries, comments) and were passed over.
    pub skipped_lines: u64,
}

/// An event parsed from one input line, before targets have indices.
enum Parsed {
    Block {
        target: String,
        rec: BlockRecord,
        comm: Option<String>,
    },
    Fault(FaultRecord),
    Gap(Gap),
    /// blkparse: a completion to match against an issue.
    Complete {
        target: String,
        sector_byte: u64,
        ts_ns: u64,
    },
    Skip,
}

struct Lines {
    path: PathBuf,
    inner: std::io::Lines<BufReader<File>>,
    line: u64,
}

impl Lines {
    fn open(path: &Path) -> Result<Self, ImportError> {
        let f = File::open(path).map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Lines {
            path: path.to_path_buf(),
            inner: BufReader::new(f).lines(),
            line: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<String>, ImportError> {
        match self.inner.next() {
            None => Ok(None),
            Some(Ok(l)) => {
                self.line += 1;
                Ok(Some(l))
            }
            Some(Err(source)) => Err(ImportError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn err(&self, what: impl Into<String>) -> ImportError {
        ImportError::Parse {
            path: self.path.clone(),
            line: self.line,
            what: what.into(),
        }
    }
}

fn num<T: std::str::FromStr>(lines: &Lines, field: &str, what: &str) -> Result<T, ImportError> {
    field
        .trim()
        .parse()
        .map_err(|_| lines.err(format!("{what} {field:?} is not a number")))
}

/// `12.345678901` seconds → nanoseconds, exactly.
fn seconds_to_ns(lines: &Lines, s: &str) -> Result<u64, ImportError> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: u64 = num(lines, whole, "time")?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let frac: u64 = num(lines, &digits, "time")?;
    whole
        .checked_mul(1_000_000_000)
        .and_then(|ns| ns.checked_add(frac))
        .ok_or_else(|| lines.err(format!("time {s} s is past 2^64 ns")))
}

/// blkparse's RWBS field: e.g. `WS`, `FWFS` (preflush, write, FUA, sync), `R`, `D`, `F`.
fn parse_rwbs(rwbs: &str) -> Option<(Op, u32)> {
    let mut chars: Vec<char> = rwbs.chars().collect();
    let mut flags = 0;
    if chars.len() > 1 && chars[0] == 'F' && matches!(chars[1], 'W' | 'R' | 'D' | 'N' | 'F') {
        flags |= block_flags::PREFLUSH;
        chars.remove(0);
    }
    let op = match chars.first()? {
        'W' => Op::Write,
        'R' => Op::Read,
        'D' => Op::Discard,
        'F' => Op::Flush,
        'N' => Op::Other,
        _ => return None,
    };
    for c in &chars[1..] {
        match c {
            'F' => flags |= block_flags::FUA,
            'S' => flags |= block_flags::SYNC,
            'M' => flags |= block_flags::META,
            'A' | 'E' | 'Z' => {}
            _ => return None,
        }
    }
    Some((op, flags))
}

fn parse_blkparse(lines: &Lines, line: &str) -> Result<Parsed, ImportError> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // Event lines start with "maj,min"; summaries and headers do not.
    let Some((maj, min)) = f.first().and_then(|d| d.split_once(',')) else {
        return Ok(Parsed::Skip);
    };
    if maj.parse::<u32>().is_err() || min.parse::<u32>().is_err() || f.len() < 7 {
        return Ok(Parsed::Skip);
    }
    let action = f[5];
    if !matches!(action, "D" | "C") {
        return Ok(Parsed::Skip);
    }
    // "D WS 2048 + 8 [comm]"; a flush has no "+ n".
    let ts_ns = seconds_to_ns(lines, f[3])?;
    let pid: u32 = num(lines, f[4], "pid")?;
    let (op, flags) =
        parse_rwbs(f[6]).ok_or_else(|| lines.err(format!("unknown RWBS {:?}", f[6])))?;
    let target = format!("{maj}:{min}");
    let (sector, sectors) = if f.len() >= 10 && f[8] == "+" {
        (
            num::<u64>(lines, f[7], "sector")?,
            num::<u64>(lines, f[9], "sector count")?,
        )
    } else {
        (0, 0)
    };
    let sector_byte = sector
        .checked_mul(512)
        .ok_or_else(|| lines.err(format!("sector {sector} is past 2^64 bytes")))?;
    if action == "C" {
        return Ok(Parsed::Complete {
            target,
            sector_byte,
            ts_ns,
        });
    }
    let comm = line
        .rfind('[')
        .and_then(|i| line[i + 1..].strip_suffix(']').map(str::to_string))
        .filter(|c| !c.is_empty());
    Ok(Parsed::Block {
        target,
        rec: BlockRecord {
            ts_ns,
            offset: sector_byte,
            latency_ns: 0,
            len: sectors
                .checked_mul(512)
                .and_then(|b| u32::try_from(b).ok())
                .ok_or_else(|| {
                    lines.err(format!("a request of {sectors} sectors is over 4 GiB"))
                })?,
            pid,
            flags,
            target: 0,
            op,
        },
        comm,
    })
}

/// Splits one CSV line, honouring double quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_tern_csv(lines: &Lines, line: &str) -> Result<Parsed, ImportError> {
    if line.starts_with("kind,") || line.trim().is_empty() {
        return Ok(Parsed::Skip);
    }
    let f = split_csv(line);
    if f.len() != 14 {
        return Err(lines.err(format!(
            "expected 14 columns ({}), found {}",
            super::export::CSV_HEADER,
            f.len()
        )));
    }
    let opt_num = |s: &str, what: &str| -> Result<u64, ImportError> {
        if s.is_empty() {
            Ok(0)
        } else {
            num(lines, s, what)
        }
    };
    let opt_u32 = |s: &str, what: &str| -> Result<u32, ImportError> {
        let v = opt_num(s, what)?;
        u32::try_from(v).map_err(|_| lines.err(format!("{what} {v} does not fit 32 bits")))
    };
    match f[0].as_str() {
        "block" => {
            let op =
                Op::from_name(&f[4]).ok_or_else(|| lines.err(format!("unknown op {:?}", f[4])))?;
            let flags = block_flags::parse(&f[11])
                .ok_or_else(|| lines.err(format!("unknown flags {:?}", f[11])))?;
            Ok(Parsed::Block {
                target: f[3].clone(),
                rec: BlockRecord {
                    ts_ns: num(lines, &f[1], "ts_ns")?,
                    offset: num(lines, &f[5], "offset")?,
                    latency_ns: opt_num(&f[7], "latency_ns")?,
                    len: num(lines, &f[6], "len")?,
                    pid: opt_u32(&f[8], "pid")?,
                    flags,
                    target: 0,
                    op,
                },
                comm: Some(f[12].clone()).filter(|c| !c.is_empty()),
            })
        }
        "fault" => {
            let mut flags = 0;
            for part in f[11].split('|').filter(|p| !p.is_empty()) {
                flags |= match part {
                    "write" => fault_flags::WRITE,
                    "present" => fault_flags::PRESENT,
                    "instr" => fault_flags::INSTR,
                    other => return Err(lines.err(format!("unknown fault flag {other:?}"))),
                };
            }
            Ok(Parsed::Fault(FaultRecord {
                ts_ns: num(lines, &f[1], "ts_ns")?,
                address: num(lines, &f[5], "address")?,
                ip: opt_num(&f[10], "ip")?,
                pid: opt_u32(&f[8], "pid")?,
                tid: opt_u32(&f[9], "tid")?,
                flags,
            }))
        }
        "gap" => Ok(Parsed::Gap(Gap {
            start_ns: num(lines, &f[1], "ts_ns")?,
            end_ns: num(lines, &f[2], "end_ns")?,
            lost_block: opt_num(&f[13], "lost")?,
            lost_fault: 0,
        })),
        other => Err(lines.err(format!("unknown row kind {other:?} (block, fault or gap)"))),
    }
}

/// An MSR line's timestamp (100 ns ticks), if it has one.
fn msr_ticks(line: &str) -> Option<u64> {
    line.split(',').next()?.trim().parse().ok()
}

/// MSR Cambridge: Windows filetime (100 ns ticks), host, disk, Read/Write, offset, size, response time (100 ns).
/// `t0` is the trace's earliest timestamp: lines need not be in time order (a
/// tracer that prints at completion writes them in completion order).
fn parse_msr(lines: &Lines, line: &str, t0: &mut Option<u64>) -> Result<Parsed, ImportError> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() < 7 {
        if line.trim().is_empty() {
            return Ok(Parsed::Skip);
        }
        return Err(lines.err(format!("expected 7 columns (Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime), found {}", f.len())));
    }
    if f[0].eq_ignore_ascii_case("timestamp") {
        return Ok(Parsed::Skip);
    }
    let ticks: u64 = num(lines, f[0], "timestamp")?;
    let base = *t0.get_or_insert(ticks);
    let op = match f[3].to_ascii_lowercase().as_str() {
        "read" | "r" => Op::Read,
        "write" | "w" => Op::Write,
        other => return Err(lines.err(format!("unknown type {other:?} (Read or Write)"))),
    };
    Ok(Parsed::Block {
        target: format!("{}/{}", f[1], f[2]),
        rec: BlockRecord {
            ts_ns: ticks
                .saturating_sub(base)
                .checked_mul(100)
                .ok_or_else(|| lines.err("a timestamp past 2^64 ns from the first"))?,
            offset: num(lines, f[4], "offset")?,
            latency_ns: num::<u64>(lines, f[6], "response time")?
                .checked_mul(100)
                .ok_or_else(|| lines.err("a response time past 2^64 ns"))?,
            len: num(lines, f[5], "size")?,
            pid: 0,
            flags: 0,
            target: 0,
            op,
        },
        comm: None,
    })
}

fn parse(
    format: ImportFormat,
    lines: &Lines,
    line: &str,
    t0: &mut Option<u64>,
) -> Result<Parsed, ImportError> {
    let parsed = match format {
        ImportFormat::Blkparse => parse_blkparse(lines, line),
        ImportFormat::Csv => parse_tern_csv(lines, line),
        ImportFormat::Msr => parse_msr(lines, line, t0),
    }?;
    // Every consumer adds the length to the offset: an extent that would
    // wrap past 2^64 bytes is refused here, once, for every format.
    if let Parsed::Block { rec, .. } = &parsed
        && rec.offset.checked_add(u64::from(rec.len)).is_none()
    {
        return Err(lines.err(format!(
            "an extent of {} bytes at offset {} ends past 2^64 bytes",
            rec.len, rec.offset
        )));
    }
    Ok(parsed)
}

/// Pending blkparse issues awaiting their completion, bounded.
const PENDING_MAX: usize = 100_000;

/// Converts `input` into a Tern trace written to `out`.
#[expect(
    clippy::too_many_lines,
    reason = "one arm per import format, each streaming records into the writer"
)]
pub fn import<W: Write>(
    format: ImportFormat,
    input: &Path,
    out: W,
) -> Result<ImportTotals, ImportError> {
    // Pass 1: targets and their extents, so the header can come first.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = 0u64;
    // MSR: the earliest timestamp is time zero, wherever its line is.
    let mut msr_t0: Option<u64> = None;
    {
        let mut lines = Lines::open(input)?;
        let mut t0 = None;
        while let Some(line) = lines.next_line()? {
            if let Parsed::Block { target, rec, .. } = parse(format, &lines, &line, &mut t0)? {
                let end = rec.offset + u64::from(rec.len);
                let e = sizes.entry(target).or_default();
                *e = (*e).max(end);
                events += 1;
                if format == ImportFormat::Msr
                    && let Some(t) = msr_ticks(&line)
                {
                    msr_t0 = Some(msr_t0.map_or(t, |m| m.min(t)));
                }
            }
        }
    }
    if events == 0 && format != ImportFormat::Csv {
        return Err(ImportError::Empty {
            path: input.to_path_buf(),
            format: format.name(),
        });
    }
    // Records name their target by a u16 index.
    let index: HashMap<String, u16> = sizes
        .keys()
        .enumerate()
        .map(|(i, k)| {
            let i = u16::try_from(i).map_err(|_| ImportError::TooManyTargets {
                path: input.to_path_buf(),
                count: sizes.len(),
            })?;
            Ok((k.clone(), i))
        })
        .collect::<Result<_, ImportError>>()?;
    let header = TraceHeader {
        cpu_targets: Vec::new(),
        host_cpus: 0,
        kernel_release: String::new(),
        hostname: String::new(),
        start_wall_unix_ns: 0,
        start_monotonic_ns: 0,
        sector_size: 512,
        targets: sizes
            .iter()
            .map(|(name, size)| Target {
                name: name.clone(),
                kind: TargetKind::Device,
                dev: (format == ImportFormat::Blkparse).then(|| name.clone()),
                size_bytes: *size,
                logical_block_size: 512,
            })
            .collect(),
        fault_pids: Vec::new(),
        source: format!("import:{}", format.name()),
    };

    // Pass 2: convert.
    let mut w = TraceWriter::new(out, &header)?;
    let mut totals = ImportTotals::default();
    let mut comms: HashMap<u32, String> = HashMap::new();
    let mut pending: HashMap<(u16, u64), BlockRecord> = HashMap::new();
    let mut last_ts = 0;
    let mut lines = Lines::open(input)?;
    let mut t0 = msr_t0;
    let block = |w: &mut TraceWriter<W>,
                 rec: BlockRecord,
                 totals: &mut ImportTotals|
     -> Result<(), ImportError> {
        w.push(&Record::Block(rec))?;
        totals.records += 1;
        Ok(())
    };
    while let Some(line) = lines.next_line()? {
        match parse(format, &lines, &line, &mut t0)? {
            Parsed::Skip => totals.skipped_lines += 1,
            Parsed::Block {
                target,
                mut rec,
                comm,
            } => {
                rec.target = index[&target];
                last_ts = last_ts.max(rec.ts_ns);
                if let Some(comm) = comm
                    && rec.pid != 0
                    && comms.get(&rec.pid) != Some(&comm)
                {
                    comms.insert(rec.pid, comm.clone());
                    w.push(&Record::Process(ProcessRecord {
                        ts_ns: rec.ts_ns,
                        pid: rec.pid,
                        comm,
                    }))?;
                }
                if format == ImportFormat::Blkparse && rec.op != Op::Flush {
                    if pending.len() >= PENDING_MAX {
                        for (_, r) in pending.drain() {
                            block(&mut w, r, &mut totals)?;
                        }
                    }
                    if let Some(prev) = pending.insert((rec.target, rec.offset), rec) {
                        block(&mut w, prev, &mut totals)?;
                    }
                } else {
                    block(&mut w, rec, &mut totals)?;
                }
            }
            Parsed::Complete {
                target,
                sector_byte,
                ts_ns,
            } => {
                last_ts = last_ts.max(ts_ns);
                let Some(&t) = index.get(&target) else {
                    continue;
                };
                if let Some(mut rec) = pending.remove(&(t, sector_byte)) {
                    rec.latency_ns = ts_ns.saturating_sub(rec.ts_ns);
                    block(&mut w, rec, &mut totals)?;
                }
            }
            Parsed::Fault(f) => {
                last_ts = last_ts.max(f.ts_ns);
                w.push(&Record::Fault(f))?;
                totals.records += 1;
            }
            Parsed::Gap(g) => {
                last_ts = last_ts.max(g.end_ns);
                w.push(&Record::Gap(g))?;
                totals.records += 1;
            }
        }
    }
    // Issues never seen completing keep an unknown latency.
    let mut rest: Vec<BlockRecord> = pending.into_values().collect();
    rest.sort_by_key(|r| r.ts_ns);
    for r in rest {
        block(&mut w, r, &mut totals)?;
    }
    w.finish(EndRecord {
        ts_ns: last_ts,
        block_events: totals.records,
        ..EndRecord::default()
    })?;
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::format::TraceReader;

    #[test]
    fn msr_lines_out_of_time_order_keep_their_own_times() {
        // Printed at completion: the second request was issued first.
        let dir = tempfile::tempdir().expect("dir");
        let input = dir.path().join("msr.csv");
        std::fs::write(
            &input,
            "128166372003061629,host,0,Write,4096,4096,5000\n\
             128166372003000000,host,0,Read,0,4096,100\n",
        )
        .expect("write");
        let mut out = Vec::new();
        import(ImportFormat::Msr, &input, &mut out).expect("import");
        let reader = TraceReader::new(out.as_slice()).expect("header");
        let ts: Vec<(u64, Op)> = reader
            .filter_map(Result::ok)
            .filter_map(|r| match r {
                Record::Block(b) => Some((b.ts_ns, b.op)),
                _ => None,
            })
            .collect();
        assert_eq!(ts, [(6_162_900, Op::Write), (0, Op::Read)]);
    }

    #[test]
    fn an_extent_that_would_wrap_past_2_64_is_refused_with_its_line_in_every_format() {
        let dir = tempfile::tempdir().expect("dir");
        let near = u64::MAX - 1000;
        let cases = [
            (
                ImportFormat::Msr,
                format!(
                    "128166372003061629,host,0,Write,0,4096,5000\n128166372003061630,host,0,Write,{near},4096,5000\n"
                ),
            ),
            (
                ImportFormat::Csv,
                format!(
                    "kind,ts_ns,end_ns,target,op,offset,len,latency_ns,pid,tid,ip,flags,comm,lost\nblock,1000,,/dev/x,write,{near},4096,10,1,,,sync,a,\n"
                ),
            ),
        ];
        let far = u64::MAX / 512 + 1;
        let blkparse = dir.path().join("blk.txt");
        std::fs::write(
            &blkparse,
            format!("  7,0    1        1     0.000001000  4242  D  WS {far} + 8 [fio]\n"),
        )
        .expect("write");
        let err = import(ImportFormat::Blkparse, &blkparse, Vec::new())
            .expect_err("a sector past 2^64 bytes");
        assert!(err.to_string().contains("past 2^64"), "{err}");
        for (format, text) in cases {
            let input = dir.path().join("in.csv");
            std::fs::write(&input, text).expect("write");
            let err = import(format, &input, Vec::new()).expect_err("a wrapping extent");
            let said = err.to_string();
            assert!(
                said.contains(&format!("offset {near}")) && said.contains("2^64"),
                "{format:?}: {said}"
            );
            assert!(
                said.contains("in.csv:2:"),
                "{format:?}: the line is named: {said}"
            );
        }
    }
}
