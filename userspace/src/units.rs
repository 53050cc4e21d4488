//! How Tern writes sizes, rates and durations for people: binary units
//! (`KiB`, `MiB`, `GiB`), as the size flags read them (`--size 512M` is
//! 512 MiB, `--max-rate 100M` is 100 MiB/s), in every command's output.

/// `1.5 GiB`, `256 MiB`, `4 KiB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v, UNITS[i])
    } else {
        format!("{:.1} {}", v, UNITS[i])
    }
}

/// `850 ms`, `12 s`, `4.5 min`, `2 h`.
pub fn human_secs(s: f64) -> String {
    let trim = |v: f64, unit: &str| {
        if (v - v.round()).abs() < 0.05 {
            format!("{v:.0} {unit}")
        } else {
            format!("{v:.1} {unit}")
        }
    };
    if s == 0.0 {
        "0".into()
    } else if s < 1e-3 {
        trim(s * 1e6, "µs")
    } else if s < 1.0 {
        trim(s * 1e3, "ms")
    } else if s < 120.0 {
        trim(s, "s")
    } else if s < 7200.0 {
        trim(s / 60.0, "min")
    } else {
        trim(s / 3600.0, "h")
    }
}

/// `118.2 MiB/s`.
pub fn human_rate(bytes_per_second: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_second))
}

/// A size as the size flags write it (`4K`, `256K`, `1M`, `16M`, `1.5G`):
/// the names of units and plans, which a user can paste back into a flag.
pub fn size_flag(bytes: u64) -> String {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    if bytes >= G && bytes.is_multiple_of(G) {
        format!("{}G", bytes / G)
    } else if bytes >= G {
        format!("{:.1}G", bytes as f64 / G as f64)
    } else if bytes >= M && bytes.is_multiple_of(M) {
        format!("{}M", bytes / M)
    } else if bytes >= M {
        format!("{:.1}M", bytes as f64 / M as f64)
    } else if bytes >= K && bytes.is_multiple_of(K) {
        format!("{}K", bytes / K)
    } else {
        format!("{bytes}B")
    }
}

/// A size flag's value that is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size; write e.g. 20G, 512MiB or 1048576")]
    NotASize(String),
    #[error("{text:?}: unknown size suffix {suffix:?}; use K, M, G or T (KiB, MiB, GiB, TiB)")]
    UnknownSuffix { text: String, suffix: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a size as every flag takes it: bytes, or a whole number with a
/// binary suffix, case-insensitive: `K`, `M`, `G`, `T`, each also written
/// `KiB`/`KB` (`20G` = `20GiB` = 20 GiB). Usable as a clap `value_parser`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let at = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (digits, suffix) = (text[..at].trim(), &text[at..]);
    let lower = suffix.to_ascii_lowercase();
    let unit = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return Err(SizeError::UnknownSuffix {
                text: text.to_string(),
                suffix: suffix.to_string(),
            });
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_is_written_as_the_flags_read_it() {
        assert_eq!(size_flag(4096), "4K");
        assert_eq!(size_flag(16 << 20), "16M");
        assert_eq!(size_flag(3 << 29), "1.5G");
        assert_eq!(size_flag(512), "512B");
        assert_eq!(parse_size(&size_flag(256 << 10)), Ok(256 << 10));
    }

    #[test]
    fn sizes_take_binary_suffixes_in_every_spelling() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert_eq!(parse_size(" 2 TiB "), Ok(2 << 40));
        assert!(matches!(
            parse_size("3X"),
            Err(SizeError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_size("3Q"),
            Err(SizeError::UnknownSuffix { .. })
        ));
        assert!(matches!(parse_size("G"), Err(SizeError::NotASize(_))));
        assert!(matches!(
            parse_size("x"),
            Err(SizeError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_size("1.5G"),
            Err(SizeError::UnknownSuffix { .. } | SizeError::NotASize(_))
        ));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn human_units_read_naturally() {
        assert_eq!(human_bytes(256.0 * 1024.0 * 1024.0), "256 MiB");
        assert_eq!(human_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.5 GiB");
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(0.000_128), "128 µs");
        assert_eq!(human_secs(30.0), "30 s");
        assert_eq!(human_secs(270.0), "4.5 min");
        assert_eq!(human_secs(7200.0), "2 h");
    }

    #[test]
    fn a_rate_is_bytes_per_second() {
        assert_eq!(human_rate(100.0 * 1024.0 * 1024.0), "100 MiB/s");
    }
}
