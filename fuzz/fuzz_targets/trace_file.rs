//! Fuzzes the trace file reader: any bytes, as a whole file. It may refuse
//! them (not a trace, corrupt, cut), never panic or loop; and every record
//! it accepts must survive being written and read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

// At the crate root, as `format.rs` finds `record` as its sibling (`super::record`).
#[path = "../../userspace/src/trace/format.rs"]
#[allow(dead_code)]
mod format;
#[path = "../../userspace/src/trace/record.rs"]
#[allow(dead_code)]
mod record;

use format::{TraceReader, TraceWriter};
use record::Record;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = TraceReader::new(data) else {
        return;
    };
    let header = reader.header().clone();
    let mut records = Vec::new();
    // A chunk holds at most its length in records: the loop ends.
    while let Ok(Some(record)) = reader.next_record() {
        records.push(record);
    }
    if records.iter().any(|r| matches!(r, Record::End(_))) {
        return;
    }
    // What was accepted writes and reads back the same.
    let Ok(mut writer) = TraceWriter::new(Vec::new(), &header) else {
        return;
    };
    for r in &records {
        if writer.push(r).is_err() {
            return;
        }
    }
    let Ok(bytes) = writer.finish(Default::default()) else {
        return;
    };
    let mut again = TraceReader::new(bytes.as_slice()).expect("a written trace reads back");
    for r in &records {
        let back = again
            .next_record()
            .expect("a written record reads back")
            .expect("as many records as written");
        assert_eq!(&back, r);
    }
});
