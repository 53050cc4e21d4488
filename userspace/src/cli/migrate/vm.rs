//! `tern migrate --vm qmp:SOCKET@URI` and `--vm libvirt:NAME@URI`: every
//! disk of a QEMU VM (and its RAM file) replicated by one migration each, in
//! this process, with one pause and one hand-over: QEMU's own migration
//! stopped at `pre-switchover`, or libvirt's with `--suspend`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tern::agent::source::Source;
use tern::cutover::{self, CutoverOptions, HealthCheck};
use tern::pause::{LibvirtMigration, PauseGroup, PauseTarget, Virsh};
use tern::vm::VmLayout;

use super::{
    MigrateArgs, Progress, Show, failed_at_start, human_bytes, render_report, runtime,
    until_interrupted,
};

/// One part of the VM and where it goes.
struct Part {
    name: String,
    source: super::SourceArgs,
}

pub(super) fn migrate(m: &MigrateArgs, vm: &str) -> Result<()> {
    refuse_single_disk_flags(m)?;
    let report = if let Some(rest) = vm.strip_prefix("libvirt:") {
        let (name, uri) = rest
            .split_once('@')
            .filter(|(n, u)| !n.is_empty() && !u.is_empty())
            .with_context(|| {
                format!("--vm {vm:?}: give libvirt:NAME@DEST_URI (the domain, and the destination's libvirt URI, e.g. qemu+tls://dst/system)")
            })?;
        runtime()?.block_on(libvirt(m, name, uri))?
    } else {
        let (socket, uri) = vm
            .strip_prefix("qmp:")
            .and_then(|rest| rest.split_once('@'))
            .filter(|(s, u)| !s.is_empty() && !u.is_empty())
            .with_context(|| {
                format!("--vm {vm:?}: give qmp:SOCKET@URI (the VM's QMP socket and the destination QEMU's -incoming URI) or libvirt:NAME@DEST_URI")
            })?;
        runtime()?.block_on(qmp(m, &PathBuf::from(socket), uri))?
    };
    let mut out = std::io::stdout().lock();
    if m.source.json {
        writeln!(out, "{report}")?;
    } else {
        for (name, r) in report["parts"].as_object().into_iter().flatten() {
            write!(out, "{name}: {}", render_report(r))?;
        }
        writeln!(
            out,
            "VM {}: downtime {:.1} ms (the longest part's)",
            report["outcome"].as_str().unwrap_or("?"),
            report["downtime_ms"].as_f64().unwrap_or(0.0)
        )?;
    }
    match report["outcome"].as_str() {
        Some("cut over") => {}
        Some("rolled back") => {
            bail!("rolled back after the switch: the VM runs on the source with every write")
        }
        _ => bail!(
            "the VM was not moved: {}; a part that failed after its switch says so in its log \
             (`tern rollback` makes that part's source primary again)",
            report["errors"]
                .as_array()
                .map(|e| e
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join("; "))
                .unwrap_or_default()
        ),
    }
    Ok(())
}

/// A QEMU VM through its QMP socket: QEMU's migration to `uri` is the pause.
async fn qmp(m: &MigrateArgs, socket: &Path, uri: &str) -> Result<serde_json::Value> {
    let layout = tern::vm::describe(socket, m.grow_qcow2).await?;
    let parts = parts(m, &layout)?;
    let target = PauseTarget::QemuMigrate {
        socket: socket.to_path_buf(),
        uri: uri.to_owned(),
        postcopy_ram: false,
    };
    let bound = bind(m, &parts).await?;
    // QEMU leaves the RAM file out of its stream (Tern moves it) only
    // from the pause on.
    let group = if layout.ram.is_some() {
        PauseGroup::skipping_shared_ram(target, parts.len(), socket.to_path_buf())
    } else {
        PauseGroup::new(target, parts.len())
    };
    let result = run(m, bound, &group).await;
    let cut_over = result.as_ref().is_ok_and(|r| r["outcome"] == "cut over");
    if layout.ram.is_some() && !cut_over {
        // The VM runs on here (or waits for `tern rollback`): a later
        // migration of its RAM by QEMU must not leave the shared file out.
        if let Err(e) = tern::pause::ignore_shared_ram(socket, false).await {
            tracing::warn!(error = %e, "cannot clear x-ignore-shared on the source QEMU");
        }
    }
    result
}

/// A libvirt domain: its disks replicated to agents that export them over
/// NBD, the destination defined on those exports, and libvirt's migration
/// (`--suspend`) the pause.
async fn libvirt(m: &MigrateArgs, name: &str, dest_uri: &str) -> Result<serde_json::Value> {
    let source = Virsh::new(None);
    let domain = tern::libvirt::describe(&source, name, m.grow_qcow2).await?;
    let destination = Virsh::new(Some(dest_uri));
    // Reachable, and not running the domain already.
    destination.run(&["version"]).await?;
    if let Ok(state) = destination.state(name).await {
        if state != "shut off" {
            bail!(
                "domain {name} is already {state} on {dest_uri}: Tern moves it to a host where it does not run"
            );
        }
        // A definition there must be this domain's (libvirt refuses another).
        let theirs = destination.run(&["domuuid", name]).await?;
        let ours = source.run(&["domuuid", name]).await?;
        if theirs.trim() != ours.trim() {
            bail!(
                "{dest_uri} has another domain named {name} (uuid {}, this one's is {}): undefine or rename it first",
                theirs.trim(),
                ours.trim()
            );
        }
    }
    let layout = VmLayout {
        disks: domain.disks.clone(),
        ram: None,
    };
    let parts = parts(m, &layout)?;
    let mut bound = bind(m, &parts).await?;
    let target = match libvirt_target(m, &domain, &mut bound, source, destination, dest_uri).await {
        Ok(target) => target,
        Err(e) => {
            // Nothing paused yet: each part's status says why it stopped.
            for (_, _, progress) in bound {
                progress.finish(Err(&e));
            }
            return Err(e);
        }
    };
    let group = PauseGroup::new(target, parts.len());
    let report = run(m, bound, &group).await?;
    if report["outcome"] == "cut over" && domain.persistent {
        // The source's copy is stale now: the host must not start it again
        // at boot, and is only forgotten when asked.
        let source = Virsh::new(None);
        let done = if m.undefine_source {
            source.run(&["undefine", name]).await
        } else {
            source.run(&["autostart", "--disable", name]).await
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "the domain runs on the destination, but its source definition was not changed");
        }
    }
    Ok(report)
}

/// The libvirt pause for `domain`: each bound part's agent names its NBD
/// export, the destination's definition is written on them (and the
/// source's own kept beside it, for a return).
async fn libvirt_target(
    m: &MigrateArgs,
    domain: &tern::libvirt::Domain,
    bound: &mut [Bound<'_>],
    source: Virsh,
    destination: Virsh,
    dest_uri: &str,
) -> Result<PauseTarget> {
    let name = &domain.name;
    let source_uri = source.run(&["uri"]).await?.trim().to_owned();
    let mut exports = BTreeMap::new();
    for (part, side, _) in bound.iter_mut() {
        let export = side.destination_nbd().await?.with_context(|| {
            format!(
                "the agent for {} ({}) serves no NBD export: start it with --nbd ADDR --nbd-advertise-writable (the destination domain's disk is that export)",
                part.name,
                part.source.to.as_deref().unwrap_or("?")
            )
        })?;
        if !export.advertised_writable {
            bail!(
                "the agent for {} ({}) exports its disk read-only until the switch, and the destination QEMU opens it read-write before: start the agent with --nbd-advertise-writable",
                part.name,
                part.source.to.as_deref().unwrap_or("?")
            );
        }
        exports.insert(part.name.clone(), export);
    }
    let xml = tern::libvirt::destination_xml(name, &domain.xml, &exports)?;
    std::fs::create_dir_all(&m.source.state_dir)
        .with_context(|| format!("cannot create {}", m.source.state_dir.display()))?;
    let file = |what: &str| {
        m.source
            .state_dir
            .join(format!("libvirt-{name}.{what}.xml"))
    };
    let (destination_xml, source_xml) = (file("destination"), file("source"));
    std::fs::write(&destination_xml, xml)
        .with_context(|| format!("cannot write {}", destination_xml.display()))?;
    std::fs::write(&source_xml, &domain.xml)
        .with_context(|| format!("cannot write {}", source_xml.display()))?;
    Ok(PauseTarget::Libvirt(LibvirtMigration {
        domain: name.clone(),
        source,
        source_uri,
        destination,
        destination_uri: dest_uri.to_owned(),
        destination_xml,
        source_xml,
        persistent: domain.persistent,
        extra_args: m.virsh_migrate_arg.clone(),
    }))
}

/// Flags that name one disk's run make no sense for a whole VM.
fn refuse_single_disk_flags(m: &MigrateArgs) -> Result<()> {
    let libvirt = m.vm.as_deref().is_some_and(|v| v.starts_with("libvirt:"));
    if (m.undefine_source || !m.virsh_migrate_arg.is_empty()) && !libvirt {
        bail!("--undefine-source and --virsh-migrate-arg are for --vm libvirt:NAME@URI");
    }
    if m.health_nbd.is_some() {
        bail!("--health-nbd checks one export: with --vm each part's is checked through its agent");
    }
    if m.source.via.is_some() {
        bail!(
            "--vm moves a running VM with QEMU's migration stream, which needs a link between the hosts: --via (staged through object storage) is for one disk (--device or --file)"
        );
    }
    if m.mode != super::Mode::Precopy || m.converge.is_some() {
        bail!("--vm moves a VM in pre-copy (--mode precopy, no --converge) for now");
    }
    if m.no_switch {
        bail!("--vm switches the VM: --no-switch is for one disk");
    }
    if m.source.plan.is_some() || m.source.prefetch.is_some() || m.source.prefetch_history.is_some()
    {
        bail!("--plan and --prefetch* name one disk's plan: with --vm each part takes its default");
    }
    if let Some(dir) = &m.source.trace_out
        && !dir.is_dir()
    {
        bail!(
            "--trace-out with --vm is a directory for the parts' traces (NAME.trace each): {} is none",
            dir.display()
        );
    }
    Ok(())
}

/// A part's trace: `NAME.trace` in the `--trace-out` directory, or the
/// part's default beside its disk's name.
fn part_trace(m: &MigrateArgs, name: &str) -> Option<PathBuf> {
    m.source
        .trace_out
        .as_ref()
        .map(|dir| dir.join(format!("{name}.trace")))
}

/// Each disk (and the RAM file) with its `--to` agent.
fn parts(m: &MigrateArgs, layout: &VmLayout) -> Result<Vec<Part>> {
    if layout.disks.iter().any(|d| d.name == "ram") && layout.ram.is_some() {
        bail!("the VM has a disk named ram beside its RAM file: rename the disk's device id");
    }
    let names: Vec<String> = layout
        .disks
        .iter()
        .map(|d| d.name.clone())
        .chain(layout.ram.iter().map(|_| "ram".to_owned()))
        .collect();
    let to = m.source.to.as_deref().with_context(|| {
        format!(
            "--vm needs --to NAME=HOST:PORT for each part of the VM: {}",
            names.join(", ")
        )
    })?;
    let mut agents: BTreeMap<&str, &str> = BTreeMap::new();
    for item in to.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, addr) = item.split_once('=').with_context(|| {
            format!(
                "--to {item:?}: with --vm, give NAME=HOST:PORT for each of {}",
                names.join(", ")
            )
        })?;
        let (name, addr) = (name.trim(), addr.trim());
        if agents.insert(name, addr).is_some() {
            bail!("--to names {name} twice");
        }
    }
    for name in agents.keys() {
        if !names.iter().any(|n| n == name) {
            bail!(
                "--to names {name}, which is no part of the VM: {}",
                names.join(", ")
            );
        }
    }
    let paths = layout
        .disks
        .iter()
        .map(|d| (d.name.as_str(), &d.path))
        .chain(layout.ram.iter().map(|r| ("ram", &r.path)));
    let missing: Vec<String> = paths
        .filter(|(name, _)| !agents.contains_key(name))
        .map(|(name, path)| format!("{name} ({})", path.display()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "--to has no agent for {}: give NAME=HOST:PORT for each part of the VM",
            missing.join(", ")
        );
    }
    // --max-rate is the VM's: each part gets an equal share of it.
    let share = |rate: Option<u64>| rate.map(|r| (r / names.len() as u64).max(1));
    let mut parts = Vec::new();
    for disk in &layout.disks {
        let addr = agents.get(disk.name.as_str()).with_context(|| {
            format!(
                "--to has no agent for disk {} ({})",
                disk.name,
                disk.path.display()
            )
        })?;
        let mut source = m.source.clone();
        let device = std::fs::metadata(&disk.path)
            .map(|md| std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()))
            .with_context(|| format!("disk {}: {}", disk.name, disk.path.display()))?;
        (source.device, source.file) = if device {
            (Some(disk.path.clone()), None)
        } else {
            (None, Some(disk.path.clone()))
        };
        source.to = Some((*addr).to_owned());
        source.trace_out = part_trace(m, &disk.name);
        source.read_cached = false;
        source.max_rate = share(m.source.max_rate);
        parts.push(Part {
            name: disk.name.clone(),
            source,
        });
    }
    if let Some(ram) = &layout.ram {
        let addr = agents.get("ram").with_context(|| {
            format!(
                "--to has no agent for the RAM file {} (name it ram=HOST:PORT)",
                ram.path.display()
            )
        })?;
        let mut source = m.source.clone();
        (source.device, source.file) = (None, Some(ram.path.clone()));
        source.to = Some((*addr).to_owned());
        source.trace_out = part_trace(m, "ram");
        source.max_rate = share(m.source.max_rate);
        // Guest RAM's pages are in memory: read them there.
        source.read_cached = true;
        parts.push(Part {
            name: "ram".to_owned(),
            source,
        });
    }
    Ok(parts)
}

/// One part bound to its destination, with its progress reporter.
type Bound<'a> = (&'a Part, Source, Progress);

/// Binds every part: tracing starts, each agent is connected.
async fn bind<'a>(m: &MigrateArgs, parts: &'a [Part]) -> Result<Vec<Bound<'a>>> {
    // On a terminal one line for the whole VM (see `run`); otherwise each
    // part's JSON status lines, named.
    let show = if terminal(m) {
        Show::Nothing
    } else {
        Show::Lines
    };
    let mut bound = Vec::new();
    for part in parts {
        let o = part.source.options()?;
        let side = Source::bind(&o)
            .await
            .inspect_err(|e| failed_at_start(&part.source.status_file(), &anyhow::anyhow!("{e}")))
            .with_context(|| format!("part {}", part.name))?;
        let progress = Progress::start_as(
            side.status(),
            side.stats(),
            part.source.status_file(),
            show,
            Some(super::PartOf {
                vm: m.vm.clone().unwrap_or_default(),
                name: part.name.clone(),
            }),
        );
        bound.push((part, side, progress));
    }
    Ok(bound)
}

fn terminal(m: &MigrateArgs) -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && !m.source.json
}

/// Runs the bound parts side by side with one shared pause.
async fn run(
    m: &MigrateArgs,
    bound: Vec<Bound<'_>>,
    group: &Arc<PauseGroup>,
) -> Result<serde_json::Value> {
    // Every part reads its first region back; the operator's command
    // checks the VM, once (the first part runs it; all parts decide).
    let region = vec![HealthCheck::Region(cutover::HEALTH_REGION)];
    let opts = CutoverOptions {
        max_downtime: m.max_downtime,
        max_rounds: m.max_rounds,
        pause: Some(PauseTarget::Group(Arc::clone(group))),
        health: region.clone(),
        ..CutoverOptions::default()
    };
    let watched: Vec<_> = bound
        .iter()
        .map(|(part, side, _)| (part.name.clone(), side.status(), side.stats()))
        .collect();
    let terminal = terminal(m);
    let line = terminal.then(|| tokio::spawn(vm_line(watched)));
    let runs = bound
        .into_iter()
        .enumerate()
        .map(|(i, (part, side, progress))| {
            let (mut opts, group) = (opts.clone(), Arc::clone(group));
            if i == 0 {
                opts.health = m
                    .health_cmd
                    .iter()
                    .map(|c| HealthCheck::Command(c.clone()))
                    .chain(region.iter().cloned())
                    .collect();
            }
            async move {
                let result = Box::pin(until_interrupted(side, &opts)).await;
                // The others must not wait for this one at the pause.
                if let Err(e) = &result {
                    let e: Box<dyn std::error::Error + Send + Sync> =
                        crate::cli::one_line(e).into();
                    group.abort(tern::pause::GroupAbort::PartFailed {
                        part: part.name.clone(),
                        source: Arc::from(e),
                    });
                }
                group.member_done(&part.name);
                let ended = result.and_then(|report| Ok(serde_json::to_value(report)?));
                progress.finish(ended.as_ref().map(Some));
                (part.name.clone(), ended)
            }
        });
    let results = futures::future::join_all(runs).await;
    if let Some(line) = line {
        line.abort();
        eprintln!();
    }
    let mut reports = serde_json::Map::new();
    let mut errors = Vec::new();
    for (name, ended) in results {
        match ended {
            Ok(report) => {
                reports.insert(name, report);
            }
            Err(e) => errors.push(format!("{name}: {}", crate::cli::one_line(&e))),
        }
    }
    let outcome = if !errors.is_empty() {
        "failed"
    } else if reports.values().all(|r| r["outcome"] == "cut over") {
        "cut over"
    } else {
        "rolled back"
    };
    let downtime = reports
        .values()
        .filter_map(|r| r["downtime_ms"].as_f64())
        .fold(0.0, f64::max);
    Ok(serde_json::json!({
        "outcome": outcome,
        "downtime_ms": downtime,
        "parts": reports,
        "errors": errors,
    }))
}

/// The whole VM on one terminal line, redrawn every second: each part's
/// phase, round and bytes sent.
async fn vm_line(
    parts: Vec<(
        String,
        tern::cutover::StatusCell,
        Arc<tern::replicate::Stats>,
    )>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let text: Vec<String> = parts
            .iter()
            .map(|(name, status, stats)| {
                let s = status.lock().expect("status lock poisoned").clone();
                format!(
                    "{name}: {} r{} {}",
                    s.phase,
                    s.round,
                    human_bytes(stats.snapshot().sent_bytes as f64)
                )
            })
            .collect();
        eprint!("\r\x1b[K{}", text.join(" · "));
    }
}
