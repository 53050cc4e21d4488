//! `tern failover` (promote a replica whose source is lost) and `tern
//! failback` (bring the promoted replica's data home, then demote it).

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::runtime;
use super::migrate::{self, MigrateArgs};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tern failover --to dst:7443 --tls-dir pki/src            # the source host is gone: promote its replica\n  tern failover --to dst:7443 --tls-dir pki/src --json     # a promoted replica answers with its promotion\n  tern agent --role destination ... --failover-after 10s   # or let the replica promote itself"
)]
pub struct FailoverArgs {
    /// The replica's destination agent.
    #[command(flatten)]
    target: super::replica::ReplicaTarget,
    /// Promote even though the source was heard in the last few seconds
    /// (its workload may still be writing: two primaries then).
    #[arg(long)]
    force: bool,
    /// The promotion as one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(
    after_help = "Example (on the promoted replica's host, the old source's disk served by\n`tern agent --role destination --image /dev/vdb --grpc 0.0.0.0:7443` on its own host):\n  tern failback --replica 127.0.0.1:7443 --file /var/lib/tern/dst.img --to src:7443 --tls-dir pki/dst --pause cmd:'virsh suspend web;;virsh resume web'"
)]
pub struct FailbackArgs {
    /// The promoted replica's agent (`host:port` of its gRPC service),
    /// demoted once its data is home.
    #[arg(long, value_name = "HOST:PORT")]
    replica: String,
    /// Name checked in the replica agent's certificate [default: the host of --replica].
    #[arg(long)]
    replica_domain: Option<String>,
    /// The migration home: `--file` the replica's image (or `--device`),
    /// `--to` the old source's agent, and the pause, as `tern migrate` takes them.
    #[command(flatten)]
    migrate: MigrateArgs,
}

/// Runs `tern failover`.
pub fn failover(a: &FailoverArgs) -> Result<()> {
    let promotion = runtime()?.block_on(async {
        let mut client = a.target.connect().await?;
        Ok::<_, anyhow::Error>(client.promote("tern failover", a.force).await?)
    })?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&promotion)?;
        v["already"] = promotion.already.into();
        v["rpo_ms"] = promotion.rpo_ms().into();
        writeln!(out, "{v}")?;
    } else {
        write!(out, "{}", render(&promotion))?;
    }
    Ok(())
}

/// A promotion for a person.
fn render(p: &tern::rpc::Promotion) -> String {
    use std::fmt::Write as _;
    let at = |ms: u64| {
        if ms == 0 {
            "never".to_owned()
        } else {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        }
    };
    let head = if p.already {
        "already promoted"
    } else {
        "promoted"
    };
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(
        s,
        "{head}: the replica is the primary at epoch {} ({}), since {}",
        p.epoch,
        p.reason,
        at(p.promoted_unix_ms)
    );
    let _ = writeln!(
        s,
        "source last heard   {} (epoch {})",
        at(p.last_heard_unix_ms),
        p.source_epoch
    );
    let _ = match p.rpo_ms() {
        Some(rpo) => writeln!(
            s,
            "recovery point      {} (every write the source completed before it is here; {rpo} ms before it was last heard, {} bytes not yet sent then)",
            at(p.consistent_as_of_unix_ms),
            p.source_backlog_bytes
        ),
        None => writeln!(
            s,
            "recovery point      unknown: no heartbeat with one was heard since this agent started"
        ),
    };
    let _ = writeln!(
        s,
        "last write here     {} ({} bytes written since the agent started)",
        at(p.last_write_unix_ms),
        p.acknowledged_bytes
    );
    s.push_str("the replica's NBD export (if it serves one) is writable; the old source is refused until `tern failback` demotes this replica\n");
    s
}

/// Runs `tern failback`: the promoted replica's image migrates to the old
/// source's agent (a delta sync by checksums: only what differs), then the
/// replica is demoted.
pub fn failback(a: &FailbackArgs) -> Result<()> {
    let Some(disk) = a.migrate.local_disk() else {
        bail!(
            "tern failback migrates the promoted replica's image from this host: give it as --file IMAGE (or --device DEV), not --vm or --agent"
        );
    };
    let tls = a
        .migrate
        .tls_dir()
        .map(tern::rpc::TlsMaterial::load)
        .transpose()?;
    let connect = || async {
        tern::rpc::ReplicaClient::connect(&a.replica, tls.as_ref(), a.replica_domain.as_deref())
            .await
            .with_context(|| format!("cannot reach the promoted replica's agent at {}", a.replica))
    };
    let promotion = runtime()?.block_on(async {
        let info = connect().await?.info().await?;
        info.promotion.with_context(|| {
            format!(
                "the replica at {} is not promoted (epoch {}): there is nothing to fail back; move a disk with `tern migrate`",
                a.replica, info.epoch
            )
        })
    })?;
    tracing::info!(disk = %disk.display(), epoch = promotion.epoch, "failback: bringing the promoted replica's data home");
    let report = migrate::migrate_report(&a.migrate)?;
    migrate::print_report(&a.migrate, &report)?;
    if report["outcome"] != "cut over" {
        bail!(
            "the migration home ended {} and the replica stays the primary (promoted at epoch {}); run `tern failback` again",
            report["outcome"],
            promotion.epoch
        );
    }
    let epoch = runtime()?.block_on(async {
        Ok::<_, anyhow::Error>(connect().await?.demote(promotion.epoch).await?)
    })?;
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "failback done: the data is home and the replica at {} is a replica again (epoch {epoch}, export read-only); restart the source agent to replicate into it",
        a.replica
    )?;
    Ok(())
}
