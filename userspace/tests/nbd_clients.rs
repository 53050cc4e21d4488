//! Tern's NBD server against real clients: qemu-io, qemu-img, nbdinfo, fio
//! (libnbd engine), the `nbd` crate, and hand-written broken clients.
//!
//! The server runs in-process on 127.0.0.1:0 over a temporary image. The
//! external tools are installed by `cargo xtask setup`; a missing tool
//! fails the test with that hint.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tern::image::{Image, ImageChanges, ImageOptions};
use tern::nbd::{Export, NbdError, NbdServer, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    server: Arc<NbdServer>,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), NbdError>>>,
}

struct ExportSpec {
    name: &'static str,
    size: u64,
    read_only: bool,
}

impl Fixture {
    async fn start(specs: &[ExportSpec]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let exports = specs
            .iter()
            .map(|s| {
                let path = dir.path().join(format!("{}.img", s.name));
                let image = Image::open(
                    &path,
                    &ImageOptions {
                        size: Some(s.size),
                        read_only: false,
                        direct: true,
                        bulk_direct: false,
                    },
                )
                .unwrap();
                Export {
                    name: s.name.to_owned(),
                    description: format!("test export {}", s.name),
                    image,
                    read_only: s.read_only,
                    changes: ImageChanges::default(),
                    presence: tern::postcopy::Presence::default(),
                }
            })
            .collect();
        let server = Arc::new(NbdServer::new(exports));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&server).serve_tcp(listener, cancel.clone()));
        Fixture {
            dir,
            server,
            addr,
            cancel,
            task: Some(task),
        }
    }

    async fn one(name: &'static str, size: u64) -> Fixture {
        Fixture::start(&[ExportSpec {
            name,
            size,
            read_only: false,
        }])
        .await
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    /// Stops the server (drain + flush) and checks it stopped cleanly.
    async fn stop(mut self) -> tempfile::TempDir {
        self.cancel.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("server drains and stops within 20 s")
            .unwrap()
            .expect("server stops without error");
        self.dir
    }
}

/// Runs an external client; a missing binary fails with the setup hint.
async fn run(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); `cargo xtask setup` installs it"))
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    let fx = Fixture::one("disk", 16 * MIB).await;
    let uri = fx.uri("disk");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "write -P 0x11 3 5",
            "-c",
            "read -P 0x11 3 5",
            "-c",
            "flush",
        ],
    )
    .await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("wrote 1048576/1048576 bytes at offset 0"), "{t}");
    assert!(t.contains("read 1048576/1048576 bytes at offset 0"), "{t}");
    assert!(t.contains("read 5/5 bytes at offset 3"), "{t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");
    let stats = fx.server.stats().snapshot();
    assert!(
        stats.writes >= 2 && stats.reads >= 3 && stats.write_zeroes >= 1,
        "{stats:?}"
    );
    assert!(stats.bytes_written >= MIB, "{stats:?}");
    let path = fx.image_path("disk");
    let dir = fx.stop().await;
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[8..MIB as usize].iter().all(|&b| b == 0xab));
    assert_eq!(&on_disk[3..8], &[0x11; 5]);
    assert!(on_disk[..3].iter().all(|&b| b == 0xab));
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_is_byte_identical() {
    let fx = Fixture::one("vol", 24 * MIB).await;
    let src = fx.dir.path().join("src.raw");
    let back = fx.dir.path().join("back.raw");
    // Data with a zero hole in the middle so qemu-img uses write-zeroes too.
    let mut data = noise(24 * MIB as usize, 7);
    data[8 * MIB as usize..12 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    let uri = fx.uri("vol");
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let back_data = std::fs::read(&back).unwrap();
    assert!(
        back_data == data,
        "data read back through NBD differs from the source"
    );
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let path = fx.image_path("vol");
    let _dir = fx.stop().await;
    assert!(
        std::fs::read(&path).unwrap() == data,
        "image file differs from the source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_shows_name_and_size() {
    let fx = Fixture::start(&[
        ExportSpec {
            name: "alpha",
            size: 8 * MIB,
            read_only: false,
        },
        ExportSpec {
            name: "beta",
            size: 3 * MIB,
            read_only: true,
        },
    ])
    .await;
    let out = run("nbdinfo", &["--list", &format!("nbd://{}", fx.addr)]).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("export=\"alpha\""), "{t}");
    assert!(t.contains("export=\"beta\""), "{t}");
    assert!(t.contains("test export beta"), "{t}");
    assert!(t.contains(&format!("export-size: {}", 8 * MIB)), "{t}");

    let out = run("nbdinfo", &[&fx.uri("beta")]).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("export=\"beta\""), "{t}");
    assert!(t.contains(&format!("export-size: {}", 3 * MIB)), "{t}");
    assert!(t.contains("is_read_only: true"), "{t}");
    assert!(t.contains("can_multi_conn: true"), "{t}");
    assert!(t.contains("block_size_maximum: 33554432"), "{t}");

    let out = run("nbdinfo", &[&fx.uri("gamma")]).await;
    assert!(
        !out.status.success(),
        "an unknown export must fail: {}",
        text(&out)
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_read_write_with_crc32c_verify_passes() {
    let fx = Fixture::one("fio", 64 * MIB).await;
    let uri = fx.uri("fio");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify-state file left in the working directory.
            "--verify_state_save=0",
            "--size=32M",
            "--output-format=terse",
        ],
    )
    .await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("verify:") && !t.contains("bad magic"), "{t}");
    let stats = fx.server.stats().snapshot();
    assert!(stats.writes > 1000 && stats.reads > 1000, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_crate_client_uses_export_name_and_round_trips() {
    let fx = Fixture::one("crate", 4 * MIB).await;
    let addr = fx.addr;
    let data = noise(256 * 1024, 3);
    let expected = data.clone();
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let export = nbd::client::handshake(&mut tcp, b"crate").unwrap();
        assert_eq!(export.size, 4 * MIB);
        assert!(!export.readonly);
        assert!(export.send_flush);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        client.seek(SeekFrom::Start(MIB)).unwrap();
        client.write_all(&data).unwrap();
        client.flush().unwrap();
        let mut got = vec![0u8; data.len()];
        client.seek(SeekFrom::Start(MIB)).unwrap();
        client.read_exact(&mut got).unwrap();
        assert!(got == data);
    })
    .await
    .unwrap();
    let path = fx.image_path("crate");
    let _dir = fx.stop().await;
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[MIB as usize..MIB as usize + expected.len()] == expected[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_at_once_each_see_their_own_data() {
    let fx = Fixture::one("shared", 32 * MIB).await;
    let uri = fx.uri("shared");
    let clients = (0..6u64).map(|i| {
        let uri = uri.clone();
        tokio::spawn(async move {
            let off = i * 4 * MIB;
            let pattern = format!("0x{:02x}", 0x10 + i);
            let w = format!("write -P {pattern} {off} 4M");
            let r = format!("read -P {pattern} {off} 4M");
            let out = run(
                "qemu-io",
                &["-f", "raw", &uri, "-c", &w, "-c", "flush", "-c", &r],
            )
            .await;
            (i, out)
        })
    });
    for c in futures::future::join_all(clients).await {
        let (i, out) = c.unwrap();
        let t = text(&out);
        assert!(out.status.success(), "client {i}: {t}");
        assert!(
            !t.contains("Pattern verification failed"),
            "client {i}: {t}"
        );
    }
    assert!(fx.server.stats().snapshot().connections_accepted >= 6);
    let path = fx.image_path("shared");
    let _dir = fx.stop().await;
    let on_disk = std::fs::read(&path).unwrap();
    for i in 0..6u64 {
        let region = &on_disk[(i * 4 * MIB) as usize..((i + 1) * 4 * MIB) as usize];
        assert!(
            region.iter().all(|&b| u64::from(b) == 0x10 + i),
            "region {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm_until_made_writable() {
    let fx = Fixture::start(&[ExportSpec {
        name: "ro",
        size: 4 * MIB,
        read_only: true,
    }])
    .await;
    // A real client that ignores the READ_ONLY flag: the nbd crate.
    let addr = fx.addr;
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let export = nbd::client::handshake(&mut tcp, b"ro").unwrap();
        assert!(export.readonly);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        let err = client.write(&[1u8; 4096]).expect_err("write must fail");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::PermissionDenied,
            "EPERM: {err}"
        );
        // The connection stays usable after the refusal.
        let mut buf = vec![0u8; 4096];
        client.seek(SeekFrom::Start(0)).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    })
    .await
    .unwrap();
    // qemu-io sees the flag and refuses to open read-write.
    let out = run(
        "qemu-io",
        &["-f", "raw", &fx.uri("ro"), "-c", "write -P 1 0 4k"],
    )
    .await;
    assert!(
        !out.status.success() || text(&out).contains("write failed"),
        "{}",
        text(&out)
    );
    assert!(fx.server.stats().snapshot().bytes_written == 0);

    // Cutover: the export becomes writable for new connections.
    fx.server.set_read_only("ro", false);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &fx.uri("ro"),
            "-c",
            "write -P 0x5a 0 4k",
            "-c",
            "read -P 0x5a 0 4k",
        ],
    )
    .await;
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("verification failed"),
        "{t}"
    );
    assert!(fx.server.try_set_read_only("missing", true).is_err());
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_export_serves_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::open(
        &dir.path().join("u.img"),
        &ImageOptions {
            size: Some(2 * MIB),
            read_only: false,
            direct: true,
            bulk_direct: false,
        },
    )
    .unwrap();
    let server = Arc::new(NbdServer::new(vec![Export {
        name: "u".into(),
        description: String::new(),
        image,
        read_only: false,
        changes: ImageChanges::default(),
        presence: tern::postcopy::Presence::default(),
    }]));
    let sock = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&server).serve_unix(listener, cancel.clone()));
    let uri = format!("nbd+unix:///u?socket={}", sock.display());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
        ],
    )
    .await;
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("verification failed"),
        "{t}"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

// --- Hand-written clients that break the protocol ----------------------

/// Does a fixed-newstyle `NBD_OPT_GO` handshake by hand; returns the size.
async fn raw_handshake(s: &mut TcpStream, name: &str) -> u64 {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).await.unwrap();
    let mut size = 0;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match kind {
            proto::REP_INFO if payload[..2] == [0, 0] => {
                size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
            }
            proto::REP_INFO => {}
            proto::REP_ACK => return size,
            other => panic!("unexpected option reply {other:#x}"),
        }
    }
}

fn request(command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&command.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Reads one simple reply: (error, cookie).
async fn reply(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(r[..4].try_into().unwrap()),
        proto::SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_requests_get_errors_and_bad_magic_closes_only_that_connection() {
    let fx = Fixture::one("b", 4 * MIB).await;
    let mut conn = TcpStream::connect(fx.addr).await.unwrap();
    assert_eq!(raw_handshake(&mut conn, "b").await, 4 * MIB);

    // Read past the end: EINVAL. Write past the end: ENOSPC, payload skipped.
    conn.write_all(&request(proto::CMD_READ, 0, 1, 4 * MIB - 1, 2))
        .await
        .unwrap();
    assert_eq!(reply(&mut conn).await, (proto::EINVAL, 1));
    let mut past_end = request(proto::CMD_WRITE, 0, 2, 4 * MIB, 512);
    past_end.extend_from_slice(&[0xee; 512]);
    conn.write_all(&past_end).await.unwrap();
    assert_eq!(reply(&mut conn).await, (proto::ENOSPC, 2));
    // Oversized read: EINVAL without allocating 4 GiB.
    conn.write_all(&request(proto::CMD_READ, 0, 3, 0, u32::MAX))
        .await
        .unwrap();
    assert_eq!(reply(&mut conn).await, (proto::EINVAL, 3));
    // Oversized write: EINVAL; its 40 MiB payload is skipped, stream stays in sync.
    let big = 40 << 20;
    conn.write_all(&request(proto::CMD_WRITE, 0, 4, 0, big))
        .await
        .unwrap();
    let junk = vec![0x77u8; big as usize];
    let (mut rd, mut wr) = conn.into_split();
    let sender = tokio::spawn(async move {
        wr.write_all(&junk).await.unwrap();
        wr
    });
    let mut rep = [0u8; 16];
    rd.read_exact(&mut rep).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[4..8].try_into().unwrap()),
        proto::EINVAL
    );
    let wr = sender.await.unwrap();
    let mut conn = rd.reunite(wr).unwrap();
    // Unknown command and unknown flag: EINVAL.
    conn.write_all(&request(99, 0, 5, 0, 0)).await.unwrap();
    assert_eq!(reply(&mut conn).await, (proto::EINVAL, 5));
    conn.write_all(&request(proto::CMD_READ, 1 << 7, 6, 0, 8))
        .await
        .unwrap();
    assert_eq!(reply(&mut conn).await, (proto::EINVAL, 6));
    // A valid read still works and nothing was written.
    conn.write_all(&request(proto::CMD_READ, 0, 7, 0, 4096))
        .await
        .unwrap();
    assert_eq!(reply(&mut conn).await, (0, 7));
    let mut data = vec![1u8; 4096];
    conn.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|&b| b == 0));
    // Garbage magic: the server closes this connection.
    conn.write_all(&[0xde; 28]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("server closes a desynchronised connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "no reply to a request with bad magic");
    assert_eq!(fx.server.stats().snapshot().protocol_errors, 1);

    // Garbage instead of a handshake, and a client that vanishes mid-option.
    let mut garbage = TcpStream::connect(fx.addr).await.unwrap();
    let mut hello = [0u8; 18];
    garbage.read_exact(&mut hello).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut sink)).await;
    let mut vanish = TcpStream::connect(fx.addr).await.unwrap();
    vanish.read_exact(&mut hello).await.unwrap();
    vanish.write_all(&1u32.to_be_bytes()).await.unwrap();
    vanish
        .write_all(&proto::IHAVEOPT.to_be_bytes())
        .await
        .unwrap();
    drop(vanish);

    // The server still serves well-behaved clients.
    let out = run(
        "qemu-io",
        &["-f", "raw", &fx.uri("b"), "-c", "read -P 0 0 64k"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let path = fx.image_path("b");
    let _dir = fx.stop().await;
    assert!(
        std::fs::read(&path).unwrap().iter().all(|&b| b == 0),
        "the image was corrupted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_get_unsup_and_list_works_by_hand() {
    let fx = Fixture::one("opts", MIB).await;
    let mut s = TcpStream::connect(fx.addr).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    s.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .await
        .unwrap();
    let opt = |code: u32, payload: &[u8]| {
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&code.to_be_bytes());
        o.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        o.extend_from_slice(payload);
        o
    };
    // STARTTLS on a server without TLS, extended headers, and an unknown option.
    for code in [proto::OPT_STARTTLS, proto::OPT_EXTENDED_HEADERS, 4242] {
        s.write_all(&opt(code, &[])).await.unwrap();
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), code);
        assert_eq!(
            u32::from_be_bytes(head[12..16].try_into().unwrap()),
            proto::REP_ERR_UNSUP
        );
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut msg = vec![0u8; len];
        s.read_exact(&mut msg).await.unwrap();
    }
    // A malformed GO (name length past the payload): ERR_INVALID, not a crash.
    s.write_all(&opt(proto::OPT_GO, &[0, 0, 1, 0, b'x']))
        .await
        .unwrap();
    let mut head = [0u8; 20];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(head[12..16].try_into().unwrap()),
        proto::REP_ERR_INVALID
    );
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).await.unwrap();
    // ABORT is acknowledged.
    s.write_all(&opt(proto::OPT_ABORT, &[])).await.unwrap();
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(head[12..16].try_into().unwrap()),
        proto::REP_ACK
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_drains_inflight_requests_then_flushes() {
    let fx = Fixture::one("drain", 64 * MIB).await;
    let mut s = TcpStream::connect(fx.addr).await.unwrap();
    raw_handshake(&mut s, "drain").await;
    // Pipeline 32 writes of 1 MiB, then cancel before reading any reply.
    let mut batch = Vec::new();
    for i in 0..32u64 {
        batch.extend_from_slice(&request(proto::CMD_WRITE, 0, 100 + i, i * MIB, MIB as u32));
        batch.extend(std::iter::repeat_n((i as u8) | 0x80, MIB as usize));
    }
    let (mut rd, mut wr) = s.into_split();
    let sender = tokio::spawn(async move { wr.write_all(&batch).await.map(|()| wr) });
    // Wait until the server has read all of them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fx.server.stats().snapshot().writes < 32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never read the writes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _wr = sender.await.unwrap().unwrap();
    let path = fx.image_path("drain");
    fx.cancel.cancel();
    let mut cookies = Vec::new();
    for _ in 0..32 {
        let mut r = [0u8; 16];
        rd.read_exact(&mut r)
            .await
            .expect("every in-flight request gets its reply");
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0);
        cookies.push(u64::from_be_bytes(r[8..16].try_into().unwrap()));
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (100..132).collect::<Vec<_>>());
    let _dir = fx.stop().await;
    let on_disk = std::fs::read(&path).unwrap();
    for i in 0..32usize {
        assert!(
            on_disk[i * MIB as usize..(i + 1) * MIB as usize]
                .iter()
                .all(|&b| b == (i as u8) | 0x80)
        );
    }
}

/// `tern nbd serve` follows the agent's rule: plaintext NBD on an address
/// other than loopback is refused unless `--insecure-nbd` says it is meant.
#[test]
fn tern_nbd_serve_refuses_a_public_address_without_insecure_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = |extra: &[&str]| {
        let mut c = std::process::Command::new("timeout");
        c.args([
            "-s",
            "TERM",
            "2",
            env!("CARGO_BIN_EXE_tern"),
            "nbd",
            "serve",
            "--image",
        ])
        .arg(&image)
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .args(extra);
        c.output().unwrap()
    };
    let refused = serve(&[]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "refused at once, not timed out"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--insecure-nbd"), "{err}");
    // With the flag it serves until stopped (timeout's SIGTERM: exit 124).
    let served = serve(&["--insecure-nbd"]);
    assert_eq!(
        served.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
}

/// Reads until the server closes the connection; how many bytes came.
async fn until_closed(s: &mut TcpStream) -> usize {
    let mut got = 0;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_handshake_timeout_and_a_flood_is_refused_at_the_door()
{
    let dir = tempfile::tempdir().unwrap();
    let image = Image::open(
        &dir.path().join("l.img"),
        &ImageOptions {
            size: Some(MIB),
            read_only: false,
            direct: true,
            bulk_direct: false,
        },
    )
    .unwrap();
    let server = Arc::new(
        NbdServer::new(vec![Export {
            name: "l".into(),
            description: String::new(),
            image,
            read_only: false,
            changes: ImageChanges::default(),
            presence: tern::postcopy::Presence::default(),
        }])
        .with_limits(tern::nbd::Limits {
            handshake_timeout: Duration::from_millis(500),
            max_connections: 3,
            max_handshaking: 2,
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&server).serve_tcp(listener, cancel.clone()));

    // Two clients connect and never speak: they hold both handshake places.
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A third is closed at once, without even the greeting.
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut third).await, 0, "refused unanswered");
    assert_eq!(server.stats().snapshot().connections_refused, 1);
    // The silent ones got their greeting, then were dropped at the timeout.
    for s in &mut silent {
        assert_eq!(until_closed(s).await, 18, "the greeting, then nothing");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "dropped after {waited:?}"
    );
    let s = server.stats().snapshot();
    assert_eq!(
        (s.handshake_failures, s.connections_active),
        (2, 0),
        "{s:?}"
    );

    // With the places free again, real clients get in, up to the connection limit.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(raw_handshake(&mut c, "l").await, MIB);
        held.push(c);
    }
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        until_closed(&mut fourth).await,
        0,
        "over the connection limit"
    );
    assert_eq!(server.stats().snapshot().connections_refused, 2);
    drop(held);
    cancel.cancel();
    task.await.unwrap().unwrap();
}
