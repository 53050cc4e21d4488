//! A tracing session: tracer events → records in the trace's coordinates →
//! the trace file, with gaps for lost events and a live summary.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_common::{BlockEvent, FaultEvent};

use super::completions::{CompletionCheck, Counts};
use super::cpu::{CpuError, CpuSampler, CpuTarget};
use super::device::{self, BlockDevice, DeviceError};
use super::fiemap::{FiemapError, ImageMap};
use super::format::{Target, TargetKind, TraceFileError, TraceHeader, TraceWriter};
use super::record::{
    BlockRecord, EndRecord, FaultRecord, Gap, Op, ProcessRecord, Record, block_flags,
};
use super::tracer::{Event, Lost, Tracer, TracerConfig, TracerError, monotonic_ns};

/// Errors of a tracing session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Fiemap(#[from] FiemapError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    File(#[from] TraceFileError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Nothing to trace.
    #[error("nothing to trace: give at least one --device or a --file")]
    NoTarget,
    /// More devices than a trace can name.
    #[error("{0} devices given; a trace holds at most 65536")]
    TooManyDevices(usize),
    /// The output cannot be created.
    #[error("cannot create trace file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a session traces and where it writes.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub devices: Vec<PathBuf>,
    pub image: Option<PathBuf>,
    pub pids: Vec<u32>,
    pub faults: bool,
    pub fault_range: Option<(u64, u64)>,
    pub duration: Option<Duration>,
    pub ring_bytes: u64,
    pub out: PathBuf,
    /// Print the live one-line summary on stderr.
    pub progress: bool,
    /// Whose CPU to profile beside the I/O (empty: none).
    pub cpu: Vec<CpuTarget>,
}

/// Totals of a finished session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTotals {
    pub block_events: u64,
    pub fault_events: u64,
    pub lost_block: u64,
    pub lost_fault: u64,
    pub gaps: u64,
    pub outside_image: u64,
    /// The cross-check at the end: modifying requests the kernel completed
    /// on the traced disks since its base, and their events received.
    pub checked_completions: u64,
    pub checked_events: u64,
    /// Requests whose completion the tracer never saw, recorded from their
    /// in-flight records (at the request's reuse, or once the disk was
    /// quiet) instead of lost.
    pub unseen_events: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub elapsed: Duration,
}

/// How device events become records.
enum Mapping {
    /// Device targets: kernel disk `dev_t` → (target index, partition start).
    Devices(HashMap<u32, (u16, u64)>),
    /// One image: device bytes → image offsets.
    Image {
        map: ImageMap,
        disk_dev: u32,
        last_refresh: Instant,
    },
}

const PROCESS_CACHE: usize = 65_536;
const FIEMAP_REFRESH: Duration = Duration::from_secs(1);
const FIEMAP_MISS_REFRESH: Duration = Duration::from_millis(100);

struct Recorder {
    writer: TraceWriter<BufWriter<File>>,
    start_mono: u64,
    mapping: Mapping,
    comms: HashMap<u32, [core::ffi::c_char; 16]>,
    totals: SessionTotals,
    /// Lost counters at the last look, and when that look was (monotonic ns).
    lost_seen: (u64, u64),
    /// The kernel side's counters at the last look, by cause (for the log).
    kernel_seen: Lost,
    last_check: u64,
    /// Sees every record before the file does (the source agent's dirty tracking).
    observer: Option<Observer>,
    /// The trace against the kernel's count of completed writes.
    completions: CompletionCheck,
    /// Completions the kernel counted whose events never arrived, so far.
    unseen: u64,
    /// The CPU counters, sampled between drains.
    cpu: Option<CpuSampler>,
    /// CPU samples skipped because a target could no longer be read.
    cpu_unreadable: u64,
}

/// A callback that sees each record as it is written.
pub type Observer = Box<dyn FnMut(&Record) + Send>;

impl Recorder {
    fn emit(&mut self, rec: &Record) -> Result<(), TraceFileError> {
        if let Some(observer) = &mut self.observer {
            observer(rec);
        }
        self.writer.push(rec)
    }

    fn rel(&self, ts: u64) -> u64 {
        ts.saturating_sub(self.start_mono)
    }

    fn note_process(&mut self, ev: &BlockEvent) -> Result<(), TraceFileError> {
        if ev.pid == 0 || self.comms.get(&ev.pid) == Some(&ev.comm) {
            return Ok(());
        }
        if self.comms.len() >= PROCESS_CACHE {
            self.comms.clear();
        }
        self.comms.insert(ev.pid, ev.comm);
        let rec = ProcessRecord {
            ts_ns: self.rel(ev.ts_ns),
            pid: ev.pid,
            comm: tern_common::comm_str(&ev.comm).to_string(),
        };
        self.emit(&Record::Process(rec))
    }

    fn block(&mut self, ev: &BlockEvent) -> Result<(), SessionError> {
        self.note_process(ev)?;
        let op = Op::from_abi(ev.op);
        if !matches!(op, Op::Read | Op::Flush) {
            // When the completion fired: its issue plus its latency (0 for
            // a completion seen without its issue, and for a bio).
            self.completions
                .note(ev.dev, ev.ts_ns.saturating_add(ev.latency_ns));
        }
        self.totals.block_events += 1;
        if ev.flags & block_flags::UNSEEN != 0 {
            self.totals.unseen_events += 1;
        }
        match op {
            Op::Read => self.totals.read_bytes += u64::from(ev.bytes),
            Op::Write | Op::WriteZeroes | Op::Discard => {
                self.totals.write_bytes += u64::from(ev.bytes);
            }
            _ => {}
        }
        let base = BlockRecord {
            ts_ns: self.rel(ev.ts_ns),
            offset: 0,
            latency_ns: ev.latency_ns,
            len: ev.bytes,
            pid: ev.pid,
            flags: ev.flags,
            target: 0,
            op,
        };
        let disk_byte = ev.sector.saturating_mul(512);
        match &mut self.mapping {
            Mapping::Devices(targets) => {
                let Some(&(target, start)) = targets.get(&ev.dev) else {
                    return Ok(());
                };
                let offset = if op == Op::Flush {
                    0
                } else {
                    disk_byte.saturating_sub(start)
                };
                self.emit(&Record::Block(BlockRecord {
                    offset,
                    target,
                    ..base
                }))?;
            }
            Mapping::Image {
                map,
                disk_dev,
                last_refresh,
            } => {
                if ev.dev != *disk_dev {
                    return Ok(());
                }
                if op == Op::Flush || ev.bytes == 0 {
                    self.emit(&Record::Block(base))?;
                    return Ok(());
                }
                let len = u64::from(ev.bytes);
                let mut mapped: Vec<(u64, u64)> = map.map(disk_byte, len).collect();
                if mapped.iter().map(|(_, l)| l).sum::<u64>() < len
                    && last_refresh.elapsed() >= FIEMAP_MISS_REFRESH
                {
                    // A write into blocks allocated since the last look: look again.
                    map.refresh()?;
                    *last_refresh = Instant::now();
                    mapped = map.map(disk_byte, len).collect();
                }
                let inside: u64 = mapped.iter().map(|(_, l)| l).sum();
                if inside < len {
                    self.totals.outside_image += 1;
                }
                for (offset, part) in mapped {
                    #[expect(
                        clippy::cast_possible_truncation,
                        reason = "a part of the request, whose length `ev.bytes` is a u32"
                    )]
                    let part = part as u32;
                    self.emit(&Record::Block(BlockRecord {
                        offset,
                        len: part,
                        ..base
                    }))?;
                }
            }
        }
        Ok(())
    }

    fn fault(&mut self, ev: &FaultEvent) -> Result<(), TraceFileError> {
        self.totals.fault_events += 1;
        self.emit(&Record::Fault(FaultRecord {
            ts_ns: self.rel(ev.ts_ns),
            address: ev.address,
            ip: ev.ip,
            pid: ev.pid,
            tid: ev.tid,
            flags: ev.flags,
        }))
    }

    /// Marks a gap when the kernel dropped events since the last look.
    /// `before`: the kernel's completion counts read before the last drain.
    fn check_lost(&mut self, tracer: &Tracer, before: &Counts) -> Result<(), SessionError> {
        let now = monotonic_ns();
        let unseen = self.completions.newly_lost(before);
        self.unseen += unseen;
        let kernel = tracer.lost()?;
        let lost = (kernel.block() + self.unseen, kernel.fault());
        if lost != self.lost_seen {
            // Anything may have happened between the last look and now.
            self.emit(&Record::Gap(Gap {
                start_ns: self.rel(self.last_check),
                end_ns: self.rel(now),
                lost_block: lost.0 - self.lost_seen.0,
                lost_fault: lost.1 - self.lost_seen.1,
            }))?;
            self.totals.gaps += 1;
            // One line per gap (not per event): the window is also in the file.
            let was = self.kernel_seen;
            tracing::warn!(
                lost_block = lost.0 - self.lost_seen.0,
                lost_fault = lost.1 - self.lost_seen.1,
                ring_full = (kernel.block_ring_full + kernel.fault_ring_full)
                    - (was.block_ring_full + was.fault_ring_full),
                skipped_runs = (kernel.block_skipped + kernel.fault_skipped)
                    - (was.block_skipped + was.fault_skipped),
                unseen_completions = unseen,
                window_ms = (now - self.last_check) / 1_000_000,
                "events lost; trace marked with a gap"
            );
            self.totals.lost_block = lost.0;
            self.totals.lost_fault = lost.1;
            self.lost_seen = lost;
            self.kernel_seen = kernel;
        }
        self.last_check = now;
        Ok(())
    }

    /// Writes the CPU records of the interval since the last sample.
    fn sample_cpu(&mut self, force: bool) -> Result<(), TraceFileError> {
        let Some(sampler) = &mut self.cpu else {
            return Ok(());
        };
        if !force && !sampler.due() {
            return Ok(());
        }
        let now = monotonic_ns().saturating_sub(self.start_mono);
        let (records, unreadable) = sampler.sample(now);
        if unreadable > 0 && self.cpu_unreadable == 0 {
            // Once: a process that exited stays gone.
            tracing::warn!("a CPU target can no longer be read; its samples are left out");
        }
        self.cpu_unreadable += unreadable;
        for c in records {
            self.emit(&Record::Cpu(c))?;
        }
        Ok(())
    }

    fn event(&mut self, ev: &Event) -> Result<(), SessionError> {
        match ev {
            Event::Block(b) => self.block(b),
            Event::Fault(f) => Ok(self.fault(f)?),
        }
    }
}

/// What the tracer filters on: whole-disk kernel `dev_t` and its I/O path.
type DeviceFilter = Vec<(u32, device::IoPath)>;

/// The header and mapping for what the config names.
fn targets(cfg: &SessionConfig) -> Result<(Vec<Target>, DeviceFilter, Mapping), SessionError> {
    if let Some(image) = &cfg.image {
        let map = ImageMap::open(image)?;
        let dev = map.device.clone();
        let target = Target {
            name: image.display().to_string(),
            kind: TargetKind::Image,
            dev: Some(dev.numbers()),
            size_bytes: map.image_size,
            logical_block_size: dev.logical_block_size,
        };
        let disk_dev = dev.kernel_disk_dev();
        let mapping = Mapping::Image {
            map,
            disk_dev,
            last_refresh: Instant::now(),
        };
        return Ok((vec![target], vec![(disk_dev, dev.io_path)], mapping));
    }
    if cfg.devices.is_empty() {
        return Err(SessionError::NoTarget);
    }
    let mut list = Vec::new();
    let mut filters = Vec::new();
    let mut by_dev = HashMap::new();
    for (i, path) in cfg.devices.iter().enumerate() {
        let dev = BlockDevice::open(path)?;
        list.push(Target {
            name: path.display().to_string(),
            kind: TargetKind::Device,
            dev: Some(dev.numbers()),
            size_bytes: dev.size_bytes,
            logical_block_size: dev.logical_block_size,
        });
        // Two partitions of one disk: events map to the first by disk; keep one filter entry.
        // Records name their target by a u16 index.
        let index =
            u16::try_from(i).map_err(|_| SessionError::TooManyDevices(cfg.devices.len()))?;
        by_dev
            .entry(dev.kernel_disk_dev())
            .or_insert((index, dev.start_bytes));
        filters.push((dev.kernel_disk_dev(), dev.io_path));
    }
    filters.dedup();
    Ok((list, filters, Mapping::Devices(by_dev)))
}

struct Progress {
    enabled: bool,
    terminal: bool,
    last: Instant,
    last_totals: SessionTotals,
    every: Duration,
}

impl Progress {
    fn tick(&mut self, totals: &SessionTotals, lost: u64, force: bool) {
        if !self.enabled || (!force && self.last.elapsed() < self.every) {
            return;
        }
        let dt = self.last.elapsed().as_secs_f64().max(1e-3);
        let ev = (totals.block_events + totals.fault_events)
            - (self.last_totals.block_events + self.last_totals.fault_events);
        let line = format!(
            "tern trace: {:>8.0} events/s  read {:>8.1} MB/s  write {:>8.1} MB/s  lost {}  ({} events in {:.0?})",
            ev as f64 / dt,
            (totals.read_bytes - self.last_totals.read_bytes) as f64 / dt / 1e6,
            (totals.write_bytes - self.last_totals.write_bytes) as f64 / dt / 1e6,
            lost,
            totals.block_events + totals.fault_events,
            totals.elapsed,
        );
        let mut err = std::io::stderr().lock();
        // A progress line that cannot be printed is not worth failing the trace over.
        let _ = if self.terminal {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        self.last = Instant::now();
        self.last_totals = *totals;
    }
}

/// A running session. `run` drives it to the end; callers that own their
/// loop (the source agent, tests) call `step` and `finish` themselves.
pub struct Session {
    tracer: Tracer,
    header: TraceHeader,
    rec: Recorder,
    progress: Progress,
    started: Instant,
    last_flush: Instant,
}

impl Session {
    /// Checks the system, resolves the targets, loads and attaches the tracer.
    pub fn start(cfg: &SessionConfig) -> Result<Session, SessionError> {
        device::check_tracing_preconditions()?;
        let (target_list, filters, mapping) = targets(cfg)?;
        let tracer_cfg = TracerConfig {
            devices: filters,
            pids: cfg.pids.clone(),
            faults: cfg.faults,
            fault_range: cfg.fault_range,
            ring_bytes: cfg.ring_bytes,
        };
        let file = File::create(&cfg.out).map_err(|source| SessionError::Create {
            path: cfg.out.clone(),
            source,
        })?;
        let cpu = (!cfg.cpu.is_empty())
            .then(|| CpuSampler::new(&cfg.cpu))
            .transpose()?;
        let tracer = Tracer::start(&tracer_cfg)?;
        // After the attach: every write the kernel counts from here on fires
        // the attached tracepoint.
        let completions = CompletionCheck::new(
            tracer_cfg.devices.iter().map(|(dev, _)| *dev),
            !cfg.pids.is_empty(),
        );
        let start_mono = monotonic_ns();
        let header = TraceHeader {
            kernel_release: device::kernel_release(),
            hostname: device::hostname(),
            start_wall_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            start_monotonic_ns: start_mono,
            sector_size: 512,
            targets: target_list,
            fault_pids: if cfg.faults {
                cfg.pids.clone()
            } else {
                Vec::new()
            },
            source: "ebpf".into(),
            cpu_targets: cfg.cpu.iter().map(ToString::to_string).collect(),
            host_cpus: super::cpu::online_cpus(),
        };
        let mut writer = TraceWriter::new(BufWriter::with_capacity(256 * 1024, file), &header)?;
        // The header on disk tells a watcher that tracing has begun.
        writer.flush()?;
        let terminal = std::io::stderr().is_terminal();
        Ok(Session {
            tracer,
            header,
            rec: Recorder {
                writer,
                start_mono,
                mapping,
                comms: HashMap::new(),
                totals: SessionTotals::default(),
                lost_seen: (0, 0),
                kernel_seen: Lost::default(),
                last_check: start_mono,
                observer: None,
                completions,
                unseen: 0,
                cpu,
                cpu_unreadable: 0,
            },
            progress: Progress {
                enabled: cfg.progress,
                terminal,
                last: Instant::now(),
                last_totals: SessionTotals::default(),
                every: if terminal {
                    Duration::from_secs(1)
                } else {
                    Duration::from_secs(5)
                },
            },
            started: Instant::now(),
            last_flush: Instant::now(),
        })
    }

    fn drain(
        &mut self,
        wait: Option<(Duration, Option<BorrowedFd<'_>>)>,
    ) -> Result<(), SessionError> {
        let mut failure: Option<SessionError> = None;
        let rec = &mut self.rec;
        let mut handle = |ev: Event| {
            if failure.is_none()
                && let Err(e) = rec.event(&ev)
            {
                failure = Some(e);
            }
        };
        match wait {
            Some((timeout, wake)) => {
                self.tracer.poll(timeout, wake, &mut handle)?;
            }
            None => {
                self.tracer.drain(&mut handle);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Where the trace is short of the kernel's `counts` and the disk is
    /// quiet, records the requests whose completions the tracer never saw
    /// from their in-flight records: the writes are then in the trace, not
    /// a gap that only a comparison of whole disks can make good.
    fn recover_unseen(&mut self, counts: &Counts) -> Result<(), SessionError> {
        for (dev, issued_before) in self.rec.completions.short_and_quiet(counts) {
            let mut failure: Option<SessionError> = None;
            let rec = &mut self.rec;
            self.tracer
                .take_unseen(dev, issued_before, monotonic_ns(), |ev| {
                    if failure.is_none()
                        && let Err(e) = rec.event(&ev)
                    {
                        failure = Some(e);
                    }
                })?;
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether the trace held every completed write the kernel counted at
    /// the latest look (or a gap for it): see [`CompletionCheck::settled`].
    pub fn settled(&self) -> bool {
        self.rec.completions.settled()
    }

    /// Waits up to `timeout` for events, records them, marks gaps, refreshes the
    /// image map, flushes once a second and updates the live summary.
    pub fn step(&mut self, timeout: Duration) -> Result<(), SessionError> {
        self.step_or_woken(timeout, None)
    }

    /// [`Session::step`], whose wait also ends when `wake` (an eventfd its
    /// owner resets) becomes readable: a caller waiting for a drain need not
    /// wait out the timeout.
    pub fn step_or_woken(
        &mut self,
        timeout: Duration,
        wake: Option<BorrowedFd<'_>>,
    ) -> Result<(), SessionError> {
        let counts = self.rec.completions.read();
        self.drain(Some((timeout, wake)))?;
        self.recover_unseen(&counts)?;
        self.rec.check_lost(&self.tracer, &counts)?;
        self.rec.sample_cpu(false)?;
        self.rec.totals.elapsed = self.started.elapsed();
        if let Mapping::Image {
            map, last_refresh, ..
        } = &mut self.rec.mapping
            && last_refresh.elapsed() >= FIEMAP_REFRESH
        {
            map.refresh()?;
            *last_refresh = Instant::now();
        }
        if self.last_flush.elapsed() >= Duration::from_secs(1) {
            // A reader (or a crash) sees at most a second less than was traced.
            self.rec.writer.flush()?;
            self.last_flush = Instant::now();
        }
        self.progress.tick(
            &self.rec.totals,
            self.rec.lost_seen.0 + self.rec.lost_seen.1,
            false,
        );
        Ok(())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The header written at the start of the trace file.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Hands every later record (blocks in the trace's coordinates, gaps) to
    /// `observer` as well as to the file.
    pub fn observe(&mut self, observer: Observer) {
        self.rec.observer = Some(observer);
    }

    /// Totals so far.
    pub fn totals(&self) -> SessionTotals {
        self.rec.totals
    }

    /// Drains what is left, marks a final gap if needed, detaches and writes the end record.
    pub fn finish(mut self) -> Result<SessionTotals, SessionError> {
        let counts = self.rec.completions.read();
        self.drain(None)?;
        self.recover_unseen(&counts)?;
        self.rec.check_lost(&self.tracer, &counts)?;
        self.rec.sample_cpu(true)?;
        for (dev, completed, traced) in self.rec.completions.tally(&counts) {
            self.rec.totals.checked_completions += completed;
            self.rec.totals.checked_events += traced;
            tracing::info!(
                device = %device::kernel_dev_name(dev),
                completed,
                traced,
                unseen = self.rec.totals.unseen_events,
                "trace cross-check: modifying requests the kernel completed and events received"
            );
        }
        let Session {
            tracer,
            mut rec,
            mut progress,
            started,
            ..
        } = self;
        drop(tracer);
        rec.totals.elapsed = started.elapsed();
        progress.tick(&rec.totals, rec.lost_seen.0 + rec.lost_seen.1, true);
        if progress.enabled && progress.terminal {
            let _ = writeln!(std::io::stderr());
        }
        let end = EndRecord {
            ts_ns: rec.rel(monotonic_ns()),
            block_events: rec.totals.block_events,
            fault_events: rec.totals.fault_events,
            lost_events: rec.lost_seen.0 + rec.lost_seen.1,
            outside_image: rec.totals.outside_image,
        };
        let mut out = rec.writer.finish(end)?;
        out.flush().map_err(TraceFileError::from)?;
        Ok(rec.totals)
    }
}

/// Runs a session until `stop` is set or the duration passes, then flushes everything.
pub fn run(cfg: &SessionConfig, stop: &Arc<AtomicBool>) -> Result<SessionTotals, SessionError> {
    let mut session = Session::start(cfg)?;
    loop {
        let done =
            stop.load(Ordering::Relaxed) || cfg.duration.is_some_and(|d| session.elapsed() >= d);
        session.step(Duration::from_millis(10))?;
        if done {
            return session.finish();
        }
    }
}

/// The default trace path for `tern trace` when none is given.
pub fn default_out() -> &'static Path {
    Path::new("tern.trace")
}
