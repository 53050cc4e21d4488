//! Sequential-run detection: a request that starts where a recent request of
//! the same kind ended continues that run. A small table of streams per kind
//! (like the kernel's readahead state) lets interleaved scans each keep their
//! run; the least recently used stream makes room for a new one, streams that
//! have already continued last.

use serde::Serialize;

use super::extent::IntervalHistogram;

const STREAMS: usize = 16;

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    next: u64,
    start: u64,
    requests: u32,
    used: u64,
    write: bool,
    live: bool,
}

/// Figures of the runs found.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct SequentialSummary {
    /// Bytes of reads (writes) that continued a run, over all read (written) bytes.
    pub read_fraction: f64,
    pub write_fraction: f64,
    /// Runs of at least two requests.
    pub runs: u64,
    pub runs_over_1mib: u64,
    pub longest_run_bytes: u64,
    /// Median run length in bytes (a log2 bucket's upper bound).
    pub median_run_bytes: u64,
}

#[derive(Debug, Default)]
pub struct Sequential {
    /// Read streams, then write streams: one kind's requests never evict the other's.
    streams: [Stream; 2 * STREAMS],
    clock: u64,
    seq_bytes: [u64; 2],
    bytes: [u64; 2],
    runs: u64,
    runs_over_1mib: u64,
    longest: u64,
    lengths: IntervalHistogram,
}

impl Sequential {
    #[inline]
    pub fn access(&mut self, offset: u64, len: u64, write: bool) {
        self.clock += 1;
        let k = usize::from(write);
        self.bytes[k] += len;
        // The victim: the least recently used stream, preferring ones that never
        // continued, so random requests between a scan's steps do not evict it.
        let base = k * STREAMS;
        let mut lru = base;
        let rank = |s: &Stream| (s.live && s.requests >= 2, s.used);
        for i in base..base + STREAMS {
            let s = &mut self.streams[i];
            if s.live && s.next == offset && s.write == write {
                s.next += len;
                s.requests += 1;
                s.used = self.clock;
                self.seq_bytes[k] += len;
                return;
            }
            if rank(&self.streams[i]) < rank(&self.streams[lru]) {
                lru = i;
            }
        }
        self.end_run(lru);
        self.streams[lru] = Stream {
            next: offset + len,
            start: offset,
            requests: 1,
            used: self.clock,
            write,
            live: true,
        };
    }

    fn end_run(&mut self, i: usize) {
        let s = self.streams[i];
        if s.live && s.requests >= 2 {
            let len = s.next - s.start;
            self.runs += 1;
            self.runs_over_1mib += u64::from(len >= 1 << 20);
            self.longest = self.longest.max(len);
            self.lengths.add(len);
        }
        self.streams[i].live = false;
    }

    /// The figures, counting the runs still open as ended.
    pub fn summary(&self) -> SequentialSummary {
        let mut done = Sequential {
            streams: self.streams,
            lengths: self.lengths,
            ..Sequential::default()
        };
        for i in 0..2 * STREAMS {
            done.end_run(i);
        }
        let frac = |k: usize| {
            if self.bytes[k] == 0 {
                0.0
            } else {
                self.seq_bytes[k] as f64 / self.bytes[k] as f64
            }
        };
        SequentialSummary {
            read_fraction: frac(0),
            write_fraction: frac(1),
            runs: self.runs + done.runs,
            runs_over_1mib: self.runs_over_1mib + done.runs_over_1mib,
            longest_run_bytes: self.longest.max(done.longest),
            median_run_bytes: done.lengths.quantile(0.5).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_interleaved_scans_are_both_sequential() {
        let mut s = Sequential::default();
        for i in 0..100u64 {
            s.access(i * 65536, 65536, false);
            s.access((1 << 30) + i * 4096, 4096, true);
        }
        let sum = s.summary();
        assert!((sum.read_fraction - 0.99).abs() < 1e-9);
        assert!((sum.write_fraction - 0.99).abs() < 1e-9);
        assert_eq!(sum.runs, 2);
        assert_eq!(sum.runs_over_1mib, 1);
        assert_eq!(sum.longest_run_bytes, 100 * 65536);
    }

    #[test]
    fn a_scan_survives_random_writes_between_its_steps() {
        let mut s = Sequential::default();
        let mut x = 99u64;
        for i in 0..200u64 {
            s.access(i << 20, 1 << 20, false);
            for _ in 0..40 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                s.access((x >> 20) % (1 << 30) / 4096 * 4096, 4096, true);
            }
        }
        assert!(s.summary().read_fraction > 0.99);
    }

    #[test]
    fn random_requests_are_not_sequential() {
        let mut s = Sequential::default();
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            s.access((x >> 20) % (1 << 30) / 4096 * 4096, 4096, true);
        }
        assert!(s.summary().write_fraction < 0.01);
    }
}
