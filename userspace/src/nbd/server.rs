//! The NBD server: accept loop, per-connection reader, request tasks and
//! one reply writer per connection.
//!
//! Per connection the reader task parses request headers (and WRITE
//! payloads) in order and spawns one task per request; each task runs its
//! I/O on the image and hands the reply to the connection's writer task,
//! which writes replies in completion order and flushes the socket when no
//! other reply is waiting. A count and a byte budget bound what one
//! connection may have in flight.

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::NbdError;
use super::handshake::{self, Negotiated, Outcome};
use super::proto::{self, Command};
use crate::image::{Image, ImageChanges, ImageError, IoBuf};
use crate::postcopy::Presence;

/// Requests one connection may have in flight.
const MAX_INFLIGHT: usize = 128;
/// Payload bytes (read or write) one connection may have in flight.
const MAX_INFLIGHT_BYTES: usize = 128 << 20;
/// Largest write done on the connection's task instead of one of its own
/// (a bigger copy would hold up the reading of the next requests).
const INLINE_WRITE_MAX: u32 = 64 << 10;
/// Who may hold the server's resources: a client must finish its
/// handshake within `handshake_timeout`; beyond `max_connections`
/// connections, or `max_handshaking` of them still negotiating, a new
/// connection is closed at once (counted as refused). Each connection may
/// hold up to 128 MiB of payload in flight, so the connection limit is what
/// bounds the server's memory against many clients or a slow-loris one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub max_connections: u64,
    pub max_handshaking: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 128,
            max_handshaking: 16,
        }
    }
}

/// A connection's places under the [`Limits`]: among the open ones, and
/// among those still negotiating (given back after the handshake). Each is
/// given back on drop, whatever ends the connection: its end, an error, a
/// panic, or its task dropped before it ran.
struct Places {
    server: Arc<NbdServer>,
    negotiating: bool,
}

impl Places {
    /// Both places, or `None` when the server is full (the connection is
    /// refused and counted).
    fn take(server: &Arc<NbdServer>) -> Option<Places> {
        let limits = server.limits;
        let active = server
            .stats
            .connections_active
            .fetch_add(1, Ordering::AcqRel);
        let negotiating = server.negotiating.fetch_add(1, Ordering::AcqRel);
        let places = Places {
            server: Arc::clone(server),
            negotiating: true,
        };
        if active >= limits.max_connections || negotiating >= limits.max_handshaking {
            bump(&server.stats.connections_refused);
            return None;
        }
        bump(&server.stats.connections_accepted);
        Some(places)
    }

    /// The handshake is over: the negotiating place is free.
    fn negotiated(&mut self) {
        if std::mem::take(&mut self.negotiating) {
            self.server.negotiating.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Places {
    fn drop(&mut self) {
        self.negotiated();
        self.server
            .stats
            .connections_active
            .fetch_sub(1, Ordering::AcqRel);
    }
}
/// Socket buffer sizes on our side of the connection.
const SOCKET_BUF: usize = 256 << 10;

/// One export offered by the server.
#[derive(Debug, Clone)]
pub struct Export {
    /// Name clients ask for (`nbd://host:port/NAME`).
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
    /// The backing image.
    pub image: Image,
    /// Refuse writes, trims and zeroes with EPERM.
    pub read_only: bool,
    /// Told about every range a `WRITE`, `WRITE_ZEROES` or `TRIM` touched, after
    /// it completed and before the reply is sent (the destination's
    /// checksum tree listens). `ImageChanges::default()` when nobody cares.
    pub changes: ImageChanges,
    /// The post-copy gate every request waits on while units are missing
    /// (`Presence::default()`: none ever are).
    pub presence: Presence,
}

/// Server-side state of an export.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) image: Image,
    read_only: AtomicBool,
    /// Advertise writable even while read-only: writes still get `EPERM`
    /// until [`NbdServer::set_read_only`] clears it, but a client that
    /// connected early (QEMU, which learns read-only once at connect)
    /// can write after the flip without reconnecting.
    advertise_writable: AtomicBool,
    changes: ImageChanges,
    presence: Presence,
}

impl ExportState {
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Transmission flags for a client negotiating now.
    ///
    /// `CAN_MULTI_CONN` is safe: every connection goes through the same
    /// image, a FLUSH is an `fdatasync` of the whole file, and a write is
    /// only acknowledged once the kernel has it, so a flush or FUA on one
    /// connection covers what any connection had completed.
    pub(crate) fn transmission_flags(&self) -> u16 {
        let base = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_CAN_MULTI_CONN;
        if self.is_read_only() && !self.advertise_writable.load(Ordering::Acquire) {
            base | proto::FLAG_READ_ONLY
        } else {
            base | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES
        }
    }
}

/// Counters for metrics; read them with `load(Ordering::Relaxed)` or
/// [`NbdStats::snapshot`].
#[derive(Debug, Default)]
pub struct NbdStats {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    /// Connections dropped during the handshake (bad magic, flags, timeout,
    /// unknown export with `NBD_OPT_EXPORT_NAME`).
    pub handshake_failures: AtomicU64,
    /// Connections closed at once: over [`Limits`].
    pub connections_refused: AtomicU64,
    /// Connections closed for breaking the protocol after the handshake.
    pub protocol_errors: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub disconnects: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// A point-in-time copy of [`NbdStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub handshake_failures: u64,
    pub connections_refused: u64,
    pub protocol_errors: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub block_status: u64,
    pub disconnects: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl NbdStats {
    /// Copies every counter.
    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStatsSnapshot {
            connections_accepted: l(&self.connections_accepted),
            connections_active: l(&self.connections_active),
            handshake_failures: l(&self.handshake_failures),
            connections_refused: l(&self.connections_refused),
            protocol_errors: l(&self.protocol_errors),
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            trims: l(&self.trims),
            write_zeroes: l(&self.write_zeroes),
            block_status: l(&self.block_status),
            disconnects: l(&self.disconnects),
            errors: l(&self.errors),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// An NBD server over a fixed set of exports.
#[derive(Debug)]
pub struct NbdServer {
    exports: Vec<Arc<ExportState>>,
    stats: NbdStats,
    /// Set: every client must STARTTLS (with a certificate the server's
    /// authority signed) before it may choose an export.
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    /// Connections still negotiating.
    negotiating: AtomicU64,
}

impl NbdServer {
    /// A server offering `exports` (a read-only image forces a read-only export).
    pub fn new(exports: Vec<Export>) -> NbdServer {
        let exports = exports
            .into_iter()
            .map(|e| {
                let read_only = e.read_only || e.image.is_read_only();
                Arc::new(ExportState {
                    name: e.name,
                    description: e.description,
                    image: e.image,
                    read_only: AtomicBool::new(read_only),
                    advertise_writable: AtomicBool::new(false),
                    changes: e.changes,
                    presence: e.presence,
                })
            })
            .collect();
        NbdServer {
            exports,
            stats: NbdStats::default(),
            tls: None,
            limits: Limits::default(),
            negotiating: AtomicU64::new(0),
        }
    }

    /// Requires TLS of every client (`NBD_OPT_STARTTLS`, as qemu-nbd and
    /// nbdkit do with `--tls=require`), with mutual authentication as
    /// `config` asks (Tern's: a client certificate from the same authority).
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> NbdServer {
        self.tls = Some(config);
        self
    }

    /// The server with other [`Limits`] than the defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> NbdServer {
        self.limits = limits;
        self
    }

    /// Whether clients must use TLS.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The server's counters.
    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Flips an export between read-only and writable (at cutover). Requests
    /// are checked against the current setting; clients learn the new
    /// transmission flags when they reconnect. Logs and ignores an unknown
    /// name or a read-only image; use [`NbdServer::try_set_read_only`] to
    /// get the error.
    pub fn set_read_only(&self, name: &str, read_only: bool) {
        if let Err(e) = self.try_set_read_only(name, read_only) {
            tracing::warn!(error = %e, "set_read_only ignored");
        }
    }

    /// Like [`NbdServer::set_read_only`], but reports why it could not.
    pub fn try_set_read_only(&self, name: &str, read_only: bool) -> Result<(), NbdError> {
        let export = self
            .exports
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| self.unknown_export(name))?;
        if !read_only && export.image.is_read_only() {
            return Err(NbdError::ImageReadOnly {
                name: name.to_owned(),
            });
        }
        export.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    /// Makes a read-only export advertise itself writable at the handshake
    /// (no `NBD_FLAG_READ_ONLY`) while still refusing writes with `EPERM`
    /// until [`NbdServer::set_read_only`] makes it writable. Fails on an
    /// unknown name or an image opened read-only.
    pub fn set_advertise_writable(&self, name: &str, advertise: bool) -> Result<(), NbdError> {
        let export = self
            .exports
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| self.unknown_export(name))?;
        if advertise && export.image.is_read_only() {
            return Err(NbdError::ImageReadOnly {
                name: name.to_owned(),
            });
        }
        export
            .advertise_writable
            .store(advertise, Ordering::Release);
        Ok(())
    }

    pub(crate) fn exports(&self) -> &[Arc<ExportState>] {
        &self.exports
    }

    /// Finds an export by name; the empty (default) name picks the only
    /// export when there is exactly one.
    pub(crate) fn find_export(&self, name: &str) -> Option<Arc<ExportState>> {
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    pub(crate) fn unknown_export(&self, name: &str) -> NbdError {
        NbdError::UnknownExport {
            name: name.to_owned(),
            known: self
                .exports
                .iter()
                .map(|e| e.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Serves TCP clients until `cancel` fires, then stops accepting, lets
    /// every connection finish the requests it already read, and flushes
    /// every export.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> Result<(), NbdError> {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        // Latency matters more than packet count for replies.
                        let _ = stream.set_nodelay(true);
                        self.spawn_connection(&mut conns, stream, &cancel);
                    }
                    Err(e) => accept_failed(&e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        self.drain(conns).await
    }

    /// Serves clients on a unix socket; see [`NbdServer::serve_tcp`].
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: UnixListener,
        cancel: CancellationToken,
    ) -> Result<(), NbdError> {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => self.spawn_connection(&mut conns, stream, &cancel),
                    Err(e) => accept_failed(&e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        self.drain(conns).await
    }

    /// Serves one already-connected stream (tests, or a socket handed over
    /// by someone else) until the client leaves or `cancel` fires.
    pub async fn serve_stream<S>(
        self: Arc<Self>,
        stream: S,
        cancel: CancellationToken,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(places) = Places::take(&self) else {
            return Ok(());
        };
        self.connection(Whole(stream), cancel, places).await
    }

    fn spawn_connection<S: Transport>(
        self: &Arc<Self>,
        conns: &mut JoinSet<()>,
        stream: S,
        cancel: &CancellationToken,
    ) {
        // Taken here, before the task runs, so a burst of connects cannot
        // slip past the limits between accept and spawn. Over them: closed
        // unanswered, nothing held; counted, not logged (a flood would
        // flood the log too).
        let Some(places) = Places::take(self) else {
            drop(stream);
            return;
        };
        let server = Arc::clone(self);
        let cancel = cancel.clone();
        conns.spawn(async move {
            if let Err(e) = server.connection(stream, cancel, places).await {
                // One line per connection, not per request.
                tracing::debug!(error = %e, "NBD connection ended with an error");
            }
        });
    }

    async fn drain(&self, mut conns: JoinSet<()>) -> Result<(), NbdError> {
        while conns.join_next().await.is_some() {}
        for export in &self.exports {
            if export.image.is_read_only() {
                continue;
            }
            export
                .image
                .flush()
                .await
                .map_err(|source| NbdError::Flush {
                    name: export.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// One connection, holding its `places` until it ends.
    async fn connection<S: Transport>(
        self: Arc<Self>,
        stream: S,
        cancel: CancellationToken,
        mut places: Places,
    ) -> Result<(), NbdError> {
        self.connection_inner(stream, cancel, &mut places).await
    }

    async fn connection_inner<S: Transport>(
        self: &Arc<Self>,
        stream: S,
        cancel: CancellationToken,
        places: &mut Places,
    ) -> Result<(), NbdError> {
        let timeout = self.limits.handshake_timeout;
        let negotiated = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(timeout, self.handshake(stream)) => r,
        };
        places.negotiated();
        let session = match negotiated {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => {
                bump(&self.stats.handshake_failures);
                return Err(e);
            }
            Err(_elapsed) => {
                bump(&self.stats.handshake_failures);
                return Err(NbdError::HandshakeTimeout(timeout));
            }
        };
        match session {
            Session::Aborted => Ok(()),
            Session::Plain(stream, terms) => {
                let (rd, wr) = stream.halves();
                self.transmission(rd, wr, terms, cancel).await
            }
            Session::Tls(stream, terms) => {
                let (rd, wr) = tokio::io::split(*stream);
                self.transmission(rd, wr, terms, cancel).await
            }
        }
    }

    /// Greeting, options, and the TLS handshake when the client starts it.
    async fn handshake<S: Transport>(&self, mut stream: S) -> Result<Session<S>, NbdError> {
        let mut haggle = handshake::greet(&mut stream, self.tls.is_some()).await?;
        match handshake::negotiate(&mut stream, self, &mut haggle).await? {
            Outcome::Go(terms) => return Ok(Session::Plain(stream, terms)),
            Outcome::Abort => return Ok(Session::Aborted),
            Outcome::StartTls => {}
        }
        let config = self
            .tls
            .as_ref()
            .expect("STARTTLS is acknowledged only by a server with TLS");
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::clone(config))
            .accept(stream)
            .await
            .map_err(NbdError::TlsHandshake)?;
        haggle.tls_started();
        match handshake::negotiate(&mut tls, self, &mut haggle).await? {
            Outcome::Go(terms) => Ok(Session::Tls(Box::new(tls), terms)),
            Outcome::Abort => Ok(Session::Aborted),
            Outcome::StartTls => unreachable!("a second STARTTLS is refused by negotiate"),
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "the transmission loop: one arm per NBD command, each with its checks"
    )]
    async fn transmission<R, W>(
        self: &Arc<Self>,
        rd: R,
        wr: W,
        terms: Negotiated,
        cancel: CancellationToken,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut rd = BufReader::with_capacity(SOCKET_BUF, rd);
        let wr = BufWriter::with_capacity(SOCKET_BUF, wr);
        let Negotiated {
            export,
            structured,
            allocation,
        } = terms;
        let (tx, rx) = mpsc::channel::<Reply>(MAX_INFLIGHT);
        let writer_dead = CancellationToken::new();
        let writer = tokio::spawn(write_replies(wr, rx, structured, writer_dead.clone()));
        let count = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let budget = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES));
        let size = export.image.size();

        let outcome: Result<bool, NbdError> = loop {
            let mut head = [0u8; proto::REQUEST_HEADER_LEN];
            let read = tokio::select! {
                biased;
                () = cancel.cancelled() => break Ok(false),
                () = writer_dead.cancelled() => break Ok(false),
                r = rd.read_exact(&mut head) => r,
            };
            match read {
                Ok(_) => {}
                // The client hung up without NBD_CMD_DISC.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(false),
                Err(e) => break Err(e.into()),
            }
            let req = match proto::parse_request_header(&head) {
                Ok(req) => req,
                Err(e) => {
                    bump(&self.stats.protocol_errors);
                    break Err(e.into());
                }
            };
            let checked = proto::check_request(&req, size, export.is_read_only()).and_then(|cmd| {
                // Block status only for a context the client selected.
                match cmd {
                    Command::BlockStatus { .. } if !allocation => Err(proto::EINVAL),
                    cmd => Ok(cmd),
                }
            });
            let cmd = match checked {
                Ok(cmd) => cmd,
                Err(errno) => {
                    // Skip the payload of a refused WRITE to stay in sync;
                    // it streams through a small buffer, never allocated whole.
                    let payload = u64::from(req.payload_len());
                    if payload > 0 {
                        match tokio::io::copy(&mut (&mut rd).take(payload), &mut tokio::io::sink())
                            .await
                        {
                            Ok(n) if n == payload => {}
                            Ok(_) => break Ok(false),
                            Err(e) => break Err(e.into()),
                        }
                    }
                    bump(&self.stats.errors);
                    let reply = Reply {
                        cookie: req.cookie,
                        error: errno,
                        data: None,
                        kind: ReplyKind::Plain,
                    };
                    if tx.send(reply).await.is_err() {
                        break Ok(false);
                    }
                    continue;
                }
            };
            if cmd == Command::Disconnect {
                bump(&self.stats.disconnects);
                break Ok(true);
            }
            let (payload_len, io_bytes) = match cmd {
                Command::Write { len, .. } => (len, len),
                Command::Read { len, .. } => (0, len),
                _ => (0, 0),
            };
            let permit = Arc::clone(&count)
                .acquire_owned()
                .await
                .expect("the in-flight semaphore is never closed");
            // A budget permit of at least one byte and at most the budget.
            #[expect(
                clippy::cast_possible_truncation,
                reason = "clamped to MAX_INFLIGHT_BYTES (128 MiB), which fits u32"
            )]
            let cost = (io_bytes as usize).clamp(1, MAX_INFLIGHT_BYTES) as u32;
            let bytes_permit = Arc::clone(&budget)
                .acquire_many_owned(cost)
                .await
                .expect("the byte budget semaphore is never closed");
            let data = if payload_len > 0 {
                let mut buf = IoBuf::recycled(payload_len as usize);
                match rd.read_exact(buf.as_mut()).await {
                    Ok(_) => Some(buf.into_bytes()),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(false),
                    Err(e) => break Err(e.into()),
                }
            } else {
                None
            };
            // A small write of whole pages into a page-cache image is one
            // `pwrite` (a copy into the cache): done here, it costs less
            // than the task, its wake-up and the hand-off that would carry it.
            if let (
                Command::Write {
                    offset,
                    len,
                    fua: false,
                },
                Some(bytes),
            ) = (cmd, &data)
                && len <= INLINE_WRITE_MAX
                && !export.presence.is_active()
            {
                let now = export.image.write_pages_now(offset, bytes);
                if !matches!(now, Ok(false)) {
                    let reply = self.written(&export, req.cookie, offset, len, now.map(|_| ()));
                    drop((permit, bytes_permit));
                    if tx.send(reply).await.is_err() {
                        break Ok(false);
                    }
                    continue;
                }
            }
            let tx = tx.clone();
            let export = Arc::clone(&export);
            let server = Arc::clone(self);
            tokio::spawn(async move {
                let reply = match cmd {
                    Command::BlockStatus {
                        offset,
                        len,
                        req_one,
                    } => {
                        server
                            .block_status(&export, req.cookie, offset, len, req_one)
                            .await
                    }
                    _ => server.execute(&export, cmd, req.cookie, data).await,
                };
                let _ = tx.send(reply).await;
                drop((permit, bytes_permit));
            });
        };

        // Let every request already read finish and its reply go out.
        drop(tx);
        let written = writer.await;
        let disconnected = outcome?;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(join) => return Err(std::io::Error::other(join).into()),
        }
        if disconnected && !export.image.is_read_only() {
            // Clients often exit right after NBD_CMD_DISC; make their data
            // durable even if they never sent FLUSH.
            export.image.flush().await?;
        }
        Ok(())
    }

    /// The reply to a write (done on the connection's own task or in
    /// [`NbdServer::execute`]), after a write's bookkeeping.
    fn written(
        &self,
        export: &ExportState,
        cookie: u64,
        offset: u64,
        len: u32,
        result: Result<(), ImageError>,
    ) -> Reply {
        bump(&self.stats.writes);
        // Before the reply, and after a failure too (see `execute`).
        export.changes.changed(offset, u64::from(len));
        let result = result.map(|()| {
            self.stats
                .bytes_written
                .fetch_add(u64::from(len), Ordering::Relaxed);
            None
        });
        self.reply(cookie, ReplyKind::Plain, result)
    }

    /// The reply to a request that ended with `result`, errors counted.
    fn reply(
        &self,
        cookie: u64,
        kind: ReplyKind,
        result: Result<Option<Bytes>, ImageError>,
    ) -> Reply {
        match result {
            Ok(data) => Reply {
                cookie,
                error: 0,
                data,
                kind,
            },
            Err(e) => {
                bump(&self.stats.errors);
                Reply {
                    cookie,
                    error: proto::nbd_errno(e.errno()),
                    data: None,
                    kind,
                }
            }
        }
    }

    /// `base:allocation` of `[offset, offset + len)` from the image's
    /// extent map. During a post-copy every unit is reported as data: a
    /// unit still on the source reads as a hole here, but holds data there.
    async fn block_status(
        &self,
        export: &ExportState,
        cookie: u64,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Reply {
        bump(&self.stats.block_status);
        let range = offset..offset + u64::from(len);
        // A request may span 4 GiB of a fragmented image: the walk stops once
        // the reply is full (a run of data and a hole per descriptor), and
        // runs off the async workers.
        let limit = if req_one {
            1
        } else {
            proto::MAX_STATUS_DESCRIPTORS / 2 + 1
        };
        let data = if export.presence.is_active() {
            Ok(None)
        } else {
            let (image, r) = (export.image.clone(), range.clone());
            tokio::task::spawn_blocking(move || image.data_ranges_up_to(r, limit))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match data {
            Ok(data) => {
                let data = data.unwrap_or_else(|| vec![range]);
                // A walk cut short knows nothing past its last run: answer
                // up to there only (the client asks again for the rest).
                let len = match data.last() {
                    Some(last) if data.len() >= limit => {
                        u32::try_from(last.end - offset).expect("a run inside a u32-long request")
                    }
                    _ => len,
                };
                let descriptors = proto::allocation_descriptors(
                    offset,
                    len,
                    &data,
                    req_one,
                    proto::MAX_STATUS_DESCRIPTORS,
                );
                Reply {
                    cookie,
                    error: 0,
                    data: Some(Bytes::from(proto::block_status_payload(
                        proto::BASE_ALLOCATION_ID,
                        &descriptors,
                    ))),
                    kind: ReplyKind::BlockStatus,
                }
            }
            Err(e) => {
                bump(&self.stats.errors);
                // Counted in `errors`; one line per request would flood.
                tracing::debug!(error = %e, "NBD block status: the image's extent map cannot be read");
                Reply {
                    cookie,
                    error: proto::nbd_errno(e.raw_os_error().unwrap_or(libc::EIO)),
                    data: None,
                    kind: ReplyKind::BlockStatus,
                }
            }
        }
    }

    async fn execute(
        &self,
        export: &ExportState,
        cmd: Command,
        cookie: u64,
        data: Option<Bytes>,
    ) -> Reply {
        let image = &export.image;
        let stats = &self.stats;
        let kind = match cmd {
            Command::Read { offset, .. } => ReplyKind::Read { offset },
            _ => ReplyKind::Plain,
        };
        // In a post-copy, a unit still on the source is fetched before it is
        // read or written in part: never old data, never a fill over a write.
        let gate = match cmd {
            Command::Read { offset, len } => export
                .presence
                .before_read(offset, u64::from(len))
                .await
                .map(|()| None),
            Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. } => export
                .presence
                .before_write(offset, u64::from(len))
                .await
                .map(Some),
            // Answered by `block_status`, which reads no data.
            Command::Flush | Command::Disconnect | Command::BlockStatus { .. } => Ok(None),
        };
        // Held until the write landed (dropped at the end of this call).
        let _claim = match gate {
            Ok(claim) => claim,
            Err(e) => {
                bump(&stats.errors);
                tracing::warn!(error = %e, "NBD request failed");
                return Reply {
                    cookie,
                    error: proto::nbd_errno(libc::EIO),
                    data: None,
                    kind,
                };
            }
        };
        // Writes are counted and reported by `written`.
        let modified = match cmd {
            Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
                Some((offset, u64::from(len)))
            }
            Command::Write { .. }
            | Command::Read { .. }
            | Command::Flush
            | Command::Disconnect
            | Command::BlockStatus { .. } => None,
        };
        let result: Result<Option<Bytes>, ImageError> = match cmd {
            Command::Read { offset, len } => {
                bump(&stats.reads);
                image
                    .read_at(offset, len)
                    .await
                    .inspect(|_| {
                        stats
                            .bytes_read
                            .fetch_add(u64::from(len), Ordering::Relaxed);
                    })
                    .map(Some)
            }
            Command::Write { offset, len, fua } => {
                let data = data.unwrap_or_default();
                debug_assert_eq!(data.len(), len as usize);
                // Whole pages of a page-cache image: one pwrite here instead
                // of a round trip through the ring thread.
                let now = if fua {
                    Ok(false)
                } else {
                    image.write_pages_now(offset, &data)
                };
                let r = match now {
                    Ok(true) => Ok(()),
                    Ok(false) => image.write_at(offset, data, fua).await,
                    Err(e) => Err(e),
                };
                return self.written(export, cookie, offset, len, r);
            }
            Command::Flush => {
                bump(&stats.flushes);
                image.flush().await.map(|()| None)
            }
            Command::Trim { offset, len, fua } => {
                bump(&stats.trims);
                let r = image.trim(offset, u64::from(len)).await;
                fua_after(image, r, fua).await
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
            } => {
                bump(&stats.write_zeroes);
                let r = image.write_zeroes(offset, u64::from(len), may_trim).await;
                fua_after(image, r, fua).await
            }
            Command::Disconnect | Command::BlockStatus { .. } => Ok(None),
        };
        // Before the reply, so a checksum query made after the client saw
        // its write complete includes it. Also after a failure: the range
        // may have been partly written.
        if let Some((offset, len)) = modified {
            export.changes.changed(offset, len);
        }
        self.reply(cookie, kind, result)
    }
}

/// A connection after the handshake.
enum Session<S> {
    /// The client aborted before choosing an export.
    Aborted,
    Plain(S, Negotiated),
    /// Boxed: a TLS stream carries its buffers inline.
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Negotiated),
}

/// A client connection: read and written whole during the handshake (and
/// through TLS), then split so requests are read while replies are written.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Rd: AsyncRead + Unpin + Send + 'static;
    type Wr: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Rd, Self::Wr);
}

impl Transport for TcpStream {
    type Rd = tokio::net::tcp::OwnedReadHalf;
    type Wr = tokio::net::tcp::OwnedWriteHalf;
    /// Owned halves: no lock between the reader and the writer.
    fn halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

impl Transport for UnixStream {
    type Rd = tokio::net::unix::OwnedReadHalf;
    type Wr = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

/// Any other stream ([`NbdServer::serve_stream`]), split through a lock.
pub(crate) struct Whole<S>(S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for Whole<S> {
    type Rd = tokio::io::ReadHalf<S>;
    type Wr = tokio::io::WriteHalf<S>;
    fn halves(self) -> (Self::Rd, Self::Wr) {
        tokio::io::split(self.0)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Whole<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Whole<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn fua_after(
    image: &Image,
    r: Result<(), ImageError>,
    fua: bool,
) -> Result<Option<Bytes>, ImageError> {
    r?;
    if fua {
        image.flush().await?;
    }
    Ok(None)
}

async fn accept_failed(e: &std::io::Error) {
    // Out of descriptors or a connection reset before accept: keep serving,
    // but do not spin.
    tracing::warn!(error = %e, "accepting an NBD connection failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A reply on its way to the writer task.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    kind: ReplyKind,
}

/// What a reply answers, for its shape once structured replies are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    /// No payload on success: a simple reply either way.
    Plain,
    /// A READ at `offset`: one `OFFSET_DATA` chunk.
    Read { offset: u64 },
    /// A `BLOCK_STATUS` chunk, its payload already encoded.
    BlockStatus,
}

/// A reply's header (simple, or a chunk header with the fields that
/// precede its payload), at most 20 + 8 bytes.
struct Head {
    bytes: [u8; proto::STRUCTURED_HEADER_LEN + 8],
    len: usize,
}

impl Head {
    fn new(parts: &[&[u8]]) -> Head {
        let mut head = Head {
            bytes: [0; proto::STRUCTURED_HEADER_LEN + 8],
            len: 0,
        };
        for part in parts {
            head.bytes[head.len..head.len + part.len()].copy_from_slice(part);
            head.len += part.len();
        }
        head
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The header of `reply`. With structured replies a READ is one
/// `OFFSET_DATA` chunk (the spec forbids a simple reply to it), an error is
/// an `ERROR` chunk, block status its own chunk; other successes stay simple.
fn reply_head(reply: &Reply, structured: bool) -> Head {
    let payload = reply.data.as_ref().map_or(0, Bytes::len);
    let chunk = |kind: u16, extra: usize| {
        // Payloads are bounded by MAX_PAYLOAD (32 MiB) or a block-status list.
        let len = u32::try_from(payload + extra).expect("a reply payload fits NBD's 32 bits");
        proto::structured_header(proto::REPLY_FLAG_DONE, kind, reply.cookie, len)
    };
    if !structured {
        return Head::new(&[&proto::simple_reply(reply.error, reply.cookie)]);
    }
    if reply.error != 0 {
        // The error, then an empty message (its length is a u16).
        let mut body = [0u8; 6];
        body[..4].copy_from_slice(&reply.error.to_be_bytes());
        return Head::new(&[&chunk(proto::REPLY_TYPE_ERROR, 6), &body]);
    }
    match reply.kind {
        ReplyKind::Read { .. } if payload == 0 => Head::new(&[&chunk(proto::REPLY_TYPE_NONE, 0)]),
        ReplyKind::Read { offset } => Head::new(&[
            &chunk(proto::REPLY_TYPE_OFFSET_DATA, 8),
            &offset.to_be_bytes(),
        ]),
        ReplyKind::BlockStatus => Head::new(&[&chunk(proto::REPLY_TYPE_BLOCK_STATUS, 0)]),
        ReplyKind::Plain => Head::new(&[&proto::simple_reply(0, reply.cookie)]),
    }
}

/// Replies the writer gathers into one vectored write at most.
const MAX_REPLY_BATCH: usize = 64;

/// Writes replies as they complete: everything already queued goes out as
/// one vectored write and one flush. `BufWriter` copies a batch smaller than
/// its buffer (a burst of 4 KiB replies costs one syscall) and hands a larger
/// one straight to the socket as `writev`, so a 1 MiB payload is neither
/// copied nor split from its header.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    dead: CancellationToken,
) -> std::io::Result<()> {
    let result = async {
        let mut batch = Vec::with_capacity(MAX_REPLY_BATCH);
        let mut heads = Vec::with_capacity(MAX_REPLY_BATCH);
        while rx.recv_many(&mut batch, MAX_REPLY_BATCH).await > 0 {
            heads.clear();
            heads.extend(batch.iter().map(|r: &Reply| reply_head(r, structured)));
            let mut slices = Vec::with_capacity(batch.len() * 2);
            for (head, reply) in heads.iter().zip(&batch) {
                slices.push(IoSlice::new(head.as_slice()));
                if let Some(data) = &reply.data {
                    slices.push(IoSlice::new(data));
                }
            }
            write_all_vectored(&mut wr, &mut slices).await?;
            drop(slices);
            batch.clear();
        }
        wr.flush().await?;
        wr.shutdown().await
    }
    .await;
    if result.is_err() {
        dead.cancel();
    }
    result
}

/// Writes every byte of `slices`, advancing them past what was written.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    wr.flush().await
}
