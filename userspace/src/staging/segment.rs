//! A segment: the data messages of one write stream, recorded as they came
//! (each extent with its own checksum, zero-skipped and compressed by the
//! sender), framed and checksummed whole.
//!
//! Layout (integers little-endian): `TERNSTG1`, epoch (u64), seq (u64),
//! message count (u32), then per message its length (u32) and a protobuf
//! `tern.v1.WriteRequest` holding an `Extent` or an `ExtentBatch`; last, the
//! blake3 of every byte before it.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::rpc::pb::{self, write_request};

/// A segment is closed and stored once it holds this many bytes.
pub const SEGMENT_BYTES: usize = 16 << 20;

const MAGIC: &[u8; 8] = b"TERNSTG1";
const HEADER: usize = 8 + 8 + 8 + 4;
const TRAILER: usize = 32;

/// What is wrong with a segment's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("it is {0} bytes, shorter than a segment's frame")]
    Short(usize),
    #[error("it does not start with a segment's magic")]
    Magic,
    #[error("its checksum does not match its bytes")]
    Checksum,
    #[error(
        "it says epoch {inside} and seq {seq_inside}, but is named for epoch {named} and seq {seq_named}"
    )]
    Misnamed {
        inside: u64,
        seq_inside: u64,
        named: u64,
        seq_named: u64,
    },
    #[error("message {index} runs past the end")]
    Truncated { index: u32 },
    #[error("message {index} does not decode: {error}")]
    Decode { index: u32, error: String },
    #[error("message {index} is not an extent or a batch")]
    NotData { index: u32 },
    #[error("{0} bytes follow the last message")]
    Trailing(usize),
}

/// A segment being filled, or read back.
#[derive(Debug, Default)]
pub struct Segment {
    pub epoch: u64,
    pub messages: Vec<write_request::Msg>,
    bytes: usize,
}

impl Segment {
    pub fn new(epoch: u64) -> Segment {
        Segment {
            epoch,
            messages: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes the messages take encoded.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Adds a data message (an extent or a batch); anything else is not
    /// recorded and is refused.
    pub fn push(&mut self, msg: write_request::Msg) -> Result<(), SegmentError> {
        match &msg {
            write_request::Msg::Extent(_) | write_request::Msg::Batch(_) => {}
            _ => {
                return Err(SegmentError::NotData {
                    index: u32::try_from(self.messages.len()).unwrap_or(u32::MAX),
                });
            }
        }
        self.bytes += encoded_len(&msg) + 4;
        self.messages.push(msg);
        Ok(())
    }

    /// The stored form, as `seq`.
    pub fn encode(&self, seq: u64) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + self.bytes + TRAILER);
        out.put_slice(MAGIC);
        out.put_u64_le(self.epoch);
        out.put_u64_le(seq);
        out.put_u32_le(
            u32::try_from(self.messages.len()).expect("a segment holds < 2^32 messages"),
        );
        for msg in &self.messages {
            let request = pb::WriteRequest {
                msg: Some(msg.clone()),
            };
            out.put_u32_le(
                u32::try_from(request.encoded_len()).expect("a message is at most 64 MiB"),
            );
            request
                .encode(&mut out)
                .expect("a BytesMut grows to fit the message");
        }
        let sum = blake3::hash(&out);
        out.put_slice(sum.as_bytes());
        out.freeze()
    }

    /// Reads a stored segment back, checking its checksum, its framing and
    /// that it is the segment its name says (`epoch`, `seq`).
    pub fn decode(data: &[u8], seq: u64, epoch: u64) -> Result<Segment, SegmentError> {
        if data.len() < HEADER + TRAILER {
            return Err(SegmentError::Short(data.len()));
        }
        let (body, sum) = data.split_at(data.len() - TRAILER);
        if &body[..8] != MAGIC {
            return Err(SegmentError::Magic);
        }
        if blake3::hash(body).as_bytes() != sum {
            return Err(SegmentError::Checksum);
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let (inside, seq_inside) = (word(8), word(16));
        if inside != epoch || seq_inside != seq {
            return Err(SegmentError::Misnamed {
                inside,
                seq_inside,
                named: epoch,
                seq_named: seq,
            });
        }
        let count = u32::from_le_bytes(body[24..28].try_into().expect("4 bytes"));
        let mut rest = &body[HEADER..];
        let mut segment = Segment::new(epoch);
        for index in 0..count {
            let Some((len, after)) = rest.split_first_chunk::<4>() else {
                return Err(SegmentError::Truncated { index });
            };
            let len = usize::try_from(u32::from_le_bytes(*len)).expect("u32 fits usize");
            if after.len() < len {
                return Err(SegmentError::Truncated { index });
            }
            let (one, after) = after.split_at(len);
            let request = pb::WriteRequest::decode(one).map_err(|e| SegmentError::Decode {
                index,
                error: e.to_string(),
            })?;
            let msg = request.msg.ok_or(SegmentError::NotData { index })?;
            segment
                .push(msg)
                .map_err(|_| SegmentError::NotData { index })?;
            rest = after;
        }
        if !rest.is_empty() {
            return Err(SegmentError::Trailing(rest.len()));
        }
        Ok(segment)
    }
}

fn encoded_len(msg: &write_request::Msg) -> usize {
    match msg {
        write_request::Msg::Extent(e) => e.encoded_len(),
        write_request::Msg::Batch(b) => b.encoded_len(),
        write_request::Msg::Open(o) => o.encoded_len(),
        write_request::Msg::Barrier(b) => b.encoded_len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(offset: u64, byte: u8) -> write_request::Msg {
        write_request::Msg::Extent(pb::Extent {
            seq: 7,
            offset,
            length: 4096,
            encoding: pb::Encoding::Raw as i32,
            payload: Bytes::from(vec![byte; 4096]),
            blake3: Bytes::from(blake3::hash(&[byte; 4096]).as_bytes().to_vec()),
            leaf_size: 0,
        })
    }

    fn sample() -> Segment {
        let mut s = Segment::new(3);
        s.push(extent(0, 1)).expect("an extent");
        s.push(write_request::Msg::Batch(pb::ExtentBatch {
            extents: vec![],
        }))
        .expect("a batch");
        s.push(extent(8192, 2)).expect("an extent");
        s
    }

    #[test]
    fn a_segment_reads_back_as_written() {
        let s = sample();
        let bytes = s.encode(5);
        let back = Segment::decode(&bytes, 5, 3).expect("decodes");
        assert_eq!(back.messages, s.messages);
        assert_eq!(back.len(), s.len());
    }

    #[test]
    fn damaged_segments_are_refused_without_a_panic() {
        // A store is shared: what comes back may be anything. Mutations of a
        // real segment, with the checksum made right again so the framing
        // itself is exercised.
        let good = sample().encode(5).to_vec();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            let body = bytes.len() - TRAILER;
            for _ in 0..=(next() % 4) {
                let at = usize::try_from(next() % body as u64).expect("fits");
                bytes[at] = u8::try_from(next() & 0xff).expect("a byte");
            }
            let cut = usize::try_from(next() % (body as u64 + 1)).expect("fits");
            bytes.truncate(cut.max(HEADER));
            let sum = blake3::hash(&bytes);
            bytes.extend_from_slice(sum.as_bytes());
            // Refused or read: never a panic.
            let _ = Segment::decode(&bytes, 5, 3);
        }
    }

    #[test]
    fn every_damage_is_named() {
        let bytes = sample().encode(5);
        let mut flipped = bytes.to_vec();
        flipped[40] ^= 1;
        assert_eq!(
            Segment::decode(&flipped, 5, 3).err(),
            Some(SegmentError::Checksum)
        );
        assert_eq!(
            Segment::decode(&bytes[..bytes.len() - 1], 5, 3).err(),
            Some(SegmentError::Checksum)
        );
        assert_eq!(
            Segment::decode(&bytes[..10], 5, 3).err(),
            Some(SegmentError::Short(10))
        );
        assert!(matches!(
            Segment::decode(&bytes, 6, 3),
            Err(SegmentError::Misnamed { .. })
        ));
        let mut open = Segment::new(1);
        assert!(
            open.push(write_request::Msg::Barrier(pb::Barrier { seq: 1 }))
                .is_err()
        );
    }
}
