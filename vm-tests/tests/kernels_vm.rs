//! The kernel matrix: the same `tern` binary, with its one compiled eBPF
//! object (CO-RE), traces a guest's virtio disk under Debian's bookworm kernel
//! and under the bookworm-backports kernel (the host's own kernel is covered
//! by `userspace/tests/tracer_kernel.rs`). Known 4 KiB `O_DIRECT` writes must come
//! out at their offsets.

use std::process::Command;
use std::time::Duration;

use tern_vm_tests::guest::{self, Kernel, Suite};
use tern_vm_tests::lab::tern_bin;
use tern_vm_tests::vm::{Disk, Vm, VmSpec};

const BLOCKS: [u64; 3] = [777, 4242, 12345];

fn traces_known_writes_under(suite: Suite) -> String {
    if let Some(why) = tern_vm_tests::missing_prerequisite() {
        panic!("{why}");
    }
    let dir = tern_vm_tests::scratch(&format!("trace-{suite:?}"));
    let kernel = Kernel::get(suite);
    let initrd = dir.path().join("initrd.gz");
    let extra = guest::program_with_libs(&tern_bin(), dir.path());
    guest::initramfs(&kernel, &extra, &initrd);
    let disk = dir.path().join("disk.img");
    tern_vm_tests::process::sh(
        Command::new("truncate").args(["-s", "64M"]).arg(&disk),
        Duration::from_secs(10),
    );
    let blocks: Vec<String> = BLOCKS.iter().map(u64::to_string).collect();
    let mut spec = VmSpec::new(
        "guest",
        dir.path(),
        &kernel,
        &initrd,
        &format!("tern.scenario=trace tern.blocks={}", blocks.join(",")),
    );
    spec.mem_mib = 768;
    spec.disk = Some(Disk::File(disk));
    let mut vm = Vm::start(&spec);
    let text = vm.wait_serial("tern-vm: trace done", Duration::from_mins(4));
    vm.wait_exit(Duration::from_mins(1));
    assert!(
        text.contains(&format!("tern-vm: kernel {}", kernel.release)),
        "the guest runs {}:\n{text}",
        kernel.release
    );
    // CSV: kind,ts_ns,end_ns,target,op,offset,len,...,comm,lost
    let writes: Vec<(String, u64, u64)> = text
        .lines()
        .filter_map(|l| l.split("tern-vm: csv ").nth(1))
        .map(|row| {
            let f: Vec<&str> = row.trim().split(',').collect();
            (
                f[4].to_owned(),
                f[5].parse().expect("offset"),
                f[6].parse().expect("len"),
            )
        })
        .collect();
    // The process is not checked: in the guest the request is often issued
    // from a kworker (blk-mq dispatch), not from dd's own context.
    for b in BLOCKS {
        assert!(
            writes
                .iter()
                .any(|(op, off, len)| op == "write" && *off == b * 4096 && *len == 4096),
            "no 4 KiB write at block {b} in the trace under {}: {writes:?}",
            kernel.release
        );
    }
    kernel.release
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn tracer_records_known_writes_under_the_bookworm_kernel() {
    let release = traces_known_writes_under(Suite::Bookworm);
    assert!(release.starts_with("6.1."), "{release}");
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn tracer_records_known_writes_under_the_backports_kernel() {
    let release = traces_known_writes_under(Suite::Backports);
    assert!(!release.starts_with("6.1."), "{release}");
}
