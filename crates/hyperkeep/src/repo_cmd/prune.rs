//! `hyperkeep prune`: delete what no snapshot uses (the repo crate takes the exclusive lock; a
//! dry run only a shared one).

use anyhow::Result;
use repo::prune::{prune, PruneOptions, PruneReport};
use repo::repository::Repository;

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

pub fn run(cli: &Cli, dry_run: bool) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    let report = run_on(&repo, dry_run)?;
    if cli.json {
        super::print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(EXIT_OK)
}

pub fn run_on(repo: &Repository, dry_run: bool) -> Result<PruneReport> {
    let opts = PruneOptions {
        dry_run,
        ..PruneOptions::default()
    };
    Ok(prune(repo, &opts)?)
}

pub fn print_report(r: &PruneReport) {
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "{} reference {} blobs in {} ({})",
        super::plural(r.snapshots, "snapshot", "snapshots"),
        r.used_blobs,
        super::plural(r.packs_before, "pack", "packs"),
        human(r.bytes_before)
    );
    println!(
        "  unused packs {would}deleted: {}; packs {would}repacked: {} (into {} new, {}); kept: {}",
        r.packs_unused,
        r.packs_repacked,
        r.packs_written,
        human(r.bytes_written),
        r.packs_kept
    );
    if r.orphans_deleted + r.orphans_kept > 0 {
        println!(
            "  packs in no index: {} {would}deleted, {} kept (younger than the grace period: a backup may still be writing them)",
            r.orphans_deleted, r.orphans_kept
        );
    }
    if r.packs_missing > 0 {
        println!(
            "  indexed packs missing: {} (dropped from the index; run `hyperkeep check`)",
            r.packs_missing
        );
    }
    println!(
        "  {} {would}freed; the repository {} {} in {}",
        human(r.bytes_deleted),
        if r.dry_run { "would hold" } else { "holds" },
        human(r.bytes_after),
        super::plural(r.packs_after, "pack", "packs")
    );
    if r.dry_run {
        println!("dry run: nothing was changed");
    }
}
