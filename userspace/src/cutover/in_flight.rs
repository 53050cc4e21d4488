//! Writes in flight at the pause. Stopping a writer (SIGSTOP, a cgroup
//! freeze) stops the process, not the I/O it already submitted: with fio
//! at 5000 IOPS and an I/O depth of 8, a write issued just before the stop
//! completed after the final round's trace sync. The tracer saw it too late,
//! the verification compared trees refreshed from the same dirty map, and
//! the destination silently lacked a 4 KiB block the source held. So the
//! final delta starts only once the block device under the source has had
//! no write in flight (its `/sys/dev/block/M:m/inflight`): one moment at
//! zero proves every write issued before it has completed.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the in-flight count is read while waiting.
const POLL: Duration = Duration::from_micros(100);

/// Why the wait did not end in a quiet device.
#[derive(Debug, thiserror::Error)]
pub enum InFlightError {
    #[error("cannot read the writes in flight on the source's device ({}): {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the source's device ({}) reported writes in flight as {text:?}, not two counts", path.display())]
    Format { path: PathBuf, text: String },
    #[error(
        "the source's device ({}) still had {writes} write(s) in flight {}ms after the pause: the pause did not stop every writer, or the device is stuck",
        path.display(),
        waited.as_millis()
    )]
    NeverQuiet {
        path: PathBuf,
        writes: u64,
        waited: Duration,
    },
}

/// The in-flight counters of the block device that holds `source` (the
/// device itself, or the one under a file), and whether it is the source
/// itself (`false`: a file system's device, shared with other files);
/// `None` when there is none (a tmpfs file, a file system without a block
/// device of its own): writes there are not asynchronous block I/O.
pub fn counter_for(source: &Path) -> Result<Option<(PathBuf, bool)>, InFlightError> {
    let meta = std::fs::metadata(source).map_err(|e| InFlightError::Read {
        path: source.to_path_buf(),
        source: e,
    })?;
    let own = meta.file_type().is_block_device();
    let dev = if own { meta.rdev() } else { meta.dev() };
    let path = crate::trace::device::sysfs_dir(libc::major(dev), libc::minor(dev)).join("inflight");
    Ok(path.exists().then_some((path, own)))
}

/// Writes in flight on the device whose counters are at `counter`.
fn writes_in_flight(counter: &Path) -> Result<u64, InFlightError> {
    let text = std::fs::read_to_string(counter).map_err(|source| InFlightError::Read {
        path: counter.to_path_buf(),
        source,
    })?;
    crate::trace::device::in_flight_reads_and_writes(&text)
        .map(|(_reads, writes)| writes)
        .ok_or_else(|| InFlightError::Format {
            path: counter.to_path_buf(),
            text: text.trim().to_owned(),
        })
}

/// Waits (off the async threads) until the device at `counter` has no
/// write in flight, up to `timeout`. Returns how long it waited.
pub async fn wait_until_quiet(
    counter: PathBuf,
    timeout: Duration,
) -> Result<Duration, InFlightError> {
    let started = Instant::now();
    let waiting = tokio::task::spawn_blocking(move || {
        loop {
            let writes = writes_in_flight(&counter)?;
            if writes == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(InFlightError::NeverQuiet {
                    path: counter,
                    writes,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    });
    waiting
        .await
        .expect("the in-flight wait only reads a sysfs file and does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_count_is_the_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("inflight");
        std::fs::write(&f, "       3        7\n").expect("write");
        assert_eq!(writes_in_flight(&f).expect("parse"), 7);
        std::fs::write(&f, "3\n").expect("write");
        assert!(matches!(
            writes_in_flight(&f),
            Err(InFlightError::Format { .. })
        ));
    }

    #[tokio::test]
    async fn a_busy_counter_times_out_with_the_count_and_a_quiet_one_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("inflight");
        std::fs::write(&f, "0 2\n").expect("write");
        let err = wait_until_quiet(f.clone(), Duration::from_millis(20))
            .await
            .expect_err("never quiet");
        assert!(
            matches!(err, InFlightError::NeverQuiet { writes: 2, .. }),
            "{err}"
        );
        std::fs::write(&f, "5 0\n").expect("write");
        wait_until_quiet(f, Duration::from_millis(20))
            .await
            .expect("reads in flight do not count");
    }

    #[test]
    fn a_loop_device_or_the_disk_under_a_file_has_counters() {
        // The file system under the temp dir is on a block device here
        // (ext4 on the machine's disk); tmpfs would have none.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let f = dir.path().join("img");
        std::fs::write(&f, b"x").expect("write");
        let (counter, own) = counter_for(&f)
            .expect("stat")
            .expect("a block device under /var/tmp");
        assert!(!own, "a file's device is shared");
        writes_in_flight(&counter).expect("readable counts");
        let shm = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let g = shm.path().join("img");
        std::fs::write(&g, b"x").expect("write");
        assert_eq!(
            counter_for(&g).expect("stat"),
            None,
            "tmpfs has no block device"
        );
    }
}
