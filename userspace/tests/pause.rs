//! The cutover's pause step against real kernels features and a real QEMU:
//! fsfreeze on ext4 over a loop device, the cgroup v2 freezer, QMP.
//! Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{LoopDev, sh};
use tern::pause::{PauseError, PauseTarget, Qmp};

/// How long a paused workload must show no progress.
const STILL: Duration = Duration::from_millis(300);
/// How long a resumed workload may take to show progress again.
const WAKE: Duration = Duration::from_secs(5);

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shell_loop(script: &str) -> Proc {
    Proc(
        Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .spawn()
            .expect("sh starts"),
    )
}

/// Reads a progress marker; `None` while the file does not exist yet.
type Probe<'a> = &'a dyn Fn() -> Option<String>;

/// Whether the marker stays the same for `STILL`.
async fn stays_still(probe: Probe<'_>) -> bool {
    let before = probe();
    tokio::time::sleep(STILL).await;
    before.is_some() && probe() == before
}

/// Whether the marker changes within `WAKE`.
async fn moves(probe: Probe<'_>) -> bool {
    let before = probe();
    let deadline = Instant::now() + WAKE;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if probe().is_some() && probe() != before {
            return true;
        }
    }
    false
}

// ---- fsfreeze ----

/// ext4 on a loop device mounted in a temporary directory. On drop it thaws
/// (a frozen file system left behind hangs its writers for good), stops the
/// writer, unmounts, and the loop device detaches itself.
struct Ext4Mount {
    writer: Option<Proc>,
    mnt: tempfile::TempDir,
    _dev: LoopDev,
}

impl Ext4Mount {
    fn new() -> Self {
        let dev = LoopDev::new("64M");
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.dev));
        let mnt = tempfile::Builder::new()
            .prefix("tern-pause-mnt")
            .tempdir_in("/var/tmp")
            .expect("mount dir");
        sh(Command::new("mount").arg(&dev.dev).arg(mnt.path()));
        Self {
            writer: None,
            mnt,
            _dev: dev,
        }
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(self.mnt.path())
            .stderr(Stdio::null())
            .status();
        drop(self.writer.take());
        let _ = Command::new("umount").arg(self.mnt.path()).status();
    }
}

#[tokio::test]
async fn fsfreeze_stops_writers_until_resumed_and_on_drop() {
    let mut fs = Ext4Mount::new();
    let file = fs.mnt.path().join("log");
    fs.writer = Some(shell_loop(&format!(
        "while :; do echo 0123456789abcdef >> '{}'; done",
        file.display()
    )));
    let size = || std::fs::metadata(&file).ok().map(|m| m.len().to_string());
    assert!(moves(&size).await, "the writer never started");

    let target = PauseTarget::Fsfreeze(fs.mnt.path().into());
    let paused = target.pause().await.expect("freeze");
    assert!(stays_still(&size).await, "writes went on while frozen");
    assert!(paused.paused_for() >= STILL);
    // A second freeze of the same file system is someone else's: refused.
    let again = target.pause().await.expect_err("already frozen");
    assert!(matches!(again, PauseError::AlreadyFrozen(_)), "{again}");
    paused.resume().await.expect("thaw");
    assert!(moves(&size).await, "writes did not resume after thaw");

    drop(target.pause().await.expect("freeze"));
    assert!(
        moves(&size).await,
        "a dropped Paused left the file system frozen"
    );
}

#[tokio::test]
async fn fsfreeze_refuses_a_plain_directory_inside_a_mount() {
    let fs = Ext4Mount::new();
    let sub = fs.mnt.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let e = PauseTarget::Fsfreeze(sub)
        .pause()
        .await
        .expect_err("not a mount point");
    assert!(e.to_string().contains("not a mount point"), "{e}");
}

// ---- cgroup v2 ----

/// Where cgroup2 is mounted: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts readable");
    mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup2 file system is mounted")
}

/// A fresh cgroup with one looping process in it; thawed, emptied and
/// removed on drop.
struct TestCgroup {
    dir: PathBuf,
    counter: tempfile::NamedTempFile,
    worker: Option<Proc>,
}

impl TestCgroup {
    fn new() -> Self {
        let dir = cgroup2_root().join(format!("tern-test-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("create the test cgroup");
        let counter = tempfile::NamedTempFile::new().expect("counter file");
        let mut cg = Self {
            dir,
            counter,
            worker: None,
        };
        let worker = shell_loop(&format!(
            "i=0; while :; do i=$((i+1)); echo $i > '{}'; done",
            cg.counter.path().display()
        ));
        std::fs::write(cg.dir.join("cgroup.procs"), worker.0.id().to_string())
            .expect("move the worker into the cgroup");
        cg.worker = Some(worker);
        cg
    }

    fn count(&self) -> Option<String> {
        std::fs::read_to_string(self.counter.path()).ok()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        drop(self.worker.take());
        // The cgroup empties once the killed worker is reaped, a moment later.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

#[tokio::test]
async fn cgroup_freeze_stops_the_counter_until_resumed_and_on_drop() {
    let cg = TestCgroup::new();
    let count = || cg.count();
    assert!(moves(&count).await, "the counter never started");

    let target = PauseTarget::Cgroup(cg.dir.clone());
    let paused = target.pause().await.expect("freeze");
    assert!(
        stays_still(&count).await,
        "the counter went on while frozen"
    );
    let again = target.pause().await.expect_err("already frozen");
    assert!(matches!(again, PauseError::AlreadyFrozen(_)), "{again}");
    paused.resume().await.expect("thaw");
    assert!(moves(&count).await, "the counter did not resume");

    drop(target.pause().await.expect("freeze"));
    assert!(
        moves(&count).await,
        "a dropped Paused left the cgroup frozen"
    );

    target.pause().await.expect("freeze").keep();
    assert!(stays_still(&count).await, "keep() did not leave it frozen");
    // The guard thaws it before removing the cgroup.
}

#[tokio::test]
async fn cgroup_refuses_the_root_and_a_v1_hierarchy() {
    let e = PauseTarget::Cgroup(cgroup2_root())
        .pause()
        .await
        .expect_err("root cgroup");
    assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    if Path::new("/sys/fs/cgroup/freezer").is_dir() && cgroup2_root() != Path::new("/sys/fs/cgroup")
    {
        let e = PauseTarget::Cgroup("/sys/fs/cgroup/freezer".into())
            .pause()
            .await
            .expect_err("v1 hierarchy");
        assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    }
}

// ---- QMP ----

/// A diskless QEMU with two QMP monitors: one for the pause under test, one
/// for the test's own view (QEMU serves one client per monitor at a time).
struct Qemu {
    _proc: Proc,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts QEMU and waits until both monitors accept connections.
    async fn start() -> Self {
        let installed = Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed,
            "qemu-system-x86_64 is not installed (cargo xtask setup installs it)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-machine", "none", "-nodefaults", "-display", "none"]);
        for name in ["pause.qmp", "probe.qmp"] {
            qemu.arg("-qmp").arg(format!(
                "unix:{},server=on,wait=off",
                dir.path().join(name).display()
            ));
        }
        let proc = Proc(qemu.stdin(Stdio::null()).spawn().expect("qemu starts"));
        // QEMU creates each socket file when it binds and accepts only after it
        // listens: a connect between the two is refused, so poll with a bare
        // connection (QEMU serves the next client once this one closes).
        let deadline = Instant::now() + Duration::from_secs(10);
        for name in ["pause.qmp", "probe.qmp"] {
            let path = dir.path().join(name);
            while tokio::net::UnixStream::connect(&path).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "QEMU did not accept on its QMP socket {}",
                    path.display()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Self { _proc: proc, dir }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn status(probe: &mut Qmp) -> String {
    let status = probe
        .execute("query-status", None)
        .await
        .expect("query-status");
    status["status"]
        .as_str()
        .expect("status is a string")
        .to_owned()
}

#[tokio::test]
async fn qmp_stop_pauses_the_vm_until_resumed_and_on_drop() {
    let qemu = Qemu::start().await;
    let mut probe = Qmp::connect(&qemu.socket("probe.qmp"))
        .await
        .expect("probe monitor");
    assert_eq!(status(&mut probe).await, "running");

    let target: PauseTarget = format!("qmp:{}", qemu.socket("pause.qmp").display())
        .parse()
        .expect("valid");
    let paused = target.pause().await.expect("stop");
    assert_eq!(status(&mut probe).await, "paused");
    paused.resume().await.expect("cont");
    assert_eq!(status(&mut probe).await, "running");

    // The STOP and RESUME events reached the probe, interleaved with replies.
    let events: Vec<String> = probe
        .take_events()
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .collect();
    assert!(
        events.contains(&"STOP".to_owned()) && events.contains(&"RESUME".to_owned()),
        "{events:?}"
    );

    drop(target.pause().await.expect("stop"));
    assert_eq!(
        status(&mut probe).await,
        "running",
        "a dropped Paused left the VM stopped"
    );

    target.pause().await.expect("stop").keep();
    assert_eq!(status(&mut probe).await, "paused");
    // A VM that is not running is not ours to pause.
    let e = target.pause().await.expect_err("already paused");
    assert!(matches!(e, PauseError::VmState { .. }), "{e}");
}

#[tokio::test]
async fn qmp_errors_carry_qemu_s_description() {
    let qemu = Qemu::start().await;
    let mut qmp = Qmp::connect(&qemu.socket("probe.qmp"))
        .await
        .expect("monitor");
    let e = qmp
        .execute("no-such-command", None)
        .await
        .expect_err("unknown command");
    assert!(
        matches!(&e, PauseError::Qmp { desc, .. } if desc.contains("no-such-command")),
        "{e}"
    );
    // The connection stays usable after an error.
    assert_eq!(status(&mut qmp).await, "running");
}
