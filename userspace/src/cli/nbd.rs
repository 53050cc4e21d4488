//! `tern nbd`: a standalone NBD server for one image.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use super::args::{parse_size, runtime};

#[derive(Subcommand)]
pub enum NbdCommand {
    /// Export one raw image or block device until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  tern nbd serve --image disk.img --size 64M --listen 127.0.0.1:10810\n  qemu-io -f raw nbd://127.0.0.1:10810/tern -c 'read 0 1M'\n  tern nbd serve --image /dev/vdb --read-only --listen unix:/run/vdb.sock\n  tern nbd serve --image disk.img --listen 0.0.0.0:10809 --tls-dir pki/dst\n  nbdinfo 'nbds://dst/tern?tls-certificates=pki/src'"
    )]
    Serve {
        #[arg(long)]
        image: PathBuf,
        #[arg(long, default_value = "tern")]
        name: String,
        /// `HOST:PORT` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Buffered I/O instead of `O_DIRECT`.
        #[arg(long)]
        no_direct: bool,
        /// Serve on a non-loopback address without TLS (anyone who reaches
        /// the port can read and write).
        #[arg(long)]
        insecure_nbd: bool,
        /// Require TLS (STARTTLS) with this directory from `tern certs init`
        /// (`ca.pem`, `cert.pem`, `key.pem`); clients show a certificate from
        /// the same authority. Allows a non-loopback --listen.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
    },
}

/// Runs `tern nbd`.
pub fn run(cmd: NbdCommand) -> Result<()> {
    let NbdCommand::Serve {
        image,
        name,
        listen,
        read_only,
        size,
        no_direct,
        insecure_nbd,
        tls_dir,
    } = cmd;
    let opts = tern::nbd::StandaloneOptions {
        image,
        name,
        listen,
        read_only,
        size,
        direct: !no_direct,
        insecure: insecure_nbd,
        tls_dir,
    };
    runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        tern::nbd::serve_standalone(&opts, cancel).await
    })?;
    Ok(())
}
