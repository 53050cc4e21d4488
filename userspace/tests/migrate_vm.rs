//! `tern migrate --vm qmp:SOCKET@URI` against real QEMUs (TCG, no guest OS:
//! firmware only): every disk the source QEMU has attached and its RAM file
//! are replicated to one destination agent each, with one pause (QEMU's own
//! migration stopped at `pre-switchover`) and one hand-over; the destination
//! QEMU runs from the agents' exports and RAM file. Failures leave the
//! source VM running. Needs root and QEMU (`cargo xtask setup`).

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern::pause::Qmp;

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;
const RAM_MIB: u64 = 64;

/// A child killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

/// A destination agent: gRPC and NBD ports, its image.
struct Agent {
    grpc: u16,
    nbd: u16,
    image: PathBuf,
    _proc: Proc,
}

struct Lab {
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
    source: Proc,
    incoming: u16,
}

impl Lab {
    /// Two raw disks with data and a shared RAM file on the source QEMU, and
    /// one agent per part (the destination QEMU comes with `destination`).
    fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("tern-vm")
            .tempdir_in("/var/tmp")
            .unwrap();
        let p = dir.path();
        let out = tern()
            .args(["certs", "init"])
            .arg(p.join("pki"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        for (name, seed) in [("a.img", 1u8), ("b.img", 2)] {
            let mut data = vec![0u8; usize::try_from(DISK).unwrap()];
            // Data in a few places, holes elsewhere.
            for (i, b) in data[MIB as usize..3 * MIB as usize].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(seed).wrapping_add(seed);
            }
            std::fs::write(p.join(name), &data).unwrap();
        }
        std::fs::File::create(p.join("ram"))
            .unwrap()
            .set_len(RAM_MIB * MIB)
            .unwrap();
        let agents = [("a", DISK), ("b", DISK), ("r", RAM_MIB * MIB)]
            .into_iter()
            .map(|(name, size)| {
                let (grpc, nbd) = (free_port(), free_port());
                let image = p.join(format!("dst-{name}.img"));
                let child = tern()
                    .args(["agent", "--role", "destination", "--image"])
                    .arg(&image)
                    .args(["--size", &size.to_string()])
                    .args(["--grpc", &format!("127.0.0.1:{grpc}")])
                    .args(["--nbd", &format!("127.0.0.1:{nbd}")])
                    .arg("--tls-dir")
                    .arg(p.join("pki/localhost"))
                    .arg("--nbd-advertise-writable")
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                Agent {
                    grpc,
                    nbd,
                    image,
                    _proc: Proc(child),
                }
            })
            .collect::<Vec<_>>();
        for a in &agents {
            wait_port(a.grpc);
            wait_port(a.nbd);
        }
        let source = qemu(
            &p.join("src.qmp"),
            &p.join("ram"),
            &[
                format!(
                    "driver=file,filename={},node-name=f0,cache.direct=on",
                    p.join("a.img").display()
                ),
                "driver=raw,file=f0,node-name=d0".to_owned(),
                format!(
                    "driver=file,filename={},node-name=f1",
                    p.join("b.img").display()
                ),
                "driver=raw,file=f1,node-name=d1".to_owned(),
            ],
            None,
        );
        wait_file(&p.join("src.qmp"));
        Lab {
            dir,
            agents,
            source,
            incoming: free_port(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The destination QEMU: the agents' NBD exports as its disks, the RAM
    /// agent's image as its RAM, waiting for the migration with
    /// `x-ignore-shared` (RAM is Tern's to move).
    async fn destination(&self) -> Proc {
        let p = self.path();
        let nbd = |i: usize, node: &str| {
            format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=tern,node-name={node}",
                self.agents[i].nbd
            )
        };
        let dst = qemu(
            &p.join("dst.qmp"),
            &self.agents[2].image,
            &[nbd(0, "d0"), nbd(1, "d1")],
            Some("defer"),
        );
        wait_file(&p.join("dst.qmp"));
        let mut qmp = connect(&p.join("dst.qmp")).await;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
        )
        .await
        .unwrap();
        qmp.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("tcp:127.0.0.1:{}", self.incoming) })),
        )
        .await
        .unwrap();
        dst
    }

    fn migrate(&self, to: &str) -> Output {
        self.migrate_with(to, &[])
    }

    fn migrate_with(&self, to: &str, extra: &[&str]) -> Output {
        Command::new("timeout")
            .args([
                "-s",
                "KILL",
                "300",
                env!("CARGO_BIN_EXE_tern"),
                "migrate",
                "--vm",
            ])
            .arg(format!(
                "qmp:{}@tcp:127.0.0.1:{}",
                self.path().join("src.qmp").display(),
                self.incoming
            ))
            .args(["--to", to, "--tls-dir"])
            .arg(self.path().join("pki/localhost"))
            .args(["--domain", "localhost", "--json", "--state-dir"])
            .arg(self.path().join("state"))
            // Each part's trace here, as PART.trace.
            .arg("--trace-out")
            .arg(self.path())
            .args(extra)
            .output()
            .unwrap()
    }

    fn to_all(&self) -> String {
        format!(
            "vd0=127.0.0.1:{},vd1=127.0.0.1:{},ram=127.0.0.1:{}",
            self.agents[0].grpc, self.agents[1].grpc, self.agents[2].grpc
        )
    }
}

/// A QEMU (TCG, no guest) with RAM in `ram` and virtio disks on the last
/// node of each pair of `blockdevs` (or each one, for NBD nodes).
fn qemu(qmp: &Path, ram: &Path, blockdevs: &[String], incoming: Option<&str>) -> Proc {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-machine",
        "q35,memory-backend=ram0",
        "-m",
        &RAM_MIB.to_string(),
    ])
    .args(["-object"])
    .arg(format!(
        "memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={},share=on",
        ram.display()
    ))
    .args(["-display", "none", "-qmp"])
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    for b in blockdevs {
        c.args(["-blockdev", b]);
    }
    for (i, node) in ["d0", "d1"].iter().enumerate() {
        c.args(["-device", &format!("virtio-blk-pci,drive={node},id=vd{i}")]);
    }
    if let Some(uri) = incoming {
        c.args(["-incoming", uri]);
    }
    Proc(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 starts (`cargo xtask setup` installs QEMU)"),
    )
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A QMP connection once QEMU accepts one (it binds before it listens).
async fn connect(socket: &Path) -> Qmp {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Qmp::connect(socket).await {
            Ok(q) => return q,
            Err(e) => assert!(
                Instant::now() < deadline,
                "QMP at {}: {e}",
                socket.display()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(socket: &Path) -> String {
    let mut q = connect(socket).await;
    let s = q.execute("query-status", None).await.unwrap();
    s["status"].as_str().unwrap().to_owned()
}

async fn ignore_shared(socket: &Path) -> bool {
    let mut q = connect(socket).await;
    let caps = q.execute("query-migrate-capabilities", None).await.unwrap();
    caps.as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "x-ignore-shared" && c["state"] == true)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_vm_moves_with_one_pause() {
    let lab = Lab::new();
    let _dst = lab.destination().await;
    // The operator's health command checks the VM once, not once per part.
    let checks = lab.path().join("checks");
    let check = format!("echo checked >> {}", checks.display());
    let out = lab.migrate_with(&lab.to_all(), &["--health-cmd", &check]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "cut over", "{report}");
    let parts = report["parts"].as_object().unwrap();
    assert_eq!(
        parts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ram", "vd0", "vd1"]
    );
    for (name, r) in parts {
        assert_eq!(r["outcome"], "cut over", "{name}: {r}");
        // Every part paused at the same moment: one pause of the VM.
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{name}: {r}");
    }
    // The disks are the source's, byte for byte (the source VM is stopped
    // for good); QEMU runs on the destination, the source stays behind.
    for (src, agent) in [("a.img", 0), ("b.img", 1)] {
        assert_eq!(
            std::fs::read(lab.path().join(src)).unwrap(),
            std::fs::read(&lab.agents[agent].image).unwrap(),
            "{src}"
        );
    }
    assert_eq!(std::fs::read_to_string(&checks).unwrap(), "checked\n");
    for part in ["vd0", "vd1", "ram"] {
        let trace = lab.path().join(format!("{part}.trace"));
        assert!(trace.is_file(), "{} was not written", trace.display());
    }
    assert_eq!(status(&lab.path().join("dst.qmp")).await, "running");
    assert_eq!(status(&lab.path().join("src.qmp")).await, "postmigrate");
    drop(lab.source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_cannot_move_keeps_running_on_the_source() {
    let lab = Lab::new();
    // Every part must have an agent; the error names the VM's parts.
    let out = lab.migrate(&format!("vd0=127.0.0.1:{}", lab.agents[0].grpc));
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("vd1") && t.contains("ram"), "{t}");
    // No destination QEMU listening: QEMU's migration fails at the pause;
    // nothing switched, the VM runs on, QEMU's capability put back.
    let out = lab.migrate(&lab.to_all());
    assert!(!out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(report["outcome"], "cut over", "{report}");
    assert!(text(&out).contains("Connection refused"), "{}", text(&out));
    assert_eq!(status(&lab.path().join("src.qmp")).await, "running");
    assert!(!ignore_shared(&lab.path().join("src.qmp")).await);
    // The destination exports are still read-only: nothing switched.
    let probe = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{}/tern", lab.agents[0].nbd),
            "-c",
            "write -P 0x11 0 4k",
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&probe.stdout).contains("wrote"),
        "{}",
        text(&probe)
    );
    drop(lab.source);
}
