//! `hyperkeep restore`: a snapshot's disks and files into a directory, under a shared lock (so a
//! prune cannot delete packs while we read them).

use std::path::Path;

use anyhow::Result;
use repo::lock::Lock;
use repo::snapshot::{find_snapshot, short_id};
use vdisk::DiskFormat;

use crate::cli::{Cli, FormatArg};
use crate::progress::Bar;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

pub fn run(
    cli: &Cli,
    spec: &str,
    target: &Path,
    to: Option<FormatArg>,
    vm: Option<&str>,
) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    let _lock = Lock::acquire(&repo, false, "restore")?;
    let (id, snap) = find_snapshot(&repo, spec, vm)?;
    let to = to.map(|f| match f {
        FormatArg::Vhdx => DiskFormat::Vhdx,
        FormatArg::Vhd => DiskFormat::Vhd,
        FormatArg::Raw => DiskFormat::Raw,
    });
    let bar = Bar::new("restore", cli.no_progress);
    let report = repo::restore::restore(&repo, &id, &snap, target, to, &bar)?;
    bar.finish();
    if cli.json {
        super::print_json(&report)?;
        return Ok(EXIT_OK);
    }
    println!(
        "restored snapshot {} (VM {}, {}) into {}",
        short_id(&id),
        snap.vm,
        super::local_time(&snap.time),
        target.display()
    );
    for d in &report.disks {
        println!(
            "  disk {} ({}, {} virtual, {} written)",
            d.path.display(),
            d.format,
            human(d.virtual_size),
            human(d.bytes_written)
        );
    }
    for f in &report.files {
        println!("  file {} ({})", f.path.display(), human(f.size));
    }
    Ok(EXIT_OK)
}
