//! `hyperkeep backup`: one VM (disks and files) into a new snapshot, under a shared lock.

use anyhow::Result;
use repo::backup::{BackupOptions, Progress};
use repo::lock::Lock;
use repo::snapshot::short_id;
use serde_json::json;

use crate::cli::{BackupArgs, Cli};
use crate::progress::Bar;
use crate::repo_open;
use crate::size::human;
use crate::EXIT_OK;

impl Progress for Bar {
    fn start(&self, total_bytes: u64) {
        Bar::start(self, total_bytes)
    }
    fn advance(&self, bytes: u64) {
        Bar::advance(self, bytes)
    }
    fn finish(&self) {
        Bar::finish(self)
    }
}

pub fn run(cli: &Cli, args: &BackupArgs) -> Result<u8> {
    if let Some(config) = &args.config {
        return crate::job_cmd::backup_vm(cli, &args.vm, config, args.threads, &args.tags);
    }
    let repo = repo_open::open(cli)?;
    // Shared: other backups may run beside this one, prune (exclusive) may not.
    let _lock = Lock::acquire(&repo, false, "backup")?;
    let opts = BackupOptions {
        vm: args.vm.clone(),
        tags: args.tags.iter().cloned().collect(),
        paths: args.paths.clone(),
        changes_from: args.changes_from.clone(),
        parent: args.parent.clone(),
        threads: args.threads,
        ..BackupOptions::default()
    };
    let bar = Bar::new("backup", cli.no_progress);
    let (id, snap) = repo::backup::backup(&repo, &opts, &bar)?;
    bar.finish();
    let s = &snap.summary;
    if cli.json {
        super::print_json(&json!({
            "id": id,
            "short_id": short_id(&id),
            "vm": snap.vm,
            "time": snap.time,
            "parent": snap.parent,
            "tags": snap.tags,
            "disks": snap.disks.iter().map(|d| json!({
                "name": d.name, "format": d.format, "virtual_size": d.virtual_size,
                "data_bytes": d.data_bytes,
            })).collect::<Vec<_>>(),
            "files": snap.files.iter().map(|f| json!({"name": f.name, "size": f.size})).collect::<Vec<_>>(),
            "summary": s,
        }))?;
        return Ok(EXIT_OK);
    }
    let seconds = s.duration_ms as f64 / 1000.0;
    println!(
        "snapshot {} saved: VM {}, {} and {}{}",
        short_id(&id),
        snap.vm,
        super::plural(snap.disks.len() as u64, "disk", "disks"),
        super::plural(snap.files.len() as u64, "file", "files"),
        snap.parent
            .as_deref()
            .map(|p| format!(", incremental on {}", short_id(p)))
            .unwrap_or_default()
    );
    let rate = if seconds > 0.0 {
        format!(" ({}/s)", human((s.bytes_read as f64 / seconds) as u64))
    } else {
        String::new()
    };
    println!(
        "  read {} in {:.2} s{rate}; new data {} ({} stored after compression and encryption)",
        human(s.bytes_read),
        seconds,
        human(s.bytes_new),
        human(s.bytes_stored),
    );
    println!(
        "  chunks: {} new, {} already in the repository, {} all-zero (not stored)",
        s.chunks_new, s.chunks_reused, s.zero_chunks
    );
    Ok(EXIT_OK)
}
