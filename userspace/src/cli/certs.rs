//! `tern certs`: a small CA and one certificate per host for mutual TLS.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a small CA and one certificate per host, for a test or a lab.
    #[command(
        after_help = "Example:\n  tern certs init /etc/tern/pki --host src.example --host dst.example\n  # then each host takes its own directory, /etc/tern/pki/HOST (ca.pem, cert.pem, key.pem), as --tls-dir"
    )]
    Init {
        dir: PathBuf,
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// Runs `tern certs`.
pub fn run(cmd: CertsCommand) -> Result<()> {
    let CertsCommand::Init { dir, hosts } = cmd;
    let report = tern::certs::init(&dir, &hosts)?;
    for d in &report.host_dirs {
        eprintln!(
            "certificates for {} in {} (pass it as --tls-dir)",
            d.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            d.display()
        );
    }
    Ok(())
}
