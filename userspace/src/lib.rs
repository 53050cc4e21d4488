//! Tern: live migration of a running server's disk, guided by eBPF tracing.
//!
//! Data flows one way: `trace` → analyzer → controller/predictor →
//! replication → cutover. Each module is one concept.

pub mod agent;
pub mod analyze;
pub mod certs;
pub mod checktree;
pub mod cutover;
pub mod dirty;
pub mod granularity;
pub mod history;
pub mod image;
pub mod metrics;
pub mod nbd;
pub mod outfile;
pub mod pause;
pub mod predict;
pub mod ramfile;
pub mod replicate;
pub mod rpc;
pub mod trace;
pub mod units;
