//! Fixed-newstyle negotiation: greet, haggle options, pick an export.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::NbdError;
use super::proto::{
    self, ClientFlags, ClientOption, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME,
    InfoRequest, OptionHeader,
};
use super::server::{ExportState, NbdServer};

/// The answer to an option sent before STARTTLS to a server requiring TLS.
const TLS_REQUIRED: &[u8] =
    b"this server requires TLS: send NBD_OPT_STARTTLS first (nbds:// or tls-creds)";
/// Options a client may send before it must choose an export.
const MAX_OPTIONS: usize = 256;
/// Oversized option payloads up to this size are skipped and answered with
/// `NBD_REP_ERR_TOO_BIG`; anything larger closes the connection.
const MAX_SKIPPABLE_OPTION: u32 = 1 << 20;

/// What the options haggled so far have settled, across a STARTTLS.
#[derive(Debug)]
pub(crate) struct Haggle {
    client: ClientFlags,
    /// The server requires TLS before anything but STARTTLS and ABORT.
    tls_required: bool,
    tls_active: bool,
    structured: bool,
    /// The export `base:allocation` was selected for (`SET_META_CONTEXT`).
    allocation_for: Option<Arc<ExportState>>,
    options: usize,
}

/// The transmission phase's terms, once an export is chosen.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub(crate) export: Arc<ExportState>,
    /// Structured replies: every READ reply is a chunk, errors too.
    pub(crate) structured: bool,
    /// `NBD_CMD_BLOCK_STATUS` answers for `base:allocation`.
    pub(crate) allocation: bool,
}

/// How the option haggling ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Go(Negotiated),
    /// The client aborted politely.
    Abort,
    /// STARTTLS was acknowledged: the TLS handshake comes next on the same
    /// stream, then [`negotiate`] again over it.
    StartTls,
}

/// Sends the greeting and reads the client's flags.
pub(crate) async fn greet<S>(stream: &mut S, tls_required: bool) -> Result<Haggle, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello[16..]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    Ok(Haggle {
        client: proto::parse_client_flags(flags)?,
        tls_required,
        tls_active: false,
        structured: false,
        allocation_for: None,
        options: 0,
    })
}

impl Haggle {
    /// The TLS handshake after STARTTLS succeeded: the options so far are
    /// forgotten, as the spec asks (they were sent in the clear).
    pub(crate) fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.allocation_for = None;
    }
}

/// Runs the option haggling until the client picks an export, aborts or
/// starts TLS. Reads straight from the stream (no read-ahead), so nothing
/// of a TLS handshake that follows STARTTLS is swallowed.
#[expect(
    clippy::too_many_lines,
    reason = "the handshake's option loop: one arm per NBD option"
)]
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    server: &NbdServer,
    state: &mut Haggle,
) -> Result<Outcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while state.options < MAX_OPTIONS {
        state.options += 1;
        let mut head = [0u8; proto::OPTION_HEADER_LEN];
        stream.read_exact(&mut head).await?;
        let OptionHeader { option, len } = proto::parse_option_header(&head)?;
        // Before STARTTLS, a server that requires TLS answers every option
        // but STARTTLS and ABORT with ERR_TLS_REQD, whatever its payload.
        let tls_gate = state.tls_required
            && !state.tls_active
            && option != proto::OPT_STARTTLS
            && option != proto::OPT_ABORT;
        if len > proto::MAX_OPTION_LEN {
            if option == proto::OPT_EXPORT_NAME || len > MAX_SKIPPABLE_OPTION {
                return Err(NbdError::OptionTooLarge { option, len });
            }
            let skipped = tokio::io::copy(
                &mut (&mut *stream).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await?;
            if skipped != u64::from(len) {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            let (kind, msg): (u32, &[u8]) = if tls_gate {
                (proto::REP_ERR_TLS_REQD, TLS_REQUIRED)
            } else {
                (proto::REP_ERR_TOO_BIG, b"option payload too large")
            };
            reply(stream, option, kind, msg).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        if tls_gate {
            // No error reply exists for EXPORT_NAME: the spec says to hang up.
            if option == proto::OPT_EXPORT_NAME {
                return Err(NbdError::TlsRequired);
            }
            reply(stream, option, proto::REP_ERR_TLS_REQD, TLS_REQUIRED).await?;
            continue;
        }
        let parsed = match proto::parse_option(option, &data) {
            Ok(parsed) => parsed,
            Err(e) if option == proto::OPT_EXPORT_NAME => return Err(NbdError::BadOption(e)),
            Err(e) => {
                reply(
                    stream,
                    option,
                    proto::REP_ERR_INVALID,
                    e.to_string().as_bytes(),
                )
                .await?;
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                let export = server
                    .find_export(&name)
                    .ok_or_else(|| server.unknown_export(&name))?;
                // No reply header here: size, flags and (unless the client
                // opted out) 124 bytes of zeroes.
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.image.size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !state.client.no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Outcome::Go(state.terms(export)));
            }
            ClientOption::Abort => {
                // The client may already be gone; the spec asks servers to
                // cope with that, so a failed ACK is not an error.
                let _ = reply(stream, option, proto::REP_ACK, &[]).await;
                return Ok(Outcome::Abort);
            }
            ClientOption::List => {
                for export in server.exports() {
                    let mut payload =
                        Vec::with_capacity(4 + export.name.len() + export.description.len());
                    payload.extend_from_slice(&wire_len(export.name.len())?.to_be_bytes());
                    payload.extend_from_slice(export.name.as_bytes());
                    payload.extend_from_slice(export.description.as_bytes());
                    reply(stream, option, proto::REP_SERVER, &payload).await?;
                }
                reply(stream, option, proto::REP_ACK, &[]).await?;
            }
            ClientOption::StartTls => {
                if !server.has_tls() {
                    let msg = b"this server has no TLS; start it with --tls-dir";
                    reply(stream, option, proto::REP_ERR_UNSUP, msg).await?;
                } else if state.tls_active {
                    reply(stream, option, proto::REP_ERR_INVALID, b"TLS is already on").await?;
                } else {
                    reply(stream, option, proto::REP_ACK, &[]).await?;
                    return Ok(Outcome::StartTls);
                }
            }
            ClientOption::StructuredReply => {
                state.structured = true;
                reply(stream, option, proto::REP_ACK, &[]).await?;
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = option == proto::OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, even when it fails.
                    state.allocation_for = None;
                }
                let Some(export) = server.find_export(&req.export) else {
                    let msg = format!("no export named {:?}", req.export);
                    reply(stream, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                if set && !state.structured {
                    let msg = b"metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first";
                    reply(stream, option, proto::REP_ERR_INVALID, msg).await?;
                    continue;
                }
                let chosen = req
                    .queries
                    .iter()
                    .any(|q| q == proto::BASE_ALLOCATION || (!set && q == "base:"))
                    || (!set && req.queries.is_empty());
                if set {
                    state.allocation_for = chosen.then_some(export);
                }
                if chosen {
                    // A LIST reply's id is reserved: 0 (the spec's SHOULD).
                    let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                    let mut payload = id.to_be_bytes().to_vec();
                    payload.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    reply(stream, option, proto::REP_META_CONTEXT, &payload).await?;
                }
                reply(stream, option, proto::REP_ACK, &[]).await?;
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = server.find_export(&req.name) else {
                    let msg = format!(
                        "no export named {:?}; NBD_OPT_LIST shows the exports",
                        req.name
                    );
                    reply(stream, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                send_info(stream, option, &export, &req).await?;
                reply(stream, option, proto::REP_ACK, &[]).await?;
                if option == proto::OPT_GO {
                    return Ok(Outcome::Go(state.terms(export)));
                }
            }
            ClientOption::Unsupported(opt) => {
                reply(
                    stream,
                    opt,
                    proto::REP_ERR_UNSUP,
                    b"option not supported by this server",
                )
                .await?;
            }
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
}

impl Haggle {
    fn terms(&self, export: Arc<ExportState>) -> Negotiated {
        // Contexts chosen for another export do not carry over to this one.
        let allocation = self.structured
            && self
                .allocation_for
                .as_ref()
                .is_some_and(|chosen| Arc::ptr_eq(chosen, &export));
        Negotiated {
            export,
            structured: self.structured,
            allocation,
        }
    }
}

async fn send_info<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    export: &ExportState,
    req: &InfoRequest,
) -> Result<(), NbdError> {
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.image.size().to_be_bytes());
    info.extend_from_slice(&export.transmission_flags().to_be_bytes());
    reply(wr, option, proto::REP_INFO, &info).await?;
    let mut sent = Vec::new();
    for &kind in &req.infos {
        if sent.contains(&kind) {
            continue;
        }
        sent.push(kind);
        let mut payload = kind.to_be_bytes().to_vec();
        match kind {
            INFO_NAME => payload.extend_from_slice(export.name.as_bytes()),
            INFO_DESCRIPTION if !export.description.is_empty() => {
                payload.extend_from_slice(export.description.as_bytes());
            }
            INFO_BLOCK_SIZE => {
                for v in [proto::MIN_BLOCK, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD] {
                    payload.extend_from_slice(&v.to_be_bytes());
                }
            }
            // NBD_INFO_EXPORT went first; unknown types are ignored as the
            // spec asks.
            _ => continue,
        }
        reply(wr, option, proto::REP_INFO, &payload).await?;
    }
    Ok(())
}

/// A length for one of NBD's 32-bit length fields.
fn wire_len(len: usize) -> Result<u32, NbdError> {
    u32::try_from(len).map_err(|source| NbdError::ReplyTooLong { len, source })
}

/// One option reply, header and payload in one write (over TLS: one record).
async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    payload: &[u8],
) -> Result<(), NbdError> {
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(&proto::option_reply_header(
        option,
        kind,
        wire_len(payload.len())?,
    ));
    out.extend_from_slice(payload);
    wr.write_all(&out).await?;
    wr.flush().await?;
    Ok(())
}
