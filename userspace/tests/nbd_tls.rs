//! NBD that can leave loopback: STARTTLS with the certificates `tern certs
//! init` makes (mutual TLS, as qemu-nbd and nbdkit do with `--tls=require`),
//! structured replies, and `NBD_CMD_BLOCK_STATUS` for `base:allocation`, so
//! qemu-img and nbdcopy skip an export's holes.
//!
//! Real clients (nbdinfo, qemu-img) and hand-written ones against the
//! server in-process; the tools come from `cargo xtask setup`, and a missing
//! one fails the test with that hint.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tern::image::{Image, ImageChanges, ImageOptions};
use tern::nbd::{Export, NbdError, NbdServer, proto};
use tern::postcopy::Presence;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// Where the test writes data; the rest of the image is a hole.
const DATA: [(u64, u64); 2] = [(MIB, 2 * MIB), (9 * MIB, 64 << 10)];

struct Served {
    dir: tempfile::TempDir,
    server: Arc<NbdServer>,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), NbdError>>,
}

impl Served {
    /// One export "d" of [`SIZE`] with random data at [`DATA`], TLS required
    /// with a `dst` certificate when `tls`, a post-copy under way (every
    /// unit missing) when `postcopy`.
    async fn start(tls: bool, postcopy: bool) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let image = Image::open(
            &path,
            &ImageOptions {
                size: Some(SIZE),
                read_only: false,
                direct: false,
                bulk_direct: false,
            },
        )
        .unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for (i, (at, len)) in DATA.into_iter().enumerate() {
            file.write_all_at(&noise(len, i as u64), at).unwrap();
        }
        file.sync_all().unwrap();
        let presence = Presence::new(Duration::from_secs(1), None, Some(image.clone()));
        if postcopy {
            let units = SIZE / MIB;
            let missing = vec![0xff; usize::try_from(units.div_ceil(8)).unwrap()];
            presence.arm(SIZE, MIB, &missing).unwrap();
        }
        let mut server = NbdServer::new(vec![Export {
            name: "d".into(),
            description: "tls test export".into(),
            image,
            read_only: false,
            changes: ImageChanges::default(),
            presence,
        }]);
        tern::certs::init(&dir.path().join("pki"), &["dst".into(), "src".into()]).unwrap();
        if tls {
            let material = tern::rpc::TlsMaterial::load(&dir.path().join("pki/dst")).unwrap();
            server = server.with_tls(material.rustls_server_config().unwrap());
        }
        let server = Arc::new(server);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&server).serve_tcp(listener, cancel.clone()));
        Served {
            dir,
            server,
            addr,
            cancel,
            task,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("d.img")
    }

    /// The client's certificate directory (signed by the server's authority).
    fn client_certs(&self) -> PathBuf {
        self.dir.path().join("pki/src")
    }

    fn nbds(&self, certs: &Path) -> String {
        format!(
            "nbds://localhost:{}/d?tls-certificates={}",
            self.addr.port(),
            certs.display()
        )
    }

    /// qemu-img's `--object` and `--image-opts` for the export over TLS.
    fn qemu_tls(&self) -> [String; 4] {
        [
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                self.client_certs().display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=localhost,port={},export=d,tls-creds=tls0",
                self.addr.port()
            ),
        ]
    }

    async fn stop(self) -> tempfile::TempDir {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server stops within 20 s")
            .unwrap()
            .expect("the server stops without error");
        self.dir
    }
}

fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

async fn run(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); `cargo xtask setup` installs it"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `(start, length, data)` runs of `qemu-img map --output=json`.
fn map_runs(json: &str) -> Vec<(u64, u64, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The runs a correct map of [`DATA`] shows: holes between the data.
fn expected_runs() -> Vec<(u64, u64, bool)> {
    let mut runs = Vec::new();
    let mut at = 0;
    for (start, len) in DATA {
        runs.push((at, start - at, false));
        runs.push((start, len, true));
        at = start + len;
    }
    runs.push((at, SIZE - at, false));
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_and_nbdinfo_over_tls_see_the_data_and_the_holes() {
    let srv = Served::start(true, false).await;
    let certs = srv.client_certs();

    let out = run("nbdinfo", &[&srv.nbds(&certs)]).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("with TLS"), "{t}");
    assert!(t.contains("using structured packets"), "{t}");
    assert!(t.contains("base:allocation"), "{t}");
    assert!(t.contains(&format!("export-size: {SIZE}")), "{t}");

    // qemu-img map over TLS: the image's holes, from block status.
    let tls = srv.qemu_tls();
    let mut args = vec!["map", "--output=json"];
    args.extend(tls.iter().map(String::as_str));
    let out = run("qemu-img", &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        map_runs(&String::from_utf8_lossy(&out.stdout)),
        expected_runs()
    );

    // qemu-img convert out of the export over TLS: byte-identical, and the
    // holes stay holes in the copy (it skipped them instead of reading zeroes).
    let copy = srv.dir.path().join("copy.img");
    let mut args = vec!["convert", "-O", "raw"];
    args.extend(tls.iter().map(String::as_str));
    let copy_arg = copy.display().to_string();
    args.push(&copy_arg);
    let out = run("qemu-img", &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(srv.image()).unwrap()
    );
    let allocated = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&copy).unwrap().blocks() * 512
    };
    let data: u64 = DATA.iter().map(|(_, len)| len).sum();
    assert!(
        allocated <= data + MIB,
        "the copy allocates {allocated} bytes for {data} bytes of data"
    );

    // Writes over TLS land (qemu-io through the same credentials).
    let out = run(
        "qemu-io",
        &[
            "--object",
            &tls[1],
            "--image-opts",
            &tls[3],
            "-c",
            "write -P 0x5a 4M 128k",
            "-c",
            "read -P 0x5a 4M 128k",
        ],
    )
    .await;
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("fail"),
        "qemu-io over TLS: {t}"
    );
    let stats = srv.server.stats().snapshot();
    assert!(stats.block_status > 0, "{stats:?}");
    let image = srv.image();
    let _dir = srv.stop().await;
    let mut got = vec![0u8; 128 << 10];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut got, 4 * MIB)
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_export_refuses_plaintext_strangers_and_other_authorities() {
    let srv = Served::start(true, false).await;
    let before = srv.server.stats().snapshot().handshake_failures;

    // Plaintext: the options are refused (TLS required) and no data flows.
    let out = run("nbdinfo", &[&format!("nbd://{}/d", srv.addr)]).await;
    assert!(!out.status.success(), "plaintext got in: {}", text(&out));

    // TLS without a client certificate.
    let bare = srv.dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(srv.dir.path().join("pki/ca.pem"), bare.join("ca-cert.pem")).unwrap();
    let out = run("nbdinfo", &[&srv.nbds(&bare)]).await;
    assert!(
        !out.status.success(),
        "no client certificate got in: {}",
        text(&out)
    );

    // A certificate from another authority (both ways: the client distrusts
    // the server too, but the server must refuse first or regardless).
    let other = srv.dir.path().join("other");
    tern::certs::init(&other, &["src".into()]).unwrap();
    let out = run("nbdinfo", &[&srv.nbds(&other.join("src"))]).await;
    assert!(
        !out.status.success(),
        "another authority got in: {}",
        text(&out)
    );
    // Another authority's client trusting this server's CA: the server alone refuses.
    let mixed = srv.dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(srv.dir.path().join("pki/ca.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join("src").join(f), mixed.join(f)).unwrap();
    }
    let out = run("nbdinfo", &[&srv.nbds(&mixed)]).await;
    assert!(
        !out.status.success(),
        "a client certificate from another authority got in: {}",
        text(&out)
    );

    // By hand: every option but STARTTLS and ABORT gets ERR_TLS_REQD, and
    // NBD_OPT_EXPORT_NAME (which has no error reply) closes the connection.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    greet(&mut s).await;
    for (code, payload) in [
        (proto::OPT_LIST, vec![]),
        (proto::OPT_STRUCTURED_REPLY, vec![]),
        (proto::OPT_GO, go_payload("d")),
    ] {
        send_option(&mut s, code, &payload).await;
        let (kind, _) = option_reply(&mut s).await;
        assert_eq!(kind, proto::REP_ERR_TLS_REQD, "option {code}");
    }
    send_option(&mut s, proto::OPT_EXPORT_NAME, b"d").await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the server hangs up")
        .unwrap_or(0);
    assert_eq!(n, 0, "no export data in the clear");

    let failures = srv.server.stats().snapshot().handshake_failures - before;
    assert!(
        failures >= 4,
        "three refused TLS handshakes and a plaintext EXPORT_NAME; counted {failures}"
    );
    let image = srv.image();
    let _dir = srv.stop().await;
    assert_eq!(
        std::fs::read(&image).unwrap().len(),
        usize::try_from(SIZE).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_contexts_are_negotiated_as_the_spec_says() {
    let srv = Served::start(false, false).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    greet(&mut s).await;
    // STARTTLS on a server without TLS: unsupported, the session goes on.
    send_option(&mut s, proto::OPT_STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut s).await.0, proto::REP_ERR_UNSUP);
    // A context before structured replies: refused.
    send_option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta_payload("d", &[proto::BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(option_reply(&mut s).await.0, proto::REP_ERR_INVALID);
    // LIST with no query names every context; an unknown export is refused.
    send_option(
        &mut s,
        proto::OPT_LIST_META_CONTEXT,
        &meta_payload("d", &[]),
    )
    .await;
    let (kind, payload) = option_reply(&mut s).await;
    assert_eq!(kind, proto::REP_META_CONTEXT);
    assert_eq!(&payload[4..], proto::BASE_ALLOCATION.as_bytes());
    assert_eq!(option_reply(&mut s).await.0, proto::REP_ACK);
    send_option(
        &mut s,
        proto::OPT_LIST_META_CONTEXT,
        &meta_payload("nope", &[]),
    )
    .await;
    assert_eq!(option_reply(&mut s).await.0, proto::REP_ERR_UNKNOWN);
    // Structured replies, but no context: block status is refused.
    send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut s).await.0, proto::REP_ACK);
    send_option(&mut s, proto::OPT_GO, &go_payload("d")).await;
    while option_reply(&mut s).await.0 != proto::REP_ACK {}
    s.write_all(&request(proto::CMD_BLOCK_STATUS, 0, 9, 0, 4096))
        .await
        .unwrap();
    let (_, kind, _, body) = chunk(&mut s).await;
    assert_eq!(kind, proto::REPLY_TYPE_ERROR);
    assert_eq!(
        u32::from_be_bytes(body[..4].try_into().unwrap()),
        proto::EINVAL
    );
    drop(s);
    srv.stop().await;
}

/// A session with structured replies and `base:allocation` on export "d";
/// returns the context id the server chose.
async fn structured_session(s: &mut TcpStream) -> u32 {
    greet(s).await;
    send_option(s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(s).await.0, proto::REP_ACK);
    // A SET picks only the contexts the server knows.
    send_option(
        s,
        proto::OPT_SET_META_CONTEXT,
        &meta_payload("d", &["qemu:dirty-bitmap:x", proto::BASE_ALLOCATION]),
    )
    .await;
    let (kind, payload) = option_reply(s).await;
    assert_eq!(kind, proto::REP_META_CONTEXT);
    assert_eq!(&payload[4..], proto::BASE_ALLOCATION.as_bytes());
    assert_eq!(option_reply(s).await.0, proto::REP_ACK);
    send_option(s, proto::OPT_GO, &go_payload("d")).await;
    while option_reply(s).await.0 != proto::REP_ACK {}
    u32::from_be_bytes(payload[..4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_and_block_status_by_hand() {
    let srv = Served::start(false, false).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let context = structured_session(&mut s).await;

    // A READ is one OFFSET_DATA chunk carrying its offset.
    let (at, _) = DATA[1];
    s.write_all(&request(proto::CMD_READ, 0, 1, at, 4096))
        .await
        .unwrap();
    let (flags, kind, cookie, body) = chunk(&mut s).await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(u64::from_be_bytes(body[..8].try_into().unwrap()), at);
    assert_eq!(&body[8..], &noise(DATA[1].1, 1)[..4096]);
    // A failed READ is an ERROR chunk, never a simple reply.
    s.write_all(&request(proto::CMD_READ, 0, 2, SIZE - 1, 2))
        .await
        .unwrap();
    let (flags, kind, cookie, body) = chunk(&mut s).await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 2)
    );
    assert_eq!(
        u32::from_be_bytes(body[..4].try_into().unwrap()),
        proto::EINVAL
    );

    // Block status of the whole export: holes and data, in order.
    s.write_all(&request(
        proto::CMD_BLOCK_STATUS,
        0,
        3,
        0,
        u32::try_from(SIZE).unwrap(),
    ))
    .await
    .unwrap();
    let (_, kind, cookie, body) = chunk(&mut s).await;
    assert_eq!((kind, cookie), (proto::REPLY_TYPE_BLOCK_STATUS, 3));
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), context);
    let hole = proto::STATE_HOLE | proto::STATE_ZERO;
    let want: Vec<(u32, u32)> = expected_runs()
        .into_iter()
        .map(|(_, len, data)| (u32::try_from(len).unwrap(), if data { 0 } else { hole }))
        .collect();
    assert_eq!(descriptors(&body), want);
    // REQ_ONE: one descriptor, from a start inside the data.
    s.write_all(&request(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        4,
        MIB + 4096,
        u32::try_from(4 * MIB).unwrap(),
    ))
    .await
    .unwrap();
    let (_, _, _, body) = chunk(&mut s).await;
    assert_eq!(
        descriptors(&body),
        vec![(u32::try_from(2 * MIB - 4096).unwrap(), 0)]
    );
    // Zero length: EINVAL.
    s.write_all(&request(proto::CMD_BLOCK_STATUS, 0, 5, 0, 0))
        .await
        .unwrap();
    let (_, kind, cookie, body) = chunk(&mut s).await;
    assert_eq!((kind, cookie), (proto::REPLY_TYPE_ERROR, 5));
    assert_eq!(
        u32::from_be_bytes(body[..4].try_into().unwrap()),
        proto::EINVAL
    );
    // A write still gets a simple reply (the spec allows it) and changes the map.
    let mut write = request(proto::CMD_WRITE, 0, 6, 5 * MIB, 4096);
    write.extend_from_slice(&[0xab; 4096]);
    s.write_all(&write).await.unwrap();
    let mut simple = [0u8; 16];
    s.read_exact(&mut simple).await.unwrap();
    assert_eq!(
        simple,
        proto::simple_reply(0, 6),
        "a write's simple reply, error 0"
    );
    s.write_all(&request(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        7,
        5 * MIB,
        4096,
    ))
    .await
    .unwrap();
    let (_, _, _, body) = chunk(&mut s).await;
    assert_eq!(descriptors(&body), vec![(4096, 0)]);
    s.write_all(&request(proto::CMD_DISC, 0, 8, 0, 0))
        .await
        .unwrap();
    drop(s);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_post_copy_missing_units_are_never_reported_as_holes() {
    // Every unit is still on the source: its holes here hold data there,
    // and a copy that skipped them would lose it.
    let srv = Served::start(false, true).await;
    let out = run("nbdinfo", &["--map", &format!("nbd://{}/d", srv.addr)]).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("hole"), "a missing unit shown as a hole: {t}");
    assert!(t.contains("data"), "{t}");
    srv.stop().await;
}

// --- a hand-written client ---------------------------------------------

async fn greet(s: &mut TcpStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
}

async fn send_option(s: &mut TcpStream, code: u32, payload: &[u8]) {
    let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&code.to_be_bytes());
    o.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    o.extend_from_slice(payload);
    s.write_all(&o).await.unwrap();
}

/// One option reply: (type, payload).
async fn option_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(head[..8].try_into().unwrap()),
        proto::OPTION_REPLY_MAGIC
    );
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (kind, payload)
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut p = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        p.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
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

/// One structured reply chunk: (flags, type, cookie, payload).
async fn chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut head = [0u8; proto::STRUCTURED_HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("a reply within 10 s")
        .unwrap();
    assert_eq!(
        u32::from_be_bytes(head[..4].try_into().unwrap()),
        proto::STRUCTURED_REPLY_MAGIC,
        "a structured reply"
    );
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (
        u16::from_be_bytes(head[4..6].try_into().unwrap()),
        u16::from_be_bytes(head[6..8].try_into().unwrap()),
        u64::from_be_bytes(head[8..16].try_into().unwrap()),
        body,
    )
}

/// The (length, flags) descriptors of a block-status chunk's payload.
fn descriptors(body: &[u8]) -> Vec<(u32, u32)> {
    body[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

/// `tern nbd serve --tls-dir` may listen beyond loopback (TLS is what made
/// that safe) and serves libnbd over `nbds://`; a bad directory, or an
/// agent asked for TLS on NBD without certificates, fails at once and says why.
#[test]
fn tern_nbd_serve_with_tls_listens_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    tern::certs::init(&dir.path().join("pki"), &["dst".into(), "src".into()]).unwrap();
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tern = env!("CARGO_BIN_EXE_tern");
    let mut child = std::process::Command::new(tern)
        .args(["nbd", "serve", "--no-direct", "--image"])
        .arg(&image)
        .args(["--listen", &format!("0.0.0.0:{port}"), "--tls-dir"])
        .arg(dir.path().join("pki/dst"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let uri = format!(
        "nbds://localhost:{port}/tern?tls-certificates={}",
        dir.path().join("pki/src").display()
    );
    let out = nbdinfo_once_listening(&uri);
    child.kill().unwrap();
    let stderr = child.wait_with_output().unwrap().stderr;
    assert!(
        out.status.success(),
        "{}\nserver: {}",
        text(&out),
        String::from_utf8_lossy(&stderr)
    );
    assert!(text(&out).contains("with TLS"), "{}", text(&out));

    let bad = std::process::Command::new(tern)
        .args(["nbd", "serve", "--image"])
        .arg(&image)
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("tern certs init"), "{err}");

    let agent = std::process::Command::new(tern)
        .args(["agent", "--role", "destination", "--nbd-tls", "--image"])
        .arg(&image)
        .args(["--grpc", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(agent.status.code(), Some(1));
    let err = String::from_utf8_lossy(&agent.stderr);
    assert!(
        err.contains("--nbd-tls") && err.contains("--tls-dir"),
        "{err}"
    );
}

/// `nbdinfo URI`, tried until the server listens (5 s at most); the last
/// answer is the verdict.
fn nbdinfo_once_listening(uri: &str) -> Output {
    let mut tries = 0;
    loop {
        let out = std::process::Command::new("nbdinfo")
            .arg(uri)
            .output()
            .expect("nbdinfo runs (`cargo xtask setup` installs libnbd-bin)");
        tries += 1;
        if out.status.success() || tries == 50 {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The destination agent's export with `--nbd-tls`: nbds:// with a
/// certificate of the same authority gets in, plaintext does not.
#[test]
fn the_destination_agent_serves_its_export_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    tern::certs::init(&dir.path().join("pki"), &["dst".into(), "src".into()]).unwrap();
    let nbd = free_port();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "--role", "destination", "--size", "8M", "--image"])
        .arg(dir.path().join("dst.img"))
        .args(["--grpc", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--nbd",
            &format!("127.0.0.1:{nbd}"),
            "--nbd-tls",
            "--tls-dir",
        ])
        .arg(dir.path().join("pki/dst"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = nbdinfo_once_listening(&format!(
        "nbds://localhost:{nbd}/tern?tls-certificates={}",
        dir.path().join("pki/src").display()
    ));
    let plain = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{nbd}/tern"))
        .output()
        .unwrap();
    agent.kill().unwrap();
    let stderr = agent.wait_with_output().unwrap().stderr;
    let t = text(&out);
    assert!(
        out.status.success() && t.contains("with TLS") && t.contains("export-size: 8388608"),
        "{t}\nagent: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        !plain.status.success(),
        "plaintext got in: {}",
        text(&plain)
    );
}

/// A fragmented image (3000 runs of data) needs more descriptors than one
/// reply holds: each reply stops at a run it knows the end of, and
/// `qemu-img map`, asking again, sees every run exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_image_maps_exactly_in_bounded_replies() {
    const RUNS: u64 = 3000;
    const STRIDE: u64 = 16 << 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frag.img");
    let image = Image::open(
        &path,
        &ImageOptions {
            size: Some(RUNS * STRIDE),
            read_only: false,
            direct: false,
            bulk_direct: false,
        },
    )
    .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for i in 0..RUNS {
        file.write_all_at(&[0xa5; 4096], i * STRIDE).unwrap();
    }
    file.sync_all().unwrap();
    let server = Arc::new(NbdServer::new(vec![Export {
        name: "f".into(),
        description: String::new(),
        image,
        read_only: true,
        changes: ImageChanges::default(),
        presence: Presence::default(),
    }]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&server).serve_tcp(listener, cancel.clone()));
    let out = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "raw",
            &format!("nbd://{addr}/f"),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let runs = map_runs(&String::from_utf8_lossy(&out.stdout));
    let data: Vec<(u64, u64)> = runs.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
    let want: Vec<(u64, u64)> = (0..RUNS).map(|i| (i * STRIDE, 4096)).collect();
    assert_eq!(data, want);
    assert!(
        server.stats().snapshot().block_status > 1,
        "more than one reply was needed"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}
