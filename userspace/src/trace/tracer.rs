//! Loads the CO-RE eBPF object with aya, sets its filters, attaches the hooks
//! and reads events from the one ring buffer.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use tern_common::{self as abi, BlockEvent, FaultEvent, InFlight};

use super::device::IoPath;

/// Errors loading or running the eBPF tracer.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// The ring size is not usable.
    #[error(
        "ring buffer size {0} bytes is not valid: give a power of two from 4 KiB to 1 GiB, e.g. --ring-size 16M"
    )]
    RingSize(u64),
    /// The kernel's BTF cannot be read.
    #[error("cannot read the kernel's BTF: {0}")]
    Btf(#[source] Box<aya::BtfError>),
    /// The object failed to load.
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program is not in the object.
    #[error("eBPF program {program} failed to be found: not in the object")]
    NoProgram { program: &'static str },
    /// A program failed to load or attach. A verifier rejection's log is in
    /// the source's own message (`ProgramError::LoadError`), so in this one too.
    #[error("eBPF program {program} failed to {step}: {source}")]
    Program {
        program: &'static str,
        step: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A map is not in the object.
    #[error("eBPF map {map}: missing")]
    NoMap { map: &'static str },
    /// A map failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// Too many devices or pids for the filter maps.
    #[error("too many {what}: at most {max} can be traced at once")]
    TooMany { what: &'static str, max: usize },
    /// poll(2) on the ring buffer failed.
    #[error("waiting on the ring buffer failed: {0}")]
    Poll(std::io::Error),
    /// A program's run counters could not be read.
    #[error("cannot read the eBPF programs' skipped-run counters")]
    Counters(#[source] std::io::Error),
}

const MAX_DEVICES: usize = 64;
const MAX_PIDS: usize = 1024;

/// What to trace.
#[derive(Debug, Clone)]
pub struct TracerConfig {
    /// Whole-disk kernel `dev_t` and how its I/O is issued.
    pub devices: Vec<(u32, IoPath)>,
    /// Thread groups to trace; empty for all (block) — faults are traced only for these.
    pub pids: Vec<u32>,
    /// Trace page faults of `pids`.
    pub faults: bool,
    /// Fault addresses to keep, `[lo, hi)`.
    pub fault_range: Option<(u64, u64)>,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_bytes: u64,
}

/// A decoded ring-buffer event.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    Block(BlockEvent),
    Fault(FaultEvent),
}

/// Events the kernel side lost, counted since the tracer started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    /// Block events dropped because the ring was full (summed over CPUs).
    pub block_ring_full: u64,
    /// Runs of the block programs the kernel skipped (one already running on that CPU).
    pub block_skipped: u64,
    pub fault_ring_full: u64,
    pub fault_skipped: u64,
}

impl Lost {
    /// Block events lost, whatever the cause.
    pub fn block(&self) -> u64 {
        self.block_ring_full + self.block_skipped
    }

    /// Fault events lost, whatever the cause.
    pub fn fault(&self) -> u64 {
        self.fault_ring_full + self.fault_skipped
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let secs = u64::try_from(ts.tv_sec).expect("CLOCK_MONOTONIC is never negative");
    let nanos = u64::try_from(ts.tv_nsec).expect("tv_nsec is in 0..1e9");
    secs * 1_000_000_000 + nanos
}

/// The loaded, attached tracer. Dropping it detaches every hook.
pub struct Tracer {
    _bpf: Ebpf,
    ring: RingBuf<MapData>,
    /// Issued requests not yet seen complete, by request address; read as
    /// bytes (aya's `Pod` is not implemented for the ABI's structs).
    inflight: BpfHashMap<MapData, u64, [u8; IN_FLIGHT_BYTES]>,
    lost: PerCpuArray<MapData, u64>,
    /// The attached programs that emit block and fault events: each run the
    /// kernel skips (a hook firing inside itself on one CPU, as a completion
    /// in an interrupt on top of the same hook) is an event lost too.
    block_progs: Vec<OwnedFd>,
    fault_progs: Vec<OwnedFd>,
    /// Records of unknown kind or size: a bug if ever non-zero, counted not logged.
    pub malformed: u64,
}

const IN_FLIGHT_BYTES: usize = size_of::<InFlight>();

/// The in-flight map's capacity (`max_entries` in tern.bpf.c): a bound on
/// one walk over it, whose keys may change under it.
const IN_FLIGHT_MAX: usize = 65_536;

/// Runs of the program `fd` the kernel skipped because the program was
/// already running on that CPU (`bpf_prog_info.recursion_misses`, which
/// raw tracepoint programs count instead of nesting).
fn recursion_misses(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: both are plain C structs of integers, valid when zeroed.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel reads only the `info` member for this command.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    let info_len = u32::try_from(std::mem::size_of::<bpf_prog_info>())
        .expect("bpf_prog_info is a few hundred bytes");
    attr.info.bpf_fd =
        u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    attr.info.info_len = info_len;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: `attr` describes `info`, which outlives the call, with its true
    // size; `fd` is an open program descriptor for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// Loads and attaches `name`; returns a descriptor of it for its counters.
fn program(bpf: &mut Ebpf, name: &'static str, btf: &Btf) -> Result<OwnedFd, TracerError> {
    let prog: &mut BtfTracePoint = bpf
        .program_mut(name)
        .ok_or(TracerError::NoProgram { program: name })?
        .try_into()
        .map_err(|e: ProgramError| TracerError::Program {
            program: name,
            step: "load",
            source: Box::new(e),
        })?;
    prog.load(name, btf).map_err(|e| TracerError::Program {
        program: name,
        step: "load",
        source: Box::new(e),
    })?;
    prog.attach().map_err(|e| TracerError::Program {
        program: name,
        step: "attach",
        source: Box::new(e),
    })?;
    let fd = prog
        .fd()
        .map_err(|e| TracerError::Program {
            program: name,
            step: "give its descriptor",
            source: Box::new(e),
        })?
        .as_fd()
        .try_clone_to_owned()
        .map_err(TracerError::Counters)?;
    Ok(fd)
}

/// A failed operation on the kernel map `map`, keeping aya's error.
fn map_error(map: &'static str) -> impl Fn(MapError) -> TracerError {
    move |e| TracerError::Map {
        map,
        source: Box::new(e),
    }
}

impl Tracer {
    pub fn start(cfg: &TracerConfig) -> Result<Self, TracerError> {
        let ring = cfg.ring_bytes;
        if !ring.is_power_of_two() || !(4096..=1 << 30).contains(&ring) {
            return Err(TracerError::RingSize(ring));
        }
        if cfg.devices.len() > MAX_DEVICES {
            return Err(TracerError::TooMany {
                what: "devices",
                max: MAX_DEVICES,
            });
        }
        if cfg.pids.len() > MAX_PIDS {
            return Err(TracerError::TooMany {
                what: "pids",
                max: MAX_PIDS,
            });
        }
        let btf = Btf::from_sys_fs().map_err(|e| TracerError::Btf(Box::new(e)))?;
        let pids_on: u32 = u32::from(!cfg.pids.is_empty());
        let (lo, hi) = cfg.fault_range.unwrap_or((0, u64::MAX));
        // Wake the reader at a quarter full: fewer wake-ups, and still room while it drains.
        let wakeup: u64 = (ring / 4).min(256 * 1024);
        // Our own reads (the copy) are not the workload's I/O.
        let self_tgid: u32 = std::process::id();
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries(
                "events",
                u32::try_from(ring).expect("checked above: at most 1 GiB"),
            )
            .override_global("filter_pids_on", &pids_on, true)
            .override_global("self_tgid", &self_tgid, true)
            .override_global("fault_addr_lo", &lo, true)
            .override_global("fault_addr_hi", &hi, true)
            .override_global("wakeup_bytes", &wakeup, true)
            .load(abi::BPF_OBJECT)
            .map_err(|e| TracerError::Load(Box::new(e)))?;

        {
            let mut devices: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
                bpf.map_mut("devices")
                    .ok_or(TracerError::NoMap { map: "devices" })?,
            )
            .map_err(map_error("devices"))?;
            for (dev, path) in &cfg.devices {
                let mode = match path {
                    IoPath::Request => abi::TERN_DEV_REQUEST,
                    IoPath::Bio => abi::TERN_DEV_BIO,
                };
                devices.insert(dev, mode, 0).map_err(map_error("devices"))?;
            }
        }
        {
            let mut pids: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
                bpf.map_mut("pids")
                    .ok_or(TracerError::NoMap { map: "pids" })?,
            )
            .map_err(map_error("pids"))?;
            for pid in &cfg.pids {
                pids.insert(pid, 1, 0).map_err(map_error("pids"))?;
            }
        }

        let (mut block_progs, mut fault_progs) = (Vec::new(), Vec::new());
        if cfg.devices.iter().any(|(_, p)| *p == IoPath::Request) {
            // Complete first: a request issued between the two attaches then still counts.
            block_progs.push(program(&mut bpf, "block_rq_complete", &btf)?);
            // A skipped issue loses a latency and an issuer, and with a pid
            // filter the request itself (its completion then looks like a
            // stranger's): counted as lost too.
            block_progs.push(program(&mut bpf, "block_rq_issue", &btf)?);
        }
        if cfg.devices.iter().any(|(_, p)| *p == IoPath::Bio) {
            block_progs.push(program(&mut bpf, "block_bio_queue", &btf)?);
        }
        if cfg.faults && !cfg.pids.is_empty() {
            fault_progs.push(program(&mut bpf, "page_fault_user", &btf)?);
        }

        let ring = RingBuf::try_from(
            bpf.take_map("events")
                .ok_or(TracerError::NoMap { map: "events" })?,
        )
        .map_err(map_error("events"))?;
        let inflight = BpfHashMap::try_from(
            bpf.take_map("inflight")
                .ok_or(TracerError::NoMap { map: "inflight" })?,
        )
        .map_err(map_error("inflight"))?;
        let lost = PerCpuArray::try_from(
            bpf.take_map("lost")
                .ok_or(TracerError::NoMap { map: "lost" })?,
        )
        .map_err(map_error("lost"))?;
        Ok(Tracer {
            _bpf: bpf,
            ring,
            inflight,
            lost,
            block_progs,
            fault_progs,
            malformed: 0,
        })
    }

    /// Events lost so far, by kind and by cause.
    pub fn lost(&self) -> Result<Lost, TracerError> {
        let slot = |i: u32| -> Result<u64, TracerError> {
            let values = self.lost.get(&i, 0).map_err(map_error("lost"))?;
            Ok(values.iter().sum())
        };
        let skipped = |progs: &[OwnedFd]| -> Result<u64, TracerError> {
            progs.iter().try_fold(0u64, |sum, fd| {
                let n = recursion_misses(fd.as_fd()).map_err(TracerError::Counters)?;
                Ok(sum.saturating_add(n))
            })
        };
        Ok(Lost {
            block_ring_full: slot(abi::TERN_LOST_BLOCK)?,
            block_skipped: skipped(&self.block_progs)?,
            fault_ring_full: slot(abi::TERN_LOST_FAULT)?,
            fault_skipped: skipped(&self.fault_progs)?,
        })
    }

    /// The modifying requests of disk `dev` issued before `issued_before_ns`
    /// (monotonic) that are still in the in-flight map, taken out of it and
    /// handed to `f` as events marked [`abi::TERN_BF_UNSEEN`] (latency: up to
    /// `now_ns`). Call it only when the kernel says the disk has no write in
    /// flight since before `issued_before_ns`: each such record is then a
    /// completion the kernel ran without the tracer, not a request still
    /// being served. Returns how many were handed over.
    pub fn take_unseen(
        &mut self,
        dev: u32,
        issued_before_ns: u64,
        now_ns: u64,
        mut f: impl FnMut(Event),
    ) -> Result<usize, TracerError> {
        // Keys first, bounded: the programs add and remove entries meanwhile,
        // and a walk whose key vanished starts over from the first.
        let keys: Vec<u64> = self
            .inflight
            .keys()
            .take(IN_FLIGHT_MAX)
            .filter_map(Result::ok)
            .collect();
        let mut n = 0;
        for key in keys {
            let Ok(raw) = self.inflight.get(&key, 0) else {
                continue;
            };
            let rec: InFlight = bytemuck::pod_read_unaligned(&raw);
            let modifies = !matches!(rec.op, abi::TERN_OP_READ | abi::TERN_OP_FLUSH);
            if rec.dev != dev || rec.skip != 0 || !modifies || rec.ts_ns >= issued_before_ns {
                continue;
            }
            match self.inflight.remove(&key) {
                Ok(()) => {}
                // Completed (or reused, and reported by the issue) meanwhile.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    continue;
                }
                Err(e) => return Err(map_error("inflight")(e)),
            }
            f(Event::Block(BlockEvent {
                ts_ns: rec.ts_ns,
                sector: rec.sector,
                latency_ns: now_ns.saturating_sub(rec.ts_ns),
                kind: abi::TERN_KIND_BLOCK,
                dev: rec.dev,
                bytes: rec.bytes,
                pid: rec.pid,
                op: rec.op,
                flags: rec.flags | abi::TERN_BF_UNSEEN,
                comm: rec.comm,
            }));
            n += 1;
        }
        Ok(n)
    }

    /// Drains every event waiting in the ring; returns how many were handed to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(Event)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            let raw: &[u8] = &item;
            match abi::event_kind(raw) {
                Some(abi::TERN_KIND_BLOCK | abi::TERN_KIND_BIO)
                    if raw.len() >= size_of::<BlockEvent>() =>
                {
                    f(Event::Block(bytemuck::pod_read_unaligned(
                        &raw[..size_of::<BlockEvent>()],
                    )));
                }
                Some(abi::TERN_KIND_FAULT) if raw.len() >= size_of::<FaultEvent>() => {
                    f(Event::Fault(bytemuck::pod_read_unaligned(
                        &raw[..size_of::<FaultEvent>()],
                    )));
                }
                _ => self.malformed += 1,
            }
            n += 1;
        }
        n
    }

    /// Waits up to `timeout` for the kernel to signal data, then drains.
    /// A readable `wake` descriptor (an eventfd) ends the wait early; it is
    /// not read here: its owner resets it.
    pub fn poll(
        &mut self,
        timeout: Duration,
        wake: Option<BorrowedFd<'_>>,
        f: impl FnMut(Event),
    ) -> Result<usize, TracerError> {
        let n = self.drain(f);
        if n > 0 {
            return Ok(n);
        }
        let mut pfds = [
            libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.map_or(-1, |w| w.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let count: libc::nfds_t = if wake.is_some() { 2 } else { 1 };
        // SAFETY: `pfds` holds valid pollfds (the ring buffer's open fd and,
        // when counted, the borrowed wake fd) and lives across the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(TracerError::Poll(err));
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    /// A loop device over a sparse file in /var/tmp, detached when dropped.
    struct Loop {
        dev: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Loop {
        fn new() -> Loop {
            let dir = tempfile::Builder::new()
                .prefix("tern-tracer-test")
                .tempdir_in("/var/tmp")
                .expect("temp dir");
            let img = dir.path().join("disk.img");
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(16 << 20))
                .expect("image");
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&img)
                .output()
                .expect("losetup runs (util-linux)");
            assert!(out.status.success(), "losetup: {out:?}");
            let dev = String::from_utf8(out.stdout).expect("a path");
            Loop {
                dev: dev.trim().into(),
                _dir: dir,
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status();
        }
    }

    /// A fresh loop device, its kernel `dev_t`, and a tracer on it alone.
    fn traced_loop() -> (Loop, u32, super::Tracer) {
        let lo = Loop::new();
        let dev = crate::trace::device::BlockDevice::open(&lo.dev)
            .expect("loop device")
            .kernel_disk_dev();
        let tracer = tracer_on(dev);
        (lo, dev, tracer)
    }

    fn tracer_on(dev: u32) -> super::Tracer {
        super::Tracer::start(&super::TracerConfig {
            devices: vec![(dev, super::IoPath::Request)],
            pids: vec![],
            faults: false,
            fault_range: None,
            ring_bytes: 1 << 20,
        })
        .expect("the tracer starts (as root)")
    }

    fn record(dev: u32, sector: u64, op: u32, ts_ns: u64) -> [u8; super::IN_FLIGHT_BYTES] {
        record_of(dev, sector, op, ts_ns, 0)
    }

    fn record_of(
        dev: u32,
        sector: u64,
        op: u32,
        ts_ns: u64,
        skip: u32,
    ) -> [u8; super::IN_FLIGHT_BYTES] {
        let rec = super::InFlight {
            ts_ns,
            sector,
            seen: sector,
            bytes: 4096,
            dev,
            pid: 1,
            op,
            flags: 0,
            skip,
            comm: [0; 16],
        };
        bytemuck::bytes_of(&rec)
            .try_into()
            .expect("the record is IN_FLIGHT_BYTES long")
    }

    /// One direct 4 KiB write at `at`.
    fn write_direct(dev: &std::path::Path, at: u64) {
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)
            .expect("open O_DIRECT");
        let buf = vec![0x5au8; 8192];
        let skip = (4096 - buf.as_ptr() as usize % 4096) % 4096;
        f.write_at(&buf[skip..skip + 4096], at)
            .expect("direct write");
    }

    fn unseen(tracer: &mut super::Tracer) -> Vec<tern_common::BlockEvent> {
        let mut got = Vec::new();
        tracer.drain(|ev| {
            if let super::Event::Block(b) = ev
                && b.flags & tern_common::TERN_BF_UNSEEN != 0
            {
                got.push(b);
            }
        });
        got
    }

    #[test]
    fn in_flight_records_of_a_quiet_disk_are_taken_as_unseen_completions_and_nothing_else() {
        let (_lo, dev, mut tracer) = traced_loop();
        let now = super::monotonic_ns();
        // Keys no request has (kernel addresses are far above): what a
        // completion the hook never ran for leaves behind.
        let lost = record(dev, 2048, tern_common::TERN_OP_WRITE, now - 1_000_000);
        let read = record(dev, 4096, tern_common::TERN_OP_READ, now - 1_000_000);
        let own = record_of(dev, 6144, tern_common::TERN_OP_WRITE, now - 1_000_000, 1);
        let elsewhere = record(dev + 1, 8192, tern_common::TERN_OP_WRITE, now - 1_000_000);
        let later = record(
            dev,
            10240,
            tern_common::TERN_OP_DISCARD,
            now + 1_000_000_000,
        );
        for (key, rec) in [
            (1u64, lost),
            (2, read),
            (3, own),
            (4, elsewhere),
            (5, later),
        ] {
            tracer.inflight.insert(key, rec, 0).expect("insert");
        }
        let mut got = Vec::new();
        let n = tracer
            .take_unseen(dev, now, now + 5, |ev| got.push(ev))
            .expect("walk");
        assert_eq!(n, 1);
        let [super::Event::Block(b)] = got[..] else {
            panic!("one block event: {got:?}");
        };
        assert_eq!(
            (b.sector, b.bytes, b.op, b.dev),
            (2048, 4096, tern_common::TERN_OP_WRITE, dev)
        );
        assert_eq!(b.flags, tern_common::TERN_BF_UNSEEN);
        assert_eq!(b.latency_ns, 1_000_005);
        let mut left: Vec<u64> = tracer.inflight.keys().map(|k| k.expect("key")).collect();
        left.sort_unstable();
        assert_eq!(left, [2, 3, 4, 5], "only the lost write is taken");
    }

    #[test]
    fn a_request_reused_while_its_record_is_in_flight_reports_the_old_one_unseen() {
        let (lo, dev, mut tracer) = traced_loop();
        // A real request's address: catch one in flight while another thread writes.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = std::sync::Arc::clone(&stop);
            let dev = lo.dev.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                    write_direct(&dev, (n % 1024) * 4096);
                    n += 1;
                }
            })
        };
        let mut key = None;
        for _ in 0..2_000_000 {
            if let Some(k) = tracer.inflight.keys().find_map(Result::ok) {
                key = Some(k);
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
        let key = key.expect("a write in flight was seen");
        tracer.drain(|_| {});
        // As if that request's completion had never reached the hook.
        let old = super::monotonic_ns() - 1_000;
        tracer
            .inflight
            .insert(
                key,
                record(dev, 4000 * 8, tern_common::TERN_OP_WRITE, old),
                0,
            )
            .expect("insert");
        // Requests are reused (a CPU takes again the tag it freed last):
        // write until it is, from four threads at once so that many tags
        // cycle (one writer alone can keep taking one tag, another than the
        // key's, when other tests load the CPUs). Never at the fake record's
        // sector (block 4000): the same request issued again is a requeue,
        // not a lost completion. Completions the kernel really lost (the
        // writes above, under other tests' load) come back unseen too: they
        // are writes of this test.
        let found = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let found = std::sync::Arc::clone(&found);
                let dev = lo.dev.clone();
                std::thread::spawn(move || {
                    for i in 0..25_000u64 {
                        if found.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        write_direct(&dev, ((i * 4 + w) % 1024) * 4096);
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while !writers.iter().all(std::thread::JoinHandle::is_finished) {
            got.extend(unseen(&mut tracer));
            if got.iter().any(|b| b.sector == 4000 * 8) {
                found.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for w in writers {
            w.join().expect("writer");
        }
        got.extend(unseen(&mut tracer));
        let ours: Vec<_> = got.iter().filter(|b| b.sector == 4000 * 8).collect();
        let [b] = ours[..] else {
            panic!("the old request reported once at its reuse: {got:?}");
        };
        assert!(
            got.iter()
                .all(|b| b.sector == 4000 * 8 || b.sector < 1024 * 8),
            "nothing but the test's own writes: {got:?}"
        );
        assert_eq!(
            (b.sector, b.bytes, b.op, b.dev),
            (4000 * 8, 4096, tern_common::TERN_OP_WRITE, dev)
        );
        assert_eq!(b.ts_ns, old);
        assert!(b.latency_ns > 0);
    }

    #[test]
    fn the_skipped_run_counter_is_asked_of_the_kernel_and_refused_for_a_non_program() {
        // A descriptor that is not a BPF program: the kernel answers EINVAL
        // (or EBADF), which shows the request reached it as built.
        let file = std::fs::File::open("/proc/self/stat").expect("procfs is mounted");
        let err = super::recursion_misses(file.as_fd()).expect_err("not a program");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EBADF)),
            "{err}"
        );
    }

    #[test]
    fn a_verifier_rejection_keeps_its_cause_and_shows_the_log() {
        let rejected = aya::programs::ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new("R1 invalid mem access 'scalar'".into()),
        };
        let err = super::TracerError::Program {
            program: "block_rq_issue",
            step: "load",
            source: Box::new(rejected),
        };
        // One line of the error alone (a log line) has the verifier's word.
        let text = err.to_string();
        assert!(
            text.starts_with("eBPF program block_rq_issue failed to load: ")
                && text.contains("R1 invalid mem access 'scalar'"),
            "{text}"
        );
        // The cause is the typed error, and its own cause the syscall's.
        let cause = std::error::Error::source(&err).expect("a cause");
        assert!(cause.to_string().contains("Verifier output: R1"), "{cause}");
        let errno = cause.source().expect("the syscall's error");
        assert!(
            errno
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(libc::EACCES)),
            "{errno}"
        );
    }
}
