//! `tern ram-file`: prepare a guest-RAM file so that Tern sees each page the guest dirties.

use std::path::PathBuf;

use clap::Args;

use super::args::parse_size;

#[derive(Args)]
#[command(
    after_help = "Example:\n  tern ram-file /var/lib/vm/guest.ram --size 4G\n  qemu-system-x86_64 -machine q35,memory-backend=ram0 -m 4G \\\n    -object memory-backend-file,id=ram0,size=4G,mem-path=/var/lib/vm/guest.ram,share=on ..."
)]
pub struct RamFileArgs {
    /// The RAM file, on a block-backed file system (created or grown; contents kept).
    path: PathBuf,
    /// The guest's RAM size (QEMU's -m).
    #[arg(long, value_parser = parse_size)]
    size: u64,
}

pub fn run(a: &RamFileArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let started = std::time::Instant::now();
    let done = tern::ramfile::prepare(&a.path, a.size, |bytes| {
        tracing::info!(
            done_mib = bytes >> 20,
            total_mib = a.size >> 20,
            "reading the RAM file into 4 KiB pages"
        );
    })?;
    writeln!(
        std::io::stdout().lock(),
        "{}: {} MiB ready, {} pages of 4 KiB in the page cache ({} MiB added) in {:.1} s",
        a.path.display(),
        a.size >> 20,
        done.pages,
        done.grown_bytes >> 20,
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}
