//! NBD wire format: constants and pure parsers over byte slices.
//!
//! Nothing here does I/O, so every function can be property-tested and
//! fuzzed; the handshake and transmission code only moves bytes and calls
//! these.

/// `"NBDMAGIC"`, first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle marker from the server, and prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// Information types for `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// The one metadata context served: which parts of the export are holes.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id (chosen by the server; any fixed value will do).
pub const BASE_ALLOCATION_ID: u32 = 1;
// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// Descriptors in one block-status reply at most: a client asks again for
/// the rest (the spec lets a reply cover less than asked).
pub const MAX_STATUS_DESCRIPTORS: usize = 4096;

// Errors carried in replies (NBD's own numbering, equal to Linux errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Block sizes advertised through `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted (a 4096-byte name plus info requests fit).
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest export name the protocol allows.
pub const MAX_NAME_LEN: usize = 4096;

/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A malformed client message in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags this server did not offer.
    #[error("client flags {0:#x} include bits this server did not offer")]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#x} is not IHAVEOPT")]
    OptionMagic(u64),
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the 32-bit client flags; unknown bits end the session (the spec
/// requires the server to drop such a client).
pub fn parse_client_flags(buf: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
    let flags = u32::from_be_bytes(buf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: which option and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option header; a wrong magic ends the session.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, HandshakeError> {
    let magic = u64::from_be_bytes(word(buf, 0));
    if magic != IHAVEOPT {
        return Err(HandshakeError::OptionMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(word(buf, 8)),
        len: u32::from_be_bytes(word(buf, 12)),
    })
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StartTls,
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// Known or unknown options this server answers with `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Why an option's payload was rejected (answered with `NBD_REP_ERR_INVALID`,
/// or for `NBD_OPT_EXPORT_NAME`, which has no error reply, by closing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option {option} has a payload of {len} bytes where {expected} were expected")]
    Length {
        option: u32,
        len: usize,
        expected: &'static str,
    },
    #[error("export name is not valid UTF-8 without NUL bytes")]
    Name,
    #[error("export name is {0} bytes; the limit is 4096")]
    NameTooLong(usize),
}

/// Parses an option's payload (`data` is exactly the `len` bytes announced
/// in the header).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_name(data)?)),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY if !data.is_empty() => {
            Err(OptionError::Length {
                option,
                len: data.len(),
                expected: "0",
            })
        }
        OPT_LIST => Ok(ClientOption::List),
        OPT_STARTTLS => Ok(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => Ok(ClientOption::StructuredReply),
        OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(
            option, data,
        )?)),
        OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(
            option, data,
        )?)),
        OPT_INFO | OPT_GO => {
            let req = parse_info_request(option, data)?;
            Ok(if option == OPT_GO {
                ClientOption::Go(req)
            } else {
                ClientOption::Info(req)
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn parse_info_request(option: u32, data: &[u8]) -> Result<InfoRequest, OptionError> {
    let bad = || OptionError::Length {
        option,
        len: data.len(),
        expected: "4 + name length + 2 + 2 × info count",
    };
    let name_len = data
        .get(..4)
        .map(|b| u32::from_be_bytes(word(b, 0)) as usize)
        .ok_or_else(bad)?;
    let name_end = 4usize.checked_add(name_len).ok_or_else(bad)?;
    let name = parse_name(data.get(4..name_end).ok_or_else(bad)?)?;
    let rest = &data[name_end..];
    let count = rest
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(bad)?;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(bad());
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, infos })
}

fn parse_meta_request(option: u32, data: &[u8]) -> Result<MetaRequest, OptionError> {
    let bad = || OptionError::Length {
        option,
        len: data.len(),
        expected: "4 + name length + 4 + (4 + query length) per query",
    };
    let mut rest = data;
    let export = take_string(&mut rest).ok_or_else(bad)??;
    let count = take_u32(&mut rest).ok_or_else(bad)?;
    // Each query takes at least its 4-byte length: a count the payload
    // cannot hold is refused before anything is allocated for it.
    if count as usize > rest.len() / 4 {
        return Err(bad());
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(take_string(&mut rest).ok_or_else(bad)??);
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(MetaRequest { export, queries })
}

/// A big-endian `u32` off the front of `rest`; `None` if it is too short.
fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_be_bytes(*head))
}

/// A string with a `u32` length prefix off the front of `rest`; `None` if
/// `rest` is too short, `Some(Err)` if the bytes are not a valid string.
fn take_string(rest: &mut &[u8]) -> Option<Result<String, OptionError>> {
    let len = usize::try_from(take_u32(rest)?).ok()?;
    let (bytes, tail) = rest.split_at_checked(len)?;
    *rest = tail;
    Some(parse_name(bytes))
}

fn parse_name(data: &[u8]) -> Result<String, OptionError> {
    if data.len() > MAX_NAME_LEN {
        return Err(OptionError::NameTooLong(data.len()));
    }
    let name = std::str::from_utf8(data).map_err(|_| OptionError::Name)?;
    if name.contains('\0') {
        return Err(OptionError::Name);
    }
    Ok(name.to_owned())
}

/// Encodes an option reply header.
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&reply.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A request header as sent (not yet validated against an export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Payload bytes that follow this header on the wire, whether or not the
    /// request is valid: the reader must consume them to stay in sync.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// A request header whose magic is wrong: the stream is out of sync and the
/// connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request magic {0:#x} is not the NBD request magic; the client is out of sync")]
pub struct BadRequestMagic(pub u32);

/// Parses a 28-byte request header.
pub fn parse_request_header(
    buf: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, BadRequestMagic> {
    let magic = u32::from_be_bytes(word(buf, 0));
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(word(buf, 4)),
        command: u16::from_be_bytes(word(buf, 6)),
        cookie: u64::from_be_bytes(word(buf, 8)),
        offset: u64::from_be_bytes(word(buf, 16)),
        len: u32::from_be_bytes(word(buf, 24)),
    })
}

/// A request checked against the export: what the server will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS` (for the one context, `base:allocation`).
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// Checks a request against an export of `size` bytes. `Err` is the NBD
/// error to reply with (any WRITE payload must still be consumed).
pub fn check_request(req: &RequestHeader, size: u64, read_only: bool) -> Result<Command, u32> {
    let known_flags = match req.command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !known_flags != 0 {
        return Err(EINVAL);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    let in_bounds = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size);
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err(EPERM);
    }
    match req.command {
        CMD_READ | CMD_WRITE if len > MAX_PAYLOAD => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_bounds => Err(ENOSPC),
        CMD_READ | CMD_TRIM if !in_bounds => Err(EINVAL),
        CMD_BLOCK_STATUS if !in_bounds || len == 0 => Err(EINVAL),
        CMD_BLOCK_STATUS => Ok(Command::BlockStatus {
            offset,
            len,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
        }),
        CMD_READ => Ok(Command::Read { offset, len }),
        CMD_WRITE => Ok(Command::Write { offset, len, fua }),
        CMD_TRIM => Ok(Command::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
        }),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_DISC => Ok(Command::Disconnect),
        // CACHE, RESIZE and unknown commands were not offered.
        _ => Err(EINVAL),
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header; `len` is the payload's length.
pub fn structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_HEADER_LEN];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// One `base:allocation` descriptor: a run of `len` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    pub flags: u32,
}

/// The `base:allocation` descriptors of `[offset, offset + len)` given the
/// parts of it that hold data (`data`: sorted, disjoint, inside the range);
/// the rest is a hole that reads as zeroes. They cover the range from its
/// start, in order, never past its end: all of it, or less when `req_one`
/// (one descriptor) or `max` cut the list short.
pub fn allocation_descriptors(
    offset: u64,
    len: u32,
    data: &[std::ops::Range<u64>],
    req_one: bool,
    max: usize,
) -> Vec<Descriptor> {
    let end = offset + u64::from(len);
    let limit = if req_one { 1 } else { max.max(1) };
    let mut out: Vec<Descriptor> = Vec::new();
    let push = |out: &mut Vec<Descriptor>, from: u64, to: u64, flags: u32| {
        if from >= to {
            return;
        }
        let run = u32::try_from(to - from).expect("a run inside a u32-long request");
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += run,
            _ => out.push(Descriptor { len: run, flags }),
        }
    };
    let mut at = offset;
    for r in data {
        let (from, to) = (r.start.clamp(at, end), r.end.clamp(at, end));
        push(&mut out, at, from, STATE_HOLE | STATE_ZERO);
        push(&mut out, from, to, 0);
        at = to.max(at);
        if out.len() > limit {
            break;
        }
    }
    push(&mut out, at, end, STATE_HOLE | STATE_ZERO);
    out.truncate(limit);
    out
}

/// The payload of a `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn block_status_payload(context: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * descriptors.len());
    out.extend_from_slice(&context.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// Maps a Linux errno to the NBD error set (unknown ones become EIO).
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Copies `N` bytes at `at`; callers pass fixed-size buffers, so the range
/// always exists.
fn word<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    buf[at..at + N]
        .try_into()
        .expect("slice of exactly N bytes converts to [u8; N]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(flags: u16, command: u16, offset: u64, len: u32) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&command.to_be_bytes());
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn request_header_round_trips_fields() {
        let req = parse_request_header(&header(1, CMD_WRITE, 4096, 512)).expect("valid");
        assert_eq!(
            req,
            RequestHeader {
                flags: 1,
                command: CMD_WRITE,
                cookie: 0x1122_3344_5566_7788,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(req.payload_len(), 512);
    }

    #[test]
    fn allocation_of_a_hole_and_of_data() {
        let hole = STATE_HOLE | STATE_ZERO;
        let d = |len, flags| Descriptor { len, flags };
        assert_eq!(
            allocation_descriptors(0, 100, &[], false, 8),
            vec![d(100, hole)]
        );
        assert_eq!(
            allocation_descriptors(0, 100, std::slice::from_ref(&(0..100)), true, 8),
            vec![d(100, 0)]
        );
        assert_eq!(
            allocation_descriptors(10, 100, &[20..30, 30..50, 90..110], false, 8),
            vec![d(10, hole), d(30, 0), d(40, hole), d(20, 0)]
        );
        assert_eq!(
            allocation_descriptors(10, 100, &[20..30, 90..110], false, 2),
            vec![d(10, hole), d(10, 0)]
        );
        assert_eq!(
            block_status_payload(7, &[d(4096, hole)]),
            [0, 0, 0, 7, 0, 0, 16, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn go_payload_parses_name_and_info_list() {
        let data = info_payload(b"disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_option(OPT_GO, &data),
            Ok(ClientOption::Go(InfoRequest {
                name: "disk0".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }))
        );
    }

    #[test]
    fn bounds_errors_follow_the_spec() {
        let size = 1 << 20;
        let check = |cmd, off, len| {
            check_request(
                &parse_request_header(&header(0, cmd, off, len)).expect("magic"),
                size,
                false,
            )
        };
        assert_eq!(check(CMD_READ, size - 1, 2), Err(EINVAL));
        assert_eq!(check(CMD_WRITE, size - 1, 2), Err(ENOSPC));
        assert_eq!(check(CMD_WRITE_ZEROES, size, 1), Err(ENOSPC));
        assert_eq!(check(CMD_TRIM, u64::MAX, 1), Err(EINVAL));
        assert_eq!(check(CMD_READ, 0, MAX_PAYLOAD + 1), Err(EINVAL));
        assert_eq!(
            check(CMD_READ, size - 1, 1),
            Ok(Command::Read {
                offset: size - 1,
                len: 1
            })
        );
        assert_eq!(check(7, 0, 0), Err(EINVAL), "block status was not offered");
    }

    #[test]
    fn read_only_export_refuses_every_write_kind_with_eperm() {
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            let req = parse_request_header(&header(0, cmd, 0, 4096)).expect("magic");
            assert_eq!(check_request(&req, 1 << 20, true), Err(EPERM));
        }
        let read = parse_request_header(&header(0, CMD_READ, 0, 4096)).expect("magic");
        assert!(check_request(&read, 1 << 20, true).is_ok());
    }

    #[test]
    fn no_hole_is_only_valid_on_write_zeroes() {
        let wz =
            parse_request_header(&header(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 8)).expect("magic");
        assert_eq!(
            check_request(&wz, 64, false),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 8,
                fua: false,
                may_trim: false
            })
        );
        let w = parse_request_header(&header(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 8)).expect("magic");
        assert_eq!(check_request(&w, 64, false), Err(EINVAL));
    }

    proptest! {
        #[test]
        fn any_request_bytes_parse_or_fail_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), REQUEST_HEADER_LEN),
            size in any::<u64>(),
            ro in any::<bool>(),
        ) {
            let buf: [u8; REQUEST_HEADER_LEN] = bytes.try_into().expect("28 bytes");
            match parse_request_header(&buf) {
                Err(BadRequestMagic(m)) => prop_assert_ne!(m, REQUEST_MAGIC),
                Ok(req) => {
                    if let Ok(cmd) = check_request(&req, size, ro) {
                        // Whatever is accepted is inside the export.
                        let (off, len) = match cmd {
                            Command::Read { offset, len }
                            | Command::Write { offset, len, .. }
                            | Command::Trim { offset, len, .. }
                            | Command::WriteZeroes { offset, len, .. }
                            | Command::BlockStatus { offset, len, .. } => (offset, len),
                            Command::Flush | Command::Disconnect => (0, 0),
                        };
                        let inside = off.checked_add(u64::from(len)).is_some_and(|e| e <= size);
                        prop_assert!(inside, "accepted {:?} outside {} bytes", cmd, size);
                        let payload = matches!(cmd, Command::Read { .. } | Command::Write { .. });
                        prop_assert!(!payload || len <= MAX_PAYLOAD, "accepted oversized {:?}", cmd);
                        let harmless = matches!(
                            cmd,
                            Command::Read { .. } | Command::Flush | Command::Disconnect | Command::BlockStatus { .. }
                        );
                        prop_assert!(!ro || harmless, "read-only export accepted {:?}", cmd);
                    }
                }
            }
        }

        #[test]
        fn valid_requests_are_accepted(
            cmd in prop_oneof![Just(CMD_READ), Just(CMD_WRITE), Just(CMD_TRIM), Just(CMD_WRITE_ZEROES)],
            size in 1u64..(1 << 40),
            off_frac in 0.0f64..1.0,
            len in 0u32..=MAX_PAYLOAD,
            fua in any::<bool>(),
        ) {
            let offset = ((size as f64) * off_frac) as u64;
            let len = len.min((size - offset).min(u64::from(u32::MAX)) as u32);
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let req = parse_request_header(&header(flags, cmd, offset, len)).expect("magic");
            prop_assert!(check_request(&req, size, false).is_ok());
        }

        #[test]
        fn garbage_option_payloads_never_panic(
            option in 0u32..16,
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            match parse_option(option, &data) {
                Ok(ClientOption::Go(r) | ClientOption::Info(r)) => {
                    // A parsed request used every byte it was given.
                    prop_assert_eq!(4 + r.name.len() + 2 + 2 * r.infos.len(), data.len());
                }
                Ok(ClientOption::List | ClientOption::StartTls | ClientOption::StructuredReply) => {
                    prop_assert!(data.is_empty());
                }
                Ok(ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r)) => {
                    let used = 8 + r.export.len() + r.queries.iter().map(|q| 4 + q.len()).sum::<usize>();
                    prop_assert_eq!(used, data.len());
                }
                Ok(_) | Err(_) => {}
            }
        }

        #[test]
        fn meta_requests_round_trip(
            export in "[a-z]{0,12}",
            queries in proptest::collection::vec("[a-z:]{0,20}", 0..6),
        ) {
            let mut data = (export.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in &queries {
                data.extend_from_slice(&(q.len() as u32).to_be_bytes());
                data.extend_from_slice(q.as_bytes());
            }
            let want = MetaRequest { export: export.clone(), queries: queries.clone() };
            prop_assert_eq!(
                parse_option(OPT_SET_META_CONTEXT, &data),
                Ok(ClientOption::SetMetaContext(want))
            );
            // A payload cut anywhere, or one byte too long, is refused.
            for cut in 0..data.len() {
                prop_assert!(parse_option(OPT_LIST_META_CONTEXT, &data[..cut]).is_err());
            }
            data.push(0);
            prop_assert!(parse_option(OPT_LIST_META_CONTEXT, &data).is_err());
        }

        #[test]
        fn allocation_descriptors_tile_the_request_and_match_the_data(
            offset in 0u64..1 << 20,
            len in 1u32..1 << 20,
            cuts in proptest::collection::vec(0u64..1 << 20, 0..12),
            req_one in any::<bool>(),
            max in 1usize..6,
        ) {
            // Sorted, disjoint data runs inside the request, from random cut points.
            let end = offset + u64::from(len);
            let mut points: Vec<u64> = cuts.iter().map(|c| offset + c % u64::from(len)).collect();
            points.sort_unstable();
            points.dedup();
            let data: Vec<std::ops::Range<u64>> =
                points.chunks_exact(2).map(|p| p[0]..p[1]).collect();
            let got = allocation_descriptors(offset, len, &data, req_one, max);
            let limit = if req_one { 1 } else { max };
            prop_assert!(!got.is_empty());
            prop_assert!(got.len() <= limit);
            let covered: u64 = got.iter().map(|d| u64::from(d.len)).sum();
            prop_assert!(covered <= u64::from(len));
            if got.len() < limit {
                prop_assert_eq!(covered, u64::from(len), "a short list covers everything");
            }
            // Every byte's flags agree with the data runs; neighbours differ.
            let mut at = offset;
            for (i, d) in got.iter().enumerate() {
                prop_assert!(d.len > 0);
                if i > 0 {
                    prop_assert_ne!(got[i - 1].flags, d.flags);
                }
                for probe in [at, at + u64::from(d.len) - 1] {
                    let is_data = data.iter().any(|r| r.contains(&probe));
                    prop_assert_eq!(d.flags == 0, is_data, "byte {}", probe);
                }
                at += u64::from(d.len);
            }
            prop_assert!(at <= end);
        }

        #[test]
        fn info_requests_round_trip(
            name in "[a-zA-Z0-9/_.-]{0,64}",
            infos in proptest::collection::vec(any::<u16>(), 0..8),
        ) {
            let data = info_payload(name.as_bytes(), &infos);
            prop_assert_eq!(
                parse_option(OPT_INFO, &data),
                Ok(ClientOption::Info(InfoRequest { name: name.clone(), infos: infos.clone() }))
            );
            // Any truncation is rejected, never misparsed.
            for cut in 0..data.len() {
                prop_assert!(parse_option(OPT_INFO, &data[..cut]).is_err());
            }
        }

        #[test]
        fn option_headers_need_the_magic(bytes in proptest::collection::vec(any::<u8>(), OPTION_HEADER_LEN)) {
            let buf: [u8; OPTION_HEADER_LEN] = bytes.try_into().expect("16 bytes");
            let magic = u64::from_be_bytes(buf[..8].try_into().expect("8"));
            prop_assert_eq!(parse_option_header(&buf).is_ok(), magic == IHAVEOPT);
        }

        #[test]
        fn client_flags_accept_only_offered_bits(flags in any::<u32>()) {
            prop_assert_eq!(parse_client_flags(flags.to_be_bytes()).is_ok(), flags & !3 == 0);
        }
    }
}
