//! `hyperkeep unlock`: remove locks left behind by a crashed hyperkeep.

use anyhow::Result;
use serde_json::json;

use crate::cli::Cli;
use crate::repo_open;
use crate::EXIT_OK;

pub fn run(cli: &Cli, remove_all: bool) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    let removed = repo::lock::unlock(&repo, remove_all)?;
    if cli.json {
        let v: Vec<_> = removed
            .iter()
            .map(|l| json!({ "name": l.name, "stale": l.stale, "lock": l.info }))
            .collect();
        super::print_json(&json!({ "removed": v }))?;
    } else if removed.is_empty() {
        println!(
            "no {}locks to remove",
            if remove_all { "" } else { "stale " }
        );
    } else {
        for l in &removed {
            match &l.info {
                Some(i) => println!(
                    "removed {} lock of `{}` on {} (pid {}, {}){}",
                    if i.exclusive {
                        "an exclusive"
                    } else {
                        "a shared"
                    },
                    i.operation,
                    i.hostname,
                    i.pid,
                    super::local_time(&i.time),
                    if l.stale { ", stale" } else { "" }
                ),
                None => println!("removed unreadable lock object locks/{}", l.name),
            }
        }
    }
    Ok(EXIT_OK)
}
