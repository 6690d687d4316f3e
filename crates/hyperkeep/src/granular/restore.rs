//! `hyperkeep restore SNAPSHOT --include GUESTPATH... --target DIR`: files from inside a disk,
//! through `guestfs::extract` (name escaping, no writes outside the target, streams as
//! `NAME%%STREAM`, symlinks recreated and never followed). Exit 1 when entries were skipped.

use std::path::Path;

use anyhow::Result;
use guestfs::extract::{extract, ExtractOptions, ExtractReport};
use serde::Serialize;

use crate::cli::Cli;
use crate::size::human;
use crate::{EXIT_OK, EXIT_PROBLEMS};

pub struct IncludeArgs<'a> {
    pub source: &'a str,
    pub vm: Option<&'a str>,
    pub include: &'a [String],
    pub target: &'a Path,
    pub disk: Option<usize>,
    pub partition: Option<u32>,
    pub overwrite: bool,
}

pub fn run(cli: &Cli, args: &IncludeArgs) -> Result<u8> {
    let src = super::open_source(cli, args.source, args.vm)?;
    let picked = super::select_one(&src, args.disk, args.partition)?;
    let opts = ExtractOptions {
        overwrite: args.overwrite,
        ..ExtractOptions::default()
    };
    let paths: Vec<&str> = args.include.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let report = extract(picked.fs.as_ref(), &paths, args.target, &opts)?;
    let repo_bytes = src.repo.as_ref().map(|r| r.pack_bytes());
    if cli.json {
        #[derive(Serialize)]
        struct Out<'a> {
            source: &'a str,
            disk: usize,
            partition: u32,
            target: &'a Path,
            #[serde(flatten)]
            report: &'a ExtractReport,
            /// Pack bytes read from the repository (snapshots only).
            repository_bytes_read: Option<u64>,
            seconds: f64,
        }
        crate::repo_cmd::print_json(&Out {
            source: &src.describe,
            disk: picked.disk,
            partition: picked.partition,
            target: args.target,
            report: &report,
            repository_bytes_read: repo_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })?;
    } else {
        println!(
            "restored {} file(s), {} dir(s), {} symlink(s), {} hard link(s), {} stream(s), {} from {} (disk {}, partition {}) into {}",
            report.files,
            report.directories,
            report.symlinks,
            report.hard_links,
            report.streams,
            human(report.bytes),
            src.describe,
            picked.disk,
            picked.partition,
            args.target.display()
        );
        if let Some(b) = repo_bytes {
            println!("read {} of chunk data from the repository", human(b));
        }
        for r in &report.renamed {
            println!("  renamed {:?} -> {}", r.guest, r.host.display());
        }
        for s in &report.skipped {
            eprintln!("skipped {}: {}", s.path, s.reason);
        }
    }
    Ok(if report.skipped.is_empty() {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    })
}
