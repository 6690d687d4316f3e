//! `hyperkeep diff`: what changed between two snapshots.

use anyhow::Result;
use repo::diff::{diff, Change};
use repo::snapshot::{find_snapshot, short_id};

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

fn change(c: Change) -> &'static str {
    match c {
        Change::Added => "added",
        Change::Removed => "removed",
        Change::Changed => "changed",
        Change::Unchanged => "unchanged",
    }
}

fn size(s: Option<u64>) -> String {
    s.map(human).unwrap_or_else(|| "-".into())
}

pub fn run(cli: &Cli, spec1: &str, spec2: &str, vm: Option<&str>) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    // --vm only narrows `latest`: an explicit id may name any VM's snapshot.
    let resolve = |spec: &str| {
        let vm = if spec.trim().eq_ignore_ascii_case("latest") {
            vm
        } else {
            None
        };
        find_snapshot(&repo, spec, vm)
    };
    let old = resolve(spec1)?;
    let new = resolve(spec2)?;
    let index = repo.load_index()?;
    let d = diff(&repo, &index, (&old.0, &old.1), (&new.0, &new.1))?;
    if cli.json {
        super::print_json(&d)?;
        return Ok(EXIT_OK);
    }
    println!(
        "snapshot {} (VM {}, {}) -> {} (VM {}, {})",
        short_id(&old.0),
        old.1.vm,
        super::local_time(&old.1.time),
        short_id(&new.0),
        new.1.vm,
        super::local_time(&new.1.time)
    );
    let mut t = super::Columns::new(
        &["", "NAME", "CHANGE", "OLD SIZE", "NEW SIZE", "CHANGED"],
        &[3, 4, 5],
    );
    for x in &d.disks {
        t.push(vec![
            "disk".into(),
            x.name.clone(),
            change(x.change).into(),
            size(x.old_size),
            size(x.new_size),
            human(x.changed_bytes),
        ]);
    }
    for x in &d.files {
        t.push(vec![
            "file".into(),
            x.name.clone(),
            change(x.change).into(),
            size(x.old_size),
            size(x.new_size),
            String::new(),
        ]);
    }
    print!("{}", t.render());
    println!("changed bytes in disks: {}", human(d.changed_bytes));
    Ok(EXIT_OK)
}
