//! The eBPF tracer and its trace files.
