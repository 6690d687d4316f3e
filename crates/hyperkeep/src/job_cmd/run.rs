//! `hyperkeep run JOBFILE` (and `backup --vm NAME --config FILE`): a whole job, then a summary.

use std::path::Path;

use anyhow::Result;
use repo::snapshot::short_id;

use super::{err, RunArgs};
use crate::cli::Cli;
use crate::progress::Bar;

pub fn run(cli: &Cli, args: &RunArgs) -> Result<u8> {
    run_job(cli, &args.job, args.vm.as_deref(), args.threads, &[])
}

pub fn run_job(
    cli: &Cli,
    job: &Path,
    only_vm: Option<&str>,
    threads: usize,
    tags: &[(String, String)],
) -> Result<u8> {
    let cfg = super::load_job(job)?;
    let hv = jobs::connect(&cfg.hypervisor).map_err(err)?;
    let repo = super::open_repo(cli, &cfg)?;
    let bar = Bar::new("backup", cli.no_progress);
    let opts = jobs::run::JobOptions {
        only_vm: only_vm.map(str::to_string),
        threads,
        extra_tags: tags.iter().cloned().collect(),
        ..Default::default()
    };
    let report = jobs::run_job(&cfg, hv.as_ref(), &repo, &opts, &bar).map_err(err)?;
    bar.finish();
    let code = report.exit_code();
    if cli.json {
        let mut v = serde_json::to_value(&report)?;
        v["exit_code"] = code.into();
        crate::repo_cmd::print_json(&v)?;
        return Ok(code);
    }
    for o in &report.vms {
        let what = match (&o.snapshot, o.ok()) {
            (Some(id), true) => format!("snapshot {}", short_id(id)),
            (Some(id), false) => format!("snapshot {} (with problems)", short_id(id)),
            (None, _) => "no snapshot".into(),
        };
        println!(
            "{} {}: {}{}{}{}",
            if o.ok() { "ok    " } else { "FAILED" },
            o.vm,
            what,
            o.consistency
                .as_deref()
                .map(|c| format!(", {c}-consistent"))
                .unwrap_or_default(),
            o.downtime_ms
                .map(|d| format!(", downtime {:.1} s", d as f64 / 1000.0))
                .unwrap_or_default(),
            match o.booted {
                Some(true) => ", booted again",
                Some(false) => ", DID NOT BOOT",
                None => "",
            }
        );
        if let Some(e) = &o.error {
            println!("    error: {e}");
        }
        for w in &o.warnings {
            println!("    warning: {w}");
        }
        if let Some(c) = &o.change_tracking {
            println!("    change tracking: {c}");
        }
        if let Some(r) = &o.retention {
            println!("    retention: kept {}, removed {}", r.kept, r.removed);
        }
    }
    if let Some(p) = &report.prune {
        println!(
            "prune: {} packs deleted, {} repacked, {} bytes freed",
            p.packs_unused + p.orphans_deleted,
            p.packs_repacked,
            p.bytes_deleted.saturating_sub(p.bytes_written)
        );
    }
    for e in &report.errors {
        println!("error: {e}");
    }
    println!(
        "job {}: {} VMs backed up, {} failed",
        job.display(),
        report.succeeded,
        report.failed
    );
    Ok(code)
}
