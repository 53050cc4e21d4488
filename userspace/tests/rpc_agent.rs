//! The destination agent end to end: gRPC over mutual TLS writes the image,
//! QEMU reads it over NBD, cutover makes the export writable (fenced by
//! epoch), `/metrics` counts it all, and shutdown drains and flushes.

mod rpc_support;

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use rpc_support::noise;
use tern::agent::{AgentError, Destination, DestinationConfig};
use tern::checktree::CheckTree;
use tern::nbd::ListenAddr;
use tern::rpc::{EncodedExtent, ReplicaClient, TlsMaterial};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

async fn qemu_io(nbd: SocketAddr, read_only: bool, cmd: &str) -> bool {
    let url = format!("nbd://{nbd}/tern");
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.extend([url.as_str(), "-c", cmd]);
    let out = tokio::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .await
        .expect("run qemu-io (qemu-utils)");
    // qemu-io exits 0 even when a command fails; failures are printed.
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("failed") && !text.contains("Pattern verification")
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

fn config(dir: &Path, tls_dir: &Path) -> DestinationConfig {
    let mut cfg = DestinationConfig::new(dir.join("dst.img"), "127.0.0.1:0".parse().expect("addr"));
    cfg.size = Some(4 * MIB);
    cfg.nbd = Some(ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
    cfg.tls_dir = Some(tls_dir.to_path_buf());
    cfg.metrics = Some("127.0.0.1:0".parse().expect("addr"));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_read_over_nbd_cut_over_and_shut_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tern::certs::init(&dir.path().join("certs"), &[]).expect("certs");
    let tls_dir = certs.host_dirs[0].clone();
    let dst = Destination::bind(config(dir.path(), &tls_dir))
        .await
        .expect("bind");
    let grpc = dst.grpc_addr();
    let Some(ListenAddr::Tcp(nbd)) = dst.nbd_addr().cloned() else {
        panic!("NBD should listen on TCP");
    };
    let metrics = dst.metrics_addr().expect("metrics addr");
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));

    let tls = TlsMaterial::load(&tls_dir).expect("tls");
    let mut client = ReplicaClient::connect(&grpc.to_string(), Some(&tls), None)
        .await
        .expect("connect");
    let mut writer = client.open_writer(3, 8).await.expect("open");
    writer
        .send(
            EncodedExtent::encode(0, Bytes::from(vec![0xab; MIB as usize]), Some(1))
                .expect("encode"),
        )
        .await
        .expect("send");
    writer
        .send(
            EncodedExtent::encode(MIB, Bytes::from(noise(MIB as usize, 3)), None).expect("encode"),
        )
        .await
        .expect("send");
    writer.finish().await.expect("finish");

    // QEMU sees the replicated data; the export is read-only before cutover.
    assert!(
        qemu_io(nbd, true, "read -P 0xab 0 1M").await,
        "QEMU did not read the replicated bytes"
    );
    assert!(
        !qemu_io(nbd, false, "write -P 0xcd 2M 64k").await,
        "export writable before cutover"
    );
    let info = client.info().await.expect("info");
    assert!(!info.export_writable);
    // Where the export is, as a client on this host (a libvirt destination
    // domain) dials it.
    assert_eq!(
        info.nbd,
        Some(tern::rpc::NbdExport {
            address: nbd.to_string(),
            name: "tern".to_owned(),
            tls: false,
            advertised_writable: false,
        })
    );

    // Cutover is fenced: a stale epoch cannot flip the export.
    let stale = client
        .set_export_writable(2, true)
        .await
        .expect_err("stale epoch");
    assert_eq!(stale.code(), Some(tonic::Code::FailedPrecondition));
    assert!(client.set_export_writable(3, true).await.expect("cutover"));
    assert!(
        qemu_io(nbd, false, "write -P 0xcd 2M 64k").await,
        "export not writable after cutover"
    );
    assert!(client.info().await.expect("info").export_writable);

    let page = http_get(metrics, "/metrics").await;
    assert!(
        page.contains("tern_replica_extents_written_total 2"),
        "{page}"
    );
    assert!(
        page.contains("tern_replica_written_bytes_total 2097152"),
        "{page}"
    );
    assert!(
        page.contains("tern_nbd_requests_total{type=\"write\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("tern_replica_write_seconds_count 2"),
        "{page}"
    );

    cancel.cancel();
    agent
        .await
        .expect("agent task")
        .expect("agent stopped cleanly");
    let image = std::fs::read(dir.path().join("dst.img")).expect("image");
    assert!(image[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(image[MIB as usize..2 * MIB as usize] == noise(MIB as usize, 3)[..]);
    assert!(
        image[2 * MIB as usize..(2 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("dst.img.tern-epoch"))
            .expect("epoch")
            .trim(),
        "3"
    );
}

#[tokio::test]
async fn plaintext_grpc_or_nbd_on_a_reachable_address_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg =
        DestinationConfig::new(dir.path().join("a.img"), "0.0.0.0:0".parse().expect("addr"));
    cfg.size = Some(MIB);
    assert!(matches!(
        Destination::bind(cfg.clone()).await,
        Err(AgentError::InsecureGrpc { .. })
    ));
    cfg.grpc = "127.0.0.1:0".parse().expect("addr");
    cfg.nbd = Some(ListenAddr::Tcp("0.0.0.0:0".parse().expect("addr")));
    assert!(matches!(
        Destination::bind(cfg.clone()).await,
        Err(AgentError::InsecureNbd(_))
    ));
    // The explicit overrides are honoured (and the agent starts and stops).
    cfg.insecure_nbd = true;
    let dst = Destination::bind(cfg)
        .await
        .expect("bind with --insecure-nbd");
    let (grpc, Some(ListenAddr::Tcp(nbd))) = (dst.grpc_addr(), dst.nbd_addr().cloned()) else {
        panic!("NBD should listen on TCP");
    };
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));
    let mut client = ReplicaClient::connect(&grpc.to_string(), None, None)
        .await
        .expect("connect");
    // A wildcard listener is dialled on loopback by a client on its host.
    let info = client.info().await.expect("info");
    assert_eq!(
        info.nbd.map(|n| n.address),
        Some(format!("127.0.0.1:{}", nbd.port()))
    );
    cancel.cancel();
    agent.await.expect("join").expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_an_open_write_stream_with_unavailable_after_acking_its_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tern::certs::init(&dir.path().join("certs"), &[]).expect("certs");
    let tls_dir = certs.host_dirs[0].clone();
    let mut cfg = config(dir.path(), &tls_dir);
    cfg.nbd = Some(ListenAddr::Unix(dir.path().join("nbd.sock")));
    let dst = Destination::bind(cfg).await.expect("bind");
    let grpc = dst.grpc_addr();
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));
    let tls = TlsMaterial::load(&tls_dir).expect("tls");
    let mut client = ReplicaClient::connect(&grpc.to_string(), Some(&tls), None)
        .await
        .expect("connect");
    let mut writer = client.open_writer(1, 8).await.expect("open");
    writer
        .send(EncodedExtent::encode(0, Bytes::from(vec![0x11; 65536]), None).expect("encode"))
        .await
        .expect("send");
    writer.barrier().await.expect("barrier");
    cancel.cancel();
    // The stream is still open: the agent must end it rather than wait forever.
    // A barrier already on its way when the cancel lands may still be answered,
    // so keep asking (boundedly) until the shutdown reaches the stream.
    let mut ended = None;
    for _ in 0..200 {
        if let Err(e) = writer.barrier().await {
            ended = Some(e);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let err = ended.expect("stream ended by shutdown within 2 s");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    agent
        .await
        .expect("agent task")
        .expect("agent stopped cleanly");
    assert!(
        !dir.path().join("nbd.sock").exists(),
        "unix socket left behind"
    );
    let image = std::fs::read(dir.path().join("dst.img")).expect("image");
    assert!(image[..65536].iter().all(|&b| b == 0x11));
}

/// `qemu-io` on a writable NBD connection running `cmds` in order; its
/// output (qemu-io exits 0 even when a command fails).
async fn qemu_io_text(nbd: SocketAddr, cmds: &[&str]) -> String {
    let url = format!("nbd://{nbd}/tern");
    let mut args = vec!["-f", "raw", url.as_str()];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_mins(1),
        tokio::process::Command::new("qemu-io")
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("qemu-io finished within a minute")
    .expect("run qemu-io (qemu-utils)");
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_advertised_writable_refuses_writes_with_eperm_until_cutover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tern::certs::init(&dir.path().join("certs"), &[]).expect("certs");
    let tls_dir = certs.host_dirs[0].clone();
    let mut cfg = config(dir.path(), &tls_dir);
    cfg.nbd_advertise_writable = true;
    let dst = Destination::bind(cfg).await.expect("bind");
    let grpc = dst.grpc_addr();
    let Some(ListenAddr::Tcp(nbd)) = dst.nbd_addr().cloned() else {
        panic!("NBD should listen on TCP");
    };
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));
    let tls = TlsMaterial::load(&tls_dir).expect("tls");
    let mut client = ReplicaClient::connect(&grpc.to_string(), Some(&tls), None)
        .await
        .expect("connect");
    let mut writer = client.open_writer(5, 8).await.expect("open");
    writer
        .send(EncodedExtent::encode(0, Bytes::from(vec![0xab; 65536]), None).expect("encode"))
        .await
        .expect("send");
    writer.finish().await.expect("finish");

    // A writable client connects (a read-only export would fail the open
    // here) but its write is refused with EPERM: the epoch is not switched.
    let before = qemu_io_text(nbd, &["read -P 0xab 0 64k", "write -P 0xcd 2M 64k"]).await;
    assert!(
        before.contains("Operation not permitted") && !before.contains("Pattern verification"),
        "a write before cutover must fail with EPERM: {before}"
    );
    assert!(!client.info().await.expect("info").export_writable);

    // A client connected before cutover writes after it, on the same
    // connection (QEMU opens its disk once, at -incoming).
    let early = tokio::spawn(qemu_io_text(
        nbd,
        &["sleep 3000", "write -P 0xcd 2M 64k", "read -P 0xcd 2M 64k"],
    ));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stale = client
        .set_export_writable(4, true)
        .await
        .expect_err("stale epoch");
    assert_eq!(stale.code(), Some(tonic::Code::FailedPrecondition));
    assert!(client.set_export_writable(5, true).await.expect("cutover"));
    let after = early.await.expect("qemu-io task");
    assert!(
        !after.contains("failed") && after.contains("wrote 65536/65536"),
        "the early connection could not write after cutover: {after}"
    );

    cancel.cancel();
    agent
        .await
        .expect("agent task")
        .expect("agent stopped cleanly");
    let image = std::fs::read(dir.path().join("dst.img")).expect("image");
    assert!(
        image[2 * MIB as usize..(2 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
}

/// Binds an agent on `dir`'s image, serves it, and returns what it needs to stop.
async fn start_agent(
    dir: &Path,
    tls_dir: &Path,
) -> (
    bool,
    ReplicaClient,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), AgentError>>,
) {
    let dst = Destination::bind(config(dir, tls_dir)).await.expect("bind");
    let restored = dst.tree_restored();
    let grpc = dst.grpc_addr();
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(dst.run(cancel.clone()));
    let tls = TlsMaterial::load(tls_dir).expect("tls");
    let client = ReplicaClient::connect(&grpc.to_string(), Some(&tls), None)
        .await
        .expect("connect");
    (restored, client, cancel, agent)
}

async fn push(client: &mut ReplicaClient, offset: u64, data: &[u8]) {
    let mut writer = client.open_writer(3, 8).await.expect("open");
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        let at = offset + u64::try_from(i).expect("small") * MIB;
        writer
            .send(EncodedExtent::encode(at, Bytes::copy_from_slice(chunk), None).expect("encode"))
            .await
            .expect("send");
    }
    writer.finish().await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checksum_tree_survives_a_restart_but_not_a_write_behind_the_agents_back() {
    const REGION: u64 = 64 << 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tern::certs::init(&dir.path().join("certs"), &[]).expect("certs");
    let tls_dir = certs.host_dirs[0].clone();
    let saved = dir.path().join("dst.img.tern-tree");
    let mut source = noise(4 * MIB as usize, 21);

    // First run: nothing saved yet; the tree is built when the source asks.
    let (restored, mut client, cancel, agent) = start_agent(dir.path(), &tls_dir).await;
    assert!(!restored, "nothing was saved before the first run");
    push(&mut client, 0, &source).await;
    let tree = CheckTree::from_bytes(&source, REGION).expect("tree");
    assert!(client.diff_regions(&tree).await.expect("diff").is_empty());
    drop(client);
    cancel.cancel();
    agent.await.expect("agent task").expect("stopped cleanly");
    assert!(
        saved.exists(),
        "a clean stop saves the tree beside the image"
    );

    // Second run: the saved tree matches the image and is used; it follows new writes.
    let (restored, mut client, cancel, agent) = start_agent(dir.path(), &tls_dir).await;
    assert!(restored, "the image is unchanged since its tree was saved");
    assert!(client.diff_regions(&tree).await.expect("diff").is_empty());
    source[(7 * REGION + 5) as usize] ^= 0xff;
    let region = 7 * REGION as usize..8 * REGION as usize;
    push(&mut client, 7 * REGION, &source[region]).await;
    assert_eq!(client.diff_regions(&tree).await.expect("diff"), vec![7]);
    let tree = CheckTree::from_bytes(&source, REGION).expect("tree");
    assert!(client.diff_regions(&tree).await.expect("diff").is_empty());
    drop(client);
    cancel.cancel();
    agent.await.expect("agent task").expect("stopped cleanly");

    // Behind the agent's back: a byte changes in region 42 while no agent runs.
    {
        use std::os::unix::fs::FileExt as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("dst.img"))
            .expect("open image");
        file.write_all_at(&[!source[(42 * REGION) as usize]], 42 * REGION)
            .expect("write behind the agent's back");
    }
    let (restored, mut client, cancel, agent) = start_agent(dir.path(), &tls_dir).await;
    assert!(
        !restored,
        "an image changed since its tree was saved must not be believed"
    );
    assert_eq!(client.diff_regions(&tree).await.expect("diff"), vec![42]);

    // A damaged saved file is refused the same way.
    drop(client);
    cancel.cancel();
    agent.await.expect("agent task").expect("stopped cleanly");
    let mut bytes = std::fs::read(&saved).expect("saved tree");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&saved, bytes).expect("damage the saved tree");
    let (restored, mut client, cancel, agent) = start_agent(dir.path(), &tls_dir).await;
    assert!(!restored, "a damaged saved tree must not be believed");
    assert_eq!(client.diff_regions(&tree).await.expect("diff"), vec![42]);
    drop(client);
    cancel.cancel();
    agent.await.expect("agent task").expect("stopped cleanly");
}
