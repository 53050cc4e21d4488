//! Garage, the S3-compatible server the history tests run against: installed
//! with `cargo install garage --locked` (about 12 minutes once; the binary
//! stays in `~/.cargo/bin`, so later runs skip it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::sh::{cargo, run};

/// Where `garage` is: on PATH or in `~/.cargo/bin`.
pub fn find() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

/// Installs Garage unless it is already there.
pub fn install() -> Result<()> {
    if find().is_some() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing garage (the S3 server of the history tests; about 12 minutes once)"
    );
    run(cargo().args(["install", "garage", "--locked"]))
}

/// A single-node Garage configuration: data under `dir`, its RPC and S3 API
/// on loopback.
pub fn config(dir: &Path, rpc_port: u16, s3_port: u16, region: &str, secret: &str) -> String {
    format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
    )
}

/// Makes a started node usable: its layout, the key `key_id`/`secret` as
/// `key_name`, and `buckets` that key owns. `cli` runs `garage -c CONFIG ARGS`.
pub fn bootstrap(
    cli: impl Fn(&[&str]) -> Result<String>,
    key_id: &str,
    secret: &str,
    key_name: &str,
    buckets: &[String],
) -> Result<()> {
    let node = cli(&["node", "id", "-q"])?;
    let node = node.trim().split('@').next().unwrap_or_default().to_owned();
    cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
    cli(&["layout", "apply", "--version", "1"])?;
    cli(&["key", "import", key_id, secret, "-n", key_name, "--yes"])?;
    for b in buckets {
        cli(&["bucket", "create", b])?;
        cli(&[
            "bucket", "allow", "--read", "--write", "--owner", b, "--key", key_name,
        ])?;
    }
    Ok(())
}

/// Runs `garage -c config ARGS`, retried for a while: right after start the
/// node may not answer its own RPC yet. `wrap` is the command it runs in
/// (`timeout`, or `ip netns exec NS timeout`).
pub fn cli_retried(
    mut wrap: impl FnMut() -> std::process::Command,
    bin: &Path,
    config: &Path,
    args: &[&str],
) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match crate::sh::output(
            wrap()
                .args(["20"])
                .arg(bin)
                .arg("-c")
                .arg(config)
                .args(args),
        ) {
            Ok(out) => return Ok(out),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}

/// A Garage on loopback for a benchmark, stopped on drop.
pub struct Server {
    child: std::process::Child,
    pub endpoint: String,
}

/// The benchmark server's key and region.
pub const BENCH_KEY_ID: &str = "GK0123456789abcdef01234567";
pub const BENCH_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const BENCH_REGION: &str = "garage";

impl Server {
    /// Starts Garage with its data in `dir` and `buckets` made.
    pub fn start(dir: &Path, buckets: &[String]) -> Result<Server> {
        let bin = find().context("garage is not installed: run `cargo xtask setup`")?;
        std::fs::create_dir_all(dir)?;
        let port = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (rpc, s3) = (port()?, port()?);
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            self::config(dir, rpc, s3, BENCH_REGION, BENCH_SECRET),
        )?;
        let log = std::fs::File::create(dir.join("garage.log"))?;
        let child = std::process::Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("start garage")?;
        let server = Server {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        let cli = |args: &[&str]| {
            cli_retried(
                || std::process::Command::new("timeout"),
                &bin,
                &config,
                args,
            )
        };
        bootstrap(cli, BENCH_KEY_ID, BENCH_SECRET, "bench", buckets)?;
        Ok(server)
    }

    /// The environment a client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", BENCH_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", BENCH_SECRET.into()),
            ("AWS_REGION", BENCH_REGION.into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
