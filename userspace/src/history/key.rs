//! Segment names: `HOST/DEVICE/START_END_SESSION_SEQ.trace`, sortable by time.
//!
//! START and END are the segment's window in UTC (`20261125T192933.123456789Z`,
//! fixed width, so byte order is time order); SESSION is the tracing session
//! (its start, hex nanoseconds) and SEQ the window's number in that session.

use std::time::{Duration, UNIX_EPOCH};

/// Where one segment sits in the history, and what its object names are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentKey {
    /// Field order is sort order: by host, device, then time.
    pub host: String,
    pub device: String,
    /// The window `[start, end)`, wall-clock nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// The tracing session: its start, wall-clock nanoseconds.
    pub session: u64,
    /// The window's number within its session, from 0.
    pub seq: u64,
}

const STEM_TIME_LEN: usize = 26;

/// `20261125T192933.123456789Z`: fixed width, so names sort by time.
pub fn format_time(unix_ns: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(unix_ns);
    humantime::format_rfc3339_nanos(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// The inverse of [`format_time`].
pub fn parse_time(s: &str) -> Option<u64> {
    if s.len() != STEM_TIME_LEN || !s.is_ascii() {
        return None;
    }
    let full = format!(
        "{}-{}-{}T{}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..]
    );
    let t = humantime::parse_rfc3339(&full).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
}

/// A host or device name as one path component: `/dev/loop0` → `dev-loop0`.
pub fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            c
        } else {
            '-'
        };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    // `.` and `..` are not names a store accepts as a component.
    if out.is_empty() || out.chars().all(|c| c == '.') {
        out = "unnamed".into();
    }
    out
}

impl SegmentKey {
    /// `START_END_SESSION_SEQ`: the file name without its extension.
    pub fn stem(&self) -> String {
        format!(
            "{}_{}_{:016x}_{:06}",
            format_time(self.start_unix_ns),
            format_time(self.end_unix_ns),
            self.session,
            self.seq
        )
    }

    /// Parses a stem back, with the host and device it was found under.
    pub fn from_stem(host: &str, device: &str, stem: &str) -> Option<SegmentKey> {
        let mut parts = stem.split('_');
        let start = parse_time(parts.next()?)?;
        let end = parse_time(parts.next()?)?;
        let session = u64::from_str_radix(parts.next()?, 16).ok()?;
        let seq = parts.next()?.parse().ok()?;
        if parts.next().is_some() || end < start {
            return None;
        }
        Some(SegmentKey {
            host: host.to_owned(),
            device: device.to_owned(),
            start_unix_ns: start,
            end_unix_ns: end,
            session,
            seq,
        })
    }

    /// Does the window overlap `[from, to)`?
    pub fn overlaps(&self, from: u64, to: u64) -> bool {
        self.start_unix_ns < to && self.end_unix_ns > from
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn time_format_is_fixed_width_utc() {
        assert_eq!(format_time(0), "19700101T000000.000000000Z");
        assert_eq!(
            format_time(1_764_098_973_123_456_789),
            "20251125T192933.123456789Z"
        );
    }

    #[test]
    fn device_paths_become_one_component() {
        assert_eq!(sanitize("/dev/loop0"), "dev-loop0");
        assert_eq!(sanitize("/var/lib/vm/disk 1.img"), "var-lib-vm-disk-1.img");
        assert_eq!(sanitize(".."), "unnamed");
        assert_eq!(sanitize(""), "unnamed");
    }

    #[test]
    fn malformed_stems_are_refused() {
        for bad in [
            "",
            "x_y_z_w",
            "20251125T192933.123456789Z_20251125T192933.123456789Z_1",
            "20251125T192934.000000000Z_20251125T192933.000000000Z_1_000001",
            "20251125T192933.123456789Z_20251125T192933.123456789Z_zz_000001",
        ] {
            assert_eq!(SegmentKey::from_stem("h", "d", bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn stems_round_trip_and_sort_by_time(
            a in 0u64..4_000_000_000_000_000_000, da in 0u64..1_000_000_000_000,
            b in 0u64..4_000_000_000_000_000_000, session in any::<u64>(), seq in 0u64..1_000_000,
        ) {
            let ka = SegmentKey { host: "h".into(), device: "d".into(), start_unix_ns: a, end_unix_ns: a + da, session, seq };
            prop_assert_eq!(SegmentKey::from_stem("h", "d", &ka.stem()), Some(ka.clone()));
            let kb = SegmentKey { start_unix_ns: b, end_unix_ns: b, ..ka.clone() };
            if a < b {
                prop_assert!(ka.stem() < kb.stem());
            }
        }
    }
}
