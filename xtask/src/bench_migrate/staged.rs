//! The `staged` part: the same live migration of an ext4 image made from
//! this machine's files, directly (loopback, mutual TLS) and staged through
//! object storage (`tern migrate --via`): a directory, and S3 (Garage on
//! loopback). What it costs to have no link: total time, downtime, bytes
//! through the engine and bytes put in the store.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::fs::make_fs_image;
use super::{Bench, Loop, MIB, Proc, Report, Source, fio_writes, free_port, log_file, same, timed};

/// The writer during each migration (4 KiB random writes, IOPS).
const WRITER_IOPS: u32 = 200;

/// One route's figures.
struct Row {
    route: &'static str,
    seconds: f64,
    report: Report,
}

impl Bench<'_> {
    pub(super) fn staged(&self) -> Result<String> {
        let cfg = self.cfg;
        let size = cfg.staged_mib * MIB;
        let src = self.dir.join("staged.img");
        eprintln!(
            "bench migrate: making the {} MiB ext4 image for the staged part",
            cfg.staged_mib
        );
        let filled = make_fs_image(&src, size, self.dir)?;
        let src_loop = Loop::attach(&src)?;
        let dst = self.dir.join("staged-dst.img");
        let mut rows = Vec::new();

        rows.push(staged_row(
            "direct (loopback, mTLS)",
            &src,
            &src_loop,
            &dst,
            |dev, extra| {
                let (mut agent, to) = self.start_agent(&dst, size, None)?;
                let report = self.migrate_from(Source::Device(dev), to, extra);
                agent.stop();
                report
            },
        )?);

        let dir_url = self.dir.join("stage-dir");
        let dir_url = dir_url
            .to_str()
            .context("the bench directory's path is UTF-8")?;
        rows.push(staged_row(
            "staged: directory",
            &src,
            &src_loop,
            &dst,
            |dev, extra| {
                let mut agent = self.applying_agent(&dst, size, dir_url, &[])?;
                let report = self.run_migrate(Source::Device(dev), &["--via", dir_url], extra, &[]);
                agent.stop();
                report
            },
        )?);

        let garage = crate::garage::Server::start(&self.dir.join("garage"), &["stage".to_owned()])?;
        let env = garage.env();
        let s3_url = "s3://stage/bench";
        rows.push(staged_row(
            "staged: S3 (Garage)",
            &src,
            &src_loop,
            &dst,
            |dev, extra| {
                let mut agent = self.applying_agent(&dst, size, s3_url, &env)?;
                let report = self.run_migrate(Source::Device(dev), &["--via", s3_url], extra, &env);
                agent.stop();
                report
            },
        )?);
        drop(garage);

        let mut t = String::new();
        writeln!(
            t,
            "## Staged through object storage: {} MiB ext4 image ({:.0} MB in {} files), fio {WRITER_IOPS} IOPS 4 KiB random writes, paused for the switch; one run per route",
            cfg.staged_mib,
            filled.used as f64 / 1e6,
            filled.files
        )?;
        writeln!(
            t,
            "{:<26} {:>8} {:>12} {:>7} {:>12} {:>12}",
            "route", "total s", "downtime ms", "rounds", "engine MB", "stored MB"
        )?;
        for r in &rows {
            writeln!(
                t,
                "{:<26} {:>8.1} {:>12.1} {:>7} {:>12.1} {:>12}",
                r.route,
                r.seconds,
                r.report.downtime_ms,
                r.report.rounds,
                r.report.wire_bytes as f64 / 1e6,
                r.report
                    .staged_bytes
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.1}", b as f64 / 1e6)),
            )?;
        }
        Ok(t)
    }

    /// A destination agent applying the store at `url` (`--from`).
    fn applying_agent(
        &self,
        image: &Path,
        size: u64,
        url: &str,
        env: &[(&'static str, String)],
    ) -> Result<Proc> {
        let grpc = free_port("127.0.0.1")?;
        let mut agent = Proc::spawn(
            "tern agent --from",
            Command::new(self.tern)
                .args(["agent", "--role", "destination", "--image"])
                .arg(image)
                .args(["--size", &size.to_string(), "--grpc", &grpc.to_string()])
                .args(["--nbd", &free_port("127.0.0.1")?.to_string(), "--from", url])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("TERN_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log_file(&self.dir.join("agent.log"))?),
            Some(grpc),
        )?;
        agent.wait_listening()?;
        Ok(agent)
    }
}

/// One migration of `src` (its loop device) under the writer, by
/// `migrate`; checks the destination equals the paused source.
fn staged_row(
    route: &'static str,
    src: &Path,
    src_loop: &Loop,
    dst: &Path,
    migrate: impl FnOnce(&str, &[&str]) -> Result<Report>,
) -> Result<Row> {
    std::fs::remove_file(dst).ok();
    let mut fio = Proc::spawn(
        "fio",
        fio_writes("staged", &src_loop.dev, WRITER_IOPS)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        None,
    )?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let pause = format!("cmd:kill -STOP {pid};;kill -CONT {pid}", pid = fio.pid());
    let extra = ["--pause", &pause, "--max-downtime", "1s"];
    let result = timed(|| migrate(&src_loop.dev, &extra));
    // The writer is still stopped after a switch: the copy must equal it.
    let checked = result
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|_| same(src, dst, route));
    fio.kill();
    let (seconds, report) = result?;
    checked?;
    std::fs::remove_file(dst).ok();
    eprintln!(
        "bench migrate: {route}: {seconds:.1} s, downtime {:.1} ms",
        report.downtime_ms
    );
    Ok(Row {
        route,
        seconds,
        report,
    })
}
