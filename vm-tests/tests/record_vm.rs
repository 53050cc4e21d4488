//! A trace of a VM's virtual disk for the predictor's tables (`cargo xtask
//! traces --only vm-guest` runs this): the VM tests' guest (Debian bookworm's
//! kernel under TCG, ext4 on a virtio disk with 16 MiB of random data) runs
//! its write workload with reads beside it (`tern.reads=1`: 1 MiB at a
//! random place every second, the whole 16 MiB every 20 s), traced from the
//! host with `tern trace --file` (image offsets) for `TERN_VM_TRACE_SECS`
//! (default 120) into `TERN_VM_TRACE_OUT` (default `target/vm/vm-guest.trace`).
//! The guest then verifies every file it wrote; the trace must hold the
//! ticks' writes and the reads.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tern_vm_tests::lab::tern_bin;
use tern_vm_tests::process::sh;
use tern_vm_tests::scenario::Guest;
use tern_vm_tests::vm::{Disk, Vm, VmSpec};

#[test]
#[ignore = "boots a QEMU guest for minutes; run by `cargo xtask traces --only vm-guest`"]
fn records_a_guest_disk_trace() {
    if let Some(why) = tern_vm_tests::missing_prerequisite() {
        panic!("{why}");
    }
    let secs: u64 = std::env::var("TERN_VM_TRACE_SECS").ok().map_or(120, |s| {
        s.parse().expect("TERN_VM_TRACE_SECS is whole seconds")
    });
    let out = std::env::var_os("TERN_VM_TRACE_OUT").map_or_else(
        || tern_vm_tests::result_path("vm-guest.trace"),
        PathBuf::from,
    );
    let guest = Guest::with_data("record", 16);
    let mut spec = VmSpec::new(
        "rec",
        guest.path(),
        &guest.kernel,
        &guest.initrd,
        "tern.scenario=workload tern.reads=1",
    );
    spec.disk = Some(Disk::File(guest.disk.clone()));
    let mut vm = Vm::start(&spec);
    vm.wait_ticks(3, Duration::from_mins(2));
    let ticks_before = tern_vm_tests::vm::ticks(&vm.serial()).len();
    sh(
        Command::new(tern_bin())
            .args(["trace", "-q", "--file"])
            .arg(&guest.disk)
            .args(["--duration", &format!("{secs}s"), "--out"])
            .arg(&out),
        Duration::from_secs(secs + 60),
    );
    let ticks = tern_vm_tests::vm::ticks(&vm.serial()).len() - ticks_before;
    vm.send_line("stop");
    let text = vm.wait_serial("tern-vm: poweroff", Duration::from_mins(2));
    vm.wait_exit(Duration::from_mins(1));
    assert!(
        text.contains("tern-vm: VERIFY OK"),
        "the guest verified its files:\n{}",
        tern_vm_tests::vm::tail(&text)
    );
    let stat: serde_json::Value = serde_json::from_str(&sh(
        Command::new(tern_bin())
            .args(["trace", "stat", "--json"])
            .arg(&out),
        Duration::from_secs(30),
    ))
    .expect("tern trace stat prints JSON");
    let csv = sh(
        Command::new(tern_bin())
            .args(["trace", "export", "--format", "csv"])
            .arg(&out),
        Duration::from_secs(30),
    );
    // Requests and bytes of one op (columns: kind,ts_ns,end_ns,target,op,offset,len,...).
    let count = |op: &str| {
        csv.lines()
            .filter(|l| l.starts_with("block,") && l.split(',').nth(4) == Some(op))
            .fold((0u64, 0u64), |(n, bytes), l| {
                let len: u64 = l
                    .split(',')
                    .nth(6)
                    .and_then(|v| v.parse().ok())
                    .expect("a block record has a length");
                (n + 1, bytes + len)
            })
    };
    let ((reads, read_bytes), (writes, _)) = (count("read"), count("write"));
    eprintln!(
        "vm-guest: {ticks} ticks, {reads} reads ({} MiB), {writes} writes, {} lost, into {}",
        read_bytes >> 20,
        stat["lost_events"],
        out.display()
    );
    assert!(ticks >= 10, "the guest ticked {ticks} times in {secs} s");
    // Each tick syncs a rewritten file.
    assert!(
        usize::try_from(writes).is_ok_and(|w| w >= ticks),
        "{writes} writes for {ticks} ticks"
    );
    // The reader reads 1 MiB a second and the whole 16 MiB every 20 s:
    // at least half of the seconds' MiB must have reached the disk.
    assert!(
        read_bytes >= (secs << 20) / 2,
        "{read_bytes} bytes read in {secs} s"
    );
}
