//! `tern migrate`, `tern rollback`, `tern status` and the source agent:
//! argument parsing, progress and status files around `tern::cutover`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tern::agent::source::{Prefetch, Source, SourceDisk, SourceOptions};
use tern::cutover::{self, CutoverOptions, HealthCheck, Status, StatusCell};
use tern::pause::PauseTarget;
use tern::replicate::{CompressWhen, Stats};
use tern::throttle::CgroupSpec;
use tern::trace::cpu::CpuTarget;
use tern::units::{human_bytes, human_rate};

use super::args::{parse_rate, parse_size, runtime};

mod vm;

/// The source disk and how to reach the destination.
#[derive(Args, Clone)]
pub struct SourceArgs {
    /// The source block device (traced and read directly).
    #[arg(long, value_name = "DEV")]
    device: Option<PathBuf>,
    /// A disk image on a file system: traced on the device under it, in image offsets.
    #[arg(long, value_name = "IMAGE", conflicts_with = "device")]
    file: Option<PathBuf>,
    /// Read the --file source through the page cache instead of `O_DIRECT`:
    /// for guest RAM in a file (`tern ram-file`), whose pages are in memory
    /// (a round's reads then cost no disk reads). Not for block devices,
    /// whose page cache can be stale under a mounted file system.
    #[arg(long, requires = "file")]
    read_cached: bool,
    /// The destination agent's gRPC address (`host:port`).
    #[arg(long, alias = "peer", value_name = "HOST:PORT")]
    to: Option<String>,
    /// Stage the migration through object storage instead of a link: a
    /// directory, `file:///dir`, `s3://bucket/prefix` (credentials, region
    /// and endpoint from `AWS_*` variables) or `az://container/prefix`
    /// (account and key from `AZURE_*` variables) that the destination
    /// agent applies (`tern agent --role destination --from URL`).
    #[arg(long, value_name = "URL", conflicts_with_all = ["to", "tls_dir", "domain"])]
    via: Option<String>,
    /// With --via: how long to wait for the destination agent to publish
    /// its state, catch up with the staged data, or make the switch.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    via_wait: Duration,
    /// Directory with ca.pem, cert.pem, key.pem (from `tern certs init`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Name checked in the destination's certificate.
    #[arg(long)]
    domain: Option<String>,
    /// Dirty-tracking unit: a write dirties whole units (32 MiB of memory per TiB at 4K).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    unit: u64,
    /// Checksum-tree region size: a write makes its whole region be rehashed
    /// on both sides. Default: 16K, doubled until the tree has at most 2^20
    /// leaves (64 MiB of hashes), so 1M for a 1 TiB disk.
    #[arg(long, value_parser = parse_size)]
    region_size: Option<u64>,
    /// Longest extent on the wire.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    extent: u64,
    /// A plan from `tern plan --out`: its dirty-map unit, region size, extent
    /// length and per-zone units replace --unit, --region-size and --extent.
    #[arg(long, value_name = "PLAN.json")]
    plan: Option<PathBuf>,
    #[arg(long, default_value_t = 1, conflicts_with = "raw")]
    zstd_level: i32,
    /// Send data uncompressed.
    #[arg(long)]
    raw: bool,
    /// When to compress: `auto` measures while sending whether zstd moves
    /// the data faster than raw (a slow link) or slower (busy cores, a fast
    /// link) and keeps the faster; `always` tries zstd on every extent.
    #[arg(long, value_enum, default_value_t = CompressWhen::Auto, conflicts_with = "raw")]
    compress: CompressWhen,
    /// Bandwidth limit on the wire in bytes per second (e.g. 100M); leave
    /// it out for no limit.
    #[arg(long, value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// How long to keep reconnecting to a lost destination.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    reconnect_for: Duration,
    /// Tracer ring buffer size.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    ring_size: u64,
    /// The source's I/O history, recorded while replicating [default:
    /// /var/tmp/tern-source-NAME.trace, NAME the disk's path with `/` as `-`,
    /// so that runs of several disks keep theirs]. With `--vm`, a directory:
    /// each part's trace is `PART.trace` there.
    #[arg(long)]
    trace_out: Option<PathBuf>,
    /// A plan from `tern predict`: the first copy sends predicted-read-hot
    /// extents first and holds back those predicted to be rewritten soon.
    #[arg(long, value_name = "PLAN")]
    prefetch: Option<PathBuf>,
    /// Train the predictor here, at start, on this source's recorded history
    /// (`--history` of an earlier run: a directory, `file:///dir` or
    /// `s3://bucket/prefix`), and order the first copy by its plan as
    /// `--prefetch` does.
    #[arg(long, value_name = "URL", conflicts_with = "prefetch")]
    prefetch_history: Option<String>,
    /// How much recent history `--prefetch-history` trains on (an age).
    #[arg(long, default_value = "24h", requires = "prefetch_history")]
    prefetch_window: String,
    /// How far ahead `--prefetch-history` predicts.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    prefetch_horizon: Duration,
    /// Where the status file for `tern status` lives.
    #[arg(long, default_value = "/run/tern")]
    state_dir: PathBuf,
    /// Machine-readable output: progress as JSON lines on stderr (even on a
    /// terminal) and the final report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    history: super::history::HistoryArgs,
    /// Also profile this one's CPU in the source's trace and history (the
    /// host's is profiled anyway, and `tern migrate` adds the cgroup of
    /// `--pause cgroup:` and `--throttle-cgroup`): cgroup:DIR or pid:N.
    #[arg(long = "cpu", value_name = "cgroup:DIR|pid:N")]
    cpu: Vec<CpuTarget>,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tern migrate --device /dev/loop0 --to dst:7443 --tls-dir pki/src --pause fsfreeze:/mnt/data --max-downtime 100ms\n  tern migrate --file /var/lib/vm/disk.img --to dst:7443 --tls-dir pki/src --pause qmp:/run/vm.qmp\n  tern migrate --device /dev/vdb --to dst:7443 --no-pause   # an idle disk: copy or resync only\n  tern migrate --vm qmp:/run/vm.qmp@tcp:dst:4444 --to vd0=dst:7443,vd1=dst:7444,ram=dst:7445 --tls-dir pki/src\n  tern migrate --vm libvirt:web@qemu+tls://dst/system --to vda=dst:7443,vdb=dst:7444 --tls-dir pki/src"
)]
pub struct MigrateArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    agent: AgentClientArgs,
    /// How to pause the workload: fsfreeze:MOUNT, cgroup:DIR, qmp:SOCKET or 'cmd:PAUSE;;RESUME'.
    #[arg(long, required_unless_present_any = ["no_pause", "vm"])]
    pause: Option<PauseTarget>,
    /// A whole QEMU VM: `qmp:SOCKET@URI` (its QMP socket, and the `-incoming`
    /// URI of the destination QEMU). Every disk QEMU has attached (and its RAM,
    /// when it is a shared file) is replicated, with one pause for all;
    /// QEMU moves the device state (and RAM otherwise). `--to` names each
    /// part's destination agent: `NAME=HOST:PORT,…` (disks by device id, `ram`).
    /// Or a running libvirt domain: `libvirt:NAME@DEST_URI` (the source is
    /// virsh's default connection, `LIBVIRT_DEFAULT_URI`): its disks by target
    /// (`vda=HOST:PORT,…`), each agent serving an NBD export the destination
    /// domain is defined on; libvirt moves RAM and device state.
    #[arg(long, value_name = "qmp:SOCKET@URI|libvirt:NAME@URI", conflicts_with_all = ["pause", "no_pause", "device", "file"])]
    vm: Option<String>,
    /// The source is idle: copy without pausing anything.
    #[arg(long, conflicts_with = "pause")]
    no_pause: bool,
    /// With `--vm libvirt:…`: once the domain runs on the destination,
    /// undefine it on the source (by default its definition stays, shut off
    /// and with autostart disabled).
    #[arg(long, requires = "vm")]
    undefine_source: bool,
    /// With `--vm`: a qcow2 file smaller than its virtual size grows as the
    /// guest writes, past the fixed size Tern replicates; extend it first
    /// (sparse: no disk space) past what qcow2 can use, where QEMU then
    /// allocates its new clusters. Without it such a disk is refused.
    #[arg(long, requires = "vm")]
    grow_qcow2: bool,
    /// With `--vm libvirt:…`: an option passed on to `virsh migrate` for the
    /// RAM and device state, once per flag (`--virsh-migrate-arg=--tls`,
    /// `--virsh-migrate-arg=--migrateuri=tcp://10.0.0.2`). Not to the
    /// migration back of a rollback, which goes to the source host.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true, requires = "vm")]
    virsh_migrate_arg: Vec<String>,
    /// Downtime budget: the final delta must fit in it at the measured bandwidth.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    max_downtime: Duration,
    /// Delta rounds before giving up on convergence.
    #[arg(long, default_value_t = 30)]
    max_rounds: u64,
    /// When the rounds do not converge: `fail` leaves the workload alone and
    /// fails with what it would take; `throttle` limits the workload's
    /// writes to the source's disk (its cgroup's write limit), lowering the
    /// limit until the final delta fits, and lifts it at the pause.
    /// Default: `fail` (with `--mode auto`, the rounds that do not converge
    /// switch in post-copy).
    #[arg(long, value_enum)]
    converge: Option<Converge>,
    /// `precopy` converges first and copies the last delta inside the pause;
    /// `postcopy` switches right after the first copy (or before it, with
    /// `--precopy none`), with no data copy inside the pause, and the
    /// destination fetches what it still lacks: its reads of it wait for the
    /// source, which pushes the rest in the prediction's order meanwhile;
    /// `auto` follows the controller: a plan's advice (`--plan`), else the
    /// delta rounds' measured dirty rate against the link (post-copy when
    /// pre-copy would not fit the pause), and says why in the report.
    #[arg(long, value_enum, default_value_t = Mode::Precopy)]
    mode: Mode,
    /// With `--mode postcopy`: `first-pass` copies the disk once before the
    /// switch (the writes during it go after); `none` switches at once.
    #[arg(long, value_enum, default_value_t = Precopy::FirstPass)]
    precopy: Precopy,
    /// The cgroup `--converge throttle` limits: a directory (cgroup v2 with
    /// the io controller, or v1 blkio) or pid:N (that process's cgroup).
    /// Default: the cgroup of `--pause cgroup:DIR`.
    #[arg(long, value_name = "DIR|pid:N")]
    throttle_cgroup: Option<CgroupSpec>,
    /// What `--converge throttle` limits: `writes` (the cgroup's writes to
    /// the source's disk) or `cpu` (its CPU quota, as QEMU's auto-converge
    /// slows vCPUs: for a writer whose dirtying follows its CPU). Default:
    /// the `--plan`'s lever (from the workload's CPU profile), else writes.
    #[arg(long, value_enum)]
    throttle_by: Option<ThrottleBy>,
    /// After cutover: a command that must exit 0, else roll back.
    #[arg(long)]
    health_cmd: Option<String>,
    /// After cutover: the destination's NBD export (`HOST:PORT[/EXPORT]`, export
    /// `tern` by default) must answer, be writable and serve the source's first 64 KiB.
    /// `nbds://HOST:PORT[/EXPORT]`: over TLS with --tls-dir (an agent with --nbd-tls).
    #[arg(long, value_name = "[nbds://]HOST:PORT[/EXPORT]")]
    health_nbd: Option<String>,
    /// Sync only: leave the source primary and the destination read-only.
    #[arg(long)]
    no_switch: bool,
}

/// What `--converge throttle` limits.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ThrottleBy {
    Writes,
    Cpu,
}

impl ThrottleBy {
    fn lever(self) -> cutover::ThrottleBy {
        match self {
            ThrottleBy::Writes => cutover::ThrottleBy::Writes,
            ThrottleBy::Cpu => cutover::ThrottleBy::Cpu,
        }
    }
}

/// What a migration does when its rounds do not converge.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Converge {
    /// Fail, saying what it would take; the workload is never slowed.
    Fail,
    /// Slow the workload's writes until the final delta fits.
    Throttle,
    /// Switch in post-copy: the destination fetches what it lacks after.
    Postcopy,
}

/// When the switch comes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Converge, then copy the last delta inside the pause.
    Precopy,
    /// Switch first; the destination fetches the rest.
    Postcopy,
    /// The controller's choice, with its reason.
    Auto,
}

/// What a post-copy sends before its switch.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Precopy {
    /// The whole disk once.
    FirstPass,
    /// Nothing.
    None,
}

impl MigrateArgs {
    /// The post-copy `--mode` and `--converge` ask for, if any.
    fn postcopy(&self) -> Result<Option<cutover::PostCopyOptions>> {
        if self.source.via.is_some() {
            // A staged destination cannot ask the source for what it lacks.
            anyhow::ensure!(
                self.mode != Mode::Postcopy && self.converge != Some(Converge::Postcopy),
                "a migration staged through object storage (--via) is pre-copy only: the destination cannot fetch on demand without a link"
            );
            return Ok(None);
        }
        match (self.mode, self.converge) {
            (Mode::Postcopy, None) => Ok(Some(cutover::PostCopyOptions {
                skip_first_pass: self.precopy == Precopy::None,
                ..cutover::PostCopyOptions::default()
            })),
            (Mode::Postcopy, Some(_)) => bail!(
                "--mode postcopy switches without waiting for the rounds to converge: --converge is for --mode precopy"
            ),
            (Mode::Auto, Some(_)) => bail!(
                "--mode auto chooses for itself (post-copy when the rounds cannot converge): --converge is for --mode precopy"
            ),
            (_, _) if self.precopy == Precopy::None => {
                bail!("--precopy none is for --mode postcopy")
            }
            (Mode::Auto, None) => Ok(Some(cutover::PostCopyOptions {
                when: cutover::When::Advised { planned: None },
                ..cutover::PostCopyOptions::default()
            })),
            (Mode::Precopy, Some(Converge::Postcopy)) => Ok(Some(cutover::PostCopyOptions {
                when: cutover::When::IfNotConverging,
                ..cutover::PostCopyOptions::default()
            })),
            (Mode::Precopy, _) => Ok(None),
        }
    }

    /// The checks after the switch: the flags' and the source's first region.
    fn health_checks(&self) -> Result<Vec<HealthCheck>> {
        let mut health: Vec<HealthCheck> = self
            .health_cmd
            .iter()
            .map(|c| HealthCheck::Command(c.clone()))
            // A staged migration has no read path to the destination: the
            // roots compared at the switch (the destination's tree of what
            // it applied) stand in for the read-back.
            .chain(
                self.source
                    .via
                    .is_none()
                    .then_some(HealthCheck::Region(tern::cutover::HEALTH_REGION)),
            )
            .collect();
        if let Some(spec) = &self.health_nbd {
            // nbds:// asks for TLS with the replication's certificates.
            let (tls, rest) = match spec.strip_prefix("nbds://") {
                Some(rest) => (true, rest),
                None => (false, spec.strip_prefix("nbd://").unwrap_or(spec)),
            };
            let (host_port, export) = rest.split_once('/').unwrap_or((rest, "tern"));
            // A host name as well as an address, as --to takes.
            let addr = std::net::ToSocketAddrs::to_socket_addrs(host_port)
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| {
                    format!(
                        "--health-nbd {spec:?}: give [nbds://]HOST:PORT[/EXPORT], e.g. dst:10809/tern"
                    )
                })?;
            let tls = if tls {
                let dir = self.source.tls_dir.as_deref().with_context(|| {
                    format!("--health-nbd {spec:?} asks for TLS (nbds://): give --tls-dir")
                })?;
                let host = host_port
                    .rsplit_once(':')
                    .map_or(host_port, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                Some(tern::nbd::client::ClientTls {
                    config: tern::rpc::TlsMaterial::load(dir)?.rustls_client_config()?,
                    server_name: self
                        .source
                        .domain
                        .clone()
                        .unwrap_or_else(|| host.to_owned()),
                })
            } else {
                None
            };
            health.push(HealthCheck::Nbd {
                addr,
                export: export.to_owned(),
                region: tern::cutover::HEALTH_REGION,
                tls,
            });
        }
        Ok(health)
    }

    /// The workload's own CPU targets, where the flags name it: the cgroup
    /// `--pause` freezes and the one `--converge throttle` limits.
    fn workload_cpu(&self, throttle: Option<&CgroupSpec>) -> Vec<CpuTarget> {
        let pause = match &self.pause {
            Some(PauseTarget::Cgroup(dir)) => Some(CpuTarget::Cgroup(dir.clone())),
            _ => None,
        };
        let throttled = throttle.map(|c| match c {
            CgroupSpec::Dir(dir) => CpuTarget::Cgroup(dir.clone()),
            CgroupSpec::Pid(pid) => CpuTarget::Pid(*pid),
        });
        // Not a cgroup (the pause's or the throttle's own check says so
        // with a better message later): not profiled.
        pause
            .into_iter()
            .chain(throttled)
            .filter(CpuTarget::readable)
            .collect()
    }

    /// The cgroup to throttle: `None` unless `--converge throttle`.
    fn throttle_cgroup(&self) -> Result<Option<CgroupSpec>> {
        if self.converge != Some(Converge::Throttle) {
            if self.throttle_cgroup.is_some() {
                bail!("--throttle-cgroup is for --converge throttle");
            }
            if self.throttle_by.is_some() {
                bail!("--throttle-by is for --converge throttle");
            }
            return Ok(None);
        }
        if self.no_pause {
            bail!("--converge throttle slows a running workload: it needs --pause, not --no-pause");
        }
        match (&self.throttle_cgroup, &self.pause) {
            (Some(spec), _) => Ok(Some(spec.clone())),
            (None, Some(PauseTarget::Cgroup(dir))) => Ok(Some(CgroupSpec::Dir(dir.clone()))),
            (None, _) => bail!(
                "--converge throttle needs the workload's cgroup: give --throttle-cgroup DIR or --throttle-cgroup pid:N"
            ),
        }
    }
}

impl MigrateArgs {
    /// The disk migrated by this process (`--device` or `--file`); `None`
    /// for a whole VM or a migration a running source agent does.
    pub(super) fn local_disk(&self) -> Option<&Path> {
        if self.vm.is_some() || self.agent.agent.is_some() {
            return None;
        }
        self.source.disk()
    }

    /// The TLS directory the migration uses.
    pub(super) fn tls_dir(&self) -> Option<&Path> {
        self.source.tls_dir()
    }
}

/// How to reach a running source agent's control service.
#[derive(Args, Clone)]
pub struct AgentClientArgs {
    /// A source agent's control address (`tern agent --role source --control ADDR`):
    /// ask it instead of running the source side here.
    #[arg(long, value_name = "HOST:PORT")]
    agent: Option<String>,
    /// TLS directory for the control service (mutual TLS).
    #[arg(long)]
    agent_tls_dir: Option<PathBuf>,
    /// Name checked in the agent's certificate.
    #[arg(long, default_value = "localhost")]
    agent_domain: String,
}

impl AgentClientArgs {
    async fn connect(
        &self,
    ) -> Result<Option<tern::agent::source::control_client::ControlClient<tonic::transport::Channel>>>
    {
        let Some(addr) = &self.agent else {
            return Ok(None);
        };
        let tls = self
            .agent_tls_dir
            .as_deref()
            .map(tern::rpc::TlsMaterial::load)
            .transpose()?;
        let client = tern::agent::source::connect(addr, tls.as_ref(), Some(&self.agent_domain))
            .await
            .with_context(|| {
                format!("cannot reach the source agent's control service at {addr}")
            })?;
        Ok(Some(client))
    }
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tern rollback --device /dev/vdb --to dst:7443 --tls-dir pki/src --resume fsfreeze:/srv/data\n  tern rollback --agent 127.0.0.1:7444 --agent-tls-dir pki/src   # a source agent rolls back"
)]
pub struct RollbackArgs {
    #[command(flatten)]
    agent: AgentClientArgs,
    /// The former source device or image, to receive the destination's writes.
    #[arg(long, value_name = "DEV", required_unless_present_any = ["file", "agent"])]
    device: Option<PathBuf>,
    #[arg(long, value_name = "IMAGE", conflicts_with = "device")]
    file: Option<PathBuf>,
    /// The destination agent (`host:port`).
    #[arg(long, required_unless_present = "agent")]
    to: Option<String>,
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    #[arg(long)]
    domain: Option<String>,
    /// Resume the workload afterwards with this pause target's resume.
    #[arg(long)]
    resume: Option<PauseTarget>,
    /// Where the status file for `tern status` lives (the migration's).
    #[arg(long, default_value = "/run/tern")]
    state_dir: PathBuf,
    /// The report as one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  tern status                                   # every migration of this host (/run/tern)\n  tern status /dev/vdb                          # one of them\n  tern status --json --state-dir /run/tern-vm2\n  tern status --agent 127.0.0.1:7444 --agent-tls-dir pki/src"
)]
pub struct StatusArgs {
    /// One run: its source (`/dev/vdb`) or its name in the list (`dev-vdb`).
    /// Without it: the only run in detail, or several as a table.
    run: Option<String>,
    #[command(flatten)]
    agent: AgentClientArgs,
    /// Where migrations and source agents keep their status files.
    #[arg(long, default_value = "/run/tern")]
    state_dir: PathBuf,
    /// One JSON line per run (each with its `name`).
    #[arg(long)]
    json: bool,
}

impl SourceArgs {
    /// This migration's status file for `tern status`: one per source disk
    /// in the state directory, so that several migrations of one host
    /// each keep theirs.
    pub fn status_file(&self) -> PathBuf {
        status_file(&self.state_dir, self.device.as_ref().or(self.file.as_ref()))
    }

    /// Where a throttled run records its limits, to be undone by the next
    /// run of the same disk if this one is killed.
    fn throttle_record(&self) -> PathBuf {
        let name = run_name(self.device.as_ref().or(self.file.as_ref()));
        self.state_dir.join(format!("{name}{THROTTLE_SUFFIX}"))
    }

    /// Progress and report as JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The disk this migrates (`--device` or `--file`), if given.
    pub fn disk(&self) -> Option<&Path> {
        self.device.as_deref().or(self.file.as_deref())
    }

    /// The TLS material's directory.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls_dir.as_deref()
    }

    /// The library's options for this source (`--to` is required here, not
    /// by clap: `tern migrate --agent` asks a running agent instead).
    pub fn options(&self) -> Result<SourceOptions> {
        let disk = match (&self.device, &self.file) {
            (Some(dev), _) => SourceDisk::Device(dev.clone()),
            (None, Some(file)) => SourceDisk::File {
                path: file.clone(),
                read_cached: self.read_cached,
            },
            (None, None) => bail!("give the source as --device DEV or --file IMAGE"),
        };
        let to = self.to.as_deref().or(self.via.as_deref()).context(
            "give the destination agent as --to HOST:PORT (or --peer HOST:PORT), or a staging store as --via URL",
        )?;
        let mut o = SourceOptions::new(disk, to);
        o.via = self.via.as_ref().map(|url| {
            let mut via = tern::staging::RelayOptions::new(url.clone());
            via.wait_for = self.via_wait;
            via.retry_for = self.reconnect_for;
            via
        });
        o.tls_dir.clone_from(&self.tls_dir);
        o.domain.clone_from(&self.domain);
        o.plan.clone_from(&self.plan);
        o.unit = self.unit;
        o.region_size = self.region_size;
        o.extent_len = self.extent;
        o.zstd_level = (!self.raw).then_some(self.zstd_level);
        o.compress = self.compress;
        o.max_rate = self.max_rate;
        o.reconnect_for = self.reconnect_for;
        o.ring_bytes = self.ring_size;
        o.trace_out = self.trace_out.clone().unwrap_or_else(|| {
            let name = run_name(self.device.as_ref().or(self.file.as_ref()));
            PathBuf::from(format!("/var/tmp/tern-source-{name}.trace"))
        });
        o.prefetch = match (&self.prefetch, &self.prefetch_history) {
            (Some(plan), _) => Prefetch::Plan(plan.clone()),
            (None, Some(url)) => Prefetch::History {
                url: url.clone(),
                window: self.prefetch_window.clone(),
                horizon: self.prefetch_horizon,
            },
            (None, None) => Prefetch::None,
        };
        o.history = self.history.recording();
        for t in &self.cpu {
            if !o.cpu.contains(t) {
                o.cpu.push(t.clone());
            }
        }
        o.throttle_record = Some(self.throttle_record());
        Ok(o)
    }
}

/// The file name a throttle record takes after its run's name.
const THROTTLE_SUFFIX: &str = tern::throttle::RECORD_SUFFIX;
/// The file name a run's status takes after its name (a different ending
/// from a throttle record's, whatever the name).
const STATUS_SUFFIX: &str = ".status.json";
/// The one status file every run wrote before they were named per disk.
const LEGACY_STATUS: &str = "migrate.json";

/// A run's name in the state directory: its source's absolute path
/// escaped as systemd escapes unit names (`/` as `-`, a `-` or any byte
/// but letters, digits, `:`, `_` and a non-leading `.` as `\xNN`), so
/// `/dev/vdb` is `dev-vdb` and two paths never share a name; `migrate`
/// without a source.
fn run_name(source: Option<&PathBuf>) -> String {
    let Some(path) = source else {
        return "migrate".to_owned();
    };
    // The same disk named two ways (relative, through a link) is one run.
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
    let text = path.to_string_lossy();
    let mut name = String::new();
    for (i, part) in text.split('/').filter(|p| !p.is_empty()).enumerate() {
        if i > 0 {
            name.push('-');
        }
        for (j, b) in part.bytes().enumerate() {
            let plain = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && j > 0);
            if plain {
                name.push(char::from(b));
            } else {
                let _ = std::fmt::Write::write_fmt(&mut name, format_args!("\\x{b:02x}"));
            }
        }
    }
    if name.is_empty() {
        "migrate".to_owned()
    } else {
        name
    }
}

/// The status file of the run of `source` in `state_dir`.
fn status_file(state_dir: &Path, source: Option<&PathBuf>) -> PathBuf {
    state_dir.join(format!("{}{STATUS_SUFFIX}", run_name(source)))
}

fn source_path(device: Option<&PathBuf>, file: Option<&PathBuf>) -> Result<PathBuf> {
    device
        .or(file)
        .cloned()
        .context("give the source as --device DEV or --file IMAGE")
}

/// Progress on stderr and the status file for `tern status`, from the start
/// of a run to its end.
struct Progress {
    task: tokio::task::JoinHandle<()>,
    status: StatusCell,
    counters: Arc<Stats>,
    file: PathBuf,
    part: Option<PartOf>,
}

/// A run that is one part of a VM's migration: the VM (as `--vm` named it)
/// and the part's name, in every status line.
#[derive(Clone)]
struct PartOf {
    vm: String,
    name: String,
}

impl PartOf {
    fn label(&self, line: &mut serde_json::Value) {
        line["vm"] = self.vm.clone().into();
        line["part"] = self.name.clone().into();
    }
}

/// One status line: the phase and the counters, as `tern status` reads them.
fn status_line(s: &Status, counters: &Stats, rate_bps: u64) -> serde_json::Value {
    let st = counters.snapshot();
    serde_json::json!({
        // Before the engine names its first phase.
        "phase": if s.phase.is_empty() { "starting" } else { s.phase },
        "pid": std::process::id(),
        "finished": false,
        "epoch": s.epoch,
        "round": s.round,
        "sent_bytes": st.sent_bytes,
        "wire_bytes": st.wire_bytes,
        "round_bytes": st.round_bytes,
        "round_done": st.round_done,
        "hashed_bytes": st.hashed_bytes,
        "rate_bps": rate_bps,
        "remaining_bytes": s.remaining_bytes,
        "dirty_rate_bps": s.dirty_rate_bps,
        "estimated_downtime_ms": s.estimated_downtime_ms,
        "rpo_ms": s.rpo_ms,
        "consistent_as_of_unix_ms": s.consistent_as_of_unix_ms,
        "throttle_bps": s.throttle_bps,
        "throttle_cores": s.throttle_cores,
        "missing_bytes": s.missing_bytes,
        "demands": s.demands,
        "demand_wait_p50_us": s.demand_wait_p50_us,
        "demand_wait_p99_us": s.demand_wait_p99_us,
        "reconnects": st.reconnects,
    })
}

/// How a run's progress is shown besides its status file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    /// One bar on the terminal.
    Bar,
    /// A JSON line a second on stderr (with `part` when the run is one of a VM's).
    Lines,
    /// The status file only (a VM's parts on a terminal share one line).
    Nothing,
}

impl Progress {
    /// Prints progress every second (one line on a terminal, JSON lines
    /// otherwise) and keeps the status file fresh.
    fn start(status: StatusCell, counters: Arc<Stats>, file: PathBuf, json: bool) -> Progress {
        let show = if std::io::stderr().is_terminal() && !json {
            Show::Bar
        } else {
            Show::Lines
        };
        Progress::start_as(status, counters, file, show, None)
    }

    fn start_as(
        status: StatusCell,
        counters: Arc<Stats>,
        file: PathBuf,
        show: Show,
        part: Option<PartOf>,
    ) -> Progress {
        if let Some(dir) = file.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the state directory; `tern status` will not see this run");
        }
        let bar = (show == Show::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(progress_style());
            bar
        });
        let (cell, totals, to) = (Arc::clone(&status), Arc::clone(&counters), file.clone());
        let label = part.clone();
        let task = tokio::spawn(async move {
            let mut last_sent = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let s = cell.lock().expect("status lock poisoned").clone();
                let st = totals.snapshot();
                let rate = st.sent_bytes.saturating_sub(last_sent);
                last_sent = st.sent_bytes;
                let mut line = status_line(&s, &totals, rate);
                if let Some(part) = &label {
                    part.label(&mut line);
                }
                write_status(&to, &line);
                if let Some(bar) = &bar {
                    bar.set_length(st.round_bytes.max(1));
                    bar.set_position(st.round_done.min(st.round_bytes));
                    let throttled = if s.throttle_bps > 0 {
                        format!(
                            " · writes throttled to {}",
                            human_rate(s.throttle_bps as f64)
                        )
                    } else if s.throttle_cores > 0.0 {
                        format!(" · CPU throttled to {:.2} core", s.throttle_cores)
                    } else {
                        String::new()
                    };
                    bar.set_message(format!(
                        "{} · round {} · sent {} · {} · dirty {} · est. downtime {} ms{throttled}",
                        s.phase,
                        s.round,
                        human_bytes(st.sent_bytes as f64),
                        human_rate(rate as f64),
                        human_bytes(s.remaining_bytes as f64),
                        s.estimated_downtime_ms
                    ));
                } else if show == Show::Lines {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }
        });
        Progress {
            task,
            status,
            counters,
            file,
            part,
        }
    }

    /// Stops the updates and leaves the status file saying how the run
    /// ended: a migration's outcome and report, an agent stopped, or the
    /// error it failed with.
    fn finish(self, ended: Result<Option<&serde_json::Value>, &anyhow::Error>) {
        self.task.abort();
        let s = self.status.lock().expect("status lock poisoned").clone();
        let mut line = status_line(&s, &self.counters, 0);
        match ended {
            Ok(Some(report)) => {
                line["finished"] = true.into();
                line["outcome"] = report["outcome"].clone();
                line["report"] = report.clone();
            }
            Ok(None) => {
                line["finished"] = true.into();
                line["phase"] = "stopped".into();
                line["outcome"] = "stopped".into();
            }
            Err(e) => line = failed_line(line, e),
        }
        if let Some(part) = &self.part {
            part.label(&mut line);
        }
        write_status(&self.file, &line);
    }
}

/// A status line for a run that failed with `e`.
fn failed_line(mut line: serde_json::Value, e: &anyhow::Error) -> serde_json::Value {
    line["finished"] = true.into();
    line["phase"] = "failed".into();
    line["outcome"] = "failed".into();
    line["error"] = super::one_line(e).into();
    line
}

/// Records in the status file that a run failed before its progress started.
fn failed_at_start(file: &Path, e: &anyhow::Error) {
    if file
        .parent()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
    {
        let line = serde_json::json!({ "pid": std::process::id() });
        write_status(file, &failed_line(line, e));
    }
}

fn progress_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("[{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
        .expect("the progress template is valid")
}

/// Replaces `file` whole (a reader never sees half a line).
fn write_status(file: &Path, value: &serde_json::Value) {
    let tmp = file.with_file_name(format!(
        ".{}.tmp",
        file.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    ));
    let done = std::fs::write(&tmp, value.to_string()).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = done {
        tracing::debug!(error = %e, "cannot write the status file");
    }
}

pub fn migrate(m: &MigrateArgs) -> Result<()> {
    if let Some(vm) = &m.vm {
        return vm::migrate(m, vm);
    }
    let report = migrate_report(m)?;
    print_report(m, &report)
}

/// Prints a migration's report (one JSON line with `--json`); a migration
/// that rolled back after its switch is an error.
pub(super) fn print_report(m: &MigrateArgs, report: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if m.source.json {
        writeln!(out, "{report}")?;
    } else {
        write!(out, "{}", render_report(report))?;
    }
    if report["outcome"] == "rolled back" {
        bail!(
            "rolled back after cutover: {}; the source is primary again and holds every write",
            report["failure"].as_str().unwrap_or("health check failed")
        );
    }
    Ok(())
}

/// Runs one disk's migration (here, or by the source agent of `--agent`)
/// and returns its report.
pub(super) fn migrate_report(m: &MigrateArgs) -> Result<serde_json::Value> {
    let health = m.health_checks()?;
    let postcopy = m.postcopy()?;
    let throttle = m.throttle_cgroup()?;
    let report: serde_json::Value = runtime()?.block_on(async {
        if let Some(mut client) = m.agent.connect().await? {
            // A running source agent does the work; this only asks and waits.
            let reply = client
                .cutover(tern::agent::source::CutoverRequest {
                    max_downtime_ms: m.max_downtime.as_millis() as u64,
                    max_rounds: m.max_rounds,
                    pause: m
                        .pause
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    health_cmd: m.health_cmd.clone().unwrap_or_default(),
                    no_switch: m.no_switch,
                    throttle_cgroup: throttle
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    mode: match m.mode {
                        Mode::Precopy => "precopy",
                        Mode::Postcopy => "postcopy",
                        Mode::Auto => "auto",
                    }
                    .to_owned(),
                    postcopy_if_not_converging: m.converge == Some(Converge::Postcopy),
                    throttle_by: match m.throttle_by {
                        None => "",
                        Some(ThrottleBy::Writes) => "writes",
                        Some(ThrottleBy::Cpu) => "cpu",
                    }
                    .to_owned(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("the source agent: {}", s.message()))?
                .into_inner();
            return Ok(serde_json::from_str(&reply.report_json)?);
        }
        let source = &m.source;
        let side = async {
            let mut o = source.options()?;
            for t in m.workload_cpu(throttle.as_ref()) {
                if !o.cpu.contains(&t) {
                    o.cpu.push(t);
                }
            }
            Ok::<_, anyhow::Error>(Source::bind(&o).await?)
        }
        .await
        .inspect_err(|e| failed_at_start(&source.status_file(), e))?;
        let progress = Progress::start(
            side.status(),
            side.stats(),
            source.status_file(),
            source.json,
        );
        let opts = CutoverOptions {
            max_downtime: m.max_downtime,
            max_rounds: m.max_rounds,
            pause: m.pause.clone(),
            health,
            switch: !m.no_switch,
            initial_sync: true,
            throttle: throttle.map(|cgroup| cutover::ThrottleOptions {
                cgroup,
                by: m.throttle_by.map(ThrottleBy::lever),
                record: Some(source.throttle_record()),
            }),
            postcopy,
        };
        let result = Box::pin(until_interrupted(side, &opts)).await;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err);
        let ended = result.and_then(|report| Ok(serde_json::to_value(report)?));
        progress.finish(ended.as_ref().map(Some));
        ended
    })?;
    Ok(report)
}

/// Runs the migration; SIGINT or SIGTERM before the pause stops it cleanly
/// (the workload's write limit lifted, nothing paused, the destination
/// read-only; run it again to resume). From the pause on, a signal waits for
/// the cutover's few milliseconds: dropping it then could resume the
/// source after the destination became writable.
async fn until_interrupted(side: Source, opts: &CutoverOptions) -> Result<cutover::Report> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let signals = tern::agent::cancel_on_signals(cancel.clone());
    let status = side.status();
    let run = side.migrate(opts);
    tokio::pin!(run);
    let mut asked = false;
    let result = loop {
        tokio::select! {
            r = &mut run => break r.map_err(anyhow::Error::from),
            () = cancel.cancelled(), if !asked => {
                asked = true;
                let phase = status.lock().expect("status lock poisoned").phase;
                if before_pause(phase) {
                    break Err(anyhow::anyhow!(
                        "interrupted during {phase}: nothing was paused, the destination stays read-only and the workload's write limit (if any) was lifted; run the same `tern migrate` again to resume"
                    ));
                }
                tracing::warn!(phase, "signal received during the cutover: finishing it first");
            }
        }
    };
    signals.abort();
    result
}

/// Phases in which a migration can stop without a trace: nothing paused yet.
fn before_pause(phase: &str) -> bool {
    matches!(
        phase,
        "" | "connecting"
            | "bulk copy"
            | "delta sync by checksums"
            | "hashing source"
            | "converging"
            | cutover::WAITING_FOR_GROUP
    )
}

/// A migration's report for a person: what happened, the downtime and its
/// parts, and what was sent (`--json` prints the report as one JSON line).
fn render_report(r: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let mb = |k: &str| human_bytes(f(k));
    let mut text = format!(
        "{} after {:.1} s: downtime {:.1} ms (pause {:.1}, flush {:.1}, final delta {:.1} ms for {}, verify {:.1}, switch {:.1}",
        r["outcome"].as_str().unwrap_or("?"),
        f("total_seconds"),
        f("downtime_ms"),
        f("pause_ms"),
        f("flush_ms"),
        f("final_round_ms"),
        mb("final_delta_bytes"),
        f("verify_ms"),
        f("switch_ms"),
    );
    if f("handover_ms") >= 0.1 {
        let _ = write!(text, ", hand-over {:.1}", f("handover_ms"));
    }
    let _ = writeln!(
        text,
        ")\nsent {} ({} on the wire, {} of zeroes skipped) in {} delta rounds; epoch {}",
        mb("sent_bytes"),
        mb("wire_bytes"),
        mb("skipped_zero_bytes"),
        f("rounds"),
        f("epoch"),
    );
    let post = &r["postcopy"];
    if post.is_object() {
        let dst = &post["destination"];
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        let _ = writeln!(
            text,
            "post-copy: {} missing at the switch, the destination held all {:.1} s later; {} pushed, {} demanded in {} fetches (waits p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} reads and writes), {} written there before it arrived",
            human_bytes(num(&post["missing_bytes"])),
            num(&post["push_seconds"]),
            human_bytes(num(&post["pushed_bytes"])),
            human_bytes(num(&post["demand_bytes"])),
            num(&post["demand_ranges"]),
            num(&dst["wait_p50_us"]) / 1e3,
            num(&dst["wait_p99_us"]) / 1e3,
            num(&dst["wait_max_us"]) / 1e3,
            num(&dst["waits"]),
            human_bytes(num(&dst["local_bytes"])),
        );
    }
    if let Some(why) = r["mode_reason"].as_str() {
        let _ = writeln!(text, "{} because {why}", r["mode"].as_str().unwrap_or("?"));
    }
    let t = &r["throttle"];
    if t.is_object() && t["by"] == "cpu" {
        let _ = writeln!(
            text,
            "the CPU of {} throttled for {:.1} s, from {:.2} cores down to {:.2} in {} steps; the quota before was put back",
            t["cgroup"].as_str().unwrap_or("?"),
            t["throttled_ms"].as_f64().unwrap_or(0.0) / 1e3,
            t["cpu_before_cores"].as_f64().unwrap_or(0.0),
            t["lowest_cores"].as_f64().unwrap_or(0.0),
            t["steps"].as_u64().unwrap_or(0),
        );
    } else if t.is_object() {
        let _ = writeln!(
            text,
            "writes of {} to {} throttled for {:.1} s, down to {} in {} steps; the limit before was put back",
            t["cgroup"].as_str().unwrap_or("?"),
            t["device"].as_str().unwrap_or("?"),
            t["throttled_ms"].as_f64().unwrap_or(0.0) / 1e3,
            human_rate(t["lowest_bps"].as_f64().unwrap_or(0.0)),
            t["steps"].as_u64().unwrap_or(0),
        );
    }
    if let Some(why) = r["failure"].as_str() {
        let _ = writeln!(text, "failure: {why}");
    }
    text
}

/// The source agent: continuous replication (a warm standby) with a reported
/// RPO until SIGINT/SIGTERM, serving the control API at `control`.
/// Runs `tern agent --role source`: a warm standby with its status file and,
/// with `control`, its control service.
pub fn source_agent(
    opts: &SourceOptions,
    status_file: &Path,
    json: bool,
    listen: &tern::agent::source::Listen,
) -> Result<()> {
    if opts.via.is_some() {
        // Refused before binding, which would already wait for a destination.
        return Err(tern::agent::source::SourceError::StagedStandby.into());
    }
    runtime()?.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        let side = async { Ok::<_, anyhow::Error>(Source::bind(opts).await?) }
            .await
            .inspect_err(|e| failed_at_start(status_file, e))?;
        let progress =
            Progress::start(side.status(), side.stats(), status_file.to_path_buf(), json);
        let ended = side.run(listen, cancel).await.map_err(anyhow::Error::from);
        progress.finish(ended.as_ref().map(|()| None));
        ended
    })
}

pub fn rollback(r: &RollbackArgs) -> Result<()> {
    let done = runtime()?.block_on(async {
        if let Some(mut client) = r.agent.connect().await? {
            let reply = client
                .rollback(tern::agent::source::RollbackRequest {
                    resume: r
                        .resume
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("the source agent: {}", s.message()))?
                .into_inner();
            return Ok::<_, anyhow::Error>(reply.report_json);
        }
        let path = source_path(r.device.as_ref(), r.file.as_ref())?;
        let to =
            r.to.as_deref()
                .context("give --to HOST:PORT or --agent ADDR")?;
        let peer = tern::replicate::Peer::load(to, r.tls_dir.as_deref(), r.domain.as_deref())?;
        let mut client = peer.connect().await?;
        let report = cutover::rollback(&mut client, &path, None).await?;
        if let Some(target) = &r.resume {
            target.resume_now().await?;
        }
        Ok(serde_json::to_string(&report)?)
    });
    // `tern status` must not go on saying "cut over" (or a stale phase).
    let file = status_file(&r.state_dir, r.device.as_ref().or(r.file.as_ref()));
    if r.agent.agent.is_none() && std::fs::create_dir_all(&r.state_dir).is_ok() {
        let line = serde_json::json!({ "pid": std::process::id(), "finished": true });
        match &done {
            Ok(json) => {
                let mut line = line;
                line["phase"] = "rolled back: source is primary".into();
                line["outcome"] = "rolled back".into();
                line["report"] = serde_json::from_str(json).unwrap_or_default();
                write_status(&file, &line);
            }
            Err(e) => write_status(&file, &failed_line(line, e)),
        }
    }
    let json = done?;
    let mut out = std::io::stdout().lock();
    if r.json {
        writeln!(out, "{json}")?;
    } else {
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        writeln!(
            out,
            "rolled back: {} regions ({}) copied back from the destination in {:.1} s; the source is primary at epoch {}",
            f("regions"),
            human_bytes(f("bytes")),
            f("seconds"),
            f("epoch"),
        )?;
    }
    Ok(())
}

pub fn status(s: &StatusArgs) -> Result<()> {
    if s.agent.agent.is_some() {
        if let Some(run) = &s.run {
            bail!(
                "--agent shows that agent's run: drop {run} (or --agent to read the state directory)"
            );
        }
        let reply = runtime()?.block_on(async {
            let mut client = s.agent.connect().await?.context("no agent")?;
            let reply = client
                .status(tern::agent::source::StatusRequest {})
                .await
                .map_err(|e| anyhow::anyhow!("the source agent: {}", e.message()))?;
            Ok::<_, anyhow::Error>(reply.into_inner())
        })?;
        let v = serde_json::json!({
            "phase": reply.phase,
            "epoch": reply.epoch,
            "round": reply.round,
            "sent_bytes": reply.sent_bytes,
            "wire_bytes": reply.wire_bytes,
            "remaining_bytes": reply.remaining_bytes,
            "rate_bps": reply.bandwidth_bps,
            "dirty_rate_bps": reply.dirty_rate_bps,
            "estimated_downtime_ms": reply.estimated_downtime_ms,
            "rpo_ms": reply.rpo_ms,
            "throttle_bps": reply.throttle_bps,
            "throttle_cores": reply.throttle_cores,
            "missing_bytes": reply.missing_bytes,
            "demands": reply.demands,
            "demand_wait_p50_us": reply.demand_wait_p50_us,
            "demand_wait_p99_us": reply.demand_wait_p99_us,
            "reconnects": reply.reconnects,
            "gaps": reply.gaps,
        });
        return print_status(&v, s.json);
    }
    let mut runs = read_runs(&s.state_dir)?;
    if let Some(run) = &s.run {
        // A disk by its path (`/dev/vdb`, `./disk.img`), else a run's name.
        let wanted = if run.contains('/') {
            run_name(Some(&PathBuf::from(run)))
        } else {
            run.clone()
        };
        let names: Vec<String> = runs.iter().map(|(n, _)| n.clone()).collect();
        runs.retain(|(name, _)| *name == wanted);
        if runs.is_empty() {
            bail!(
                "no run {wanted} in {} (there: {})",
                s.state_dir.display(),
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            );
        }
    }
    for (_, v) in &mut runs {
        mark_vanished(v);
    }
    if s.json {
        let mut out = std::io::stdout().lock();
        for (name, v) in &runs {
            let mut v = v.clone();
            v["name"] = name.clone().into();
            writeln!(out, "{v}")?;
        }
        return Ok(());
    }
    match runs.as_slice() {
        [(_, v)] => print_status(v, false),
        _ => print_runs(&runs),
    }
}

/// Every run's status file in `dir` (name, contents), by name.
fn read_runs(dir: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    let none = || {
        format!(
            "no migration status in {}: is `tern migrate` or a source agent running (with this --state-dir)?",
            dir.display()
        )
    };
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(none)? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let name = if file == LEGACY_STATUS {
            "migrate"
        } else if let Some(name) = file.strip_suffix(STATUS_SUFFIX) {
            name
        } else {
            continue;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // Gone between the listing and the read: a run's file is
            // replaced whole, never removed, so this is someone's cleanup.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a status file", path.display()))?;
        runs.push((name.to_owned(), v));
    }
    anyhow::ensure!(!runs.is_empty(), none());
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(runs)
}

/// Several runs, one line each.
fn print_runs(runs: &[(String, serde_json::Value)]) -> Result<()> {
    std::io::stdout()
        .lock()
        .write_all(runs_table(runs).as_bytes())?;
    Ok(())
}

fn runs_table(runs: &[(String, serde_json::Value)]) -> String {
    use std::fmt::Write as _;
    // A VM's parts under one line for the VM (their sums, the phase of the
    // first part not cut over), then the runs of no VM.
    let mut vms: Vec<&str> = runs.iter().filter_map(|(_, v)| v["vm"].as_str()).collect();
    vms.sort_unstable();
    vms.dedup();
    let label = |name: &str, v: &serde_json::Value| match v["part"].as_str() {
        Some(part) if v["vm"].is_string() => format!("  {part}"),
        _ => name.to_owned(),
    };
    let width = runs
        .iter()
        .map(|(n, v)| label(n, v).len())
        .chain(vms.iter().map(|vm| vm.len() + 3))
        .max()
        .unwrap_or(0)
        .max(3);
    let mut out = format!(
        "{:width$}  {:>10}  {:>10}  {:>12}  {:>9}  phase\n",
        "run", "sent", "dirty", "rate", "RPO"
    );
    let row = |out: &mut String, name: &str, v: &serde_json::Value| {
        let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{name:width$}  {:>10}  {:>10}  {:>12}  {:>6} ms  {}",
            human_bytes(n("sent_bytes")),
            human_bytes(n("remaining_bytes")),
            human_rate(n("rate_bps")),
            n("rpo_ms"),
            run_phase(v),
        );
    };
    for vm in &vms {
        let parts: Vec<_> = runs.iter().filter(|(_, v)| v["vm"] == *vm).collect();
        let sum = |k: &str| -> f64 {
            parts
                .iter()
                .map(|(_, v)| v[k].as_f64().unwrap_or(0.0))
                .sum()
        };
        let rpo = parts
            .iter()
            .map(|(_, v)| v["rpo_ms"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max);
        let behind = parts
            .iter()
            .map(|(_, v)| run_phase(v))
            .find(|p| !p.starts_with("finished: cut over"))
            .unwrap_or_else(|| "finished: cut over".to_owned());
        let summary = serde_json::json!({
            "sent_bytes": sum("sent_bytes"),
            "remaining_bytes": sum("remaining_bytes"),
            "rate_bps": sum("rate_bps"),
            "rpo_ms": rpo,
            "phase": format!("{} parts; {behind}", parts.len()),
        });
        row(&mut out, &format!("vm {vm}"), &summary);
        for (name, v) in parts {
            row(&mut out, &label(name, v), v);
        }
    }
    for (name, v) in runs.iter().filter(|(_, v)| !v["vm"].is_string()) {
        row(&mut out, name, v);
    }
    out
}

/// A run's phase as `tern status` says it: its error, its outcome once
/// finished, else the phase it is in.
fn run_phase(v: &serde_json::Value) -> String {
    match (v["outcome"].as_str(), v["error"].as_str()) {
        (_, Some(e)) => format!("failed: {e}"),
        (Some(outcome), None) if v["finished"] == true => format!("finished: {outcome}"),
        _ => v["phase"].as_str().unwrap_or("?").to_owned(),
    }
}

/// A status file whose run is gone without saying how it ended (SIGKILL,
/// a crash, a reboot) is marked so: its phase is no longer going on.
fn mark_vanished(v: &mut serde_json::Value) {
    let alive = |pid: u64| Path::new(&format!("/proc/{pid}")).exists();
    if v["finished"] == false
        && let Some(pid) = v["pid"].as_u64()
        && !alive(pid)
    {
        let phase = v["phase"].as_str().unwrap_or("?").to_owned();
        v["finished"] = true.into();
        v["outcome"] = "interrupted".into();
        v["phase"] = format!(
            "interrupted during {phase}: the run (pid {pid}) ended without finishing; run the same `tern migrate` again to resume"
        )
        .into();
    }
}

fn print_status(v: &serde_json::Value, json: bool) -> Result<()> {
    let mut v = v.clone();
    mark_vanished(&mut v);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    writeln!(
        out,
        "phase                {}",
        v["phase"].as_str().unwrap_or("?")
    )?;
    if v["finished"] == true {
        writeln!(
            out,
            "finished             yes: {}",
            v["outcome"].as_str().unwrap_or("?")
        )?;
    }
    if let Some(e) = v["error"].as_str() {
        writeln!(out, "error                {e}")?;
    }
    if let Some(ms) = v["report"]["downtime_ms"].as_f64() {
        writeln!(out, "downtime             {ms:.1} ms")?;
    }
    writeln!(out, "epoch                {}", n("epoch"))?;
    writeln!(out, "round                {}", n("round"))?;
    writeln!(out, "sent                 {}", human_bytes(n("sent_bytes")))?;
    writeln!(
        out,
        "remaining (dirty)    {}",
        human_bytes(n("remaining_bytes"))
    )?;
    writeln!(out, "rate                 {}", human_rate(n("rate_bps")))?;
    writeln!(
        out,
        "dirty rate           {}",
        human_rate(n("dirty_rate_bps"))
    )?;
    writeln!(
        out,
        "estimated downtime   {} ms",
        n("estimated_downtime_ms")
    )?;
    writeln!(out, "RPO                  {} ms", n("rpo_ms"))?;
    if n("throttle_bps") > 0.0 {
        writeln!(
            out,
            "writes throttled to  {}",
            human_rate(n("throttle_bps"))
        )?;
    }
    if n("throttle_cores") > 0.0 {
        writeln!(out, "CPU throttled to     {:.2} core", n("throttle_cores"))?;
    }
    if v["phase"].as_str().is_some_and(|p| p.contains("post-copy")) {
        writeln!(
            out,
            "still on the source  {} (post-copy)",
            human_bytes(n("missing_bytes"))
        )?;
        writeln!(
            out,
            "demand fetches       {} (waits p50 {:.2} ms, p99 {:.2} ms)",
            n("demands"),
            n("demand_wait_p50_us") / 1e3,
            n("demand_wait_p99_us") / 1e3
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn a_run_is_named_after_its_disk() {
        assert_eq!(
            super::run_name(Some(&PathBuf::from("/dev/vdz9"))),
            "dev-vdz9"
        );
        assert_eq!(super::run_name(None), "migrate");
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"x").expect("write");
        // The same file by another path is the same run.
        let other = dir.path().join(".").join("disk.img");
        assert_eq!(super::run_name(Some(&img)), super::run_name(Some(&other)));
        assert!(super::run_name(Some(&img)).ends_with("-disk.img"));
        // Paths that `/` as `-` alone would confuse stay apart.
        let names: Vec<String> = ["/dev/vdb", "/dev-vdb", "/a-b/c", "/a/b-c", "/srv/.x"]
            .iter()
            .map(|p| super::run_name(Some(&PathBuf::from(p))))
            .collect();
        assert_eq!(
            names,
            [
                "dev-vdb",
                "dev\\x2dvdb",
                "a\\x2db-c",
                "a-b\\x2dc",
                "srv-\\x2ex"
            ]
        );
    }

    #[test]
    fn status_lists_every_run_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let put =
            |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        put(
            "dev-vdb.status.json",
            r#"{"phase":"converging","sent_bytes":1048576,"pid":1}"#,
        );
        put(
            "var-lib-vm-a.img.status.json",
            r#"{"phase":"cut over","finished":true,"outcome":"cut over"}"#,
        );
        put(
            "dev-vdc.status.json",
            r#"{"phase":"failed","finished":true,"outcome":"failed","error":"no route"}"#,
        );
        put("dev-vdb.throttle.json", r#"{"device":"8:16"}"#);
        put(".dev-vdb.status.json.tmp", "{");
        // A disk named `.../x.throttle` has its status here, not hidden.
        put("srv-x.throttle.status.json", r#"{"phase":"converging"}"#);
        put("notes.txt", "x");
        let runs = super::read_runs(dir.path()).expect("runs");
        let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["dev-vdb", "dev-vdc", "srv-x.throttle", "var-lib-vm-a.img"]
        );
        let table = super::runs_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(
            lines[1].starts_with("dev-vdb ") && lines[1].ends_with("converging"),
            "{table}"
        );
        assert!(lines[1].contains("1 MiB"), "{table}");
        assert!(lines[2].ends_with("failed: no route"), "{table}");
        assert!(lines[4].ends_with("finished: cut over"), "{table}");

        let empty = tempfile::tempdir().expect("tempdir");
        let e = super::read_runs(empty.path()).expect_err("nothing to show");
        assert!(e.to_string().contains("no migration status in"), "{e}");
        put("broken.status.json", "{");
        let e = super::read_runs(dir.path()).expect_err("a damaged file");
        assert!(
            format!("{e:#}").contains("broken.status.json is not a status file"),
            "{e:#}"
        );
    }

    #[test]
    fn a_vms_parts_are_shown_under_one_line_for_the_vm() {
        let run = |name: &str, v: serde_json::Value| (name.to_owned(), v);
        let runs = vec![
            run(
                "dev-vdb",
                serde_json::json!({"phase":"converging","sent_bytes":1_048_576}),
            ),
            run(
                "var-lib-a.raw",
                serde_json::json!({"vm":"libvirt:web@qemu:///x","part":"vda","phase":"waiting for the VM's other parts",
                    "sent_bytes":2_097_152,"remaining_bytes":0,"rpo_ms":5}),
            ),
            run(
                "var-lib-b.qcow2",
                serde_json::json!({"vm":"libvirt:web@qemu:///x","part":"vdb","phase":"round 3",
                    "sent_bytes":1_048_576,"remaining_bytes":4096,"rpo_ms":40}),
            ),
        ];
        let table = super::runs_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[1].starts_with("vm libvirt:web@qemu:///x "), "{table}");
        // The sums, the worst RPO and the first part not cut over.
        assert!(
            lines[1].contains("3 MiB") && lines[1].contains("40 ms"),
            "{table}"
        );
        assert!(
            lines[1].ends_with("2 parts; waiting for the VM's other parts"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("  vda ") && lines[3].starts_with("  vdb "),
            "{table}"
        );
        assert!(lines[4].starts_with("dev-vdb "), "{table}");
    }

    #[test]
    fn a_status_whose_process_is_gone_reads_interrupted() {
        // A pid above the kernel's pid_max is never alive.
        let mut v = serde_json::json!({"phase": "bulk copy", "pid": 1u64 << 40, "finished": false});
        super::mark_vanished(&mut v);
        assert_eq!(v["outcome"], "interrupted", "{v}");
        assert!(
            v["phase"]
                .as_str()
                .expect("phase")
                .contains("during bulk copy")
        );
        let mut live =
            serde_json::json!({"phase": "bulk copy", "pid": std::process::id(), "finished": false});
        super::mark_vanished(&mut live);
        assert_eq!(live["phase"], "bulk copy");
    }

    #[test]
    fn the_report_reads_as_sentences_with_rounded_figures() {
        let r = serde_json::json!({
            "outcome": "cut over", "total_seconds": 3.04, "downtime_ms": 11.904_767_999_999_999,
            "pause_ms": 2.0, "flush_ms": 0.5, "final_round_ms": 4.0, "final_delta_bytes": 1_250_000,
            "verify_ms": 3.0, "switch_ms": 1.0, "sent_bytes": 540_100_000, "wire_bytes": 123_400_000,
            "skipped_zero_bytes": 400_000_000, "rounds": 5, "epoch": 3, "failure": null,
        });
        let text = super::render_report(&r);
        assert!(
            text.starts_with("cut over after 3.0 s: downtime 11.9 ms"),
            "{text}"
        );
        assert!(text.contains("final delta 4.0 ms for 1.2 MiB"), "{text}");
        assert!(
            text.contains("sent 515.1 MiB (117.7 MiB on the wire"),
            "{text}"
        );
        assert!(!text.contains('{') && !text.contains("11.9047"), "{text}");
    }

    #[test]
    fn the_progress_bar_template_parses() {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_style(super::progress_style());
        bar.set_length(10);
        bar.set_position(5);
        assert_eq!(bar.position(), 5);
    }
}
