//! Failover when the source host is lost, as root, with real processes: a
//! standby source agent replicates a live writer whose every acknowledged
//! write is logged; the "source host" dies (its agent and writer killed with SIGKILL,
//! the link to the replica's network namespace cut); the replica promotes
//! itself; then the returning source is refused, and `tern failback` brings
//! the data home.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::lab::{KillOnly, Lab, Netns};
use support::migration::{MIB, fill_random, free_port, read_direct, tern};
use support::{LoopDev, sh};

/// The write log's records: 4 KiB at `REGION + slot * 4096`, `SLOTS` slots.
const REGION: u64 = 32 * MIB;
const SLOTS: u64 = 2048;

/// A writer that writes record `seq` (a magic, its number, its slot and a
/// check word, repeated 128 times: a torn write shows as two records mixed)
/// into slot `seq * 1597 mod SLOTS` with `O_DIRECT | O_DSYNC`, and
/// prints `seq unix_ms` once each write returned: the log of acknowledged
/// writes. About 500 writes a second, until killed.
const WRITER: &str = r#"
import mmap, os, struct, sys, time
dev, region, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CHECK = 0x9E3779B97F4A7C15
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
buf = mmap.mmap(-1, 4096)
seq = 0
while True:
    seq += 1
    slot = (seq * 1597) % slots
    rec = struct.pack("<8sQQQ", b"TERNLOG1", seq, slot, (seq * CHECK) % 2**64)
    buf.seek(0)
    buf.write(rec * 128)
    os.pwritev(fd, [buf], region + slot * 4096)
    print(seq, time.time_ns() // 1_000_000, flush=True)
    time.sleep(0.002)
"#;

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms fit u64")
}

/// The record in one slot of an image: `Some(seq)`, `None` for a slot never
/// written; panics on a torn or foreign record.
fn record(image: &[u8], slot: u64) -> Option<u64> {
    let at = usize::try_from(REGION + slot * 4096).expect("offset");
    let rec = &image[at..at + 4096];
    if &rec[..8] != b"TERNLOG1" {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
    let seq = word(8);
    assert!(
        word(16) == slot && word(24) == seq.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        "slot {slot}: a foreign record"
    );
    assert!(
        rec.chunks(32).all(|c| c == &rec[..32]),
        "slot {slot}: a torn record (seq {seq})"
    );
    Some(seq)
}

/// A command run in the replica's namespace (its host).
fn in_ns(ns: &Netns, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_tern")])
        .args(args);
    c
}

/// `tern replica info` of the lab's agent, from inside its namespace.
fn info(ns: &Netns, lab: &Lab) -> serde_json::Value {
    let out = in_ns(
        ns,
        &[
            "replica",
            "info",
            "--to",
            &lab.addr(),
            "--domain",
            "localhost",
        ],
    )
    .arg("--tls-dir")
    .arg(lab.tls())
    .output()
    .expect("tern replica info");
    assert!(
        out.status.success(),
        "tern replica info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("info json")
}

fn source_agent(src: &str, lab: &Lab, tag: &str) -> Child {
    tern()
        .args(["agent", "--role", "source", "--device", src])
        .args(["--peer", &lab.addr(), "--domain", "localhost"])
        .arg("--tls-dir")
        .arg(lab.tls())
        .arg("--state-dir")
        .arg(lab.dir.path().join(format!("state-{tag}")))
        .arg("--trace-out")
        .arg(lab.dir.path().join(format!("{tag}.trace")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source agent")
}

/// The standby's status file, once it has a recovery point.
fn wait_replicating(lab: &Lab, tag: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let out = tern()
            .args(["status", "--json", "--state-dir"])
            .arg(lab.dir.path().join(format!("state-{tag}")))
            .output()
            .expect("tern status");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if v["phase"] == "standby: replicating" && v["consistent_as_of_unix_ms"].as_u64() > Some(0)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never caught up: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The writer's log of acknowledged writes, `(number, unix_ms)` lines on its
/// stdout, read until it dies.
fn read_log(writer: &mut Child) -> std::thread::JoinHandle<Vec<(u64, u64)>> {
    let out = writer.stdout.take().expect("the writer's log");
    std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let (n, ms) = l.split_once(' ')?;
                Some((n.parse::<u64>().ok()?, ms.parse::<u64>().ok()?))
            })
            .collect()
    })
}

/// The lab's promotion, once its agent promoted itself (its export writable).
fn wait_promoted(ns: &Netns, lab: &Lab) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = info(ns, lab);
        // The promotion is recorded a moment before the export turns writable.
        if !v["promotion"].is_null() && v["export_writable"] == true {
            return v["promotion"].clone();
        }
        assert!(Instant::now() < deadline, "never promoted: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An ext4 image whose journal replays (`e2fsck -fy`), then checks clean (`-fn`).
fn assert_clean_after_replay(image: &Path) {
    let replayed = Command::new("e2fsck")
        .arg("-fy")
        .arg(image)
        .output()
        .expect("e2fsck");
    assert!(
        replayed.status.code().is_some_and(|c| c <= 1),
        "e2fsck -fy: {}",
        String::from_utf8_lossy(&replayed.stdout)
    );
    let clean = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck");
    assert!(
        clean.status.success(),
        "e2fsck -fn after the replay: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
}

fn sha(path: &Path) -> String {
    sh(Command::new("sha256sum").arg(path))
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one failover told in order: replicate, die, promote, check, refuse, fail back"
)]
fn a_lost_source_fails_over_with_every_acknowledged_write_and_comes_back_only_by_failback() {
    let ns = Netns::new();
    let src = LoopDev::new("64M");
    fill_random(src.path(), 16);
    let lab = Lab::new_at(64 * MIB, &ns.peer, Some(&ns.name))
        .with_agent_args(&["--failover-after", "3s"]);

    // Replicating a live writer.
    let mut writer = KillOnly(
        Command::new("python3")
            .args([
                "-c",
                WRITER,
                src.path(),
                &REGION.to_string(),
                &SLOTS.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the writer"),
    );
    let log = read_log(&mut writer.0);
    let mut agent = KillOnly(source_agent(src.path(), &lab, "a"));
    wait_replicating(&lab, "a");
    std::thread::sleep(Duration::from_secs(3));

    // The source host dies: its workload and agent killed, its link cut.
    let died = unix_ms();
    let _ = writer.0.kill();
    let _ = agent.0.kill();
    ns.link(false);
    let _ = writer.0.wait();
    let _ = agent.0.wait();
    let acked = log.join().expect("the log's reader");
    assert!(acked.len() > 500, "the writer wrote: {}", acked.len());

    // The replica promotes itself after 3 s of silence.
    let promotion = wait_promoted(&ns, &lab);
    let n = |k: &str| {
        promotion[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {promotion}"))
    };
    // Heartbeats come every second: the silence began up to one before the death.
    let failover_ms = n("promoted_unix_ms") - died;
    let silence_ms = n("promoted_unix_ms") - n("last_heard_unix_ms");
    assert!(
        (3000..6000).contains(&silence_ms) && failover_ms < 6000,
        "promoted {failover_ms} ms after the source died, {silence_ms} ms after it was last heard: {promotion}"
    );
    assert!(
        promotion["reason"]
            .as_str()
            .is_some_and(|r| r.contains("silent")),
        "{promotion}"
    );
    let as_of = n("consistent_as_of_unix_ms");
    assert!(as_of > 0 && as_of <= died, "{promotion}");

    // Every write acknowledged before the recovery point is in the replica,
    // no record is torn, and none is newer than what the writer wrote.
    let image = std::fs::read(lab.image()).expect("read the replica");
    let mut due: HashMap<u64, u64> = HashMap::new();
    for &(seq, _) in acked.iter().filter(|&&(_, ms)| ms < as_of) {
        due.insert((seq * 1597) % SLOTS, seq);
    }
    let newest = acked.last().map_or(0, |&(seq, _)| seq);
    let mut held_after = 0;
    for slot in 0..SLOTS {
        let got = record(&image, slot);
        if let Some(&want) = due.get(&slot) {
            let got = got.unwrap_or_else(|| {
                panic!("slot {slot}: seq {want} acknowledged before the recovery point is missing")
            });
            assert!(
                got >= want,
                "slot {slot}: seq {got} where {want} was acknowledged before the recovery point"
            );
        }
        if let Some(got) = got {
            // The writer may have written one more than it logged.
            assert!(
                got <= newest + 1,
                "slot {slot}: seq {got} was never written"
            );
            held_after += u64::from(due.get(&slot).is_none_or(|&w| got > w));
        }
    }
    let before = acked.iter().filter(|&&(_, ms)| ms < as_of).count();
    let lost = acked
        .iter()
        .filter(|&&(seq, ms)| {
            ms >= as_of && record(&image, (seq * 1597) % SLOTS).is_none_or(|got| got < seq)
        })
        .count();
    eprintln!(
        "FAILOVER failover_ms={failover_ms} rpo_ms={} heard_before_death_ms={} backlog_bytes={} acked={} acked_before_rpo={before} lost_after_rpo={lost} newer_slots={held_after}",
        n("last_heard_unix_ms") - as_of,
        died.saturating_sub(n("last_heard_unix_ms")),
        n("source_backlog_bytes"),
        acked.len(),
    );

    // The promoted replica takes writes on its export.
    let wrote = sh(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "qemu-io",
        "-f",
        "raw",
        &format!("nbd://127.0.0.1:{}/tern", lab.nbd),
        "-c",
        "write -P 0x5a 1M 64k",
    ]));
    assert!(wrote.contains("wrote"), "{wrote}");

    // The source comes back: its agent is refused and touches nothing.
    ns.link(true);
    let disk_before = read_direct(src.path());
    let replica_before = sha(&lab.image());
    let back = source_agent(src.path(), &lab, "b");
    let out = back.wait_with_output().expect("the returning agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the returning source ran: {err}");
    assert!(
        err.contains("promoted") && err.contains("tern failback"),
        "{err}"
    );
    let refused = tern()
        .args(["migrate", "--device", src.path(), "--to", &lab.addr()])
        .args(["--domain", "localhost", "--no-pause"])
        .arg("--tls-dir")
        .arg(lab.tls())
        .arg("--state-dir")
        .arg(lab.dir.path().join("state-m"))
        .arg("--trace-out")
        .arg(lab.dir.path().join("m.trace"))
        .output()
        .expect("tern migrate");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("promoted"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        read_direct(src.path()) == disk_before,
        "the old source's disk was written"
    );
    assert_eq!(sha(&lab.image()), replica_before, "the replica was written");

    // Failback: the old source's disk served by a destination agent on its
    // host, the replica's image migrated home (only what differs), the
    // replica demoted.
    let home = format!("{}:{}", ns.host, free_port());
    let mut home_agent = KillOnly(
        tern()
            .args(["agent", "--role", "destination", "--image", src.path()])
            .args([
                "--grpc",
                &home,
                "--nbd",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .arg("--tls-dir")
            .arg(lab.tls())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent on the old source's disk"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&home).is_err() {
        assert!(Instant::now() < deadline, "the home agent never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = in_ns(
        &ns,
        &[
            "failback",
            "--replica",
            &lab.addr(),
            "--replica-domain",
            "localhost",
        ],
    )
    .args(["--file"])
    .arg(lab.image())
    .args([
        "--to",
        &home,
        "--domain",
        "localhost",
        "--no-pause",
        "--json",
    ])
    .arg("--tls-dir")
    .arg(lab.tls())
    .arg("--state-dir")
    .arg(lab.dir.path().join("state-fb"))
    .arg("--trace-out")
    .arg(lab.dir.path().join("fb.trace"))
    .output()
    .expect("tern failback");
    assert!(
        out.status.success(),
        "tern failback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("report"),
    )
    .expect("report json");
    assert_eq!(report["outcome"], "cut over", "{report}");
    assert_eq!(report["delta_sync"], true, "{report}");
    assert!(
        report["sent_bytes"].as_u64().expect("sent_bytes") < 8 * MIB,
        "only the differences go home: {report}"
    );
    let v = info(&ns, &lab);
    assert!(v["promotion"].is_null(), "demoted: {v}");
    assert_eq!(v["export_writable"], false, "{v}");
    sh(Command::new("kill").args(["-TERM", &home_agent.0.id().to_string()]));
    assert!(home_agent.0.wait().expect("wait").success());
    let home_disk = read_direct(src.path());
    assert!(
        home_disk == std::fs::read(lab.image()).expect("read the replica"),
        "the old source's disk holds the replica's data"
    );
    assert!(
        home_disk[MIB as usize..(MIB + (64 << 10)) as usize]
            .iter()
            .all(|&b| b == 0x5a)
    );
    // The epoch file the home agent kept beside the device.
    let _ = std::fs::remove_file(format!("{}.tern-epoch", src.path()));

    // And the source replicates into the demoted replica again.
    let _again = KillOnly(source_agent(src.path(), &lab, "c"));
    wait_replicating(&lab, "c");
}

#[test]
fn failover_by_hand_is_refused_while_the_source_speaks_and_forced_stops_the_source() {
    let src = LoopDev::new("32M");
    fill_random(src.path(), 4);
    let lab = Lab::new(32 * MIB);
    let mut agent = KillOnly(source_agent(src.path(), &lab, "a"));
    wait_replicating(&lab, "a");
    let failover = |force: bool| {
        let mut c = tern();
        c.args([
            "failover",
            "--to",
            &lab.addr(),
            "--domain",
            "localhost",
            "--json",
        ])
        .arg("--tls-dir")
        .arg(lab.tls());
        if force {
            c.arg("--force");
        }
        c.output().expect("tern failover")
    };
    let refused = failover(false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "promoted a live source's replica"
    );
    assert!(err.contains("alive") && err.contains("--force"), "{err}");

    let forced = failover(true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&forced.stdout).expect("promotion json");
    assert_eq!(p["already"], false, "{p}");
    assert_eq!(p["reason"], "tern failover", "{p}");
    assert!(p["rpo_ms"].is_u64(), "a standby was heard: {p}");
    // The live standby hears of it with its next heartbeat and stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the fenced standby kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.0.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert!(
        err.contains("promoted") && err.contains("untouched"),
        "{err}"
    );
    // Asked again, the replica answers with the same promotion.
    let again: serde_json::Value =
        serde_json::from_slice(&failover(false).stdout).expect("promotion json");
    assert_eq!(again["already"], true, "{again}");
    assert_eq!(again["epoch"], p["epoch"], "{again}");
}

#[test]
fn a_failover_delay_shorter_than_three_heartbeats_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tern()
        .args(["agent", "--role", "destination", "--image"])
        .arg(dir.path().join("dst.img"))
        .args([
            "--size",
            "1M",
            "--grpc",
            "127.0.0.1:0",
            "--failover-after",
            "1s",
        ])
        .output()
        .expect("tern agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--failover-after 1s is shorter than 3s"),
        "{err}"
    );
}

/// A file system on a loop device, unmounted (lazily: a killed writer may
/// still hold it) on drop.
struct Mounted(tempfile::TempDir);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn mount(dev: &str) -> Mounted {
    let dir = tempfile::Builder::new()
        .prefix("tern-fo-mnt")
        .tempdir_in("/var/tmp")
        .expect("mount point");
    sh(Command::new("mount").arg(dev).arg(dir.path()));
    Mounted(dir)
}

#[test]
fn a_failed_over_file_system_is_clean_and_its_database_holds_every_commit_before_the_recovery_point()
 {
    let ns = Netns::new();
    let src = LoopDev::new("64M");
    sh(Command::new("mkfs.ext4").args(["-q", "-F", src.path()]));
    let mnt = mount(src.path());
    let db = mnt.0.path().join("counter.db");
    sh(Command::new("sqlite3")
        .arg(&db)
        .arg("create table t(v integer primary key)"));
    let lab = Lab::new_at(64 * MIB, &ns.peer, Some(&ns.name))
        .with_agent_args(&["--failover-after", "3s"]);
    let mut agent = KillOnly(source_agent(src.path(), &lab, "a"));
    wait_replicating(&lab, "a");
    // Each commit is one sqlite3 process: its insert is durable when the
    // process exits, and only then logged. `synchronous=extra`: in the
    // default rollback-journal mode a commit is the journal's unlink, which
    // only EXTRA makes durable (with FULL, a crash right after can bring the
    // journal back and roll the last commit back: this test saw it once in
    // ~10 runs before it asked for EXTRA).
    let mut writer = KillOnly(
        Command::new("bash")
            .args([
                "-c",
                "i=0; while :; do i=$((i+1)); sqlite3 \"$0\" \"pragma synchronous=extra; insert into t values($i)\" || exit 1; echo \"$i $(date +%s%3N)\"; done",
            ])
            .arg(&db)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the writer"),
    );
    let log = read_log(&mut writer.0);
    std::thread::sleep(Duration::from_secs(4));

    // The source host dies.
    let group = i32::try_from(writer.0.id()).expect("a pid fits i32");
    // SAFETY: kill(2) with a negative pid signals the writer's process
    // group (the shell and its sqlite3), which process_group(0) made.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = agent.0.kill();
    ns.link(false);
    let _ = writer.0.wait();
    let _ = agent.0.wait();
    let commits = log.join().expect("the log's reader");
    assert!(
        commits.len() > 50,
        "the writer committed: {}",
        commits.len()
    );
    let promotion = wait_promoted(&ns, &lab);
    let as_of = promotion["consistent_as_of_unix_ms"]
        .as_u64()
        .expect("a recovery point");
    let due = commits
        .iter()
        .filter(|&&(_, ms)| ms < as_of)
        .map(|&(n, _)| n)
        .max()
        .expect("commits before the recovery point");

    // A copy of the replica, as it was promoted: its journal replays, then
    // it is clean, and the database is whole and holds every commit due.
    let copy = lab.dir.path().join("replica-copy.img");
    std::fs::copy(lab.image(), &copy).expect("copy the replica");
    assert_clean_after_replay(&copy);
    let copy_dev = sh(Command::new("losetup").args(["-f", "--show"]).arg(&copy));
    let replica = mount(&copy_dev);
    let query = |sql: &str| {
        sh(Command::new("sqlite3")
            .arg(replica.0.path().join("counter.db"))
            .arg(sql))
    };
    let integrity = query("pragma integrity_check");
    let max: u64 = query("select max(v) from t").parse().expect("a count");
    let rows: u64 = query("select count(*) from t").parse().expect("a count");
    drop(replica);
    let _ = Command::new("losetup").args(["-d", &copy_dev]).status();
    assert_eq!(integrity, "ok");
    assert!(
        max >= due,
        "commit {due} was durable before the recovery point; the replica's last is {max}"
    );
    assert_eq!(
        rows, max,
        "every commit up to the last, none missing in between"
    );
    eprintln!(
        "FAILOVER-FS commits={} due={due} replica_max={max} lost={} rpo_ms={}",
        commits.len(),
        commits.last().map_or(0, |&(n, _)| n).saturating_sub(max),
        promotion["last_heard_unix_ms"].as_u64().unwrap_or(0) - as_of
    );
}

#[test]
fn a_failover_check_that_does_not_confirm_the_source_down_holds_the_promotion_back() {
    let ns = Netns::new();
    let src = LoopDev::new("32M");
    fill_random(src.path(), 4);
    // The operator's check: "the source's host is down" once this file exists.
    let down = src.dir.path().join("source-is-down");
    let check = format!("test -e {}", down.display());
    let lab = Lab::new_at(32 * MIB, &ns.peer, Some(&ns.name)).with_agent_args(&[
        "--failover-after",
        "3s",
        "--failover-check",
        &check,
    ]);
    let mut agent = KillOnly(source_agent(src.path(), &lab, "a"));
    wait_replicating(&lab, "a");
    // A heartbeat (one a second) carries the recovery point to the replica:
    // without one it is never promoted automatically, check or not.
    std::thread::sleep(Duration::from_secs(3));
    let _ = agent.0.kill();
    ns.link(false);
    let _ = agent.0.wait();
    // Silent for twice --failover-after: the check says no, so no promotion.
    std::thread::sleep(Duration::from_secs(7));
    let v = info(&ns, &lab);
    assert!(
        v["promotion"].is_null() && v["export_writable"] == false,
        "promoted although the check did not confirm the source down: {v}"
    );
    std::fs::write(&down, b"").expect("confirm");
    let promotion = wait_promoted(&ns, &lab);
    let reason = promotion["reason"].as_str().expect("a reason");
    assert!(
        reason.contains("silent") && reason.contains("confirmed it down"),
        "{reason}"
    );
}
