//! The strategy engine: which backup method each VM gets, and why.
//!
//! Pure logic over [`VmInfo`] and the configured [`Mode`], following the article's rules:
//! a live application-consistent backup when the guest can take part (integration services /
//! guest agent answering, backup service enabled, no pass-through disks, VM running); else a
//! crash-consistent live backup with a warning; saved state where a checkpoint is impossible;
//! offline (shutdown) only when configured. Off or saved VMs are backed up as they are. VMs in
//! transition (starting, stopping, saving) are retried, then backed up in saved state.

use serde::{Deserialize, Serialize};

use crate::{Consistency, Error, VmInfo, VmState};

/// The mode configured for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Auto,
    Live,
    LiveAppOnly,
    SavedState,
    Offline,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Mode::Auto,
            "live" => Mode::Live,
            "live-app-only" => Mode::LiveAppOnly,
            "saved-state" => Mode::SavedState,
            "offline" => Mode::Offline,
            _ => {
                return Err(format!(
                    "unknown mode '{s}': use auto, live, live-app-only, saved-state or offline"
                ))
            }
        })
    }
}

/// What the backup will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Checkpoint while running; see [`Plan::consistency`].
    Live,
    /// Save state (memory to disk), back up, resume.
    SavedState,
    /// Graceful shutdown, back up, start, record that it booted.
    Shutdown,
    /// The VM is off or saved already: back it up as it is, no power change.
    AsIs,
    /// Wait and look again ([`Plan::retry`]); the VM is starting, stopping or saving.
    Retry,
    /// No backup possible under the configured mode; [`Plan::reasons`] says why.
    Refused,
}

/// One requirement from the article, met or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub name: String,
    pub met: bool,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub delay_secs: u64,
    /// What to do when the VM is still in transition after the attempts.
    pub then: Method,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub vm: String,
    pub configured: Mode,
    pub method: Method,
    /// For [`Method::Live`]: the checkpoint consistency to ask for first.
    pub consistency: Option<Consistency>,
    /// For [`Method::Live`] with application consistency: whether a failed application-
    /// consistent checkpoint may be retried crash-consistent (never under `live-app-only`).
    pub crash_fallback_allowed: bool,
    pub retry: Option<RetryPolicy>,
    pub reasons: Vec<Requirement>,
    pub warnings: Vec<String>,
    /// Pass-through / in-guest disks: only an agent inside the guest can back them up.
    pub needs_agent_backup_disks: Vec<String>,
    /// Leftover recovery checkpoints of a failed backup, removed before this backup starts.
    pub cleanup_first: Vec<String>,
}

impl Plan {
    pub fn requirement(&self, name: &str) -> Option<&Requirement> {
        self.reasons.iter().find(|r| r.name == name)
    }
}

/// Facts beyond [`VmInfo`] that an implementation knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanInputs {
    /// Why this hypervisor cannot checkpoint this VM at all (e.g. an old Hyper-V
    /// configuration version), if so.
    pub checkpoint_blocker: Option<String>,
    pub retry: RetryPolicy,
}

impl Default for PlanInputs {
    fn default() -> Self {
        PlanInputs {
            checkpoint_blocker: None,
            retry: RetryPolicy {
                attempts: 3,
                delay_secs: 60,
                then: Method::SavedState,
            },
        }
    }
}

/// Requirement names, stable for tests and `--json` consumers.
pub mod req {
    pub const RUNNING: &str = "vm-running";
    pub const INTEGRATION: &str = "integration-services";
    pub const INTEGRATION_CURRENT: &str = "integration-services-current";
    pub const BACKUP_SERVICE: &str = "backup-service";
    pub const NO_PASSTHROUGH: &str = "no-passthrough-disks";
    pub const CHECKPOINT: &str = "checkpoint-possible";
    pub const NO_CHECKPOINTS: &str = "no-existing-checkpoints";
}

/// Suffix the Hyper-V implementation gives leftover recovery checkpoints in
/// `VmInfo::existing_checkpoints`.
pub const RECOVERY_SUFFIX: &str = " [Recovery]";

pub fn plan(vm: &VmInfo, mode: Mode) -> Plan {
    plan_with(vm, mode, &PlanInputs::default())
}

pub fn plan_with(vm: &VmInfo, mode: Mode, inputs: &PlanInputs) -> Plan {
    let g = &vm.guest;
    let notes = if g.notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", g.notes.join("; "))
    };
    let req = |name: &str, met: bool, detail: String| Requirement {
        name: name.into(),
        met,
        detail,
    };
    let passthrough: Vec<String> = vm
        .disks
        .iter()
        .filter(|d| d.passthrough)
        .map(|d| format!("pass-through disk at {}", d.location))
        .collect();
    let (leftovers, user): (Vec<&String>, Vec<&String>) = vm
        .existing_checkpoints
        .iter()
        .partition(|c| c.ends_with(RECOVERY_SUFFIX));
    let running = vm.state == VmState::Running;

    let reasons = vec![
        req(
            req::RUNNING,
            running,
            format!("VM state: {:?}", vm.state).to_lowercase(),
        ),
        req(
            req::INTEGRATION,
            g.agent_responding,
            if g.agent_responding {
                "integration services / guest agent answer".into()
            } else {
                format!("integration services / guest agent do not answer{notes}")
            },
        ),
        req(
            req::INTEGRATION_CURRENT,
            g.integration_current != Some(false),
            match g.integration_current {
                Some(true) => "integration services are up to date".into(),
                Some(false) => "integration services are outdated: update them in the guest".into(),
                None => "integration services version unknown or not applicable".into(),
            },
        ),
        req(
            req::BACKUP_SERVICE,
            g.backup_service_enabled,
            if g.backup_service_enabled {
                "backup service (VSS / fsfreeze) enabled and answering".into()
            } else {
                format!("backup service (VSS / fsfreeze) disabled, missing or not answering in the guest{notes}")
            },
        ),
        req(
            req::NO_PASSTHROUGH,
            passthrough.is_empty(),
            if passthrough.is_empty() {
                "all disks are virtual disks".into()
            } else {
                format!(
                    "{}: not in the checkpoint; back them up with an agent in the guest",
                    passthrough.join(", ")
                )
            },
        ),
        req(
            req::CHECKPOINT,
            inputs.checkpoint_blocker.is_none(),
            inputs
                .checkpoint_blocker
                .clone()
                .unwrap_or_else(|| "the hypervisor can checkpoint this VM".into()),
        ),
        req(
            req::NO_CHECKPOINTS,
            vm.existing_checkpoints.is_empty(),
            if vm.existing_checkpoints.is_empty() {
                "no checkpoints".into()
            } else {
                format!(
                    "existing checkpoints: {}",
                    vm.existing_checkpoints.join(", ")
                )
            },
        ),
    ];
    let met = |name: &str| reasons.iter().any(|r| r.name == name && r.met);
    let app_possible =
        met(req::INTEGRATION) && met(req::BACKUP_SERVICE) && met(req::NO_PASSTHROUGH);
    let checkpoint_ok = met(req::CHECKPOINT);
    let integration_current = met(req::INTEGRATION_CURRENT);

    let mut p = Plan {
        vm: vm.name.clone(),
        configured: mode,
        method: Method::Refused,
        consistency: None,
        crash_fallback_allowed: false,
        retry: None,
        reasons,
        warnings: Vec::new(),
        needs_agent_backup_disks: passthrough.clone(),
        cleanup_first: leftovers.iter().map(|s| s.to_string()).collect(),
    };
    if !passthrough.is_empty() {
        p.warnings.push(format!(
            "{} cannot be backed up from the host: run hyperkeep's agent mode inside the guest for them",
            passthrough.join(", ")
        ));
    }
    for c in &leftovers {
        p.warnings.push(format!(
            "leftover recovery checkpoint {c} of an earlier failed backup will be removed first"
        ));
    }
    for c in &user {
        p.warnings.push(format!(
            "user checkpoint {c} exists: the backup reads the current state through the whole chain; \
             consider deleting checkpoints you no longer need"
        ));
    }

    match vm.state {
        VmState::Off | VmState::Saved => {
            p.method = Method::AsIs;
            if mode == Mode::LiveAppOnly {
                p.warnings.push(format!(
                    "VM is {}: backed up as it is (offline-consistent), no application-consistent checkpoint needed",
                    if vm.state == VmState::Off { "off" } else { "saved" }
                ));
            }
            return p;
        }
        VmState::Starting | VmState::Stopping | VmState::Saving => {
            let mut retry = inputs.retry;
            retry.then = match mode {
                Mode::Offline => Method::Shutdown,
                Mode::LiveAppOnly => Method::Refused,
                _ => Method::SavedState,
            };
            p.method = Method::Retry;
            p.retry = Some(retry);
            p.warnings.push(
                format!(
                    "VM is {:?} (in transition): retried {} times every {} s, then {}",
                    vm.state,
                    retry.attempts,
                    retry.delay_secs,
                    match retry.then {
                        Method::Shutdown => "shut down and backed up offline",
                        Method::Refused => "failed (live-app-only)",
                        _ => "backed up in saved state",
                    }
                )
                .to_lowercase(),
            );
            return p;
        }
        VmState::Other => {
            p.warnings
                .push("VM state unknown: not backed up; check the VM in Hyper-V Manager".into());
            return p;
        }
        VmState::Running | VmState::Paused => {}
    }

    match mode {
        Mode::Offline => p.method = Method::Shutdown,
        Mode::SavedState => p.method = Method::SavedState,
        Mode::LiveAppOnly => {
            if app_possible && checkpoint_ok && running {
                live(&mut p, Consistency::Application, false);
                if !integration_current {
                    p.warnings.push("integration services are outdated: the application-consistent checkpoint may fail, and live-app-only will then fail the backup".into());
                }
            } else {
                p.warnings.push("live-app-only: the guest cannot take an application-consistent checkpoint; backup refused (see the unmet requirements)".into());
            }
        }
        Mode::Live | Mode::Auto => {
            if !checkpoint_ok {
                if mode == Mode::Auto {
                    p.method = Method::SavedState;
                    p.warnings.push(
                        "no checkpoint possible: saved-state backup (a short pause of the VM)"
                            .into(),
                    );
                } else {
                    p.warnings
                        .push("live: no checkpoint possible for this VM; backup refused".into());
                }
            } else if app_possible && running {
                live(&mut p, Consistency::Application, true);
                if !integration_current {
                    p.warnings.push("integration services are outdated: the application-consistent checkpoint may fail and fall back to crash-consistent".into());
                }
            } else {
                live(&mut p, Consistency::Crash, false);
                p.warnings.push(if vm.state == VmState::Paused {
                    "VM is paused: the guest cannot take part, crash-consistent live backup".into()
                } else {
                    "the guest cannot take part in an application-consistent backup: crash-consistent live backup (like pulling the power cord; journals replay on restore)".into()
                });
            }
        }
    }
    p
}

fn live(p: &mut Plan, c: Consistency, fallback: bool) {
    p.method = Method::Live;
    p.consistency = Some(c);
    p.crash_fallback_allowed = fallback;
}

/// What to do when the checkpoint of a [`Method::Live`] plan failed at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnCheckpointFailure {
    RetryCrashConsistent { warning: String },
    Fail { reason: String },
}

pub fn on_checkpoint_failure(
    plan: &Plan,
    attempted: Consistency,
    error: &Error,
) -> OnCheckpointFailure {
    match attempted {
        Consistency::Application if plan.crash_fallback_allowed => OnCheckpointFailure::RetryCrashConsistent {
            warning: format!(
                "application-consistent checkpoint of VM '{}' failed ({error}); retrying crash-consistent",
                plan.vm
            ),
        },
        Consistency::Application if plan.configured == Mode::LiveAppOnly => OnCheckpointFailure::Fail {
            reason: format!(
                "application-consistent checkpoint of VM '{}' failed ({error}) and the mode is live-app-only",
                plan.vm
            ),
        },
        _ => OnCheckpointFailure::Fail {
            reason: format!("checkpoint of VM '{}' failed: {error}", plan.vm),
        },
    }
}
