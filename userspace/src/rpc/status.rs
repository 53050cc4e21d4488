//! The one place where the replica service's errors become gRPC statuses.

use tonic::{Code, Status};

use super::RpcError;
use crate::checktree::CheckTreeError;

/// A status as a person reads it: the server's message and code, or, when
/// the call never reached the server, the transport's own causes (tonic
/// reports those as "transport error" with code `Unknown`) and, for a TLS
/// failure, what to check.
pub(crate) fn describe(status: &Status) -> String {
    let mut text = format!("{} ({:?})", status.message(), status.code());
    let mut cause = std::error::Error::source(status);
    let mut causes = String::new();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) && !causes.contains(&said) {
            causes.push_str(": ");
            causes.push_str(&said);
        }
        cause = c.source();
    }
    if causes.is_empty() {
        return text;
    }
    text = format!("{}{causes}", status.message());
    let lower = causes.to_lowercase();
    if [
        "certificate",
        "tls",
        "handshake",
        "unknownca",
        "unknown ca",
        "alert",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        text.push_str(
            "; the TLS handshake failed: both hosts need certificates from the same CA (`tern certs init DIR --host SRC --host DST`), \
             the source's --tls-dir its own host's directory, and the destination's certificate must name the host in --to (or --domain)",
        );
    }
    text
}

fn code(err: &RpcError) -> Code {
    match err {
        RpcError::NoOpen
        | RpcError::SecondOpen
        | RpcError::EmptyMessage
        | RpcError::EmptyExtent { .. }
        | RpcError::ExtentTooLong { .. }
        | RpcError::BadEncoding { .. }
        | RpcError::PayloadLength { .. }
        | RpcError::MissingChecksum { .. }
        | RpcError::BadZstd { .. }
        | RpcError::ZstdLength { .. }
        | RpcError::TooManyNodes { .. }
        | RpcError::EmptyRange { .. }
        | RpcError::RangeTooLong { .. }
        | RpcError::BadZstdLevel { .. } => Code::InvalidArgument,
        RpcError::ExtentOutOfBounds { .. } | RpcError::RangeOutOfBounds { .. } => Code::OutOfRange,
        // The data arrived damaged: the sender must resend it.
        RpcError::ChecksumMismatch { .. } => Code::DataLoss,
        RpcError::StaleEpoch { .. } | RpcError::Fenced { .. } | RpcError::NoExport => {
            Code::FailedPrecondition
        }
        RpcError::ShuttingDown => Code::Unavailable,
        RpcError::CheckTree(inner) => match inner {
            CheckTreeError::BadRegionSize(_)
            | CheckTreeError::TooManyRegions { .. }
            | CheckTreeError::NoSuchLevel { .. }
            | CheckTreeError::NoSuchNode { .. } => Code::InvalidArgument,
            CheckTreeError::LeafCount { .. }
            | CheckTreeError::AnswerCount { .. }
            | CheckTreeError::ShapeMismatch { .. }
            | CheckTreeError::Read { .. }
            | CheckTreeError::Task(_) => Code::Internal,
        },
        RpcError::Call { status, .. } => status.code(),
        RpcError::Image { .. }
        | RpcError::EpochFile { .. }
        | RpcError::EpochFileCorrupt { .. }
        | RpcError::Export(_)
        | RpcError::Task(_)
        | RpcError::Connect { .. }
        | RpcError::Serve { .. }
        | RpcError::StreamClosed { .. }
        | RpcError::UnexpectedReply { .. }
        | RpcError::ReadSource { .. }
        | RpcError::Compress { .. } => Code::Internal,
    }
}

impl From<RpcError> for Status {
    fn from(err: RpcError) -> Status {
        let code = code(&err);
        if code == Code::Internal {
            tracing::error!(error = %err, "replica service failure");
        }
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_epoch_is_failed_precondition_with_both_epochs_in_the_message() {
        let status = Status::from(RpcError::StaleEpoch {
            epoch: 3,
            highest: 7,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("epoch 3"));
        assert!(status.message().contains("epoch 7"));
    }

    #[test]
    fn checksum_mismatch_is_data_loss_and_bounds_are_out_of_range() {
        let mismatch = Status::from(RpcError::ChecksumMismatch { offset: 0, len: 1 });
        assert_eq!(mismatch.code(), Code::DataLoss);
        let bounds = Status::from(RpcError::ExtentOutOfBounds {
            offset: 10,
            len: 10,
            size: 15,
        });
        assert_eq!(bounds.code(), Code::OutOfRange);
    }
}
