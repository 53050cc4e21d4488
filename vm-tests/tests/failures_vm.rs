//! Failures around a VM migration: the destination QEMU crashing during the
//! cutover or during the RAM precopy Tern started, and the source's `tern
//! migrate` killed part way through its copy.

use tern_vm_tests::scenario;

fn prerequisites() {
    if let Some(why) = tern_vm_tests::missing_prerequisite() {
        panic!("{why}");
    }
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn destination_qemu_killed_during_cutover_rolls_back_and_the_source_vm_keeps_every_write() {
    prerequisites();
    let out = scenario::destination_dies_during_cutover("destination dies");
    assert!(out.final_counter > 0, "{out:?}");
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn destination_qemu_killed_during_precopy_fails_the_migration_and_the_source_vm_runs_on() {
    prerequisites();
    let (out, log) = scenario::destination_dies_during_precopy("dies in precopy");
    assert!(
        log.contains("QEMU's migration"),
        "tern migrate says why it stopped: {log}"
    );
    assert!(out.final_counter > 0, "{out:?}");
}

#[test]
#[ignore = "boots QEMU VMs: run by `cargo xtask vm-test`"]
fn killed_tern_migrate_resumes_without_recopying_and_the_vm_moves() {
    prerequisites();
    let (out, report, first_sent) = scenario::tern_resumes_after_a_kill("resume after kill");
    let sent = report["sent_bytes"].as_u64().expect("sent_bytes");
    eprintln!(
        "first run sent {first_sent} bytes before SIGKILL; the resumed run sent {sent} bytes (random data on the disk: {} MiB)",
        scenario::RANDOM_MIB
    );
    // The resumed run sends only regions whose checksums differ: what the
    // first run already delivered is not sent again.
    assert!(
        sent < scenario::RANDOM_MIB << 20,
        "the resumed run resent a full copy: {report}"
    );
    assert!(out.final_counter > 0, "{out:?}");
}
