//! Part 4 of `cargo xtask bench migrate`: the image of a real file system.
//!
//! Random blocks beside zero blocks (parts 1–2) are the easy case for every
//! tool; a file system mixes many small files, metadata, free space that was
//! never written and a journal. The image is ext4, filled from this
//! machine's own files: a clone of this repository, then copies of `/usr`
//! until it is about 75 % full.
//!
//! `qemu-img convert` reads the image file; `tern migrate` reads the same
//! file (`--file`), and over loopback also the loop device attached to it
//! (`--device`, as a disk is read): the buffered loop device adds its own
//! copy out of the file's page cache and a worker thread, which a real disk
//! would not.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{
    Bench, LINK_RATE, Loop, MIB, NETNS, NS_ADDR, Netns, Proc, Source, drop_caches, free_port, same,
    timed,
};
use crate::sh::{output, run as run_cmd};

/// How full the file system is made, of its size as `df` reports it.
const FILL: f64 = 0.75;
/// `/usr` is copied again (as `usr.2`, ...) while it does not fill the
/// image; this many copies at most.
const MAX_USR_COPIES: u32 = 16;
/// qemu-nbd's port in the namespace (the agent there takes 7443 and 10809).
const NS_QEMU_PORT: u16 = 10810;

/// The copies over one link: tern's from each source, qemu-img's.
struct LinkCopies {
    tern: Vec<(&'static str, Option<Copy>)>,
    qemu: Copy,
}

/// One full copy over one link.
struct Copy {
    seconds: f64,
    /// What the tool sends: tern's `wire_bytes`; for qemu-img the image's
    /// non-zero 4 KiB blocks (it sends zeros as write-zeroes requests).
    wire: Option<u64>,
    /// Bytes on the veth pair, both ways, headers included (the shaped
    /// link only).
    link: Option<u64>,
    /// The seconds of every round, when this is their median.
    rounds: Vec<f64>,
}

impl Bench<'_> {
    pub(super) fn fs(&self) -> Result<String> {
        let cfg = self.cfg;
        let size = cfg.fs_mib * MIB;
        let src = self.dir.join("fs.img");
        eprintln!(
            "bench migrate: making the {} MiB ext4 image (this repository and /usr, to {:.0} %)",
            cfg.fs_mib,
            FILL * 100.0
        );
        let filled = make_fs_image(&src, size, self.dir)?;
        let nonzero = nonzero_bytes(&src)?;
        let src_loop = Loop::attach(&src)?;
        let dst = self.dir.join("fs-dst.img");

        let file = src
            .to_str()
            .context("the bench directory's path is UTF-8")?;
        let lo = self.fs_copies(
            &src,
            &[Source::File(file), Source::Device(&src_loop.dev)],
            &dst,
            nonzero,
            None,
        )?;
        let ns = Netns::create(&NETNS, LINK_RATE)?;
        let tbf = self.fs_copies(&src, &[Source::File(file)], &dst, nonzero, Some(&ns))?;
        drop(ns);

        // The compression reference: qemu-img compresses only into qcow2.
        let qcow = self.dir.join("fs.qcow2");
        drop_caches();
        let (qcow_secs, ()) = timed(|| {
            run_cmd(
                Command::new("qemu-img")
                    .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
                    .arg(&src)
                    .arg(&qcow),
            )
        })?;
        let qcow_bytes = std::fs::metadata(&qcow)
            .with_context(|| format!("stat {}", qcow.display()))?
            .len();
        // The guest-visible contents, byte for byte (cmp cannot read qcow2).
        run_cmd(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                .arg(&src)
                .arg(&qcow),
        )
        .context("qemu-img convert -c: the qcow2 copy is NOT identical to the image")?;
        std::fs::remove_file(&qcow).ok();

        let qcow_copy = Copy {
            seconds: qcow_secs,
            wire: Some(qcow_bytes),
            link: None,
            rounds: Vec::new(),
        };
        self.fs_table(&filled, nonzero, &[&lo, &tbf], &qcow_copy)
    }

    /// The part's table: one row per tool and link, the rounds below.
    fn fs_table(
        &self,
        filled: &Filled,
        nonzero: u64,
        links: &[&LinkCopies; 2],
        qcow_copy: &Copy,
    ) -> Result<String> {
        let cfg = self.cfg;
        let size = cfg.fs_mib * MIB;
        let mut t = format!(
            "File system image: ext4, {} MiB, {:.0} MiB used by {} files (a clone of this repository, \
             {} cop{} of /usr), {:.0} MiB allocated in the image file, {:.0} MiB non-zero; full copy to a fresh destination, \
             cold page cache, each time includes a final sync\n",
            cfg.fs_mib,
            filled.used as f64 / MIB as f64,
            filled.files,
            filled.usr_copies,
            if filled.usr_copies == 1 { "y" } else { "ies" },
            filled.allocated as f64 / MIB as f64,
            nonzero as f64 / MIB as f64,
        );
        writeln!(
            t,
            "{:<18} {:<34} {:>8} {:>8} {:>9} {:>9} {:>12}",
            "link", "tool", "seconds", "MB/s", "wire MB", "link MB", "vs qemu-img"
        )?;
        let cell = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let row = |link: &str, tool: &str, c: Option<&Copy>, qemu: Option<f64>| {
            format!(
                "{:<18} {:<34} {:>8} {:>8} {:>9} {:>9} {:>12}\n",
                link,
                tool,
                cell(c.map(|c| format!("{:.2}", c.seconds))),
                cell(c.map(|c| format!("{:.0}", size as f64 / c.seconds / 1e6))),
                cell(
                    c.and_then(|c| c.wire)
                        .map(|w| format!("{:.1}", w as f64 / 1e6))
                ),
                cell(
                    c.and_then(|c| c.link)
                        .map(|w| format!("{:.1}", w as f64 / 1e6))
                ),
                cell(c.zip(qemu).map(|(c, q)| format!("{:.2}x", q / c.seconds))),
            )
        };
        let names = ["loopback mTLS", &*format!("{LINK_RATE}/s tbf veth")];
        for (link, LinkCopies { tern, qemu }) in names.iter().zip(links) {
            for (tool, copy) in tern {
                t += &row(link, tool, copy.as_ref(), Some(qemu.seconds));
            }
            t += &row(
                link,
                "qemu-img convert -> qemu-nbd",
                Some(qemu),
                Some(qemu.seconds),
            );
        }
        t += &row(
            "local file",
            "qemu-img convert -c -O qcow2",
            Some(qcow_copy),
            None,
        );
        writeln!(
            t,
            "seconds of each round, in order (the rows show the median round):"
        )?;
        for (link, LinkCopies { tern, qemu }) in names.iter().zip(links) {
            let tools = tern
                .iter()
                .filter_map(|(tool, c)| Some((*tool, c.as_ref()?)))
                .chain([("qemu-img convert -> qemu-nbd", qemu)]);
            for (tool, c) in tools {
                let runs: Vec<String> = c.rounds.iter().map(|s| format!("{s:.2}")).collect();
                writeln!(t, "  {link:<18} {tool:<34} {}", runs.join(" / "))?;
            }
        }
        t += "(MB/s: of the image size; wire: tern's wire_bytes, the image's non-zero 4 KiB blocks for \
              qemu-img (zeros go as write-zeroes requests), the qcow2 file's size; link: bytes on the veth pair both ways, TCP and TLS included)\n";
        Ok(t)
    }

    /// `tern migrate` from each of `sources` and `qemu-img convert`, over
    /// loopback or, with `ns`, into the namespace across the shaped link;
    /// each into a fresh `dst`, each compared with the source, the tools
    /// alternating for `fs_rounds` rounds; the median copy of each.
    /// `nonzero`: the source's non-zero bytes.
    fn fs_copies(
        &self,
        src: &Path,
        sources: &[Source<'_>],
        dst: &Path,
        nonzero: u64,
        ns: Option<&Netns>,
    ) -> Result<LinkCopies> {
        let rounds = self.cfg.fs_rounds;
        let mut tern: Vec<Vec<Copy>> = sources.iter().map(|_| Vec::new()).collect();
        let mut qemu = Vec::new();
        for _ in 0..rounds {
            if !self.cfg.peers_only {
                for (&source, copies) in sources.iter().zip(&mut tern) {
                    copies.push(self.tern_copy(src, source, dst, ns)?);
                }
            }
            qemu.push(self.qemu_copy(src, dst, nonzero, ns)?);
        }
        let tern = sources
            .iter()
            .zip(tern)
            .map(|(&source, copies)| (tool_name(source), median_copy(copies)))
            .collect();
        let qemu = median_copy(qemu).context("at least one round")?;
        Ok(LinkCopies { tern, qemu })
    }

    fn tern_copy(
        &self,
        src: &Path,
        source: Source<'_>,
        dst: &Path,
        ns: Option<&Netns>,
    ) -> Result<Copy> {
        let size = self.cfg.fs_mib * MIB;
        std::fs::remove_file(dst).ok();
        let (mut agent, to) = self.start_agent(dst, size, ns)?;
        drop_caches();
        let before = link_bytes(ns)?;
        let (seconds, report) = timed(|| self.migrate_from(source, to, &["--no-pause"]))?;
        let after = link_bytes(ns)?;
        agent.stop();
        same(
            src,
            dst,
            &format!(
                "{} (file system image, {})",
                tool_name(source),
                link_name(ns)
            ),
        )?;
        std::fs::remove_file(dst).ok();
        Ok(Copy {
            seconds,
            wire: Some(report.wire_bytes),
            link: after.zip(before).map(|(a, b)| a - b),
            rounds: Vec::new(),
        })
    }

    fn qemu_copy(&self, src: &Path, dst: &Path, nonzero: u64, ns: Option<&Netns>) -> Result<Copy> {
        let size = self.cfg.fs_mib * MIB;
        std::fs::remove_file(dst).ok();
        File::create(dst)?.set_len(size)?;
        let (addr, mut cmd) = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "qemu-nbd"]);
                (std::net::SocketAddr::new(NS_ADDR.parse()?, NS_QEMU_PORT), c)
            }
            None => (free_port("127.0.0.1")?, Command::new("qemu-nbd")),
        };
        cmd.args(["-f", "raw", "-t", "-b", &addr.ip().to_string(), "-p"])
            .arg(addr.port().to_string())
            .arg("--cache=none")
            .arg(dst);
        let mut qemu_nbd = Proc::spawn("qemu-nbd", &mut cmd, Some(addr))?;
        qemu_nbd.wait_listening()?;
        drop_caches();
        let before = link_bytes(ns)?;
        let (seconds, ()) = timed(|| {
            run_cmd(
                Command::new("qemu-img")
                    .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                    .arg(src)
                    .arg(format!("nbd://{addr}/")),
            )
        })?;
        let after = link_bytes(ns)?;
        qemu_nbd.stop();
        same(
            src,
            dst,
            &format!("qemu-img convert (file system image, {})", link_name(ns)),
        )?;
        std::fs::remove_file(dst).ok();
        Ok(Copy {
            seconds,
            wire: Some(nonzero),
            link: after.zip(before).map(|(a, b)| a - b),
            rounds: Vec::new(),
        })
    }
}

fn tool_name(source: Source<'_>) -> &'static str {
    match source {
        Source::File(_) => "tern migrate --file (the image)",
        Source::Device(_) => "tern migrate --device (loop dev)",
    }
}

fn link_name(ns: Option<&Netns>) -> &'static str {
    if ns.is_some() { "tbf link" } else { "loopback" }
}

/// The copy of median time (of an even count, the faster middle one): a
/// real run, so its bytes go with its seconds.
fn median_copy(mut copies: Vec<Copy>) -> Option<Copy> {
    let rounds = copies.iter().map(|c| c.seconds).collect();
    copies.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let mid = copies.len().checked_sub(1)? / 2;
    let mut median = copies.swap_remove(mid);
    median.rounds = rounds;
    Some(median)
}

/// Bytes through the host end of the namespace's veth pair, both ways.
fn link_bytes(ns: Option<&Netns>) -> Result<Option<u64>> {
    let Some(ns) = ns else {
        return Ok(None);
    };
    let mut sum = 0;
    for dir in ["tx_bytes", "rx_bytes"] {
        let path = format!("/sys/class/net/{}/statistics/{dir}", ns.host_veth);
        let v = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        sum += v
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{path}: {v:?}"))?;
    }
    Ok(Some(sum))
}

/// Bytes in the non-zero 4 KiB blocks of `path`.
fn nonzero_bytes(path: &Path) -> Result<u64> {
    use std::io::Read as _;
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0;
    loop {
        let mut len = 0;
        while len < buf.len() {
            match f
                .read(&mut buf[len..])
                .with_context(|| format!("read {}", path.display()))?
            {
                0 => break,
                r => len += r,
            }
        }
        if len == 0 {
            return Ok(n);
        }
        // `any` stops at a block's first non-zero byte: only zero blocks
        // are read through.
        n += buf[..len]
            .chunks(4096)
            .filter(|block| block.iter().any(|&b| b != 0))
            .count() as u64
            * 4096;
    }
}

/// What filling the file system made.
pub(super) struct Filled {
    /// Used bytes as `df` reports them.
    pub(super) used: u64,
    pub(super) files: u64,
    usr_copies: u32,
    /// Bytes the image file holds on disk (the rest are holes).
    allocated: u64,
}

/// Makes an ext4 image of `size` bytes at `path`, filled to [`FILL`]; it is
/// unmounted and written back when this returns.
pub(super) fn make_fs_image(path: &Path, size: u64, work: &Path) -> Result<Filled> {
    File::create(path)
        .with_context(|| format!("create {}", path.display()))?
        .set_len(size)
        .with_context(|| format!("size {}", path.display()))?;
    // Inode tables and journal written now, not by a kernel thread after the
    // mount, which would still be writing while the image is copied.
    run_cmd(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path),
    )?;
    let lo = Loop::attach(path)?;
    let mnt = Mount::new(&lo.dev, &work.join("fs-mnt"))?;
    run_cmd(
        Command::new("git")
            .args(["clone", "-q", "--no-hardlinks"])
            .arg(crate::sh::repo_root())
            .arg(mnt.path.join("tern")),
    )?;
    let (capacity, used) = df(&mnt.path)?;
    let mut budget = (capacity as f64 * FILL) as u64;
    budget = budget.saturating_sub(used);
    let mut files = 0;
    let mut usr_copies = 0;
    while budget > 0 && usr_copies < MAX_USR_COPIES {
        usr_copies += 1;
        let to = mnt.path.join(format!("usr.{usr_copies}"));
        std::fs::create_dir(&to).with_context(|| format!("create {}", to.display()))?;
        let full = copy_tree(Path::new("/usr"), &to, &mut budget, &mut files)?;
        super::check_interrupted()?;
        if full {
            break;
        }
    }
    let (_, used) = df(&mnt.path)?;
    drop(mnt);
    drop(lo);
    run_cmd(&mut Command::new("sync"))?;
    let allocated = output(Command::new("du").args(["-B1", "-s"]).arg(path))?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .context("du printed no size")?;
    Ok(Filled {
        used,
        files,
        usr_copies,
        allocated,
    })
}

/// Copies `from` into `to` (files, directories, symbolic links; nothing
/// else) while `budget` lasts, charging each file its size in 4 KiB blocks
/// and each entry one block for its inode and directory entry. Returns
/// whether the budget ran out.
fn copy_tree(from: &Path, to: &Path, budget: &mut u64, files: &mut u64) -> Result<bool> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(from)
        .with_context(|| format!("read {}", from.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("read {}", from.display()))?;
    // Sorted: the same machine gives the same image.
    entries.sort();
    for entry in entries {
        let meta = std::fs::symlink_metadata(&entry)
            .with_context(|| format!("stat {}", entry.display()))?;
        let cost = meta.len().div_ceil(4096) * 4096 + 4096;
        if cost > *budget {
            return Ok(true);
        }
        let Some(name) = entry.file_name() else {
            continue;
        };
        let target = to.join(name);
        let ft = meta.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&target).with_context(|| format!("create {}", target.display()))?;
            *budget -= 4096;
            if copy_tree(&entry, &target, budget, files)? {
                return Ok(true);
            }
        } else if ft.is_symlink() {
            let link = std::fs::read_link(&entry)
                .with_context(|| format!("read link {}", entry.display()))?;
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("create link {}", target.display()))?;
            *budget -= 4096;
        } else if ft.is_file() {
            std::fs::copy(&entry, &target)
                .with_context(|| format!("copy {} to {}", entry.display(), target.display()))?;
            *budget -= cost;
            *files += 1;
        }
    }
    Ok(false)
}

/// Size and used bytes of the file system at `path`.
fn df(path: &Path) -> Result<(u64, u64)> {
    let out = output(
        Command::new("df")
            .args(["-B1", "--output=size,used"])
            .arg(path),
    )?;
    let nums: Vec<u64> = out
        .lines()
        .nth(1)
        .context("df printed no figures")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("df printed {out:?}"))?;
    match nums[..] {
        [size, used] => Ok((size, used)),
        _ => bail!("df printed {out:?}"),
    }
}

/// A mounted file system, unmounted (and its mount point removed) when
/// dropped.
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn new(dev: &str, path: &Path) -> Result<Mount> {
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        run_cmd(Command::new("mount").arg(dev).arg(path))?;
        Ok(Mount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_bytes_counts_whole_4k_blocks_with_any_data() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("img");
        let mut data = vec![0u8; 3 * MIB as usize];
        // One byte in block 1, the last byte of block 300, a whole block 512.
        data[4096] = 1;
        data[301 * 4096 - 1] = 0xff;
        data[512 * 4096..513 * 4096].fill(7);
        std::fs::write(&path, &data).expect("write the image");
        assert_eq!(nonzero_bytes(&path).expect("count"), 3 * 4096);
    }
}
