//! A destination agent in a lab of its own (certificates, image, ports,
//! optionally a network namespace behind a veth pair), for the migration
//! and failover tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::migration::{free_port, tern};
use super::sh;

/// A destination agent with its own certificates, restartable on the same image and port.
pub struct Lab {
    pub dir: tempfile::TempDir,
    /// Where the agent's gRPC listens, and the namespace it runs in (if any).
    pub host: String,
    pub netns: Option<String>,
    pub grpc: u16,
    pub nbd: u16,
    pub size: u64,
    pub agent: Option<Child>,
    /// More arguments for the destination agent.
    pub agent_args: Vec<String>,
}

impl Lab {
    pub fn new(size: u64) -> Lab {
        Lab::new_at(size, "127.0.0.1", None)
    }

    pub fn new_at(size: u64, host: &str, netns: Option<&str>) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("tern-migrate")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        sh(tern()
            .args(["certs", "init"])
            .arg(dir.path().join("pki"))
            .args(["--host", "localhost"]));
        let mut lab = Lab {
            dir,
            host: host.to_owned(),
            netns: netns.map(str::to_owned),
            grpc: free_port(),
            nbd: free_port(),
            size,
            agent: None,
            agent_args: Vec::new(),
        };
        lab.start_agent();
        lab
    }

    /// Restarts the agent with `args` added.
    pub fn with_agent_args(mut self, args: &[&str]) -> Lab {
        self.kill_agent();
        self.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
        self.start_agent();
        self
    }

    pub fn tls(&self) -> PathBuf {
        self.dir.path().join("pki/localhost")
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("dst.img")
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.grpc)
    }

    pub fn start_agent(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tern")]);
                c
            }
            None => tern(),
        };
        let child = cmd
            .args(["agent", "--role", "destination", "--image"])
            .arg(self.image())
            .args(["--size", &self.size.to_string()])
            .args(["--grpc", &self.addr()])
            .args(["--nbd", &format!("127.0.0.1:{}", self.nbd)])
            .arg("--tls-dir")
            .arg(self.tls())
            .args(&self.agent_args)
            .stderr(Stdio::null())
            .spawn()
            .expect("start the destination agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((self.host.as_str(), self.grpc)).is_err() {
            assert!(Instant::now() < deadline, "the agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `tern migrate` with the lab's destination and TLS, plus `args`.
    pub fn migrate(&self, source: &str, args: &[&str]) -> Command {
        // A hung migration fails the test instead of hanging CI.
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "300", env!("CARGO_BIN_EXE_tern")])
            .args(["migrate", "--device", source, "--to", &self.addr()])
            .arg("--tls-dir")
            .arg(self.tls())
            .args(["--domain", "localhost", "--json"])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--trace-out")
            .arg(self.dir.path().join("src.trace"))
            .args(args);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

/// Waits for a migration started with a piped stdout; it must succeed; returns its report.
pub fn finished_report(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("migrate");
    assert!(out.status.success(), "migrate failed: {}", out.status);
    serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("report"),
    )
    .expect("json")
}

/// A child killed (not waited for: it may be blocked in a frozen file system) on drop.
pub struct KillOnly(pub Child);

impl Drop for KillOnly {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// A network namespace joined to the host by a veth pair: a link that can be cut.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    /// The host's address on the link, and the namespace's.
    pub host: String,
    pub peer: String,
}

impl Netns {
    pub fn new() -> Netns {
        // Unique per namespace, as tests of one binary run side by side.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let ns = Netns {
            name: format!("tern-lc-{id}"),
            host_if: format!("tlh{id}"),
            host: format!("10.231.{}.1", 7 + n % 200),
            peer: format!("10.231.{}.2", 7 + n % 200),
        };
        let peer_if = format!("tlp{id}");
        sh(Command::new("ip").args(["netns", "add", &ns.name]));
        sh(Command::new("ip").args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ]));
        sh(Command::new("ip").args(["link", "set", &peer_if, "netns", &ns.name]));
        sh(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/30", ns.host),
            "dev",
            &ns.host_if,
        ]));
        sh(Command::new("ip").args(["link", "set", &ns.host_if, "up"]));
        let in_ns = |args: &[&str]| {
            sh(Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .args(args));
        };
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.peer),
            "dev",
            &peer_if,
        ]);
        in_ns(&["ip", "link", "set", &peer_if, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn link(&self, up: bool) {
        sh(Command::new("ip").args(["link", "set", &self.host_if, if up { "up" } else { "down" }]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
