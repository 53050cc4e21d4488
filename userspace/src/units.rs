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

#[cfg(test)]
mod tests {
    use super::*;

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
