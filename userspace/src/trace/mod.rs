//! The eBPF tracer and its trace files: the first stage of Tern's data flow.

pub mod completions;
pub mod cpu;
pub mod device;
pub mod export;
pub mod fiemap;
pub mod format;
pub mod import;
pub mod record;
pub mod session;
pub mod stats;
pub mod tracer;

pub use format::{TraceFileError, TraceHeader, TraceReader, TraceWriter};
pub use record::{BlockRecord, CpuRecord, FaultRecord, Gap, Op, Record};
