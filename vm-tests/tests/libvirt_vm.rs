//! A libvirt domain with two disks (raw and qcow2) migrated while it writes,
//! between two private libvirt daemons on this host: by libvirt's own storage
//! migration (the peer), and by `tern migrate --vm libvirt:`, side by side in
//! one table. Run by `cargo xtask vm-test` (root, QEMU, libvirt).

use tern_vm_tests::{libvirt, libvirt_scenario, scenario};

#[test]
#[ignore = "boots libvirt domains: run by `cargo xtask vm-test`"]
fn tern_and_libvirt_each_move_a_writing_two_disk_domain_and_the_guest_continues() {
    if let Some(why) = libvirt::missing_prerequisite() {
        panic!("{why}");
    }
    let peer = libvirt_scenario::libvirt_copies_storage(
        "libvirt virsh migrate --live --copy-storage-all (2 disks)",
    );
    assert!(peer.final_counter > 0, "{peer:?}");
    assert!(
        peer.paused_ms > 0.0 && peer.disk_bytes > 0 && peer.ram_bytes > 0,
        "{peer:?}"
    );
    // The same domain moved by Tern: disks replicated to two agents, RAM and
    // device state by libvirt (`--suspend`) onto the agents' NBD exports.
    let tern = libvirt_scenario::tern_migrates_with_libvirt(
        "tern migrate --vm libvirt: (2 disks) + libvirt RAM",
    );
    assert!(tern.final_counter > 0, "{tern:?}");
    assert!(
        tern.paused_ms > 0.0 && tern.disk_bytes > 0 && tern.ram_bytes > 0,
        "{tern:?}"
    );
    // A failed health check after the switch: every disk rolled back, the
    // domain migrated back, the guest goes on at the source with every
    // write. (In this test, not beside it: the labs' daemons share ports.)
    let back = libvirt_scenario::tern_rolls_back_under_libvirt(
        "tern migrate --vm libvirt: --health-cmd false (rolled back)",
    );
    assert!(back.final_counter > 0, "{back:?}");
    let table = scenario::table(&[peer, tern]);
    eprintln!("\n{table}");
    tern_vm_tests::write_result("libvirt.md", &table);
}
