//! One interface to the hypervisor, so the backup strategies are written once.
//!
//! Map of the crate:
//! - [`Hypervisor`]: what a backup strategy needs from a hypervisor: the VMs with their disks
//!   (whole chains), configuration files, pass-through disks and guest-integration status; and the
//!   operations: point-in-time checkpoints (application- or crash-consistent), release/merge,
//!   save state and resume, graceful shutdown, start, wait until booted, changed ranges.
//! - `hyperv`: Hyper-V through PowerShell/CIM (JSON output); all PowerShell text in one module.
//! - `qemu`: QEMU/KVM through QMP and the guest agent (external snapshot + block-commit as the
//!   checkpoint, fsfreeze for application consistency, cpr-reboot migration for saved state).
//! - `strategy`: picks live / saved-state / offline per VM and explains why (preflight).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod hyperv;
pub mod qemu;
pub mod strategy;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    /// The hypervisor refused or failed an operation; the message is its own, plus context.
    #[error("{0}")]
    Operation(String),
    /// Output we could not understand (a new Windows version, a changed cmdlet).
    #[error("cannot understand the hypervisor's answer: {0}")]
    Parse(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Off,
    Saved,
    Paused,
    Starting,
    Stopping,
    Saving,
    Other,
}

/// A virtual disk attached to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttachment {
    /// The file the VM writes to now (the top of a differencing chain), or None for a
    /// pass-through disk.
    pub path: Option<PathBuf>,
    /// A physical disk passed through to the guest: only an agent inside the guest can back it up.
    pub passthrough: bool,
    /// Controller location, for messages ("SCSI 0:1").
    pub location: String,
}

/// What the guest can do for a consistent backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIntegration {
    /// Integration services (Hyper-V) or the guest agent (QEMU) answer.
    pub agent_responding: bool,
    /// The backup (VSS) integration service is enabled (Hyper-V) / fsfreeze is available (QEMU).
    pub backup_service_enabled: bool,
    /// Integration services are up to date (Hyper-V); None when unknown or not applicable.
    pub integration_current: Option<bool>,
    /// Free-form facts for preflight ("VSS: OK", "guest agent 7.2", ...).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub state: VmState,
    pub disks: Vec<DiskAttachment>,
    /// Configuration and runtime-state files to back up with the disks (.vmcx, .vmrs, .vmgs).
    pub config_files: Vec<PathBuf>,
    pub guest: GuestIntegration,
    /// Checkpoints that already exist (user checkpoints, leftovers of a failed backup).
    pub existing_checkpoints: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// The guest's applications flushed through VSS / fsfreeze.
    Application,
    /// Like pulling the power cord: the filesystem journal must be replayed.
    Crash,
}

/// A point-in-time freeze of a running VM: while it exists, `frozen_disks` are stable and can be
/// read, and the guest writes elsewhere (an .avhdx, a QEMU overlay).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub consistency: Consistency,
    /// One per backed-up disk, in the order of `VmInfo::disks` (pass-through disks skipped):
    /// the frozen view to read (a file whose chain is stable during the checkpoint).
    pub frozen_disks: Vec<PathBuf>,
    /// Configuration files captured at the checkpoint.
    pub config_files: Vec<PathBuf>,
    /// Opaque per-implementation data needed to release it.
    pub handle: serde_json::Value,
}

/// What a later backup asks "what changed since?" about (a Hyper-V reference point with RCT ids,
/// a QEMU dirty bitmap name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeToken {
    pub id: String,
    /// Per disk (same order as frozen_disks), the tracking identifier.
    pub per_disk: Vec<String>,
}

/// The operations a backup strategy needs. Every method either succeeds or leaves the VM as it
/// was (running VMs keep running), and reports failure as failure.
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> &'static str;
    fn list_vms(&self) -> Result<Vec<VmInfo>>;
    fn vm(&self, name: &str) -> Result<VmInfo>;

    /// Freeze the VM's disks at one point in time.
    fn create_checkpoint(&self, vm: &str, consistency: Consistency) -> Result<Checkpoint>;
    /// Merge the checkpoint away (the guest's writes since go back into the disks). When
    /// `keep_change_token`, keep what's needed to ask for changed ranges next time.
    fn release_checkpoint(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        keep_change_token: bool,
    ) -> Result<Option<ChangeToken>>;
    /// Byte ranges of `disk_index` changed since `token`; `None` when tracking was lost (the
    /// caller then reads the whole disk).
    fn changed_ranges(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        disk_index: usize,
        token: &ChangeToken,
    ) -> Result<Option<Vec<(u64, u64)>>>;

    fn save_state(&self, vm: &str) -> Result<()>;
    fn resume(&self, vm: &str) -> Result<()>;
    /// Graceful shutdown through the guest; `Error::Timeout` if it is not off in time (the VM is
    /// then left running).
    fn shutdown(&self, vm: &str, timeout: Duration) -> Result<()>;
    fn start(&self, vm: &str) -> Result<()>;
    /// Wait until the guest answers (heartbeat / guest agent); `Ok(false)` on timeout.
    fn wait_booted(&self, vm: &str, timeout: Duration) -> Result<bool>;
    /// Remove what an earlier failed backup left behind (recovery checkpoints, overlays);
    /// returns what was removed.
    fn cleanup_leftovers(&self, vm: &str) -> Result<Vec<String>>;
}
