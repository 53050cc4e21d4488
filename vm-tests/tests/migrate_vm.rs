//! A running VM migrated while it writes: by Tern (disk) with QEMU (RAM), and
//! by QEMU alone, side by side. Run by `cargo xtask vm-test` (root, QEMU).

use tern_vm_tests::scenario;

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn tern_and_qemu_move_a_writing_vm_and_the_guest_continues() {
    if let Some(why) = tern_vm_tests::missing_prerequisite() {
        panic!("{why}");
    }
    let tern = scenario::tern_moves_the_disk(
        "Tern (disk) + QEMU precopy (RAM), pause-before-switchover",
        &[],
    );
    let serial = scenario::tern_moves_the_disk_serialized(
        "Tern (disk), then QEMU migrate (RAM) in Tern's pause (serialized)",
        &[],
    );
    let qemu = scenario::qemu_mirror("QEMU blockdev-mirror + migrate");
    // Post-copy: Tern switches the disk at QEMU's stop with no data copy
    // inside the pause; the guest reads what is still on the source through
    // demand fetches while the rest is pushed.
    let post = scenario::tern_moves_the_disk(
        "Tern post-copy disk + QEMU precopy (RAM)",
        &["--mode", "postcopy"],
    );
    // Everything in post-copy: the disk by Tern, the RAM by QEMU's
    // postcopy-ram; the VM runs on the destination after one pass over RAM.
    let both =
        scenario::tern_and_qemu_in_post_copy("Tern post-copy disk + QEMU postcopy-ram (RAM)");
    for o in [&tern, &serial, &qemu, &post, &both] {
        assert!(o.final_counter > 0, "{o:?}");
        assert!(
            o.paused_ms > 0.0 && o.disk_bytes > 0 && o.ram_bytes > 0,
            "{o:?}"
        );
    }
    let mut table = scenario::table(&[tern, post, both, serial, qemu]);
    // The point of the product: the guest's disk traced beforehand,
    // `tern predict`, and the migration ordered by its plan.
    let pre = scenario::tern_moves_the_disk_with_prefetch("Tern with pre-migration prefetch");
    // Tern ships the disk before the migration is asked for: a source agent
    // replicates it as a warm standby, and the migration sends only what the
    // guest wrote since.
    let standby = scenario::tern_moves_the_disk_from_a_standby(
        "Tern warm standby beforehand (source agent), then cutover",
    );
    assert!(standby.final_counter > 0, "{standby:?}");
    assert!(
        standby.disk_bytes_ahead > 0 && standby.disk_bytes < standby.disk_bytes_ahead,
        "the standby must have sent the bulk of the disk before the migration: {standby:?}"
    );
    // Tern moves the RAM too (a shared RAM file replicated at 4 KiB pages);
    // QEMU sends only the device state (`x-ignore-shared`).
    let ram = scenario::tern_moves_disk_and_ram(
        "Tern (disk + RAM pages), QEMU device state only (x-ignore-shared)",
    );
    assert!(ram.final_counter > 0 && ram.ram_by_tern > 0, "{ram:?}");
    assert!(
        ram.ram_bytes < 16 << 20,
        "QEMU must not send the shared RAM: {ram:?}"
    );
    let rows = scenario::table(&[pre, standby, ram]);
    for row in rows.lines().skip(2) {
        table.push_str(row);
        table.push('\n');
    }
    eprintln!("\n{table}");
    tern_vm_tests::write_result("side-by-side.md", &table);
}
