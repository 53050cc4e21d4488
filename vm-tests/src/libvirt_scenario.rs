//! The libvirt migration scenario, shared by its rows: a domain with two disks
//! (vda raw, vdb qcow2, both ext4, both written every tick) boots on a source
//! libvirtd; a row moves it to the destination libvirtd its own way (libvirt's
//! storage migration here; `tern migrate --vm libvirt:` later); the guest then
//! continues there, verifies both disks, and the destination images are
//! checked with `e2fsck`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::{self, Kernel, Suite};
use crate::libvirt::{
    Console, DiskSource, Domain, DomainDisk, Format, Libvirtd, MonitorEvents, disk_xml, job_bytes,
    job_fields,
};
use crate::process::sh;
use crate::scenario::{DISK_MIB, Outcome};
use crate::vm;

/// The domain's name on both daemons.
pub const DOMAIN: &str = "tern-guest";
const RAM_MIB: u32 = 256;
const TICKS_BEFORE: u64 = 20;
const TICKS_AFTER: u64 = 15;
const GUEST_LIMIT: Duration = Duration::from_mins(2);
pub const MIGRATION_LIMIT: Duration = Duration::from_mins(4);
/// Migration (and NBD) ports of each daemon: disjoint, and away from a system
/// libvirtd's default 49152-49215.
const SRC_PORTS: std::ops::RangeInclusive<u16> = 49300..=49349;
const DST_PORTS: std::ops::RangeInclusive<u16> = 49350..=49399;

/// Two private daemons, the guest's files, its console and the pause's events.
/// Fields drop in order: the daemons (and their QEMUs) before the console and
/// the directory.
pub struct LibvirtLab {
    pub src: Libvirtd,
    pub dst: Libvirtd,
    pub console: Console,
    /// The domain as the source runs it.
    pub domain: Domain,
    /// STOP on the source, RESUME on the destination (QEMU's host-clock
    /// timestamps), watched from [`LibvirtLab::boot_source`] on.
    events: Option<(MonitorEvents, MonitorEvents)>,
    pub dir: tempfile::TempDir,
}

impl LibvirtLab {
    /// Builds the guest (kernel, initramfs, vda raw and vdb qcow2 ext4
    /// images) and starts both daemons.
    pub fn start() -> LibvirtLab {
        // A short directory, not the row's name: the daemons' sockets live
        // under it, and a unix socket's path holds 107 bytes at most.
        let dir = crate::scratch("libvirt");
        let p = dir.path();
        let kernel = Kernel::get(Suite::Bookworm);
        let initrd = p.join("initrd.gz");
        guest::initramfs(&kernel, &[], &initrd);
        let seed = p.join("seed");
        std::fs::create_dir_all(seed.join("w")).expect("mkdir seed");
        let vda = p.join("src-vda.img");
        guest::ext4_image(&vda, DISK_MIB, Some(&seed));
        let raw_vdb = p.join("vdb.raw");
        guest::ext4_image(&raw_vdb, DISK_MIB, Some(&seed));
        let vdb = p.join("src-vdb.qcow2");
        // Not preallocated: the file grows as the guest writes (Tern's row
        // gives it room first, `--grow-qcow2`).
        sh(
            Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&raw_vdb)
                .arg(&vdb),
            Duration::from_mins(1),
        );
        std::fs::remove_file(&raw_vdb).expect("remove the raw vdb");
        let console = Console::listen(&p.join("console.sock"));
        let src = Libvirtd::start(&p.join("src-host"), "source", SRC_PORTS);
        let dst = Libvirtd::start(&p.join("dst-host"), "destination", DST_PORTS);
        let file = |target: &str, path: PathBuf, format| DomainDisk {
            target: target.to_owned(),
            source: DiskSource::File { path, format },
        };
        let domain = Domain {
            name: DOMAIN.to_owned(),
            mem_mib: RAM_MIB,
            kernel: kernel.vmlinuz.clone(),
            initrd,
            cmdline: "tern.scenario=workload tern.disks=2".to_owned(),
            disks: vec![
                file("vda", vda, Format::Raw),
                file("vdb", vdb, Format::Qcow2),
            ],
            console: console.path.clone(),
        };
        LibvirtLab {
            src,
            dst,
            console,
            domain,
            events: None,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates the domain on the source, waits for the workload to tick, and
    /// starts watching the pause's events.
    pub fn boot_source(&mut self) {
        let xml = self.path().join("domain.xml");
        std::fs::write(&xml, self.domain.xml()).expect("write the domain XML");
        // Defined, not transient: after the migration the source keeps the
        // inactive domain and with it the completed job's statistics.
        self.src.virsh(&["define", &xml.to_string_lossy()]);
        self.src.virsh(&["start", DOMAIN]);
        self.console.wait_connections(1, Duration::from_secs(30));
        self.events = Some((
            MonitorEvents::watch(&self.src, "STOP"),
            MonitorEvents::watch(&self.dst, "RESUME"),
        ));
        self.console
            .wait_serial(&format!("tern-vm: tick {TICKS_BEFORE} "), GUEST_LIMIT);
    }

    /// Empty images for the destination, the same virtual size and format as
    /// the source's (one host: they must be other files); the disks to give
    /// the destination's XML.
    pub fn destination_files(&self) -> Vec<DomainDisk> {
        self.domain
            .disks
            .iter()
            .map(|d| {
                let DiskSource::File { format, .. } = d.source else {
                    return d.clone();
                };
                let path = self
                    .path()
                    .join(format!("dst-{}.{}", d.target, format.as_str()));
                sh(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", format.as_str()])
                        .arg(&path)
                        .arg(format!("{DISK_MIB}M")),
                    Duration::from_secs(30),
                );
                DomainDisk {
                    target: d.target.clone(),
                    source: DiskSource::File { path, format },
                }
            })
            .collect()
    }

    /// The destination's XML: the source's `dumpxml --migratable` with each
    /// disk in `disks` (by target) replaced, its PCI address kept (libvirt
    /// checks the guest ABI); written to a file for `virsh migrate --xml`.
    pub fn destination_xml(&self, disks: &[DomainDisk]) -> PathBuf {
        let mut xml = self.src.virsh(&["dumpxml", "--migratable", DOMAIN]);
        for d in disks {
            xml = replace_disk(&xml, d);
        }
        let path = self.path().join("destination.xml");
        std::fs::write(&path, xml).expect("write the destination XML");
        path
    }

    /// The pause: from the source's STOP to the destination's RESUME (QEMU's
    /// host-clock event times), as the QEMU VM tests measure it.
    pub fn paused_ms(&self) -> f64 {
        let (stop, resume) = self
            .events
            .as_ref()
            .expect("boot_source started the watchers");
        let resume = resume.wait(DOMAIN, Duration::from_secs(30));
        let stop = stop.wait(DOMAIN, Duration::from_secs(5));
        (resume - stop) * 1e3
    }

    /// The guest goes on at the destination: its counter continues, it
    /// verifies both disks when stopped and powers off, and `images` (the
    /// destination's files) pass `e2fsck -fn` once the domain is gone. Fills
    /// the guest's figures and the pause into `out`.
    pub fn finish_on_destination(&mut self, images: &[DomainDisk], out: &mut Outcome) {
        out.paused_ms = self.paused_ms();
        // The destination's QEMU connected to the console at its start.
        self.console.wait_connections(2, Duration::from_secs(30));
        self.finish_where(true, images, out);
    }

    /// After a migration there and back (a rollback: the destination's QEMU
    /// never ran, the domain came back to a new QEMU on the source): the
    /// guest goes on at the source as [`LibvirtLab::finish_on_destination`]
    /// checks it there; `images` are the source's files.
    pub fn finish_on_source_after_return(&mut self, images: &[DomainDisk], out: &mut Outcome) {
        // Source, destination (never resumed), source again.
        self.console.wait_connections(3, Duration::from_secs(30));
        self.finish_where(false, images, out);
    }

    /// The guest's last phase on the console's latest connection, on the
    /// destination daemon or the source's.
    fn finish_where(&mut self, on_destination: bool, images: &[DomainDisk], out: &mut Outcome) {
        let before = vm::ticks(&self.console.text(0));
        let last_src = *before.last().expect("the source ticked");
        self.console.wait_serial(
            &format!("tern-vm: tick {} ", last_src.0 + TICKS_AFTER),
            GUEST_LIMIT,
        );
        self.console.send_line("stop");
        let text = self.console.wait_serial("tern-vm: poweroff", GUEST_LIMIT);
        assert!(
            text.contains("tern-vm: VERIFY OK vdb "),
            "the guest did not verify vdb:\n{}",
            vm::tail(&text)
        );
        crate::scenario::continued(&before, &text, out);
        let deadline = Instant::now() + Duration::from_secs(30);
        let daemon = if on_destination { &self.dst } else { &self.src };
        while !daemon.domains().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the domain did not end after poweroff"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for d in images {
            if let DiskSource::File { path, format } = &d.source {
                self.fsck(path, *format);
            }
        }
    }

    /// The domain runs at the source, and the destination has none.
    fn assert_at_source(&self) {
        assert_eq!(self.src.virsh(&["domstate", DOMAIN]).trim(), "running");
        assert!(
            self.dst.domains().is_empty(),
            "the destination kept the domain"
        );
    }

    /// `e2fsck -fn` on an image, through a raw copy for qcow2.
    fn fsck(&self, path: &Path, format: Format) {
        let raw = match format {
            Format::Raw => path.to_path_buf(),
            Format::Qcow2 => {
                let raw = self.path().join("fsck.raw");
                sh(
                    Command::new("qemu-img")
                        .args(["convert", "-f", "qcow2", "-O", "raw"])
                        .arg(path)
                        .arg(&raw),
                    Duration::from_mins(1),
                );
                raw
            }
        };
        guest::fsck(&raw).unwrap_or_else(|e| panic!("e2fsck on {}: {e}", path.display()));
    }
}

/// A failed test keeps its directory (console, daemons' and QEMU logs).
impl Drop for LibvirtLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "kept {} for the failure's logs\nsource libvirtd:\n{}\ndestination libvirtd:\n{}\nconsole:\n{}",
                self.dir.path().display(),
                self.src.log(),
                self.dst.log(),
                vm::tail(&self.console.latest())
            );
        }
    }
}

/// `xml` with the `<disk>` whose target is `d.target` replaced by `d`, keeping
/// the old element's `<address>`.
fn replace_disk(xml: &str, d: &DomainDisk) -> String {
    let needle = format!("<target dev='{}'", d.target);
    let at = xml
        .find(&needle)
        .unwrap_or_else(|| panic!("no disk {} in the domain XML", d.target));
    let start = xml[..at]
        .rfind("<disk ")
        .expect("a <disk> around the target");
    let end = at + xml[at..].find("</disk>").expect("the disk's end") + "</disk>".len();
    let old = &xml[start..end];
    let address = old
        .find("<address ")
        .map(|a| &old[a..a + old[a..].find("/>").expect("the address's end") + 2]);
    let mut new = disk_xml(d).trim().to_owned();
    if let Some(address) = address {
        let close = new.rfind("</disk>").expect("our disk's end");
        new.insert_str(close, &format!("  {address}\n    "));
    }
    format!("{}{new}{}", &xml[..start], &xml[end..])
}

/// libvirt's own storage migration (the peer): `virsh migrate --live
/// --copy-storage-all` to the destination daemon, which mirrors every disk
/// over NBD into the pre-created destination files, then migrates RAM.
pub fn libvirt_copies_storage(name: &str) -> Outcome {
    let mut lab = LibvirtLab::start();
    lab.boot_source();
    let images = lab.destination_files();
    let xml = lab.destination_xml(&images);
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let started = Instant::now();
    let migrate = crate::process::run_for(
        lab.src
            .virsh_command(&[
                "migrate",
                "--live",
                "--copy-storage-all",
                "--unsafe",
                "--verbose",
                "--xml",
                &xml.to_string_lossy(),
                // One host: the stream and NBD on loopback, not the hostname.
                "--migrateuri",
                "tcp://127.0.0.1",
                "--listen-address",
                "127.0.0.1",
                DOMAIN,
                lab.dst.uri(),
            ])
            .current_dir(lab.path()),
        MIGRATION_LIMIT,
    );
    out.total_s = started.elapsed().as_secs_f64();
    assert!(
        migrate.status.success(),
        "virsh migrate failed ({}): {}\nsource QEMU:\n{}\ndestination QEMU:\n{}",
        migrate.status,
        String::from_utf8_lossy(&migrate.stderr),
        lab.src.qemu_log(DOMAIN),
        lab.dst.qemu_log(DOMAIN)
    );
    let fields = job_figures(&lab, "copy-storage", &mut out);
    out.disk_bytes = job_bytes(field(&fields, "File processed")).unwrap_or(0);
    lab.finish_on_destination(&images, &mut out);
    let dir = lab.path().to_path_buf();
    drop(lab);
    let left = crate::libvirt::processes_under(&dir);
    assert!(left.is_empty(), "the lab left processes behind: {left:?}");
    out
}

/// The source's record of its completed migration job (the destination's
/// has only the RAM stream's; read once: libvirt forgets it when read),
/// kept as a result file: libvirt's downtime and RAM bytes into `out`, and
/// the record's fields.
fn job_figures(lab: &LibvirtLab, row: &str, out: &mut Outcome) -> Vec<(String, String)> {
    let job = lab.src.virsh(&["domjobinfo", "--completed", DOMAIN]);
    crate::write_result(&format!("libvirt-{row}-domjobinfo-source.txt"), &job);
    let fields = job_fields(&job);
    out.qmp_downtime_ms = field(&fields, "Total downtime")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    out.ram_bytes = job_bytes(field(&fields, "Memory processed")).unwrap_or(0);
    fields
}

/// One field of a job record ("" when absent).
fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(f, _)| f == key)
        .map_or("", |(_, v)| v.as_str())
}

/// Tern's row: `tern migrate --vm libvirt:` replicates both disks to two
/// agents (each exporting its image over NBD), and has libvirt migrate RAM
/// and device state (`--suspend`) to a destination defined on those exports.
pub fn tern_migrates_with_libvirt(name: &str) -> Outcome {
    let mut lab = LibvirtLab::start();
    lab.boot_source();
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let started = Instant::now();
    let (agents, sizes, migrate) = tern_migrate(&lab, &[]);
    out.total_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    assert!(
        migrate.status.success(),
        "tern migrate --vm libvirt: failed ({}): {}\n{stdout}\nsource QEMU:\n{}\ndestination QEMU:\n{}",
        migrate.status,
        vm::tail(&String::from_utf8_lossy(&migrate.stderr)),
        lab.src.qemu_log(DOMAIN),
        lab.dst.qemu_log(DOMAIN)
    );
    let report = vm_report(&stdout);
    assert_eq!(report["outcome"], "cut over", "{report}");
    print_breakdown(&report);
    out.disk_final_ms = report["downtime_ms"].as_f64().unwrap_or(0.0);
    out.disk_bytes = report["parts"]
        .as_object()
        .expect("the parts' reports")
        .values()
        .map(|r| r["wire_bytes"].as_u64().unwrap_or(0))
        .sum();
    job_figures(&lab, "tern", &mut out);
    // The destination defined the domain (it was defined on the source),
    // and the source's copy stays, shut off, autostart disabled.
    let info = lab.dst.virsh(&["dominfo", DOMAIN]);
    assert!(info.contains("Persistent:     yes"), "{info}");
    let state = lab.src.virsh(&["domstate", DOMAIN]);
    assert_eq!(state.trim(), "shut off");
    let images: Vec<DomainDisk> = sizes
        .iter()
        .zip(&agents)
        .map(|((target, _, format), a)| DomainDisk {
            target: target.clone(),
            source: DiskSource::File {
                path: a.image(),
                format: *format,
            },
        })
        .collect();
    lab.finish_on_destination(&images, &mut out);
    drop(agents);
    let dir = lab.path().to_path_buf();
    drop(lab);
    let left = crate::libvirt::processes_under(&dir);
    assert!(left.is_empty(), "the lab left processes behind: {left:?}");
    out
}

/// The VM's report: the last JSON line `tern migrate --vm --json` printed.
fn vm_report(stdout: &str) -> serde_json::Value {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("the VM's report as a JSON line")
}

/// Where each part's downtime went (Tern's report), for the docs.
fn print_breakdown(report: &serde_json::Value) {
    for (part, r) in report["parts"].as_object().expect("the parts' reports") {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        eprintln!(
            "{part}: downtime {:.1} ms = pause {:.1} + flush {:.1} + final round {:.1} + verify {:.1} + switch {:.1}; health {:.1}, hand-over {:.1}; final delta {} B",
            f("downtime_ms"),
            f("pause_ms"),
            f("flush_ms"),
            f("final_round_ms"),
            f("verify_ms"),
            f("switch_ms"),
            f("health_ms"),
            f("handover_ms"),
            r["final_delta_bytes"]
        );
    }
}

/// Each disk of the lab's domain: its target, its file's size and format.
fn disk_sizes(lab: &LibvirtLab) -> Vec<(String, u64, Format)> {
    lab.domain
        .disks
        .iter()
        .map(|d| {
            let DiskSource::File { path, format } = &d.source else {
                panic!("the lab's disks are files");
            };
            let size = std::fs::metadata(path).expect("the source image").len();
            // `tern migrate --grow-qcow2` extends a growing qcow2 file to
            // this before replicating it.
            let size = match format {
                Format::Qcow2 => size.max(tern::vm::qcow2_room(DISK_MIB << 20)),
                Format::Raw => size,
            };
            (d.target.clone(), size, *format)
        })
        .collect()
}

/// Starts one agent per disk, exporting its image over NBD (advertised
/// writable: the destination QEMU opens it before the switch; one set of
/// certificates reaches them all), and runs `tern migrate --vm libvirt:`
/// with `extra` arguments to its end.
fn tern_migrate(
    lab: &LibvirtLab,
    extra: &[&str],
) -> (
    Vec<crate::lab::Destination>,
    Vec<(String, u64, Format)>,
    std::process::Output,
) {
    let sizes = disk_sizes(lab);
    let agents = start_agents(lab, &sizes);
    let migrate = run_tern(lab, &agents, &sizes, "tcp://127.0.0.1", extra);
    (agents, sizes, migrate)
}

/// One destination agent per disk (see [`tern_migrate`]).
fn start_agents(lab: &LibvirtLab, sizes: &[(String, u64, Format)]) -> Vec<crate::lab::Destination> {
    let mut agents: Vec<crate::lab::Destination> = Vec::new();
    for (target, size, _) in sizes {
        let dir = lab.path().join(format!("agent-{target}"));
        std::fs::create_dir_all(&dir).expect("the agent's directory");
        let agent = match agents.first() {
            None => crate::lab::Destination::start_with(&dir, *size, true),
            Some(first) => first.beside_with(&dir, *size, true),
        };
        agents.push(agent);
    }
    agents
}

/// `tern migrate --vm libvirt:` to `agents`, libvirt's stream to
/// `migrate_uri`, to its end.
fn run_tern(
    lab: &LibvirtLab,
    agents: &[crate::lab::Destination],
    sizes: &[(String, u64, Format)],
    migrate_uri: &str,
    extra: &[&str],
) -> std::process::Output {
    let to: Vec<String> = sizes
        .iter()
        .zip(agents)
        .map(|((target, _, _), a)| format!("{target}={}", a.addr()))
        .collect();
    crate::process::run_for(
        Command::new(crate::lab::tern_bin())
            .args(["migrate", "--vm"])
            .arg(format!("libvirt:{DOMAIN}@{}", lab.dst.uri()))
            .args(["--to", &to.join(",")])
            .arg("--tls-dir")
            .arg(agents[0].tls())
            .args(["--domain", "localhost", "--json", "--max-downtime", "50ms"])
            .arg("--grow-qcow2")
            // The parts' traces stay in the lab's directory.
            .arg("--trace-out")
            .arg(lab.path())
            .arg("--state-dir")
            .arg(lab.path().join("tern-state"))
            // One host: the stream on loopback, not the hostname.
            .arg(format!("--virsh-migrate-arg=--migrateuri={migrate_uri}"))
            .arg("--virsh-migrate-arg=--listen-address=127.0.0.1")
            .args(extra)
            .env("LIBVIRT_DEFAULT_URI", lab.src.uri()),
        MIGRATION_LIMIT,
    )
}

/// A failed health check after the switch: `tern migrate --vm libvirt:`
/// rolls every disk back and migrates the paused domain back to the source,
/// where the guest goes on with every write (its counter continues, both
/// disks verify, the source's images pass `e2fsck`); the destination keeps
/// no domain.
pub fn tern_rolls_back_under_libvirt(name: &str) -> Outcome {
    let mut lab = LibvirtLab::start();
    lab.boot_source();
    let mut out = Outcome {
        name: name.to_owned(),
        ..Outcome::default()
    };
    let sizes = disk_sizes(&lab);
    let agents = start_agents(&lab, &sizes);
    // First libvirt's migration fails before the switch (the destination
    // QEMU cannot listen on an address no interface has, TEST-NET-1):
    // nothing switched, the source runs on.
    let failed = run_tern(&lab, &agents, &sizes, "tcp://192.0.2.1", &[]);
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(!failed.status.success(), "{stdout}");
    let report = vm_report(&stdout);
    assert_eq!(report["outcome"], "failed", "{report}");
    lab.assert_at_source();
    let started = Instant::now();
    let migrate = run_tern(
        &lab,
        &agents,
        &sizes,
        "tcp://127.0.0.1",
        &["--health-cmd", "false"],
    );
    out.total_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(
        !migrate.status.success() && stderr.contains("rolled back"),
        "tern migrate should have rolled back ({}): {}\n{stdout}",
        migrate.status,
        vm::tail(&stderr)
    );
    let report = vm_report(&stdout);
    assert_eq!(report["outcome"], "rolled back", "{report}");
    lab.assert_at_source();
    let images = lab.domain.disks.clone();
    lab.finish_on_source_after_return(&images, &mut out);
    drop(agents);
    out
}
