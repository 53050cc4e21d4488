//! One QEMU VM under TCG: its process, its QMP monitor (through
//! `tern::pause::Qmp`), and its serial console (a log file for output, a unix
//! socket for input).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern::pause::Qmp;

use crate::guest::Kernel;
use crate::process::Guard;

/// The guest's disk.
#[derive(Debug, Clone)]
pub enum Disk {
    /// A raw image on the host, opened with `O_DIRECT` so every guest write is
    /// a block request the host's tracer sees.
    File(PathBuf),
    /// An NBD export (QEMU is the client).
    Nbd { port: u16, export: String },
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    /// Sockets and logs go here.
    pub dir: PathBuf,
    pub kernel: Kernel,
    pub initrd: PathBuf,
    /// Appended to the kernel command line after the console settings.
    pub append: String,
    pub disk: Option<Disk>,
    pub mem_mib: u32,
    /// `-incoming URI`: wait for a migration stream instead of booting.
    pub incoming: Option<String>,
    /// A second QMP socket for Tern (`NAME-tern.qmp`): QEMU serves one client
    /// per monitor, and the harness keeps its own.
    pub tern_monitor: bool,
    /// `-S`: stay paused after an incoming migration until `cont`.
    pub start_paused: bool,
    /// Guest RAM in this file (`memory-backend-file`, `share=on`) instead of
    /// anonymous memory.
    pub ram_file: Option<PathBuf>,
}

impl VmSpec {
    pub fn new(name: &str, dir: &Path, kernel: &Kernel, initrd: &Path, append: &str) -> VmSpec {
        VmSpec {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            kernel: kernel.clone(),
            initrd: initrd.to_path_buf(),
            append: append.to_owned(),
            disk: None,
            mem_mib: 256,
            incoming: None,
            tern_monitor: false,
            start_paused: false,
            ram_file: None,
        }
    }
}

/// A running QEMU, killed when dropped.
pub struct Vm {
    pub name: String,
    /// The serial console's output.
    pub log: PathBuf,
    /// Tern's monitor, when the spec asked for one.
    pub tern_qmp: PathBuf,
    serial: PathBuf,
    serial_in: Option<UnixStream>,
    rt: tokio::runtime::Runtime,
    qmp: Option<Qmp>,
    // Dropped last: the QMP connection goes before the process.
    process: Guard,
}

const BOOT_LIMIT: Duration = Duration::from_secs(30);

impl Vm {
    /// Starts QEMU and connects the harness's monitor.
    #[expect(
        clippy::too_many_lines,
        reason = "QEMU's command line, one argument group per device"
    )]
    pub fn start(spec: &VmSpec) -> Vm {
        let p = |suffix: &str| spec.dir.join(format!("{}{suffix}", spec.name));
        let (qmp_path, tern_qmp, serial, log) =
            (p(".qmp"), p("-tern.qmp"), p(".serial"), p(".log"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &spec.mem_mib.to_string()]);
        if let Some(ram) = &spec.ram_file {
            cmd.args(["-machine", "q35,memory-backend=ram0", "-object"])
                .arg(format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                    spec.mem_mib,
                    ram.display()
                ));
        } else {
            cmd.args(["-machine", "q35"]);
        }
        cmd.args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-no-user-config",
        ])
        .arg("-kernel")
        .arg(&spec.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&spec.initrd)
        .args([
            "-append",
            &format!("console=ttyS0 quiet panic=-1 {}", spec.append),
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
            serial.display(),
            log.display()
        ))
        .args(["-serial", "chardev:ser0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if spec.tern_monitor {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", tern_qmp.display()));
        }
        match &spec.disk {
            Some(Disk::File(path)) => {
                cmd.arg("-blockdev").arg(format!(
                    "driver=file,filename={},node-name=f0,cache.direct=on,aio=threads",
                    path.display()
                ));
                cmd.args(["-blockdev", "driver=raw,file=f0,node-name=d0"]);
            }
            Some(Disk::Nbd { port, export }) => {
                cmd.arg("-blockdev").arg(format!(
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},node-name=d0"
                ));
            }
            None => {}
        }
        if spec.disk.is_some() {
            cmd.args(["-device", "virtio-blk-pci,drive=d0,id=vd0,addr=0x4"]);
        }
        if let Some(uri) = &spec.incoming {
            cmd.args(["-incoming", uri]);
        }
        if spec.start_paused {
            cmd.arg("-S");
        }
        let stderr = std::fs::File::create(p(".stderr")).expect("create the QEMU stderr file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut process = Guard::spawn(&mut cmd, &format!("QEMU {}", spec.name));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for QMP");
        let deadline = Instant::now() + BOOT_LIMIT;
        let qmp = loop {
            if let Some(status) = process.try_wait() {
                panic!(
                    "QEMU {} exited at start ({status}): {}",
                    spec.name,
                    std::fs::read_to_string(p(".stderr")).unwrap_or_default()
                );
            }
            if qmp_path.exists()
                && let Ok(q) = rt.block_on(Qmp::connect(&qmp_path))
            {
                break q;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU {} never opened QMP",
                spec.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Vm {
            name: spec.name.clone(),
            log,
            tern_qmp,
            serial,
            serial_in: None,
            rt,
            qmp: Some(qmp),
            process,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// A QMP command; `Err` carries QEMU's error.
    pub fn try_qmp(&mut self, command: &str, args: Option<Value>) -> Result<Value, String> {
        let qmp = self.qmp.as_mut().expect("the monitor is connected");
        self.rt
            .block_on(qmp.execute(command, args))
            .map_err(|e| e.to_string())
    }

    /// A QMP command that must succeed.
    pub fn qmp(&mut self, command: &str, args: Value) -> Value {
        let args = (!args.is_null()).then_some(args);
        let name = self.name.clone();
        self.try_qmp(command, args)
            .unwrap_or_else(|e| panic!("QMP {command} on {name}: {e}"))
    }

    /// Events QEMU sent so far (reads whatever is pending first).
    pub fn events(&mut self) -> Vec<Value> {
        self.qmp("query-status", Value::Null);
        self.qmp.as_mut().expect("connected").take_events()
    }

    /// `query-status`'s `status`, e.g. `running`, `paused`, `postmigrate`.
    pub fn status(&mut self) -> String {
        self.qmp("query-status", Value::Null)["status"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned()
    }

    /// The serial console's output so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console shows `needle`; panics on a guest `FAIL`, on
    /// QEMU exiting, or after `limit`.
    pub fn wait_serial(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.serial();
            if text.contains(needle) {
                return text;
            }
            if let Some(line) = text.lines().find(|l| l.contains("tern-vm: FAIL")) {
                panic!("guest {} failed: {line}\n{}", self.name, tail(&text));
            }
            if let Some(status) = self.process.try_wait() {
                panic!(
                    "QEMU {} exited ({status}) before {needle:?}:\n{}",
                    self.name,
                    tail(&text)
                );
            }
            assert!(
                Instant::now() < deadline,
                "guest {} did not print {needle:?} within {limit:?}:\n{}",
                self.name,
                tail(&text)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the console holds `n` workload ticks (from this boot).
    pub fn wait_ticks(&mut self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        self.wait_serial("tern-vm: workload start", limit);
        while ticks(&self.serial()).len() < n {
            assert!(
                Instant::now() < deadline,
                "guest {} did not tick {n} times within {limit:?}",
                self.name
            );
            self.wait_serial("tern-vm: tick", limit);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types one line on the guest's serial console.
    pub fn send_line(&mut self, line: &str) {
        if self.serial_in.is_none() {
            self.serial_in =
                Some(UnixStream::connect(&self.serial).expect("connect to the serial socket"));
        }
        let s = self.serial_in.as_mut().expect("connected just above");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write to the serial console");
    }

    /// Waits for QEMU to exit (the guest powered off).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.qmp = None;
        let name = self.name.clone();
        let text = self.serial();
        self.process.wait_for(limit).unwrap_or_else(|| {
            panic!(
                "QEMU {name} still running after {limit:?}:\n{}",
                tail(&text)
            )
        })
    }

    /// Kills QEMU at once (a crash, for failure scenarios).
    pub fn kill(&mut self) {
        self.qmp = None;
        self.process.kill();
    }

    /// Starts `migrate` to `uri` and polls `query-migrate` until it ends;
    /// returns the last `query-migrate` answer (`status` `completed` or not).
    pub fn migrate(&mut self, uri: &str, limit: Duration) -> Value {
        self.qmp("migrate", json!({ "uri": uri }));
        let deadline = Instant::now() + limit;
        loop {
            let info = self.qmp("query-migrate", Value::Null);
            if let Some("completed" | "failed" | "cancelled") = info["status"].as_str() {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "migration of {} not done within {limit:?}: {info}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The host wall-clock time of a QMP event, in seconds.
pub fn event_time(event: &Value) -> f64 {
    let t = &event["timestamp"];
    t["seconds"].as_f64().unwrap_or(0.0) + t["microseconds"].as_f64().unwrap_or(0.0) / 1e6
}

/// The first event named `name` in `events`, if any.
pub fn find_event<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

/// The last lines of a console log, for failure messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The workload's ticks on a console: `(counter, guest uptime)`.
pub fn ticks(text: &str) -> Vec<(u64, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.split("tern-vm: tick ").nth(1)?;
            let mut w = rest.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}
