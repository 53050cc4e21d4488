//! A real destination for the rpc integration tests: an image file, the
//! replica service with mutual TLS on 127.0.0.1, and clients that connect to it.
#![allow(dead_code)] // each test crate uses a different part

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tempfile::TempDir;
use tern::image::{Image, ImageOptions};
use tern::metrics::ReplicaMetrics;
use tern::rpc::{Fence, ReplicaClient, ReplicaService, RpcError, ServeOptions, TlsMaterial};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const HOST: &str = "localhost";

pub struct Destination {
    pub dir: TempDir,
    pub image_path: PathBuf,
    pub addr: SocketAddr,
    pub tls: TlsMaterial,
    pub image: Image,
    pub metrics: Arc<ReplicaMetrics>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), RpcError>>,
}

impl Destination {
    /// A fresh destination with an image of `size` bytes.
    pub async fn start(size: u64) -> Destination {
        let dir = tempfile::tempdir().expect("tempdir");
        Destination::start_in(dir, size).await
    }

    /// A destination over `dir` (reusing its certificates, image and epoch file).
    pub async fn start_in(dir: TempDir, size: u64) -> Destination {
        let certs = dir.path().join("certs");
        if !certs.exists() {
            tern::certs::init(&certs, &[]).expect("certs init");
        }
        let tls = TlsMaterial::load(&certs.join(HOST)).expect("tls dir");
        let image_path = dir.path().join("dst.img");
        let image = Image::open(
            &image_path,
            &ImageOptions {
                size: Some(size),
                read_only: false,
                direct: false,
                bulk_direct: true,
            },
        )
        .expect("open image");
        let fence = Fence::load(&Fence::path_for(&image_path)).expect("epoch file");
        let metrics = Arc::new(ReplicaMetrics::default());
        let cancel = CancellationToken::new();
        let service = ReplicaService::new(
            image.clone(),
            fence,
            None,
            Arc::clone(&metrics),
            cancel.clone(),
            ServeOptions::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = {
            let tls = tls.clone();
            let cancel = cancel.clone();
            tokio::spawn(
                async move { tern::rpc::serve(listener, service, Some(&tls), cancel).await },
            )
        };
        Destination {
            dir,
            image_path,
            addr,
            tls,
            image,
            metrics,
            cancel,
            task,
        }
    }

    /// A client with this destination's own certificate (same CA).
    pub async fn client(&self) -> ReplicaClient {
        ReplicaClient::connect(&self.addr.to_string(), Some(&self.tls), None)
            .await
            .expect("connect with a valid client certificate")
    }

    /// The image as bytes on disk.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.image_path).expect("read image")
    }

    /// Stops the service (draining streams), flushes, and hands back the directory.
    pub async fn stop(self) -> TempDir {
        self.cancel.cancel();
        self.task
            .await
            .expect("server task")
            .expect("server ended cleanly");
        self.image.flush().await.expect("flush");
        self.dir
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
