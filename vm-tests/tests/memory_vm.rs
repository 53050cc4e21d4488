//! Guest memory seen from the host: Tern's tracer records the QEMU process's
//! page faults in the guest-RAM mapping, with RAM anonymous (QEMU's default)
//! and with RAM in a shared file on ext4 that the host writes back every
//! second. After a writeback the kernel write-protects the file's pages, so
//! each page the guest dirties again faults again: the file-backed run shows
//! guest-RAM dirtying at page granularity; the anonymous run only shows
//! pages touched for the first time. Figures go to `target/vm/guest-ram-faults.md`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_vm_tests::lab::tern_bin;
use tern_vm_tests::process::sh;
use tern_vm_tests::scenario::Guest;
use tern_vm_tests::vm::{Disk, Vm};

const TRACE_SECS: u64 = 10;

/// What one traced run saw in the guest-RAM mapping.
struct Faults {
    total: u64,
    writes: u64,
    pages: usize,
    ticks: usize,
}

/// The guest-RAM mapping of QEMU `pid`: the line naming `file`, else the
/// smallest anonymous mapping of at least `mem` bytes.
fn ram_range(pid: u32, file: Option<&Path>, mem: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read QEMU's maps");
    let ranges = maps.lines().filter_map(|l| {
        let mut w = l.split_whitespace();
        let (lo, hi) = w.next()?.split_once('-')?;
        let path = w.nth(4).unwrap_or("");
        let range = (
            u64::from_str_radix(lo, 16).ok()?,
            u64::from_str_radix(hi, 16).ok()?,
        );
        Some((range, path.to_owned()))
    });
    let found = match file {
        Some(f) => ranges
            .filter(|(_, p)| Path::new(p) == f)
            .map(|(r, _)| r)
            .max_by_key(|(lo, hi)| hi - lo),
        // Anonymous: the smallest anonymous mapping that holds the guest's
        // RAM (the larger ones are TCG's code buffer).
        None => ranges
            .filter(|((lo, hi), p)| p.is_empty() && hi - lo >= mem)
            .map(|(r, _)| r)
            .min_by_key(|(lo, hi)| hi - lo),
    };
    found.unwrap_or_else(|| {
        panic!(
            "no guest-RAM mapping ({file:?}) in QEMU's maps (pid {pid}: {}):\n{maps}",
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .nth(2)
                .unwrap_or("")
        )
    })
}

fn traced_run(guest: &Guest, name: &str, file_backed: bool) -> Faults {
    let mut spec = guest.spec(name);
    spec.disk = Some(Disk::File(guest.disk.clone()));
    let ram = guest.path().join(format!("{name}.ram"));
    if file_backed {
        spec.ram_file = Some(ram.clone());
    }
    let mut vm = Vm::start(&spec);
    vm.wait_ticks(20, Duration::from_mins(2));
    let (lo, hi) = ram_range(
        vm.pid(),
        file_backed.then_some(ram.as_path()),
        u64::from(spec.mem_mib) << 20,
    );
    eprintln!("{name}: pid {} RAM {lo:#x}-{hi:#x}", vm.pid());
    let stop = AtomicBool::new(false);
    let trace = guest.path().join(format!("{name}.trace"));
    let ticks_before = tern_vm_tests::vm::ticks(&vm.serial()).len();
    std::thread::scope(|s| {
        if file_backed {
            // Periodic writeback, as a host that tracks dirtying would do it.
            s.spawn(|| {
                let f = std::fs::File::open(&ram).expect("open the RAM file");
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    f.sync_data().expect("write back the RAM file");
                }
            });
        }
        sh(
            Command::new(tern_bin())
                .args(["trace", "-q", "--file"])
                .arg(&guest.disk)
                .args(["--pid", &vm.pid().to_string()])
                .args(["--fault-range", &format!("{lo:#x}-{hi:#x}")])
                .args(["--duration", &format!("{TRACE_SECS}s"), "--out"])
                .arg(&trace),
            Duration::from_mins(1),
        );
        stop.store(true, Ordering::Relaxed);
    });
    let ticks = tern_vm_tests::vm::ticks(&vm.serial()).len() - ticks_before;
    vm.kill();
    let csv = sh(
        Command::new(tern_bin())
            .args(["trace", "export", "--format", "csv"])
            .arg(&trace),
        Duration::from_secs(30),
    );
    let mut f = Faults {
        total: 0,
        writes: 0,
        pages: 0,
        ticks,
    };
    let mut pages = HashSet::new();
    for row in csv.lines().filter(|l| l.starts_with("fault,")) {
        let c: Vec<&str> = row.split(',').collect();
        let addr: u64 = c[5].parse().expect("fault address");
        if (lo..hi).contains(&addr) {
            f.total += 1;
            if c[4] == "write" {
                f.writes += 1;
                pages.insert((addr - lo) / 4096);
            }
        }
    }
    f.pages = pages.len();
    tern_vm_tests::write_result(&format!("guest-ram-{name}.trace.csv"), &csv);
    if f.total > 0 {
        // The guest's memory heatmap: fault address x time, reads and writes.
        let png = tern_vm_tests::result_path(&format!("guest-ram-{name}.png"));
        sh(
            Command::new(tern_bin())
                .args(["analyze", "heatmap", "--faults", "--out"])
                .arg(&png)
                .arg(&trace),
            Duration::from_mins(1),
        );
        let size = std::fs::metadata(&png).map_or(0, |m| m.len());
        assert!(size > 0, "the heatmap {} is empty", png.display());
    }
    f
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn guest_ram_dirtying_is_seen_as_page_faults_only_when_ram_is_a_written_back_file() {
    if let Some(why) = tern_vm_tests::missing_prerequisite() {
        panic!("{why}");
    }
    let guest = Guest::new("guest ram");
    let anon = traced_run(&guest, "anonymous", false);
    let file = traced_run(&guest, "file-ext4", true);
    let mut t = format!(
        "| guest RAM | faults in RAM ({TRACE_SECS} s) | write faults | distinct pages written | workload ticks |\n|---|---:|---:|---:|---:|\n"
    );
    for (name, f) in [
        ("anonymous (QEMU default)", &anon),
        ("file on ext4, share=on, fdatasync every 1 s", &file),
    ] {
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} | {} |",
            f.total, f.writes, f.pages, f.ticks
        );
    }
    eprintln!("\n{t}");
    tern_vm_tests::write_result("guest-ram-faults.md", &t);
    assert!(file.ticks > 0 && anon.ticks > 0, "the workload ran");
    assert!(
        file.writes > anon.writes,
        "a written-back RAM file must re-fault the pages the guest dirties:\n{t}"
    );
}
