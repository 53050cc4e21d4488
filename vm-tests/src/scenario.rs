//! The migration scenarios, shared by the tests and the side-by-side table:
//! one guest running the write workload, moved to a destination QEMU either by
//! Tern (disk) + QEMU (RAM and devices), or by QEMU alone (`blockdev-mirror`
//! to an NBD export, then `migrate`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::guest::{self, Kernel, Suite};
use crate::lab::{Destination, Hook, free_port};
use crate::process::Guard;
use crate::vm::{self, Disk, Vm, VmSpec};

/// The guest's disk size.
pub const DISK_MIB: u64 = 64;
/// How many workload ticks run on the source before the migration starts,
/// and on the destination before the workload is stopped.
const TICKS_BEFORE: usize = 20;
const TICKS_AFTER: usize = 15;
const MIGRATION_LIMIT: Duration = Duration::from_mins(4);
const GUEST_LIMIT: Duration = Duration::from_mins(2);

/// What one migration measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub name: String,
    /// `query-migrate`'s `downtime` (QEMU's own figure, its final stop-and-copy).
    pub qmp_downtime_ms: f64,
    /// From the source's STOP event to the destination's RESUME event (host clock).
    pub paused_ms: f64,
    /// The guest's view: uptime between the last tick on the source and the
    /// first on the destination, and the median tick interval for scale.
    pub guest_gap_ms: f64,
    pub guest_tick_ms: f64,
    /// Tern: pause to switch (its report's `downtime_ms`: final delta,
    /// checksum roots, fencing). QEMU: `block-job-cancel` to the job's end.
    pub disk_final_ms: f64,
    /// Disk bytes on the wire once the migration was asked for (Tern's
    /// `wire_bytes` less what a standby had sent before; the mirror job's
    /// copied bytes).
    pub disk_bytes: u64,
    /// Disk bytes a Tern standby had sent before the migration was asked for.
    pub disk_bytes_ahead: u64,
    /// RAM and device state (`query-migrate` `ram.transferred`).
    pub ram_bytes: u64,
    /// Guest RAM Tern replicated (its RAM migration's `wire_bytes`), when
    /// QEMU sends only what is not in the shared RAM file.
    pub ram_by_tern: u64,
    /// From the start of the disk copy to the destination running.
    pub total_s: f64,
    /// The last counter the guest reported, and that it verified every file.
    pub final_counter: u64,
}

/// The guest, built once per test: kernel, initramfs, a seeded disk.
pub struct Guest {
    pub dir: tempfile::TempDir,
    pub kernel: Kernel,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// A failed test keeps its guest's directory (serial logs, QEMU and Tern
/// logs, images) and says where: the harness's flakes are read there.
impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {} for the failure's logs", self.dir.path().display());
        }
    }
}

impl Guest {
    pub fn new(name: &str) -> Guest {
        Guest::with_data(name, 0)
    }

    /// A guest whose disk also holds `random_mib` MiB of random data (so a
    /// copy has something to send besides zeros).
    pub fn with_data(name: &str, random_mib: u64) -> Guest {
        let dir = crate::scratch(name);
        let kernel = Kernel::get(Suite::Bookworm);
        let initrd = dir.path().join("initrd.gz");
        guest::initramfs(&kernel, &[], &initrd);
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(seed.join("w")).expect("mkdir seed");
        std::fs::write(seed.join("README"), "Tern VM test disk\n").expect("write the seed");
        if random_mib > 0 {
            crate::process::sh(
                Command::new("dd")
                    .arg("if=/dev/urandom")
                    .arg(format!("of={}", seed.join("random").display()))
                    .args(["bs=1M", &format!("count={random_mib}"), "status=none"]),
                Duration::from_mins(1),
            );
        }
        let disk = dir.path().join("src.img");
        guest::ext4_image(&disk, DISK_MIB, Some(&seed));
        Guest {
            dir,
            kernel,
            initrd,
            disk,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn spec(&self, name: &str) -> VmSpec {
        VmSpec::new(
            name,
            self.path(),
            &self.kernel,
            &self.initrd,
            "tern.scenario=workload",
        )
    }

    /// Boots the source VM on the disk and waits for the workload to tick.
    pub fn boot_source(&self) -> Vm {
        self.boot_source_with_ram(None)
    }

    /// [`Guest::boot_source`], with guest RAM in `ram` (a shared file) if given.
    pub fn boot_source_with_ram(&self, ram: Option<&Path>) -> Vm {
        let mut spec = self.spec("src");
        spec.disk = Some(Disk::File(self.disk.clone()));
        spec.tern_monitor = true;
        spec.ram_file = ram.map(Path::to_path_buf);
        spec.mem_mib = RAM_MIB;
        let mut src = Vm::start(&spec);
        src.wait_serial(&format!("tern-vm: tick {TICKS_BEFORE} "), GUEST_LIMIT);
        src
    }
}

/// A destination QEMU waiting for the migration stream on a unix socket,
/// paused after it (`-S`) until the harness says `cont`.
fn incoming(guest: &Guest, disk: Disk) -> (Vm, String) {
    incoming_with_ram(guest, disk, None)
}

/// [`incoming`], with guest RAM in `ram` (a shared file) if given.
fn incoming_with_ram(guest: &Guest, disk: Disk, ram: Option<&Path>) -> (Vm, String) {
    let uri = format!("unix:{}", guest.path().join("migrate.sock").display());
    let mut spec = guest.spec("dst");
    spec.disk = Some(disk);
    spec.ram_file = ram.map(Path::to_path_buf);
    spec.mem_mib = RAM_MIB;
    spec.incoming = Some(uri.clone());
    spec.start_paused = true;
    (Vm::start(&spec), uri)
}

/// Lets the guest run on the destination, stops its workload, and checks it
/// verified every checksum and its counter's continuity; fills the guest's
/// figures into `out`.
fn finish_on_destination(src: &Vm, dst: &mut Vm, out: &mut Outcome) {
    let before = vm::ticks(&src.serial());
    let last_src = *before.last().expect("the source ticked");
    dst.wait_serial(
        &format!("tern-vm: tick {} ", last_src.0 + TICKS_AFTER as u64),
        GUEST_LIMIT,
    );
    dst.send_line("stop");
    let text = dst.wait_serial("tern-vm: poweroff", GUEST_LIMIT);
    dst.wait_exit(Duration::from_secs(30));
    continued(&before, &text, out);
}

/// The guest's last phase, `text` (its console from where it went on),
/// after `before` (its ticks where it ran first): it verified its data
/// (`VERIFY OK n=COUNT`), its counter continued at the next value; fills
/// the final counter, the guest's gap and its median tick into `out`.
pub(crate) fn continued(before: &[(u64, f64)], text: &str, out: &mut Outcome) {
    let last_src = *before.last().expect("the source ticked");
    let verified = text
        .lines()
        .find(|l| l.contains("tern-vm: VERIFY OK n="))
        .unwrap_or_else(|| panic!("the guest did not verify its data:\n{}", vm::tail(text)));
    out.final_counter = verified
        .split("n=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VERIFY OK n=COUNT");
    let after = vm::ticks(text);
    let first_dst = *after.first().expect("the destination ticked");
    assert_eq!(
        first_dst.0,
        last_src.0 + 1,
        "the counter must continue where the source left it"
    );
    out.guest_gap_ms = (first_dst.1 - last_src.1) * 1e3;
    let mut steps: Vec<f64> = before.windows(2).map(|w| (w[1].1 - w[0].1) * 1e3).collect();
    steps.sort_by(f64::total_cmp);
    out.guest_tick_ms = steps.get(steps.len() / 2).copied().unwrap_or(0.0);
}

/// The events' STOP (source) and RESUME (destination) times → paused ms.
fn paused_ms(src_events: &[Value], dst_events: &[Value]) -> f64 {
    let stop = vm::find_event(src_events, "STOP").expect("the source reported STOP");
    let resume = vm::find_event(dst_events, "RESUME").expect("the destination reported RESUME");
    (vm::event_time(resume) - vm::event_time(stop)) * 1e3
}

fn ram_bytes(info: &Value) -> u64 {
    info["ram"]["transferred"].as_u64().unwrap_or(0)
}

/// Fills `out` from the VMs' events, QEMU's final `query-migrate` and
/// Tern's report: the pause, QEMU's downtime and RAM bytes, Tern's downtime
/// and disk bytes.
fn record(out: &mut Outcome, src: &mut Vm, dst: &mut Vm, info: &Value, report: &Value) {
    out.paused_ms = paused_ms(&src.events(), &dst.events());
    out.qmp_downtime_ms = info["downtime"].as_f64().unwrap_or(0.0);
    out.ram_bytes = ram_bytes(info);
    out.disk_final_ms = report["downtime_ms"].as_f64().unwrap_or(0.0);
    let wire = report["wire_bytes"]
        .as_u64()
        .expect("wire_bytes in the report");
    out.disk_bytes_ahead = report["standby_wire_bytes"].as_u64().unwrap_or(0);
    out.disk_bytes = wire - out.disk_bytes_ahead;
}

/// Tern moves the disk while QEMU moves RAM by precopy, both while the VM
/// runs. The destination agent advertises its export writable from the start
/// (writes get EPERM until Tern's switch), so the destination QEMU opens its
/// disk and waits with `-incoming` during Tern's copy. Tern's pause
/// (`--pause qemu:SOCKET@URI`) starts `migrate` with
/// `pause-before-switchover` and returns once QEMU has stopped the VM at the
/// end of precopy (`pre-switchover`); Tern sends the final delta, switches,
/// and sends the device state with `migrate-continue`.
/// `extra` goes to `tern migrate`.
pub fn tern_moves_the_disk(name: &str, extra: &[&str]) -> Outcome {
    tern_moves(name, extra, Ahead::Nothing)
}

/// Everything in post-copy: Tern's disk (`--mode postcopy`) and QEMU's RAM
/// (`postcopy-ram`, through `--pause qemu-postcopy:`): the VM stops after
/// QEMU's first pass over RAM and runs on the destination as soon as the
/// disk has switched and the device state is there; both fetch what the
/// guest touches first and push the rest.
pub fn tern_and_qemu_in_post_copy(name: &str) -> Outcome {
    tern_moves(name, &["--mode", "postcopy"], Ahead::PostCopyRam)
}

/// The same with Tern's pre-migration prefetch: the running guest's disk is
/// traced for a while, `tern predict` ranks what it will read and rewrite,
/// and the first copy is ordered by that plan (`--prefetch`).
pub fn tern_moves_the_disk_with_prefetch(name: &str) -> Outcome {
    tern_moves(name, &[], Ahead::Prefetch)
}

/// The same with Tern shipping the disk before the migration is asked for:
/// a source agent (`tern agent --role source`) replicates the running
/// guest's disk as a warm standby, and `tern migrate --agent` then asks it to
/// cut over, so the migration sends only what the guest wrote since.
pub fn tern_moves_the_disk_from_a_standby(name: &str) -> Outcome {
    tern_moves(name, &[], Ahead::Standby)
}

/// What Tern does before the migration is asked for.
#[derive(Clone, Copy, PartialEq)]
enum Ahead {
    Nothing,
    /// Trace the running guest, `tern predict`, `--prefetch PLAN`.
    Prefetch,
    /// Replicate continuously from a source agent, then cut over through it.
    Standby,
    /// Nothing ahead; QEMU's RAM in post-copy too.
    PostCopyRam,
}

/// How long the guest runs after booting before any of the disk rows
/// migrates it, beside Tern's preparation where there is one (the trace that
/// the prediction learns from, or the standby's replication): the same age
/// for every row, so the disks hold the same amount of written data.
const AHEAD: Duration = Duration::from_secs(10);

fn tern_moves(name: &str, extra: &[&str], ahead: Ahead) -> Outcome {
    let guest = Guest::new(name);
    let mut agent = Destination::start_with(guest.path(), DISK_MIB << 20, true);
    let mut src = guest.boot_source();
    let plan = guest.path().join("prefetch.json");
    let mut standby = None;
    match ahead {
        // Every disk row migrates a guest of the same age: the others spend
        // this time tracing or replicating.
        Ahead::Nothing | Ahead::PostCopyRam => std::thread::sleep(AHEAD),
        Ahead::Prefetch => learn_the_workload(&guest, &plan),
        Ahead::Standby => standby = Some(Standby::start(&agent, &guest.disk)),
    }
    let plan = plan.to_string_lossy().into_owned();
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    // The destination listens before Tern can converge and start `migrate`.
    let (mut dst, uri) = incoming(
        &guest,
        Disk::Nbd {
            port: agent.nbd,
            export: "tern".to_owned(),
        },
    );
    let postcopy_ram = ahead == Ahead::PostCopyRam;
    if postcopy_ram {
        // Both ends of QEMU's post-copy need the capability.
        dst.qmp(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "postcopy-ram", "state": true }] }),
        );
    }
    let started = Instant::now();
    // Tern drives QEMU: at its pause it starts `migrate` with
    // `pause-before-switchover` (RAM precopies while the VM runs and Tern
    // keeps tracing its writes), waits for `pre-switchover`, sends the final
    // delta, switches, and then `migrate-continue`s the device state.
    let kind = if postcopy_ram {
        "qemu-postcopy"
    } else {
        "qemu"
    };
    let pause = format!("{kind}:{}@{uri}", src.tern_qmp.display());
    let mut args = vec!["--pause", pause.as_str()];
    args.extend_from_slice(extra);
    if ahead == Ahead::Prefetch {
        args.extend_from_slice(&["--prefetch", plan.as_str()]);
    }
    let mut migrate = match &standby {
        Some(standby) => standby.cutover(&agent, &args),
        None => spawn_tern_migrate(&agent, &guest.disk, &args),
    };
    // QEMU's migration completes only at Tern's hand-over, after its switch
    // and health check: the destination may run from then on, while
    // `tern migrate` is still exiting.
    let info = wait_for_qemu(&mut src, &mut dst, &mut migrate, postcopy_ram);
    assert_eq!(
        info["status"],
        "completed",
        "RAM migration: {info}; {}",
        migrate_log(guest.path())
    );
    if !postcopy_ram {
        dst.qmp("cont", Value::Null);
    }
    out.total_s = started.elapsed().as_secs_f64();
    let report = finish_migrate(&mut migrate, guest.path());
    drop(standby);
    let slug = match ahead {
        Ahead::PostCopyRam => "postcopy-ram",
        Ahead::Nothing if extra.contains(&"postcopy") => "postcopy",
        Ahead::Nothing => "overlapped",
        Ahead::Prefetch => "prefetch",
        Ahead::Standby => "standby",
    };
    crate::write_result(&format!("tern-{slug}-report.json"), &report.to_string());
    assert_eq!(report["outcome"], "cut over", "{report}");
    // Tern's downtime there: from QEMU's stop at `pre-switchover` to its switch.
    record(&mut out, &mut src, &mut dst, &info, &report);
    finish_on_destination(&src, &mut dst, &mut out);
    src.kill();
    drop(dst);
    agent.stop();
    guest::fsck(&agent.image()).unwrap_or_else(|e| panic!("e2fsck on the destination: {e}"));
    out
}

/// Waits for QEMU's migration to end (or `tern migrate` to exit); in
/// post-copy, lets the destination run from `postcopy-active` on (its RAM
/// still arriving) and waits for QEMU to complete once every page is there.
fn wait_for_qemu(src: &mut Vm, dst: &mut Vm, migrate: &mut Guard, postcopy_ram: bool) -> Value {
    let deadline = Instant::now() + MIGRATION_LIMIT;
    let mut ends = vec!["completed", "failed", "cancelled"];
    if postcopy_ram {
        ends.push("postcopy-active");
    }
    let mut info = loop {
        let exited = migrate.try_wait().is_some();
        let info = src.qmp("query-migrate", Value::Null);
        if ends.contains(&info["status"].as_str().unwrap_or("")) || exited {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "migration not done within {MIGRATION_LIMIT:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    if info["status"] == "postcopy-active" {
        dst.qmp("cont", Value::Null);
        while info["status"] == "postcopy-active" {
            assert!(
                Instant::now() < deadline,
                "post-copy not done within {MIGRATION_LIMIT:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(10));
            info = src.qmp("query-migrate", Value::Null);
        }
    }
    info
}

/// Guest RAM of every VM here (QEMU's `-m`, the RAM file's size).
const RAM_MIB: u32 = 256;

/// Tern moves the disk and the guest's RAM; QEMU sends only the device state.
/// Guest RAM is a shared file on the host's file system
/// (`memory-backend-file,share=on`), allocated up front so its blocks stay
/// put. One `tern migrate --vm qmp:SOCKET@URI` finds the VM's disk and RAM
/// file over QMP and replicates both, the RAM file at 4 KiB pages while the
/// VM runs: before every round Tern writes back the file's dirty pages, the
/// kernel write-protects them again, and the writeback's block requests are
/// what the tracer sees, so each page the guest dirties is marked. The
/// destination QEMU maps the RAM agent's copy of the file as its RAM. Once
/// both parts have converged, Tern has QEMU `migrate` with `x-ignore-shared`
/// (RAM is not sent) and `pause-before-switchover`; at `pre-switchover` (VM
/// stopped) both parts send their final delta, verify and switch together,
/// and `migrate-continue` sends the device state.
pub fn tern_moves_disk_and_ram(name: &str) -> Outcome {
    let guest = Guest::new(name);
    let mut disk_agent = Destination::start_with(guest.path(), DISK_MIB << 20, true);
    let ram_dir = guest.path().join("ram");
    std::fs::create_dir(&ram_dir).expect("mkdir the RAM agent's directory");
    let mut ram_agent = disk_agent.beside(&ram_dir, u64::from(RAM_MIB) << 20);
    let ram = guest.path().join("src.ram");
    // 4 KiB folios in its page cache, so that the tracer sees dirtied pages,
    // not the large folios around them.
    crate::process::sh(
        Command::new(crate::lab::tern_bin())
            .arg("ram-file")
            .arg(&ram)
            .args(["--size", &format!("{RAM_MIB}M")]),
        Duration::from_mins(1),
    );
    let mut src = guest.boot_source_with_ram(Some(&ram));
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let (mut dst, uri) = incoming_with_ram(
        &guest,
        Disk::Nbd {
            port: disk_agent.nbd,
            export: "tern".to_owned(),
        },
        Some(&ram_agent.image()),
    );
    // The destination leaves shared RAM out of QEMU's stream too.
    dst.qmp(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
    );
    let started = Instant::now();
    let mut cmd = Command::new(crate::lab::tern_bin());
    cmd.args(["migrate", "--vm"])
        .arg(format!("qmp:{}@{uri}", src.tern_qmp.display()))
        .args([
            "--to",
            &format!("vd0={},ram={}", disk_agent.addr(), ram_agent.addr()),
        ])
        .arg("--tls-dir")
        .arg(disk_agent.tls())
        .args(["--domain", "localhost", "--json", "--state-dir"])
        .arg(guest.path().join("state"))
        // The parts' traces stay in the guest's directory.
        .arg("--trace-out")
        .arg(guest.path());
    let mut migrate = spawn_reporting(guest.path(), cmd, "tern migrate --vm");
    let info = wait_for_qemu(&mut src, &mut dst, &mut migrate, false);
    assert_eq!(
        info["status"],
        "completed",
        "device state: {info}; {}",
        migrate_log(guest.path())
    );
    dst.qmp("cont", Value::Null);
    out.total_s = started.elapsed().as_secs_f64();
    let report = finish_migrate(&mut migrate, guest.path());
    crate::write_result("tern-disk-and-ram-reports.json", &report.to_string());
    assert_eq!(report["outcome"], "cut over", "{report}");
    let (disk_report, ram_report) = (&report["parts"]["vd0"], &report["parts"]["ram"]);
    for part in [disk_report, ram_report] {
        assert_eq!(part["outcome"], "cut over", "{report}");
    }
    record(&mut out, &mut src, &mut dst, &info, disk_report);
    out.ram_by_tern = ram_report["wire_bytes"]
        .as_u64()
        .expect("wire_bytes in the RAM report");
    // Both final deltas ran side by side inside the stop: the longer one counts.
    out.disk_final_ms = [disk_report, ram_report]
        .iter()
        .map(|r| r["downtime_ms"].as_f64().unwrap_or(0.0) - r["pause_ms"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    finish_on_destination(&src, &mut dst, &mut out);
    src.kill();
    drop(dst);
    disk_agent.stop();
    ram_agent.stop();
    guest::fsck(&disk_agent.image()).unwrap_or_else(|e| panic!("e2fsck on the destination: {e}"));
    out
}

/// The previous order, kept for comparison: Tern moves the disk and only
/// then, with the source paused, does the destination QEMU start and RAM
/// move (the export is read-only at the handshake until Tern's switch).
/// `extra` goes to `tern migrate`.
pub fn tern_moves_the_disk_serialized(name: &str, extra: &[&str]) -> Outcome {
    let guest = Guest::new(name);
    let mut agent = Destination::start(guest.path(), DISK_MIB << 20);
    let mut src = guest.boot_source();
    std::thread::sleep(AHEAD);
    tern_cutover(name, &guest, &mut agent, &mut src, extra).0
}

/// A first `tern migrate` is killed (SIGKILL) part way through its copy; a
/// second one resumes it and cuts over. Returns the second run's outcome and
/// report, and how many bytes the first had sent.
pub fn tern_resumes_after_a_kill(name: &str) -> (Outcome, Value, u64) {
    let guest = Guest::with_data(name, RANDOM_MIB);
    let mut agent = Destination::start(guest.path(), DISK_MIB << 20);
    let mut src = guest.boot_source();
    let hook = Hook::new(guest.path());
    let mut first = spawn_migrate(&agent, &guest, &src, &hook, &["--max-rate", "8M"]);
    let deadline = Instant::now() + MIGRATION_LIMIT;
    let sent = loop {
        let sent = last_progress(&guest, "sent_bytes");
        if sent >= 8 << 20 {
            break sent;
        }
        assert!(
            first.try_wait().is_none(),
            "the throttled migrate ended before it could be killed: {}",
            migrate_log(guest.path())
        );
        assert!(
            Instant::now() < deadline,
            "the first migrate sent nothing: {}",
            migrate_log(guest.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    first.kill();
    drop(hook);
    for f in ["hook.request", "hook.reply"] {
        let _ = std::fs::remove_file(guest.path().join(f));
    }
    let (out, report) = tern_cutover(name, &guest, &mut agent, &mut src, &[]);
    (out, report, sent)
}

/// The destination QEMU dies while RAM is moving, after Tern's cutover:
/// `tern rollback` brings the destination's writes back (none: it never ran)
/// and resumes the source VM, whose workload goes on and verifies.
pub fn destination_dies_during_cutover(name: &str) -> Outcome {
    let guest = Guest::new(name);
    let agent = Destination::start(guest.path(), DISK_MIB << 20);
    let mut src = guest.boot_source();
    let mut hook = Hook::new(guest.path());
    let mut migrate = spawn_migrate(&agent, &guest, &src, &hook, &[]);
    assert!(
        hook.wait(&mut migrate, MIGRATION_LIMIT).is_some(),
        "tern migrate exited before cutover: {}",
        migrate_log(guest.path())
    );
    hook.answer(true);
    let (mut dst, uri) = incoming(
        &guest,
        Disk::Nbd {
            port: agent.nbd,
            export: "tern".to_owned(),
        },
    );
    src.qmp("migrate", json!({ "uri": uri }));
    // Let the stream start, then crash the destination.
    std::thread::sleep(Duration::from_millis(50));
    dst.kill();
    let deadline = Instant::now() + MIGRATION_LIMIT;
    loop {
        let info = src.qmp("query-migrate", Value::Null);
        match info["status"].as_str() {
            Some("failed" | "cancelled") => break,
            Some("completed") => {
                panic!("the migration completed although the destination was killed")
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the migration never failed: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = finish_migrate(&mut migrate, guest.path());
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert_ne!(src.status(), "running", "the source must still be paused");
    let rb = agent.rollback(&guest.disk, &format!("qmp:{}", src.tern_qmp.display()));
    assert!(
        rb.status.success(),
        "tern rollback failed: {}",
        String::from_utf8_lossy(&rb.stderr)
    );
    assert_eq!(src.status(), "running", "rollback resumes the source VM");
    goes_on_at_the_source(name, &guest, &mut src)
}

/// The guest goes on where it stopped, on the source: it ticks on, verifies
/// every file when stopped, and its disk is clean.
fn goes_on_at_the_source(name: &str, guest: &Guest, src: &mut Vm) -> Outcome {
    let last = vm::ticks(&src.serial()).last().expect("ticks").0;
    src.wait_serial(
        &format!("tern-vm: tick {} ", last + TICKS_AFTER as u64),
        GUEST_LIMIT,
    );
    src.send_line("stop");
    let text = src.wait_serial("tern-vm: poweroff", GUEST_LIMIT);
    src.wait_exit(Duration::from_secs(30));
    assert!(
        text.contains("tern-vm: VERIFY OK"),
        "the guest did not verify its data on the source:\n{}",
        vm::tail(&text)
    );
    guest::fsck(&guest.disk).unwrap_or_else(|e| panic!("e2fsck on the source: {e}"));
    Outcome {
        name: name.to_owned(),
        final_counter: vm::ticks(&text).last().expect("ticks").0,
        ..Outcome::default()
    }
}

/// The destination QEMU dies during the RAM precopy that Tern's `qemu:`
/// pause started: QEMU's migration fails before the VM stops, Tern's pause
/// fails, and `tern migrate` exits without switching (the destination's
/// export stays refusing writes); the source VM never stopped and goes on.
pub fn destination_dies_during_precopy(name: &str) -> (Outcome, String) {
    let guest = Guest::new(name);
    let agent = Destination::start_with(guest.path(), DISK_MIB << 20, true);
    let mut src = guest.boot_source();
    let (mut dst, uri) = incoming(
        &guest,
        Disk::Nbd {
            port: agent.nbd,
            export: "tern".to_owned(),
        },
    );
    let pause = format!("qemu:{}@{uri}", src.tern_qmp.display());
    let mut migrate = spawn_tern_migrate(&agent, &guest.disk, &["--pause", &pause]);
    let deadline = Instant::now() + MIGRATION_LIMIT;
    loop {
        let info = src.qmp("query-migrate", Value::Null);
        if info["status"] == "active" {
            break;
        }
        assert!(
            migrate.try_wait().is_none(),
            "tern migrate exited before QEMU's precopy: {}",
            migrate_log(guest.path())
        );
        assert!(Instant::now() < deadline, "precopy never started: {info}");
        std::thread::sleep(Duration::from_millis(1));
    }
    dst.kill();
    let status = migrate
        .wait_for(Duration::from_mins(1))
        .expect("tern migrate exits after the failed precopy");
    let log = migrate_log(guest.path());
    assert!(!status.success(), "tern migrate must fail: {log}");
    let info = src.qmp("query-migrate", Value::Null);
    assert!(
        ["failed", "cancelled"].contains(&info["status"].as_str().unwrap_or("")),
        "QEMU's migration ended: {info}"
    );
    assert_eq!(src.status(), "running", "the source VM keeps running");
    (goes_on_at_the_source(name, &guest, &mut src), log)
}

/// The last value of `field` in `tern migrate`'s JSON progress lines.
fn last_progress(guest: &Guest, field: &str) -> u64 {
    let text = std::fs::read_to_string(guest.path().join("migrate.log")).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v[field].as_u64())
        .unwrap_or(0)
}

/// Random data in the resume scenario's disk: enough that a throttled copy
/// is still running when it is killed.
pub const RANDOM_MIB: u64 = 32;

/// One `tern migrate` with the RAM handover at its hook; checks the guest
/// continued on the destination and the destination image is clean.
fn tern_cutover(
    name: &str,
    guest: &Guest,
    agent: &mut Destination,
    src: &mut Vm,
    extra: &[&str],
) -> (Outcome, Value) {
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let mut hook = Hook::new(guest.path());
    let started = Instant::now();
    let mut migrate = spawn_migrate(agent, guest, src, &hook, extra);
    assert!(
        hook.wait(&mut migrate, MIGRATION_LIMIT).is_some(),
        "tern migrate exited before cutover: {}",
        migrate_log(guest.path())
    );
    // Disk final, export writable: let Tern finish (its own health check
    // reads the destination's first 64 KiB, so the destination VM stays paused
    // until Tern has exited), and move RAM meanwhile.
    hook.answer(true);
    let (mut dst, uri) = incoming(
        guest,
        Disk::Nbd {
            port: agent.nbd,
            export: "tern".to_owned(),
        },
    );
    let info = src.migrate(&uri, MIGRATION_LIMIT);
    assert_eq!(info["status"], "completed", "RAM migration: {info}");
    let report = finish_migrate(&mut migrate, guest.path());
    dst.qmp("cont", Value::Null);
    out.total_s = started.elapsed().as_secs_f64();
    record(&mut out, src, &mut dst, &info, &report);
    assert_eq!(report["outcome"], "cut over", "{report}");
    finish_on_destination(src, &mut dst, &mut out);
    src.kill();
    drop(dst);
    agent.stop();
    guest::fsck(&agent.image()).unwrap_or_else(|e| panic!("e2fsck on the destination: {e}"));
    (out, report)
}

pub fn spawn_migrate(
    agent: &Destination,
    guest: &Guest,
    src: &Vm,
    hook: &Hook,
    extra: &[&str],
) -> Guard {
    let pause = format!("qmp:{}", src.tern_qmp.display());
    let hook = hook.command();
    let mut args = vec!["--pause", pause.as_str(), "--health-cmd", hook.as_str()];
    args.extend_from_slice(extra);
    spawn_tern_migrate(agent, &guest.disk, &args)
}

/// Traces the running guest's disk image (`tern trace --file`) and writes
/// `tern predict`'s plan for the next minute to `plan`.
fn learn_the_workload(guest: &Guest, plan: &Path) {
    let trace = guest.path().join("history.trace");
    crate::process::sh(
        Command::new(crate::lab::tern_bin())
            .arg("trace")
            .arg("--file")
            .arg(&guest.disk)
            .args(["--duration", &format!("{}s", AHEAD.as_secs()), "--out"])
            .arg(&trace),
        Duration::from_mins(1),
    );
    crate::process::sh(
        Command::new(crate::lab::tern_bin())
            .arg("predict")
            .arg(&trace)
            .args(["--horizon", "30s", "--out"])
            .arg(plan),
        Duration::from_mins(2),
    );
}

/// A source agent replicating the guest's disk as a warm standby, with its
/// control service on loopback.
struct Standby {
    agent: Guard,
    control: String,
}

impl Standby {
    /// Starts the agent, waits until its copy has caught up with the running
    /// guest, then lets it replicate beside the workload for [`AHEAD`].
    fn start(dst: &Destination, image: &Path) -> Standby {
        let control = format!("127.0.0.1:{}", free_port());
        let log =
            std::fs::File::create(dst.dir.join("standby.log")).expect("create the standby's log");
        let agent = Guard::spawn(
            Command::new(crate::lab::tern_bin())
                .args(["agent", "--role", "source", "--file"])
                .arg(image)
                .args(["--peer", &dst.addr(), "--domain", "localhost"])
                .args(["--control", &control])
                .arg("--tls-dir")
                .arg(dst.tls())
                .arg("--state-dir")
                .arg(dst.dir.join("standby-state"))
                .arg("--trace-out")
                .arg(dst.dir.join("standby.trace"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
            "tern agent --role source",
        );
        let standby = Standby { agent, control };
        let deadline = Instant::now() + MIGRATION_LIMIT;
        loop {
            let out = crate::process::run_for(
                &mut standby.ask(dst, &["status", "--json"]),
                Duration::from_secs(30),
            );
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if status["phase"] == "standby: replicating" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby never finished its initial sync: {status}; {}",
                vm::tail(&std::fs::read_to_string(dst.dir.join("standby.log")).unwrap_or_default())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(AHEAD);
        standby
    }

    /// `tern ARGS --agent CONTROL`: a command to the standby.
    fn ask(&self, dst: &Destination, args: &[&str]) -> Command {
        let mut c = Command::new(crate::lab::tern_bin());
        c.args(args)
            .args(["--agent", &self.control, "--agent-tls-dir"])
            .arg(dst.tls());
        c
    }

    /// `tern migrate --agent` with `args`, its report and log where
    /// [`finish_migrate`] looks for them.
    fn cutover(&self, dst: &Destination, args: &[&str]) -> Guard {
        let mut migrate = vec!["migrate", "--json"];
        migrate.extend_from_slice(args);
        spawn_reporting(&dst.dir, self.ask(dst, &migrate), "tern migrate --agent")
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.agent.kill();
    }
}

/// `tern migrate` to `agent` with `args`; its log and report go to
/// `migrate.log` and `migrate.out` in the agent's directory.
fn spawn_tern_migrate(agent: &Destination, image: &Path, args: &[&str]) -> Guard {
    spawn_reporting(&agent.dir, agent.migrate(image, args), "tern migrate")
}

/// Spawns a `tern migrate` command with its log and report in `dir`, where
/// [`migrate_log`] and [`finish_migrate`] read them.
fn spawn_reporting(dir: &Path, mut cmd: Command, name: &str) -> Guard {
    let log = std::fs::File::create(dir.join("migrate.log")).expect("create the migrate log");
    let stdout = std::fs::File::create(dir.join("migrate.out")).expect("create the migrate report");
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(log);
    Guard::spawn(&mut cmd, name)
}

fn migrate_log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("migrate.log")).unwrap_or_default();
    vm::tail(&text)
}

/// Waits for `tern migrate` to succeed and returns its JSON report.
pub fn finish_migrate(migrate: &mut Guard, dir: &Path) -> Value {
    let status = migrate.wait_for(Duration::from_mins(1)).unwrap_or_else(|| {
        panic!(
            "tern migrate did not exit after cutover: {}",
            migrate_log(dir)
        )
    });
    assert!(
        status.success(),
        "tern migrate failed ({status}): {}",
        migrate_log(dir)
    );
    let text = std::fs::read_to_string(dir.join("migrate.out")).expect("read the report");
    serde_json::from_str(text.lines().last().unwrap_or("null")).expect("the report is JSON")
}

/// QEMU's own storage migration: the destination exports its disk over NBD,
/// the source mirrors into it, then migrates, then ends the mirror.
pub fn qemu_mirror(name: &str) -> Outcome {
    let guest = Guest::new(name);
    let dst_disk = guest.path().join("dst.img");
    crate::process::sh(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dst_disk.display()))
            .args(["bs=1M", &format!("count={DISK_MIB}"), "status=none"]),
        Duration::from_mins(1),
    );
    let mut src = guest.boot_source();
    std::thread::sleep(AHEAD);
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let (mut dst, uri) = incoming(&guest, Disk::File(dst_disk.clone()));
    let port = free_port();
    dst.qmp(
        "nbd-server-start",
        json!({ "addr": { "type": "inet", "data": { "host": "127.0.0.1", "port": port.to_string() } } }),
    );
    dst.qmp(
        "block-export-add",
        json!({ "type": "nbd", "id": "e0", "node-name": "d0", "name": "d0", "writable": true }),
    );
    let started = Instant::now();
    src.qmp(
        "blockdev-add",
        json!({ "driver": "nbd", "node-name": "m0", "export": "d0",
                "server": { "type": "inet", "host": "127.0.0.1", "port": port.to_string() } }),
    );
    src.qmp(
        "blockdev-mirror",
        json!({ "job-id": "j0", "device": "d0", "target": "m0", "sync": "full" }),
    );
    let deadline = Instant::now() + MIGRATION_LIMIT;
    loop {
        let jobs = src.qmp("query-block-jobs", Value::Null);
        let job = jobs
            .as_array()
            .and_then(|j| j.first())
            .cloned()
            .unwrap_or(Value::Null);
        if job["ready"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror never became ready: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = src.migrate(&uri, MIGRATION_LIMIT);
    assert_eq!(info["status"], "completed", "RAM migration: {info}");
    // The source is stopped: ending the mirror now leaves the target a
    // complete copy; only then may the destination run.
    let cancel = Instant::now();
    src.qmp("block-job-cancel", json!({ "device": "j0" }));
    let mut src_events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        src_events.extend(src.events());
        if let Some(e) = src_events
            .iter()
            .find(|e| e["event"] == "BLOCK_JOB_COMPLETED" || e["event"] == "BLOCK_JOB_CANCELLED")
        {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the mirror did not end after cancel"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    out.disk_final_ms = cancel.elapsed().as_secs_f64() * 1e3;
    assert!(done["data"]["error"].is_null(), "the mirror failed: {done}");
    dst.qmp("nbd-server-stop", Value::Null);
    dst.qmp("cont", Value::Null);
    out.total_s = started.elapsed().as_secs_f64();
    let dst_events = dst.events();
    out.paused_ms = paused_ms(&src_events, &dst_events);
    out.qmp_downtime_ms = info["downtime"].as_f64().unwrap_or(0.0);
    out.ram_bytes = ram_bytes(&info);
    out.disk_bytes = done["data"]["offset"].as_u64().unwrap_or(0);
    finish_on_destination(&src, &mut dst, &mut out);
    src.kill();
    drop(dst);
    guest::fsck(&dst_disk).unwrap_or_else(|e| panic!("e2fsck on the destination: {e}"));
    out
}

/// The side-by-side table, in Markdown.
pub fn table(rows: &[Outcome]) -> String {
    use std::fmt::Write;
    let mut t = String::from(
        "| migration | QMP downtime (ms) | paused, STOP→RESUME (ms) | disk made final (ms) | guest's gap (ms; median tick) | disk bytes at migration | disk bytes before | RAM bytes (QEMU) | RAM bytes (Tern) | total (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} ({:.0}) | {} | {} | {} | {} | {:.1} |",
            r.name,
            r.qmp_downtime_ms,
            r.paused_ms,
            r.disk_final_ms,
            r.guest_gap_ms,
            r.guest_tick_ms,
            r.disk_bytes,
            r.disk_bytes_ahead,
            r.ram_bytes,
            r.ram_by_tern,
            r.total_s
        );
    }
    t
}
