//! Fixed-newstyle negotiation: greet, haggle options, pick an export.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::NbdError;
use super::proto::{
    self, ClientOption, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, InfoRequest,
    OptionHeader,
};
use super::server::{ExportState, NbdServer};

/// Options a client may send before it must choose an export.
const MAX_OPTIONS: usize = 256;
/// Oversized option payloads up to this size are skipped and answered with
/// `NBD_REP_ERR_TOO_BIG`; anything larger closes the connection.
const MAX_SKIPPABLE_OPTION: u32 = 1 << 20;

/// Runs the handshake. `Ok(None)` means the client aborted politely.
#[expect(
    clippy::too_many_lines,
    reason = "the handshake's option loop: one arm per NBD option"
)]
pub(crate) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    server: &NbdServer,
) -> Result<Option<Arc<ExportState>>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello[16..]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await?;
    wr.flush().await?;

    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(flags)?;

    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; proto::OPTION_HEADER_LEN];
        rd.read_exact(&mut head).await?;
        let OptionHeader { option, len } = proto::parse_option_header(&head)?;
        if len > proto::MAX_OPTION_LEN {
            if option == proto::OPT_EXPORT_NAME || len > MAX_SKIPPABLE_OPTION {
                return Err(NbdError::OptionTooLarge { option, len });
            }
            let skipped =
                tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
            if skipped != u64::from(len) {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            reply_error(
                wr,
                option,
                proto::REP_ERR_TOO_BIG,
                "option payload too large",
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let parsed = match proto::parse_option(option, &data) {
            Ok(parsed) => parsed,
            Err(e) if option == proto::OPT_EXPORT_NAME => return Err(NbdError::BadOption(e)),
            Err(e) => {
                reply_error(wr, option, proto::REP_ERR_INVALID, &e.to_string()).await?;
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
                if !client.no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(Some(export));
            }
            ClientOption::Abort => {
                // The client may already be gone; the spec asks servers to
                // cope with that, so a failed ACK is not an error.
                let _ = reply(wr, option, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            ClientOption::List => {
                for export in server.exports() {
                    let mut payload =
                        Vec::with_capacity(4 + export.name.len() + export.description.len());
                    payload.extend_from_slice(&wire_len(export.name.len())?.to_be_bytes());
                    payload.extend_from_slice(export.name.as_bytes());
                    payload.extend_from_slice(export.description.as_bytes());
                    reply(wr, option, proto::REP_SERVER, &payload).await?;
                }
                reply(wr, option, proto::REP_ACK, &[]).await?;
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = server.find_export(&req.name) else {
                    let msg = format!(
                        "no export named {:?}; NBD_OPT_LIST shows the exports",
                        req.name
                    );
                    reply_error(wr, option, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                send_info(wr, option, &export, &req).await?;
                reply(wr, option, proto::REP_ACK, &[]).await?;
                if option == proto::OPT_GO {
                    return Ok(Some(export));
                }
            }
            ClientOption::Unsupported(opt) => {
                reply_error(
                    wr,
                    opt,
                    proto::REP_ERR_UNSUP,
                    "option not supported by this server",
                )
                .await?;
            }
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
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

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    payload: &[u8],
) -> Result<(), NbdError> {
    wr.write_all(&proto::option_reply_header(
        option,
        kind,
        wire_len(payload.len())?,
    ))
    .await?;
    wr.write_all(payload).await?;
    wr.flush().await?;
    Ok(())
}

async fn reply_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    message: &str,
) -> Result<(), NbdError> {
    reply(wr, option, kind, message.as_bytes()).await
}
