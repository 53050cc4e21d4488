//! A segment's records as a flat Parquet table, stored beside its trace
//! (`STEM.parquet`), so `DuckDB`, Spark or pandas read a fleet's history in
//! object storage without Tern. The trace stays the authoritative copy: the
//! table is derived from it and may be missing (see `docs/history.md`).
//!
//! One row per record (block, fault, gap, process, CPU); columns a kind does
//! not have are null. End records are left out: their totals are the
//! summary's. Every row carries its host and device as the object path names
//! them, so the files of a fleet concatenate.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use arrow_array::builder::{
    StringDictionaryBuilder, TimestampNanosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::key::SegmentKey;
use crate::trace::export::fault_flag_names;
use crate::trace::format::{TraceFileError, TraceHeader, TraceReader};
use crate::trace::record::{Record, block_flags};

/// Rows per record batch: bounds the builders' memory whatever the segment's size.
const BATCH_ROWS: usize = 64 * 1024;

/// Errors writing a segment's Parquet table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The segment is not a readable trace.
    #[error("reading the segment: {source}")]
    Trace {
        #[source]
        source: TraceFileError,
    },
    /// A wall-clock time past 2262 does not fit Parquet's nanosecond timestamps.
    #[error(
        "a record {ts_ns} ns after the session start lies past 2262, beyond Parquet's nanosecond timestamps"
    )]
    TimeOutOfRange { ts_ns: u64 },
    /// The columns do not make a batch of the schema.
    #[error("building a record batch: {source}")]
    Arrow {
        #[source]
        source: ArrowError,
    },
    /// The Parquet encoder or its output failed.
    #[error("writing Parquet: {source}")]
    Parquet {
        #[source]
        source: ParquetError,
    },
}

fn dict() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The table's columns, in order (`docs/history.md` says what each holds).
pub fn parquet_schema() -> SchemaRef {
    let u64_col = |name: &str| Field::new(name, DataType::UInt64, true);
    let u32_col = |name: &str| Field::new(name, DataType::UInt32, true);
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp(), false),
        Field::new("unix_ns", DataType::Int64, false),
        Field::new("trace_ns", DataType::UInt64, false),
        Field::new("kind", dict(), false),
        Field::new("host", dict(), false),
        Field::new("segment_device", dict(), false),
        Field::new("session_start", timestamp(), false),
        Field::new("device", dict(), true),
        Field::new("op", dict(), true),
        u64_col("offset"),
        // u64 although a request is u32: sums over a fleet must not wrap.
        u64_col("len"),
        u64_col("latency_ns"),
        u32_col("flags"),
        Field::new("flag_names", dict(), true),
        u32_col("pid"),
        u32_col("tid"),
        Field::new("comm", dict(), true),
        u64_col("address"),
        u64_col("ip"),
        Field::new("end_time", timestamp(), true),
        u64_col("lost_block"),
        u64_col("lost_fault"),
        Field::new("cpu_target", dict(), true),
        u64_col("interval_ns"),
        u64_col("usage_ns"),
        u64_col("wait_ns"),
        u64_col("throttled_ns"),
    ]))
}

/// The columns being filled, one builder each (schema order).
#[derive(Default)]
struct Columns {
    time: TimestampNanosecondBuilder,
    unix_ns: Vec<i64>,
    trace_ns: UInt64Builder,
    kind: StringDictionaryBuilder<Int32Type>,
    host: StringDictionaryBuilder<Int32Type>,
    segment_device: StringDictionaryBuilder<Int32Type>,
    session_start: TimestampNanosecondBuilder,
    device: StringDictionaryBuilder<Int32Type>,
    op: StringDictionaryBuilder<Int32Type>,
    offset: UInt64Builder,
    len: UInt64Builder,
    latency_ns: UInt64Builder,
    flags: UInt32Builder,
    flag_names: StringDictionaryBuilder<Int32Type>,
    pid: UInt32Builder,
    tid: UInt32Builder,
    comm: StringDictionaryBuilder<Int32Type>,
    address: UInt64Builder,
    ip: UInt64Builder,
    end_time: TimestampNanosecondBuilder,
    lost_block: UInt64Builder,
    lost_fault: UInt64Builder,
    cpu_target: StringDictionaryBuilder<Int32Type>,
    interval_ns: UInt64Builder,
    usage_ns: UInt64Builder,
    wait_ns: UInt64Builder,
    throttled_ns: UInt64Builder,
}

/// What every row of one segment shares, and the process names seen so far.
struct Segment<'a> {
    header: &'a TraceHeader,
    key: &'a SegmentKey,
    session_start: i64,
    /// A process record precedes its pid's first event in the session; names
    /// given in an earlier segment are not known here.
    comms: HashMap<u32, String>,
}

impl Segment<'_> {
    /// Wall-clock nanoseconds of a session-relative time.
    fn wall(&self, ts_ns: u64) -> Result<i64, TableError> {
        self.header
            .start_wall_unix_ns
            .checked_add(ts_ns)
            .and_then(|t| i64::try_from(t).ok())
            .ok_or(TableError::TimeOutOfRange { ts_ns })
    }
}

impl Columns {
    fn rows(&self) -> usize {
        self.unix_ns.len()
    }

    /// Appends the columns every row has; the caller appends the kind's own.
    fn common(&mut self, seg: &Segment, kind: &str, ts_ns: u64) -> Result<(), TableError> {
        let wall = seg.wall(ts_ns)?;
        self.time.append_value(wall);
        self.unix_ns.push(wall);
        self.trace_ns.append_value(ts_ns);
        self.kind.append_value(kind);
        self.host.append_value(&seg.key.host);
        self.segment_device.append_value(&seg.key.device);
        self.session_start.append_value(seg.session_start);
        Ok(())
    }

    /// Appends one row; `false` for a record that has none (end records).
    fn push(&mut self, seg: &mut Segment, rec: &Record) -> Result<bool, TableError> {
        match rec {
            Record::Block(b) => {
                self.common(seg, "block", b.ts_ns)?;
                self.device
                    .append_option(seg.header.target(b.target).map(|t| t.name.as_str()));
                self.op.append_value(b.op.name());
                self.offset.append_value(b.offset);
                self.len.append_value(u64::from(b.len));
                // 0 means not measured: null keeps it out of averages.
                self.latency_ns
                    .append_option((b.latency_ns != 0).then_some(b.latency_ns));
                self.flags.append_value(b.flags);
                self.flag_names.append_value(block_flags::format(b.flags));
                self.pid.append_value(b.pid);
                self.tid.append_null();
                self.comm.append_option(seg.comms.get(&b.pid));
                self.address.append_null();
                self.ip.append_null();
                self.nulls_from_end_time();
            }
            Record::Fault(f) => {
                self.common(seg, "fault", f.ts_ns)?;
                self.nulls_block();
                self.flags.append_value(f.flags);
                self.flag_names.append_value(fault_flag_names(f.flags));
                self.pid.append_value(f.pid);
                self.tid.append_value(f.tid);
                self.comm.append_option(seg.comms.get(&f.pid));
                self.address.append_value(f.address);
                self.ip.append_value(f.ip);
                self.nulls_from_end_time();
            }
            Record::Gap(g) => {
                self.common(seg, "gap", g.start_ns)?;
                self.nulls_block();
                self.nulls_flags_to_ip();
                self.end_time.append_value(seg.wall(g.end_ns)?);
                self.lost_block.append_value(g.lost_block);
                self.lost_fault.append_value(g.lost_fault);
                self.nulls_cpu();
            }
            Record::Process(p) => {
                self.common(seg, "process", p.ts_ns)?;
                self.nulls_block();
                self.flags.append_null();
                self.flag_names.append_null();
                self.pid.append_value(p.pid);
                self.tid.append_null();
                self.comm.append_value(&p.comm);
                self.address.append_null();
                self.ip.append_null();
                self.nulls_from_end_time();
                seg.comms.insert(p.pid, p.comm.clone());
            }
            Record::Cpu(c) => {
                self.common(seg, "cpu", c.ts_ns)?;
                self.nulls_block();
                self.nulls_flags_to_ip();
                self.end_time.append_null();
                self.lost_block.append_null();
                self.lost_fault.append_null();
                self.cpu_target.append_option(
                    seg.header
                        .cpu_targets
                        .get(usize::from(c.target))
                        .map(String::as_str),
                );
                self.interval_ns.append_value(c.interval_ns);
                self.usage_ns.append_value(c.usage_ns);
                self.wait_ns.append_option(c.wait_ns);
                self.throttled_ns.append_option(c.throttled_ns);
            }
            Record::End(_) => return Ok(false),
        }
        Ok(true)
    }

    /// `device` to `latency_ns`.
    fn nulls_block(&mut self) {
        self.device.append_null();
        self.op.append_null();
        self.offset.append_null();
        self.len.append_null();
        self.latency_ns.append_null();
    }

    /// `flags` to `ip`.
    fn nulls_flags_to_ip(&mut self) {
        self.flags.append_null();
        self.flag_names.append_null();
        self.pid.append_null();
        self.tid.append_null();
        self.comm.append_null();
        self.address.append_null();
        self.ip.append_null();
    }

    fn nulls_cpu(&mut self) {
        self.cpu_target.append_null();
        self.interval_ns.append_null();
        self.usage_ns.append_null();
        self.wait_ns.append_null();
        self.throttled_ns.append_null();
    }

    /// `end_time` to the last column.
    fn nulls_from_end_time(&mut self) {
        self.end_time.append_null();
        self.lost_block.append_null();
        self.lost_fault.append_null();
        self.nulls_cpu();
    }

    /// The rows so far as one batch; the builders start empty again.
    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch, TableError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish().with_timezone("UTC")),
            Arc::new(Int64Array::from(std::mem::take(&mut self.unix_ns))),
            Arc::new(self.trace_ns.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.host.finish()),
            Arc::new(self.segment_device.finish()),
            Arc::new(self.session_start.finish().with_timezone("UTC")),
            Arc::new(self.device.finish()),
            Arc::new(self.op.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.len.finish()),
            Arc::new(self.latency_ns.finish()),
            Arc::new(self.flags.finish()),
            Arc::new(self.flag_names.finish()),
            Arc::new(self.pid.finish()),
            Arc::new(self.tid.finish()),
            Arc::new(self.comm.finish()),
            Arc::new(self.address.finish()),
            Arc::new(self.ip.finish()),
            Arc::new(self.end_time.finish().with_timezone("UTC")),
            Arc::new(self.lost_block.finish()),
            Arc::new(self.lost_fault.finish()),
            Arc::new(self.cpu_target.finish()),
            Arc::new(self.interval_ns.finish()),
            Arc::new(self.usage_ns.finish()),
            Arc::new(self.wait_ns.finish()),
            Arc::new(self.throttled_ns.finish()),
        ];
        RecordBatch::try_new(Arc::clone(schema), columns)
            .map_err(|source| TableError::Arrow { source })
    }
}

/// Writes the records of the segment `key` read from `reader` as a Parquet
/// table to `out`; returns the number of rows.
pub fn write_parquet<R: Read, W: Write + Send>(
    mut reader: TraceReader<R>,
    key: &SegmentKey,
    out: W,
) -> Result<u64, TableError> {
    let pq = |source| TableError::Parquet { source };
    let header = reader.header().clone();
    let mut seg = Segment {
        header: &header,
        key,
        session_start: i64::try_from(key.session)
            .map_err(|_| TableError::TimeOutOfRange { ts_ns: 0 })?,
        comms: HashMap::new(),
    };
    let schema = parquet_schema();
    // zstd's fast level: most columns are dictionaries or runs of nulls already.
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(pq)?));
    // Times rise record by record: deltas take a few bits where a dictionary
    // of distinct nanoseconds grows as large as the column.
    for col in ["time", "unix_ns", "trace_ns"] {
        props = props
            .set_column_dictionary_enabled(ColumnPath::from(col), false)
            .set_column_encoding(ColumnPath::from(col), Encoding::DELTA_BINARY_PACKED);
    }
    let props = props
        .set_created_by(format!("tern {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut writer = ArrowWriter::try_new(out, Arc::clone(&schema), Some(props)).map_err(pq)?;
    let mut cols = Columns::default();
    let mut rows = 0u64;
    while let Some(rec) = reader
        .next_record()
        .map_err(|source| TableError::Trace { source })?
    {
        if cols.push(&mut seg, &rec)? {
            rows += 1;
        }
        if cols.rows() >= BATCH_ROWS {
            writer.write(&cols.batch(&schema)?).map_err(pq)?;
        }
    }
    if cols.rows() > 0 {
        writer.write(&cols.batch(&schema)?).map_err(pq)?;
    }
    writer.close().map_err(pq)?;
    Ok(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{TimestampNanosecondType, UInt32Type, UInt64Type};
    use arrow_array::{Array, ArrayAccessor, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use crate::trace::TraceWriter;
    use crate::trace::format::tests::header;
    use crate::trace::record::{
        BlockRecord, CpuRecord, EndRecord, FaultRecord, Gap, Op, ProcessRecord,
    };

    /// A segment with every kind of record, more blocks than one batch holds.
    pub(crate) fn mixed_records() -> Vec<Record> {
        let mut recs = vec![Record::Process(ProcessRecord {
            ts_ns: 5,
            pid: 7,
            comm: "postgres".into(),
        })];
        for i in 0..(BATCH_ROWS as u64 + 100) {
            recs.push(Record::Block(BlockRecord {
                ts_ns: 10 + i * 1000,
                offset: i * 4096,
                // Every tenth latency unmeasured.
                latency_ns: if i % 10 == 0 { 0 } else { 500 + i },
                len: 4096 * u32::try_from(i % 8 + 1).expect("small"),
                // Pid 9 never named in this segment.
                pid: if i % 3 == 0 { 9 } else { 7 },
                flags: if i % 5 == 0 {
                    block_flags::SYNC | block_flags::FUA
                } else {
                    0
                },
                target: u16::try_from(i % 2).expect("small"),
                op: Op::ALL[usize::try_from(i % 6).expect("small")],
            }));
        }
        recs.push(Record::Fault(FaultRecord {
            ts_ns: 77,
            address: 0x7f00_0000_1000,
            ip: 0x40_1000,
            pid: 7,
            tid: 8,
            flags: crate::trace::record::fault_flags::WRITE,
        }));
        recs.push(Record::Gap(Gap {
            start_ns: 1_000_000,
            end_ns: 3_000_000,
            lost_block: 12,
            lost_fault: 3,
        }));
        recs.push(Record::Cpu(CpuRecord {
            ts_ns: 2_000_000_000,
            target: 1,
            interval_ns: 1_000_000_000,
            usage_ns: 1_500_000_000,
            wait_ns: Some(20),
            throttled_ns: None,
        }));
        recs
    }

    fn trace_bytes(h: &TraceHeader, recs: &[Record]) -> Vec<u8> {
        let mut w = TraceWriter::new(Vec::new(), h).expect("writer");
        for r in recs {
            w.push(r).expect("push");
        }
        w.finish(EndRecord::default()).expect("finish")
    }

    fn key(h: &TraceHeader) -> SegmentKey {
        SegmentKey {
            host: "h1".into(),
            device: "dev-loop0-dev-loop1".into(),
            start_unix_ns: h.start_wall_unix_ns,
            end_unix_ns: h.start_wall_unix_ns + 60_000_000_000,
            session: h.start_wall_unix_ns,
            seq: 0,
        }
    }

    /// The rows of a Parquet file, in one batch.
    pub(crate) fn read_back(bytes: Vec<u8>) -> RecordBatch {
        let mut batches: Vec<RecordBatch> =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
                .expect("a Parquet file")
                .with_batch_size(1 << 20)
                .build()
                .expect("a reader")
                .collect::<Result<_, _>>()
                .expect("batches");
        assert_eq!(batches.len(), 1, "a batch holds every row of a test");
        batches.pop().expect("one batch")
    }

    fn text(b: &RecordBatch, col: &str, i: usize) -> Option<String> {
        let c = b.column_by_name(col).expect(col);
        if c.is_null(i) {
            return None;
        }
        let d = c.as_dictionary::<Int32Type>();
        let values = d.downcast_dict::<StringArray>().expect("strings");
        Some(values.value(i).to_owned())
    }

    fn u64_at(b: &RecordBatch, col: &str, i: usize) -> Option<u64> {
        let c = b
            .column_by_name(col)
            .expect(col)
            .as_primitive::<UInt64Type>();
        c.is_valid(i).then(|| c.value(i))
    }

    fn u32_at(b: &RecordBatch, col: &str, i: usize) -> Option<u32> {
        let c = b
            .column_by_name(col)
            .expect(col)
            .as_primitive::<UInt32Type>();
        c.is_valid(i).then(|| c.value(i))
    }

    fn time_at(b: &RecordBatch, col: &str, i: usize) -> Option<i64> {
        let c = b
            .column_by_name(col)
            .expect(col)
            .as_primitive::<TimestampNanosecondType>();
        c.is_valid(i).then(|| c.value(i))
    }

    #[test]
    fn every_record_of_a_segment_round_trips_through_its_parquet_table() {
        let h = header(2);
        let recs = mixed_records();
        let trace = trace_bytes(&h, &recs);
        let mut out = Vec::new();
        let rows = write_parquet(
            TraceReader::new(trace.as_slice()).expect("trace"),
            &key(&h),
            &mut out,
        )
        .expect("writes");
        assert_eq!(
            rows,
            recs.len() as u64,
            "one row a record, none for the end record"
        );
        let b = read_back(out);
        assert_eq!(b.num_rows(), recs.len());
        let base = h.start_wall_unix_ns;
        let wall = |ts: u64| i64::try_from(base + ts).expect("fits");
        let unix = b
            .column_by_name("unix_ns")
            .expect("unix_ns")
            .as_primitive::<arrow_array::types::Int64Type>();
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(time_at(&b, "time", i), Some(wall(r.ts_ns())), "row {i}");
            assert_eq!(unix.value(i), wall(r.ts_ns()));
            assert_eq!(u64_at(&b, "trace_ns", i), Some(r.ts_ns()));
            assert_eq!(text(&b, "host", i).as_deref(), Some("h1"));
            assert_eq!(
                text(&b, "segment_device", i).as_deref(),
                Some("dev-loop0-dev-loop1")
            );
            assert_eq!(time_at(&b, "session_start", i), Some(wall(0)));
            match r {
                Record::Block(x) => {
                    assert_eq!(text(&b, "kind", i).as_deref(), Some("block"));
                    let dev = format!("/dev/loop{}", x.target);
                    assert_eq!(text(&b, "device", i), Some(dev));
                    assert_eq!(text(&b, "op", i).as_deref(), Some(x.op.name()));
                    assert_eq!(u64_at(&b, "offset", i), Some(x.offset));
                    assert_eq!(u64_at(&b, "len", i), Some(u64::from(x.len)));
                    let lat = (x.latency_ns != 0).then_some(x.latency_ns);
                    assert_eq!(u64_at(&b, "latency_ns", i), lat);
                    assert_eq!(u32_at(&b, "flags", i), Some(x.flags));
                    assert_eq!(
                        text(&b, "flag_names", i),
                        Some(block_flags::format(x.flags))
                    );
                    assert_eq!(u32_at(&b, "pid", i), Some(x.pid));
                    let comm = (x.pid == 7).then(|| "postgres".to_owned());
                    assert_eq!(text(&b, "comm", i), comm, "known only for pid 7");
                    assert_eq!(u64_at(&b, "address", i), None);
                    assert_eq!(u64_at(&b, "usage_ns", i), None);
                }
                Record::Fault(x) => {
                    assert_eq!(text(&b, "kind", i).as_deref(), Some("fault"));
                    assert_eq!(u64_at(&b, "address", i), Some(x.address));
                    assert_eq!(u64_at(&b, "ip", i), Some(x.ip));
                    assert_eq!(u32_at(&b, "tid", i), Some(x.tid));
                    assert_eq!(text(&b, "flag_names", i).as_deref(), Some("write"));
                    assert_eq!(text(&b, "comm", i).as_deref(), Some("postgres"));
                    assert_eq!(text(&b, "op", i), None);
                }
                Record::Gap(x) => {
                    assert_eq!(text(&b, "kind", i).as_deref(), Some("gap"));
                    assert_eq!(time_at(&b, "end_time", i), Some(wall(x.end_ns)));
                    assert_eq!(u64_at(&b, "lost_block", i), Some(x.lost_block));
                    assert_eq!(u64_at(&b, "lost_fault", i), Some(x.lost_fault));
                    assert_eq!(u32_at(&b, "pid", i), None);
                }
                Record::Process(x) => {
                    assert_eq!(text(&b, "kind", i).as_deref(), Some("process"));
                    assert_eq!(u32_at(&b, "pid", i), Some(x.pid));
                    assert_eq!(text(&b, "comm", i), Some(x.comm.clone()));
                }
                Record::Cpu(x) => {
                    assert_eq!(text(&b, "kind", i).as_deref(), Some("cpu"));
                    assert_eq!(text(&b, "cpu_target", i).as_deref(), Some("pid:1"));
                    assert_eq!(u64_at(&b, "interval_ns", i), Some(x.interval_ns));
                    assert_eq!(u64_at(&b, "usage_ns", i), Some(x.usage_ns));
                    assert_eq!(u64_at(&b, "wait_ns", i), x.wait_ns);
                    assert_eq!(u64_at(&b, "throttled_ns", i), None);
                    assert_eq!(text(&b, "device", i), None);
                }
                Record::End(_) => unreachable!("not pushed"),
            }
        }
    }

    #[test]
    fn a_time_past_2262_is_refused_not_wrapped() {
        let mut h = header(1);
        // The process record at 5 ns fits; the block at 10 ns does not.
        h.start_wall_unix_ns = u64::try_from(i64::MAX).expect("fits") - 7;
        let trace = trace_bytes(&h, &mixed_records()[..2]);
        let err = write_parquet(
            TraceReader::new(trace.as_slice()).expect("trace"),
            &key(&header(1)),
            Vec::new(),
        )
        .expect_err("past i64 nanoseconds");
        assert!(matches!(err, TableError::TimeOutOfRange { .. }), "{err}");
    }
}
