//! libvirt-managed VMs: private libvirt daemons (a "source host" and a
//! "destination host" on this one machine), domain XML for the test guest, its
//! serial console across a migration, and QEMU's events as libvirt relays them.
//!
//! Each daemon runs in its own mount namespace with its own directories bound
//! over libvirt's (`/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, ...), so
//! two of them live side by side and neither touches a system libvirtd.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::ops::RangeInclusive;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::process::{Guard, run_for};

/// How long one `virsh` call may take (a migration is bounded by its caller).
const VIRSH_LIMIT: Duration = Duration::from_mins(2);
/// The first connection runs QEMU's capability probe, seconds under TCG.
const START_LIMIT: Duration = Duration::from_mins(1);

/// What the libvirt tests need besides [`crate::missing_prerequisite`].
pub fn missing_prerequisite() -> Option<String> {
    crate::missing_prerequisite().or_else(|| {
        [
            "/usr/sbin/libvirtd",
            "/usr/sbin/virtlogd",
            "/usr/bin/virsh",
            "/usr/bin/unshare",
        ]
        .into_iter()
        .find(|t| !Path::new(t).exists())
        .map(|t| format!("{t} is missing; run `cargo xtask setup`"))
    })
}

/// libvirt's directories, bound over in the daemon's namespace: (its own
/// subdirectory, the system path).
const BINDS: &[(&str, &str)] = &[
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
];

/// A private libvirtd (with its virtlogd), stopped with its domains on drop.
pub struct Libvirtd {
    pub name: String,
    pub dir: PathBuf,
    uri: String,
}

impl Libvirtd {
    /// Starts a daemon whose files are all under `dir`, with QEMU's migration
    /// (and NBD) ports in `ports`; returns once it answers.
    pub fn start(dir: &Path, name: &str, ports: RangeInclusive<u16>) -> Libvirtd {
        for (sub, _) in BINDS {
            std::fs::create_dir_all(dir.join(sub)).expect("create the daemon's directories");
        }
        // Migration refuses two ends with one host UUID: derive one per name.
        let mut tag = 0u32;
        for b in name.bytes() {
            tag = tag.wrapping_mul(31).wrapping_add(u32::from(b));
        }
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "host_uuid = \"7e2a0000-0000-4000-8000-{tag:012x}\"\n\
                 log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
            ),
        )
        .expect("write libvirtd.conf");
        // QEMU as root with no relabelling: the images are the harness's files.
        // No per-domain mount namespace: the console socket is in /var/tmp.
        std::fs::write(
            dir.join("etc/qemu.conf"),
            format!(
                "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
                 security_driver = \"none\"\nremember_owner = 0\nnamespaces = []\n\
                 migration_port_min = {}\nmigration_port_max = {}\n",
                ports.start(),
                ports.end()
            ),
        )
        .expect("write qemu.conf");
        std::fs::write(dir.join("etc/virtlogd.conf"), "").expect("write virtlogd.conf");
        let d = dir.display();
        let mut script = String::from("set -e\n");
        // /run/libvirt is missing when no system libvirt ever ran: make the
        // mount point (an empty directory is all that is left on the host).
        script.push_str("mkdir -p /run/libvirt\n");
        for (sub, target) in BINDS {
            let _ = writeln!(script, "mount --bind '{d}/{sub}' '{target}'");
        }
        let _ = writeln!(
            script,
            "virtlogd -d -p '{d}/virtlogd.pid'\nlibvirtd -d -p '{d}/libvirtd.pid'"
        );
        let out = run_for(
            Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c"])
                .arg(&script),
            Duration::from_secs(30),
        );
        let daemon = Libvirtd {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            uri: format!("qemu+unix:///system?socket={d}/run/libvirt-sock"),
        };
        assert!(
            out.status.success(),
            "cannot start libvirtd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if daemon.try_virsh(&["version"]).status.success() {
                break daemon;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd {name} did not answer within {START_LIMIT:?}: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its connection URI, for `virsh -c` and `virsh migrate`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `virsh -c URI ARGS`, to be run by the caller (e.g. in the background).
    pub fn virsh_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("virsh");
        c.args(["-q", "-c", &self.uri]).args(args);
        c
    }

    /// `virsh -c URI ARGS` within [`VIRSH_LIMIT`]; the status is the caller's.
    pub fn try_virsh(&self, args: &[&str]) -> Output {
        run_for(&mut self.virsh_command(args), VIRSH_LIMIT)
    }

    /// `virsh -c URI ARGS`, which must succeed; its stdout.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = self.try_virsh(args);
        assert!(
            out.status.success(),
            "virsh {} on {} failed ({}): {}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The end of the daemon's log, for failure messages.
    pub fn log(&self) -> String {
        crate::vm::tail(
            &std::fs::read_to_string(self.dir.join("log/libvirtd.log")).unwrap_or_default(),
        )
    }

    /// QEMU's log (command line and stderr) for `domain`.
    pub fn qemu_log(&self, domain: &str) -> String {
        crate::vm::tail(
            &std::fs::read_to_string(self.dir.join(format!("log/qemu/{domain}.log")))
                .unwrap_or_default(),
        )
    }

    /// Names of its running domains.
    pub fn domains(&self) -> Vec<String> {
        let out = self.try_virsh(&["list", "--name"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Pids from the pid files libvirt keeps: its QEMUs, then the daemons.
    fn pids(&self) -> Vec<(u32, &'static str)> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        };
        let mut pids = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.dir.join("run/qemu")) {
            for e in dir.filter_map(Result::ok) {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Some(pid) = read(&e.path())
                {
                    pids.push((pid, "qemu-system-x86"));
                }
            }
        }
        for (file, comm) in [("libvirtd.pid", "libvirtd"), ("virtlogd.pid", "virtlogd")] {
            if let Some(pid) = read(&self.dir.join(file)) {
                pids.push((pid, comm));
            }
        }
        pids
    }
}

/// Whether `pid` is alive and its command name starts with `comm` (so a
/// recycled pid is never signalled).
fn alive_as(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // "PID (COMM) STATE ...": a zombie (Z) is as good as gone.
        let Some((name, rest)) = s.split_once('(').and_then(|(_, r)| r.rsplit_once(')')) else {
            return false;
        };
        name.starts_with(comm) && !rest.trim_start().starts_with('Z')
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; the pid was checked to be the
    // daemon or QEMU it was recorded as just before.
    unsafe { libc::kill(pid, sig) };
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for domain in self.domains() {
            let _ = self.try_virsh(&["destroy", &domain]);
        }
        // QEMUs first (left by a destroy that failed), then the daemons:
        // TERM, and KILL whatever is still there after a few seconds.
        let pids = self.pids();
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            for &(pid, comm) in &pids {
                if alive_as(pid, comm) {
                    signal(pid, sig);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while pids.iter().any(|&(p, c)| alive_as(p, c)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let left: Vec<_> = pids.iter().filter(|&&(p, c)| alive_as(p, c)).collect();
        if !left.is_empty() {
            eprintln!(
                "libvirtd {}: still running after SIGKILL: {left:?}",
                self.name
            );
        }
    }
}

/// Live processes whose command line mentions `dir` (a lab's scratch
/// directory): after a lab is dropped there must be none.
pub fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{} {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Where a domain's disk lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    File {
        path: PathBuf,
        format: Format,
    },
    /// An NBD export (QEMU is the client), raw over the wire.
    Nbd {
        host: String,
        port: u16,
        export: String,
    },
}

/// One virtio disk: its guest device (`vda`, `vdb`) and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    pub target: String,
    pub source: DiskSource,
}

/// A domain booting the test guest's kernel directly.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub mem_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended after the console settings the guest needs.
    pub cmdline: String,
    pub disks: Vec<DomainDisk>,
    /// The harness's [`Console`] socket; QEMU connects to it.
    pub console: PathBuf,
}

/// Escapes a value for an XML attribute in single quotes.
fn attr(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn path_attr(p: &Path) -> String {
    attr(&p.to_string_lossy())
}

impl Domain {
    /// The domain XML: q35 under TCG, one vCPU (as the QEMU VM tests), ACPI
    /// (QEMU 10's q35 wants it for libvirt's poweroff), no balloon.
    pub fn xml(&self) -> String {
        let mut x = String::new();
        let _ = writeln!(
            x,
            "<domain type='qemu'>\n  <name>{}</name>",
            attr(&self.name)
        );
        let _ = writeln!(
            x,
            "  <memory unit='MiB'>{}</memory>\n  <vcpu>1</vcpu>",
            self.mem_mib
        );
        let _ = writeln!(
            x,
            "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>\n  </os>",
            path_attr(&self.kernel),
            path_attr(&self.initrd),
            attr(&format!("console=ttyS0 quiet panic=-1 {}", self.cmdline))
        );
        // libvirt's default CPU (qemu64): migratable, unlike `max`.
        x.push_str("  <features><acpi/></features>\n");
        // The guest powers off at its end: QEMU must exit, as with -no-reboot.
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n");
        for d in &self.disks {
            x.push_str(&disk_xml(d));
        }
        // The console is the harness's listener; reconnect so that a QEMU
        // whose connection drops comes back instead of losing the console.
        let _ = writeln!(
            x,
            "    <serial type='unix'>\n      <source mode='connect' path='{}'><reconnect enabled='yes' timeout='1'/></source>\n      <target port='0'/>\n    </serial>",
            path_attr(&self.console)
        );
        x.push_str("    <memballoon model='none'/>\n  </devices>\n</domain>\n");
        x
    }
}

/// A disk's XML: `cache='none'` (`O_DIRECT` on the host) and `io='threads'`,
/// as the QEMU VM tests open theirs.
pub fn disk_xml(d: &DomainDisk) -> String {
    let target = attr(&d.target);
    match &d.source {
        DiskSource::File { path, format } => format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}' cache='none' io='threads'/>\n      <source file='{}'><seclabel model='dac' relabel='no'/></source>\n      <target dev='{target}' bus='virtio'/>\n    </disk>\n",
            format.as_str(),
            path_attr(path)
        ),
        DiskSource::Nbd { host, port, export } => format!(
            "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none' io='threads'/>\n      <source protocol='nbd' name='{}'><host name='{}' port='{port}'/></source>\n      <target dev='{target}' bus='virtio'/>\n    </disk>\n",
            attr(export),
            attr(host)
        ),
    }
}

/// The guest's serial console: a unix socket the harness listens on, to which
/// each QEMU of the domain connects at its start (the source's, then the
/// destination's after a migration). Every connection's output is kept in
/// order; reading and typing go to the latest.
pub struct Console {
    pub path: PathBuf,
    shared: Arc<Mutex<Connections>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Connections {
    output: Vec<Vec<u8>>,
    input: Vec<UnixStream>,
}

impl Console {
    pub fn listen(path: &Path) -> Console {
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("listen on {}: {e}", path.display()));
        // Polled, so that drop can stop the thread.
        listener
            .set_nonblocking(true)
            .expect("a non-blocking console listener");
        let shared = Arc::new(Mutex::new(Connections::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&shared), Arc::clone(&stop));
        let acceptor = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => accept(&s, conn),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept on the console socket: {e}"),
                }
            }
        });
        Console {
            path: path.to_path_buf(),
            shared,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.shared.lock().expect("the console's lock")
    }

    /// How many QEMUs have connected so far.
    pub fn connections(&self) -> usize {
        self.lock().output.len()
    }

    /// What connection `i` (0: the first QEMU) has shown.
    pub fn text(&self, i: usize) -> String {
        self.lock()
            .output
            .get(i)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// The latest connection's output.
    pub fn latest(&self) -> String {
        self.text(self.connections().saturating_sub(1))
    }

    /// Waits until there are `n` connections.
    pub fn wait_connections(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.connections() < n {
            assert!(
                Instant::now() < deadline,
                "{} QEMU connection(s) to the console within {limit:?}, not {n}",
                self.connections()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the latest connection shows `needle`; panics on a guest
    /// `FAIL` or after `limit`.
    pub fn wait_serial(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.latest();
            if text.contains(needle) {
                return text;
            }
            if let Some(line) = text.lines().find(|l| l.contains("tern-vm: FAIL")) {
                panic!("the guest failed: {line}\n{}", crate::vm::tail(&text));
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not print {needle:?} within {limit:?}:\n{}",
                crate::vm::tail(&text)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types one line on the latest connection.
    pub fn send_line(&self, line: &str) {
        let mut c = self.lock();
        let s = c.input.last_mut().expect("a QEMU connected to the console");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write to the serial console");
    }
}

/// Keeps a new connection's writing half and reads its output in a thread
/// until QEMU closes it.
fn accept(shared: &Arc<Mutex<Connections>>, conn: UnixStream) {
    conn.set_nonblocking(false)
        .expect("a blocking console connection");
    let mut reader = conn.try_clone().expect("clone the console connection");
    let i = {
        let mut c = shared.lock().expect("the console's lock");
        c.output.push(Vec::new());
        c.input.push(conn);
        c.output.len() - 1
    };
    let shared = Arc::clone(shared);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            shared.lock().expect("the console's lock").output[i].extend_from_slice(&buf[..n]);
        }
    });
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // Readers end when their QEMU goes; closing our ends ends them now.
        for s in &self.lock().input {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `virsh qemu-monitor-event --event NAME --loop` on a daemon, for every
/// domain (the destination's does not exist before the migration), its
/// output in a file.
pub struct MonitorEvents {
    event: String,
    out: PathBuf,
    watcher: Guard,
}

impl MonitorEvents {
    pub fn watch(daemon: &Libvirtd, event: &str) -> MonitorEvents {
        let out = daemon.dir.join(format!("events-{event}.txt"));
        let file = std::fs::File::create(&out).expect("create the events file");
        let mut cmd = daemon.virsh_command(&["qemu-monitor-event", "--event", event, "--loop"]);
        cmd.stdin(Stdio::null()).stdout(file).stderr(Stdio::null());
        let watcher = Guard::spawn(&mut cmd, &format!("virsh qemu-monitor-event {event}"));
        MonitorEvents {
            event: event.to_owned(),
            out,
            watcher,
        }
    }

    /// QEMU's timestamps (host clock, seconds) of the event for `domain`, so
    /// far: lines "event NAME at SECS.MICROS for domain 'DOM': DATA".
    pub fn times(&self, domain: &str) -> Vec<f64> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let tag = format!("for domain '{domain}'");
        text.lines()
            .filter(|l| l.contains(&format!("event {} at ", self.event)) && l.contains(&tag))
            .filter_map(|l| {
                l.split(" at ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Waits until the event has been seen for `domain`; its first time.
    pub fn wait(&self, domain: &str, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(&t) = self.times(domain).first() {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no {} event for {domain} within {limit:?}",
                self.event
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the watcher is still running (it ends if its daemon does).
    pub fn running(&mut self) -> bool {
        self.watcher.try_wait().is_none()
    }
}

/// `virsh domjobinfo --completed`'s fields (`Total downtime`, `File
/// processed`, ...), the units left in the value (e.g. `"12 ms"`, `"1.5 MiB"`).
pub fn job_fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// A `domjobinfo` amount in bytes (`"1.234 MiB"`, `"512 B"`); `None` if it
/// is not one.
pub fn job_bytes(value: &str) -> Option<u64> {
    let mut w = value.split_whitespace();
    let n: f64 = w.next()?.parse().ok()?;
    let unit = match w.next()? {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a byte count virsh printed with three decimals"
    )]
    Some((n * unit).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_has_both_disk_kinds_and_the_console() {
        let d = Domain {
            name: "g".to_owned(),
            mem_mib: 256,
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            cmdline: "tern.scenario=workload".to_owned(),
            disks: vec![
                DomainDisk {
                    target: "vda".to_owned(),
                    source: DiskSource::File {
                        path: PathBuf::from("/a.img"),
                        format: Format::Qcow2,
                    },
                },
                DomainDisk {
                    target: "vdb".to_owned(),
                    source: DiskSource::Nbd {
                        host: "127.0.0.1".to_owned(),
                        port: 10809,
                        export: "tern".to_owned(),
                    },
                },
            ],
            console: PathBuf::from("/c.sock"),
        };
        let x = d.xml();
        assert!(x.contains("type='qcow2' cache='none'"), "{x}");
        assert!(x.contains("<source file='/a.img'>"), "{x}");
        assert!(x.contains("protocol='nbd' name='tern'"), "{x}");
        assert!(x.contains("port='10809'"), "{x}");
        assert!(x.contains("mode='connect' path='/c.sock'"), "{x}");
        assert!(
            x.contains("console=ttyS0 quiet panic=-1 tern.scenario=workload"),
            "{x}"
        );
    }

    #[test]
    fn reads_domjobinfo_amounts() {
        assert_eq!(job_bytes("1.500 KiB"), Some(1536));
        assert_eq!(job_bytes("12 B"), Some(12));
        assert_eq!(job_bytes("7 ms"), None);
        let f = job_fields("Job type:         Completed\nTotal downtime:   38 ms\n");
        assert_eq!(f[1], ("Total downtime".to_owned(), "38 ms".to_owned()));
    }
}
