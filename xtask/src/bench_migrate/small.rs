//! Part 5 of `cargo xtask bench migrate`: many small scattered changes.
//!
//! A database or a mail spool changes 4 KiB pages all over its disk. Here
//! `TERN_BENCH_MIGRATE_SMALL_EXTENTS` distinct random 4 KiB blocks change
//! while no agent runs (written once through the loop device), and one
//! `tern migrate --no-pause --region-size 4K` brings the destination's
//! previous copy up to date: every changed block is one region and one
//! extent on the wire.

use std::fmt::Write as _;

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
        drop_caches();
        let (rsync_secs, rsync_wire) = timed(|| rsync(&src, &dst_rsync, &["--no-whole-file"]))?;
        same(&src, &dst_rsync, "rsync (small extents: delta)")?;
        std::fs::remove_file(&dst_rsync).ok();

        let mut t = format!(
            "Small extents: {n} distinct random 4 KiB blocks changed ({:.1} MB) in a {} MiB image \
             (random 1 MiB blocks between zero blocks), destination holds the previous copy; one \
             delta sync, cold page cache, times include a final sync\n",
            changed as f64 / 1e6,
            cfg.small_mib
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
        let name = match &tern {
            Some((_, _, true)) => "tern migrate --region-size 4K (saved tree)",
            Some((_, _, false)) => "tern migrate --region-size 4K (tree hashed)",
            None => "tern migrate --region-size 4K",
        };
        t += &row(
            name,
            tern.as_ref().map(|(s, _, _)| *s),
            tern.as_ref().map(|(_, r, _)| r.wire_bytes as f64),
        );
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
        if let Some((_, r, _)) = &tern {
            t += &report_line(r, n);
        }
        t += "(µs/extent: seconds per changed block; the report does not time the checksum-tree \
              comparison apart from the round that sends the blocks, so both are in the seconds; \
              the link line is the changed bytes at 125 MB/s, computed, not measured)\n";
        Ok(t)
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
