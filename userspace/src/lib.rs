//! Tern: live migration of a running server's disk, guided by eBPF tracing.
//!
//! Data flows one way: `trace` → analyzer → controller/predictor →
//! replication → cutover. Each module is one concept.

// The library converts sizes, offsets and sectors between widths, and a silent
// truncation there corrupts data: every narrowing cast is checked (`try_from`)
// or says why it fits (`#[expect(..., reason)]`). Unit tests and the tools keep
// the workspace default (allowed).
#![cfg_attr(
    not(test),
    warn(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

pub mod agent;
pub mod analyze;
pub mod certs;
pub mod checktree;
pub mod cutover;
pub mod dirty;
pub mod granularity;
pub mod history;
pub mod image;
pub mod libvirt;
pub mod metrics;
pub mod nbd;
pub mod outfile;
pub mod pause;
pub mod postcopy;
pub mod predict;
pub mod ramfile;
pub mod replicate;
pub mod rpc;
pub mod staging;
pub mod throttle;
pub mod trace;
pub mod units;
pub mod vm;
