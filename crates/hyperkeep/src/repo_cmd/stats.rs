//! `hyperkeep stats`: sizes, deduplication and compression over the whole repository.

use anyhow::Result;
use repo::snapshot::list_snapshots;

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

pub fn run(cli: &Cli) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    let snaps = list_snapshots(&repo)?;
    let index = repo.load_index()?;
    let s = repo::stats::stats(&repo, &index, &snaps)?;
    if cli.json {
        super::print_json(&s)?;
        return Ok(EXIT_OK);
    }
    let rows = [
        (
            "snapshots",
            format!("{} of {}", s.snapshots, super::plural(s.vms, "VM", "VMs")),
        ),
        (
            "restore size",
            format!(
                "{} (all snapshots' disks and files)",
                human(s.total_restore_size)
            ),
        ),
        (
            "data",
            format!(
                "{} (non-zero chunks, before deduplication)",
                human(s.total_data_bytes)
            ),
        ),
        (
            "unique data",
            format!(
                "{} in {} blobs ({} data, {} table)",
                human(s.unique_raw_bytes),
                s.blobs,
                s.data_blobs,
                s.tree_blobs
            ),
        ),
        (
            "stored",
            format!(
                "{} after compression and encryption",
                human(s.unique_stored_bytes)
            ),
        ),
        (
            "packs",
            format!("{} ({} on disk)", s.packs, human(s.pack_bytes)),
        ),
        ("deduplication", format!("{:.2}x", s.dedup_ratio)),
        ("compression", format!("{:.2}x", s.compression_ratio)),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in rows {
        println!("{:<w$} {v}", format!("{k}:"));
    }
    Ok(EXIT_OK)
}
