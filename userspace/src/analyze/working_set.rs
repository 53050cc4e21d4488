//! Working sets from the page-fault stream, per process: the footprint
//! (distinct pages faulted over the trace) and the working set W(t, τ), the
//! distinct pages faulted in each window τ (Denning's definition, with faults
//! standing in for references). Bounded: at most `PAGE_CAP` pages and
//! `PID_CAP` processes are tracked; past that, figures are lower bounds and
//! say so.

use std::collections::HashMap;

use serde::Serialize;

use super::dirty_rate::Percentiles;

pub const PAGE_SIZE: u64 = 4096;
/// Pages tracked over all processes: 4 M pages cover 16 GiB faulted, in about 100 MiB.
pub const PAGE_CAP: usize = 4 << 20;
pub const PID_CAP: usize = 4096;

#[derive(Debug, Default)]
struct Pid {
    /// Page → the last window it faulted in.
    pages: HashMap<u64, u32>,
    faults: u64,
    write_faults: u64,
    /// Distinct pages per window, indexed by window.
    per_window: Vec<u32>,
}

/// One process's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkingSet {
    pub pid: u32,
    pub comm: String,
    pub faults: u64,
    pub write_faults: u64,
    pub footprint_bytes: u64,
    /// Distinct bytes faulted per window (of `window_s`), over windows with faults.
    pub window_bytes: Percentiles,
    pub window_s: f64,
    /// The page cap was reached: the figures are lower bounds.
    pub saturated: bool,
}

#[derive(Debug)]
pub struct WorkingSets {
    window_ns: u64,
    pids: HashMap<u32, Pid>,
    comms: HashMap<u32, String>,
    pages: usize,
    pub dropped_faults: u64,
}

impl WorkingSets {
    pub fn new(window_ns: u64) -> WorkingSets {
        WorkingSets {
            window_ns,
            pids: HashMap::new(),
            comms: HashMap::new(),
            pages: 0,
            dropped_faults: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        // A hash map entry of (u64, u32) with its control byte: about 17 bytes at
        // full load; count 24 for the load factor.
        self.pages * 24
            + self
                .pids
                .values()
                .map(|p| p.per_window.capacity() * 4)
                .sum::<usize>()
    }

    pub fn name(&mut self, pid: u32, comm: &str) {
        if self.comms.len() < PID_CAP * 4 {
            self.comms.insert(pid, comm.to_string());
        }
    }

    pub fn fault(&mut self, ts: u64, pid: u32, address: u64, write: bool) {
        if !self.pids.contains_key(&pid) && self.pids.len() >= PID_CAP {
            self.dropped_faults += 1;
            return;
        }
        let window =
            u32::try_from(ts / self.window_ns).map_or(u32::MAX - 1, |w| w.min(u32::MAX - 1));
        let p = self.pids.entry(pid).or_default();
        p.faults += 1;
        p.write_faults += u64::from(write);
        let page = address / PAGE_SIZE;
        let new_in_window = match p.pages.get_mut(&page) {
            Some(last) if *last == window => false,
            Some(last) => {
                *last = window;
                true
            }
            None if self.pages < PAGE_CAP => {
                p.pages.insert(page, window);
                self.pages += 1;
                true
            }
            None => {
                self.dropped_faults += 1;
                false
            }
        };
        if new_in_window {
            let w = window as usize;
            if w >= p.per_window.len() {
                p.per_window.resize(w + 1, 0);
            }
            p.per_window[w] += 1;
        }
    }

    pub fn summary(&self) -> Vec<WorkingSet> {
        let saturated = self.pages >= PAGE_CAP;
        let mut out: Vec<WorkingSet> = self
            .pids
            .iter()
            .map(|(&pid, p)| WorkingSet {
                pid,
                comm: self.comms.get(&pid).cloned().unwrap_or_default(),
                faults: p.faults,
                write_faults: p.write_faults,
                footprint_bytes: p.pages.len() as u64 * PAGE_SIZE,
                window_bytes: Percentiles::of(
                    p.per_window
                        .iter()
                        .filter(|&&n| n > 0)
                        .map(|&n| f64::from(n) * PAGE_SIZE as f64)
                        .collect(),
                ),
                window_s: self.window_ns as f64 / 1e9,
                saturated,
            })
            .collect();
        out.sort_by(|a, b| b.faults.cmp(&a.faults).then(a.pid.cmp(&b.pid)));
        out
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // whole byte counts, exact in f64
mod tests {
    use super::*;

    #[test]
    fn a_loop_over_a_fixed_set_has_that_set_as_working_set() {
        let mut ws = WorkingSets::new(1_000_000_000);
        // 100 pages touched every window for 10 windows, then 10 new pages once.
        for w in 0..10u64 {
            for p in 0..100u64 {
                ws.fault(
                    w * 1_000_000_000 + p,
                    7,
                    0x7f00_0000_0000 + p * 4096 + 12,
                    p % 2 == 0,
                );
            }
        }
        for p in 0..10u64 {
            ws.fault(10_500_000_000, 7, 0x5500_0000_0000 + p * 4096, false);
        }
        ws.name(7, "loop");
        let s = &ws.summary()[0];
        assert_eq!(s.comm, "loop");
        assert_eq!(s.faults, 1010);
        assert_eq!(s.write_faults, 500);
        assert_eq!(s.footprint_bytes, 110 * 4096);
        assert_eq!(s.window_bytes.p50, 100.0 * 4096.0);
        assert_eq!(s.window_bytes.max, 100.0 * 4096.0);
        assert!(!s.saturated);
    }
}
