//! What every command shares: how flags are read (sizes, rates, ranges),
//! how a command writes its output and reads a trace, and its async runtime.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tern::trace::TraceReader;

/// Every size flag (`--size`, `--ring-size`, `--extent`, …) reads sizes one way.
pub use tern::units::parse_size;

/// A `--max-rate`: a size per second, never 0 (which would never send).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    match parse_size(text).map_err(|e| e.to_string())? {
        0 => Err("0 bytes per second would never send; leave --max-rate out for no limit".into()),
        n => Ok(n),
    }
}

/// `1Gbit`, `200mbit`, `125MB/s`, `125M`, `1000000`: bytes per second.
pub fn parse_link_rate(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let (num, bits) = if let Some(n) = lower
        .strip_suffix("bit/s")
        .or_else(|| lower.strip_suffix("bit"))
        .or_else(|| lower.strip_suffix("bps"))
    {
        (n.to_owned(), true)
    } else {
        let n = lower
            .strip_suffix("b/s")
            .or_else(|| lower.strip_suffix("/s"))
            .or_else(|| lower.strip_suffix('b'))
            .unwrap_or(&lower);
        (n.to_owned(), false)
    };
    let (digits, scale) = match num.chars().last() {
        Some('k') => (&num[..num.len() - 1], 1e3),
        Some('m') => (&num[..num.len() - 1], 1e6),
        Some('g') => (&num[..num.len() - 1], 1e9),
        Some('t') => (&num[..num.len() - 1], 1e12),
        _ => (num.as_str(), 1.0),
    };
    let v: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a rate; write e.g. 1Gbit, 200Mbit or 125MB/s"))?;
    let bytes = v * scale / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes < 1e3 {
        return Err(format!(
            "{text:?} is {bytes} bytes per second: give a link of at least 1 KB/s (e.g. 1Gbit)"
        ));
    }
    if bytes > 1e12 {
        return Err(format!(
            "{text:?} is more than 1 TB/s: no link is that fast; check the unit (1Gbit, 125MB/s)"
        ));
    }
    Ok(bytes)
}

/// `--fault-range LO-HI`: an address range, decimal or `0x` hex.
pub fn parse_range(s: &str) -> Result<(u64, u64)> {
    let (lo, hi) = s
        .split_once('-')
        .context("--fault-range takes LO-HI, e.g. 0x7f0000000000-0x7f0010000000")?;
    let p = |v: &str| -> Result<u64> {
        let v = v.trim();
        let n = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        n.with_context(|| format!("--fault-range: {v:?} is not a number"))
    };
    let (lo, hi) = (p(lo)?, p(hi)?);
    if lo >= hi {
        bail!("--fault-range: the start must be below the end");
    }
    Ok((lo, hi))
}

/// Opens a trace file for reading.
pub fn open_trace(path: &PathBuf) -> Result<TraceReader<BufReader<File>>> {
    let f = File::open(path).with_context(|| format!("cannot open trace {}", path.display()))?;
    TraceReader::new(BufReader::with_capacity(256 * 1024, f))
        .with_context(|| format!("{}", path.display()))
}

/// Runs `write` into the file `out` (in place only once complete: a failure
/// leaves what was there) or into standard output.
pub fn write_out<T>(
    out: Option<&PathBuf>,
    write: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    let Some(p) = out else {
        let mut w = BufWriter::new(std::io::stdout().lock());
        let done = write(&mut w)?;
        w.flush()?;
        return Ok(done);
    };
    let mut file = tern::outfile::OutFile::create(p)?;
    let mut w = BufWriter::new(&mut file);
    let done = write(&mut w)?;
    w.flush()
        .with_context(|| format!("cannot write {}", p.display()))?;
    drop(w);
    file.commit()?;
    Ok(done)
}

/// The async runtime of a command that talks to agents or object storage.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use super::{parse_link_rate, parse_rate, parse_size};

    #[test]
    fn a_zero_rate_is_refused_with_the_way_to_say_unlimited() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        let err = parse_rate("0").expect_err("0 is refused");
        assert!(err.contains("leave --max-rate out"), "{err}");
    }

    #[test]
    fn link_rates_in_bits_and_bytes() {
        assert_eq!(parse_link_rate("1Gbit"), Ok(125e6));
        assert_eq!(parse_link_rate("200mbit"), Ok(25e6));
        assert_eq!(parse_link_rate("125MB/s"), Ok(125e6));
        assert_eq!(parse_link_rate("125M"), Ok(125e6));
        assert!(parse_link_rate("0Gbit").is_err());
        assert!(parse_link_rate("fast").is_err());
        assert!(parse_link_rate("5000Tbit").is_err());
    }

    #[test]
    fn every_size_flag_takes_the_same_spellings() {
        // `--size` and `--ring-size` used to disagree about `1GiB`.
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
    }
}
