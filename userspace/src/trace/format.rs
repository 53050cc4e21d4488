//! The trace file: a versioned header, then CRC-checked chunks of compact
//! records, written streaming with bounded memory (one chunk at a time).
//! The layout is documented in `docs/trace-format.md`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::record::{
    BlockRecord, CpuRecord, EndRecord, FaultRecord, Gap, Op, ProcessRecord, Record,
};

pub const MAGIC: &[u8; 8] = b"TERNTRC\0";
/// Version 2 added CPU records and the header's CPU targets; version 1
/// traces read as before.
pub const FORMAT_VERSION: u16 = 2;
const OLDEST_VERSION: u16 = 1;
const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"TCHK");
/// A chunk is flushed once its payload reaches this size.
const CHUNK_TARGET: usize = 64 * 1024;
/// Readers refuse larger chunks and headers, so a corrupt length cannot make them allocate.
const CHUNK_MAX: usize = 1024 * 1024;
const HEADER_MAX: usize = 1024 * 1024;
const CHUNK_HEADER_LEN: usize = 16;
const FIXED_HEADER_LEN: usize = 16;

const TAG_BLOCK: u8 = 1;
const TAG_FAULT: u8 = 2;
const TAG_GAP: u8 = 3;
const TAG_PROCESS: u8 = 4;
const TAG_END: u8 = 5;
const TAG_CPU: u8 = 6;

/// Errors reading or writing a trace file.
#[derive(Debug, thiserror::Error)]
pub enum TraceFileError {
    /// I/O error on the trace file.
    #[error("trace file I/O failed: {0}")]
    Io(#[from] io::Error),
    /// Not a Tern trace (bad magic).
    #[error(
        "not a Tern trace file (bad magic at byte 0); import other formats with `tern trace import`"
    )]
    NotATrace,
    /// A version this build cannot read.
    #[error(
        "trace format version {0} is not supported by this build (it reads versions {OLDEST_VERSION} to {FORMAT_VERSION}); use a matching tern"
    )]
    UnsupportedVersion(u16),
    /// The file ends inside a structure.
    #[error(
        "trace file is truncated at byte {offset}: {what} is incomplete (was the tracer killed before it flushed?)"
    )]
    Truncated { offset: u64, what: &'static str },
    /// A structure fails its checks.
    #[error("trace file is corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    /// The header cannot be encoded.
    #[error("cannot encode the trace header: {0}")]
    Header(#[from] serde_json::Error),
    /// A header longer than the format's 32-bit length field.
    #[error("the trace header is {len} bytes, more than its 32-bit length field holds")]
    HeaderTooLong {
        len: usize,
        #[source]
        source: std::num::TryFromIntError,
    },
}

/// What the offsets in a trace refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A block device: offsets are device bytes.
    Device,
    /// A disk image on a file system: offsets are bytes inside the image (mapped through FIEMAP).
    Image,
}

/// One traced target; block records name it by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub kind: TargetKind,
    /// `major:minor` of the device (for an image, of the device under it), when known.
    pub dev: Option<String>,
    pub size_bytes: u64,
    pub logical_block_size: u32,
}

/// The versioned header at the start of every trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub kernel_release: String,
    pub hostname: String,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub start_wall_unix_ns: u64,
    /// `CLOCK_MONOTONIC` at start; record timestamps count from here.
    pub start_monotonic_ns: u64,
    pub sector_size: u32,
    pub targets: Vec<Target>,
    /// Pids whose page faults are traced (empty: none).
    pub fault_pids: Vec<u32>,
    /// `ebpf`, or `import:<format>` for converted traces.
    pub source: String,
    /// Whose CPU the CPU records profile (`host`, `cgroup:DIR`, `pid:N`);
    /// CPU records name them by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_targets: Vec<String>,
    /// The host's online CPUs when the trace began (0: not recorded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub host_cpus: u32,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl TraceHeader {
    pub fn target(&self, index: u16) -> Option<&Target> {
        self.targets.get(usize::from(index))
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a varint takes v seven bits a byte: keeping the low bits is the point"
)]
fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)).cast_unsigned()
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1).cast_signed() ^ -(v & 1).cast_signed()
}

/// Writes a trace streaming: memory is one chunk, whatever the trace's length.
pub struct TraceWriter<W: Write> {
    out: W,
    chunk: Vec<u8>,
    records_in_chunk: u32,
    last_ts: u64,
    bytes_written: u64,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, header: &TraceHeader) -> Result<Self, TraceFileError> {
        let json = serde_json::to_vec(header)?;
        let mut fixed = Vec::with_capacity(FIXED_HEADER_LEN + json.len() + 4);
        fixed.extend_from_slice(MAGIC);
        fixed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        fixed.extend_from_slice(&0u16.to_le_bytes());
        let json_len =
            u32::try_from(json.len()).map_err(|source| TraceFileError::HeaderTooLong {
                len: json.len(),
                source,
            })?;
        fixed.extend_from_slice(&json_len.to_le_bytes());
        fixed.extend_from_slice(&json);
        fixed.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        out.write_all(&fixed)?;
        Ok(TraceWriter {
            out,
            chunk: Vec::with_capacity(CHUNK_TARGET + 256),
            records_in_chunk: 0,
            last_ts: 0,
            bytes_written: fixed.len() as u64,
        })
    }

    /// Bytes written to the underlying writer so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn put_ts(&mut self, ts: u64) {
        // The two's-complement difference: the reader adds it back wrapping.
        let delta = ts.wrapping_sub(self.last_ts).cast_signed();
        put_varint(&mut self.chunk, zigzag(delta));
        self.last_ts = ts;
    }

    pub fn push(&mut self, record: &Record) -> Result<(), TraceFileError> {
        match record {
            Record::Block(b) => {
                self.chunk.push(TAG_BLOCK);
                self.put_ts(b.ts_ns);
                put_varint(&mut self.chunk, u64::from(b.target));
                self.chunk.push(b.op.code());
                put_varint(&mut self.chunk, u64::from(b.flags));
                put_varint(&mut self.chunk, b.offset);
                put_varint(&mut self.chunk, u64::from(b.len));
                put_varint(&mut self.chunk, b.latency_ns);
                put_varint(&mut self.chunk, u64::from(b.pid));
            }
            Record::Fault(f) => {
                self.chunk.push(TAG_FAULT);
                self.put_ts(f.ts_ns);
                put_varint(&mut self.chunk, u64::from(f.pid));
                put_varint(&mut self.chunk, u64::from(f.tid));
                put_varint(&mut self.chunk, f.address);
                put_varint(&mut self.chunk, f.ip);
                put_varint(&mut self.chunk, u64::from(f.flags));
            }
            Record::Gap(g) => {
                self.chunk.push(TAG_GAP);
                self.put_ts(g.start_ns);
                put_varint(&mut self.chunk, g.end_ns.saturating_sub(g.start_ns));
                put_varint(&mut self.chunk, g.lost_block);
                put_varint(&mut self.chunk, g.lost_fault);
            }
            Record::Process(p) => {
                self.chunk.push(TAG_PROCESS);
                self.put_ts(p.ts_ns);
                put_varint(&mut self.chunk, u64::from(p.pid));
                let name = p.comm.as_bytes();
                // One length byte: a longer name is cut to 255 bytes.
                let len = u8::try_from(name.len()).unwrap_or(u8::MAX);
                let name = &name[..usize::from(len)];
                self.chunk.push(len);
                self.chunk.extend_from_slice(name);
            }
            Record::Cpu(c) => {
                self.chunk.push(TAG_CPU);
                self.put_ts(c.ts_ns);
                put_varint(&mut self.chunk, u64::from(c.target));
                put_varint(&mut self.chunk, c.interval_ns);
                put_varint(&mut self.chunk, c.usage_ns);
                // 0 for "not measured", else the value plus one.
                for v in [c.wait_ns, c.throttled_ns] {
                    put_varint(&mut self.chunk, v.map_or(0, |v| v.saturating_add(1)));
                }
            }
            Record::End(e) => {
                self.chunk.push(TAG_END);
                self.put_ts(e.ts_ns);
                put_varint(&mut self.chunk, e.block_events);
                put_varint(&mut self.chunk, e.fault_events);
                put_varint(&mut self.chunk, e.lost_events);
                put_varint(&mut self.chunk, e.outside_image);
            }
        }
        self.records_in_chunk += 1;
        if self.chunk.len() >= CHUNK_TARGET {
            self.write_chunk()?;
        }
        Ok(())
    }

    fn write_chunk(&mut self) -> Result<(), TraceFileError> {
        if self.records_in_chunk == 0 {
            return Ok(());
        }
        let mut head = [0u8; CHUNK_HEADER_LEN];
        head[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a chunk is written once past CHUNK_TARGET (64 KiB): that plus one record"
        )]
        let len = self.chunk.len() as u32;
        head[4..8].copy_from_slice(&len.to_le_bytes());
        head[8..12].copy_from_slice(&self.records_in_chunk.to_le_bytes());
        head[12..16].copy_from_slice(&crc32c::crc32c(&self.chunk).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&self.chunk)?;
        self.bytes_written += (CHUNK_HEADER_LEN + self.chunk.len()) as u64;
        self.chunk.clear();
        self.records_in_chunk = 0;
        // Each chunk decodes on its own: timestamps restart from zero.
        self.last_ts = 0;
        Ok(())
    }

    /// Writes the pending chunk and flushes, so a reader sees everything pushed so far.
    pub fn flush(&mut self) -> Result<(), TraceFileError> {
        self.write_chunk()?;
        self.out.flush()?;
        Ok(())
    }

    /// Appends the end record, flushes and returns the writer.
    pub fn finish(mut self, end: EndRecord) -> Result<W, TraceFileError> {
        self.push(&Record::End(end))?;
        self.flush()?;
        Ok(self.out)
    }
}

/// Reads a trace streaming, one chunk in memory at a time.
pub struct TraceReader<R: Read> {
    input: R,
    header: TraceHeader,
    chunk: Vec<u8>,
    pos: usize,
    remaining_in_chunk: u32,
    chunk_offset: u64,
    next_offset: u64,
    last_ts: u64,
    done: bool,
    /// Where the file ends inside a chunk (a tracer killed mid-write, a
    /// full disk): every complete chunk before it was read.
    cut: Option<u64>,
}

/// Reads exactly `buf.len()` bytes, or reports how many there were.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn truncated(offset: u64, what: &'static str) -> TraceFileError {
    TraceFileError::Truncated { offset, what }
}

fn corrupt(offset: u64, what: impl Into<String>) -> TraceFileError {
    TraceFileError::Corrupt {
        offset,
        what: what.into(),
    }
}

impl<R: Read> TraceReader<R> {
    pub fn new(mut input: R) -> Result<Self, TraceFileError> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        let got = read_full(&mut input, &mut fixed)?;
        if got >= 8 && &fixed[0..8] != MAGIC {
            return Err(TraceFileError::NotATrace);
        }
        if got < FIXED_HEADER_LEN {
            return Err(truncated(got as u64, "the file header"));
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(TraceFileError::UnsupportedVersion(version));
        }
        if fixed[10] != 0 || fixed[11] != 0 {
            return Err(corrupt(10, "reserved header bytes are not zero"));
        }
        let len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
        if len > HEADER_MAX {
            return Err(corrupt(
                12,
                format!("header length {len} exceeds {HEADER_MAX}"),
            ));
        }
        let mut json = vec![0u8; len + 4];
        let got = read_full(&mut input, &mut json)?;
        if got < json.len() {
            return Err(truncated(
                (FIXED_HEADER_LEN + got) as u64,
                "the file header",
            ));
        }
        let crc = u32::from_le_bytes([json[len], json[len + 1], json[len + 2], json[len + 3]]);
        json.truncate(len);
        if crc32c::crc32c(&json) != crc {
            return Err(corrupt(FIXED_HEADER_LEN as u64, "header checksum mismatch"));
        }
        let header: TraceHeader = serde_json::from_slice(&json)
            .map_err(|e| corrupt(FIXED_HEADER_LEN as u64, format!("header is not valid: {e}")))?;
        let start = (FIXED_HEADER_LEN + len + 4) as u64;
        Ok(TraceReader {
            input,
            header,
            chunk: Vec::new(),
            pos: 0,
            remaining_in_chunk: 0,
            chunk_offset: start,
            next_offset: start,
            last_ts: 0,
            done: false,
            cut: None,
        })
    }

    /// Where the file ended inside a chunk, if it did: the reader stopped
    /// there, after every complete chunk (the records of the cut chunk are
    /// lost; its checksum cannot vouch for any of them).
    pub fn cut_at(&self) -> Option<u64> {
        self.cut
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Loads the next chunk; `false` at a clean end of file.
    fn load_chunk(&mut self) -> Result<bool, TraceFileError> {
        let at = self.next_offset;
        let mut head = [0u8; CHUNK_HEADER_LEN];
        let got = read_full(&mut self.input, &mut head)?;
        if got == 0 {
            return Ok(false);
        }
        if got < CHUNK_HEADER_LEN {
            // The file ends inside a chunk header: a cut tail, not damage.
            self.cut = Some(at + got as u64);
            return Ok(false);
        }
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        if word(0) != CHUNK_MAGIC {
            return Err(corrupt(at, "bad chunk magic"));
        }
        let len = word(4) as usize;
        if len > CHUNK_MAX {
            return Err(corrupt(
                at + 4,
                format!("chunk length {len} exceeds {CHUNK_MAX}"),
            ));
        }
        let count = word(8);
        if count == 0 || count as usize > len {
            return Err(corrupt(
                at + 8,
                format!("chunk claims {count} records in {len} bytes"),
            ));
        }
        self.chunk.resize(len, 0);
        let got = read_full(&mut self.input, &mut self.chunk)?;
        if got < len {
            self.cut = Some(at + (CHUNK_HEADER_LEN + got) as u64);
            return Ok(false);
        }
        if crc32c::crc32c(&self.chunk) != word(12) {
            return Err(corrupt(at, "chunk checksum mismatch"));
        }
        self.chunk_offset = at;
        self.next_offset = at + (CHUNK_HEADER_LEN + len) as u64;
        self.pos = 0;
        self.remaining_in_chunk = count;
        self.last_ts = 0;
        Ok(true)
    }

    fn err_here(&self, what: &str) -> TraceFileError {
        corrupt(
            self.chunk_offset + (CHUNK_HEADER_LEN + self.pos) as u64,
            what.to_string(),
        )
    }

    fn byte(&mut self) -> Result<u8, TraceFileError> {
        let b = *self
            .chunk
            .get(self.pos)
            .ok_or_else(|| self.err_here("record runs past the end of its chunk"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, TraceFileError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err_here("varint longer than 64 bits"))
    }

    fn varint_u32(&mut self, what: &str) -> Result<u32, TraceFileError> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| self.err_here(&format!("{what} {v} does not fit 32 bits")))
    }

    fn ts(&mut self) -> Result<u64, TraceFileError> {
        let delta = unzigzag(self.varint()?);
        self.last_ts = self.last_ts.wrapping_add_signed(delta);
        Ok(self.last_ts)
    }

    fn decode(&mut self) -> Result<Record, TraceFileError> {
        let tag_at = self.pos;
        let tag = self.byte()?;
        let record = match tag {
            TAG_BLOCK => {
                let ts_ns = self.ts()?;
                let target = self.varint()?;
                let target =
                    u16::try_from(target).map_err(|_| self.err_here("target index too large"))?;
                if usize::from(target) >= self.header.targets.len() {
                    return Err(self.err_here(&format!("target index {target} not in the header")));
                }
                let op = Op::from_abi(u32::from(self.byte()?));
                let flags = self.varint_u32("flags")?;
                let offset = self.varint()?;
                let len = self.varint_u32("length")?;
                let latency_ns = self.varint()?;
                let pid = self.varint_u32("pid")?;
                Record::Block(BlockRecord {
                    ts_ns,
                    offset,
                    latency_ns,
                    len,
                    pid,
                    flags,
                    target,
                    op,
                })
            }
            TAG_FAULT => Record::Fault(FaultRecord {
                ts_ns: self.ts()?,
                pid: self.varint_u32("pid")?,
                tid: self.varint_u32("tid")?,
                address: self.varint()?,
                ip: self.varint()?,
                flags: self.varint_u32("flags")?,
            }),
            TAG_GAP => {
                let start_ns = self.ts()?;
                let dur = self.varint()?;
                Record::Gap(Gap {
                    start_ns,
                    end_ns: start_ns.saturating_add(dur),
                    lost_block: self.varint()?,
                    lost_fault: self.varint()?,
                })
            }
            TAG_PROCESS => {
                let ts_ns = self.ts()?;
                let pid = self.varint_u32("pid")?;
                let n = usize::from(self.byte()?);
                let end = self.pos + n;
                let bytes = self
                    .chunk
                    .get(self.pos..end)
                    .ok_or_else(|| self.err_here("process name runs past the end of its chunk"))?;
                let comm = String::from_utf8_lossy(bytes).into_owned();
                self.pos = end;
                Record::Process(ProcessRecord { ts_ns, pid, comm })
            }
            TAG_CPU => {
                let ts_ns = self.ts()?;
                let target = self.varint()?;
                let target = u16::try_from(target)
                    .ok()
                    .filter(|t| usize::from(*t) < self.header.cpu_targets.len())
                    .ok_or_else(|| {
                        self.err_here(&format!("CPU target index {target} not in the header"))
                    })?;
                let interval_ns = self.varint()?;
                let usage_ns = self.varint()?;
                let wait_ns = self.varint()?.checked_sub(1);
                let throttled_ns = self.varint()?.checked_sub(1);
                Record::Cpu(CpuRecord {
                    ts_ns,
                    target,
                    interval_ns,
                    usage_ns,
                    wait_ns,
                    throttled_ns,
                })
            }
            TAG_END => Record::End(EndRecord {
                ts_ns: self.ts()?,
                block_events: self.varint()?,
                fault_events: self.varint()?,
                lost_events: self.varint()?,
                outside_image: self.varint()?,
            }),
            other => {
                self.pos = tag_at;
                return Err(self.err_here(&format!("unknown record tag {other}")));
            }
        };
        Ok(record)
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record>, TraceFileError> {
        if self.done {
            return Ok(None);
        }
        if self.remaining_in_chunk == 0 {
            if self.pos != self.chunk.len() {
                self.done = true;
                return Err(self.err_here("chunk has bytes after its last record"));
            }
            if !self.load_chunk().inspect_err(|_| self.done = true)? {
                self.done = true;
                return Ok(None);
            }
        }
        self.remaining_in_chunk -= 1;
        self.decode().map(Some).inspect_err(|_| self.done = true)
    }
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<Record, TraceFileError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn header(targets: usize) -> TraceHeader {
        TraceHeader {
            kernel_release: "6.18.0-test".into(),
            hostname: "h".into(),
            start_wall_unix_ns: 1_700_000_000_000_000_000,
            start_monotonic_ns: 42,
            sector_size: 512,
            targets: (0..targets)
                .map(|i| Target {
                    name: format!("/dev/loop{i}"),
                    kind: TargetKind::Device,
                    dev: Some(format!("7:{i}")),
                    size_bytes: 1 << 30,
                    logical_block_size: 512,
                })
                .collect(),
            fault_pids: vec![],
            source: "ebpf".into(),
            cpu_targets: vec!["host".into(), "pid:1".into()],
            host_cpus: 2,
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop::sample::select(Op::ALL.to_vec())
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                0u16..3,
                op()
            )
                .prop_map(
                    |(ts_ns, offset, latency_ns, len, pid, flags, target, op)| {
                        Record::Block(BlockRecord {
                            ts_ns,
                            offset,
                            latency_ns,
                            len,
                            pid,
                            flags,
                            target,
                            op,
                        })
                    }
                ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(ts_ns, address, ip, pid, tid, flags)| {
                    Record::Fault(FaultRecord {
                        ts_ns,
                        address,
                        ip,
                        pid,
                        tid,
                        flags,
                    })
                }),
            (
                0u64..u64::MAX / 2,
                0u64..u64::MAX / 2,
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(start_ns, d, lost_block, lost_fault)| Record::Gap(Gap {
                    start_ns,
                    end_ns: start_ns + d,
                    lost_block,
                    lost_fault
                })),
            (any::<u64>(), any::<u32>(), "[a-z0-9/_-]{0,15}")
                .prop_map(|(ts_ns, pid, comm)| Record::Process(ProcessRecord { ts_ns, pid, comm })),
            (
                any::<u64>(),
                0u16..2,
                any::<u64>(),
                any::<u64>(),
                prop::option::of(0u64..u64::MAX),
                prop::option::of(0u64..u64::MAX)
            )
                .prop_map(
                    |(ts_ns, target, interval_ns, usage_ns, wait_ns, throttled_ns)| {
                        Record::Cpu(CpuRecord {
                            ts_ns,
                            target,
                            interval_ns,
                            usage_ns,
                            wait_ns,
                            throttled_ns,
                        })
                    }
                ),
        ]
    }

    fn write_all(records: &[Record], end: EndRecord) -> Vec<u8> {
        let mut w = TraceWriter::new(Vec::new(), &header(3)).expect("header encodes");
        for r in records {
            w.push(r).expect("push to a Vec");
        }
        w.finish(end).expect("finish to a Vec")
    }

    /// `n` 4 KiB writes, one after another on the disk and in time.
    fn writes(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::Block(BlockRecord {
                    ts_ns: i,
                    offset: i * 4096,
                    latency_ns: 0,
                    len: 4096,
                    pid: 1,
                    flags: 0,
                    target: 0,
                    op: Op::Write,
                })
            })
            .collect()
    }

    /// Every record, or the first error; a cut tail is an error here (as
    /// `Truncated`), so the properties below see every cut.
    fn read_all(bytes: &[u8]) -> Result<(TraceHeader, Vec<Record>), TraceFileError> {
        let mut reader = TraceReader::new(bytes)?;
        let header = reader.header().clone();
        let records = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
        if let Some(offset) = reader.cut_at() {
            return Err(truncated(offset, "a chunk"));
        }
        Ok((header, records))
    }

    #[test]
    fn a_trace_cut_inside_a_chunk_yields_every_complete_chunk_before_the_cut() {
        let records = writes(20_000);
        let bytes = write_all(&records, EndRecord::default());
        let at = bytes.len() * 2 / 3;
        let mut reader = TraceReader::new(&bytes[..at]).expect("header");
        let back = reader
            .by_ref()
            .collect::<Result<Vec<_>, _>>()
            .expect("the complete chunks read");
        let cut = reader.cut_at().expect("the cut is reported");
        assert!(cut <= at as u64 && cut > 0);
        assert!(
            back.len() > 1000,
            "most of the records before the cut: {}",
            back.len()
        );
        assert_eq!(&back[..], &records[..back.len()], "a prefix, in order");
        // An uncut trace reports no cut.
        let mut whole = TraceReader::new(bytes.as_slice()).expect("header");
        assert_eq!(whole.by_ref().count(), records.len() + 1);
        assert_eq!(whole.cut_at(), None);
    }

    #[test]
    fn a_version_1_trace_still_reads_and_a_cpu_record_needs_its_target() {
        let mut h = header(1);
        h.cpu_targets.clear();
        h.host_cpus = 0;
        let block = Record::Block(BlockRecord {
            ts_ns: 5,
            offset: 4096,
            latency_ns: 1,
            len: 4096,
            pid: 1,
            flags: 0,
            target: 0,
            op: Op::Write,
        });
        let mut w = TraceWriter::new(Vec::new(), &h).expect("header encodes");
        w.push(&block).expect("push");
        let mut bytes = w.finish(EndRecord::default()).expect("finish");
        // What tern wrote before CPU records: the same bytes, version 1.
        assert!(!String::from_utf8_lossy(&bytes).contains("cpu_targets"));
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        let (got, records) = read_all(&bytes).expect("a version 1 trace reads");
        assert!(got.cpu_targets.is_empty());
        assert_eq!(records[0], block);
        bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(
            read_all(&bytes),
            Err(TraceFileError::UnsupportedVersion(3))
        ));
        // A CPU record in a trace whose header names no CPU target.
        let mut w = TraceWriter::new(Vec::new(), &h).expect("header encodes");
        w.push(&Record::Cpu(CpuRecord {
            ts_ns: 1,
            target: 0,
            interval_ns: 1,
            usage_ns: 1,
            wait_ns: None,
            throttled_ns: None,
        }))
        .expect("push");
        let bytes = w.finish(EndRecord::default()).expect("finish");
        let e = read_all(&bytes).expect_err("corrupt");
        assert!(e.to_string().contains("CPU target index 0"), "{e}");
    }

    proptest! {
        #[test]
        fn every_record_survives_a_round_trip(records in prop::collection::vec(record(), 0..3000)) {
            let end = EndRecord { ts_ns: 7, block_events: 1, fault_events: 2, lost_events: 3, outside_image: 4 };
            let bytes = write_all(&records, end);
            let (h, back) = read_all(&bytes).expect("a written trace reads back");
            prop_assert_eq!(h, header(3));
            prop_assert_eq!(back.len(), records.len() + 1);
            prop_assert_eq!(&back[..records.len()], &records[..]);
            prop_assert_eq!(back.last(), Some(&Record::End(end)));
        }

        #[test]
        fn truncation_is_reported_with_its_offset(records in prop::collection::vec(record(), 1..500), cut in any::<prop::sample::Index>()) {
            let bytes = write_all(&records, EndRecord::default());
            let at = cut.index(bytes.len());
            match read_all(&bytes[..at]) {
                Err(TraceFileError::Truncated { offset, .. }) => prop_assert!(offset <= at as u64),
                // A cut exactly between chunks reads as a shorter trace without its end record.
                Ok((_, back)) => prop_assert!(!back.iter().any(|r| matches!(r, Record::End(_)))),
                Err(TraceFileError::NotATrace) => prop_assert!(at < 8),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        #[test]
        fn a_flipped_byte_never_passes_silently(records in prop::collection::vec(record(), 1..300), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = write_all(&records, EndRecord::default());
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            match read_all(&bytes) {
                Ok(_) => prop_assert!(false, "flip at {i} went unnoticed"),
                Err(TraceFileError::Corrupt { offset, .. } | TraceFileError::Truncated { offset, .. }) => {
                    prop_assert!(offset <= bytes.len() as u64);
                }
                Err(TraceFileError::NotATrace | TraceFileError::UnsupportedVersion(_)) => prop_assert!(i < 12),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    #[test]
    fn a_corrupt_chunk_names_its_byte_offset() {
        let records = writes(10);
        let mut bytes = write_all(&records, EndRecord::default());
        let json_len = u64::from(u32::from_le_bytes([
            bytes[12], bytes[13], bytes[14], bytes[15],
        ]));
        let first_chunk = FIXED_HEADER_LEN as u64 + json_len + 4;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let err = read_all(&bytes).expect_err("corruption is detected");
        assert_eq!(
            err.to_string(),
            format!("trace file is corrupt at byte {first_chunk}: chunk checksum mismatch")
        );
    }

    #[test]
    fn memory_stays_one_chunk_for_a_long_trace() {
        let mut w = TraceWriter::new(io::sink(), &header(1)).expect("header encodes");
        for i in 0..1_000_000u64 {
            let r = Record::Block(BlockRecord {
                ts_ns: i * 1000,
                offset: (i * 7919 % 100_000) * 4096,
                latency_ns: 20_000,
                len: 4096,
                pid: 99,
                flags: 1,
                target: 0,
                op: Op::Read,
            });
            w.push(&r).expect("push to a sink");
            assert!(w.chunk.capacity() <= CHUNK_TARGET * 2);
        }
        // Compact: 16 bytes a record for a random 4 KiB workload over 400 MB, against 64 in the ring.
        assert!(
            w.bytes_written() < 17 * 1_000_000,
            "{} bytes",
            w.bytes_written()
        );
    }
}
