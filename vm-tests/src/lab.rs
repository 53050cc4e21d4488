//! The `tern` side of a VM test: the binary, certificates, a destination
//! agent, and the cutover hook through which `tern migrate` hands the paused
//! VM over to the harness for QEMU's RAM migration.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{Guard, sh};

/// The `tern` binary under test: `TERN_BIN`, else the workspace's debug build
/// (`cargo xtask vm-test` builds it first).
pub fn tern_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let bin = target.join("debug/tern");
    assert!(
        bin.exists(),
        "{} is missing: build it (`cargo build -p tern`) or run `cargo xtask vm-test`",
        bin.display()
    );
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on loopback")
        .port()
}

/// A destination agent with its own certificates.
pub struct Destination {
    pub dir: PathBuf,
    pub grpc: u16,
    pub nbd: u16,
    pub size: u64,
    /// `--nbd-advertise-writable`: the export is advertised writable from
    /// the start (writes get EPERM until cutover).
    pub advertise_writable: bool,
    /// The certificates' directory (`tern certs init`), maybe another agent's.
    pki: PathBuf,
    agent: Option<Guard>,
}

impl Destination {
    /// Makes the lab's certificates in `dir/pki` and starts the agent on
    /// `dir/dst.img` (`size` bytes).
    pub fn start(dir: &Path, size: u64) -> Destination {
        Destination::start_with(dir, size, false)
    }

    /// [`Destination::start`], with `--nbd-advertise-writable` if `advertise_writable`.
    pub fn start_with(dir: &Path, size: u64, advertise_writable: bool) -> Destination {
        sh(
            Command::new(tern_bin())
                .args(["certs", "init"])
                .arg(dir.join("pki"))
                .args(["--host", "localhost"]),
            Duration::from_secs(30),
        );
        Destination::with_pki(dir, size, advertise_writable, dir.join("pki"))
    }

    /// Another agent on `dir/dst.img` (`size` bytes) with this one's
    /// certificates: one `--tls-dir` reaches both (a whole VM's parts).
    #[must_use]
    pub fn beside(&self, dir: &Path, size: u64) -> Destination {
        Destination::with_pki(dir, size, false, self.pki.clone())
    }

    /// [`Destination::beside`], with `--nbd-advertise-writable` if `advertise_writable`.
    #[must_use]
    pub fn beside_with(&self, dir: &Path, size: u64, advertise_writable: bool) -> Destination {
        Destination::with_pki(dir, size, advertise_writable, self.pki.clone())
    }

    fn with_pki(dir: &Path, size: u64, advertise_writable: bool, pki: PathBuf) -> Destination {
        let mut d = Destination {
            dir: dir.to_path_buf(),
            grpc: free_port(),
            nbd: free_port(),
            size,
            advertise_writable,
            pki,
            agent: None,
        };
        d.restart();
        d
    }

    pub fn tls(&self) -> PathBuf {
        self.pki.join("localhost")
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join("dst.img")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc)
    }

    /// (Re)starts the agent on the same image and ports.
    pub fn restart(&mut self) {
        self.stop();
        let log = File::create(self.dir.join("agent.log")).expect("create the agent log");
        let mut cmd = Command::new(tern_bin());
        cmd.args(["agent", "--role", "destination"]);
        if self.advertise_writable {
            cmd.arg("--nbd-advertise-writable");
        }
        let agent = Guard::spawn(
            cmd.arg("--image")
                .arg(self.image())
                .args(["--size", &self.size.to_string()])
                .args(["--grpc", &self.addr()])
                .args(["--nbd", &format!("127.0.0.1:{}", self.nbd)])
                .arg("--tls-dir")
                .arg(self.tls())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
            "tern agent",
        );
        self.agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.grpc)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the destination agent never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent (SIGKILL); the image stays.
    pub fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// `tern migrate --file IMAGE` to this agent, with `args` appended. Run
    /// it through [`Guard::spawn`]: the caller's waits bound it, and it dies
    /// with the test (no `timeout` wrapper, which a kill would orphan it from).
    pub fn migrate(&self, image: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(tern_bin());
        c.args(["migrate", "--file"])
            .arg(image)
            .args(["--to", &self.addr()])
            .arg("--tls-dir")
            .arg(self.tls())
            .args(["--domain", "localhost", "--json"])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--trace-out")
            .arg(self.dir.join("src.trace"))
            .args(args);
        c
    }
}

impl Destination {
    /// `tern rollback --file IMAGE` from this agent, resuming with `resume`.
    pub fn rollback(&self, image: &Path, resume: &str) -> std::process::Output {
        crate::process::run_for(
            Command::new(tern_bin())
                .args(["rollback", "--file"])
                .arg(image)
                .args(["--to", &self.addr()])
                .arg("--tls-dir")
                .arg(self.tls())
                .args(["--domain", "localhost", "--resume", resume]),
            Duration::from_mins(2),
        )
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cutover hook: `tern migrate --health-cmd` runs [`Hook::command`]
/// after the final delta, once the destination's export is writable; the
/// command tells the harness (a FIFO) and waits for its answer (another
/// FIFO). The harness migrates RAM and device state meanwhile; a "fail"
/// answer makes Tern roll back and resume the source VM.
pub struct Hook {
    request: PathBuf,
    reply: PathBuf,
    reader: File,
}

impl Hook {
    pub fn new(dir: &Path) -> Hook {
        Hook::named(dir, "hook")
    }

    /// A hook whose FIFOs are `dir/NAME.request` and `dir/NAME.reply`.
    pub fn named(dir: &Path, name: &str) -> Hook {
        let request = dir.join(format!("{name}.request"));
        let reply = dir.join(format!("{name}.reply"));
        for p in [&request, &reply] {
            let c = CString::new(p.as_os_str().as_bytes()).expect("no NUL in the path");
            // SAFETY: `c` is a valid NUL-terminated path alive across the call.
            let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
            assert_eq!(
                rc,
                0,
                "mkfifo {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
        // Non-blocking, so that waiting can also watch `tern migrate`.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&request)
            .expect("open the hook's request FIFO");
        Hook {
            request,
            reply,
            reader,
        }
    }

    /// The shell command for `--health-cmd`.
    pub fn command(&self) -> String {
        format!(
            "timeout 120 sh -c 'echo go > {}; read r < {}; test \"$r\" = ok'",
            self.request.display(),
            self.reply.display()
        )
    }

    /// Waits until Tern calls the hook; `None` if `migrate` exited first.
    pub fn wait(&mut self, migrate: &mut Guard, limit: Duration) -> Option<()> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 16];
        loop {
            match self.reader.read(&mut buf) {
                Ok(n) if n > 0 => return Some(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read the hook FIFO: {e}"),
            }
            if migrate.try_wait().is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "tern migrate never reached cutover within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Answers the hook: `true` lets the cutover stand, `false` rolls back.
    pub fn answer(&self, ok: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut f = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.reply)
            {
                Ok(f) => break f,
                // ENXIO: the hook has not opened its end yet.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    assert!(Instant::now() < deadline, "the hook never read its answer");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("open the hook's reply FIFO: {e}"),
            }
        };
        f.write_all(if ok { b"ok\n" } else { b"fail\n" })
            .expect("answer the hook");
    }
}
