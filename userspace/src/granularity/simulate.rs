//! The migration simulator: replays a trace's writes against a model of the
//! link and of the pre-copy algorithm that `cutover::migrate` runs, for any
//! [`Layout`] of replication units, and reports bytes, rounds and downtime.
//!
//! The model follows the engine step by step: a bulk copy of every unit
//! (zero data read but not sent), then delta rounds that take the dirty units
//! in disk order — a write ahead of the round's cursor is picked up in the
//! same round, one behind it waits for the next — coalesced into extents of
//! at most `extent_len`; after each round the estimate `dirty / last round's
//! rate` decides whether the final delta fits the downtime budget; then the
//! pause, the final round with the workload stopped, the checksum
//! verification and the switch. A gap in the trace (lost events) marks every
//! unit dirty, as the tracker does. Time costs: a run of `len` bytes takes
//! `max(wire / bandwidth, len / engine_rate, extents × per_extent)` (the
//! engine pipelines reads, encoding and the wire), a round ends with a
//! barrier (one RTT and the destination's flush).

use std::collections::HashSet;
use std::io::Read;

use serde::Serialize;

use super::{Layout, Zone};
use crate::trace::{Record, TraceFileError, TraceReader};

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Trace(#[from] TraceFileError),
    /// Nothing to simulate.
    #[error(
        "the trace has no writes and no gaps: a migration of an idle disk is one bulk copy; record the workload while it runs (`tern trace record`)"
    )]
    NoWrites,
    /// The device size is unknown.
    #[error(
        "the trace does not say how large its device is; give the size (e.g. --device-size 20G)"
    )]
    UnknownSize,
    /// A model parameter is out of its range.
    #[error("{what} must be {range}, got {value}")]
    Parameter {
        what: &'static str,
        range: &'static str,
        value: f64,
    },
    /// The layout is not for this disk.
    #[error("the plan is for a {plan} byte disk but the trace's disk has {disk} bytes")]
    SizeMismatch { plan: u64, disk: u64 },
}

/// One write (or discard, write-zeroes) in disk bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub ts_ns: u64,
    pub offset: u64,
    pub len: u64,
}

/// What the simulator replays: the writes and gaps of a trace, on one
/// address space (several traced disks are laid end to end).
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub size: u64,
    pub writes: Vec<Write>,
    /// Start times of gaps (lost events).
    pub gaps: Vec<u64>,
    pub duration_ns: u64,
    /// The traced disks' ranges when there are several (each a volume).
    pub disks: Vec<std::ops::Range<u64>>,
    /// Writes clipped because they fell past the end of the disk.
    pub clipped: u64,
    /// The CPU profile the trace recorded beside the I/O (empty: none).
    pub cpu: Vec<crate::analyze::cpu::CpuReport>,
}

impl Workload {
    /// Reads the modifying block requests and gaps of a trace. `size`
    /// overrides the device size in the header (one disk only).
    pub fn from_trace<R: Read>(
        mut reader: TraceReader<R>,
        size: Option<u64>,
    ) -> Result<Workload, SimulateError> {
        let header = reader.header().clone();
        let mut bases = Vec::with_capacity(header.targets.len());
        let mut at = 0u64;
        for t in &header.targets {
            bases.push(at);
            at += t.size_bytes;
        }
        let mut w = Workload::default();
        let mut cpu = crate::analyze::cpu::CpuProfile::for_header(&header);
        let mut last_ts = 0;
        while let Some(rec) = reader.next_record()? {
            last_ts = last_ts.max(rec.ts_ns());
            match rec {
                Record::Block(b) if b.op.modifies() && b.len > 0 => {
                    let base = bases.get(usize::from(b.target)).copied().unwrap_or(0);
                    let offset = base + b.offset;
                    w.writes.push(Write {
                        ts_ns: b.ts_ns,
                        offset,
                        len: u64::from(b.len),
                    });
                }
                Record::Gap(g) => {
                    w.gaps.push(g.start_ns);
                    last_ts = last_ts.max(g.end_ns);
                }
                Record::End(e) => last_ts = last_ts.max(e.ts_ns),
                Record::Cpu(c) => cpu.observe(&c),
                _ => {}
            }
        }
        w.cpu = cpu.reports();
        w.size = match (size, header.targets.len()) {
            (Some(s), 0 | 1) => s,
            _ if at > 0 => at,
            _ => return Err(SimulateError::UnknownSize),
        };
        if w.size == 0 {
            return Err(SimulateError::UnknownSize);
        }
        if header.targets.len() > 1 {
            w.disks = bases
                .iter()
                .zip(&header.targets)
                .map(|(&b, t)| b..b + t.size_bytes)
                .collect();
        }
        let size = w.size;
        w.clipped = w.writes.iter().filter(|x| x.offset + x.len > size).count() as u64;
        w.writes.retain(|x| x.offset < size);
        for x in &mut w.writes {
            x.len = x.len.min(size - x.offset);
        }
        if w.writes.is_empty() && w.gaps.is_empty() {
            return Err(SimulateError::NoWrites);
        }
        // Completion order is nearly but not exactly issue order.
        w.writes.sort_by_key(|x| x.ts_ns);
        w.gaps.sort_unstable();
        w.duration_ns = last_ts;
        Ok(w)
    }
}

/// The link and the engine's costs.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// Link bandwidth, bytes per second (as shaped: IP packets).
    pub bandwidth: f64,
    /// Share of the link left for payload after TCP/IP headers (1500-byte frames).
    pub efficiency: f64,
    pub rtt_s: f64,
    /// Longest extent the engine sends (`ReplicateOptions::extent_len`).
    pub extent_len: u64,
    /// Time per extent that does not overlap the wire: a read, encoding, a
    /// message and its acknowledgement share (the engine keeps 16 in flight).
    pub per_extent_s: f64,
    /// Framing bytes per extent on the wire (header, hash, gRPC frame).
    pub extent_header_bytes: u64,
    /// Bytes per second the source side can read, hash and encode.
    pub engine_rate: f64,
    /// Bytes per second the checksum trees are rehashed at (both sides).
    pub hash_rate: f64,
    /// Checksum-tree region size: a write makes its region be rehashed.
    pub region_size: u64,
    /// The destination's flush at a barrier (end of every round).
    pub barrier_s: f64,
    /// Pausing the workload (fsfreeze, SIGSTOP, QMP stop).
    pub pause_s: f64,
    /// Wire bytes per payload byte (zstd; 1.0 for incompressible data).
    pub compression: f64,
    /// Bytes per second one core compresses (zstd level 1).
    pub compress_rate_per_core: f64,
    /// Share of the disk holding non-zero data (the bulk copy skips zeroes).
    pub nonzero: f64,
    pub max_downtime_s: f64,
    pub max_rounds: u64,
    /// Replay the trace again when the migration outlasts it.
    pub repeat: bool,
    /// Where in the trace the migration starts (ns).
    pub start_ns: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            bandwidth: 125e6,
            efficiency: 0.95,
            rtt_s: 0.5e-3,
            extent_len: 1 << 20,
            // Scattered 4 KiB extents moved at about 22 MB/s on this machine
            // (docs/perf.md, migration): 186 µs each.
            per_extent_s: 180e-6,
            extent_header_bytes: 80,
            engine_rate: 230e6,
            hash_rate: 1e9,
            region_size: 64 << 10,
            // A final round of 32 extents took 47 ms (docs/perf.md): the
            // destination's flush is most of it.
            barrier_s: 0.04,
            pause_s: 0.002,
            compression: 1.0,
            // zstd -b1 on text-like data here: 694 MB/s on one core; the
            // engine's framing and hashing take their share of it.
            compress_rate_per_core: 500e6,
            nonzero: 1.0,
            max_downtime_s: 0.05,
            max_rounds: 30,
            repeat: true,
            start_ns: 0,
        }
    }
}

impl Model {
    /// Checks every parameter is in a range that means something.
    pub fn validate(&self) -> Result<(), SimulateError> {
        let check = |ok: bool, what, range, value: f64| {
            if ok {
                Ok(())
            } else {
                Err(SimulateError::Parameter { what, range, value })
            }
        };
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        check(
            finite_pos(self.bandwidth) && self.bandwidth >= 1e3,
            "the bandwidth",
            "at least 1 KB/s",
            self.bandwidth,
        )?;
        check(
            self.efficiency > 0.0 && self.efficiency <= 1.0,
            "the link efficiency",
            "in (0, 1]",
            self.efficiency,
        )?;
        check(
            self.rtt_s.is_finite() && (0.0..=10.0).contains(&self.rtt_s),
            "the RTT",
            "from 0 to 10 s",
            self.rtt_s,
        )?;
        check(
            self.extent_len >= 4096,
            "the extent length",
            "at least 4 KiB",
            self.extent_len as f64,
        )?;
        check(
            self.max_downtime_s.is_finite() && self.max_downtime_s > 0.0,
            "the downtime budget",
            "above 0",
            self.max_downtime_s,
        )?;
        check(
            self.compression > 0.0 && self.compression <= 1.5,
            "the compression ratio",
            "in (0, 1.5]",
            self.compression,
        )?;
        check(
            (0.0..=1.0).contains(&self.nonzero),
            "the non-zero share",
            "from 0 to 1",
            self.nonzero,
        )?;
        check(
            finite_pos(self.engine_rate) && finite_pos(self.hash_rate),
            "the engine and hash rates",
            "above 0",
            self.engine_rate.min(self.hash_rate),
        )?;
        check(
            self.region_size >= 4096,
            "the region size",
            "at least 4 KiB",
            self.region_size as f64,
        )?;
        Ok(())
    }
}

/// Per-zone figures, so a cost can be split by zone.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ZoneFigures {
    /// Payload bytes sent (bulk copy without its zero share, plus rounds).
    pub sent_bytes: f64,
    pub wire_bytes: f64,
    pub extents: u64,
    /// Link-or-engine seconds its runs took.
    pub seconds: f64,
    pub final_bytes: u64,
    pub final_seconds: f64,
    pub tracking_bytes: u64,
}

/// What a simulated migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimReport {
    pub layout: String,
    pub converged: bool,
    /// Delta rounds before the pause (as `cutover::Report::rounds`).
    pub rounds: u64,
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    /// Sent beyond the bulk copy: units sent again because they were written.
    pub resent_bytes: u64,
    pub extents: u64,
    pub final_delta_bytes: u64,
    pub downtime_s: f64,
    pub final_round_s: f64,
    pub verify_s: f64,
    pub total_s: f64,
    pub tracking_bytes: u64,
    pub gaps: u64,
    /// Dirty bytes when the last estimate was made, and that estimate.
    pub last_dirty_bytes: u64,
    pub estimated_downtime_s: f64,
    pub zones: Vec<ZoneFigures>,
}

/// Dirty bits per zone, with the dirty byte count kept up to date.
struct DirtySet {
    bits: Vec<Vec<u64>>,
    dirty_bytes: u64,
}

impl DirtySet {
    fn new(layout: &Layout) -> DirtySet {
        DirtySet {
            bits: layout
                .zones
                .iter()
                .map(|z| vec![0; usize::try_from(z.units().div_ceil(64)).unwrap_or(usize::MAX)])
                .collect(),
            dirty_bytes: 0,
        }
    }

    fn set(&mut self, zone: &Zone, z: usize, unit: u64) {
        let w = &mut self.bits[z][(unit / 64) as usize];
        let bit = 1 << (unit % 64);
        if *w & bit == 0 {
            *w |= bit;
            let r = zone.unit_range(unit);
            self.dirty_bytes += r.end - r.start;
        }
    }

    fn take(&mut self, zone: &Zone, z: usize, unit: u64) -> bool {
        let w = &mut self.bits[z][(unit / 64) as usize];
        let bit = 1 << (unit % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        let r = zone.unit_range(unit);
        self.dirty_bytes -= r.end - r.start;
        true
    }

    /// The first dirty unit at or after `(z, unit)`, in disk order.
    fn next(&self, mut z: usize, mut unit: u64) -> Option<(usize, u64)> {
        while z < self.bits.len() {
            let words = &self.bits[z];
            let mut w = (unit / 64) as usize;
            let mut mask = !0u64 << (unit % 64);
            while w < words.len() {
                let hit = words[w] & mask;
                if hit != 0 {
                    return Some((z, w as u64 * 64 + u64::from(hit.trailing_zeros())));
                }
                mask = !0;
                w += 1;
            }
            z += 1;
            unit = 0;
        }
        None
    }
}

/// One simulated migration in progress.
struct Sim<'a> {
    layout: &'a Layout,
    work: &'a Workload,
    m: &'a Model,
    dirty: DirtySet,
    /// Seconds since the migration started.
    now: f64,
    next_write: usize,
    next_gap: usize,
    /// Trace time added to the events of the current repeat.
    base_ns: u64,
    exhausted: bool,
    stale_regions: HashSet<u64>,
    stale_all: bool,
    gaps: u64,
    zones: Vec<ZoneFigures>,
}

/// What one round moved.
#[derive(Default)]
struct RoundFig {
    sent: f64,
    seconds: f64,
}

/// A simulated quantity (bytes, nanoseconds) as a whole number: rounded
/// down, negative rounding noise as 0, past `u64` saturated.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "`as` saturates and maps NaN to 0: the meaning wanted here"
)]
fn whole(x: f64) -> u64 {
    x.max(0.0) as u64
}

impl Sim<'_> {
    fn trace_ns(&self, t: f64) -> u64 {
        self.m.start_ns + whole(t * 1e9)
    }

    fn mark(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.layout.size);
        let mut at = offset;
        while at < end {
            let z = self.layout.zone_of(at);
            let zone = self.layout.zones[z];
            let first = (at - zone.start) / zone.unit;
            let stop = end.min(zone.end);
            let last = (stop - 1 - zone.start) / zone.unit;
            for u in first..=last {
                self.dirty.set(&zone, z, u);
            }
            at = stop;
        }
        let r = self.m.region_size;
        for region in offset / r..=(end.max(offset + 1) - 1) / r {
            self.stale_regions.insert(region);
        }
    }

    fn mark_all(&mut self) {
        for (z, zone) in self.layout.zones.iter().enumerate() {
            for u in 0..zone.units() {
                self.dirty.set(zone, z, u);
            }
        }
    }

    /// Applies every trace event up to sim time `t`.
    fn advance(&mut self, t: f64) {
        if self.exhausted {
            return;
        }
        let until = self.trace_ns(t);
        loop {
            let w = self.work.writes.get(self.next_write).map(|w| w.ts_ns);
            let g = self.work.gaps.get(self.next_gap).copied();
            let next = match (w, g) {
                (None, None) => {
                    let period = self.work.duration_ns;
                    if self.m.repeat && period >= 1_000_000 {
                        self.base_ns += period;
                        self.next_write = 0;
                        self.next_gap = 0;
                        continue;
                    }
                    self.exhausted = true;
                    return;
                }
                (Some(w), Some(g)) => w.min(g),
                (Some(w), None) => w,
                (None, Some(g)) => g,
            };
            if next + self.base_ns > until {
                return;
            }
            if g == Some(next) {
                self.next_gap += 1;
                self.gaps += 1;
                self.stale_all = true;
                self.mark_all();
            } else {
                let w = self.work.writes[self.next_write];
                self.next_write += 1;
                if w.ts_ns + self.base_ns >= self.m.start_ns {
                    self.mark(w.offset, w.len);
                }
            }
        }
    }

    /// One round: the dirty units in disk order, coalesced into extents.
    fn round(&mut self, skip_zero: bool, paused: bool, last: bool) -> RoundFig {
        let started = self.now;
        let mut fig = RoundFig::default();
        let (mut z, mut unit) = (0, 0);
        loop {
            if !paused {
                self.advance(self.now);
            }
            let Some((zi, u)) = self.dirty.next(z, unit) else {
                break;
            };
            let zone = self.layout.zones[zi];
            let start = zone.unit_range(u).start;
            let mut end = start;
            let mut i = u;
            while i < zone.units() {
                let r = zone.unit_range(i);
                if end > start && end - start + (r.end - r.start) > self.m.extent_len {
                    break;
                }
                if !self.dirty.take(&zone, zi, i) {
                    break;
                }
                end = r.end;
                i += 1;
            }
            (z, unit) = (zi, i);
            let len = end - start;
            let extents = len.div_ceil(self.m.extent_len);
            let sent = if skip_zero {
                len as f64 * self.m.nonzero
            } else {
                len as f64
            };
            let wire = sent * self.m.compression + (extents * self.m.extent_header_bytes) as f64;
            let secs = (wire / (self.m.bandwidth * self.m.efficiency))
                .max(len as f64 / self.m.engine_rate)
                .max(extents as f64 * self.m.per_extent_s);
            self.now += secs;
            fig.sent += sent;
            let f = &mut self.zones[zi];
            f.sent_bytes += sent;
            f.wire_bytes += wire;
            f.extents += extents;
            f.seconds += secs;
            if last {
                f.final_bytes += len;
                f.final_seconds += secs;
            }
        }
        self.now += self.m.rtt_s + self.m.barrier_s;
        fig.seconds = self.now - started;
        fig
    }

    /// Rehashes what was written since the last refresh: the source's tree,
    /// then the destination's (asked for its root), one after the other.
    fn refresh(&mut self) -> f64 {
        let bytes = if self.stale_all {
            self.layout.size as f64
        } else {
            self.stale_regions.len() as f64 * self.m.region_size as f64
        };
        self.stale_all = false;
        self.stale_regions.clear();
        2.0 * bytes / self.m.hash_rate
    }
}

/// Simulates a migration of `work` with units `layout` under `model`.
pub fn simulate(
    work: &Workload,
    layout: &Layout,
    model: &Model,
) -> Result<SimReport, SimulateError> {
    model.validate()?;
    if layout.size != work.size {
        return Err(SimulateError::SizeMismatch {
            plan: layout.size,
            disk: work.size,
        });
    }
    let mut sim = Sim {
        layout,
        work,
        m: model,
        dirty: DirtySet::new(layout),
        now: 0.0,
        next_write: 0,
        next_gap: 0,
        base_ns: 0,
        exhausted: false,
        stale_regions: HashSet::new(),
        stale_all: false,
        gaps: 0,
        zones: layout
            .zones
            .iter()
            .map(|z| ZoneFigures {
                tracking_bytes: z.units().div_ceil(8),
                ..ZoneFigures::default()
            })
            .collect(),
    };
    // Skip the trace up to the start, then copy everything.
    sim.advance(0.0);
    sim.dirty = DirtySet::new(layout);
    sim.stale_regions.clear();
    sim.mark_all();
    let bulk = sim.round(true, false, false);
    let bulk_sent = bulk.sent;
    let mut bandwidth = rate(&bulk);
    // The bulk copy hashed what it read: only what was written since is stale.
    sim.now += sim.refresh();
    let mut rounds = 0;
    let mut converged = true;
    let mut report = SimReport::default();
    loop {
        // The engine rehashes and asks for the destination's root before it
        // reads the dirty count: writes during that count too.
        sim.advance(sim.now);
        sim.now += sim.refresh() + model.rtt_s;
        sim.advance(sim.now);
        let dirty = sim.dirty.dirty_bytes;
        let estimate = if dirty == 0 {
            0.0
        } else if bandwidth > 0.0 {
            dirty as f64 / bandwidth
        } else {
            f64::INFINITY
        };
        report.last_dirty_bytes = dirty;
        report.estimated_downtime_s = estimate;
        let measured = rounds > 0 || dirty == 0;
        // The engine compares whole milliseconds.
        if measured && (estimate * 1e3).ceil() <= (model.max_downtime_s * 1e3).round() {
            break;
        }
        if rounds >= model.max_rounds {
            converged = false;
            break;
        }
        let r = sim.round(false, false, false);
        rounds += 1;
        if r.sent > 0.0 {
            bandwidth = rate(&r);
        }
    }
    report.converged = converged;
    report.rounds = rounds;
    if converged {
        // Downtime: pause, final round with the workload stopped, verify, switch.
        let paused_at = sim.now;
        sim.now += model.pause_s;
        // Writes until the pause takes hold are in the final delta.
        sim.advance(sim.now);
        let before = sim.now;
        let fin = sim.round(false, true, true);
        report.final_round_s = sim.now - before;
        report.final_delta_bytes = whole(fin.sent);
        // Both trees rehash the final delta's regions; two round trips for the roots.
        report.verify_s = sim.refresh() + 2.0 * model.rtt_s;
        sim.now += report.verify_s;
        // Closing the stream and making the export writable.
        sim.now += 2.0 * model.rtt_s;
        report.downtime_s = sim.now - paused_at;
    } else {
        report.downtime_s = f64::INFINITY;
    }
    report.total_s = sim.now;
    report.layout = layout.describe();
    let sent: f64 = sim.zones.iter().map(|z| z.sent_bytes).sum();
    report.sent_bytes = whole(sent);
    report.resent_bytes = whole(sent - bulk_sent);
    report.wire_bytes = whole(sim.zones.iter().map(|z| z.wire_bytes).sum::<f64>());
    report.extents = sim.zones.iter().map(|z| z.extents).sum();
    report.tracking_bytes = layout.tracking_bytes();
    report.gaps = sim.gaps;
    report.zones = sim.zones;
    Ok(report)
}

/// Bytes per second a round moved, as the engine measures it.
fn rate(r: &RoundFig) -> f64 {
    if r.seconds > 0.0 {
        r.sent / r.seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn model() -> Model {
        Model {
            bandwidth: 100e6,
            efficiency: 1.0,
            rtt_s: 0.0,
            per_extent_s: 0.0,
            extent_header_bytes: 0,
            engine_rate: 1e12,
            hash_rate: 1e12,
            barrier_s: 0.0,
            pause_s: 0.0,
            max_downtime_s: 0.01,
            ..Model::default()
        }
    }

    fn work(size: u64, writes: Vec<Write>) -> Workload {
        let duration_ns = writes.last().map_or(0, |w| w.ts_ns);
        Workload {
            size,
            writes,
            duration_ns,
            ..Workload::default()
        }
    }

    #[test]
    fn an_idle_disk_is_one_bulk_copy_at_link_speed() {
        // A single write long after the migration: nothing dirties it.
        let w = work(
            100 * MIB,
            vec![Write {
                ts_ns: 3_600_000_000_000,
                offset: 0,
                len: 4096,
            }],
        );
        let m = Model {
            repeat: false,
            ..model()
        };
        let r = simulate(&w, &Layout::uniform(w.size, MIB).expect("layout"), &m).expect("sim");
        assert!(r.converged);
        assert_eq!(r.rounds, 0);
        assert_eq!(r.sent_bytes, 100 * MIB);
        assert_eq!(r.resent_bytes, 0);
        assert_eq!(r.extents, 100);
        // 104.9 MB at 100 MB/s.
        assert!((r.total_s - 1.048_576).abs() < 1e-6, "{}", r.total_s);
        assert!(r.downtime_s.abs() < 1e-9, "{}", r.downtime_s);
    }

    #[test]
    fn a_write_behind_the_cursor_goes_again_and_a_write_ahead_goes_once() {
        // 10 MiB at 100 MB/s: the bulk copy passes 5 MiB at 52 ms.
        let size = 10 * MIB;
        let behind = Write {
            ts_ns: 60_000_000,
            offset: 0,
            len: 4096,
        };
        let ahead = Write {
            ts_ns: 60_000_001,
            offset: 9 * MIB,
            len: 4096,
        };
        let w = work(size, vec![behind, ahead]);
        let m = Model {
            repeat: false,
            ..model()
        };
        let r = simulate(&w, &Layout::uniform(size, 4096).expect("layout"), &m).expect("sim");
        assert!(r.converged);
        // One delta round sends the unit behind the cursor; the final delta is empty.
        assert_eq!(r.rounds, 1);
        assert_eq!(r.resent_bytes, 4096);
        assert_eq!(r.final_delta_bytes, 0);
        // With 1 MiB units the same write resends a whole unit.
        let r = simulate(&w, &Layout::uniform(size, MIB).expect("layout"), &m).expect("sim");
        assert_eq!(r.resent_bytes, MIB);
    }

    #[test]
    fn a_gap_marks_everything_dirty() {
        let size = 10 * MIB;
        let mut w = work(size, vec![]);
        w.gaps = vec![60_000_000];
        w.duration_ns = 60_000_000;
        let m = Model {
            repeat: false,
            ..model()
        };
        let r = simulate(&w, &Layout::uniform(size, MIB).expect("layout"), &m).expect("sim");
        assert_eq!(r.gaps, 1);
        // At 60 ms the bulk copy (10.5 ms per MiB) has taken units 0..=5: those
        // six go again; the four ahead of the cursor were still to be sent.
        assert_eq!(r.resent_bytes, 6 * MIB);
    }

    #[test]
    fn a_dirty_rate_above_the_link_does_not_converge() {
        // 200 MB/s of fresh 1 MiB writes over 1 GiB, against 100 MB/s.
        let size = 1024 * MIB;
        let writes = (0..2000u64)
            .map(|i| Write {
                ts_ns: i * 5_000_000,
                offset: (i * 7919 % 1024) * MIB,
                len: MIB,
            })
            .collect();
        let w = work(size, writes);
        let r = simulate(&w, &Layout::uniform(size, MIB).expect("layout"), &model()).expect("sim");
        assert!(!r.converged);
        assert_eq!(r.rounds, 30);
        assert!(r.downtime_s.is_infinite());
    }

    #[test]
    fn the_final_delta_is_what_was_written_in_the_last_round() {
        // Ten 4 KiB writes per ms in one MiB: steady, tiny dirty set.
        let size = 64 * MIB;
        let writes = (0..20_000u64)
            .map(|i| Write {
                ts_ns: i * 100_000,
                offset: (i * 37 % 256) * 4096,
                len: 4096,
            })
            .collect();
        let w = work(size, writes);
        let m = Model {
            per_extent_s: 10e-6,
            ..model()
        };
        let r = simulate(&w, &Layout::uniform(size, 4096).expect("layout"), &m).expect("sim");
        assert!(r.converged);
        assert!(r.final_delta_bytes <= MIB, "{}", r.final_delta_bytes);
        assert!(r.downtime_s <= 0.011, "{}", r.downtime_s);
        assert!(r.downtime_s > 0.0);
    }

    #[test]
    fn absurd_parameters_are_refused() {
        let w = work(
            MIB,
            vec![Write {
                ts_ns: 0,
                offset: 0,
                len: 4096,
            }],
        );
        let l = Layout::uniform(MIB, 4096).expect("layout");
        let m = Model {
            bandwidth: 0.0,
            ..model()
        };
        assert!(matches!(
            simulate(&w, &l, &m),
            Err(SimulateError::Parameter {
                what: "the bandwidth",
                ..
            })
        ));
        let m = Model {
            nonzero: 2.0,
            ..model()
        };
        assert!(simulate(&w, &l, &m).is_err());
        let l = Layout::uniform(2 * MIB, 4096).expect("layout");
        assert!(matches!(
            simulate(&w, &l, &model()),
            Err(SimulateError::SizeMismatch { .. })
        ));
    }
}
