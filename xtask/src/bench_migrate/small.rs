//! Part 5 of `cargo xtask bench migrate`: many small scattered changes.
//!
//! A database or a mail spool changes 4 KiB pages all over its disk. Here
//! `TERN_BENCH_MIGRATE_SMALL_EXTENTS` distinct random 4 KiB blocks change
//! while no agent runs (written once through the loop device), and one
//! `tern migrate --no-pause --region-size 4K` brings the destination's
//! previous copy up to date: every changed block is one region and one
//! extent on the wire.
//!
//! That delta sync finds the changed blocks by comparing checksum trees, so
//! it reads the whole source. A live migration's rounds know their blocks
//! from the tracer instead: the second row is such a round. Another
//! `tern migrate --no-switch` to the up-to-date destination pauses with a
//! command that writes as many other random 4 KiB blocks to the device
//! (fio, `direct=1`, each block once), and its final delta ships exactly
//! those; its own time (`final_round_ms`: the trace sync and the round, not
//! the verification after it) is the figure.

use std::fmt::Write as _;

use std::path::Path;

use anyhow::Result;

use super::{
    Bench, Loop, MIB, Report, change_blocks, drop_caches, rsync, same, timed, write_half_zero_image,
};

/// The changed block, and the region size that makes each one its own region.
pub(super) const BLOCK: u64 = 4096;
/// A 1 Gbit/s link's payload rate, bytes per second: the reference line.
const LINK_BPS: f64 = 125e6;

impl Bench<'_> {
    pub(super) fn small(&self) -> Result<String> {
        let cfg = self.cfg;
        let size = cfg.small_mib * MIB;
        let n = cfg.small_extents;
        let src = self.dir.join("small.img");
        eprintln!(
            "bench migrate: writing the {} MiB image for the small-extents part",
            cfg.small_mib
        );
        write_half_zero_image(&src, cfg.small_mib)?;
        super::check_interrupted()?;
        let src_loop = Loop::attach(&src)?;

        // The previous copies, untimed: tern's at the agent, rsync's beside it.
        let dst = self.dir.join("small-dst.img");
        if !cfg.peers_only {
            let (mut agent, to) = self.start_agent(&dst, size, None)?;
            // The region size the delta sync will use, as an operator keeps
            // one: the agent saves its tree at the end and restores it for the delta.
            let copied = self.migrate(&src_loop.dev, to, &["--no-pause", "--region-size", "4K"]);
            agent.stop();
            copied?;
            same(&src, &dst, "tern migrate (small extents: first copy)")?;
        }
        let dst_rsync = self.dir.join("small-rsync.img");
        rsync(&src, &dst_rsync, &[])?;
        same(&src, &dst_rsync, "rsync (small extents: first copy)")?;

        let (changed, old) = change_blocks(&src_loop.dev, size, BLOCK, n)?;
        drop(old);

        let tern = if cfg.peers_only {
            None
        } else {
            let restored_before = self.restored_trees();
            let (mut agent, to) = self.start_agent(&dst, size, None)?;
            let restored = self.restored_trees() > restored_before;
            drop_caches();
            let result =
                timed(|| self.migrate(&src_loop.dev, to, &["--no-pause", "--region-size", "4K"]));
            agent.stop();
            let (secs, report) = result?;
            same(&src, &dst, "tern migrate (small extents: delta)")?;
            Some((secs, report, restored))
        };
        let known = if cfg.peers_only {
            None
        } else {
            Some(self.known_round(&src_loop.dev, &src, &dst, size, n)?)
        };
        drop_caches();
        let (rsync_secs, rsync_wire) = timed(|| rsync(&src, &dst_rsync, &["--no-whole-file"]))?;
        same(&src, &dst_rsync, "rsync (small extents: delta)")?;
        std::fs::remove_file(&dst_rsync).ok();

        small_table(
            cfg.small_mib,
            n,
            changed,
            tern.as_ref(),
            known.as_ref(),
            (rsync_secs, rsync_wire),
        )
    }
}

/// The part's table: `tern` is the delta sync's (seconds, report, whether
/// the destination restored its saved tree), `known` the tracer-known
/// round's report, `rsync` its (seconds, wire bytes).
fn small_table(
    mib: u64,
    n: u64,
    changed: u64,
    tern: Option<&(f64, Report, bool)>,
    known: Option<&Report>,
    (rsync_secs, rsync_wire): (f64, u64),
) -> Result<String> {
    let mut t = format!(
        "Small extents: {n} distinct random 4 KiB blocks changed ({:.1} MB) in a {} MiB image \
         (random 1 MiB blocks between zero blocks), destination holds the previous copy; one \
         delta sync, cold page cache, times include a final sync\n",
        changed as f64 / 1e6,
        mib
    );
    writeln!(
        t,
        "{:<46} {:>8} {:>12} {:>10} {:>9} {:>9}",
        "tool", "seconds", "changed MB/s", "µs/extent", "wire MB", "vs rsync"
    )?;
    let cell = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let row = |name: &str, secs: Option<f64>, wire: Option<f64>| {
        format!(
            "{:<46} {:>8} {:>12} {:>10} {:>9} {:>9}\n",
            name,
            cell(secs.map(|s| format!("{s:.2}"))),
            cell(secs.map(|s| format!("{:.1}", changed as f64 / s / 1e6))),
            cell(secs.map(|s| format!("{:.1}", s * 1e6 / n as f64))),
            cell(wire.map(|w| format!("{:.1}", w / 1e6))),
            cell(secs.map(|s| format!("{:.2}x", rsync_secs / s))),
        )
    };
    let name = match tern {
        Some((_, _, true)) => "tern migrate --region-size 4K (saved tree)",
        Some((_, _, false)) => "tern migrate --region-size 4K (tree hashed)",
        None => "tern migrate --region-size 4K",
    };
    t += &row(
        name,
        tern.map(|(s, _, _)| *s),
        tern.map(|(_, r, _)| r.wire_bytes as f64),
    );
    if let Some(r) = known {
        t += &row(
            "tern, one delta round of tracer-known blocks",
            Some(r.final_round_ms / 1e3),
            Some(r.final_delta_bytes),
        );
    }
    t += &row(
        "rsync --inplace --no-whole-file (local)",
        Some(rsync_secs),
        Some(rsync_wire as f64),
    );
    t += &row(
        "1 Gbit/s link, changed data alone",
        Some(changed as f64 / LINK_BPS),
        Some(changed as f64),
    );
    if let Some((_, r, _)) = tern {
        t += &report_line(r, n);
    }
    if let Some(r) = known {
        writeln!(
            t,
            "tern's report of the tracer-known round: {:.1} MB in the final delta (changed: \
             {:.1} MB), pause (the writes) {:.0} ms, verification after it {:.0} ms",
            r.final_delta_bytes / 1e6,
            changed as f64 / 1e6,
            r.pause_ms,
            r.verify_ms,
        )?;
    }
    t += "(µs/extent: seconds per changed block; the report does not time the checksum-tree \
          comparison apart from the round that sends the blocks, so both are in the seconds; \
          the link line is the changed bytes at 125 MB/s, computed, not measured)\n";
    Ok(t)
}

impl Bench<'_> {
    /// One `tern migrate --no-switch` to a destination that is up to date,
    /// whose pause writes `n` random 4 KiB blocks: its final delta is a
    /// round of exactly the blocks the tracer saw written.
    fn known_round(&self, dev: &str, src: &Path, dst: &Path, size: u64, n: u64) -> Result<Report> {
        let (mut agent, to) = self.start_agent(dst, size, None)?;
        // Each block at most once (fio's random map), new random data in each.
        let scatter = format!(
            "fio --name=scatter --filename={dev} --rw=randwrite --bs={BLOCK} --size={size} \
             --io_size={} --direct=1 --ioengine=psync --refill_buffers --randseed=4099 \
             --output=/dev/null",
            n * BLOCK
        );
        let pause = format!("cmd:{scatter};;true");
        let result = self.migrate(
            dev,
            to,
            &["--no-switch", "--region-size", "4K", "--pause", &pause],
        );
        agent.stop();
        let report = result?;
        same(src, dst, "tern migrate (small extents: tracer-known round)")?;
        Ok(report)
    }
}

/// What tern's JSON report says of the delta sync.
fn report_line(r: &Report, changed_blocks: u64) -> String {
    format!(
        "tern's report: initial pass {}, then {} delta round(s), {} differing regions (changed: {changed_blocks}), \
         first pass {:.1} MB, sent {:.1} MB, hashed {:.1} MB, {:.2} s in all\n",
        match r.delta_sync {
            Some(true) => "a delta sync by checksums",
            Some(false) => "a bulk copy",
            None => "not reported",
        },
        r.rounds,
        r.differing_regions,
        r.first_round_bytes / 1e6,
        r.sent_bytes / 1e6,
        r.hashed_bytes / 1e6,
        r.total_seconds,
    )
}
