//! `hyperkeep forget`: remove snapshots by retention policy (or by id). Only manifests are
//! removed; `--prune` (or a later `hyperkeep prune`) frees the data.

use anyhow::{bail, Result};
use repo::forget::{forget, forget_ids, KeepPolicy};
use repo::snapshot::short_id;
use serde_json::json;

use crate::cli::{Cli, ForgetArgs};
use crate::repo_open;
use crate::EXIT_OK;

fn policy(a: &ForgetArgs) -> KeepPolicy {
    KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
        keep_tags: a.keep_tag.clone(),
        tags: a.tag.clone(),
    }
}

pub fn run(cli: &Cli, args: &ForgetArgs) -> Result<u8> {
    let policy = policy(args);
    if args.ids.is_empty() && policy.is_empty() {
        bail!(
            "forget needs a policy or snapshot ids; nothing was removed\nhint: e.g. --keep-daily 7 --keep-weekly 4, or `hyperkeep forget ID`; add --dry-run to see first"
        );
    }
    let repo = repo_open::open(cli)?;
    let forgotten = if args.ids.is_empty() {
        let report = forget(&repo, &policy, args.dry_run, args.vm.as_deref())?;
        if !cli.json {
            print_decisions(&report, args.prune);
        }
        serde_json::to_value(&report)?
    } else {
        let ids = forget_ids(&repo, &args.ids, args.dry_run)?;
        if !cli.json {
            for id in &ids {
                let verb = if args.dry_run {
                    "would remove"
                } else {
                    "removed"
                };
                println!("{verb} snapshot {}", short_id(id));
            }
        }
        json!({ "dry_run": args.dry_run, "removed": ids })
    };
    if args.prune {
        if !cli.json {
            println!();
        }
        let pruned = super::prune::run_on(&repo, args.dry_run)?;
        if cli.json {
            super::print_json(&json!({ "forget": forgotten, "prune": pruned }))?;
        } else {
            super::prune::print_report(&pruned);
        }
    } else if cli.json {
        super::print_json(&forgotten)?;
    }
    Ok(EXIT_OK)
}

fn print_decisions(r: &repo::forget::ForgetReport, pruning: bool) {
    println!("policy: {}", r.policy);
    let mut vm: Option<&str> = None;
    let mut t: Option<super::Columns> = None;
    for d in &r.decisions {
        if vm != Some(d.vm.as_str()) {
            if let Some(t) = t.take() {
                print!("{}", t.render());
            }
            println!("\nVM {}:", d.vm);
            vm = Some(&d.vm);
            t = Some(super::Columns::new(
                &["ID", "TIME", "ACTION", "REASONS"],
                &[],
            ));
        }
        if let Some(t) = t.as_mut() {
            t.push(vec![
                short_id(&d.id),
                super::local_time(&d.time),
                if d.keep { "keep" } else { "remove" }.to_string(),
                d.reasons.join(", "),
            ]);
        }
    }
    if let Some(t) = t {
        print!("{}", t.render());
    }
    if r.dry_run {
        println!(
            "\n{} kept, {} would be removed (dry run: nothing was removed)",
            r.kept, r.removed
        );
    } else {
        println!(
            "\n{} kept, {} removed{}",
            r.kept,
            r.removed,
            if pruning || r.removed == 0 {
                ""
            } else {
                "; run `hyperkeep prune` to free their data"
            }
        );
    }
}
