//! A real Azure Blob Storage emulator for tests: Azurite (Microsoft's, an npm
//! package `cargo xtask setup` installs in `~/.cache/tern/azurite`), on
//! loopback in a temporary directory, with one container; stopped on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The emulator's well-known development account and key (public: Azurite
/// and every Azure SDK ship them).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const CONTAINER: &str = "tern";

/// Where `cargo xtask setup` installs the packages.
fn packages() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
        PathBuf::from,
    );
    let dir = cache.join("tern/azurite/node_modules");
    assert!(
        dir.join(".bin/azurite-blob").is_file() && dir.join("@azure/storage-blob").is_dir(),
        "Azurite is not installed in {}: these tests need a real Azure Blob Storage emulator. Run `cargo xtask setup`",
        dir.display()
    );
    dir
}

/// A running Azurite blob service.
pub struct Azurite {
    pub dir: tempfile::TempDir,
    blob: SocketAddr,
    child: Child,
}

impl Azurite {
    /// Starts Azurite and creates the container.
    pub fn start() -> Azurite {
        let modules = packages();
        let dir = tempfile::Builder::new()
            .prefix("tern-azurite")
            .tempdir()
            .expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let blob: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        let child = Command::new(modules.join(".bin/azurite-blob"))
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(blob).is_err() {
            assert!(
                Instant::now() < deadline,
                "Azurite never listened on {blob}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let a = Azurite { dir, blob, child };
        // The container, made with Microsoft's own client (a store's
        // client only reads and writes blobs).
        let script = format!(
            "require('@azure/storage-blob').BlobServiceClient.fromConnectionString(process.argv[1])\
             .getContainerClient('{CONTAINER}').createIfNotExists()\
             .then(() => process.exit(0), e => {{ console.error(e.message); process.exit(1); }})"
        );
        let out = Command::new("node")
            .args(["-e", &script, &a.connection_string()])
            .env("NODE_PATH", &modules)
            .output()
            .expect("node runs");
        assert!(
            out.status.success(),
            "creating the container: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        a
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={}/{ACCOUNT};",
            self.endpoint()
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.blob)
    }

    /// `az://CONTAINER/prefix`.
    #[allow(clippy::unused_self)] // a URL of this server, even if the container name is fixed
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{CONTAINER}/{prefix}")
    }

    /// The environment a client needs: the emulator and where it listens.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
