//! The workload analyzer: the second stage of the data flow. One `Analyzer`
//! consumes records one at a time — live from a tracing session's observer
//! (`live`) or offline from a trace file (`analyze_trace`), the same code —
//! and keeps, in memory bounded by the device size (see `docs/analyzer.md`):
//!
//! - per-extent statistics at 4 KiB, 64 KiB, 1 MiB and 16 MiB (`extent`),
//!   and for the whole volume;
//! - the dirty rate per window at each resolution (`dirty_rate`);
//! - sequential runs (`sequential`) and periods found in the data (`periodicity`);
//! - working sets per process from page faults (`working_set`);
//! - heatmap grids of blocks and faults (`heatmap`).
//!
//! `report` turns that into the workload's profile. A gap (lost events)
//! marks its windows unknown: they are left out of rates and periods, and the
//! report says how much of the trace they cover.

pub mod cpu;
pub mod dirty_rate;
pub mod extent;
pub mod heatmap;
pub mod periodicity;
pub mod report;
pub mod sequential;
pub mod working_set;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::trace::format::TraceHeader;
use crate::trace::session::Observer;
use crate::trace::{BlockRecord, Op, Record, TraceFileError, TraceReader};

use dirty_rate::Series;
use extent::Level;
use heatmap::{BlockHeat, FaultHeat};
use periodicity::Activity;
use sequential::Sequential;
use working_set::WorkingSets;

/// Resolutions, in bytes: 4 KiB to 16 MiB.
pub const RESOLUTIONS: [u64; 4] = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
pub const LEVELS: usize = RESOLUTIONS.len();
/// Levels from this one up keep full per-extent counters.
pub const STATS_FROM: usize = 2;
/// The largest device the analyzer sizes itself for (its bitmaps grow with the highest offset).
pub const MAX_DEVICE_BYTES: u64 = 64 << 40;

/// How many records ahead `observe_all` prefetches: enough to overlap the
/// misses of several requests, few enough that the lines are still cached.
const PREFETCH_AHEAD: usize = 8;
/// Records decoded at a time offline, for `observe_all`.
const BATCH: usize = 256;

/// Errors of the analyzer; each reads as what to do.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    /// The trace file cannot be read.
    #[error(transparent)]
    File(#[from] TraceFileError),
    /// The trace cannot be opened.
    #[error("cannot open trace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    /// Nothing to analyze.
    #[error(
        "the trace holds no block requests or page faults for target {target}: nothing to analyze (was the workload running while it was traced?)"
    )]
    Empty { target: u16 },
    /// A target index that is not in the trace.
    #[error("--target {target}: the trace has {count} target(s) (0..{count})")]
    NoSuchTarget { target: u16, count: usize },
    /// The window is out of range.
    #[error("--window {0:?} is out of range: choose between 1 ms and 1 h")]
    Window(std::time::Duration),
    /// An offset past what the analyzer sizes for.
    #[error(
        "a request at byte {offset} is beyond the {max} TiB the analyzer sizes for: is this a block trace of a device?"
    )]
    TooLarge { offset: u64, max: u64 },
    /// No font for the heatmap's labels: none found, or plotters refused it
    /// (its `InvalidFont` says nothing more and is not an `Error`).
    #[error("cannot label the heatmap: {0}; install fonts-dejavu-core")]
    Font(String),
    /// The font for the heatmap's labels cannot be read (shared: the outcome
    /// is kept for the process and an `io::Error` is not `Clone`).
    #[error("cannot label the heatmap: cannot read {path}: {source}; install fonts-dejavu-core")]
    FontRead {
        path: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Drawing failed (the PNG cannot be written, say).
    #[error("cannot draw the heatmap: {0}")]
    Draw(#[source] Box<heatmap::DrawError>),
    /// No block requests to draw.
    #[error(
        "the trace holds no block requests for target {target}: for its page faults use --faults"
    )]
    NoBlocks { target: u16 },
    /// No page faults to draw.
    #[error(
        "the trace holds no page faults: trace with --pid PID to record a process's faults, or drop --faults"
    )]
    NoFaults,
}

/// How to analyze.
#[derive(Debug, Clone)]
pub struct AnalyzerConfig {
    /// Which of the trace's targets (block records of others are counted and left out).
    pub target: u16,
    /// The device's size in bytes; 0 when unknown (the analyzer then grows).
    pub device_bytes: u64,
    /// The base window of the dirty rate and working sets.
    pub window: std::time::Duration,
    /// Stored windows before neighbours merge (the series' memory bound).
    pub max_windows: usize,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            target: 0,
            device_bytes: 0,
            window: std::time::Duration::from_secs(1),
            max_windows: 1 << 16,
        }
    }
}

impl AnalyzerConfig {
    /// The config for a trace with `header`: its target's size.
    pub fn for_header(header: &TraceHeader, target: u16) -> Result<AnalyzerConfig, AnalyzeError> {
        let t = header
            .targets
            .get(usize::from(target))
            .ok_or(AnalyzeError::NoSuchTarget {
                target,
                count: header.targets.len(),
            })?;
        Ok(AnalyzerConfig {
            target,
            device_bytes: t.size_bytes.min(MAX_DEVICE_BYTES),
            ..AnalyzerConfig::default()
        })
    }
}

/// Whole-volume totals.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub faults: u64,
    pub fault_writes: u64,
    pub other_targets: u64,
    pub too_large: u64,
    pub gaps: u64,
    pub lost_events: u64,
    pub gap_ns: u64,
    pub first_ns: Option<u64>,
    pub last_ns: u64,
    pub complete: bool,
}

/// The analyzer's state.
pub struct Analyzer {
    pub cfg: AnalyzerConfig,
    pub name: String,
    pub source: String,
    window_ns: u64,
    pub levels: Vec<Level>,
    pub series: Series,
    /// The base window now open (dirty units accumulate for it).
    open_window: u64,
    pub sequential: Sequential,
    pub activity: Activity,
    pub working_sets: WorkingSets,
    pub block_heat: BlockHeat,
    pub fault_heat: FaultHeat,
    pub cpu: cpu::CpuProfile,
    pub totals: Totals,
}

impl Analyzer {
    pub fn new(cfg: AnalyzerConfig) -> Result<Analyzer, AnalyzeError> {
        let window_ns = u64::try_from(cfg.window.as_nanos()).unwrap_or(u64::MAX);
        if !(1_000_000..=3_600_000_000_000).contains(&window_ns) {
            return Err(AnalyzeError::Window(cfg.window));
        }
        let device = cfg.device_bytes.min(MAX_DEVICE_BYTES);
        Ok(Analyzer {
            levels: RESOLUTIONS
                .iter()
                .enumerate()
                .map(|(i, &unit)| Level::new(unit, device, i >= STATS_FROM))
                .collect(),
            series: Series::new(window_ns, cfg.max_windows),
            open_window: 0,
            sequential: Sequential::default(),
            activity: Activity::default(),
            working_sets: WorkingSets::new(window_ns),
            block_heat: BlockHeat::new(device),
            fault_heat: FaultHeat::default(),
            cpu: cpu::CpuProfile::default(),
            totals: Totals::default(),
            name: String::new(),
            source: String::new(),
            window_ns,
            cfg,
        })
    }

    /// An analyzer for a trace with `header`.
    pub fn for_header(header: &TraceHeader, target: u16) -> Result<Analyzer, AnalyzeError> {
        let mut a = Analyzer::new(AnalyzerConfig::for_header(header, target)?)?;
        a.name.clone_from(&header.targets[usize::from(target)].name);
        a.source.clone_from(&header.source);
        a.cpu = cpu::CpuProfile::for_header(header);
        Ok(a)
    }

    /// Bytes of memory the analyzer holds now.
    pub fn memory_bytes(&self) -> usize {
        self.levels.iter().map(Level::bytes).sum::<usize>()
            + self.series.bytes()
            + self.activity.bytes()
            + self.working_sets.bytes()
            + self.block_heat.grid.bytes()
            + self.fault_heat.grid.bytes()
            + self.fault_heat.regions.len() * 24
    }

    /// Closes base windows up to the one holding `ts`, recording their dirty units.
    #[inline]
    fn advance(&mut self, ts: u64) {
        let w = ts / self.window_ns;
        if w > self.open_window {
            self.close_open_window();
            self.open_window = w;
        }
    }

    fn close_open_window(&mut self) {
        let start = self.open_window * self.window_ns;
        let mut dirty = [0u32; LEVELS];
        let mut new = [0u32; LEVELS];
        let mut any = false;
        for (l, level) in self.levels.iter_mut().enumerate() {
            let (d, n) = level.close_window();
            dirty[l] = u32::try_from(d).unwrap_or(u32::MAX);
            new[l] = u32::try_from(n).unwrap_or(u32::MAX);
            any |= d > 0;
        }
        if any {
            let w = self.series.at(start);
            for l in 0..LEVELS {
                w.dirty_units[l] = w.dirty_units[l].saturating_add(dirty[l]);
                w.new_units[l] = w.new_units[l].saturating_add(new[l]);
            }
        }
    }

    /// One record: the single entry point, live and offline.
    pub fn observe(&mut self, rec: &Record) {
        match rec {
            Record::Block(b) => self.block(b),
            Record::Fault(f) => {
                self.seen(f.ts_ns);
                self.advance(f.ts_ns);
                self.totals.faults += 1;
                self.totals.fault_writes += u64::from(f.is_write());
                self.series.at(f.ts_ns).faults += 1;
                self.activity.event(f.ts_ns);
                self.working_sets
                    .fault(f.ts_ns, f.pid, f.address, f.is_write());
                self.fault_heat.fault(f.ts_ns, f.address, f.is_write());
            }
            Record::Gap(g) => {
                self.totals.gaps += 1;
                self.totals.lost_events += g.lost_block + g.lost_fault;
                self.totals.gap_ns += g.end_ns.saturating_sub(g.start_ns);
                let end = g.end_ns.max(g.start_ns);
                self.totals.last_ns = self.totals.last_ns.max(end);
                self.series.mark_unknown(g.start_ns, end);
                self.activity.mark_unknown(g.start_ns, end);
                self.block_heat.grid.mark_unknown(g.start_ns, end);
                self.fault_heat.grid.mark_unknown(g.start_ns, end);
            }
            Record::Process(p) => self.working_sets.name(p.pid, &p.comm),
            Record::Cpu(c) => self.cpu.observe(c),
            Record::End(_) => self.totals.complete = true,
        }
    }

    /// Feeds `recs` in order, exactly as `observe` one by one would, but
    /// asks the CPU to load the state of a request a few records ahead so
    /// that cache misses overlap (the offline path and bulk feeds).
    pub fn observe_all(&mut self, recs: &[Record]) {
        for (i, rec) in recs.iter().enumerate() {
            if let Some(Record::Block(b)) = recs.get(i + PREFETCH_AHEAD) {
                self.prefetch(b);
            }
            self.observe(rec);
        }
    }

    #[inline]
    fn prefetch(&self, b: &BlockRecord) {
        if b.target != self.cfg.target || b.offset >= MAX_DEVICE_BYTES {
            return;
        }
        let write = !matches!(b.op, Op::Read);
        for level in &self.levels {
            level.prefetch(b.offset, write);
        }
    }

    #[inline]
    fn seen(&mut self, ts: u64) {
        if self.totals.first_ns.is_none() {
            self.totals.first_ns = Some(ts);
        }
        self.totals.last_ns = self.totals.last_ns.max(ts);
    }

    #[inline]
    fn block(&mut self, b: &BlockRecord) {
        if b.target != self.cfg.target {
            self.totals.other_targets += 1;
            return;
        }
        let write = match b.op {
            Op::Read => false,
            Op::Write | Op::WriteZeroes => true,
            Op::Discard => {
                self.totals.discards += 1;
                true
            }
            Op::Flush => {
                self.totals.flushes += 1;
                return;
            }
            Op::Other => return,
        };
        let len = u64::from(b.len);
        if len == 0 {
            // An empty write carries a PREFLUSH: a cache flush, no data.
            self.totals.flushes += u64::from(write);
            return;
        }
        if b.offset.saturating_add(len) > MAX_DEVICE_BYTES {
            self.totals.too_large += 1;
            return;
        }
        self.seen(b.ts_ns);
        self.advance(b.ts_ns);
        let w = self.series.at(b.ts_ns);
        if write {
            w.writes += 1;
            w.write_bytes += len;
            self.totals.writes += 1;
            self.totals.write_bytes += len;
        } else {
            w.reads += 1;
            w.read_bytes += len;
            self.totals.reads += 1;
            self.totals.read_bytes += len;
        }
        for level in &mut self.levels {
            level.access(b.ts_ns, b.offset, len, write);
        }
        self.sequential.access(b.offset, len, write);
        self.activity.event(b.ts_ns);
        self.block_heat.access(b.ts_ns, b.offset, len, write);
    }

    /// Ends the analysis: closes the open window. Call once, after the last record.
    pub fn finish(&mut self) {
        // Closing twice is harmless: the second close finds nothing dirty.
        self.close_open_window();
    }

    /// Draws the offset × time heatmap of block I/O to a PNG.
    pub fn block_heatmap(&self, out: &Path) -> Result<(), AnalyzeError> {
        let view = self.block_view()?;
        let y_label = |y: f64| crate::units::human_bytes(y);
        let value_label = |kib: u32| crate::units::human_bytes(f64::from(kib) * 1024.0);
        heatmap::render(
            &heatmap::Picture {
                title: format!("{}: bytes read and written", self.name),
                grid: &view.grid,
                cols: view.cols,
                rows: view.rows,
                y_max: (view.rows as u64 * view.row_bytes) as f64,
                y_label: &y_label,
                y_desc: "offset",
                row_span: crate::units::human_bytes(view.row_bytes as f64),
                value_label: &value_label,
            },
            out,
        )
    }

    /// Draws the address × time heatmap of page faults (1 MiB regions that
    /// faulted, in address order, the space between left out) to a PNG.
    pub fn fault_heatmap(&self, out: &Path) -> Result<(), AnalyzeError> {
        let view = self.fault_view()?;
        let rows = view.rows;
        let y_label = |y: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a row on the axis: non-negative, and as saturates before min"
            )]
            let i = (y.max(0.0) as usize).min(rows - 1);
            format!("{:#x}", view.row_starts[i])
        };
        let value_label = |n: u32| format!("{n} faults");
        heatmap::render(
            &heatmap::Picture {
                title: format!("page faults: {rows} regions of 1 MiB that faulted (address order)"),
                grid: &view.grid,
                cols: view.cols,
                rows,
                y_max: rows as f64,
                y_label: &y_label,
                y_desc: "address",
                row_span: "1 MiB".into(),
                value_label: &value_label,
            },
            out,
        )
    }

    /// The block heatmap's grid as data (for a dashboard to draw): KiB
    /// read and written per offset row and time column.
    pub fn block_heatmap_data(&self) -> Result<heatmap::HeatmapData, AnalyzeError> {
        let view = self.block_view()?;
        Ok(view.data(&self.name, "block", "KiB", 0))
    }

    /// The fault heatmap's grid as data: faults per 1 MiB region that
    /// faulted (in address order) and time column.
    pub fn fault_heatmap_data(&self) -> Result<heatmap::HeatmapData, AnalyzeError> {
        let view = self.fault_view()?;
        Ok(view.data(&self.name, "faults", "faults", self.fault_heat.dropped))
    }

    /// The block grid, the rows the device spans (or that saw I/O) and the
    /// columns the trace lasted.
    fn block_view(&self) -> Result<heatmap::View<'_>, AnalyzeError> {
        if self.totals.reads + self.totals.writes == 0 {
            return Err(AnalyzeError::NoBlocks {
                target: self.cfg.target,
            });
        }
        let heat = &self.block_heat;
        let grid = &heat.grid;
        let used = if self.cfg.device_bytes > 0 {
            usize::try_from(self.cfg.device_bytes.div_ceil(heat.row_bytes)).unwrap_or(usize::MAX)
        } else {
            (0..grid.rows)
                .rev()
                .find(|&r| (0..grid.cols()).any(|c| grid.cells[c * grid.rows + r] != [0, 0]))
                .map_or(1, |r| r + 1)
        }
        .clamp(1, grid.rows);
        let cols = dirty_rate::window_index(self.totals.last_ns, grid.col_ns)
            .saturating_add(1)
            .min(grid.cols());
        Ok(heatmap::View {
            grid: std::borrow::Cow::Borrowed(grid),
            cols,
            rows: used,
            row_bytes: heat.row_bytes,
            row_starts: (0..used as u64).map(|r| r * heat.row_bytes).collect(),
        })
    }

    /// The fault grid with its rows in address order.
    fn fault_view(&self) -> Result<heatmap::View<'_>, AnalyzeError> {
        let heat = &self.fault_heat;
        if heat.regions.is_empty() {
            return Err(AnalyzeError::NoFaults);
        }
        let mut order: Vec<(u64, usize)> = heat.regions.iter().map(|(&a, &r)| (a, r)).collect();
        order.sort_unstable();
        let (src, rows) = (&heat.grid, order.len());
        let mut grid = heatmap::Grid::new(rows);
        grid.col_ns = src.col_ns;
        grid.unknown.clone_from(&src.unknown);
        grid.cells = vec![[0, 0]; src.cols() * rows];
        for c in 0..src.cols() {
            for (new_row, &(_, old_row)) in order.iter().enumerate() {
                grid.cells[c * rows + new_row] = src.cells[c * src.rows + old_row];
            }
        }
        let cols = dirty_rate::window_index(self.totals.last_ns, grid.col_ns)
            .saturating_add(1)
            .min(grid.cols());
        Ok(heatmap::View {
            grid: std::borrow::Cow::Owned(grid),
            cols,
            rows,
            row_bytes: heatmap::REGION,
            row_starts: order.iter().map(|&(a, _)| a * heatmap::REGION).collect(),
        })
    }

    /// Did the trace hold anything to analyze?
    pub fn is_empty(&self) -> bool {
        self.totals.reads + self.totals.writes + self.totals.faults == 0
    }
}

/// Feeds every record of `reader` through a new analyzer for its `target`.
pub fn analyze_reader<R: Read>(
    mut reader: TraceReader<R>,
    target: u16,
    window: Option<std::time::Duration>,
) -> Result<Analyzer, AnalyzeError> {
    let header = reader.header().clone();
    let mut cfg = AnalyzerConfig::for_header(&header, target)?;
    if let Some(w) = window {
        cfg.window = w;
    }
    let mut a = Analyzer::new(cfg)?;
    a.name.clone_from(&header.targets[usize::from(target)].name);
    a.source.clone_from(&header.source);
    a.cpu = cpu::CpuProfile::for_header(&header);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        while batch.len() < BATCH {
            match reader.next_record()? {
                Some(rec) => batch.push(rec),
                None => break,
            }
        }
        a.observe_all(&batch);
        if batch.len() < BATCH {
            break;
        }
    }
    a.finish();
    if a.is_empty() {
        return Err(AnalyzeError::Empty { target });
    }
    Ok(a)
}

/// Opens and analyzes a trace file.
pub fn analyze_trace(
    path: &Path,
    target: u16,
    window: Option<std::time::Duration>,
) -> Result<Analyzer, AnalyzeError> {
    let f = File::open(path).map_err(|source| AnalyzeError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let reader = TraceReader::new(BufReader::with_capacity(1 << 20, f))?;
    analyze_reader(reader, target, window)
}

/// An observer for a live tracing session that feeds `analyzer`: the same
/// `observe` as offline. Lock it (briefly) to read a report while tracing.
pub fn live(analyzer: Arc<Mutex<Analyzer>>) -> Observer {
    Box::new(move |rec| {
        // A poisoned lock means a reader panicked mid-report: the state is still whole.
        let mut a = analyzer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        a.observe(rec);
    })
}

#[cfg(test)]
mod tests;
