//! The one place where the replica service's errors become gRPC statuses.

use tonic::{Code, Status};

use super::RpcError;
use crate::checktree::CheckTreeError;

/// A status as a person reads it: the server's message and code, or, when
/// the call never reached the server, the transport's own causes (tonic
/// reports those as "transport error" with code `Unknown`).
pub(crate) fn describe(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(cause) => with_causes(status.message(), cause),
        None => format!("{} ({:?})", status.message(), status.code()),
    }
}

/// `first` followed by `cause` and its own causes, each said once, and for a
/// failed TLS handshake what to check: a transport error's own message is
/// only "transport error", its reason is further down the chain.
pub(crate) fn with_causes(first: &str, cause: &(dyn std::error::Error + 'static)) -> String {
    let mut text = first.to_owned();
    let mut next = Some(cause);
    while let Some(c) = next {
        let said = c.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = c.source();
    }
    let lower = text.to_lowercase();
    if ["certificate", "tls", "handshake", "unknownca", "alert"]
        .iter()
        .any(|w| lower.contains(w))
    {
        text.push_str(
            "; the TLS handshake failed: both hosts need certificates from the same CA \
             (`tern certs init DIR --host SRC --host DST`), each side its own host's directory as --tls-dir, \
             and the destination's certificate must name the host given in --to (or --domain)",
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
        | RpcError::EmptyBatch
        | RpcError::BatchTooLarge { .. }
        | RpcError::ExtentTooLong { .. }
        | RpcError::BadEncoding { .. }
        | RpcError::PayloadLength { .. }
        | RpcError::MissingChecksum { .. }
        | RpcError::BadLeafSize { .. }
        | RpcError::BadZstd { .. }
        | RpcError::ZstdLength { .. }
        | RpcError::TooManyNodes { .. }
        | RpcError::EmptyRange { .. }
        | RpcError::RangeTooLong { .. }
        | RpcError::BadZstdLevel { .. } => Code::InvalidArgument,
        RpcError::ExtentOutOfBounds { .. } | RpcError::RangeOutOfBounds { .. } => Code::OutOfRange,
        // The data arrived damaged: the sender must resend it.
        RpcError::ChecksumMismatch { .. } => Code::DataLoss,
        RpcError::StaleEpoch { .. }
        | RpcError::Fenced { .. }
        | RpcError::Promoted { .. }
        | RpcError::SourceAlive { .. }
        | RpcError::NeverConsistent
        | RpcError::NotPromoted
        | RpcError::NoExport
        | RpcError::HashScheme { .. } => Code::FailedPrecondition,
        RpcError::ShuttingDown => Code::Unavailable,
        RpcError::PostCopy(inner) => match inner {
            crate::postcopy::PresenceError::Timeout { .. } => Code::DeadlineExceeded,
            crate::postcopy::PresenceError::Unit { .. }
            | crate::postcopy::PresenceError::MapSize { .. } => Code::InvalidArgument,
            crate::postcopy::PresenceError::OtherUnit { .. } => Code::FailedPrecondition,
            crate::postcopy::PresenceError::Map { .. }
            | crate::postcopy::PresenceError::MapCorrupt { .. }
            | crate::postcopy::PresenceError::Flush(_) => Code::Internal,
        },
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
        | RpcError::PromotionFile { .. }
        | RpcError::PromotionFileCorrupt { .. }
        | RpcError::Export(_)
        | RpcError::Task(_)
        | RpcError::Connect { .. }
        | RpcError::CertificateRefused { .. }
        | RpcError::Serve { .. }
        | RpcError::StreamClosed { .. }
        | RpcError::UnexpectedReply { .. }
        | RpcError::ReadSource { .. }
        | RpcError::SavedTree(_)
        | RpcError::LeafChecksumsUnsupported
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
