//! One extent on the wire, in both directions: the source's write stream
//! and the destination's `Read` answers share the encoding (RAW, ZSTD or
//! ZERO, with the blake3 of the plain data), so both sides encode and
//! decode it here.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use bytes::Bytes;

use super::pb;
use super::{MAX_EXTENT_LEN, RpcError};
use crate::checktree::{self, Hash};

/// Largest `Extent.leaf_size` accepted (the protocol's bound; a tree's
/// regions are far smaller).
pub const MAX_LEAF_SIZE: u32 = 1 << 30;

/// How an extent's checksum is made (`Extent.leaf_size` on the wire).
#[derive(Clone, Copy)]
pub enum Checksum<'a> {
    /// The blake3 of the data whole: to a destination without leaf checksums.
    Whole,
    /// Over the leaf hashes of the data's pieces cut at multiples of `size`;
    /// `known` gives a piece's leaf hash when the caller already made it from
    /// these very bytes (for its own tree), so it is not hashed again.
    Leaves {
        size: u32,
        known: &'a dyn Fn(&Range<u64>) -> Option<Hash>,
    },
}

/// One extent ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExtent {
    pub offset: u64,
    /// Uncompressed length.
    pub length: u32,
    pub encoding: pb::Encoding,
    pub payload: Bytes,
    /// The checksum of the uncompressed data; empty for zero extents.
    pub blake3: Bytes,
    /// 0: `blake3` is of the data whole; otherwise over the leaf hashes of
    /// its pieces at this size ([`Checksum::Leaves`]).
    pub leaf_size: u32,
}

impl EncodedExtent {
    /// Encodes `data` for `offset`: all zeroes become a zero extent; with a
    /// zstd level the data is compressed when that makes it smaller.
    pub fn encode(
        offset: u64,
        data: Bytes,
        zstd_level: Option<i32>,
    ) -> Result<EncodedExtent, RpcError> {
        EncodedExtent::encode_with(offset, data, zstd_level, Checksum::Whole)
    }

    /// [`EncodedExtent::encode`] with the checksum made as `checksum` says.
    pub fn encode_with(
        offset: u64,
        data: Bytes,
        zstd_level: Option<i32>,
        checksum: Checksum<'_>,
    ) -> Result<EncodedExtent, RpcError> {
        // The wire carries a u32 length; its real limit is checked by the receiver.
        let length = u32::try_from(data.len()).map_err(|_| RpcError::ExtentTooLong {
            offset,
            len: u32::MAX,
            max: MAX_EXTENT_LEN,
        })?;
        if is_zero(&data) {
            return Ok(EncodedExtent::zero(offset, length));
        }
        let (blake3, leaf_size) = match checksum {
            Checksum::Whole => (*blake3::hash(&data).as_bytes(), 0),
            Checksum::Leaves { size, known } => {
                let leaves = piece_hashes(offset, &data, size, known);
                (
                    checktree::leaf_list_hash(leaves.iter().map(|(_, h)| h)),
                    size,
                )
            }
        };
        let blake3 = Bytes::copy_from_slice(&blake3);
        if let Some(level) = zstd_level
            && looks_compressible(&data, level)
        {
            let compressed =
                compress(&data, level).map_err(|source| RpcError::Compress { offset, source })?;
            if data.len() < 8 * PROBE_LEN {
                SMALL.with(|b| b.set(b.get().record(compressed.len() < data.len())));
            }
            if compressed.len() < data.len() {
                return Ok(EncodedExtent {
                    offset,
                    length,
                    encoding: pb::Encoding::Zstd,
                    payload: Bytes::from(compressed),
                    blake3,
                    leaf_size,
                });
            }
        }
        Ok(EncodedExtent {
            offset,
            length,
            encoding: pb::Encoding::Raw,
            payload: data,
            blake3,
            leaf_size,
        })
    }

    /// `length` zero bytes at `offset`.
    pub fn zero(offset: u64, length: u32) -> EncodedExtent {
        EncodedExtent {
            offset,
            length,
            encoding: pb::Encoding::Zero,
            payload: Bytes::new(),
            blake3: Bytes::new(),
            leaf_size: 0,
        }
    }

    /// The wire message for this extent, tagged with `seq`.
    pub(super) fn into_message(self, seq: u64) -> pb::Extent {
        pb::Extent {
            seq,
            offset: self.offset,
            length: self.length,
            encoding: self.encoding.into(),
            payload: self.payload,
            blake3: self.blake3,
            leaf_size: self.leaf_size,
        }
    }
}

/// Pieces of an extent (image offsets) with their leaf hashes.
pub(super) type PieceHashes = Vec<(Range<u64>, Hash)>;

/// The leaf hash of every piece of `data` (at `offset`) cut at multiples of
/// `leaf_size`, taking those `known` has.
fn piece_hashes(
    offset: u64,
    data: &[u8],
    leaf_size: u32,
    known: &dyn Fn(&Range<u64>) -> Option<Hash>,
) -> PieceHashes {
    checktree::pieces(offset, data.len() as u64, u64::from(leaf_size))
        .map(|piece| {
            let hash = known(&piece).unwrap_or_else(|| {
                let at = usize::try_from(piece.start - offset).expect("inside `data`");
                let to = usize::try_from(piece.end - offset).expect("inside `data`");
                checktree::leaf_hash(&data[at..to])
            });
            (piece, hash)
        })
        .collect()
}

/// Refuses a `leaf_size` the protocol does not allow.
pub(super) fn check_leaf_size(offset: u64, leaf_size: u32) -> Result<(), RpcError> {
    let allowed = leaf_size == 0
        || (leaf_size.is_power_of_two() && (4096..=MAX_LEAF_SIZE).contains(&leaf_size));
    if allowed {
        Ok(())
    } else {
        Err(RpcError::BadLeafSize { offset, leaf_size })
    }
}

/// Bytes sampled by [`looks_compressible`], in four slices spread over the extent.
const PROBE_LEN: usize = 16 << 10;

/// A quick guess whether zstd will shrink `data`: compresses a few slices of
/// it. Compressing a whole incompressible extent only to send it raw costs
/// as much CPU as the TLS encryption of it; the probe costs a few percent.
/// A small extent is compressed whole, unless the ones before it on this
/// thread did not compress (see [`Backoff`]).
fn looks_compressible(data: &[u8], level: i32) -> bool {
    if data.len() < 8 * PROBE_LEN {
        return SMALL.with(|b| {
            let (attempt, next) = b.get().attempt();
            b.set(next);
            attempt
        });
    }
    let step = data.len() / 4;
    (0..4).any(|i| {
        let slice = &data[i * step..i * step + PROBE_LEN];
        // Anything that saves at least 1/32 of a slice is worth compressing.
        compress(slice, level).is_ok_and(|c| c.len() + PROBE_LEN / 32 < PROBE_LEN)
    })
}

/// Whether to try zstd on the next small extent. Small extents are too
/// small to probe, and trying each one whole costs more than the rest of
/// its encoding when the data is random: after one that did not compress,
/// the next `stretch` small extents go raw, a stretch that doubles up to
/// [`Backoff::MAX_STRETCH`] while tries keep failing and ends at the first
/// that compresses. Random data then pays one try in 64; compressible data
/// is tried every time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Backoff {
    /// Small extents still to send raw without trying.
    skip: u32,
    /// The length of the last stretch skipped.
    stretch: u32,
}

impl Backoff {
    const MAX_STRETCH: u32 = 64;

    /// Whether to try this extent, and the state after it.
    fn attempt(self) -> (bool, Backoff) {
        if self.skip > 0 {
            (
                false,
                Backoff {
                    skip: self.skip - 1,
                    ..self
                },
            )
        } else {
            (true, self)
        }
    }

    /// The state after a try that did (or did not) make the extent smaller.
    fn record(self, compressed: bool) -> Backoff {
        if compressed {
            return Backoff::default();
        }
        let stretch = (self.stretch * 2).clamp(1, Backoff::MAX_STRETCH);
        Backoff {
            skip: stretch,
            stretch,
        }
    }
}

thread_local! {
    static SMALL: Cell<Backoff> = const { Cell::new(Backoff { skip: 0, stretch: 0 }) };
    /// One compression context per thread, kept: zstd's `bulk::compress`
    /// builds a new one on every call, which costs 10× the compression of a
    /// 4 KiB extent (37 µs against 3.6 µs, measured).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// `data` compressed at `level` as one zstd frame, with this thread's context.
fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some((l, c)) if *l == level => c,
            _ => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        compressor.compress(data)
    })
}

/// One zstd frame decompressed into at most `capacity` bytes, with this
/// thread's context.
fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(frame, capacity)
    })
}

/// The zero blocks of `block` bytes at each end of `data` (blocks counted
/// from its start; the last may be short): the length of the zero head and
/// where the zero tail starts. All zero: `(len, len)`.
pub fn zero_ends(data: &[u8], block: usize) -> (usize, usize) {
    let block = block.max(1);
    let blocks = data.len().div_ceil(block);
    let span = |i: usize| &data[i * block..((i + 1) * block).min(data.len())];
    let head = (0..blocks).take_while(|&i| is_zero(span(i))).count();
    if head == blocks {
        return (data.len(), data.len());
    }
    let tail = (head..blocks)
        .rev()
        .take_while(|&i| is_zero(span(i)))
        .count();
    (head * block, ((blocks - tail) * block).min(data.len()))
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Decodes an extent received from the other side into its plain data,
/// checking encoding, payload size and checksum. A zero extent becomes
/// `length` zero bytes.
pub(super) fn decode(extent: pb::Extent) -> Result<Bytes, RpcError> {
    let pb::Extent {
        offset,
        length,
        encoding,
        payload,
        blake3,
        leaf_size,
        ..
    } = extent;
    check_leaf_size(offset, leaf_size)?;
    let encoding = pb::Encoding::try_from(encoding)
        .ok()
        .filter(|e| *e != pb::Encoding::Unspecified)
        .ok_or(RpcError::BadEncoding { offset, encoding })?;
    if encoding == pb::Encoding::Zero {
        if !payload.is_empty() {
            return Err(RpcError::PayloadLength {
                offset,
                got: payload.len(),
                want: 0,
            });
        }
        return Ok(Bytes::from(vec![0u8; length as usize]));
    }
    let expected: [u8; 32] = blake3
        .as_ref()
        .try_into()
        .map_err(|_| RpcError::MissingChecksum {
            offset,
            got: blake3.len(),
        })?;
    decode_and_verify(offset, length, encoding, payload, &expected, leaf_size).map(|(data, _)| data)
}

/// Decodes a RAW or ZSTD payload of `length` bytes and checks it against
/// `expected` (made as `leaf_size` says, checked by [`check_leaf_size`]).
/// With a `leaf_size`, also gives the leaf hash of each piece checked. CPU
/// work: callers run it on the blocking pool.
pub(super) fn decode_and_verify(
    offset: u64,
    length: u32,
    encoding: pb::Encoding,
    payload: Bytes,
    expected: &[u8; 32],
    leaf_size: u32,
) -> Result<(Bytes, PieceHashes), RpcError> {
    let data = match encoding {
        pb::Encoding::Raw => {
            if payload.len() != length as usize {
                return Err(RpcError::PayloadLength {
                    offset,
                    got: payload.len(),
                    want: length as usize,
                });
            }
            payload
        }
        pb::Encoding::Zstd => {
            // Capacity `length + 1` makes an oversized frame detectable instead of truncated.
            let out = decompress(&payload, length as usize + 1)
                .map_err(|source| RpcError::BadZstd { offset, source })?;
            if out.len() != length as usize {
                return Err(RpcError::ZstdLength {
                    offset,
                    got: out.len(),
                    want: length,
                });
            }
            Bytes::from(out)
        }
        pb::Encoding::Zero | pb::Encoding::Unspecified => {
            unreachable!("zero and unspecified extents are handled before decoding")
        }
    };
    let (sum, pieces) = if leaf_size == 0 {
        (*blake3::hash(&data).as_bytes(), Vec::new())
    } else {
        let pieces = piece_hashes(offset, &data, leaf_size, &|_| None);
        (
            checktree::leaf_list_hash(pieces.iter().map(|(_, h)| h)),
            pieces,
        )
    };
    if &sum != expected {
        return Err(RpcError::ChecksumMismatch {
            offset,
            len: length,
        });
    }
    Ok((data, pieces))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_marks_zero_data_and_compresses_only_when_smaller() {
        let zero = EncodedExtent::encode(0, Bytes::from(vec![0u8; 8192]), Some(1)).expect("zero");
        assert_eq!(zero.encoding, pb::Encoding::Zero);
        assert!(zero.payload.is_empty());

        let text = Bytes::from("tern ".repeat(2000));
        let z = EncodedExtent::encode(4096, text.clone(), Some(1)).expect("zstd");
        assert_eq!(z.encoding, pb::Encoding::Zstd);
        assert!(z.payload.len() < text.len());
        assert_eq!(z.blake3.as_ref(), blake3::hash(&text).as_bytes());

        // Incompressible data goes raw.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let raw = EncodedExtent::encode(0, Bytes::from(noise.clone()), Some(1)).expect("raw");
        assert_eq!(raw.encoding, pb::Encoding::Raw);
        assert_eq!(raw.payload.as_ref(), noise.as_slice());
    }

    #[test]
    fn probe_skips_zstd_for_noise_but_finds_text_in_the_last_quarter() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!looks_compressible(&data, 1));
        let raw = EncodedExtent::encode(0, Bytes::from(data.clone()), Some(1)).expect("raw");
        assert_eq!(raw.encoding, pb::Encoding::Raw);

        let text = "tern ".repeat(1 << 16);
        let tail = data.len() - text.len();
        data[tail..].copy_from_slice(text.as_bytes());
        let z = EncodedExtent::encode(0, Bytes::from(data.clone()), Some(1)).expect("zstd");
        assert_eq!(z.encoding, pb::Encoding::Zstd);
        assert_eq!(z.blake3.as_ref(), blake3::hash(&data).as_bytes());
    }

    #[test]
    fn failed_tries_skip_a_doubling_stretch_and_one_success_ends_it() {
        let mut b = Backoff::default();
        let mut tried = 0;
        for _ in 0..1000 {
            let (attempt, next) = b.attempt();
            b = next;
            if attempt {
                tried += 1;
                b = b.record(false);
            }
        }
        // 1 + 2 + 4 + ... + 64, then one in 65: random data is rarely tried.
        assert!((20..=30).contains(&tried), "tried {tried} of 1000");
        b = Backoff::default().record(false).record(false);
        assert_eq!(b.skip, 2);
        b = b.record(true);
        assert_eq!(b, Backoff::default());
        assert!(b.attempt().0, "after a success every extent is tried");
    }

    #[test]
    fn text_after_a_long_run_of_noise_is_compressed_again_soon() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            Bytes::from(
                (0..4096)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            )
        };
        for _ in 0..500 {
            let e = EncodedExtent::encode(0, noise(), Some(1)).expect("raw");
            assert_eq!(e.encoding, pb::Encoding::Raw);
        }
        let text = Bytes::from("tern ".repeat(800));
        let first_compressed = (0..=Backoff::MAX_STRETCH + 1).find(|_| {
            EncodedExtent::encode(0, text.clone(), Some(1))
                .expect("encode")
                .encoding
                == pb::Encoding::Zstd
        });
        assert!(
            first_compressed.is_some(),
            "text was never compressed again"
        );
        let e = EncodedExtent::encode(0, text.clone(), Some(1)).expect("encode");
        assert_eq!(
            e.encoding,
            pb::Encoding::Zstd,
            "compressible data is tried every time"
        );
    }

    #[test]
    fn zero_ends_are_whole_blocks_of_zeroes_at_each_end() {
        let mut data = vec![0u8; 10 * 4096 + 100];
        assert_eq!(zero_ends(&data, 4096), (data.len(), data.len()));
        data[2 * 4096 + 5] = 1;
        data[6 * 4096] = 1;
        // Blocks 0–1 zero, 2–6 data, 7–9 and the short 10th zero.
        assert_eq!(zero_ends(&data, 4096), (2 * 4096, 7 * 4096));
        data[10 * 4096 + 99] = 1;
        assert_eq!(zero_ends(&data, 4096), (2 * 4096, data.len()));
        data[0] = 1;
        assert_eq!(zero_ends(&data, 4096), (0, data.len()));
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        for pos in [0usize, 1, 7, 8, 4095, 4096, 8190] {
            let mut data = vec![0u8; 8191];
            assert!(is_zero(&data));
            data[pos] = 1;
            assert!(!is_zero(&data), "byte {pos}");
        }
    }

    #[test]
    fn zstd_frame_of_the_wrong_length_is_refused() {
        let data = vec![5u8; 1000];
        let frame = Bytes::from(zstd::bulk::compress(&data, 1).expect("compress"));
        let hash = *blake3::hash(&data).as_bytes();
        assert!(decode_and_verify(0, 1000, pb::Encoding::Zstd, frame.clone(), &hash, 0).is_ok());
        assert!(matches!(
            decode_and_verify(0, 999, pb::Encoding::Zstd, frame.clone(), &hash, 0),
            Err(RpcError::ZstdLength { .. })
        ));
        assert!(matches!(
            decode_and_verify(0, 1001, pb::Encoding::Zstd, frame, &hash, 0),
            Err(RpcError::ZstdLength { .. })
        ));
    }

    #[test]
    fn decode_round_trips_every_encoding_and_refuses_a_bad_checksum() {
        let text = Bytes::from("tern ".repeat(2000));
        for data in [text.clone(), Bytes::from(vec![0u8; 4096])] {
            for level in [None, Some(1)] {
                let extent = EncodedExtent::encode(4096, data.clone(), level).expect("encode");
                assert_eq!(decode(extent.into_message(1)).expect("decode"), data);
            }
        }
        let mut bad = EncodedExtent::encode(0, text, Some(1))
            .expect("encode")
            .into_message(1);
        bad.blake3 = Bytes::from(vec![0u8; 32]);
        assert!(matches!(
            decode(bad),
            Err(RpcError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_leaf_checksum_covers_every_piece_whether_its_leaf_was_known_or_hashed() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| u8::try_from(i.wrapping_mul(2_654_435_761) >> 24).expect("a byte"))
            .collect();
        let offset = 3 * 16384 + 4096;
        let pieces: Vec<Range<u64>> = checktree::pieces(offset, data.len() as u64, 16384).collect();
        assert_eq!(pieces.first(), Some(&(offset..4 * 16384)));
        assert_eq!(pieces.last(), Some(&(9 * 16384..offset + 100_000)));
        assert!(pieces.windows(2).all(|w| w[0].end == w[1].start));
        let leaf = |r: &Range<u64>| {
            let at = usize::try_from(r.start - offset).expect("small");
            let to = usize::try_from(r.end - offset).expect("small");
            checktree::leaf_hash(&data[at..to])
        };
        let want = checktree::leaf_list_hash(pieces.iter().map(leaf).collect::<Vec<_>>().iter());
        // The whole regions' leaves handed in (as the source's reader has them).
        let known = |r: &Range<u64>| (r.end - r.start == 16384).then(|| leaf(r));
        let encode = |known: &dyn Fn(&Range<u64>) -> Option<Hash>| {
            let how = Checksum::Leaves { size: 16384, known };
            EncodedExtent::encode_with(offset, Bytes::from(data.clone()), None, how)
                .expect("encode")
        };
        let with_known = encode(&known);
        let hashed = encode(&|_| None);
        assert_eq!(with_known.blake3.as_ref(), want);
        assert_eq!(hashed.blake3.as_ref(), want);
        assert_eq!(hashed.leaf_size, 16384);
        let whole = EncodedExtent::encode(offset, Bytes::from(data.clone()), None).expect("encode");
        assert_ne!(whole.blake3, hashed.blake3);
        // Decoded: the same pieces come back with their hashes; one flipped bit is refused.
        let (plain, got) = decode_and_verify(
            offset,
            100_000,
            pb::Encoding::Raw,
            hashed.payload.clone(),
            &want,
            16384,
        )
        .expect("verified");
        assert_eq!(plain, data);
        assert_eq!(got.len(), pieces.len());
        assert!(
            got.iter()
                .zip(&pieces)
                .all(|((r, h), p)| r == p && *h == leaf(p))
        );
        let mut bad = data.clone();
        bad[99_999] ^= 1;
        assert!(matches!(
            decode_and_verify(
                offset,
                100_000,
                pb::Encoding::Raw,
                Bytes::from(bad),
                &want,
                16384
            ),
            Err(RpcError::ChecksumMismatch { .. })
        ));
        for leaf_size in [1, 4095, 6000, 1 << 31] {
            assert!(matches!(
                check_leaf_size(0, leaf_size),
                Err(RpcError::BadLeafSize { .. })
            ));
        }
        assert!(check_leaf_size(0, 0).is_ok() && check_leaf_size(0, 1 << 30).is_ok());
    }
}
