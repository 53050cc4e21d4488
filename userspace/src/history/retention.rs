//! Retention: old segments with their summaries and Parquet tables are
//! deleted by age and by the total size of a device's history.

use std::str::FromStr;
use std::time::Duration;

use object_store::ObjectStoreExt;
use serde::Serialize;

use super::read::{Kind, StoredObject};
use super::{HistoryError, HistoryStore};

/// How much history to keep. Both limits apply when both are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete segments whose window ended longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest segments until a device's history fits in this many bytes.
    pub max_bytes: Option<u64>,
}

impl FromStr for Retention {
    type Err = HistoryError;

    /// `7d`, `12h`, `50G`, or both: `7d,50G`. Sizes take upper-case units, ages lower-case ones.
    fn from_str(s: &str) -> Result<Retention, HistoryError> {
        let bad = || HistoryError::BadRetention(s.to_owned());
        let mut r = Retention::default();
        for part in s.split(',').map(str::trim) {
            // Sizes take upper-case units (512M, 50G), ages lower-case ones (30m, 7d).
            let size_unit = part.ends_with(['K', 'M', 'G', 'T', 'B']);
            if let (false, Ok(age)) = (size_unit, humantime::parse_duration(part)) {
                if r.max_age.is_some() || age.is_zero() {
                    return Err(bad());
                }
                r.max_age = Some(age);
            } else if let Ok(bytes) = crate::units::parse_size(part) {
                if r.max_bytes.is_some() || bytes == 0 {
                    return Err(bad());
                }
                r.max_bytes = Some(bytes);
            } else {
                return Err(bad());
            }
        }
        Ok(r)
    }
}

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub kept_segments: u64,
    pub kept_bytes: u64,
    pub deleted_segments: u64,
    pub deleted_bytes: u64,
    /// Summaries whose segment was already gone.
    pub deleted_orphans: u64,
}

/// One segment with its summary and table, as far as the listing shows them.
struct Stored {
    end_unix_ns: u64,
    objects: Vec<StoredObject>,
    has_trace: bool,
}

impl HistoryStore {
    /// Applies `retention` to each device's history under this store (or only
    /// to `scope`'s host and device), relative to wall-clock `now_unix_ns`.
    pub async fn prune(
        &self,
        retention: &Retention,
        scope: Option<(&str, &str)>,
        now_unix_ns: u64,
        dry_run: bool,
    ) -> Result<PruneReport, HistoryError> {
        let objects = self.objects(scope.map(|s| s.0), scope.map(|s| s.1)).await?;
        // By device, then by segment.
        let mut devices: std::collections::BTreeMap<
            (String, String),
            std::collections::BTreeMap<String, Stored>,
        > = std::collections::BTreeMap::new();
        for o in objects {
            let segments = devices
                .entry((o.key.host.clone(), o.key.device.clone()))
                .or_default();
            let s = segments.entry(o.key.stem()).or_insert(Stored {
                end_unix_ns: o.key.end_unix_ns,
                objects: Vec::new(),
                has_trace: false,
            });
            s.has_trace |= o.kind == Kind::Trace;
            s.objects.push(o);
        }
        let cutoff = retention
            .max_age
            .map(|a| now_unix_ns.saturating_sub(u64::try_from(a.as_nanos()).unwrap_or(u64::MAX)));
        let mut report = PruneReport::default();
        for segments in devices.into_values() {
            let mut list: Vec<Stored> = segments.into_values().collect();
            // Newest first: the byte budget goes to recent history.
            list.sort_by_key(|s| std::cmp::Reverse(s.end_unix_ns));
            let mut kept_bytes = 0u64;
            for s in list {
                let size: u64 = s.objects.iter().map(|o| o.size).sum();
                let too_old = cutoff.is_some_and(|c| s.end_unix_ns < c);
                let over = retention
                    .max_bytes
                    .is_some_and(|m| kept_bytes.saturating_add(size) > m);
                if s.has_trace && !too_old && !over {
                    kept_bytes += size;
                    report.kept_segments += 1;
                    report.kept_bytes += size;
                    continue;
                }
                if s.has_trace {
                    report.deleted_segments += 1;
                } else {
                    report.deleted_orphans += 1;
                }
                report.deleted_bytes += size;
                if dry_run {
                    continue;
                }
                // The segment first: a summary or table left by a crash here is an orphan, pruned next time.
                let mut objects = s.objects;
                objects.sort_by_key(|o| o.kind != Kind::Trace);
                for o in objects {
                    match self.store.delete(&o.path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(source) => {
                            return Err(HistoryError::Store {
                                op: "delete",
                                path: o.path.to_string(),
                                source,
                            });
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parses_age_size_or_both() {
        let day = Duration::from_hours(24);
        assert_eq!(
            "7d".parse::<Retention>().expect("age"),
            Retention {
                max_age: Some(7 * day),
                max_bytes: None
            }
        );
        assert_eq!(
            "50G".parse::<Retention>().expect("size"),
            Retention {
                max_age: None,
                max_bytes: Some(50 << 30)
            }
        );
        assert_eq!(
            " 12h , 1M ".parse::<Retention>().expect("both"),
            Retention {
                max_age: Some(Duration::from_hours(12)),
                max_bytes: Some(1 << 20)
            }
        );
        for bad in ["", "7d,8d", "forever", "0", "0s", "7d,", "1G,2G"] {
            let err = bad.parse::<Retention>().expect_err(bad);
            assert!(err.to_string().contains("7d,50G"), "{err}");
        }
    }
}
