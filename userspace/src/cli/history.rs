//! `tern history ls|get|put|prune` and the source agent's `--history` flags.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tern::agent::source::HistoryRecording;
use tern::history::{
    HistoryStore, Query, Retention, RollPolicy, StoreOptions, TimeRange, format_time, put_trace,
};
use tern::trace::TraceWriter;
use tern::trace::record::{EndRecord, Record};

use super::args::{parse_size, runtime};

/// How the source records its I/O history into object storage.
#[derive(Args, Clone)]
pub struct HistoryArgs {
    /// Record the source's I/O history here: a directory, `file:///dir`,
    /// `s3://bucket/prefix` (credentials, region and endpoint from `AWS_*`
    /// variables) or `az://container/prefix` (account and key from `AZURE_*`).
    #[arg(long, value_name = "URL")]
    pub history: Option<String>,
    /// How much history to keep: an age (7d), a total size (50G) or both (7d,50G).
    #[arg(long, value_name = "AGE,SIZE", requires = "history")]
    pub history_retention: Option<Retention>,
    /// Segments wait here until the store has them (never dropped).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/tmp/tern-history-spool"
    )]
    pub history_spool: PathBuf,
    /// Window length of one segment.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub history_every: Duration,
    /// A segment closes early at this size.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub history_segment_max: u64,
    /// Store only the trace segments, without a Parquet table beside each.
    #[arg(long, requires = "history")]
    pub history_no_parquet: bool,
}

impl HistoryArgs {
    /// The library's recording options; `None` without `--history`.
    pub fn recording(&self) -> Option<HistoryRecording> {
        let url = self.history.clone()?;
        Some(HistoryRecording {
            url,
            retention: self.history_retention,
            spool: self.history_spool.clone(),
            roll: RollPolicy {
                every: self.history_every,
                max_bytes: self.history_segment_max,
            },
            parquet: !self.history_no_parquet,
        })
    }
}

#[derive(Subcommand)]
#[command(
    after_help = "Examples:\n  tern history ls s3://bucket/tern --from 2h\n  tern history get /var/lib/tern/history --from 2026-11-25T10:00:00Z --to 1h --out last.trace\n  tern history prune s3://bucket/tern --retention 7d,50G --dry-run"
)]
pub enum HistoryCommand {
    /// List segments and their summaries.
    #[command(
        after_help = "Examples:\n  tern history ls s3://bucket/tern --from 2h\n  tern history ls /var/lib/tern/history --json"
    )]
    Ls {
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        json: bool,
    },
    /// Write the history of one device in a time range as one trace file.
    #[command(
        after_help = "Example:\n  tern history get s3://bucket/tern --from 2026-11-25T10:00:00Z --to 1h --out window.trace"
    )]
    Get {
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a recorded trace into a store as the agent would have recorded it
    /// (segments, summaries, Parquet tables); prints what was stored as JSON.
    #[command(
        after_help = "Example:\n  tern history put /var/lib/tern/history vdb.trace --every 60s"
    )]
    Put {
        /// A directory, `file:///dir`, `s3://bucket/prefix` or `az://container/prefix`.
        url: String,
        /// A trace file (`tern trace record`, `tern trace import`).
        trace: PathBuf,
        /// Window length of one segment.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        every: Duration,
        /// A segment closes early at this size.
        #[arg(long, default_value = "32M", value_parser = parse_size)]
        segment_max: u64,
        /// Store only the trace segments, without a Parquet table beside each.
        #[arg(long)]
        no_parquet: bool,
    },
    /// Delete segments beyond a retention.
    #[command(
        after_help = "Examples:\n  tern history prune s3://bucket/tern --retention 7d,50G --dry-run\n  tern history prune /var/lib/tern/history --retention 30d"
    )]
    Prune {
        url: String,
        /// An age (7d), a total size per device (50G) or both (7d,50G).
        #[arg(long)]
        retention: Retention,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which history.
#[derive(Args)]
pub struct Select {
    /// A directory, `file:///dir`, `s3://bucket/prefix` or `az://container/prefix`.
    url: String,
    #[command(flatten)]
    filter: HistoryFilter,
}

impl Select {
    fn query(&self) -> Result<Query> {
        self.filter.query()
    }
}

/// Which part of a history store.
#[derive(Args, Clone, Default)]
pub struct HistoryFilter {
    /// From this time: RFC 3339 or an age (2h = two hours ago).
    #[arg(long)]
    pub from: Option<String>,
    /// Up to this time (same forms).
    #[arg(long)]
    pub to: Option<String>,
    /// Only this host (as in segment names).
    #[arg(long)]
    pub host: Option<String>,
    /// Only this device (as in segment names, e.g. dev-loop0).
    #[arg(long)]
    pub device: Option<String>,
}

impl HistoryFilter {
    pub fn is_empty(&self) -> bool {
        self.from.is_none() && self.to.is_none() && self.host.is_none() && self.device.is_none()
    }

    pub fn query(&self) -> Result<Query> {
        let time = |s: &Option<String>| s.as_deref().map(TimeRange::parse_time).transpose();
        Ok(Query {
            range: TimeRange {
                from_unix_ns: time(&self.from)?,
                to_unix_ns: time(&self.to)?,
            },
            host: self.host.clone(),
            device: self.device.clone(),
        })
    }
}

/// Whether `source` names a history store (a directory or a URL) rather
/// than a trace file.
pub fn is_store(source: &std::path::Path) -> bool {
    source.is_dir() || source.to_string_lossy().contains("://")
}

/// Opens a store to read or prune: a missing directory is an error, not created.
fn open(url: &str) -> Result<HistoryStore> {
    Ok(HistoryStore::open_with(
        url,
        &StoreOptions {
            create_dir: false,
            ..StoreOptions::default()
        },
    )?)
}

pub fn run(cmd: HistoryCommand) -> Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            HistoryCommand::Ls { select, json } => ls(&select, json).await,
            HistoryCommand::Get { select, out } => get(&select, &out).await,
            HistoryCommand::Put {
                url,
                trace,
                every,
                segment_max,
                no_parquet,
            } => {
                let store = HistoryStore::open(&url)?;
                let roll = RollPolicy {
                    every,
                    max_bytes: segment_max,
                };
                let counts = put_trace(store, &trace, roll, !no_parquet).await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", serde_json::to_string(&counts)?)?;
                Ok(())
            }
            HistoryCommand::Prune {
                url,
                retention,
                dry_run,
            } => {
                let store = open(&url)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos() as u64;
                let report = store.prune(&retention, None, now, dry_run).await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
                Ok(())
            }
        }
    })
}

async fn ls(select: &Select, json: bool) -> Result<()> {
    let store = open(&select.url)?;
    let segments = store.segments(&select.query()?).await?;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(
            out,
            "{:<26} {:<26} {:<24} {:>6} {:>10} {:>9} {:>10} {:>5}",
            "start", "end", "host/device", "seq", "bytes", "requests", "written MB", "gaps"
        )?;
    }
    let mut corrupt = Vec::new();
    for s in segments {
        // A corrupt summary is listed as such; the listing goes on.
        let (summary, error) = match s.summary_bytes {
            Some(_) => match store.summary(&s.key).await {
                Ok(m) => (Some(m), None),
                Err(e @ tern::history::HistoryError::Summary { .. }) => {
                    corrupt.push(s.key.stem());
                    (None, Some(e.to_string()))
                }
                Err(e) => return Err(e.into()),
            },
            None => (None, None),
        };
        if json {
            let v = serde_json::json!({
                "stem": s.key.stem(),
                "host": s.key.host,
                "device": s.key.device,
                "start_unix_ns": s.key.start_unix_ns,
                "end_unix_ns": s.key.end_unix_ns,
                "session": s.key.session,
                "seq": s.key.seq,
                "bytes": s.bytes,
                "summary": summary,
                "summary_error": error,
            });
            writeln!(out, "{v}")?;
            continue;
        }
        let none = if error.is_some() { "corrupt" } else { "-" };
        let (requests, written, gaps) =
            summary
                .as_ref()
                .map_or((none.to_owned(), none.to_owned(), none.to_owned()), |m| {
                    let w = m.op(tern::trace::Op::Write).bytes;
                    (
                        m.block_events.to_string(),
                        format!("{:.1}", w as f64 / 1e6),
                        m.gaps.to_string(),
                    )
                });
        writeln!(
            out,
            "{:<26} {:<26} {:<24} {:>6} {:>10} {:>9} {:>10} {:>5}",
            format_time(s.key.start_unix_ns),
            format_time(s.key.end_unix_ns),
            format!("{}/{}", s.key.host, s.key.device),
            s.key.seq,
            s.bytes,
            requests,
            written,
            gaps
        )?;
    }
    if !corrupt.is_empty() {
        let mut err = std::io::stderr().lock();
        writeln!(
            err,
            "tern: warning: {} segment summaries could not be read (listed as corrupt): {}; their traces are read as they are (`tern history get` makes a gap of what cannot be read)",
            corrupt.len(),
            corrupt.join(", ")
        )?;
    }
    Ok(())
}

async fn get(select: &Select, out: &Path) -> Result<()> {
    let store = open(&select.url)?;
    let mut stream = store.records(&select.query()?).await?;
    let header = stream
        .header()
        .cloned()
        .context("no history in that range (see `tern history ls`)")?;
    // In place only once complete: a failed read of the store leaves what was there.
    let mut file = tern::outfile::OutFile::create(out)?;
    let mut writer = TraceWriter::new(BufWriter::new(&mut file), &header)?;
    let mut end = EndRecord::default();
    while let Some(rec) = stream.next_record().await? {
        match &rec {
            Record::Block(_) => end.block_events += 1,
            Record::Fault(_) => end.fault_events += 1,
            Record::Gap(g) => end.lost_events += g.lost_block + g.lost_fault,
            _ => {}
        }
        end.ts_ns = end.ts_ns.max(rec.ts_ns());
        writer.push(&rec)?;
    }
    writer.finish(end)?.flush()?;
    file.commit()?;
    eprintln!(
        "wrote {} block and {} fault records to {} ({} unwatched stretches marked as gaps)",
        end.block_events,
        end.fault_events,
        out.display(),
        stream.synthesized_gaps()
    );
    Ok(())
}
