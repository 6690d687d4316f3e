//! Command dispatch (`disk` goes to [`crate::disk`]) and the repository commands, one module
//! per command. Each `run` opens the repository through
//! [`crate::repo_open`], calls the `repo` crate, and prints for people or as JSON (`--json`).
//! Exit codes follow the contract (`crate::EXIT_*`); errors are mapped in `crate::output`.

mod backup;
mod check;
mod diff;
mod forget;
mod init;
mod key;
mod prune;
mod restore;
mod snapshots;
mod stats;
mod unlock;

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use crate::cli::{Cli, Command};

pub fn run(cli: &Cli) -> Result<u8> {
    match &cli.command {
        Command::Disk(cmd) => crate::disk::run(cmd, cli.json),
        Command::Init {
            chunk_size,
            encryption,
        } => init::run(cli, *chunk_size, (*encryption).into()),
        Command::Backup(args) => backup::run(cli, args),
        Command::Snapshots { vm } => snapshots::run(cli, vm.as_deref()),
        Command::Restore {
            snapshot,
            target,
            to,
            vm,
            include,
            disk,
            partition,
            overwrite,
        } if !include.is_empty() => crate::granular::restore::run(
            cli,
            &crate::granular::restore::IncludeArgs {
                source: snapshot,
                vm: vm.as_deref(),
                include,
                target,
                disk: *disk,
                partition: *partition,
                overwrite: *overwrite,
            },
        ),
        Command::Restore {
            snapshot,
            target,
            to,
            vm,
            ..
        } => restore::run(cli, snapshot, target, *to, vm.as_deref()),
        Command::Ls(args) => crate::granular::ls::run(cli, args),
        Command::Cat(args) => crate::granular::cat::run(cli, args),
        Command::Find(args) => crate::granular::find::run(cli, args),
        Command::Forget(args) => forget::run(cli, args),
        Command::Prune { dry_run } => prune::run(cli, *dry_run),
        Command::Check {
            read_data,
            read_data_subset,
        } => check::run(cli, *read_data, read_data_subset.as_deref()),
        Command::Stats => stats::run(cli),
        Command::Diff {
            snapshot1,
            snapshot2,
            vm,
        } => diff::run(cli, snapshot1, snapshot2, vm.as_deref()),
        Command::Key(cmd) => key::run(cli, cmd),
        Command::Unlock { remove_all } => unlock::run(cli, *remove_all),
        Command::Preflight(args) => crate::job_cmd::preflight::run(cli, args),
        Command::Run(args) => crate::job_cmd::run::run(cli, args),
        Command::Mount {
            source,
            mountpoint,
            vm,
        } => crate::mount::run(cli, source, mountpoint, vm.as_deref()),
        Command::Replicate(args) => crate::replica_cmd::replicate(cli, args),
        Command::Replica(cmd) => crate::replica_cmd::run(cli, cmd),
    }
}

pub fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A manifest time (RFC 3339, UTC) in the local time zone, to the second, for people.
pub fn local_time(rfc3339: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => t
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Err(_) => rfc3339.to_string(),
    }
}

/// A column table for people: a header row, then rows; columns padded to their widest cell.
/// Columns listed in `right` are right-aligned (numbers, sizes).
pub struct Columns {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    right: Vec<usize>,
}

impl Columns {
    pub fn new(header: &[&str], right: &[usize]) -> Columns {
        Columns {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            right: right.to_vec(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                let pad = widths[i] - c.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right.contains(&i) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    if i + 1 < n {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }
}

/// "1 disk", "2 disks".
pub fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}
