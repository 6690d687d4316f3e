//! Commands that drive a hypervisor: `preflight` (which backup mode each VM gets and why),
//! `run JOBFILE` (a whole job: every VM, retention, prune) and `backup --vm NAME --config FILE`
//! (one VM of a job). The work is in the `jobs` crate; this module opens things and prints.
//!
//! Exit codes: 0 every VM backed up (or, for preflight, every VM can be), 1 some VM failed (or
//! can't be backed up), 2 an error before any VM was tried (bad job file, no hypervisor).

pub mod preflight;
pub mod run;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use repo::backend::{ObjectKind, CONFIG_NAME};
use repo::repository::Repository;

use crate::cli::Cli;
use crate::repo_open;

#[derive(Args, Debug)]
pub struct PreflightArgs {
    /// A job file: its hypervisor, VMs and modes (without it: every VM of the local host).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Without --config: the hypervisor to ask.
    #[arg(long, value_enum, default_value_t = HypervisorArg::Hyperv)]
    pub hypervisor: HypervisorArg,
    /// Without --config, for --hypervisor qemu: the directory of the VM definitions.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Without --config: the mode to plan for (auto, live, live-app-only, saved-state, offline).
    #[arg(long, default_value = "auto")]
    pub mode: hypervisor::strategy::Mode,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job file (TOML; see the README).
    #[arg(value_name = "JOBFILE")]
    pub job: PathBuf,
    /// Only this VM of the job.
    #[arg(long)]
    pub vm: Option<String>,
    /// Worker threads per backup (default: all cores).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorArg {
    Hyperv,
    Qemu,
}

/// `jobs` errors as anyhow errors, keeping repository errors findable for the exit codes.
pub fn err(e: jobs::Error) -> anyhow::Error {
    match e {
        jobs::Error::Repo(r) => r.into(),
        other => other.into(),
    }
}

pub fn load_job(path: &Path) -> Result<jobs::JobConfig> {
    jobs::JobConfig::load(path).map_err(err)
}

/// The job's repository (its `[repository]`, else `--repo`), opened with the job's password
/// file, else the usual password sources.
pub fn open_repo(cli: &Cli, cfg: &jobs::JobConfig) -> Result<Repository> {
    let (location, pw_file) = match &cfg.repository {
        Some(r) => (r.location.clone(), r.password_file.clone()),
        None => (repo_open::location(cli)?.to_string(), None),
    };
    if location.trim().is_empty() {
        bail!(
            "no repository given\nhint: set [repository] location in the job file, or use --repo"
        );
    }
    let backend = Repository::open_location(&location)?;
    if !backend.exists(ObjectKind::Config, CONFIG_NAME)? {
        return Err(repo::Error::NoRepository(backend.location()).into());
    }
    let password = match pw_file {
        Some(f) => repo_open::read_password_file(&f)?,
        None => repo_open::password(cli, false)?,
    };
    Ok(Repository::open(backend, &password)?)
}

/// `hyperkeep backup --vm NAME --config FILE`: that VM, as the job file says.
pub fn backup_vm(
    cli: &Cli,
    vm: &str,
    config: &Path,
    threads: usize,
    tags: &[(String, String)],
) -> Result<u8> {
    run::run_job(cli, config, Some(vm), threads, tags)
}
