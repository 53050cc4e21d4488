//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple
//! replies, and STARTTLS with mutual TLS when asked. What the health check
//! after a cutover needs to read the destination's export as a real client
//! would, over TLS when the export requires it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::proto;

/// TLS for the client: the configuration (trusted authority, our
/// certificate) and the name the server's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

/// Why a client session failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the server's greeting {0:#018x} is not NBD's")]
    NotNbd(u64),
    #[error("the server does not offer the fixed newstyle handshake")]
    NotFixedNewstyle,
    #[error("the server refused {what} (reply {kind:#x}): {message}")]
    Refused {
        what: &'static str,
        kind: u32,
        message: String,
    },
    #[error("{0:?} cannot be checked against a certificate: {1}")]
    ServerName(String, #[source] rustls::pki_types::InvalidDnsNameError),
    #[error("TLS setup failed: {0}")]
    Tls(#[source] rustls::Error),
    #[error("the server's reply is malformed: {0}")]
    Protocol(&'static str),
    #[error("the export is {size} bytes; a read at {offset}+{len} does not fit")]
    OutOfRange { size: u64, offset: u64, len: u32 },
    #[error("the server answered the read with NBD error {0}")]
    ReadFailed(u32),
}

/// An export as the handshake described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub size: u64,
    pub read_only: bool,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Connects to `addr`, opens `export` (over TLS when `tls` is given: the
/// server must accept STARTTLS), reads `len` bytes at `offset`, and
/// disconnects. Every socket operation gives up after `timeout`.
pub fn read_export(
    addr: SocketAddr,
    export: &str,
    tls: Option<&ClientTls>,
    offset: u64,
    len: u32,
    timeout: Duration,
) -> Result<(Opened, Vec<u8>), NbdClientError> {
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(NbdClientError::Connect)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    greet(&mut tcp)?;
    let mut stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            send_option(&mut tcp, proto::OPT_STARTTLS, &[])?;
            let (kind, message) = option_reply(&mut tcp, proto::OPT_STARTTLS)?;
            if kind != proto::REP_ACK {
                return Err(refused("STARTTLS", kind, &message));
            }
            let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                .map_err(|e| NbdClientError::ServerName(tls.server_name.clone(), e))?;
            let conn = rustls::ClientConnection::new(Arc::clone(&tls.config), name)
                .map_err(NbdClientError::Tls)?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    let opened = go(&mut *stream, export)?;
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > opened.size)
    {
        return Err(NbdClientError::OutOfRange {
            size: opened.size,
            offset,
            len,
        });
    }
    stream.write_all(&request(proto::CMD_READ, 1, offset, len))?;
    stream.flush()?;
    let mut head = [0u8; 16];
    stream.read_exact(&mut head)?;
    if head[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() || head[8..] != 1u64.to_be_bytes() {
        return Err(NbdClientError::Protocol(
            "the read's reply is not a simple reply to it",
        ));
    }
    let error = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if error != 0 {
        return Err(NbdClientError::ReadFailed(error));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    // A polite goodbye; the server may close first, which is fine.
    let _ = stream
        .write_all(&request(proto::CMD_DISC, 2, 0, 0))
        .and_then(|()| stream.flush());
    Ok((opened, data))
}

/// Reads the greeting and answers it (`NBD_OPT_GO` sends no padding either way).
fn greet(tcp: &mut TcpStream) -> Result<(), NbdClientError> {
    let mut hello = [0u8; 18];
    tcp.read_exact(&mut hello)?;
    let magic = u64::from_be_bytes(hello[..8].try_into().expect("8 bytes"));
    if magic != proto::NBD_MAGIC || hello[8..16] != proto::IHAVEOPT.to_be_bytes() {
        return Err(NbdClientError::NotNbd(magic));
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::NotFixedNewstyle);
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let mut ours = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        ours |= proto::FLAG_C_NO_ZEROES;
    }
    tcp.write_all(&ours.to_be_bytes())?;
    Ok(())
}

/// `NBD_OPT_GO` for `export`: its size and whether it is read-only.
fn go(stream: &mut dyn Stream, export: &str) -> Result<Opened, NbdClientError> {
    let name_len = u32::try_from(export.len())
        .map_err(|_| NbdClientError::Protocol("export name longer than 4 GiB"))?;
    let mut payload = name_len.to_be_bytes().to_vec();
    payload.extend_from_slice(export.as_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    send_option(stream, proto::OPT_GO, &payload)?;
    let mut opened = None;
    loop {
        let (kind, body) = option_reply(stream, proto::OPT_GO)?;
        match kind {
            proto::REP_INFO
                if body.len() >= 12 && body[..2] == proto::INFO_EXPORT.to_be_bytes() =>
            {
                let size = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([body[10], body[11]]);
                opened = Some(Opened {
                    size,
                    read_only: flags & proto::FLAG_READ_ONLY != 0,
                });
            }
            proto::REP_INFO => {}
            proto::REP_ACK => {
                return opened.ok_or(NbdClientError::Protocol(
                    "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT",
                ));
            }
            other => return Err(refused("NBD_OPT_GO", other, &body)),
        }
    }
}

fn send_option(stream: &mut dyn Stream, option: u32, payload: &[u8]) -> Result<(), NbdClientError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| NbdClientError::Protocol("option payload longer than 4 GiB"))?;
    let mut out = proto::IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    stream.write_all(&out)?;
    stream.flush()?;
    Ok(())
}

/// One option reply to `option`: its type and payload (bounded).
fn option_reply(stream: &mut dyn Stream, option: u32) -> Result<(u32, Vec<u8>), NbdClientError> {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head)?;
    if head[..8] != proto::OPTION_REPLY_MAGIC.to_be_bytes() || head[8..12] != option.to_be_bytes() {
        return Err(NbdClientError::Protocol(
            "an option reply with the wrong magic or option",
        ));
    }
    let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    if len > proto::MAX_OPTION_LEN {
        return Err(NbdClientError::Protocol(
            "an option reply longer than 16 KiB",
        ));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok((kind, body))
}

fn refused(what: &'static str, kind: u32, message: &[u8]) -> NbdClientError {
    let hint = match kind {
        proto::REP_ERR_TLS_REQD => " (the export requires TLS: use nbds://)",
        proto::REP_ERR_UNSUP if what == "STARTTLS" => {
            " (the export has no TLS: use HOST:PORT without nbds://)"
        }
        _ => "",
    };
    NbdClientError::Refused {
        what,
        kind,
        message: format!("{}{hint}", String::from_utf8_lossy(message)),
    }
}

fn request(command: u16, cookie: u64, offset: u64, len: u32) -> [u8; proto::REQUEST_HEADER_LEN] {
    let mut r = [0u8; proto::REQUEST_HEADER_LEN];
    r[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&command.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}
