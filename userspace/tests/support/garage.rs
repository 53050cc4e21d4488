//! A real S3-compatible server for tests: Garage, single node on loopback in a
//! temporary directory, with one key and one bucket; stopped on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGION: &str = "garage";
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const BUCKET: &str = "tern-history";

/// The `garage` binary: on PATH or in `~/.cargo/bin` (where `cargo xtask setup` installs it).
pub fn garage_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/garage"));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "garage is not installed: these tests need a real S3 server. Run `cargo xtask setup` \
             (it runs `cargo install garage --locked`, about 12 minutes once) or put `garage` on PATH"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A running single-node Garage.
pub struct Garage {
    pub dir: tempfile::TempDir,
    binary: PathBuf,
    config: PathBuf,
    s3: SocketAddr,
    child: Option<Child>,
}

impl Garage {
    /// Starts Garage, applies a one-node layout, imports the key, creates the bucket.
    pub fn start() -> Garage {
        let binary = garage_binary();
        let dir = tempfile::Builder::new()
            .prefix("tern-garage")
            .tempdir()
            .expect("temp dir");
        let s3: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let rpc = free_port();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{s3}"
root_domain = ".s3.garage.localhost"
"#,
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
                secret = SECRET,
            ),
        )
        .expect("write the config");
        let mut g = Garage {
            dir,
            binary,
            config,
            s3,
            child: None,
        };
        g.spawn();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.split('@').next().expect("a node id").to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["key", "import", KEY_ID, SECRET, "-n", "tern", "--yes"]);
        g.cli(&["bucket", "create", BUCKET]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "tern",
        ]);
        g
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3)
    }

    /// `s3://BUCKET/prefix`.
    #[allow(clippy::unused_self)] // a URL of this server, even if the bucket name is fixed
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment a client needs: credentials, region, endpoint.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    /// Runs a `garage` admin command (bounded by a timeout), which must succeed.
    pub fn cli(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("timeout")
                .arg("20")
                .arg(&self.binary)
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .expect("timeout(1) and garage start");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            // Right after start the node may not answer its own RPC yet.
            assert!(
                Instant::now() < deadline,
                "garage {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("garage server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.s3, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "garage did not listen on {} within 20 s; see {}",
                self.s3,
                self.dir.path().join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server hard (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data; returns once S3 listens.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
