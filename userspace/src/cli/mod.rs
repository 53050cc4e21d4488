//! The `tern` command line: one file per command group, parsing and
//! printing only; the `tern` library does the work.

mod agent;
mod analyze;
mod args;
mod certs;
mod config;
mod failover;
mod history;
mod migrate;
mod nbd;
mod plan;
mod predict;
mod ram_file;
mod replica;
mod trace;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Live migration of a running server's disk, guided by eBPF tracing"
)]
struct Cli {
    /// Settings file: a table per command of its flags (`[agent]`, `[nbd.serve]`), which the
    /// command line overrides [default: /etc/tern/tern.toml when it exists].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trace block I/O (and page faults) with eBPF, or work with trace files.
    Trace(trace::TraceArgs),
    /// Run an agent: `--role destination` receives extents and exports the disk over NBD.
    Agent(agent::AgentArgs),
    /// Certificates for mutual TLS between agents.
    #[command(
        subcommand,
        after_help = "Example:\n  tern certs init /etc/tern/pki --host src --host dst"
    )]
    Certs(certs::CertsCommand),
    /// Replica client operations against a destination agent.
    #[command(
        subcommand,
        after_help = "Example:\n  tern replica push --from src.img --to dst:7443 --tls-dir pki/src"
    )]
    Replica(replica::ReplicaCommand),
    /// A standalone NBD server for one image.
    #[command(
        subcommand,
        after_help = "Example:\n  tern nbd serve --image disk.img --size 64M --listen 127.0.0.1:10810"
    )]
    Nbd(nbd::NbdCommand),
    /// Live-migrate a disk to a destination agent: copy, converge, pause, final delta, verify, switch.
    Migrate(migrate::MigrateArgs),
    /// Make the source primary again: copy back what the destination accepted, fence it.
    Rollback(migrate::RollbackArgs),
    /// The source host is lost: promote its replica to primary (a new epoch fences
    /// the source, the export turns writable) and show the recovery point.
    Failover(failover::FailoverArgs),
    /// After a failover: migrate the promoted replica's data home to the old
    /// source (only what differs), then demote the replica.
    Failback(failover::FailbackArgs),
    /// The running migration's (or source agent's) phase, bytes, rates, downtime estimate, RPO.
    Status(migrate::StatusArgs),
    /// The I/O history a source agent recorded into object storage (`--history`).
    #[command(subcommand)]
    History(history::HistoryCommand),
    /// Analyze a trace: heatmaps and the workload's profile.
    #[command(
        subcommand,
        after_help = "Examples:\n  tern analyze report loop0.trace\n  tern analyze heatmap loop0.trace --out heat.png"
    )]
    Analyze(analyze::AnalyzeCommand),
    /// What-if table of replication units for a trace, and the plan `migrate --plan` takes.
    Plan(plan::PlanArgs),
    /// Forecast the next horizon's reads and writes from a trace (`eval`: measure the models).
    Predict(predict::PredictArgs),
    /// Prepare a guest-RAM file (QEMU memory-backend-file, share=on) so that Tern sees each
    /// 4 KiB page the guest dirties; run before QEMU maps it, then `migrate --file` it.
    RamFile(ram_file::RamFileArgs),
}

/// Parses the command line, runs the command, prints its error on one line.
pub fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match config::expand(
        std::env::args_os().collect(),
        &Cli::command(),
        std::path::Path::new(config::DEFAULT_PATH),
    ) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tern: {}", one_line(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    // The matches as well as the parsed struct: a command that must tell a
    // flag given from a default (`tern agent`'s roles) reads its source.
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Trace(t) => trace::run(t),
        Command::Agent(a) => agent::run(
            a,
            matches
                .subcommand_matches("agent")
                .expect("clap parsed the agent command, so it has its matches"),
        ),
        Command::Certs(c) => certs::run(c),
        Command::Replica(r) => replica::run(r),
        Command::Nbd(n) => nbd::run(n),
        Command::Migrate(m) => migrate::migrate(&m),
        Command::Rollback(r) => migrate::rollback(&r),
        Command::Status(s) => migrate::status(&s),
        Command::Failover(f) => failover::failover(&f),
        Command::Failback(f) => failover::failback(&f),
        Command::History(h) => history::run(h),
        Command::Analyze(a) => analyze::run(a),
        Command::Plan(p) => plan::plan(&p),
        Command::Predict(p) => predict::predict(p),
        Command::RamFile(r) => ram_file::run(&r),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what to do; the cause chain follows the colon.
            eprintln!("tern: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: the library's
/// errors name their cause in their own message too (so a log line of one
/// error is whole), so a cause the text already holds is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_is_consistent() {
        // Clap's own checks: no two flags of one command share a name (the
        // agent flattens migrate's source flags), every `requires` names a flag.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn every_command_shows_an_example_in_its_help() {
        fn missing(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let leaves: Vec<&clap::Command> = cmd
                .get_subcommands()
                .filter(|c| c.get_name() != "help")
                .collect();
            let shown = cmd
                .get_after_help()
                .is_some_and(|h| h.to_string().contains("Example"));
            if !shown {
                out.push(path.clone());
            }
            for c in leaves {
                missing(c, &path, out);
            }
        }
        let mut out = Vec::new();
        for c in super::Cli::command().get_subcommands() {
            missing(c, "tern", &mut out);
        }
        assert!(out.is_empty(), "no example in the help of: {out:?}");
    }

    #[test]
    fn a_source_agent_takes_migrates_source_flags_and_peer_as_to() {
        let cli = super::Cli::try_parse_from([
            "tern",
            "agent",
            "--role",
            "source",
            "--device",
            "/dev/vdb",
            "--peer",
            "dst:7443",
            "--tls-dir",
            "pki/src",
            "--max-rate",
            "10M",
            "--region-size",
            "256K",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err().map(|e| e.to_string()));
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory (os error 2)",
        );
        let open = tern::image::ImageError::Open {
            path: "/x.img".into(),
            source: io,
        };
        let e = anyhow::Error::new(open).context("starting the destination agent");
        let line = super::one_line(&e);
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        assert!(
            line.starts_with("starting the destination agent: could not open the image /x.img"),
            "{line}"
        );
    }
}
