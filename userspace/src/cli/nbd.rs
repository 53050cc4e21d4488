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
        after_help = "Examples:\n  tern nbd serve --image disk.img --size 64M --listen 127.0.0.1:10810\n  qemu-io -f raw nbd://127.0.0.1:10810/tern -c 'read 0 1M'\n  tern nbd serve --image /dev/vdb --read-only --listen unix:/run/vdb.sock"
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
        /// Serve on a non-loopback address although NBD is plaintext and
        /// unauthenticated (anyone who reaches the port can read and write).
        #[arg(long)]
        insecure_nbd: bool,
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
    } = cmd;
    let opts = tern::nbd::StandaloneOptions {
        image,
        name,
        listen,
        read_only,
        size,
        direct: !no_direct,
        insecure: insecure_nbd,
    };
    runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tern::agent::cancel_on_signals(cancel.clone());
        tern::nbd::serve_standalone(&opts, cancel).await
    })?;
    Ok(())
}
