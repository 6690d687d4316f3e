//! `hyperkeep snapshots`: list snapshots, oldest first.

use anyhow::Result;
use repo::snapshot::{list_snapshots, short_id, Snapshot};
use serde_json::{json, Value};

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

/// The JSON shape of one snapshot (the contract's fields, plus parent and mode).
pub fn snapshot_json(id: &str, s: &Snapshot) -> Value {
    json!({
        "id": id,
        "short_id": short_id(id),
        "time": s.time,
        "vm": s.vm,
        "hostname": s.hostname,
        "tags": s.tags,
        "parent": s.parent,
        "mode": s.mode,
        "disks": s.disks.iter().map(|d| json!({
            "name": d.name,
            "virtual_size": d.virtual_size,
            "format": d.format,
            "subformat": d.subformat,
            "data_bytes": d.data_bytes,
        })).collect::<Vec<_>>(),
        "files": s.files.iter().map(|f| json!({
            "name": f.name,
            "size": f.size,
            "mtime": f.mtime,
        })).collect::<Vec<_>>(),
        "summary": s.summary,
    })
}

/// What a snapshot restores to: its disks' virtual sizes plus its files' sizes.
pub fn total_size(s: &Snapshot) -> u64 {
    s.disks
        .iter()
        .map(|d| d.virtual_size)
        .chain(s.files.iter().map(|f| f.size))
        .fold(0u64, u64::saturating_add)
}

pub fn run(cli: &Cli, vm: Option<&str>) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    let mut snaps = list_snapshots(&repo)?;
    if let Some(vm) = vm {
        snaps.retain(|(_, s)| s.vm == vm);
    }
    if cli.json {
        let v: Vec<Value> = snaps.iter().map(|(id, s)| snapshot_json(id, s)).collect();
        super::print_json(&v)?;
        return Ok(EXIT_OK);
    }
    if snaps.is_empty() {
        match vm {
            Some(vm) => println!("no snapshots of VM '{vm}'"),
            None => println!("no snapshots yet (create one with `hyperkeep backup`)"),
        }
        return Ok(EXIT_OK);
    }
    let mut t = super::Columns::new(&["ID", "TIME", "VM", "TAGS", "DISKS", "SIZE"], &[5]);
    for (id, s) in &snaps {
        let tags: Vec<String> = s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let disks: Vec<&str> = s.disks.iter().map(|d| d.name.as_str()).collect();
        t.push(vec![
            short_id(id),
            super::local_time(&s.time),
            s.vm.clone(),
            tags.join(","),
            disks.join(","),
            human(total_size(s)),
        ]);
    }
    print!("{}", t.render());
    println!(
        "{}",
        super::plural(snaps.len() as u64, "snapshot", "snapshots")
    );
    Ok(EXIT_OK)
}
