//! Typed client of the replica service, used by the source agent: connect
//! over mutual TLS, stream extents with a bounded window of unacknowledged
//! ones, place barriers, and find differing regions by descending the
//! destination's checksum tree.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::pb::{self, replica_client, write_request, write_response};
use super::{
    BATCH_BYTES, EncodedExtent, MAX_BATCH_EXTENTS, MAX_EXTENT_LEN, MAX_MESSAGE_LEN,
    MAX_NODES_PER_CALL, RpcError, TlsMaterial,
};
use crate::checktree::{CheckTree, Descent, HASH_LEN, HASH_SCHEME, Hash, Shape};

/// HTTP/2 windows large enough that one stream can carry gigabytes per second.
pub(crate) const STREAM_WINDOW: u32 = 16 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 64 << 20;

/// What `Info` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Info {
    pub image_size: u64,
    pub epoch: u64,
    pub export_writable: bool,
    pub max_extent_len: u32,
    /// Most extents per batch; 0: the destination takes single extents only.
    pub max_batch_extents: u32,
    /// Extents may carry checksums over leaf hashes (`Checksum::Leaves`).
    pub leaf_checksums: bool,
    /// Where a post-copy into the destination stands.
    pub postcopy: crate::postcopy::PresenceSnapshot,
    /// The agent's NBD export, if it serves one.
    pub nbd: Option<NbdExport>,
    /// The standing promotion, if the replica was promoted (failover).
    pub promotion: Option<super::Promotion>,
}

/// Where a destination agent serves its NBD export, as a client on its own
/// host reaches it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NbdExport {
    /// `HOST:PORT`, or a unix socket's path (starting with `/`).
    pub address: String,
    pub name: String,
    pub tls: bool,
    /// Advertised writable before the switch (`--nbd-advertise-writable`).
    pub advertised_writable: bool,
}

/// Client of one destination.
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    inner: replica_client::ReplicaClient<Channel>,
}

impl ReplicaClient {
    /// Connects to `addr` (`host:port`). With `tls`, mutual TLS using that
    /// directory, checking the server's certificate for `domain` (default:
    /// the host part of `addr`); without, plain HTTP/2.
    pub async fn connect(
        addr: &str,
        tls: Option<&TlsMaterial>,
        domain: Option<&str>,
    ) -> Result<ReplicaClient, RpcError> {
        let connect_err = |source| RpcError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(connect_err)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            // A cut link stalls TCP without an error for minutes; HTTP/2 pings
            // notice within seconds, so the source reconnects and resumes.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.client_config(domain))
                .map_err(connect_err)?;
        }
        let channel = endpoint.connect().await.map_err(connect_err)?;
        let mut client = ReplicaClient::from_channel(channel);
        if tls.is_some() {
            // With TLS 1.3 the server checks our certificate after the
            // client considers the handshake done: a refusal shows up only
            // as a connection closed under the first call. Make that call
            // here, so it reads as what it is.
            if let Err(RpcError::Call { status, .. }) = client.info().await
                && std::error::Error::source(&status).is_some()
            {
                return Err(RpcError::CertificateRefused {
                    addr: addr.to_owned(),
                    transport: super::status::describe(&status),
                });
            }
        }
        Ok(client)
    }

    /// Wraps an established channel (e.g. one with a custom TLS setup).
    pub fn from_channel(channel: Channel) -> ReplicaClient {
        ReplicaClient {
            inner: replica_client::ReplicaClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_LEN)
                .max_encoding_message_size(MAX_MESSAGE_LEN),
        }
    }

    /// The `Info` call, with the post-copy map or without.
    async fn info_reply(&mut self, postcopy_map: bool) -> Result<pb::InfoResponse, RpcError> {
        Ok(self
            .inner
            .info(pb::InfoRequest { postcopy_map })
            .await
            .map_err(|status| RpcError::Call {
                call: "Info",
                status,
            })?
            .into_inner())
    }

    /// The `SetExportWritable` call.
    async fn export_writable(
        &mut self,
        request: pb::SetExportWritableRequest,
    ) -> Result<pb::SetExportWritableResponse, RpcError> {
        Ok(self
            .inner
            .set_export_writable(request)
            .await
            .map_err(|status| RpcError::Call {
                call: "SetExportWritable",
                status,
            })?
            .into_inner())
    }

    pub async fn info(&mut self) -> Result<Info, RpcError> {
        let info = self.info_reply(false).await?;
        Ok(Info {
            image_size: info.image_size,
            epoch: info.epoch,
            export_writable: info.export_writable,
            max_extent_len: info.max_extent_len,
            max_batch_extents: info.max_batch_extents,
            leaf_checksums: info.leaf_checksums,
            postcopy: info.postcopy.as_ref().map(Into::into).unwrap_or_default(),
            nbd: info.nbd.map(|n| NbdExport {
                address: n.address,
                name: n.name,
                tls: n.tls,
                advertised_writable: n.advertised_writable,
            }),
            promotion: info.promotion.map(Into::into),
        })
    }

    /// Says the source writing with `epoch` is alive, how far behind the
    /// replica is (`backlog_bytes`), and up to when (its clock, Unix ms)
    /// every write it saw is there. `leaving`: it stops on purpose.
    pub async fn heartbeat(
        &mut self,
        epoch: u64,
        backlog_bytes: u64,
        consistent_as_of_unix_ms: u64,
        leaving: bool,
    ) -> Result<u64, RpcError> {
        let reply = self
            .inner
            .heartbeat(pb::HeartbeatRequest {
                epoch,
                backlog_bytes,
                consistent_as_of_unix_ms,
                sent_unix_ms: super::failover::unix_ms_now(),
                leaving,
            })
            .await
            .map_err(|status| RpcError::Call {
                call: "Heartbeat",
                status,
            })?;
        Ok(reply.into_inner().epoch)
    }

    /// Promotes the replica to primary (failover); see `Promote`.
    pub async fn promote(
        &mut self,
        reason: &str,
        force: bool,
    ) -> Result<super::Promotion, RpcError> {
        let reply = self
            .inner
            .promote(pb::PromoteRequest {
                force,
                reason: reason.to_owned(),
            })
            .await
            .map_err(|status| RpcError::Call {
                call: "Promote",
                status,
            })?;
        Ok(reply.into_inner().into())
    }

    /// Demotes a promoted replica (after a failback); returns its new epoch.
    pub async fn demote(&mut self, epoch: u64) -> Result<u64, RpcError> {
        let reply = self
            .inner
            .demote(pb::DemoteRequest { epoch })
            .await
            .map_err(|status| RpcError::Call {
                call: "Demote",
                status,
            })?;
        Ok(reply.into_inner().epoch)
    }

    /// Opens a write stream fenced by `epoch`, keeping at most `window`
    /// messages (extents or batches) unacknowledged.
    pub async fn open_writer(
        &mut self,
        epoch: u64,
        window: usize,
    ) -> Result<ExtentWriter, RpcError> {
        self.open_stream(epoch, window, false).await
    }

    /// Opens a post-copy fill stream: its extents land only in units the
    /// destination still misses (see `Open.fill`).
    pub async fn open_fill_writer(
        &mut self,
        epoch: u64,
        window: usize,
    ) -> Result<ExtentWriter, RpcError> {
        self.open_stream(epoch, window, true).await
    }

    async fn open_stream(
        &mut self,
        epoch: u64,
        window: usize,
        fill: bool,
    ) -> Result<ExtentWriter, RpcError> {
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window + 2);
        let open = pb::WriteRequest {
            msg: Some(write_request::Msg::Open(pb::Open { epoch, fill })),
        };
        tx.send(open)
            .await
            .map_err(|_| RpcError::StreamClosed { what: "write" })?;
        let mut acks = self
            .inner
            .write(ReceiverStream::new(rx))
            .await
            .map_err(|status| RpcError::Call {
                call: "Write",
                status,
            })?
            .into_inner();
        let opened = match next_reply(&mut acks).await? {
            write_response::Msg::Opened(opened) => opened,
            other => {
                return Err(RpcError::UnexpectedReply {
                    want: "opened",
                    got: format!("{other:?}"),
                });
            }
        };
        Ok(ExtentWriter {
            tx,
            acks,
            window,
            next_seq: 1,
            unacked: VecDeque::new(),
            epoch: opened.epoch,
            image_size: opened.image_size,
            max_extent_len: opened.max_extent_len,
            max_batch_extents: opened.max_batch_extents.min(MAX_BATCH_EXTENTS),
            leaf_checksums: opened.leaf_checksums,
        })
    }

    /// Hashes of the destination's checksum-tree nodes `indices` at `level`.
    pub async fn tree_nodes(
        &mut self,
        region_size: u64,
        level: u32,
        indices: &[u64],
    ) -> Result<TreeNodes, RpcError> {
        let reply = self
            .inner
            .get_checksum_tree(pb::ChecksumTreeRequest {
                region_size,
                level,
                indices: indices.to_vec(),
                hash_scheme: HASH_SCHEME,
            })
            .await
            .map_err(|status| RpcError::Call {
                call: "GetChecksumTree",
                status,
            })?
            .into_inner();
        if reply.hash_scheme != HASH_SCHEME {
            return Err(RpcError::HashScheme {
                theirs: reply.hash_scheme,
                ours: HASH_SCHEME,
            });
        }
        let hashes = reply
            .hashes
            .iter()
            .map(|h| {
                Hash::try_from(h.as_ref()).map_err(|_| RpcError::UnexpectedReply {
                    want: "32-byte hashes",
                    got: format!("a {}-byte hash", h.len()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TreeNodes {
            image_size: reply.image_size,
            leaf_count: reply.leaf_count,
            levels: reply.levels,
            hashes,
        })
    }

    /// Regions (indices, in `local`'s region size) where the destination's
    /// image differs from the image `local` was computed from. Asks only for
    /// the children of differing nodes, one round trip per level.
    pub async fn diff_regions(&mut self, local: &CheckTree) -> Result<Vec<u64>, RpcError> {
        let shape = *local.shape();
        let mut descent = Descent::new(local);
        while let Some((level, indices)) = descent.want() {
            let answer = self.nodes_of(shape, level, indices).await?;
            descent.feed(&answer)?;
        }
        Ok(descent.finish())
    }

    /// The destination's nodes at `level` of the tree of `shape`, in the
    /// order of `indices` (asked in calls of at most [`MAX_NODES_PER_CALL`]);
    /// a destination whose tree has another shape is an error.
    pub async fn nodes_of(
        &mut self,
        shape: Shape,
        level: u32,
        indices: &[u64],
    ) -> Result<Vec<Hash>, RpcError> {
        let mut answer = Vec::with_capacity(indices.len());
        let per_call = usize::try_from(MAX_NODES_PER_CALL).expect("2^16 fits usize");
        for batch in indices.chunks(per_call) {
            let nodes = self.tree_nodes(shape.region_size(), level, batch).await?;
            if nodes.image_size != shape.image_size() || nodes.levels != shape.levels() {
                return Err(RpcError::UnexpectedReply {
                    want: "a tree of the same image size",
                    got: format!(
                        "a tree of {} bytes with {} levels (local: {} bytes, {} levels)",
                        nodes.image_size,
                        nodes.levels,
                        shape.image_size(),
                        shape.levels()
                    ),
                });
            }
            if nodes.hashes.len() != batch.len() {
                return Err(RpcError::UnexpectedReply {
                    want: "one hash per node asked",
                    got: format!("{} hashes for {} nodes", nodes.hashes.len(), batch.len()),
                });
            }
            answer.extend(nodes.hashes);
        }
        Ok(answer)
    }

    /// Reads `ranges` (offset, length; each 1 to [`MAX_EXTENT_LEN`] bytes
    /// inside the image) from the destination's image. Yields each range's
    /// offset and plain data, in the order asked, after checking its blake3
    /// ([`RpcError::ChecksumMismatch`] otherwise). With `zstd_level` the
    /// destination compresses data where that makes it smaller. A bad range
    /// fails the call before any data arrives (`OUT_OF_RANGE` past the end,
    /// `INVALID_ARGUMENT` empty or too long). The stream ends after the
    /// first error.
    pub async fn read_ranges(
        &mut self,
        ranges: &[(u64, u32)],
        zstd_level: Option<i32>,
    ) -> Result<impl Stream<Item = Result<(u64, Bytes), RpcError>> + Send + 'static, RpcError> {
        let request = pb::ReadRequest {
            ranges: ranges
                .iter()
                .map(|&(offset, length)| pb::ReadRange { offset, length })
                .collect(),
            zstd_level,
        };
        let replies = self
            .inner
            .read(request)
            .await
            .map_err(|status| RpcError::Call {
                call: "Read",
                status,
            })?
            .into_inner();
        let reader = RangeReader {
            replies,
            wanted: ranges.iter().copied().collect(),
            next_seq: 0,
            failed: false,
        };
        Ok(stream::unfold(reader, |mut reader| async move {
            if reader.failed {
                return None;
            }
            let next = reader.next().await.transpose()?;
            reader.failed = next.is_err();
            Some((next, reader))
        }))
    }

    /// Cutover: makes the destination's NBD export writable (or read-only).
    pub async fn set_export_writable(
        &mut self,
        epoch: u64,
        writable: bool,
    ) -> Result<bool, RpcError> {
        let reply = self
            .export_writable(pb::SetExportWritableRequest {
                epoch,
                writable,
                postcopy: None,
            })
            .await?;
        Ok(reply.export_writable)
    }

    /// The units a post-copy's destination still misses (one bit per unit
    /// of `unit` bytes, as `PostCopyMap.missing`); `None` when none are.
    pub async fn missing_map(&mut self) -> Result<Option<(u64, Vec<u8>)>, RpcError> {
        let info = self.info_reply(true).await?;
        Ok(info
            .postcopy
            .filter(|p| p.active && !p.missing.is_empty())
            .map(|p| (p.unit, p.missing.to_vec())))
    }

    /// The switch of a post-copy: the destination's export turns writable
    /// with the units set in `missing` (one bit per `unit`, see
    /// `PostCopyMap`) still on the source. Returns the bytes missing.
    pub async fn switch_postcopy(
        &mut self,
        epoch: u64,
        unit: u64,
        missing: Vec<u8>,
    ) -> Result<u64, RpcError> {
        let reply = self
            .export_writable(pb::SetExportWritableRequest {
                epoch,
                writable: true,
                postcopy: Some(pb::PostCopyMap {
                    unit,
                    missing: Bytes::from(missing),
                }),
            })
            .await?;
        Ok(reply.missing_bytes)
    }

    /// The destination's demands of a post-copy, as byte ranges, until
    /// nothing is missing (the stream ends) or `epoch` is fenced.
    pub async fn demands(
        &mut self,
        epoch: u64,
    ) -> Result<impl Stream<Item = Result<Vec<std::ops::Range<u64>>, RpcError>> + use<>, RpcError>
    {
        let call = |status| RpcError::Call {
            call: "Demands",
            status,
        };
        let replies = self
            .inner
            .demands(pb::DemandsRequest { epoch })
            .await
            .map_err(call)?
            .into_inner();
        Ok(replies.map(move |reply| {
            reply.map_err(call).map(|demand| {
                demand
                    .ranges
                    .into_iter()
                    .map(|r| r.offset..r.offset.saturating_add(u64::from(r.length)))
                    .collect()
            })
        }))
    }
}

/// The client's side of one `Read` call: matches each answer to the range
/// it was asked for and decodes it.
struct RangeReader {
    replies: Streaming<pb::ReadResponse>,
    /// Ranges not answered yet, in request order.
    wanted: VecDeque<(u64, u32)>,
    next_seq: u64,
    failed: bool,
}

impl RangeReader {
    async fn next(&mut self) -> Result<Option<(u64, Bytes)>, RpcError> {
        let reply = match self.replies.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) if self.wanted.is_empty() => return Ok(None),
            Ok(None) => return Err(RpcError::StreamClosed { what: "read" }),
            Err(status) => {
                return Err(RpcError::Call {
                    call: "Read",
                    status,
                });
            }
        };
        let extent = reply.extent.ok_or(RpcError::UnexpectedReply {
            want: "an extent",
            got: "an empty read response".into(),
        })?;
        let (offset, length) = self.wanted.pop_front().ok_or(RpcError::UnexpectedReply {
            want: "the end of the read stream",
            got: format!("an extent at {}", extent.offset),
        })?;
        if (extent.seq, extent.offset, extent.length) != (self.next_seq, offset, length) {
            return Err(RpcError::UnexpectedReply {
                want: "the next range asked for",
                got: format!(
                    "range #{} {}+{} where #{} {offset}+{length} was expected",
                    extent.seq, extent.offset, extent.length, self.next_seq
                ),
            });
        }
        self.next_seq += 1;
        // Decompressing and hashing megabytes is CPU work: off the async workers.
        let data = tokio::task::spawn_blocking(move || super::extent::decode(extent)).await??;
        Ok(Some((offset, data)))
    }
}

/// Hashes returned by one `GetChecksumTree` call.
#[derive(Debug, Clone)]
pub struct TreeNodes {
    pub image_size: u64,
    pub leaf_count: u64,
    pub levels: u32,
    pub hashes: Vec<[u8; HASH_LEN]>,
}

/// A write stream: send extents (alone or in batches) and barriers;
/// acknowledgements are awaited when the window is full, at barriers and at
/// `finish`.
#[derive(Debug)]
pub struct ExtentWriter {
    tx: mpsc::Sender<pb::WriteRequest>,
    acks: Streaming<pb::WriteResponse>,
    window: usize,
    next_seq: u64,
    /// The sequence number each message in flight is acknowledged with (a
    /// batch's last extent's), oldest first.
    unacked: VecDeque<u64>,
    epoch: u64,
    image_size: u64,
    max_extent_len: u32,
    max_batch_extents: u32,
    leaf_checksums: bool,
}

impl ExtentWriter {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn max_extent_len(&self) -> u32 {
        self.max_extent_len
    }

    /// Most extents [`ExtentWriter::send_batch`] puts in one message; 1 when
    /// the destination predates batches.
    pub fn max_batch_extents(&self) -> usize {
        self.max_batch_extents.max(1) as usize
    }

    /// Whether extents may carry checksums over leaf hashes
    /// ([`Checksum::Leaves`](super::Checksum::Leaves)).
    pub fn leaf_checksums(&self) -> bool {
        self.leaf_checksums
    }

    /// Sends one extent; waits for an acknowledgement first if the window is full.
    pub async fn send(&mut self, extent: EncodedExtent) -> Result<(), RpcError> {
        if extent.leaf_size != 0 && !self.leaf_checksums {
            return Err(RpcError::LeafChecksumsUnsupported);
        }
        while self.unacked.len() >= self.window {
            self.await_ack().await?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = pb::WriteRequest {
            msg: Some(write_request::Msg::Extent(extent.into_message(seq))),
        };
        self.push(msg).await?;
        self.unacked.push_back(seq);
        Ok(())
    }

    /// Sends `extents`, in order, in as few messages as the destination
    /// allows (one acknowledgement per message instead of per extent): a
    /// 4 KiB extent costs more in messages, wake-ups and acknowledgements
    /// than in bytes. To a destination without batches they go one by one.
    pub async fn send_batch(&mut self, extents: Vec<EncodedExtent>) -> Result<(), RpcError> {
        if !self.leaf_checksums && extents.iter().any(|e| e.leaf_size != 0) {
            return Err(RpcError::LeafChecksumsUnsupported);
        }
        let max = self.max_batch_extents();
        if max == 1 || extents.len() == 1 {
            for extent in extents {
                self.send(extent).await?;
            }
            return Ok(());
        }
        let mut extents = extents.into_iter().peekable();
        while extents.peek().is_some() {
            while self.unacked.len() >= self.window {
                self.await_ack().await?;
            }
            let first = self.next_seq;
            let batch: Vec<pb::Extent> = extents
                .by_ref()
                .take(max)
                .zip(first..)
                .map(|(extent, seq)| extent.into_message(seq))
                .collect();
            let last = first + batch.len() as u64 - 1;
            self.next_seq = last + 1;
            let msg = pb::WriteRequest {
                msg: Some(write_request::Msg::Batch(pb::ExtentBatch {
                    extents: batch,
                })),
            };
            self.push(msg).await?;
            self.unacked.push_back(last);
        }
        Ok(())
    }

    /// Sends a message recorded from another write stream (a staged
    /// migration's segment: an extent or a batch), renumbered for this one.
    /// Barriers and opens are not data: they are refused.
    pub(crate) async fn send_recorded(&mut self, msg: write_request::Msg) -> Result<(), RpcError> {
        let (msg, last) = match msg {
            write_request::Msg::Extent(mut extent) => {
                extent.seq = self.next_seq;
                self.next_seq += 1;
                (write_request::Msg::Extent(extent), self.next_seq - 1)
            }
            write_request::Msg::Batch(mut batch) => {
                if batch.extents.is_empty() {
                    return Err(RpcError::EmptyBatch);
                }
                for extent in &mut batch.extents {
                    extent.seq = self.next_seq;
                    self.next_seq += 1;
                }
                (write_request::Msg::Batch(batch), self.next_seq - 1)
            }
            other => {
                return Err(RpcError::UnexpectedReply {
                    want: "a recorded extent or batch",
                    got: format!("{other:?}"),
                });
            }
        };
        self.send_message(msg, last).await
    }

    /// Sends one data message acknowledged with `seq`, within the window.
    async fn send_message(&mut self, msg: write_request::Msg, seq: u64) -> Result<(), RpcError> {
        while self.unacked.len() >= self.window {
            self.await_ack().await?;
        }
        self.push(pb::WriteRequest { msg: Some(msg) }).await?;
        self.unacked.push_back(seq);
        Ok(())
    }

    /// Waits until every extent sent so far is written and flushed to stable storage.
    pub async fn barrier(&mut self) -> Result<(), RpcError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = pb::WriteRequest {
            msg: Some(write_request::Msg::Barrier(pb::Barrier { seq })),
        };
        self.push(msg).await?;
        while !self.unacked.is_empty() {
            self.await_ack().await?;
        }
        match next_reply(&mut self.acks).await? {
            write_response::Msg::Barrier(ack) if ack.seq == seq => Ok(()),
            other => Err(RpcError::UnexpectedReply {
                want: "the barrier acknowledgement",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Places a final barrier, closes the stream and waits for the server to end it.
    pub async fn finish(mut self) -> Result<(), RpcError> {
        self.barrier().await?;
        drop(self.tx);
        match self.acks.message().await {
            Ok(None) => Ok(()),
            Ok(Some(reply)) => Err(RpcError::UnexpectedReply {
                want: "the end of the stream",
                got: format!("{:?}", reply.msg),
            }),
            Err(status) => Err(RpcError::Call {
                call: "Write",
                status,
            }),
        }
    }

    async fn push(&mut self, msg: pb::WriteRequest) -> Result<(), RpcError> {
        if self.tx.send(msg).await.is_ok() {
            return Ok(());
        }
        // The request stream is gone: the server ended the call; its status says why.
        Err(match self.acks.message().await {
            Err(status) => RpcError::Call {
                call: "Write",
                status,
            },
            Ok(_) => RpcError::StreamClosed { what: "write" },
        })
    }

    async fn await_ack(&mut self) -> Result<(), RpcError> {
        let want = self.unacked.pop_front().ok_or(RpcError::UnexpectedReply {
            want: "nothing",
            got: "a wait for an acknowledgement with none outstanding".into(),
        })?;
        match next_reply(&mut self.acks).await? {
            write_response::Msg::Extent(ack) if ack.seq == want => Ok(()),
            other => Err(RpcError::UnexpectedReply {
                want: "the next extent acknowledgement",
                got: format!("{other:?}"),
            }),
        }
    }
}

async fn next_reply(
    acks: &mut Streaming<pb::WriteResponse>,
) -> Result<write_response::Msg, RpcError> {
    match acks.message().await {
        Ok(Some(pb::WriteResponse { msg: Some(msg) })) => Ok(msg),
        Ok(Some(pb::WriteResponse { msg: None })) => Err(RpcError::UnexpectedReply {
            want: "a reply",
            got: "an empty message".into(),
        }),
        Ok(None) => Err(RpcError::StreamClosed { what: "write" }),
        Err(status) => Err(RpcError::Call {
            call: "Write",
            status,
        }),
    }
}

/// How `push_file` reads and encodes.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub epoch: u64,
    /// Extent length in bytes (at most [`MAX_EXTENT_LEN`]).
    pub extent_len: u32,
    /// zstd level; `None` sends raw data.
    pub zstd_level: Option<i32>,
    /// Extents read and encoded concurrently.
    pub workers: usize,
    /// Unacknowledged extents allowed on the wire.
    pub window: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            epoch: 1,
            extent_len: 1 << 20,
            zstd_level: Some(1),
            workers: 4,
            window: 32,
        }
    }
}

/// What `push_file` did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PushReport {
    /// Uncompressed bytes pushed.
    pub bytes: u64,
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    pub extents: u64,
    pub zero_extents: u64,
    pub seconds: f64,
    /// Of `seconds`, the final barrier: the last acknowledgements and the
    /// destination's flush of everything to stable storage.
    pub flush_seconds: f64,
}

/// Streams the whole of `path` into the destination at the same offsets,
/// ending with a barrier (everything durable when this returns).
pub async fn push_file(
    client: &mut ReplicaClient,
    path: &Path,
    opts: &PushOptions,
) -> Result<PushReport, RpcError> {
    let read_err = |source| RpcError::ReadSource {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let extent_len = u64::from(opts.extent_len.clamp(4096, MAX_EXTENT_LEN));
    let started = Instant::now();
    let mut writer = client.open_writer(opts.epoch, opts.window).await?;
    if size > writer.image_size() {
        return Err(RpcError::ExtentOutOfBounds {
            offset: 0,
            len: u32::try_from(size).unwrap_or(u32::MAX),
            size: writer.image_size(),
        });
    }
    // Extents are read and encoded a batch at a time (one read, one task,
    // one message for many small extents); every extent is at most
    // `extent_len` long, so this many stay within BATCH_BYTES.
    let per_batch = (BATCH_BYTES / extent_len).clamp(1, writer.max_batch_extents() as u64);
    let chunk = extent_len * per_batch;
    let path_buf: PathBuf = path.to_path_buf();
    let level = opts.zstd_level;
    let mut batches = stream::iter((0..size.div_ceil(chunk)).map(|i| i * chunk))
        .map(|offset| {
            let path = path_buf.clone();
            tokio::task::spawn_blocking(move || {
                let len = usize::try_from(chunk.min(size - offset))
                    .expect("at most BATCH_BYTES or one extent: far below usize::MAX");
                let buf = Bytes::from(
                    read_extent(&path, offset, len)
                        .map_err(|source| RpcError::ReadSource { path, source })?,
                );
                let step = usize::try_from(extent_len).expect("an extent length is a u32");
                (0..len)
                    .step_by(step)
                    .map(|at| {
                        let end = (at + step).min(len);
                        EncodedExtent::encode(offset + at as u64, buf.slice(at..end), level)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .buffered(opts.workers.max(1))
        .map(|joined| joined.map_err(RpcError::from).and_then(|r| r));
    let mut report = PushReport {
        bytes: 0,
        wire_bytes: 0,
        extents: 0,
        zero_extents: 0,
        seconds: 0.0,
        flush_seconds: 0.0,
    };
    while let Some(batch) = batches.try_next().await? {
        for extent in &batch {
            report.bytes += u64::from(extent.length);
            report.wire_bytes += extent.payload.len() as u64;
            report.extents += 1;
            if extent.encoding == super::Encoding::Zero {
                report.zero_extents += 1;
            }
        }
        writer.send_batch(batch).await?;
    }
    let flush_started = Instant::now();
    writer.finish().await?;
    report.flush_seconds = flush_started.elapsed().as_secs_f64();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        bytes = report.bytes,
        extents = report.extents,
        seconds = report.seconds,
        "push finished"
    );
    Ok(report)
}

/// Reads `len` bytes at `offset` into a fresh buffer without zeroing it
/// first (a memset of every extent showed up at 6% of the pusher's CPU):
/// `File`'s `read_to_end` reads straight into the spare capacity.
/// Each read opens the file anew: a cloned descriptor would share its offset
/// with the other readers.
fn read_extent(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut own = std::fs::File::open(path)?;
    own.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    own.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_extent_reads_exactly_the_range_and_refuses_a_short_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("src.img");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        assert_eq!(
            read_extent(&path, 1000, 5000).expect("read"),
            &data[1000..6000]
        );
        assert!(read_extent(&path, 9000, 5000).is_err());
    }
}
