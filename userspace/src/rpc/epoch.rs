//! Fencing by epoch: the highest epoch ever accepted is persisted next to the
//! image, streams of a lower epoch are refused, and accepting a higher epoch
//! ends every older stream and waits for its in-flight writes to finish.
//! A promoted replica (failover) refuses every writer, whatever its epoch.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tokio_util::sync::CancellationToken;

use super::RpcError;
use super::failover::{LastHeard, Promotion};

/// Suffix of the epoch file, appended to the image's file name.
pub const EPOCH_FILE_SUFFIX: &str = ".tern-epoch";

/// The streams of one epoch: cancelled together, drained together.
#[derive(Debug)]
struct Generation {
    epoch: u64,
    cancel: CancellationToken,
    /// Each live stream holds a read guard; taking the write lock waits for all of them.
    active: Arc<RwLock<()>>,
}

/// Fencing state of one image.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    current: Mutex<Arc<Generation>>,
    /// Serializes epoch changes (persisting is slow and must not interleave).
    change: tokio::sync::Mutex<()>,
    /// The standing promotion (failover), persisted at `promotion_path`.
    promotion: Mutex<Option<Promotion>>,
    promotion_path: PathBuf,
}

/// Held by a write stream while it may write.
#[derive(Debug)]
pub struct Lease {
    pub epoch: u64,
    /// Cancelled when a higher epoch takes over.
    pub fenced: CancellationToken,
    _active: OwnedRwLockReadGuard<()>,
}

impl Fence {
    /// Path of the epoch file of `image`: `<image>.tern-epoch`.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_owned();
        name.push(EPOCH_FILE_SUFFIX);
        PathBuf::from(name)
    }

    /// Loads the highest epoch from `path` (0 if the file does not exist).
    pub fn load(path: &Path) -> Result<Fence, RpcError> {
        let epoch = match fs::read_to_string(path) {
            Ok(content) => {
                content
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| RpcError::EpochFileCorrupt {
                        path: path.to_path_buf(),
                        content: content.chars().take(40).collect(),
                    })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(RpcError::EpochFile {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let promotion_path = Promotion::path_beside(path);
        let promotion = Promotion::load(&promotion_path)?;
        Ok(Fence {
            path: path.to_path_buf(),
            current: Mutex::new(Arc::new(Generation::new(epoch))),
            change: tokio::sync::Mutex::new(()),
            promotion: Mutex::new(promotion),
            promotion_path,
        })
    }

    /// The standing promotion, if the replica was promoted.
    pub fn promotion(&self) -> Option<Promotion> {
        self.promotion
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The highest epoch accepted so far.
    pub fn highest(&self) -> u64 {
        self.generation().epoch
    }

    fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.current.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Admits a writer of `epoch`: refused if stale; if newer, persisted
    /// first, then every older stream is fenced and drained.
    pub async fn acquire(&self, epoch: u64) -> Result<Lease, RpcError> {
        let _change = self.change.lock().await;
        if let Some(p) = self.promotion() {
            return Err(p.refusal());
        }
        let current = self.generation();
        if epoch < current.epoch {
            return Err(RpcError::StaleEpoch {
                epoch,
                highest: current.epoch,
            });
        }
        if epoch == current.epoch {
            return Ok(current.lease().await);
        }
        let next = self.advance(&current, epoch).await?;
        Ok(next.lease().await)
    }

    /// Persists `epoch` (above `current`'s), then fences and drains every
    /// stream of `current`. Call with `change` held.
    async fn advance(&self, current: &Generation, epoch: u64) -> Result<Arc<Generation>, RpcError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || persist(&path, epoch)).await??;
        let next = Arc::new(Generation::new(epoch));
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&next);
        current.cancel.cancel();
        // Older streams stop issuing writes and finish the ones in flight;
        // only then may the new epoch write.
        drop(Arc::clone(&current.active).write_owned().await);
        tracing::info!(
            epoch,
            previous = current.epoch,
            "new epoch accepted; older writers fenced"
        );
        Ok(next)
    }

    /// Promotes the replica: a new epoch fences and drains every writer,
    /// then the promotion is persisted, and from then on every writer is
    /// refused. A promoted replica answers with its standing promotion
    /// (`already` set).
    pub async fn promote(&self, reason: String, heard: LastHeard) -> Result<Promotion, RpcError> {
        let _change = self.change.lock().await;
        if let Some(mut p) = self.promotion() {
            p.already = true;
            return Ok(p);
        }
        let current = self.generation();
        let epoch = current.epoch + 1;
        // The epoch first: a crash before the promotion file leaves a
        // replica whose old writers are fenced, never a promoted replica
        // they could still write into.
        self.advance(&current, epoch).await?;
        let promotion = Promotion {
            epoch,
            promoted_unix_ms: super::failover::unix_ms_now(),
            reason,
            last_heard_unix_ms: heard.unix_ms,
            last_sent_unix_ms: heard.sent_unix_ms,
            consistent_as_of_unix_ms: heard.consistent_as_of_unix_ms,
            source_backlog_bytes: heard.backlog_bytes,
            source_epoch: heard.epoch,
            last_write_unix_ms: heard.last_write_unix_ms,
            acknowledged_bytes: heard.acknowledged_bytes,
            already: false,
        };
        let (path, saved) = (self.promotion_path.clone(), promotion.clone());
        tokio::task::spawn_blocking(move || saved.save(&path)).await??;
        *self
            .promotion
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(promotion.clone());
        tracing::warn!(
            epoch,
            reason = %promotion.reason,
            rpo_ms = ?promotion.rpo_ms(),
            "replica promoted: it is the primary now; every writer is refused until it is demoted"
        );
        Ok(promotion)
    }

    /// Demotes a promoted replica (after a failback): a new epoch, the
    /// promotion file removed. `epoch` must be the promotion's or higher.
    /// Returns the new epoch.
    pub async fn demote(&self, epoch: u64) -> Result<u64, RpcError> {
        let _change = self.change.lock().await;
        let promotion = self.promotion().ok_or(RpcError::NotPromoted)?;
        if epoch < promotion.epoch {
            return Err(RpcError::StaleEpoch {
                epoch,
                highest: promotion.epoch,
            });
        }
        let current = self.generation();
        let next = current.epoch.max(epoch) + 1;
        self.advance(&current, next).await?;
        let path = self.promotion_path.clone();
        tokio::task::spawn_blocking(move || Promotion::remove(&path)).await??;
        *self
            .promotion
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        tracing::warn!(
            epoch = next,
            "replica demoted: a source may replicate into it again"
        );
        Ok(next)
    }
}

impl Generation {
    fn new(epoch: u64) -> Generation {
        Generation {
            epoch,
            cancel: CancellationToken::new(),
            active: Arc::new(RwLock::new(())),
        }
    }

    async fn lease(&self) -> Lease {
        Lease {
            epoch: self.epoch,
            fenced: self.cancel.clone(),
            _active: Arc::clone(&self.active).read_owned().await,
        }
    }
}

/// Writes the epoch atomically: temporary file, fsync, rename, fsync the directory.
fn persist(path: &Path, epoch: u64) -> Result<(), RpcError> {
    let io = |action, source| RpcError::EpochFile {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = fs::File::create(&tmp).map_err(|e| io("create", e))?;
    writeln!(file, "{epoch}").map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io("rename into", e))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the directory of", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stale_epoch_is_refused_and_newer_fences_older() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Fence::path_for(&dir.path().join("dst.img"));
        let fence = Fence::load(&path).expect("load");
        let old = fence.acquire(5).await.expect("epoch 5");
        assert!(!old.fenced.is_cancelled());
        // A newer epoch waits for the old lease to drop after cancelling it.
        let newer = {
            let fenced = old.fenced.clone();
            let acquire = fence.acquire(6);
            tokio::pin!(acquire);
            tokio::select! {
                _ = &mut acquire => panic!("epoch 6 admitted while epoch 5 still holds its lease"),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            assert!(fenced.is_cancelled());
            drop(old);
            acquire.await.expect("epoch 6")
        };
        assert_eq!(newer.epoch, 6);
        assert!(matches!(
            fence.acquire(5).await,
            Err(RpcError::StaleEpoch {
                epoch: 5,
                highest: 6
            })
        ));
        // Same epoch: a reconnecting writer is admitted beside the current one.
        let again = fence.acquire(6).await.expect("epoch 6 again");
        assert!(!again.fenced.is_cancelled());
    }

    #[tokio::test]
    async fn highest_epoch_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Fence::path_for(&dir.path().join("dst.img"));
        assert_eq!(Fence::load(&path).expect("fresh").highest(), 0);
        {
            let fence = Fence::load(&path).expect("load");
            drop(fence.acquire(41).await.expect("epoch 41"));
        }
        let reloaded = Fence::load(&path).expect("reload");
        assert_eq!(reloaded.highest(), 41);
        assert!(matches!(
            reloaded.acquire(40).await,
            Err(RpcError::StaleEpoch { .. })
        ));
    }

    #[tokio::test]
    async fn a_promoted_replica_refuses_every_writer_until_demoted_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Fence::path_for(&dir.path().join("dst.img"));
        let fence = Fence::load(&path).expect("load");
        let writer = fence.acquire(3).await.expect("epoch 3");
        let fenced = writer.fenced.clone();
        let p = {
            let promote = fence.promote("test".into(), LastHeard::default());
            tokio::pin!(promote);
            tokio::select! {
                _ = &mut promote => panic!("promoted while an old writer still holds its lease"),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            assert!(fenced.is_cancelled(), "the old writer is fenced first");
            drop(writer);
            promote.await.expect("promote")
        };
        assert_eq!((p.epoch, p.already), (4, false));
        for epoch in [3, 4, 5, 100] {
            assert!(
                matches!(
                    fence.acquire(epoch).await,
                    Err(RpcError::Promoted { epoch: 4, .. })
                ),
                "epoch {epoch} must be refused"
            );
        }
        let again = fence
            .promote("again".into(), LastHeard::default())
            .await
            .expect("promote again");
        assert!(again.already && again.epoch == 4 && again.reason == "test");
        drop(fence);
        let fence = Fence::load(&path).expect("reload");
        assert_eq!(fence.promotion().map(|p| p.epoch), Some(4));
        assert!(matches!(
            fence.acquire(9).await,
            Err(RpcError::Promoted { .. })
        ));
        assert!(matches!(
            fence.demote(3).await,
            Err(RpcError::StaleEpoch { .. })
        ));
        assert_eq!(fence.demote(4).await.expect("demote"), 5);
        assert!(fence.promotion().is_none());
        assert!(matches!(fence.demote(5).await, Err(RpcError::NotPromoted)));
        drop(fence.acquire(6).await.expect("a source may write again"));
        assert!(Fence::load(&path).expect("reload").promotion().is_none());
    }

    #[test]
    fn corrupt_epoch_file_is_an_error_not_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.tern-epoch");
        fs::write(&path, "banana").expect("write");
        assert!(matches!(
            Fence::load(&path),
            Err(RpcError::EpochFileCorrupt { .. })
        ));
    }
}
