//! hyperkeep backup jobs: carry out each VM's backup strategy safely, then retention and prune.
//!
//! Map of the crate:
//! - [`config`]: the TOML job file ([`config::JobConfig`]), with errors that name line and column.
//! - [`run`]: [`run::backup_vm`] carries out one VM's [`hypervisor::strategy::Plan`] (live
//!   checkpoint, saved state, shutdown/start, as-is, retry) and always undoes what it did to the
//!   VM; [`run::run_job`] runs every VM of a job, then retention (per VM, only after success) and
//!   one prune.
//! - [`state`]: the change-tracking state file (each VM's last change token and the snapshot it
//!   belongs to), so the next live backup reads only changed ranges.
//!
//! # The job file
//!
//! ```toml
//! [hypervisor]
//! kind = "hyperv"                 # or "qemu" (then runtime_dir = "/var/lib/hyperkeep/vms")
//!
//! [repository]
//! location = "D:/backups/repo"    # relative paths are relative to this file
//! password_file = "repo.pass"     # optional: else HYPERKEEP_PASSWORD or --password-file
//!
//! [[vm]]
//! name = "sql01"                  # exact name (case-insensitive)
//! mode = "live-app-only"          # auto | live | live-app-only | saved-state | offline
//!
//! [[vm]]
//! pattern = "web-*"               # glob: * and ?
//! mode = "offline"
//! shutdown_timeout = "5m"         # offline: graceful shutdown limit (s, m, h)
//! boot_timeout = "10m"            # offline: how long to wait for the guest to answer again
//! tags = { tier = "web" }
//!
//! [retention]                     # per VM, applied only after that VM's backup succeeded
//! keep_daily = 7
//! keep_weekly = 4
//!
//! prune = true                    # once, after all VMs
//! ```
//!
//! Why a crate of its own: the CLI (`hyperkeep run`, `preflight`, `backup --vm`) and a future
//! daemon share it, and it is tested here against the Hyper-V implementation fed canned outputs.

pub mod config;
pub mod run;
pub mod state;

pub use config::JobConfig;
pub use run::{backup_vm, run_job, JobReport, VmOptions, VmOutcome, VmStatus};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad job file; the message names the file, line and column.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Repo(#[from] repo::Error),
    /// The change-tracking state file could not be read or written.
    #[error("{0}")]
    State(String),
}

/// Connect to the hypervisor a job file names.
pub fn connect(cfg: &config::HypervisorConfig) -> Result<Box<dyn hypervisor::Hypervisor>> {
    use hypervisor::hyperv::{HyperVHypervisor, SystemPowerShell};
    match cfg.kind {
        config::HypervisorKind::Hyperv => {
            let ps = SystemPowerShell {
                executable: cfg
                    .powershell
                    .clone()
                    .unwrap_or_else(|| "powershell.exe".into()),
            };
            Ok(Box::new(HyperVHypervisor::new(Box::new(ps))))
        }
        config::HypervisorKind::Qemu => {
            let dir = cfg.runtime_dir.clone().ok_or_else(|| {
                Error::Config("[hypervisor] kind = \"qemu\" needs runtime_dir".into())
            })?;
            let mut hv = hypervisor::qemu::QemuHypervisor::new(dir)?;
            if let Some(b) = &cfg.qemu_binary {
                hv = hv.with_qemu_binary(b);
            }
            Ok(Box::new(hv))
        }
    }
}
