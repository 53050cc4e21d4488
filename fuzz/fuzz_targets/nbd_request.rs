//! Fuzzes the NBD wire parsers: request headers checked against an export,
//! option headers and payloads, and client flags. None may panic, and
//! whatever `check_request` accepts must lie inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../userspace/src/nbd/proto.rs"]
#[allow(dead_code)]
mod proto;

use proto::{Command, MAX_PAYLOAD, OPTION_HEADER_LEN, REQUEST_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    // Layout: [export size: 8][read-only: 1][request: 28][option header: 16][rest: option payload]
    let Some((size, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_be_bytes(*size);
    let Some((&ro, rest)) = rest.split_first() else {
        return;
    };
    let read_only = ro & 1 == 1;

    if let Some((head, rest)) = rest.split_first_chunk::<REQUEST_HEADER_LEN>() {
        if let Ok(req) = proto::parse_request_header(head) {
            let _ = req.payload_len();
            if let Ok(cmd) = proto::check_request(&req, size, read_only) {
                let (offset, len) = match cmd {
                    Command::Read { offset, len }
                    | Command::Write { offset, len, .. }
                    | Command::Trim { offset, len, .. }
                    | Command::WriteZeroes { offset, len, .. }
                    | Command::BlockStatus { offset, len, .. } => (offset, len),
                    Command::Flush | Command::Disconnect => (0, 0),
                };
                assert!(
                    offset
                        .checked_add(u64::from(len))
                        .is_some_and(|end| end <= size)
                );
                if matches!(cmd, Command::Read { .. } | Command::Write { .. }) {
                    assert!(len <= MAX_PAYLOAD);
                }
                if read_only {
                    assert!(matches!(
                        cmd,
                        Command::Read { .. }
                            | Command::Flush
                            | Command::Disconnect
                            | Command::BlockStatus { .. }
                    ));
                }
            }
        }
        if let Some((opt_head, payload)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() {
            let _ = proto::parse_option_header(opt_head);
            let option =
                u32::from_be_bytes([opt_head[8], opt_head[9], opt_head[10], opt_head[11]]) % 16;
            match proto::parse_option(option, payload) {
                Ok(proto::ClientOption::Go(r) | proto::ClientOption::Info(r)) => {
                    assert_eq!(4 + r.name.len() + 2 + 2 * r.infos.len(), payload.len());
                }
                Ok(
                    proto::ClientOption::ListMetaContext(r) | proto::ClientOption::SetMetaContext(r),
                ) => {
                    let used: usize = r.queries.iter().map(|q| 4 + q.len()).sum();
                    assert_eq!(8 + r.export.len() + used, payload.len());
                }
                _ => {}
            }
        }
    }
    if let Some(flags) = data.first_chunk::<4>() {
        let _ = proto::parse_client_flags(*flags);
    }
});
