//! Heatmaps: offset × time grids of bytes read and written (and address ×
//! time grids of page faults), bounded in size, drawn to PNG with `plotters`.
//! Reads are blue, writes red, both purple; the colour scale is logarithmic;
//! windows lost to gaps are grey; axes read in MiB/GiB and s/min/h.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use plotters::backend::DrawingBackend;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::AnalyzeError;

/// Offset rows of the block heatmap.
pub const ROWS: usize = 256;
/// Address rows (1 MiB regions) of the fault heatmap.
pub const FAULT_ROWS: usize = 512;
pub const REGION: u64 = 1 << 20;
/// Columns before neighbouring columns merge and the column doubles.
pub const MAX_COLS: usize = 1024;
pub const FIRST_COL_NS: u64 = 10_000_000;

/// Fonts looked for, in order, for the labels.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// A time-columned grid of (read, write) counters.
#[derive(Debug, Clone)]
pub struct Grid {
    pub rows: usize,
    pub col_ns: u64,
    /// Column-major: `cells[col * rows + row]` = (read, write).
    pub cells: Vec<[u32; 2]>,
    pub unknown: Vec<bool>,
}

impl Grid {
    pub fn new(rows: usize) -> Grid {
        Grid {
            rows,
            col_ns: FIRST_COL_NS,
            cells: Vec::new(),
            unknown: Vec::new(),
        }
    }

    pub fn cols(&self) -> usize {
        self.unknown.len()
    }

    pub fn bytes(&self) -> usize {
        self.cells.capacity() * 8 + self.unknown.capacity()
    }

    fn col(&mut self, ts: u64) -> usize {
        let mut c = ts / self.col_ns;
        while c >= MAX_COLS as u64 {
            self.halve();
            c = ts / self.col_ns;
        }
        let c = usize::try_from(c).expect("a column below MAX_COLS fits usize");
        if c >= self.cols() {
            self.cells.resize((c + 1) * self.rows, [0, 0]);
            self.unknown.resize(c + 1, false);
        }
        c
    }

    fn halve(&mut self) {
        let (rows, cols) = (self.rows, self.cols());
        let new_cols = cols.div_ceil(2);
        let mut cells = vec![[0u32; 2]; new_cols * rows];
        for c in 0..cols {
            for r in 0..rows {
                let a = self.cells[c * rows + r];
                let b = &mut cells[(c / 2) * rows + r];
                b[0] = b[0].saturating_add(a[0]);
                b[1] = b[1].saturating_add(a[1]);
            }
        }
        self.cells = cells;
        self.unknown = self
            .unknown
            .chunks(2)
            .map(|p| p.iter().any(|&u| u))
            .collect();
        self.col_ns *= 2;
    }

    #[inline]
    pub fn add(&mut self, ts: u64, row: usize, write: bool, amount: u32) {
        let c = self.col(ts);
        let cell = &mut self.cells[c * self.rows + row];
        cell[usize::from(write)] = cell[usize::from(write)].saturating_add(amount);
    }

    pub fn mark_unknown(&mut self, start: u64, end: u64) {
        let b = self.col(end);
        // start <= end, so its column is at most end's: `min` only keeps that.
        let a = usize::try_from(start / self.col_ns).map_or(b, |a| a.min(b));
        for u in &mut self.unknown[a..=b] {
            *u = true;
        }
    }

    /// Merges neighbouring rows in pairs (the row span doubles).
    fn halve_rows(&mut self) {
        let rows = self.rows;
        for c in 0..self.cols() {
            let col = &mut self.cells[c * rows..(c + 1) * rows];
            for r in 0..rows / 2 {
                let (a, b) = (col[2 * r], col[2 * r + 1]);
                col[r] = [a[0].saturating_add(b[0]), a[1].saturating_add(b[1])];
            }
            for cell in &mut col[rows / 2..] {
                *cell = [0, 0];
            }
        }
    }
}

/// A grid cut to what a trace used: its first `cols` columns and `rows`
/// rows, each row starting at `row_starts[row]` (an offset or an address)
/// and spanning `row_bytes`.
pub struct View<'a> {
    pub grid: std::borrow::Cow<'a, Grid>,
    pub cols: usize,
    pub rows: usize,
    pub row_bytes: u64,
    pub row_starts: Vec<u64>,
}

/// A heatmap as data (`tern analyze heatmap --out F.json`), for a dashboard
/// to draw: `read[row][col]` and `write[row][col]` in `value` units.
#[derive(Debug, serde::Serialize)]
pub struct HeatmapData {
    pub version: u32,
    /// `block` (offset × time) or `faults` (address × time).
    pub kind: &'static str,
    /// The traced target's name.
    pub target: String,
    /// `KiB` (each request's share of a row rounded up to a whole KiB) or
    /// `faults`.
    pub value: &'static str,
    pub column_seconds: f64,
    pub columns: usize,
    pub rows: usize,
    pub row_bytes: u64,
    /// Where each row starts: a device offset, or a fault region's address.
    pub row_starts: Vec<u64>,
    pub read: Vec<Vec<u32>>,
    pub write: Vec<Vec<u32>>,
    /// Columns a gap touched: no claim can be made about them.
    pub unknown_columns: Vec<usize>,
    /// Cells at the counter's ceiling (2^32 − 1): their value is a floor.
    pub saturated_cells: usize,
    /// Faults in regions past the map's rows, not in any cell.
    pub dropped: u64,
}

impl View<'_> {
    /// The data: each cell's counters as they are, in `value` units.
    pub fn data(
        &self,
        target: &str,
        kind: &'static str,
        value: &'static str,
        dropped: u64,
    ) -> HeatmapData {
        let g = &self.grid;
        let series = |op: usize| -> Vec<Vec<u32>> {
            (0..self.rows)
                .map(|r| {
                    (0..self.cols)
                        .map(|c| g.cells[c * g.rows + r][op])
                        .collect()
                })
                .collect()
        };
        let saturated_cells = (0..self.cols)
            .flat_map(|c| &g.cells[c * g.rows..c * g.rows + self.rows])
            .flatten()
            .filter(|&&v| v == u32::MAX)
            .count();
        HeatmapData {
            version: 1,
            kind,
            target: target.to_owned(),
            value,
            column_seconds: g.col_ns as f64 / 1e9,
            columns: self.cols,
            rows: self.rows,
            row_bytes: self.row_bytes,
            row_starts: self.row_starts.clone(),
            read: series(0),
            write: series(1),
            unknown_columns: (0..self.cols).filter(|&c| g.unknown[c]).collect(),
            saturated_cells,
            dropped,
        }
    }
}

/// The block heatmap: `ROWS` offset bins of `row_bytes` each, values in KiB.
#[derive(Debug)]
pub struct BlockHeat {
    pub grid: Grid,
    pub row_bytes: u64,
}

impl BlockHeat {
    pub fn new(device_bytes: u64) -> BlockHeat {
        BlockHeat {
            grid: Grid::new(ROWS),
            row_bytes: (device_bytes.div_ceil(ROWS as u64))
                .max(4096)
                .next_power_of_two(),
        }
    }

    #[inline]
    pub fn access(&mut self, ts: u64, offset: u64, len: u64, write: bool) {
        while offset + len > self.row_bytes * ROWS as u64 {
            // A device bigger than the header said (or no size known): widen the rows.
            self.grid.halve_rows();
            self.row_bytes *= 2;
        }
        let (first, last) = (offset / self.row_bytes, (offset + len - 1) / self.row_bytes);
        for row in first..=last {
            let lo = offset.max(row * self.row_bytes);
            let hi = (offset + len).min((row + 1) * self.row_bytes);
            #[expect(
                clippy::cast_possible_truncation,
                reason = "row < ROWS: the loop above widened the rows until the request fits"
            )]
            let row = row as usize;
            // A cell counts KiB and saturates: so does one request's share.
            let kib = u32::try_from((hi - lo).div_ceil(1024)).unwrap_or(u32::MAX);
            self.grid.add(ts, row, write, kib);
        }
    }
}

/// The fault heatmap: one row per 1 MiB region of address space that faulted,
/// rows in address order when drawn (the empty space between is left out).
#[derive(Debug)]
pub struct FaultHeat {
    pub grid: Grid,
    pub regions: HashMap<u64, usize>,
    pub dropped: u64,
}

impl Default for FaultHeat {
    fn default() -> Self {
        FaultHeat {
            grid: Grid::new(FAULT_ROWS),
            regions: HashMap::new(),
            dropped: 0,
        }
    }
}

impl FaultHeat {
    pub fn fault(&mut self, ts: u64, address: u64, write: bool) {
        let region = address / REGION;
        let next = self.regions.len();
        let row = match self.regions.get(&region) {
            Some(&r) => r,
            None if next < FAULT_ROWS => {
                self.regions.insert(region, next);
                next
            }
            None => {
                self.dropped += 1;
                return;
            }
        };
        self.grid.add(ts, row, write, 1);
    }
}

use crate::units::human_secs;

fn register_font() -> Result<(), AnalyzeError> {
    /// Why there is no font, kept for the process like the font itself.
    #[derive(Clone)]
    enum Failure {
        Message(String),
        Read(&'static str, Arc<std::io::Error>),
    }
    static FONT: OnceLock<Result<(), Failure>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = *FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                Failure::Message(format!(
                    "no DejaVu Sans font found (looked in {})",
                    FONTS.join(", ")
                ))
            })?;
        let bytes = std::fs::read(path).map_err(|e| Failure::Read(path, Arc::new(e)))?;
        // Registered once per process for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| Failure::Message(format!("{path} is not a usable font")))
    })
    .clone()
    .map_err(|failure| match failure {
        Failure::Message(text) => AnalyzeError::Font(text),
        Failure::Read(path, source) => AnalyzeError::FontRead { path, source },
    })
}

/// A cell's colour: reads blue, writes red, log scale, grey where unknown.
fn colour(read: u32, write: u32, max: f64, unknown: bool) -> RGBColor {
    if read == 0 && write == 0 {
        return if unknown {
            RGBColor(205, 205, 205)
        } else {
            WHITE
        };
    }
    let scale = |v: u32| {
        if v == 0 {
            0.0
        } else {
            // Anything non-zero is visible: 0.15 at the floor, 1 at the max.
            0.15 + 0.85 * (1.0 + f64::from(v)).ln() / (1.0 + max).ln()
        }
    };
    let (r, w) = (scale(read), scale(write));
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "v is clamped to 0..=1, so the channel lies in 0..=255"
    )]
    let ch = |v: f64| (255.0 * v.clamp(0.0, 1.0)) as u8;
    RGBColor(
        ch(1.0 - 0.85 * r),
        ch((1.0 - 0.65 * r) * (1.0 - 0.85 * w)),
        ch(1.0 - 0.85 * w),
    )
}

/// What to draw.
pub struct Picture<'a> {
    pub title: String,
    pub grid: &'a Grid,
    /// Columns with data (the trace's length in columns).
    pub cols: usize,
    pub rows: usize,
    /// Y extent and its label for a row boundary.
    pub y_max: f64,
    pub y_label: &'a dyn Fn(f64) -> String,
    pub y_desc: &'a str,
    /// What one cell spans on the y axis, e.g. `4 MiB`.
    pub row_span: String,
    /// How a cell's value reads, e.g. `12 MiB` or `40 faults`.
    pub value_label: &'a dyn Fn(u32) -> String,
}

/// What drawing to the PNG fails with (plotters names the backend's error
/// type only through the backend).
pub type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

fn draw_err(e: DrawError) -> AnalyzeError {
    AnalyzeError::Draw(Box::new(e))
}

/// Draws `pic` to a PNG at `out`.
pub fn render(pic: &Picture<'_>, out: &Path) -> Result<(), AnalyzeError> {
    register_font()?;
    let cols = pic.cols.max(1);
    let secs = cols as f64 * pic.grid.col_ns as f64 / 1e9;
    let max = (0..cols)
        .flat_map(|c| pic.grid.cells[c * pic.grid.rows..c * pic.grid.rows + pic.rows].iter())
        .map(|c| c[0].max(c[1]))
        .max()
        .unwrap_or(0);
    let root = BitMapBackend::new(out, (1400, 860)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (top, legend) = root.split_vertically(820);
    let mut chart = ChartBuilder::on(&top)
        .caption(&pic.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(110)
        .build_cartesian_2d(0f64..secs, 0f64..pic.y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("time")
        .y_desc(pic.y_desc)
        .x_label_formatter(&|x| human_secs(*x))
        .y_label_formatter(&|y| (pic.y_label)(*y))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    let area = chart.plotting_area().strip_coord_spec();
    let (w, h) = area.dim_in_pixel();
    for px in 0..w {
        let c = (px as usize * cols / w as usize).min(cols - 1);
        let unknown = pic.grid.unknown.get(c).copied().unwrap_or(false);
        for py in 0..h {
            let r = ((h - 1 - py) as usize * pic.rows / h as usize).min(pic.rows - 1);
            let cell = pic.grid.cells[c * pic.grid.rows + r];
            let col = colour(cell[0], cell[1], f64::from(max), unknown);
            if col != WHITE {
                #[expect(
                    clippy::cast_possible_wrap,
                    reason = "pixels of the chart image we sized, far below i32::MAX"
                )]
                let at = (px as i32, py as i32);
                area.draw_pixel(at, &col).map_err(draw_err)?;
            }
        }
    }
    let text = format!(
        "reads: blue   writes: red   both: purple   lost events (gap): grey   log colour scale, darkest = {} per cell ({} × {})",
        (pic.value_label)(max),
        human_secs(pic.grid.col_ns as f64 / 1e9),
        pic.row_span
    );
    legend
        .draw(&Text::new(text, (20, 10), ("sans-serif", 15)))
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_widen_when_the_device_is_bigger_than_said() {
        let mut h = BlockHeat::new(1 << 20);
        assert_eq!(h.row_bytes, 4096);
        h.access(0, 0, 4096, true);
        h.access(0, 4 << 20, 4096, false);
        assert_eq!(h.row_bytes, 32768);
        assert_eq!(h.grid.cells[0], [0, 4]);
        assert_eq!(h.grid.cells[128], [4, 0]);
    }

    #[test]
    fn reads_and_writes_get_different_colours() {
        let r = colour(100, 0, 100.0, false);
        let w = colour(0, 100, 100.0, false);
        assert!(r.2 > r.0 && w.0 > w.2);
        assert_eq!(colour(0, 0, 100.0, true), RGBColor(205, 205, 205));
    }
}
