//! NBD server for the destination side: exports raw images and block
//! devices to QEMU, libnbd clients and Tern's replication stream.
//!
//! - [`proto`]: wire constants and pure parsers (property-tested, fuzzed).
//! - `handshake`: fixed-newstyle negotiation (`NBD_OPT_GO`, `INFO`, `LIST`,
//!   `ABORT`, `EXPORT_NAME`, `STARTTLS`, `STRUCTURED_REPLY`, `LIST_` and
//!   `SET_META_CONTEXT` for `base:allocation`; everything else
//!   `NBD_REP_ERR_UNSUP`).
//! - [`client`]: a small blocking client (with STARTTLS) for health checks.
//! - `server`: accept loop, many requests in flight per connection, replies
//!   in completion order, graceful drain on cancellation.
//!
//! Design notes and measured numbers are in `docs/nbd.md`.

pub mod client;
mod handshake;
pub mod proto;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::image::{Image, ImageChanges, ImageError, ImageOptions};
pub use server::{Export, Limits, NbdServer, NbdStats, NbdStatsSnapshot};

/// Errors from the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Binding the listening socket failed.
    #[error("could not listen on {addr}: {source}; pick a free port or remove a stale socket file")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    /// A plaintext export on a non-loopback address was not asked for.
    #[error(transparent)]
    Insecure(#[from] InsecureNbd),
    /// The listen address could not be parsed.
    #[error(
        "{0:?} is not a listen address; use HOST:PORT (e.g. 127.0.0.1:10809) or unix:/path/to.sock"
    )]
    BadListenAddress(String),
    /// Socket I/O with a client failed.
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the handshake.
    #[error("the client broke the NBD handshake: {0}")]
    Handshake(#[from] proto::HandshakeError),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not a valid string.
    #[error("the client sent an unusable export name: {0}")]
    BadOption(proto::OptionError),
    /// An option payload too large to skip.
    #[error("the client sent option {option} with a {len}-byte payload; closing")]
    OptionTooLarge { option: u32, len: u32 },
    /// The client never chose an export.
    #[error("the client sent {0} options without choosing an export; closing")]
    TooManyOptions(usize),
    /// A client asked for an export in the clear from a server that requires TLS.
    #[error(
        "the client chose an export without STARTTLS, and this server requires TLS; connect with nbds:// (libnbd) or tls-creds (QEMU)"
    )]
    TlsRequired,
    /// The TLS handshake after STARTTLS failed (a certificate not signed by
    /// the server's authority, none at all, or not TLS).
    #[error("the TLS handshake after STARTTLS failed: {0}")]
    TlsHandshake(#[source] std::io::Error),
    /// The TLS directory could not be loaded or made into a server configuration.
    #[error(transparent)]
    Tls(#[from] crate::rpc::TlsError),
    /// The handshake took too long.
    #[error("the client did not finish the NBD handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// No export of that name.
    #[error("there is no export named {name:?}; the exports are: {known}")]
    UnknownExport { name: String, known: String },
    /// A read-only image cannot back a writable export.
    #[error("export {name:?} is backed by an image opened read-only; reopen it writable first")]
    ImageReadOnly { name: String },
    /// A request header with the wrong magic: the stream is out of sync.
    #[error(transparent)]
    BadRequest(#[from] proto::BadRequestMagic),
    /// Opening or using an image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The final flush at shutdown failed.
    #[error("flushing export {name:?} at shutdown failed: {source}")]
    Flush { name: String, source: ImageError },
    /// An option reply (or a name in it) longer than NBD's 32-bit length field.
    #[error("an NBD option reply field of {len} bytes does not fit its 32-bit length")]
    ReplyTooLong {
        len: usize,
        #[source]
        source: std::num::TryFromIntError,
    },
}

/// Settings for `tern nbd serve`: one image, one export.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// Raw image file or block device.
    pub image: PathBuf,
    /// Export name.
    pub name: String,
    /// `HOST:PORT` or `unix:/path`.
    pub listen: String,
    /// Export read-only.
    pub read_only: bool,
    /// Create or grow the image file to this size.
    pub size: Option<u64>,
    /// Use `O_DIRECT` where the file system allows it.
    pub direct: bool,
    /// Serve on a non-loopback TCP address without TLS.
    pub insecure: bool,
    /// Require TLS (STARTTLS) with this host directory of `tern certs init`:
    /// its certificate is shown to clients, and a client must show one
    /// signed by its `ca.pem`.
    pub tls_dir: Option<PathBuf>,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Without TLS, NBD has no encryption or authentication: anyone who
    /// reaches the port reads (and, when writable, writes) the disk.
    /// Loopback and unix sockets are served; any other address only with
    /// TLS, or when `insecure` says the operator means it. The one rule for
    /// the agent and `tern nbd serve`.
    pub fn check_exposure(&self, insecure: bool, tls: bool) -> Result<(), InsecureNbd> {
        match self {
            ListenAddr::Tcp(addr) if !addr.ip().is_loopback() && !tls => {
                if !insecure {
                    return Err(InsecureNbd { addr: *addr });
                }
                tracing::warn!(%addr, "NBD served in plaintext on a non-loopback address (--insecure-nbd)");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// An NBD listener on a non-loopback address without `--insecure-nbd`.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve NBD without TLS on {addr}, which is not loopback; give a TLS directory (--tls-dir), use a loopback address or unix:/path, or pass --insecure-nbd"
)]
pub struct InsecureNbd {
    pub addr: SocketAddr,
}

impl std::str::FromStr for ListenAddr {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<ListenAddr, NbdError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(NbdError::BadListenAddress(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| NbdError::BadListenAddress(s.to_owned()))
    }
}

/// Serves one image (`tern nbd serve`) until `cancel`, then drains in-flight requests and flushes.
pub async fn serve_standalone(
    opts: &StandaloneOptions,
    cancel: CancellationToken,
) -> Result<(), NbdError> {
    let addr: ListenAddr = opts.listen.parse()?;
    addr.check_exposure(opts.insecure, opts.tls_dir.is_some())?;
    let tls = opts
        .tls_dir
        .as_deref()
        .map(|dir| crate::rpc::TlsMaterial::load(dir)?.rustls_server_config())
        .transpose()?;
    let image = Image::open(
        &opts.image,
        &ImageOptions {
            size: opts.size,
            read_only: opts.read_only,
            direct: opts.direct,
            bulk_direct: false,
        },
    )?;
    let mut server = NbdServer::new(vec![Export {
        name: opts.name.clone(),
        description: describe(&opts.image),
        image,
        read_only: opts.read_only,
        // Standalone: no checksum tree or anything else derived from the image.
        changes: ImageChanges::default(),
        presence: crate::postcopy::Presence::default(),
    }]);
    if let Some(config) = tls {
        server = server.with_tls(config);
    }
    let server = Arc::new(server);
    let listen_err = |source| NbdError::Listen {
        addr: opts.listen.clone(),
        source,
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let listener = tokio::net::TcpListener::bind(sa)
                .await
                .map_err(listen_err)?;
            let local = listener.local_addr().map_err(listen_err)?;
            tracing::info!(%local, export = %opts.name, tls = server.has_tls(), "NBD server listening");
            server.serve_tcp(listener, cancel).await
        }
        ListenAddr::Unix(path) => {
            let listener = tokio::net::UnixListener::bind(&path).map_err(listen_err)?;
            tracing::info!(path = %path.display(), export = %opts.name, "NBD server listening");
            let result = server.serve_unix(listener, cancel).await;
            let _ = std::fs::remove_file(&path);
            result
        }
    }
}

fn describe(path: &Path) -> String {
    format!("tern export of {}", path.display())
}
