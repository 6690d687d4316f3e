//! `hyperkeep check`: verify the repository; exit 1 when anything is wrong.

use anyhow::Result;
use repo::check::{check, CheckOptions, ReadData};

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human;
use crate::{EXIT_OK, EXIT_PROBLEMS};

pub fn run(cli: &Cli, read_data: bool, subset: Option<&str>) -> Result<u8> {
    let read_data = match (read_data, subset) {
        (true, _) => ReadData::All,
        // A different window each run, so repeated subset checks cover every pack over time.
        (false, Some(s)) => ReadData::parse_subset(s, random_seed())?,
        (false, None) => ReadData::None,
    };
    let repo = repo_open::open(cli)?;
    let report = check(&repo, &CheckOptions { read_data })?;
    let code = if report.is_clean() {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    };
    if cli.json {
        let mut v = serde_json::to_value(&report)?;
        v["clean"] = serde_json::json!(report.is_clean());
        super::print_json(&v)?;
        return Ok(code);
    }
    println!(
        "checked {}, {}, {}",
        super::plural(report.snapshots, "snapshot", "snapshots"),
        super::plural(report.index_files, "index file", "index files"),
        super::plural(report.packs, "pack", "packs"),
    );
    if read_data != ReadData::None {
        println!(
            "read {} ({}), verified {}",
            super::plural(report.packs_read, "pack", "packs"),
            human(report.bytes_read),
            super::plural(report.blobs_verified, "blob", "blobs"),
        );
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if report.is_clean() {
        println!("no problems found");
    } else {
        println!(
            "{} found:",
            super::plural(report.problems.len() as u64, "problem", "problems")
        );
        for p in &report.problems {
            println!("  - {p}");
        }
    }
    Ok(code)
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}
