//! The health check after the switch: the destination's export answers, is
//! writable and serves the source's data (through the replica service or a
//! real NBD client), and any command the operator gave succeeds. A failure
//! rolls the migration back.

use std::ops::Range;
use std::time::Duration;

use futures::TryStreamExt;

use crate::image::ImageError;
use crate::replicate::Replicator;
use crate::rpc::{ReplicaClient, RpcError};

/// Why the destination is not healthy after the switch.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot run health check `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("health check `{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the destination's export is not writable after cutover")]
    NotWritable,
    #[error("{0}")]
    Rpc(#[from] RpcError),
    #[error("{0}")]
    ReadSource(#[from] ImageError),
    #[error("region {start}+{len} read from the destination differs from the source")]
    Differs { start: u64, len: u64 },
    #[error("the NBD export {export} at {addr}: {source}")]
    Nbd {
        export: String,
        addr: std::net::SocketAddr,
        #[source]
        source: crate::nbd::client::NbdClientError,
    },
    #[error("the NBD export {export} at {addr}: after cutover: it is still read-only")]
    NbdReadOnly {
        export: String,
        addr: std::net::SocketAddr,
    },
    #[error("the NBD export {export} at {addr}: size: {size} bytes, the source has {want}")]
    NbdSize {
        export: String,
        addr: std::net::SocketAddr,
        size: u64,
        want: u64,
    },
    #[error("region {start}+{len} read through the NBD export at {addr} differs from the source")]
    NbdDiffers {
        start: u64,
        len: u64,
        addr: std::net::SocketAddr,
    },
    #[error("another part of the VM is not healthy ({0}): every part rolls back")]
    GroupUnhealthy(#[source] crate::pause::GroupAbort),
    #[error("the NBD health check's thread failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What the default health check reads back from the destination after the
/// switch: enough to prove the read path and the data (the checksum roots
/// already matched), little enough to stay a small part of the downtime.
pub const HEALTH_REGION: Range<u64> = 0..64 << 10;

/// How to check the destination after cutover.
#[derive(Debug, Clone)]
pub enum HealthCheck {
    /// A shell command; exit status 0 means healthy.
    Command(String),
    /// The destination's export answers and a region read through the
    /// replica service matches the source.
    Region(Range<u64>),
    /// The destination's NBD export answers at `addr` (over TLS when `tls`
    /// is set), is writable, has the source's size, and `region` read
    /// through it matches the source.
    Nbd {
        addr: std::net::SocketAddr,
        export: String,
        region: Range<u64>,
        tls: Option<crate::nbd::client::ClientTls>,
    },
}

/// Runs every check in order; the first that fails says why.
pub(super) async fn health_check(
    repl: &mut Replicator,
    checks: &[HealthCheck],
) -> Result<(), HealthError> {
    for check in checks {
        match check {
            HealthCheck::Command(cmd) => {
                let out = tokio::process::Command::new("sh")
                    .args(["-c", cmd])
                    .output()
                    .await
                    .map_err(|source| HealthError::Spawn {
                        cmd: cmd.clone(),
                        source,
                    })?;
                if !out.status.success() {
                    return Err(HealthError::Command {
                        cmd: cmd.clone(),
                        status: out.status,
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
            }
            HealthCheck::Region(range) => {
                let info = repl.client().info().await?;
                if !info.export_writable {
                    return Err(HealthError::NotWritable);
                }
                let len = read_len(range);
                let want = repl.source().read_at(range.start, len).await?;
                let got = read_back(repl.client(), &[(range.start, len)]).await?;
                if got.first().map(|(_, d)| d.as_ref()) != Some(want.as_ref()) {
                    return Err(HealthError::Differs {
                        start: range.start,
                        len: u64::from(len),
                    });
                }
            }
            HealthCheck::Nbd {
                addr,
                export,
                region,
                tls,
            } => {
                let len = read_len(region);
                let want = repl.source().read_at(region.start, len).await?;
                let (addr, export, start, size, tls) = (
                    *addr,
                    export.clone(),
                    region.start,
                    repl.source().size(),
                    tls.clone(),
                );
                let got = tokio::task::spawn_blocking(move || {
                    nbd_read(addr, &export, tls.as_ref(), size, start, len)
                })
                .await??;
                if got != want.as_ref() {
                    return Err(HealthError::NbdDiffers {
                        start,
                        len: u64::from(len),
                        addr,
                    });
                }
            }
        }
    }
    Ok(())
}

/// How much of `range` a check reads: at most one extent.
fn read_len(range: &Range<u64>) -> u32 {
    let max = crate::rpc::MAX_EXTENT_LEN;
    u32::try_from(range.end - range.start).map_or(max, |len| len.min(max))
}

/// One NBD client session: handshake, checks, one read.
fn nbd_read(
    addr: std::net::SocketAddr,
    export: &str,
    tls: Option<&crate::nbd::client::ClientTls>,
    size: u64,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, HealthError> {
    let read =
        crate::nbd::client::read_export(addr, export, tls, offset, len, Duration::from_secs(10));
    let (info, data) = match read {
        Ok(read) => read,
        // A destination smaller than the source: say so, not "out of range".
        Err(crate::nbd::client::NbdClientError::OutOfRange { size: got, .. }) => {
            return Err(HealthError::NbdSize {
                export: export.to_owned(),
                addr,
                size: got,
                want: size,
            });
        }
        Err(source) => {
            return Err(HealthError::Nbd {
                export: export.to_owned(),
                addr,
                source,
            });
        }
    };
    if info.read_only {
        return Err(HealthError::NbdReadOnly {
            export: export.to_owned(),
            addr,
        });
    }
    if info.size != size {
        return Err(HealthError::NbdSize {
            export: export.to_owned(),
            addr,
            size: info.size,
            want: size,
        });
    }
    Ok(data)
}

async fn read_back(
    client: &mut ReplicaClient,
    ranges: &[(u64, u32)],
) -> Result<Vec<(u64, bytes::Bytes)>, RpcError> {
    client
        .read_ranges(ranges, Some(1))
        .await?
        .try_collect()
        .await
}
