//! `hyperkeep preflight`: per VM, the backup method that will be used and why, each requirement
//! met or missing. Changes nothing on the host.

use std::fmt::Write as _;

use anyhow::{bail, Result};
use hypervisor::strategy::{Method, Plan};
use hypervisor::{Hypervisor, VmInfo};
use jobs::config::{HypervisorConfig, HypervisorKind};
use serde_json::json;

use super::{err, HypervisorArg, PreflightArgs};
use crate::cli::Cli;

pub fn run(cli: &Cli, args: &PreflightArgs) -> Result<u8> {
    let (hv, job) = match &args.config {
        Some(path) => {
            let cfg = super::load_job(path)?;
            (jobs::connect(&cfg.hypervisor).map_err(err)?, Some(cfg))
        }
        None => {
            let hc = HypervisorConfig {
                kind: match args.hypervisor {
                    HypervisorArg::Hyperv => HypervisorKind::Hyperv,
                    HypervisorArg::Qemu => HypervisorKind::Qemu,
                },
                powershell: None,
                runtime_dir: args.runtime_dir.clone(),
                qemu_binary: None,
            };
            if hc.kind == HypervisorKind::Qemu && hc.runtime_dir.is_none() {
                bail!("--hypervisor qemu needs --runtime-dir DIR (the directory of the VM definitions)");
            }
            (jobs::connect(&hc).map_err(err)?, None)
        }
    };
    let all = hv.list_vms()?;
    let mut plans: Vec<(VmInfo, Plan)> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    match &job {
        Some(cfg) => {
            let (chosen, not_found) = jobs::run::select(cfg, &all, args.vm.as_deref());
            for (vm, opts) in chosen {
                let p = jobs::run::plan_for(&vm, opts.mode);
                plans.push((vm, p));
            }
            missing.extend(not_found.into_iter().filter_map(|o| o.error));
        }
        None => {
            for vm in &all {
                if args
                    .vm
                    .as_deref()
                    .is_some_and(|n| !n.eq_ignore_ascii_case(&vm.name))
                {
                    continue;
                }
                plans.push((vm.clone(), jobs::run::plan_for(vm, args.mode)));
            }
            if let Some(n) = &args.vm {
                if plans.is_empty() {
                    missing.push(format!("no VM named '{n}' on this {} host", hv.kind()));
                }
            }
        }
    }
    let refused = plans
        .iter()
        .filter(|(_, p)| p.method == Method::Refused)
        .count();
    let code = if refused == 0 && missing.is_empty() {
        crate::EXIT_OK
    } else {
        crate::EXIT_PROBLEMS
    };
    if cli.json {
        super::super::repo_cmd::print_json(&json!({
            "hypervisor": hv.kind(),
            "vms": plans.iter().map(|(vm, p)| json!({
                "vm": vm.name,
                "state": vm.state,
                "plan": p,
                "summary": summary(p),
            })).collect::<Vec<_>>(),
            "errors": missing,
        }))?;
        return Ok(code);
    }
    print!("{}", render(hv.as_ref(), &plans, &missing));
    Ok(code)
}

/// "live, application-consistent (crash-consistent if that fails)" and the like.
pub fn summary(p: &Plan) -> String {
    match p.method {
        Method::Live => match (p.consistency, p.crash_fallback_allowed) {
            (Some(hypervisor::Consistency::Application), true) => {
                "live, application-consistent (crash-consistent with a warning if that fails)"
                    .into()
            }
            (Some(hypervisor::Consistency::Application), false) => {
                "live, application-consistent only (fails otherwise)".into()
            }
            _ => "live, crash-consistent".into(),
        },
        Method::SavedState => "saved state: save, back up, resume (a short pause)".into(),
        Method::Shutdown => "offline: shut down, back up, start, check that it boots".into(),
        Method::AsIs => "as it is (the VM is not running)".into(),
        Method::Retry => "retry: the VM is in transition".into(),
        Method::Refused => "no backup possible under this mode".into(),
    }
}

fn render(hv: &dyn Hypervisor, plans: &[(VmInfo, Plan)], missing: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "hypervisor: {}", hv.kind());
    for (vm, p) in plans {
        let _ = writeln!(
            s,
            "\nVM {} ({}): {}",
            vm.name,
            format!("{:?}", vm.state).to_lowercase(),
            summary(p)
        );
        let _ = writeln!(s, "  mode: {}", jobs::run::mode_name(p.configured));
        for r in &p.reasons {
            let _ = writeln!(
                s,
                "  [{}] {}: {}",
                if r.met { "ok" } else { "missing" },
                r.name,
                r.detail
            );
        }
        for w in &p.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        for d in &p.needs_agent_backup_disks {
            let _ = writeln!(s, "  needs agent backup: {d}");
        }
    }
    for m in missing {
        let _ = writeln!(s, "\nerror: {m}");
    }
    s
}
