//! `tern replica`: client operations against a destination agent.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::args::{parse_size, runtime};

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Stream a whole file into a destination agent; prints a JSON report.
    #[command(
        after_help = "Example:\n  tern agent --role destination --image dst.img --size 64M --grpc 0.0.0.0:7443 --tls-dir pki/dst\n  tern replica push --from src.img --to dst:7443 --tls-dir pki/src"
    )]
    Push(PushArgs),
    /// A destination agent's state as one JSON line: image size, epoch,
    /// export, post-copy, and its promotion after a failover.
    #[command(after_help = "Example:\n  tern replica info --to dst:7443 --tls-dir pki/src")]
    Info(InfoArgs),
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    target: ReplicaTarget,
}

/// A destination agent to talk to: its address, and the TLS to reach it with.
#[derive(Args)]
pub struct ReplicaTarget {
    /// host:port of the destination's gRPC service.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Name checked in the server certificate [default: the host of --to].
    #[arg(long)]
    domain: Option<String>,
}

impl ReplicaTarget {
    /// Loads the TLS material and connects.
    pub async fn connect(&self) -> Result<tern::rpc::ReplicaClient> {
        let tls = self
            .tls_dir
            .as_deref()
            .map(tern::rpc::TlsMaterial::load)
            .transpose()?;
        Ok(
            tern::rpc::ReplicaClient::connect(&self.to, tls.as_ref(), self.domain.as_deref())
                .await?,
        )
    }
}

#[derive(Args)]
pub struct PushArgs {
    #[arg(long)]
    from: PathBuf,
    #[command(flatten)]
    target: ReplicaTarget,
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Longest extent on the wire (as `tern migrate --extent`).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    extent: u64,
    #[arg(long, default_value_t = 1, conflicts_with = "raw")]
    zstd_level: i32,
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 32)]
    window: usize,
}

/// Runs `tern replica`.
pub fn run(cmd: ReplicaCommand) -> Result<()> {
    let p = match cmd {
        ReplicaCommand::Push(p) => p,
        ReplicaCommand::Info(i) => return info(&i),
    };
    let extent_len = u32::try_from(p.extent)
        .ok()
        .filter(|e| (4096..=tern::rpc::MAX_EXTENT_LEN).contains(e))
        .context("--extent must be from 4K to 8M")?;
    let report = runtime()?.block_on(async {
        let mut c = p.target.connect().await?;
        let opts = tern::rpc::PushOptions {
            epoch: p.epoch,
            extent_len,
            zstd_level: (!p.raw).then_some(p.zstd_level),
            workers: p.workers,
            window: p.window,
        };
        Ok::<_, anyhow::Error>(tern::rpc::push_file(&mut c, &p.from, &opts).await?)
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

/// Prints a destination agent's `Info` as one JSON line.
fn info(a: &InfoArgs) -> Result<()> {
    let info = runtime()?
        .block_on(async { Ok::<_, anyhow::Error>(a.target.connect().await?.info().await?) })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&info)?)?;
    Ok(())
}
