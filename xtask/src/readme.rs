//! `cargo xtask readme`: every command of README.md's ```` ```sh ```` blocks,
//! run as written, for real, so that an example cannot drift from the program.
//!
//! "As written" is kept by a sandbox, not by rewriting the commands: they run
//! in a network namespace made for the run, whose `/etc/hosts` maps the
//! README's host names (every `--host` of its `tern certs init`) to loopback
//! addresses, and in a private mount namespace where the README's absolute
//! paths are real:
//!
//! | path | what it is during the run |
//! |---|---|
//! | `/dev` | a tmpfs with the usual nodes, the loop devices and `/dev/vdb` |
//! | `/dev/vdb` | a loop device made for the run (256 MiB), ext4 mounted at `/srv/data` |
//! | `/srv/data` | a live workload: fio random direct reads and writes, and an application writing a memory-mapped file (pid in `/run/app.pid`) |
//! | `/var/lib/vm` | ext4 on a second loop device (tracing `--file` needs a block device under it) |
//! | `/var/lib/vm/disk.img` | a 64 MiB ext4 image with a few files: a VM's disk |
//! | `/run/vm.qmp` | the QMP socket of a running QEMU (TCG, no devices) |
//! | `tcp:dst:4444` | a destination QEMU started with `-incoming tcp:dst:4444` |
//! | `s3://BUCKET/…` | a bucket on Garage in the namespace, with `AWS_*` set for every command |
//! | `/run`, `/tmp`, `/var/tmp` | tmpfs, so nothing a command writes there reaches the host |
//!
//! Commands run in README order, each by `sh -c` in a working directory
//! inside `target/` (so `cargo xtask …` finds the workspace), with
//! `target/debug` first on PATH. A command that serves forever (`tern agent`,
//! `tern nbd serve`, `qemu-system-*`) runs in the background until it listens
//! (or, for a source agent, has connected to its peer); the later commands of
//! its block run against it, and at the block's end it gets SIGTERM and must
//! exit cleanly. `cargo xtask demo` and `cargo xtask test` are run by CI
//! itself and skipped, saying so; nothing else is. A line that cannot run as
//! written (a `...` placeholder, a `[--optional]` bracket, `a|b`
//! alternatives, an open quote) fails the run before anything starts.
//! Everything made is undone on every path, Ctrl-C included.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sh::{self, output, repo_root};

/// The two commands `.ci/run` runs itself: recognised exactly, and skipped.
const RUN_BY_CI: [&str; 2] = ["cargo xtask demo", "cargo xtask test"];

/// `tern agent` and `tern nbd serve` listen here for NBD unless told otherwise.
const DEFAULT_NBD: &str = "127.0.0.1:10809";

// The world the README's commands assume (see the table above).
const DISK: &str = "/dev/vdb";
const DISK_MIB: u64 = 256;
const DATA: &str = "/srv/data";
const VM_DIR: &str = "/var/lib/vm";
const VM_FS_MIB: u64 = 512;
const VM_DISK: &str = "/var/lib/vm/disk.img";
const VM_DISK_SIZE: &str = "64M";
const VM_QMP: &str = "/run/vm.qmp";
const VM_INCOMING: &str = "tcp:dst:4444";
const APP_PIDFILE: &str = "/run/app.pid";
/// Garage's ports inside the namespace (nothing else listens there).
const S3_PORT: u16 = 3900;
const S3_RPC_PORT: u16 = 3901;
const S3_REGION: &str = "garage";
const S3_KEY_ID: &str = "GK0123456789abcdef01234567";
const S3_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// How long one command may run: builds take longer.
fn limit(text: &str) -> Duration {
    if text.starts_with("cargo ") {
        Duration::from_mins(15)
    } else {
        Duration::from_mins(3)
    }
}
/// How long a background command may take to listen, and to exit on SIGTERM.
const READY_LIMIT: Duration = Duration::from_mins(1);
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// One ```` ```sh ```` block of the README.
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    /// Line of the opening fence (1-based).
    pub line: usize,
    pub commands: Vec<Cmd>,
}

/// One command line (continuation lines joined).
#[derive(Debug, PartialEq, Eq)]
pub struct Cmd {
    /// Line where the command starts (1-based).
    pub line: usize,
    pub text: String,
    pub kind: Kind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// `cargo xtask demo` or `cargo xtask test`: CI runs these itself.
    RunByCi,
    /// Serves until stopped: started in the background, ready once these hold.
    Serve(Vec<Probe>),
    /// Runs to completion and must exit 0.
    Run,
}

/// What shows that a background command is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP socket listens on this port.
    Listen(u16),
    /// This unix socket (or file) exists.
    Socket(PathBuf),
    /// A TCP connection to this port is established (a source agent's peer).
    Connected(u16),
}

/// The ```` ```sh ```` blocks of `markdown` and their commands; every line
/// that cannot run as written is an error (all of them are listed).
pub fn blocks(markdown: &str) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut errors = Vec::new();
    let mut lines = markdown.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let is_sh = info.split_whitespace().next() == Some("sh");
        let mut body = Vec::new();
        let mut closed = false;
        for (m, l) in lines.by_ref() {
            if l.trim() == "```" {
                closed = true;
                break;
            }
            body.push((m, l));
        }
        if !closed {
            errors.push(format!("README.md:{n}: the code block is never closed"));
        }
        if is_sh {
            let commands = commands(&body, &mut errors);
            blocks.push(Block { line: n, commands });
        }
    }
    if !errors.is_empty() {
        bail!(
            "README.md has lines that cannot run as written:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(blocks)
}

/// The commands of one block's lines: comments and blank lines skipped,
/// lines ending in `\` joined with the next.
fn commands(body: &[(usize, &str)], errors: &mut Vec<String>) -> Vec<Cmd> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for &(n, raw) in body {
        let line = raw.trim();
        if pending.is_none() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((n, String::new()));
        if !text.is_empty() {
            text.push(' ');
        }
        if let Some(head) = line.strip_suffix('\\') {
            text.push_str(head.trim_end());
            pending = Some((start, text));
            continue;
        }
        text.push_str(line);
        match classify(&text) {
            Ok(kind) => out.push(Cmd {
                line: start,
                text,
                kind,
            }),
            Err(e) => errors.push(format!("README.md:{start}: `{text}`: {e}")),
        }
    }
    if let Some((start, text)) = pending {
        errors.push(format!(
            "README.md:{start}: `{text}`: the last line ends in `\\` with nothing after it"
        ));
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    /// A shell operator: `|`, `&&`, `;`, `>`, `(`, …
    Op(String),
}

const OPERATOR_CHARS: &str = "|&;<>()";

/// Splits a command line as sh would, far enough to classify it: quotes,
/// backslashes, operators and comments. Refuses what only a reader could
/// fill in: placeholders, optional brackets, alternatives.
fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    let end_word = |word: &mut String, in_word: &mut bool, out: &mut Vec<Token>| {
        if *in_word {
            out.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut out),
            '#' if !in_word => break,
            '\'' => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or("a single quote is never closed")?;
                word.extend(&chars[i + 1..i + 1 + close]);
                in_word = true;
                i += close + 1;
            }
            '"' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("a double quote is never closed".into()),
                        Some('"') => break,
                        Some('\\') if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            word.push(chars[i + 1]);
                            i += 2;
                        }
                        Some(&c) => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
                in_word = true;
            }
            '\\' => {
                if let Some(&next) = chars.get(i + 1) {
                    word.push(next);
                    i += 1;
                }
                in_word = true;
            }
            c if OPERATOR_CHARS.contains(c) => {
                let glued = |j: Option<usize>| {
                    j.and_then(|j| chars.get(j))
                        .is_some_and(|c| !c.is_whitespace() && !OPERATOR_CHARS.contains(*c))
                };
                if c == '|' && glued(i.checked_sub(1)) && glued(Some(i + 1)) {
                    return Err(
                        "`a|b` reads as alternatives: put each variant on its own line".into(),
                    );
                }
                end_word(&mut word, &mut in_word, &mut out);
                let len = chars[i..]
                    .iter()
                    .take_while(|c| OPERATOR_CHARS.contains(**c))
                    .count();
                out.push(Token::Op(chars[i..i + len].iter().collect()));
                i += len - 1;
            }
            '.' if chars[i..].starts_with(&['.', '.', '.']) => {
                return Err("`...` is a placeholder: write the real arguments".into());
            }
            '…' => return Err("`…` is a placeholder: write the real arguments".into()),
            '[' if !in_word && chars.get(i + 1) == Some(&'-') => {
                return Err(
                    "an optional `[--flag]` in brackets: put the variant on its own line".into(),
                );
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
        i += 1;
    }
    end_word(&mut word, &mut in_word, &mut out);
    Ok(out)
}

/// What to do with one command line.
fn classify(text: &str) -> Result<Kind, String> {
    let tokens = tokens(text)?;
    let words: Vec<&str> = tokens
        .iter()
        .map_while(|t| match t {
            Token::Word(w) => Some(w.as_str()),
            Token::Op(_) => None,
        })
        .collect();
    let simple = words.len() == tokens.len();
    if words.is_empty() {
        return Err("no command".into());
    }
    if simple && RUN_BY_CI.contains(&words.join(" ").as_str()) {
        return Ok(Kind::RunByCi);
    }
    let serves = matches!(
        words[..],
        ["tern", "agent", ..] | ["tern", "nbd", "serve", ..]
    ) || (words[0].starts_with("qemu-system-") && !words.contains(&"-daemonize"));
    if !serves {
        return Ok(Kind::Run);
    }
    if !simple {
        return Err(
            "a command that serves until stopped must stand alone (no pipe, redirection or `&`)"
                .into(),
        );
    }
    probes(&words).map(Kind::Serve)
}

/// The value of `--name VALUE` / `--name=VALUE` (or QEMU's `-name VALUE`).
fn flag<'a>(words: &[&'a str], name: &str) -> Option<&'a str> {
    words.iter().enumerate().find_map(|(i, w)| {
        if *w == name {
            words.get(i + 1).copied()
        } else {
            w.strip_prefix(name).and_then(|r| r.strip_prefix('='))
        }
    })
}

fn port_of(addr: &str) -> Result<u16, String> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("no port in {addr:?}"))
}

/// `HOST:PORT` or `unix:/path`, as Tern's listen flags take them.
fn listen_probe(addr: &str) -> Result<Probe, String> {
    match addr.strip_prefix("unix:") {
        Some(path) => Ok(Probe::Socket(PathBuf::from(path))),
        None => port_of(addr).map(Probe::Listen),
    }
}

/// What shows that a serving command is ready, from its own arguments.
fn probes(words: &[&str]) -> Result<Vec<Probe>, String> {
    let listen = |name: &str, default: Option<&str>| -> Result<Option<Probe>, String> {
        flag(words, name).or(default).map(listen_probe).transpose()
    };
    let mut probes = Vec::new();
    match words {
        ["tern", "agent", ..] => match flag(words, "--role") {
            Some("destination") => {
                probes.extend(listen("--grpc", None)?);
                probes.extend(listen("--nbd", Some(DEFAULT_NBD))?);
                probes.extend(listen("--metrics", None)?);
            }
            Some("source") => {
                probes.extend(listen("--control", None)?);
                probes.extend(listen("--metrics", None)?);
                let peer = flag(words, "--peer")
                    .or_else(|| flag(words, "--to"))
                    .ok_or("a source agent needs --peer HOST:PORT")?;
                probes.push(Probe::Connected(port_of(peer)?));
            }
            _ => return Err("`tern agent` needs --role destination or --role source".into()),
        },
        ["tern", "nbd", "serve", ..] => probes.extend(listen("--listen", Some(DEFAULT_NBD))?),
        _ => {
            if let Some(qmp) = flag(words, "-qmp") {
                let addr = qmp.split(',').next().unwrap_or(qmp);
                match addr.strip_prefix("tcp:") {
                    Some(tcp) => probes.push(Probe::Listen(port_of(tcp)?)),
                    None => probes.push(listen_probe(addr)?),
                }
            }
            if let Some(tcp) = flag(words, "-incoming").and_then(|u| u.strip_prefix("tcp:")) {
                probes.push(Probe::Listen(port_of(tcp)?));
            }
        }
    }
    if probes.is_empty() {
        return Err(
            "cannot tell when it is ready: give QEMU `-qmp unix:PATH,server=on,wait=off`".into(),
        );
    }
    Ok(probes)
}

/// The host names the README's commands use: every `--host` of its
/// `tern certs init` (a host without a certificate could not be reached).
pub fn host_names(blocks: &[Block]) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    for cmd in blocks.iter().flat_map(|b| &b.commands) {
        let Ok(tokens) = tokens(&cmd.text) else {
            continue;
        };
        let words: Vec<&str> = tokens
            .iter()
            .filter_map(|t| match t {
                Token::Word(w) => Some(w.as_str()),
                Token::Op(_) => None,
            })
            .collect();
        if !words.starts_with(&["tern", "certs", "init"]) {
            continue;
        }
        for (i, w) in words.iter().enumerate() {
            let host = match w.strip_prefix("--host") {
                Some("") => words.get(i + 1).copied(),
                Some(rest) => rest.strip_prefix('='),
                None => None,
            };
            if let Some(h) = host
                && !hosts.iter().any(|x| x == h)
            {
                hosts.push(h.to_owned());
            }
        }
    }
    hosts
}

/// The buckets of every `s3://BUCKET/…` the README names.
pub fn buckets(markdown: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (at, _) in markdown.match_indices("s3://") {
        let name: String = markdown[at + 5..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .collect();
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The `/etc/hosts` of the namespace: `localhost` and this machine's name,
/// then each README host at its own loopback address.
fn hosts_file(hosts: &[String], hostname: &str) -> String {
    let own = format!("127.0.0.1 localhost {hostname}\n::1 localhost ip6-localhost\n");
    let named = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("127.0.0.{} {h}\n", i + 2));
    std::iter::once(own).chain(named).collect()
}

/// One socket of `/proc/PID/net/tcp` or `tcp6`.
#[derive(Debug, PartialEq, Eq)]
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    state: u8,
}
const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

fn tcp_sockets(table: &str) -> Vec<TcpSocket> {
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpSocket {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (or SIGTERM) must not kill the harness before it has undone the
/// sandbox (a frozen file system left behind hangs its writers for good): it
/// only raises a flag the waiting loops check. A handler, unlike `SIG_IGN`, is
/// reset to the default in every child at exec.
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is
        // async-signal-safe; `signal` has no other precondition.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sends `sig` to a child's whole process group (each is its own leader).
fn signal_group(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the group of a child we have not reaped yet, so its
    // pid (the group id) cannot have been reused.
    unsafe { libc::kill(-(child.id() as i32), sig) };
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; callers pass pids
    // of processes they started or found in the sandbox's namespaces.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits for `child` up to `limit`; `None` if it is still running.
fn wait_for(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a log file, indented.
fn tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .flat_map(|l| ["    ", l, "\n"])
        .collect()
}

/// A background command of the current block.
struct Server {
    line: usize,
    text: String,
    child: Child,
    log: PathBuf,
}

/// The namespaces, devices, mounts and processes of one run; undone on drop.
struct Sandbox {
    /// `target/readme`: backing images, logs, Garage's data, the work directory.
    dir: PathBuf,
    /// Where the README's commands run.
    work: PathBuf,
    logs: PathBuf,
    netns: Option<String>,
    loops: Vec<String>,
    /// Directories made on the host (mount points), removed at the end if empty.
    made_dirs: Vec<PathBuf>,
    /// A process that keeps the namespaces alive; everything enters through it.
    holder: Option<Child>,
    /// `mnt` and `net` namespace links of the holder: a process in either is ours.
    ns_ids: Vec<PathBuf>,
    /// The workload, the VMs, Garage: stopped after the last block.
    world: Vec<(&'static str, Child)>,
    servers: Vec<Server>,
    /// PATH and `AWS_*` for every command.
    env: Vec<(String, OsString)>,
    succeeded: bool,
}

pub fn run(tern: &Path) -> Result<()> {
    sh::require_root("cargo xtask readme (namespaces, loop devices, eBPF)")?;
    let readme = repo_root().join("README.md");
    let markdown = std::fs::read_to_string(&readme)
        .with_context(|| format!("cannot read {}", readme.display()))?;
    let blocks = blocks(&markdown)?;
    let hosts = host_names(&blocks);
    let buckets = buckets(&markdown);
    let total = blocks.iter().map(|b| b.commands.len()).sum::<usize>();
    eprintln!(
        "readme: {total} commands in {} sh blocks of README.md; hosts {hosts:?} on loopback",
        blocks.len()
    );
    catch_interrupts();
    let started = Instant::now();
    let mut sandbox = Sandbox::start(tern, &hosts, &buckets)?;
    eprintln!(
        "readme: sandbox ready in {:.1} s (netns {}, work dir {})",
        started.elapsed().as_secs_f64(),
        sandbox.netns.as_deref().unwrap_or("?"),
        sandbox.work.display()
    );
    let (mut ran, mut skipped) = (0, 0);
    for block in &blocks {
        eprintln!("readme: block at README.md:{}", block.line);
        for cmd in &block.commands {
            check_interrupt()?;
            match &cmd.kind {
                Kind::RunByCi => {
                    eprintln!(
                        "readme:   skipped `{}`: CI runs it itself (.ci/run)",
                        cmd.text
                    );
                    skipped += 1;
                }
                Kind::Serve(probes) => {
                    sandbox.serve(cmd, probes)?;
                    ran += 1;
                }
                Kind::Run => {
                    sandbox.run(cmd)?;
                    ran += 1;
                }
            }
        }
        sandbox.stop_servers()?;
    }
    sandbox.succeeded = true;
    drop(sandbox);
    eprintln!(
        "readme: all {ran} commands of README.md ran as written ({skipped} skipped: run by CI itself) in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What a run killed outright (SIGKILL) left: processes in the namespaces
/// of a run that is gone (thawed first), those namespaces, and loop devices
/// on its images.
fn clear_leftovers(dir: &Path) {
    let list = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("tern-readme-") else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        eprintln!("readme: clearing {name}, left by a run that was killed");
        let pids = output(Command::new("ip").args(["netns", "pids", name])).unwrap_or_default();
        let pids: Vec<u32> = pids.lines().filter_map(|p| p.trim().parse().ok()).collect();
        if let Some(pid) = pids.first() {
            let _ = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-m", "--", "fsfreeze", "-u", DATA])
                .stderr(Stdio::null())
                .status();
        }
        for pid in pids {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = output(Command::new("ip").args(["netns", "del", name]));
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
    for image in ["vdb.img", "vm-fs.img"] {
        let image = dir.join(image);
        if !image.exists() {
            continue;
        }
        let attached = output(Command::new("losetup").arg("-j").arg(&image)).unwrap_or_default();
        for dev in attached.lines().filter_map(|l| l.split(':').next()) {
            let _ = output(Command::new("losetup").args(["-d", dev]));
        }
    }
}

impl Sandbox {
    fn start(tern: &Path, hosts: &[String], buckets: &[String]) -> Result<Sandbox> {
        let dir = repo_root().join("target/readme");
        clear_leftovers(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let (work, logs) = (dir.join("work"), dir.join("logs"));
        for d in [&work, &logs] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let bin = tern
            .parent()
            .context("the tern binary has no directory")?
            .to_path_buf();
        let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))?;
        let mut s = Sandbox {
            dir,
            work,
            logs,
            netns: None,
            loops: Vec::new(),
            made_dirs: Vec::new(),
            holder: None,
            ns_ids: Vec::new(),
            world: Vec::new(),
            servers: Vec::new(),
            env: vec![("PATH".into(), path)],
            succeeded: false,
        };
        s.make_netns(hosts)?;
        let (disk, vm_fs) = s.make_disks()?;
        s.enter()?;
        s.mount(&disk, &vm_fs)?;
        s.start_world(buckets)?;
        Ok(s)
    }

    fn make_netns(&mut self, hosts: &[String]) -> Result<()> {
        let name = format!("tern-readme-{}", std::process::id());
        output(Command::new("ip").args(["netns", "add", &name]))?;
        self.netns = Some(name.clone());
        output(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        // `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts.
        let etc = PathBuf::from("/etc/netns").join(&name);
        self.make_dir(Path::new("/etc/netns"))?;
        std::fs::create_dir_all(&etc)?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_else(|_| "localhost".into());
        std::fs::write(etc.join("hosts"), hosts_file(hosts, hostname.trim()))?;
        Ok(())
    }

    /// The source disk and the VM file system: loop devices with ext4.
    fn make_disks(&mut self) -> Result<(String, String)> {
        let mut devs = Vec::new();
        for (name, mib) in [("vdb.img", DISK_MIB), ("vm-fs.img", VM_FS_MIB)] {
            let image = self.dir.join(name);
            File::create(&image)?.set_len(mib << 20)?;
            let dev = output(Command::new("losetup").args(["-f", "--show"]).arg(&image))?
                .trim()
                .to_owned();
            self.loops.push(dev.clone());
            output(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
            devs.push(dev);
        }
        Ok((devs[0].clone(), devs[1].clone()))
    }

    /// Makes a directory on the host unless it is there, remembering it.
    fn make_dir(&mut self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            self.made_dirs.push(dir.to_path_buf());
        }
        Ok(())
    }

    /// Starts the holder: a process in the network namespace and, through
    /// `ip netns exec`, a private mount namespace. It dies with the harness.
    fn enter(&mut self) -> Result<()> {
        let ns = self.netns.clone().context("no netns")?;
        let holder = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "ip", "netns", "exec", &ns])
            .args(["sleep", "infinity"])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start the namespace holder (setpriv, ip netns exec)")?;
        let pid = holder.id();
        self.holder = Some(holder);
        let own = std::fs::read_link("/proc/self/ns/mnt")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // `ip netns exec` unshares the mount namespace, then execs sleep.
        while std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .as_ref()
            == Some(&own)
            || std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| !e.ends_with("sleep"))
        {
            if Instant::now() > deadline {
                bail!(
                    "the namespace holder has no private mount namespace after 10 s \
                     (`ip netns exec` should have made one)"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for ns in ["mnt", "net"] {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))?;
            // The sweep at the end kills every process in these: never ours.
            if link == std::fs::read_link(format!("/proc/self/ns/{ns}"))? {
                bail!("the namespace holder shares this process's {ns} namespace");
            }
            self.ns_ids.push(link);
        }
        Ok(())
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().map_or(0, Child::id)
    }

    /// `program` inside the sandbox's namespaces, with the run's environment.
    fn ns(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder_pid().to_string(), "-m", "-n", "--"])
            .arg(program)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    fn ns_sh(&self, script: &str) -> Result<String> {
        output(self.ns("sh").args(["-c", script]))
    }

    /// A path as the sandbox sees it, reachable from the host.
    fn inside(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder_pid())).join(rel)
    }

    fn mount(&mut self, disk: &str, vm_fs: &str) -> Result<()> {
        let rdev = |dev: &str| -> Result<(u32, u32)> {
            let r = std::fs::metadata(dev)?.rdev();
            Ok((libc::major(r), libc::minor(r)))
        };
        let (disk_major, disk_minor) = rdev(disk)?;
        // Nodes for every loop device there is and some to spare, so that a
        // command which makes its own (`losetup -f`) finds its node.
        let most = std::fs::read_dir("/sys/block")?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("loop")?
                    .parse::<u32>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let loops = (most + 32).max(63);
        self.make_dir(Path::new(VM_DIR))?;
        // The workspace (the binaries on PATH, the commands' files) may live
        // under a directory the sandbox covers with a tmpfs (a clone in
        // /var/tmp, as CI may make): held aside before, put back after.
        let root = repo_root();
        let root = root.display();
        // `ip netns exec` already made `/` a slave; said again so that no
        // mount below can ever reach the host's namespace.
        let script = format!(
            r#"set -e
mount --make-rslave /
mount -t tmpfs -o mode=755,size=16m tern-dev /dev
for n in "null c 1 3" "zero c 1 5" "full c 1 7" "random c 1 8" "urandom c 1 9" "tty c 5 0" "loop-control c 10 237"; do
  set -- $n; mknod -m 666 /dev/$1 $2 $3 $4
done
i=0; while [ $i -le {loops} ]; do mknod -m 660 /dev/loop$i b 7 $i; i=$((i+1)); done
mknod -m 660 {DISK} b {disk_major} {disk_minor}
mkdir /dev/tern-workspace
mount --bind '{root}' /dev/tern-workspace
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts; ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 tern-shm /dev/shm
mount -t tmpfs -o mode=755 tern-run /run
mkdir /run/lock
mount -t tmpfs -o mode=1777 tern-tmp /tmp
mount -t tmpfs -o mode=1777 tern-var-tmp /var/tmp
mount -t tmpfs -o mode=755 tern-srv /srv
if [ ! -e '{root}/Cargo.toml' ]; then mkdir -p '{root}'; mount --bind /dev/tern-workspace '{root}'; fi
mkdir {DATA}
mount {DISK} {DATA}
mount {vm_fs} {VM_DIR}
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
"#
        );
        self.ns_sh(&script)
            .context("cannot set up the sandbox's mounts")?;
        Ok(())
    }

    fn log_file(&self, name: &str) -> Result<(PathBuf, File)> {
        let path = self.logs.join(name);
        let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok((path, f))
    }

    /// Starts a world process in its own process group, logging to `name`.
    fn spawn_world(&mut self, name: &'static str, cmd: &mut Command) -> Result<PathBuf> {
        let (log, f) = self.log_file(&format!("world-{name}.log"))?;
        let child = cmd
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        self.world.push((name, child));
        Ok(log)
    }

    /// Fails if the last world process exited at once.
    fn check_started(&mut self, log: &Path) -> Result<()> {
        std::thread::sleep(Duration::from_millis(200));
        let (name, child) = self.world.last_mut().context("no world process")?;
        if let Some(status) = child.try_wait()? {
            bail!("the {name} exited ({status}):\n{}", tail(log, 20));
        }
        Ok(())
    }

    /// Waits until the last world process is ready.
    fn wait_world(&mut self, probes: &[Probe], log: &Path) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            check_interrupt()?;
            if probes.iter().all(|p| self.ready(p)) {
                return Ok(());
            }
            let (name, child) = self.world.last_mut().context("no world process")?;
            if let Some(status) = child.try_wait()? {
                bail!("the {name} exited ({status}):\n{}", tail(log, 20));
            }
            if Instant::now() > deadline {
                bail!(
                    "the {name} was not ready within {READY_LIMIT:?}:\n{}",
                    tail(log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The workload, the VM's disk, the VMs and the object store.
    fn start_world(&mut self, buckets: &[String]) -> Result<()> {
        // A VM's disk: a small ext4 image with a few files.
        let seed = self.dir.join("seed");
        std::fs::create_dir_all(&seed)?;
        std::fs::write(
            seed.join("hello.txt"),
            "a VM's disk, migrated by the README\n",
        )?;
        let mut blob = vec![0; 4 << 20];
        File::open("/dev/urandom")?.read_exact(&mut blob)?;
        std::fs::write(seed.join("blob"), blob)?;
        output(
            self.ns("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&seed)
                .args([VM_DISK, VM_DISK_SIZE]),
        )?;

        // The live workload on /srv/data: random direct reads and writes (the
        // block I/O a device trace sees), and the application, which keeps its
        // data in a memory-mapped file and msyncs it. An msync cleans the
        // pages, so the next store to each faults again: the faults a `--pid`
        // trace records go on for as long as it runs (a database that reads
        // through mmap and writes with write(2), sqlite3's way, stops faulting
        // once its file is mapped, and a `--faults` heatmap would be empty).
        // Rates are low: it must not fill the disk.
        let fio = format!(
            "--name=workload --directory={DATA} --rw=randrw --rwmixread=50 --bs=4k --size=16M \
             --ioengine=psync --direct=1 --fsync=8 --rate_iops=100 --time_based --runtime=24h --thread"
        );
        let log = self.spawn_world("fio workload", self.ns("fio").args(fio.split(' ')))?;
        self.check_started(&log)?;
        let app = format!(
            "--name=app --filename={DATA}/app.map --rw=randrw --rwmixread=50 --bs=4k --size=8M \
             --ioengine=mmap --fsync=4 --rate_iops=50 --time_based --runtime=24h --thread"
        );
        let log = self.spawn_world("application", self.ns("fio").args(app.split(' ')))?;
        self.check_started(&log)?;
        // nsenter execs fio, and --thread keeps the job in that process: the
        // child's pid is the application's.
        let pid = self.world.last().context("application")?.1.id();
        std::fs::write(self.inside(Path::new(APP_PIDFILE)), format!("{pid}\n"))?;

        // A VM on the source, and a destination QEMU waiting for its migration.
        // Without -accel QEMU uses TCG, which is what works here.
        let vm = [
            "-machine",
            "q35",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
        ];
        let qmp = format!("unix:{VM_QMP},server=on,wait=off");
        let log = self.spawn_world(
            "source VM",
            self.ns("qemu-system-x86_64").args(vm).args(["-qmp", &qmp]),
        )?;
        self.wait_world(&[Probe::Socket(VM_QMP.into())], &log)?;
        let log = self.spawn_world(
            "destination QEMU",
            self.ns("qemu-system-x86_64")
                .args(vm)
                .args(["-incoming", VM_INCOMING]),
        )?;
        let incoming = port_of(VM_INCOMING).map_err(anyhow::Error::msg)?;
        self.wait_world(&[Probe::Listen(incoming)], &log)?;

        if !buckets.is_empty() {
            self.start_garage(buckets)?;
        }
        Ok(())
    }

    /// Garage, single node on the namespace's loopback, with one key that
    /// may use every bucket the README names; `AWS_*` point every command at it.
    fn start_garage(&mut self, buckets: &[String]) -> Result<()> {
        let garage = crate::garage::find().context(
            "garage is not installed: run `cargo xtask setup` (the README's s3:// examples use it)",
        )?;
        let dir = self.dir.join("garage");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            crate::garage::config(&dir, S3_RPC_PORT, S3_PORT, S3_REGION, S3_SECRET),
        )?;
        let bin = garage.display().to_string();
        let log = self.spawn_world(
            "S3 server (Garage)",
            self.ns(&bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=warn"),
        )?;
        self.wait_world(&[Probe::Listen(S3_PORT)], &log)?;
        let cli = |args: &[&str]| {
            crate::garage::cli_retried(|| self.ns("timeout"), &garage, &config, args)
        };
        crate::garage::bootstrap(cli, S3_KEY_ID, S3_SECRET, "readme", buckets)?;
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", S3_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_owned()),
            ("AWS_REGION", S3_REGION.to_owned()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{S3_PORT}")),
        ] {
            self.env.push((k.into(), v.into()));
        }
        Ok(())
    }

    fn ready(&self, probe: &Probe) -> bool {
        let sockets = || {
            ["tcp", "tcp6"]
                .iter()
                .filter_map(|t| {
                    std::fs::read_to_string(format!("/proc/{}/net/{t}", self.holder_pid())).ok()
                })
                .flat_map(|text| tcp_sockets(&text))
                .collect::<Vec<_>>()
        };
        match probe {
            Probe::Listen(port) => sockets()
                .iter()
                .any(|s| s.state == TCP_LISTEN && s.local_port == *port),
            Probe::Connected(port) => sockets()
                .iter()
                .any(|s| s.state == TCP_ESTABLISHED && s.remote_port == *port),
            Probe::Socket(path) => self.inside(path).exists(),
        }
    }

    /// `sh -c TEXT` in the work directory, inside the namespaces.
    fn command(&self, text: &str, name: &str) -> Result<(Child, PathBuf, PathBuf)> {
        let (out_path, out) = self.log_file(&format!("{name}.out"))?;
        let (err_path, err) = self.log_file(&format!("{name}.err"))?;
        // `env -C` changes directory after nsenter has entered the mount
        // namespace (nsenter's own --wd keeps a directory of the host's, and
        // a path through it is another mount: rename(2) across them fails).
        let child = self
            .ns("env")
            .arg("-C")
            .arg(&self.work)
            .args(["sh", "-c", text])
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{text}`"))?;
        Ok((child, out_path, err_path))
    }

    fn run(&mut self, cmd: &Cmd) -> Result<()> {
        eprintln!("readme:   $ {}", cmd.text);
        let t0 = Instant::now();
        let (mut child, out, err) = self.command(&cmd.text, &format!("L{}", cmd.line))?;
        let limit = limit(&cmd.text);
        let deadline = t0 + limit;
        let status = loop {
            if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() > deadline {
                signal_group(&child, libc::SIGTERM);
                if wait_for(&mut child, Duration::from_secs(5))?.is_none() {
                    signal_group(&child, libc::SIGKILL);
                    child.wait()?;
                }
                check_interrupt()?;
                bail!(
                    "README.md:{}: `{}` did not finish within {limit:?}\nstderr:\n{}",
                    cmd.line,
                    cmd.text,
                    tail(&err, 40)
                );
            }
            if let Some(status) = wait_for(&mut child, Duration::from_millis(100))? {
                break status;
            }
        };
        if !status.success() {
            let mut stderr = tail(&err, 40);
            if stderr.is_empty() {
                stderr = format!("    (empty; stdout:)\n{}", tail(&out, 20));
            }
            bail!(
                "README.md:{}: `{}` failed: {status}\nstderr:\n{stderr}",
                cmd.line,
                cmd.text
            );
        }
        eprintln!("readme:     ok in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn serve(&mut self, cmd: &Cmd, probes: &[Probe]) -> Result<()> {
        eprintln!("readme:   $ {}   (in the background)", cmd.text);
        let t0 = Instant::now();
        // `exec`: the child is then the server itself, so SIGTERM reaches it
        // and its exit status is its own.
        let (child, _, err) =
            self.command(&format!("exec {}", cmd.text), &format!("L{}", cmd.line))?;
        self.servers.push(Server {
            line: cmd.line,
            text: cmd.text.clone(),
            child,
            log: err,
        });
        let deadline = t0 + READY_LIMIT;
        loop {
            check_interrupt()?;
            if probes.iter().all(|p| self.ready(p)) {
                break;
            }
            let server = self.servers.last_mut().context("the server")?;
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "README.md:{}: `{}` exited ({status}) instead of serving\nstderr:\n{}",
                    cmd.line,
                    cmd.text,
                    tail(&server.log, 40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "README.md:{}: `{}` was not ready ({probes:?}) within {READY_LIMIT:?}\nstderr:\n{}",
                    cmd.line,
                    cmd.text,
                    tail(&server.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("readme:     ready in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// SIGTERM to the block's background commands, last started first (a
    /// client before its server); each must exit cleanly.
    fn stop_servers(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        while let Some(mut s) = self.servers.pop() {
            signal(s.child.id(), libc::SIGTERM);
            let status = wait_for(&mut s.child, STOP_LIMIT)?;
            match status {
                Some(status) if status.success() => {
                    eprintln!("readme:   stopped `{}` (SIGTERM): exited cleanly", s.text);
                }
                Some(status) => failures.push(format!(
                    "README.md:{}: `{}` did not exit cleanly on SIGTERM: {status}\nstderr:\n{}",
                    s.line,
                    s.text,
                    tail(&s.log, 40)
                )),
                None => {
                    signal_group(&s.child, libc::SIGKILL);
                    let _ = s.child.wait();
                    failures.push(format!(
                        "README.md:{}: `{}` did not exit within {STOP_LIMIT:?} of SIGTERM",
                        s.line, s.text
                    ));
                }
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n"));
        }
        Ok(())
    }

    /// Pids of every process in the sandbox's namespaces but the holder.
    fn stragglers(&self) -> Vec<u32> {
        let holder = self.holder_pid();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != holder && pid != std::process::id())
            .filter(|pid| {
                ["mnt", "net"].iter().any(|ns| {
                    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                        .is_ok_and(|l| self.ns_ids.contains(&l))
                })
            })
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Background commands first (a failed block leaves them running).
        for s in self.servers.iter_mut().rev() {
            signal(s.child.id(), libc::SIGTERM);
            if wait_for(&mut s.child, Duration::from_secs(10))
                .ok()
                .flatten()
                .is_none()
            {
                signal_group(&s.child, libc::SIGKILL);
                let _ = s.child.wait();
            }
        }
        if self.holder.is_some() {
            // A frozen file system must be thawed before anything else: its
            // writers cannot even be killed while it is frozen.
            let _ = self
                .ns("fsfreeze")
                .args(["-u", DATA])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for (_, child) in self.world.iter_mut().rev() {
            signal_group(child, libc::SIGKILL);
            let _ = child.wait();
        }
        if self.holder.is_some() {
            // Whatever a command left behind in the namespaces (its children).
            for _ in 0..50 {
                let left = self.stragglers();
                if left.is_empty() {
                    break;
                }
                for pid in left {
                    signal(pid, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            for m in [VM_DIR, DATA] {
                if let Err(e) = output(self.ns("umount").arg(m)) {
                    eprintln!("readme: warning: {e}");
                }
            }
        }
        // The mount namespace ends with its last process, the holder.
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        if let Some(ns) = self.netns.take() {
            if let Err(e) = output(Command::new("ip").args(["netns", "del", &ns])) {
                eprintln!("readme: warning: {e}");
            }
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns));
        }
        for dev in self.loops.drain(..).rev() {
            if let Err(e) = output(Command::new("losetup").args(["-d", &dev])) {
                eprintln!("readme: warning: {e}");
            }
        }
        for dir in self.made_dirs.drain(..).rev() {
            let _ = std::fs::remove_dir(dir);
        }
        for image in ["vdb.img", "vm-fs.img"] {
            let _ = std::fs::remove_file(self.dir.join(image));
        }
        if self.succeeded {
            let _ = std::fs::remove_dir_all(&self.work);
            let _ = std::fs::remove_dir_all(self.dir.join("garage"));
        } else {
            eprintln!(
                "readme: the commands' files and logs are kept in {} and {}",
                self.work.display(),
                self.logs.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(markdown: &str) -> Vec<(usize, String, Kind)> {
        blocks(markdown)
            .expect("runnable")
            .into_iter()
            .flat_map(|b| b.commands)
            .map(|c| (c.line, c.text, c.kind))
            .collect()
    }

    #[test]
    fn only_sh_blocks_are_taken_with_comments_dropped_and_continuations_joined() {
        let md = "# Title\n\n```sh\n# a comment\ntern certs init ./pki --host src   # inline\n\
                  tern migrate --device /dev/vdb \\\n     --to dst:7443\n\n```\n\
                  ```text\nnot a command\n```\n```\nnor this\n```\n```sh\nls\n```\n";
        assert_eq!(
            kinds(md),
            vec![
                (
                    5,
                    "tern certs init ./pki --host src   # inline".to_owned(),
                    Kind::Run
                ),
                (
                    6,
                    "tern migrate --device /dev/vdb --to dst:7443".to_owned(),
                    Kind::Run
                ),
                (17, "ls".to_owned(), Kind::Run),
            ]
        );
    }

    #[test]
    fn exactly_the_two_ci_commands_are_skipped() {
        let md = "```sh\ncargo xtask demo    # the main job\ncargo xtask test\n\
                  cargo xtask test --foo\ncargo xtask demo | tee log\ncargo xtask bench\n```\n";
        let k: Vec<Kind> = kinds(md).into_iter().map(|(_, _, k)| k).collect();
        assert_eq!(
            k,
            vec![
                Kind::RunByCi,
                Kind::RunByCi,
                Kind::Run,
                Kind::Run,
                Kind::Run
            ]
        );
    }

    #[test]
    fn servers_are_recognised_with_what_shows_they_are_ready() {
        let serve = |line: &str| classify(line).expect("runnable");
        assert_eq!(
            serve(
                "tern agent --role destination --image d.img --size 1G --grpc 0.0.0.0:7443 --tls-dir p"
            ),
            Kind::Serve(vec![Probe::Listen(7443), Probe::Listen(10809)])
        );
        assert_eq!(
            serve(
                "tern agent --role destination --grpc=0.0.0.0:7444 --nbd unix:/run/n.sock --metrics 127.0.0.1:9100"
            ),
            Kind::Serve(vec![
                Probe::Listen(7444),
                Probe::Socket("/run/n.sock".into()),
                Probe::Listen(9100)
            ])
        );
        assert_eq!(
            serve(
                "tern agent --role source --device /dev/vdb --peer dst:7443 --tls-dir ./pki/src   # standby"
            ),
            Kind::Serve(vec![Probe::Connected(7443)])
        );
        assert_eq!(
            serve("tern nbd serve --image disk.img --listen 127.0.0.1:10810"),
            Kind::Serve(vec![Probe::Listen(10810)])
        );
        assert_eq!(
            serve("tern nbd serve --image disk.img"),
            Kind::Serve(vec![Probe::Listen(10809)])
        );
        assert_eq!(
            serve("qemu-system-x86_64 -m 256M -qmp unix:/run/guest.qmp,server=on,wait=off"),
            Kind::Serve(vec![Probe::Socket("/run/guest.qmp".into())])
        );
        assert_eq!(
            serve("qemu-system-x86_64 -m 64 -incoming tcp:dst:4444"),
            Kind::Serve(vec![Probe::Listen(4444)])
        );
        for run in [
            "tern agent-like",
            "tern nbd",
            "tern migrate --agent 127.0.0.1:7444",
            "qemu-system-x86_64 -daemonize -qmp unix:/run/q,server=on,wait=off",
            "qemu-io -f raw nbd://127.0.0.1:10809/tern -c 'read 0 1M'",
            "echo tern agent",
        ] {
            assert_eq!(serve(run), Kind::Run, "{run}");
        }
    }

    #[test]
    fn a_server_that_cannot_be_waited_on_or_stopped_is_refused() {
        for bad in [
            "tern agent --role destination --grpc 0.0.0.0:7443 &",
            "tern nbd serve --image d.img | tee log",
            "tern agent --image d.img",
            "tern agent --role source --device /dev/vdb",
            "qemu-system-x86_64 -m 64 -nodefaults",
            "tern agent --role destination --grpc 0.0.0.0:http",
        ] {
            assert!(classify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placeholders_brackets_alternatives_and_open_quotes_cannot_run() {
        for (bad, why) in [
            ("tern migrate ... --plan plan.json", "placeholder"),
            ("tern agent --role source … --history d", "placeholder"),
            ("tern trace stat a.trace [--json]", "brackets"),
            (
                "tern trace export --format csv|fio-iolog a.trace",
                "alternatives",
            ),
            ("tern history ls|get|prune URL", "alternatives"),
            ("qemu-io -c 'read 0 1M", "quote"),
            ("echo \"open", "quote"),
        ] {
            let err = classify(bad).expect_err(bad);
            let expected = match why {
                "placeholder" => "placeholder",
                "brackets" => "brackets",
                "alternatives" => "alternatives",
                _ => "never closed",
            };
            assert!(err.contains(expected), "{bad}: {err}");
        }
        // Quoted, piped with spaces, or in a comment, the same characters are fine.
        for good in [
            "qemu-io -r -f raw nbd://127.0.0.1:10809/tern -c 'read 0 1M'   # [--x] a|b ...",
            "curl -s 127.0.0.1:9100/metrics | head -3",
            "tern trace --device /dev/vdb --pid \"$(cat /run/app.pid)\" --out a.trace",
            "echo 'a|b ... [--x]' > /dev/null",
        ] {
            assert_eq!(classify(good), Ok(Kind::Run), "{good}");
        }
    }

    #[test]
    fn every_bad_line_is_reported_with_its_line_number() {
        let md = "```sh\ntern status [--json]\nls\ntern migrate ...\n```\n```sh\necho \\\n```\n";
        let err = blocks(md).expect_err("not runnable").to_string();
        assert!(err.contains("README.md:2:"), "{err}");
        assert!(err.contains("README.md:4:"), "{err}");
        assert!(err.contains("README.md:7:"), "{err}");
        assert!(!err.contains("README.md:3:"), "{err}");
        let err = blocks("```sh\nls\n").expect_err("open fence").to_string();
        assert!(err.contains("never closed"), "{err}");
    }

    #[test]
    fn hosts_come_from_certs_init_and_buckets_from_s3_urls() {
        let md = "```sh\ntern certs init ./pki --host src --host dst\ntern certs init ./lab --host=dst-ram --host src\n\
                  tern history ls s3://bucket/tern\ntern predict s3://other-b/x --from 1h\n```\n";
        let b = blocks(md).expect("runnable");
        assert_eq!(host_names(&b), ["src", "dst", "dst-ram"]);
        assert_eq!(buckets(md), ["bucket", "other-b"]);
        assert_eq!(
            hosts_file(&host_names(&b), "box"),
            "127.0.0.1 localhost box\n::1 localhost ip6-localhost\n\
             127.0.0.2 src\n127.0.0.3 dst\n127.0.0.4 dst-ram\n"
        );
    }

    #[test]
    fn proc_net_tcp_gives_listening_and_connected_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:2A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99517 1\n\
   1: 0100007F:DB3C 0200007F:1D13 01 00000000:00000000 00:00000000 00000000     0        0 99518 1\n";
        assert_eq!(
            tcp_sockets(table),
            vec![
                TcpSocket {
                    local_port: 10809,
                    remote_port: 0,
                    state: TCP_LISTEN
                },
                TcpSocket {
                    local_port: 56124,
                    remote_port: 7443,
                    state: TCP_ESTABLISHED
                },
            ]
        );
    }

    #[test]
    fn the_readme_itself_is_runnable_as_written() {
        let md = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
        let b = blocks(&md).expect("every README command can run as written");
        let skipped: Vec<&str> = b
            .iter()
            .flat_map(|b| &b.commands)
            .filter(|c| c.kind == Kind::RunByCi)
            .map(|c| c.text.as_str())
            .collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
    }
}
