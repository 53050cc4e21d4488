//! Failover: what a destination hears from its standby source (heartbeats,
//! the writes it acknowledged) and the promotion that makes its replica the
//! primary once the source is lost.
//!
//! A promotion is persisted beside the image (`<image>.tern-promoted`, JSON)
//! before the export turns writable, and while it stands the fence refuses
//! every writer whatever its epoch ([`super::Fence::acquire`]): a source that
//! comes back cannot write into the promoted replica, so the two copies can
//! never both be written by Tern. `tern failback` brings the data home and
//! demotes the replica.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::RpcError;
use super::pb;

/// Suffix of the promotion file, appended to the image's file name.
pub const PROMOTION_FILE_SUFFIX: &str = ".tern-promoted";

/// How often a standby source says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A source heard within this long counts as alive: promoting its replica
/// by hand then needs `--force`.
pub const HEARTBEAT_LOSS: Duration = Duration::from_secs(3);

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A promotion, as persisted and reported (`tern failover`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Promotion {
    /// The epoch the replica took: every older writer is fenced.
    pub epoch: u64,
    pub promoted_unix_ms: u64,
    /// Why: `tern failover`, or the source's silence.
    pub reason: String,
    /// The last heartbeat heard (0: none since the agent started) and what
    /// it said: every write the source saw up to `consistent_as_of_unix_ms`
    /// (its clock) is in this replica; `source_backlog_bytes` were not yet.
    pub last_heard_unix_ms: u64,
    pub consistent_as_of_unix_ms: u64,
    pub source_backlog_bytes: u64,
    /// The last heartbeat's own time by the source's clock (the recovery
    /// point is by that clock too).
    #[serde(default)]
    pub last_sent_unix_ms: u64,
    /// The epoch the lost source wrote with.
    pub source_epoch: u64,
    /// The last write this replica acknowledged (0: none since the agent
    /// started) and the bytes it acknowledged since it started.
    pub last_write_unix_ms: u64,
    pub acknowledged_bytes: u64,
    /// The replica had been promoted before this request.
    #[serde(skip)]
    pub already: bool,
}

impl Promotion {
    /// The recovery point's age when the source was last heard: how much
    /// time of writes the promotion may have lost, at most, as far as the
    /// last heartbeat could tell (`None`: no heartbeat was heard).
    /// Both times are the source's, so the figure does not depend on the
    /// two hosts' clocks agreeing.
    pub fn rpo_ms(&self) -> Option<u64> {
        (self.last_sent_unix_ms > 0 && self.consistent_as_of_unix_ms > 0).then(|| {
            self.last_sent_unix_ms
                .saturating_sub(self.consistent_as_of_unix_ms)
        })
    }

    /// The refusal every writer of a promoted replica gets.
    pub fn refusal(&self) -> RpcError {
        RpcError::Promoted {
            epoch: self.epoch,
            reason: self.reason.clone(),
        }
    }

    /// Path of the promotion file of the image whose epoch file is `epoch_file`.
    pub fn path_beside(epoch_file: &Path) -> PathBuf {
        let name = epoch_file.as_os_str().to_string_lossy();
        match name.strip_suffix(super::epoch::EPOCH_FILE_SUFFIX) {
            Some(image) => PathBuf::from(format!("{image}{PROMOTION_FILE_SUFFIX}")),
            None => PathBuf::from(format!("{name}{PROMOTION_FILE_SUFFIX}")),
        }
    }

    /// The promotion saved at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<Promotion>, RpcError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
                RpcError::PromotionFileCorrupt {
                    path: path.to_path_buf(),
                    source,
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RpcError::PromotionFile {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Saves the promotion at `path` durably (a new file renamed over the
    /// old, both synced): a crash leaves the old state or the new one.
    pub fn save(&self, path: &Path) -> Result<(), RpcError> {
        let err = |action| {
            move |source| RpcError::PromotionFile {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let json = serde_json::to_vec_pretty(self).expect("a promotion serializes");
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = fs::File::create(&tmp).map_err(err("create"))?;
        f.write_all(&json).map_err(err("write"))?;
        f.sync_all().map_err(err("sync"))?;
        fs::rename(&tmp, path).map_err(err("rename"))?;
        sync_dir(path).map_err(err("sync the directory of"))
    }

    /// Removes the promotion file at `path` durably.
    pub fn remove(path: &Path) -> Result<(), RpcError> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(RpcError::PromotionFile {
                    action: "remove",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        sync_dir(path).map_err(|source| RpcError::PromotionFile {
            action: "sync the directory of",
            path: path.to_path_buf(),
            source,
        })
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()
}

impl From<&Promotion> for pb::Promotion {
    fn from(p: &Promotion) -> Self {
        pb::Promotion {
            epoch: p.epoch,
            promoted_unix_ms: p.promoted_unix_ms,
            reason: p.reason.clone(),
            last_heard_unix_ms: p.last_heard_unix_ms,
            consistent_as_of_unix_ms: p.consistent_as_of_unix_ms,
            source_backlog_bytes: p.source_backlog_bytes,
            last_write_unix_ms: p.last_write_unix_ms,
            acknowledged_bytes: p.acknowledged_bytes,
            source_epoch: p.source_epoch,
            already: p.already,
            last_sent_unix_ms: p.last_sent_unix_ms,
        }
    }
}

impl From<pb::Promotion> for Promotion {
    fn from(p: pb::Promotion) -> Self {
        Promotion {
            epoch: p.epoch,
            promoted_unix_ms: p.promoted_unix_ms,
            reason: p.reason,
            last_heard_unix_ms: p.last_heard_unix_ms,
            consistent_as_of_unix_ms: p.consistent_as_of_unix_ms,
            source_backlog_bytes: p.source_backlog_bytes,
            source_epoch: p.source_epoch,
            last_write_unix_ms: p.last_write_unix_ms,
            acknowledged_bytes: p.acknowledged_bytes,
            already: p.already,
            last_sent_unix_ms: p.last_sent_unix_ms,
        }
    }
}

/// The last heartbeat a destination heard.
#[derive(Debug, Clone, Copy)]
struct Heard {
    at: Instant,
    unix_ms: u64,
    sent_unix_ms: u64,
    epoch: u64,
    backlog_bytes: u64,
    consistent_as_of_unix_ms: u64,
    leaving: bool,
}

/// What a destination has heard from its source: heartbeats and the writes
/// it acknowledged. Cheap to update on every acknowledgement.
#[derive(Debug, Default)]
pub struct Liveness {
    heard: Mutex<Option<Heard>>,
    last_write_unix_ms: AtomicU64,
    acknowledged_bytes: AtomicU64,
}

/// What a promotion records of the source it replaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastHeard {
    pub unix_ms: u64,
    /// The heartbeat's own time, by the source's clock.
    pub sent_unix_ms: u64,
    pub epoch: u64,
    pub backlog_bytes: u64,
    pub consistent_as_of_unix_ms: u64,
    pub last_write_unix_ms: u64,
    pub acknowledged_bytes: u64,
}

impl Liveness {
    /// A heartbeat of a source writing with `epoch` arrived.
    pub fn heard(&self, req: &pb::HeartbeatRequest) {
        *self.heard.lock().unwrap_or_else(PoisonError::into_inner) = Some(Heard {
            at: Instant::now(),
            unix_ms: unix_ms_now(),
            sent_unix_ms: req.sent_unix_ms,
            epoch: req.epoch,
            backlog_bytes: req.backlog_bytes,
            consistent_as_of_unix_ms: req.consistent_as_of_unix_ms,
            leaving: req.leaving,
        });
    }

    /// `bytes` of writes were acknowledged.
    pub fn wrote(&self, bytes: u64) {
        self.last_write_unix_ms
            .store(unix_ms_now(), Ordering::Relaxed);
        self.acknowledged_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// How long the source has been silent; `None` when none was heard yet
    /// or the last one said it was leaving (a stopped standby, not a lost one).
    pub fn silent_for(&self) -> Option<Duration> {
        let heard = *self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        heard.filter(|h| !h.leaving).map(|h| h.at.elapsed())
    }

    /// Since when the source was heard, leaving or not (`None`: never).
    pub fn heard_ago(&self) -> Option<Duration> {
        let heard = *self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        heard.map(|h| h.at.elapsed())
    }

    /// Forgets the source (after a promotion or a demotion: the next one
    /// to be heard is a new standby).
    pub fn forget(&self) {
        *self.heard.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// What a promotion records.
    pub fn last_heard(&self) -> LastHeard {
        let heard = *self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        LastHeard {
            unix_ms: heard.map_or(0, |h| h.unix_ms),
            sent_unix_ms: heard.map_or(0, |h| h.sent_unix_ms),
            epoch: heard.map_or(0, |h| h.epoch),
            backlog_bytes: heard.map_or(0, |h| h.backlog_bytes),
            consistent_as_of_unix_ms: heard.map_or(0, |h| h.consistent_as_of_unix_ms),
            last_write_unix_ms: self.last_write_unix_ms.load(Ordering::Relaxed),
            acknowledged_bytes: self.acknowledged_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promotion_survives_a_save_and_is_gone_after_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let epoch_file = dir.path().join("dst.img.tern-epoch");
        let path = Promotion::path_beside(&epoch_file);
        assert_eq!(path, dir.path().join("dst.img.tern-promoted"));
        assert_eq!(Promotion::load(&path).expect("load"), None);
        let p = Promotion {
            epoch: 4,
            promoted_unix_ms: 1_000_000,
            reason: "tern failover".into(),
            last_heard_unix_ms: 999_000,
            last_sent_unix_ms: 999_000,
            consistent_as_of_unix_ms: 998_500,
            source_backlog_bytes: 8192,
            source_epoch: 3,
            last_write_unix_ms: 998_900,
            acknowledged_bytes: 1 << 20,
            already: false,
        };
        p.save(&path).expect("save");
        assert_eq!(Promotion::load(&path).expect("load"), Some(p.clone()));
        assert_eq!(p.rpo_ms(), Some(500));
        Promotion::remove(&path).expect("remove");
        assert_eq!(Promotion::load(&path).expect("load"), None);
        Promotion::remove(&path).expect("removing nothing is fine");
    }

    #[test]
    fn a_corrupt_promotion_file_is_an_error_not_no_promotion() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.tern-promoted");
        fs::write(&path, b"{not json").expect("write");
        let err = Promotion::load(&path).expect_err("corrupt");
        assert!(
            matches!(err, RpcError::PromotionFileCorrupt { .. }),
            "{err}"
        );
    }

    #[test]
    fn silence_counts_only_after_a_heartbeat_and_not_after_a_goodbye() {
        let live = Liveness::default();
        assert_eq!(live.silent_for(), None);
        let mut hb = pb::HeartbeatRequest {
            epoch: 2,
            backlog_bytes: 4096,
            consistent_as_of_unix_ms: 5,
            sent_unix_ms: 6,
            leaving: false,
        };
        live.heard(&hb);
        live.wrote(4096);
        assert!(live.silent_for().is_some());
        let last = live.last_heard();
        assert_eq!((last.epoch, last.backlog_bytes), (2, 4096));
        assert_eq!(last.consistent_as_of_unix_ms, 5);
        assert_eq!(last.acknowledged_bytes, 4096);
        assert!(last.last_write_unix_ms > 0);
        hb.leaving = true;
        live.heard(&hb);
        assert_eq!(
            live.silent_for(),
            None,
            "a source that said goodbye is not lost"
        );
        assert!(live.heard_ago().is_some());
        live.forget();
        assert_eq!(live.heard_ago(), None);
    }
}
