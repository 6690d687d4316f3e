//! `hyperkeep replicate` and `hyperkeep replica list|verify|failover`: the CLI over the `replica`
//! crate (which documents the layout and the guarantees).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use repo::lock::Lock;
use repo::snapshot::short_id;

use crate::cli::Cli;
use crate::repo_cmd::{local_time, print_json, Columns};
use crate::repo_open;
use crate::size::human;
use crate::{EXIT_OK, EXIT_PROBLEMS};

#[derive(Args, Debug)]
pub struct ReplicateArgs {
    /// The VM to replicate (its newest snapshot, unless --snapshot).
    #[arg(long)]
    pub vm: String,
    /// The replication target: the VM's replica is DIR/VM (a local path or a mounted share).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Versions to keep; older ones are merged away (the newest is always kept).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub keep: usize,
    /// Replicate this snapshot (id, prefix or `latest`) instead of the VM's newest.
    #[arg(long, value_name = "ID")]
    pub snapshot: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ReplicaCommand {
    /// The versions of each replica under DIR (or of the replica DIR).
    List { dir: PathBuf },
    /// Read every version back and compare it with its repository snapshot (exit 1 if any
    /// differs); needs the repository.
    Verify {
        dir: PathBuf,
        /// Only this VM's replica (default: every replica under DIR).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Prepare a version (default the newest) as the VM's disks in DIR/VM/failover/, leaving
    /// the replica unchanged, and print the steps to start it.
    Failover {
        dir: PathBuf,
        /// The version to prepare (`replica list` shows them).
        #[arg(long, value_name = "V")]
        version: Option<u64>,
        /// Standalone disks instead of differencing children (for QEMU and other hypervisors
        /// that cannot open differencing VHDX).
        #[arg(long)]
        flatten: bool,
        /// With several VMs under DIR: this one.
        #[arg(long)]
        vm: Option<String>,
        /// Then register the prepared VM with Hyper-V on this host (Compare-VM -Register, the
        /// failover disks attached, Import-VM), with a new VM id; needs a Windows Hyper-V host
        /// and administrator rights.
        #[arg(long)]
        register: bool,
        /// With --register: start the VM once registered.
        #[arg(long, requires = "register")]
        start: bool,
    },
}

pub fn replicate(cli: &Cli, args: &ReplicateArgs) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    // Shared: backups may run meanwhile; a prune waits (it could delete what we read).
    let _lock = Lock::acquire(&repo, false, "replicate")?;
    let opts = replica::ReplicateOptions {
        keep: args.keep,
        snapshot: args.snapshot.clone(),
    };
    let r = replica::replicate(&repo, &args.vm, &args.to, &opts)?;
    if cli.json {
        print_json(&r)?;
        return Ok(EXIT_OK);
    }
    if !r.leftovers_removed.is_empty() {
        println!(
            "removed {} leftover(s) of an interrupted run",
            r.leftovers_removed.len()
        );
    }
    match r.version {
        None => println!(
            "replica of {} at {} is up to date with snapshot {}",
            r.vm,
            r.replica.display(),
            short_id(&r.snapshot)
        ),
        Some(v) => {
            println!(
                "version {v} of {} written to {} from snapshot {}: {} written in {:.2} s",
                r.vm,
                r.replica.display(),
                short_id(&r.snapshot),
                human(r.bytes_written),
                r.duration_ms as f64 / 1000.0
            );
            for d in &r.disks {
                println!(
                    "  disk {} -> disks/{} ({}, {} chunks changed, {} written)",
                    d.name,
                    d.file,
                    d.kind,
                    d.chunks_changed,
                    human(d.bytes_written)
                );
            }
            if !r.files.is_empty() {
                println!("  config files: {}", r.files.join(", "));
            }
        }
    }
    if !r.removed_versions.is_empty() {
        let v: Vec<String> = r.removed_versions.iter().map(|v| v.to_string()).collect();
        println!("  merged away: version {}", v.join(", "));
    }
    let v: Vec<String> = r.versions.iter().map(|v| v.to_string()).collect();
    println!("  versions kept: {}", v.join(", "));
    Ok(EXIT_OK)
}

pub fn run(cli: &Cli, cmd: &ReplicaCommand) -> Result<u8> {
    match cmd {
        ReplicaCommand::List { dir } => list(cli, dir),
        ReplicaCommand::Verify { dir, vm } => verify(cli, dir, vm.as_deref()),
        ReplicaCommand::Failover {
            dir,
            version,
            flatten,
            vm,
            register,
            start,
        } => {
            let register = register.then_some(replica::RegisterOptions { start: *start });
            failover(cli, dir, *version, *flatten, vm.as_deref(), register)
        }
    }
}

fn list(cli: &Cli, dir: &std::path::Path) -> Result<u8> {
    let all = replica::list(dir)?;
    if cli.json {
        print_json(&all)?;
        return Ok(EXIT_OK);
    }
    for r in &all {
        println!("VM {} at {}", r.vm, r.replica.display());
        let mut t = Columns::new(
            &[
                "VERSION", "SNAPSHOT", "TIME", "DISKS", "CHAIN", "WRITTEN", "",
            ],
            &[0, 4, 5],
        );
        for v in &r.versions {
            t.push(vec![
                v.version.to_string(),
                short_id(&v.snapshot),
                local_time(&v.snapshot_time),
                v.disks
                    .iter()
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                v.disks
                    .iter()
                    .map(|d| d.chain_depth)
                    .max()
                    .unwrap_or(0)
                    .to_string(),
                human(v.bytes_written),
                if v.newest {
                    "newest".into()
                } else {
                    String::new()
                },
            ]);
        }
        print!("{}", t.render());
        if let Some(p) = r.pending_removal {
            println!("  removal of version {p} was interrupted; the next replicate completes it");
        }
        if r.failover_prepared {
            println!(
                "  a failover is prepared in {}/failover",
                r.replica.display()
            );
        }
    }
    Ok(EXIT_OK)
}

fn verify(cli: &Cli, dir: &std::path::Path, vm: Option<&str>) -> Result<u8> {
    // Every replica under DIR, or the one --vm names.
    let targets = match vm {
        Some(_) => vec![replica::find_replica(dir, vm)?],
        None => replica::find_replicas(dir)?,
    };
    let repo = repo_open::open(cli)?;
    let _lock = Lock::acquire(&repo, false, "replica verify")?;
    let mut reports = Vec::new();
    for t in &targets {
        reports.push(replica::verify(&repo, t)?);
    }
    // A pending merge alone is not damage: every listed version was checked.
    let versions_clean = reports
        .iter()
        .all(|r| r.versions.iter().all(|v| v.problems.is_empty()));
    if cli.json {
        print_json(&reports)?;
        return Ok(if versions_clean {
            EXIT_OK
        } else {
            EXIT_PROBLEMS
        });
    }
    for r in &reports {
        println!("VM {} at {}", r.vm, r.replica.display());
        for p in &r.problems {
            println!("  note: {p}");
        }
        for v in &r.versions {
            if v.problems.is_empty() {
                println!(
                    "  version {} (snapshot {}): ok, {} disk(s), {} file(s), {} compared",
                    v.version,
                    short_id(&v.snapshot),
                    v.disks_checked,
                    v.files_checked,
                    human(v.bytes_compared)
                );
            } else {
                println!(
                    "  version {} (snapshot {}): {} problem(s)",
                    v.version,
                    short_id(&v.snapshot),
                    v.problems.len()
                );
                for p in &v.problems {
                    println!("    {p}");
                }
            }
        }
    }
    println!(
        "{}",
        if versions_clean {
            "every version equals its snapshot"
        } else {
            "problems found"
        }
    );
    Ok(if versions_clean {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    })
}

fn failover(
    cli: &Cli,
    dir: &std::path::Path,
    version: Option<u64>,
    flatten: bool,
    vm: Option<&str>,
    register: Option<replica::RegisterOptions>,
) -> Result<u8> {
    // Checked before anything is prepared: a failover/ directory left behind by a registration
    // that could never run would only block replication.
    let hv = match &register {
        Some(_) => Some(hyperv_host()?),
        None => None,
    };
    let target = replica::find_replica(dir, vm)?;
    let r = replica::failover(&target, &replica::FailoverOptions { version, flatten })?;
    let registered = match (&hv, &register) {
        (Some(hv), Some(opts)) => match replica::register(&r, hv, opts) {
            Ok(reg) => Some(reg),
            Err(e) => {
                if !cli.json {
                    print_prepared(&r, true);
                }
                return Err(e.context(format!(
                    "version {} is prepared in {}, but it is not registered: fix the cause and \
                     follow the steps above by hand, or delete that directory and run again",
                    r.version,
                    r.directory.display()
                )));
            }
        },
        _ => None,
    };
    if cli.json {
        match &registered {
            Some(reg) => print_json(&serde_json::json!({ "failover": r, "registered": reg }))?,
            None => print_json(&r)?,
        }
        return Ok(EXIT_OK);
    }
    // Once registered, the Hyper-V steps are done; only what concerns the replica still applies.
    print_prepared(&r, registered.is_none());
    if let Some(reg) = &registered {
        println!(
            "registered with Hyper-V as VM '{}' (id {}), {}, from {}",
            reg.vm.name,
            reg.vm.id,
            if reg.started {
                "started"
            } else {
                "not started (Start-VM to start it)"
            },
            reg.config.display()
        );
        println!(
            "replication of {} into this directory refuses to run while {} exists",
            r.vm,
            r.directory.display()
        );
    }
    Ok(EXIT_OK)
}

fn print_prepared(r: &replica::FailoverReport, steps: bool) {
    println!(
        "version {} of {} (snapshot {}, {}) prepared in {}",
        r.version,
        r.vm,
        short_id(&r.snapshot),
        local_time(&r.snapshot_time),
        r.directory.display()
    );
    for d in &r.disks {
        println!("  disk {} ({})", d.path.display(), d.kind);
    }
    for f in &r.files {
        println!("  file {}", f.display());
    }
    if steps {
        println!("next steps:");
        for (i, s) in r.steps.iter().enumerate() {
            println!("  {}. {s}", i + 1);
        }
    }
}

/// The local host's Hyper-V (Windows PowerShell, as `hyperkeep preflight` without --config
/// uses it). Registering writes the VM into this host's Hyper-V, so there is no remote variant.
fn hyperv_host() -> Result<hypervisor::hyperv::HyperVHypervisor> {
    if !cfg!(windows) {
        bail!(
            "--register needs a Hyper-V host: it runs Compare-VM/Import-VM through Windows \
             PowerShell on the machine that will run the VM, and this is not Windows\nhint: run \
             `hyperkeep replica failover --register` on the Hyper-V host (with the replica \
             directory local or on a share), or run without --register and follow the printed \
             steps there"
        );
    }
    Ok(hypervisor::hyperv::HyperVHypervisor::local())
}
