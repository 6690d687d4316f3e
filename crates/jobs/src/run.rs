//! Carrying out backups: one VM ([`backup_vm`]) and whole jobs ([`run_job`]).
//!
//! The rules this module exists to enforce (issue 5, and the Hyper-V traps in the brief):
//! - What we do to a VM is always undone: a checkpoint is released whether or not the backup
//!   worked (a guard also releases it if anything unwinds), a saved VM is resumed, a VM we shut
//!   down is started again and we wait for it to answer. A shutdown that times out leaves the VM
//!   running and nothing is backed up.
//! - Leftovers of an earlier failed backup are removed before anything else.
//! - A failed VM backup is reported as failed (never as success), writes no snapshot (or, when
//!   only the clean-up after a stored snapshot failed, says so), and never runs retention for
//!   that VM, so older versions are never deleted because of a failure.
//! - Each snapshot records the method used (`live`, `saved-state`, `offline`, `as-is`), the
//!   consistency achieved, the downtime and, for offline backups, whether the VM booted again.
//!   Downtime and "booted" are only known after the VM is back, so those snapshots are amended
//!   (a new manifest with the fields set is stored, then the first one removed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hypervisor::strategy::{self, Method, Mode, OnCheckpointFailure, Plan};
use hypervisor::{ChangeToken, Checkpoint, Consistency, Hypervisor, VmInfo, VmState};
use repo::backend::ObjectKind;
use repo::backup::{BackupOptions, Progress};
use repo::forget::KeepPolicy;
use repo::prune::{PruneOptions, PruneReport};
use repo::repository::Repository;
use repo::snapshot::{self, short_id, Snapshot};
use serde::Serialize;

use crate::config::JobConfig;
use crate::state::{JobState, VmTracking};
use crate::Result;

/// How to back up one VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub mode: Mode,
    pub shutdown_timeout: Duration,
    pub boot_timeout: Duration,
    pub tags: BTreeMap<String, String>,
    /// Wait between looks at a VM in transition; `None` = the plan's delay (60 s).
    pub retry_delay: Option<Duration>,
    /// The change token of the last live backup and its snapshot (from [`JobState`]).
    pub previous: Option<VmTracking>,
    /// Ask the hypervisor to keep change tracking at the end of a live backup.
    pub track_changes: bool,
    /// Backup worker threads (0 = all cores).
    pub threads: usize,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            mode: Mode::Auto,
            shutdown_timeout: Duration::from_secs(300),
            boot_timeout: Duration::from_secs(300),
            tags: BTreeMap::new(),
            retry_delay: None,
            previous: None,
            track_changes: true,
            threads: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Success,
    Failed,
}

/// What retention did for one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionOutcome {
    pub kept: usize,
    pub removed: usize,
}

/// The result of one VM's backup.
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    pub vm: String,
    pub status: VmStatus,
    /// The configured mode.
    pub mode: Mode,
    /// What was done (after retries), if the plan got that far.
    pub method: Option<Method>,
    /// The snapshot written (also set when only the clean-up after it failed).
    pub snapshot: Option<String>,
    /// `application`, `crash`, `saved-state` or `offline`.
    pub consistency: Option<String>,
    pub downtime_ms: Option<u64>,
    pub booted: Option<bool>,
    /// How change tracking was used ("3 changed ranges, 1.0 MiB"), or why not.
    pub change_tracking: Option<String>,
    pub warnings: Vec<String>,
    /// Disks only an agent inside the guest can back up (pass-through, in-guest iSCSI).
    pub needs_agent_backup: Vec<String>,
    /// Leftovers of an earlier failed backup that were removed first.
    pub cleaned_up: Vec<String>,
    pub retention: Option<RetentionOutcome>,
    pub error: Option<String>,
    /// The new change token, when the live backup kept one.
    #[serde(skip)]
    pub tracking: Option<VmTracking>,
}

impl VmOutcome {
    fn new(vm: &str, mode: Mode) -> Self {
        VmOutcome {
            vm: vm.to_string(),
            status: VmStatus::Failed,
            mode,
            method: None,
            snapshot: None,
            consistency: None,
            downtime_ms: None,
            booted: None,
            change_tracking: None,
            warnings: Vec::new(),
            needs_agent_backup: Vec::new(),
            cleaned_up: Vec::new(),
            retention: None,
            error: None,
            tracking: None,
        }
    }

    pub fn failed(vm: &str, mode: Mode, error: String) -> Self {
        let mut o = Self::new(vm, mode);
        o.error = Some(error);
        o
    }

    pub fn ok(&self) -> bool {
        self.status == VmStatus::Success
    }
}

/// What a snapshot records about how it was taken.
struct Record {
    method: &'static str,
    consistency: String,
    /// Changed ranges per frozen disk (by path), for those whose tracking held.
    disk_changes: Vec<(std::path::PathBuf, Vec<(u64, u64)>)>,
    parent: Option<String>,
}

fn store(
    repo: &Repository,
    vm: &str,
    paths: Vec<std::path::PathBuf>,
    opts: &VmOptions,
    rec: Record,
    progress: &dyn Progress,
) -> std::result::Result<(String, Snapshot), String> {
    let bo = BackupOptions {
        vm: vm.to_string(),
        tags: opts.tags.clone(),
        paths,
        disk_changes: rec.disk_changes,
        parent: rec.parent,
        threads: opts.threads,
        mode: Some(rec.method.to_string()),
        consistency: Some(rec.consistency),
        ..BackupOptions::default()
    };
    repo::backup::backup(repo, &bo, progress)
        .map_err(|e| format!("backup of VM '{vm}' failed: {e}"))
}

/// Store a copy of snapshot `id` with `downtime_ms`/`booted` set, then remove the original.
/// Returns the new id. Under a shared lock, like a backup, so prune cannot run in between.
pub fn amend_snapshot(
    repo: &Repository,
    id: &str,
    downtime_ms: Option<u64>,
    booted: Option<bool>,
) -> repo::Result<String> {
    let _lock = repo.lock_shared("backup")?;
    let mut snap = snapshot::load_snapshot(repo, id)?;
    snap.downtime_ms = downtime_ms;
    snap.booted = booted;
    let new_id = repo.save_json(ObjectKind::Snapshot, &snap)?.to_hex();
    if new_id != id {
        repo.backend().delete(ObjectKind::Snapshot, id)?;
    }
    Ok(new_id)
}

/// Releases the checkpoint if the code holding it unwinds without releasing it.
struct CheckpointGuard<'a> {
    hv: &'a dyn Hypervisor,
    vm: &'a str,
    cp: Checkpoint,
    released: bool,
}

impl CheckpointGuard<'_> {
    fn release(mut self, keep: bool) -> hypervisor::Result<Option<ChangeToken>> {
        self.released = true;
        self.hv.release_checkpoint(self.vm, &self.cp, keep)
    }
}

impl Drop for CheckpointGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.hv.release_checkpoint(self.vm, &self.cp, false) {
                tracing::error!(vm = self.vm, error = %e, "cannot release the checkpoint; the next run removes it");
            }
        }
    }
}

fn plain_paths(info: &VmInfo) -> Vec<std::path::PathBuf> {
    info.disks
        .iter()
        .filter(|d| !d.passthrough)
        .filter_map(|d| d.path.clone())
        .chain(info.config_files.iter().cloned())
        .collect()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The plan for `vm` in `mode` (what `preflight` shows).
pub fn plan_for(vm: &VmInfo, mode: Mode) -> Plan {
    strategy::plan(vm, mode)
}

/// Back up one VM following its plan. Never panics, never returns without undoing what it did
/// to the VM; the outcome says success or failure and why.
pub fn backup_vm(
    hv: &dyn Hypervisor,
    repo: &Repository,
    vm: &VmInfo,
    opts: &VmOptions,
    progress: &dyn Progress,
) -> VmOutcome {
    let mut out = VmOutcome::new(&vm.name, opts.mode);
    let mut info = vm.clone();
    let mut plan = plan_for(&info, opts.mode);

    // A VM in transition: look again a few times, then the plan's fallback.
    if plan.method == Method::Retry {
        let retry = plan.retry;
        let (attempts, delay, then) = match retry {
            Some(r) => (r.attempts, Duration::from_secs(r.delay_secs), r.then),
            None => (3, Duration::from_secs(60), Method::SavedState),
        };
        let delay = opts.retry_delay.unwrap_or(delay);
        let mut tried = 0;
        while plan.method == Method::Retry {
            if tried >= attempts {
                out.warnings.push(format!(
                    "VM '{}' was still {:?} after {attempts} looks; falling back to {}",
                    info.name,
                    info.state,
                    method_name(then)
                ));
                plan.method = then;
                if then == Method::Refused {
                    plan.warnings.push(
                        "live-app-only: a VM in transition cannot be backed up application-consistent"
                            .into(),
                    );
                }
                break;
            }
            tried += 1;
            std::thread::sleep(delay);
            match hv.vm(&info.name) {
                Ok(v) => {
                    info = v;
                    plan = plan_for(&info, opts.mode);
                }
                Err(e) => {
                    out.error = Some(format!("cannot look at VM '{}' again: {e}", info.name));
                    return out;
                }
            }
        }
    }
    out.method = Some(plan.method);
    out.needs_agent_backup = plan.needs_agent_backup_disks.clone();
    out.warnings.extend(plan.warnings.iter().cloned());

    if plan.method == Method::Refused {
        let unmet: Vec<String> = plan
            .reasons
            .iter()
            .filter(|r| !r.met)
            .map(|r| format!("{}: {}", r.name, r.detail))
            .collect();
        out.error = Some(format!(
            "backup of VM '{}' refused under mode {}: {}",
            info.name,
            mode_name(opts.mode),
            if unmet.is_empty() {
                "see the warnings".to_string()
            } else {
                unmet.join("; ")
            }
        ));
        return out;
    }

    match hv.cleanup_leftovers(&info.name) {
        Ok(removed) => {
            for r in &removed {
                out.warnings.push(format!(
                    "removed {r}, left behind by an earlier failed backup"
                ));
            }
            out.cleaned_up = removed;
        }
        Err(e) => {
            out.error = Some(format!(
                "cannot remove what an earlier failed backup of VM '{}' left behind ({e}); nothing was done; remove the checkpoint by hand and run again",
                info.name
            ));
            return out;
        }
    }

    let result = match plan.method {
        Method::Live => match live(hv, repo, &info, &plan, opts, progress, &mut out) {
            Ok(()) => Ok(()),
            // Where the hypervisor cannot checkpoint this VM, auto means saved state (the
            // article's fallback; Hyper-V does the same).
            Err(LiveFailure::NoCheckpoint(reason)) if opts.mode == Mode::Auto => {
                out.warnings.push(format!(
                    "{reason}; auto mode: falling back to a saved-state backup (a short pause of the VM)"
                ));
                out.method = Some(Method::SavedState);
                out.consistency = None;
                saved_state(hv, repo, &info, opts, progress, &mut out)
            }
            Err(LiveFailure::NoCheckpoint(e) | LiveFailure::Other(e)) => Err(e),
        },
        Method::SavedState => saved_state(hv, repo, &info, opts, progress, &mut out),
        Method::Shutdown => offline(hv, repo, &info, opts, progress, &mut out),
        Method::AsIs => {
            let consistency = if info.state == VmState::Saved {
                "saved-state"
            } else {
                "offline"
            };
            out.consistency = Some(consistency.into());
            let rec = Record {
                method: "as-is",
                consistency: consistency.into(),
                disk_changes: Vec::new(),
                parent: None,
            };
            store(repo, &info.name, plain_paths(&info), opts, rec, progress).map(|(id, _)| {
                out.snapshot = Some(id);
            })
        }
        Method::Retry | Method::Refused => Err("internal: unexpected plan".into()),
    };
    match result {
        Ok(()) => out.status = VmStatus::Success,
        Err(e) => {
            out.status = VmStatus::Failed;
            out.error = Some(e);
        }
    }
    out
}

/// Why a live backup failed: no checkpoint could be taken (nothing was done to the VM), or
/// something after it.
enum LiveFailure {
    NoCheckpoint(String),
    Other(String),
}

fn live(
    hv: &dyn Hypervisor,
    repo: &Repository,
    info: &VmInfo,
    plan: &Plan,
    opts: &VmOptions,
    progress: &dyn Progress,
    out: &mut VmOutcome,
) -> std::result::Result<(), LiveFailure> {
    let name = info.name.as_str();
    let first = plan.consistency.unwrap_or(Consistency::Crash);
    let cp = match hv.create_checkpoint(name, first) {
        Ok(cp) => cp,
        Err(e) => {
            // A failed checkpoint may leave a half-made one behind.
            after_failed_checkpoint(hv, name, out);
            match strategy::on_checkpoint_failure(plan, first, &e) {
                OnCheckpointFailure::RetryCrashConsistent { warning } => {
                    out.warnings.push(warning);
                    match hv.create_checkpoint(name, Consistency::Crash) {
                        Ok(cp) => cp,
                        Err(e2) => {
                            after_failed_checkpoint(hv, name, out);
                            return Err(LiveFailure::NoCheckpoint(format!(
                                "crash-consistent checkpoint of VM '{name}' failed too: {e2}"
                            )));
                        }
                    }
                }
                OnCheckpointFailure::Fail { reason } => {
                    return Err(LiveFailure::NoCheckpoint(reason))
                }
            }
        }
    };
    let consistency = match cp.consistency {
        Consistency::Application => "application",
        Consistency::Crash => "crash",
    };
    out.consistency = Some(consistency.into());
    let guard = CheckpointGuard {
        hv,
        vm: name,
        cp,
        released: false,
    };
    let cp = &guard.cp;

    // Changed ranges since the last live backup, asked per disk while the checkpoint still
    // exists. A disk whose tracking was lost is read in full; the others still are not.
    let mut disk_changes = Vec::new();
    let mut parent = None;
    if let Some(prev) = &opts.previous {
        if snapshot::find_snapshot(repo, &prev.snapshot, Some(name)).is_err() {
            let w = format!(
                "snapshot {} of the last change token is gone: reading the disks in full",
                short_id(&prev.snapshot)
            );
            out.change_tracking = Some(w.clone());
            out.warnings.push(w);
        } else {
            let several = cp.frozen_disks.len() > 1;
            let (mut tracked, mut lost) = (Vec::new(), Vec::new());
            for (i, disk) in cp.frozen_disks.iter().enumerate() {
                let which = if several {
                    format!("disk {}: ", disk.display())
                } else {
                    String::new()
                };
                match hv.changed_ranges(name, cp, i, &prev.token) {
                    Ok(Some(r)) => {
                        let bytes: u64 = r.iter().map(|&(_, l)| l).sum();
                        tracked.push(format!("{which}{} changed ranges, {bytes} bytes", r.len()));
                        disk_changes.push((disk.clone(), r));
                    }
                    Ok(None) => lost.push(format!(
                        "{which}change tracking was lost: reading the disk in full"
                    )),
                    Err(e) => lost.push(format!(
                        "{which}cannot get changed ranges ({e}): reading the disk in full"
                    )),
                }
            }
            out.warnings.extend(lost.iter().cloned());
            out.change_tracking = Some(if tracked.is_empty() {
                lost.join("; ")
            } else {
                let mut t = format!(
                    "{}, since snapshot {}",
                    tracked.join("; "),
                    short_id(&prev.snapshot)
                );
                if !lost.is_empty() {
                    t += &format!("; {}", lost.join("; "));
                }
                t
            });
            if !disk_changes.is_empty() {
                parent = Some(prev.snapshot.clone());
            }
        }
    }

    let config_files = if cp.config_files.is_empty() {
        info.config_files.clone()
    } else {
        cp.config_files.clone()
    };
    let paths: Vec<_> = cp
        .frozen_disks
        .iter()
        .cloned()
        .chain(config_files)
        .collect();
    let rec = Record {
        method: "live",
        consistency: consistency.into(),
        disk_changes,
        parent,
    };
    let stored = store(repo, name, paths, opts, rec, progress);
    let keep = opts.track_changes && stored.is_ok();
    let released = guard.release(keep);
    match (stored, released) {
        (Ok((id, _)), Ok(token)) => {
            out.tracking = token.map(|token| VmTracking {
                token,
                snapshot: id.clone(),
            });
            out.snapshot = Some(id);
            Ok(())
        }
        (Ok((id, _)), Err(e)) => {
            let msg = format!(
                "snapshot {} was saved, but releasing the checkpoint of VM '{name}' failed: {e}; {}",
                short_id(&id),
                after_failed_release(hv, name)
            );
            out.snapshot = Some(id);
            Err(LiveFailure::Other(msg))
        }
        (Err(b), Ok(_)) => Err(LiveFailure::Other(b)),
        (Err(b), Err(e)) => Err(LiveFailure::Other(format!(
            "{b}; releasing the checkpoint failed too: {e} ({})",
            after_failed_release(hv, name)
        ))),
    }
}

/// What a failed release left: only promise the next run's clean-up when there is something
/// to clean up (a release can fail after merging, e.g. when the VM stopped meanwhile).
fn after_failed_release(hv: &dyn Hypervisor, name: &str) -> &'static str {
    match hv.vm(name) {
        Ok(v) if v.existing_checkpoints.is_empty() => "no checkpoint is left behind",
        _ => "the next run removes what is left behind",
    }
}

fn after_failed_checkpoint(hv: &dyn Hypervisor, name: &str, out: &mut VmOutcome) {
    match hv.cleanup_leftovers(name) {
        Ok(removed) => out.cleaned_up.extend(removed),
        Err(e) => out.warnings.push(format!(
            "cleaning up after the failed checkpoint of VM '{name}' failed: {e}"
        )),
    }
}

fn saved_state(
    hv: &dyn Hypervisor,
    repo: &Repository,
    info: &VmInfo,
    opts: &VmOptions,
    progress: &dyn Progress,
    out: &mut VmOutcome,
) -> std::result::Result<(), String> {
    let name = info.name.as_str();
    let t0 = Instant::now();
    hv.save_state(name).map_err(|e| {
        format!("saving the state of VM '{name}' failed: {e}; nothing was backed up")
    })?;
    out.consistency = Some("saved-state".into());
    let rec = Record {
        method: "saved-state",
        consistency: "saved-state".into(),
        disk_changes: Vec::new(),
        parent: None,
    };
    let stored = store(repo, name, plain_paths(info), opts, rec, progress);
    let resumed = hv.resume(name);
    let downtime = ms(t0.elapsed());
    out.downtime_ms = Some(downtime);
    let stored = stored.and_then(|(id, _)| {
        amend_snapshot(repo, &id, Some(downtime), None).map_err(|e| {
            format!(
                "snapshot {} was saved but recording its downtime failed: {e}",
                short_id(&id)
            )
        })
    });
    match (stored, resumed) {
        (Ok(id), Ok(())) => {
            out.snapshot = Some(id);
            Ok(())
        }
        (Ok(id), Err(e)) => {
            out.snapshot = Some(id.clone());
            Err(format!(
                "snapshot {} was saved, but VM '{name}' could not be resumed: {e}; start it by hand",
                short_id(&id)
            ))
        }
        (Err(b), Ok(())) => Err(b),
        (Err(b), Err(e)) => Err(format!(
            "{b}; and VM '{name}' could not be resumed: {e}; start it by hand"
        )),
    }
}

fn offline(
    hv: &dyn Hypervisor,
    repo: &Repository,
    info: &VmInfo,
    opts: &VmOptions,
    progress: &dyn Progress,
    out: &mut VmOutcome,
) -> std::result::Result<(), String> {
    let name = info.name.as_str();
    let t0 = Instant::now();
    if let Err(e) = hv.shutdown(name, opts.shutdown_timeout) {
        // A failed shutdown normally leaves the VM running; if it did go off, start it again so
        // it ends as it was.
        let mut msg =
            format!("graceful shutdown of VM '{name}' failed: {e}; nothing was backed up");
        if let Ok(v) = hv.vm(name) {
            if v.state == VmState::Off {
                match hv.start(name) {
                    Ok(()) => msg.push_str("; the VM had turned off and was started again"),
                    Err(e2) => msg.push_str(&format!(
                        "; the VM is off and could not be started again ({e2}): start it by hand"
                    )),
                }
            } else if !msg.contains("left running") {
                msg.push_str("; the VM was left running");
            }
        }
        return Err(msg);
    }
    out.consistency = Some("offline".into());
    let rec = Record {
        method: "offline",
        consistency: "offline".into(),
        disk_changes: Vec::new(),
        parent: None,
    };
    let stored = store(repo, name, plain_paths(info), opts, rec, progress);
    let started = hv.start(name);
    let booted = match &started {
        Ok(()) => hv.wait_booted(name, opts.boot_timeout),
        Err(_) => Ok(false),
    };
    let downtime = ms(t0.elapsed());
    out.downtime_ms = Some(downtime);
    let booted_value = booted.as_ref().ok().copied();
    out.booted = booted_value;
    let stored = stored.and_then(|(id, _)| {
        amend_snapshot(repo, &id, Some(downtime), booted_value).map_err(|e| {
            format!(
                "snapshot {} was saved but recording downtime and boot failed: {e}",
                short_id(&id)
            )
        })
    });
    if let Ok(id) = &stored {
        out.snapshot = Some(id.clone());
    }
    let mut problems = Vec::new();
    if let Err(b) = &stored {
        problems.push(b.clone());
    }
    match (&started, &booted) {
        (Err(e), _) => problems.push(format!(
            "VM '{name}' could not be started again after the backup: {e}; start it by hand"
        )),
        (Ok(()), Ok(false)) => problems.push(format!(
            "VM '{name}' was started but did not answer within {} s: check that it boots",
            opts.boot_timeout.as_secs()
        )),
        (Ok(()), Err(e)) => problems.push(format!(
            "VM '{name}' was started, but whether it booted is unknown: {e}"
        )),
        (Ok(()), Ok(true)) => {}
    }
    if problems.is_empty() {
        Ok(())
    } else {
        if let Some(id) = &out.snapshot {
            problems.push(format!("snapshot {} was saved", short_id(id)));
        }
        Err(problems.join("; "))
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Live => "a live backup",
        Method::SavedState => "a saved-state backup",
        Method::Shutdown => "an offline backup (shutdown)",
        Method::AsIs => "a backup as it is",
        Method::Retry => "another look",
        Method::Refused => "no backup (refused)",
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Auto => "auto",
        Mode::Live => "live",
        Mode::LiveAppOnly => "live-app-only",
        Mode::SavedState => "saved-state",
        Mode::Offline => "offline",
    }
}

/// Everything a job run did.
#[derive(Clone, Debug, Serialize)]
pub struct JobReport {
    pub vms: Vec<VmOutcome>,
    pub prune: Option<PruneReport>,
    /// Problems outside a single VM's backup (retention, prune, state file).
    pub errors: Vec<String>,
    pub succeeded: usize,
    pub failed: usize,
}

impl JobReport {
    /// 0 all good, 1 some VM failed or retention/prune failed.
    pub fn exit_code(&self) -> u8 {
        if self.failed == 0 && self.errors.is_empty() {
            0
        } else {
            1
        }
    }
}

/// Options of a job run beyond the job file.
#[derive(Clone, Debug, Default)]
pub struct JobOptions {
    /// Only this VM (must be one the job selects).
    pub only_vm: Option<String>,
    pub retry_delay: Option<Duration>,
    pub threads: usize,
    /// Tags added to every snapshot (beside each `[[vm]]`'s own).
    pub extra_tags: BTreeMap<String, String>,
}

/// The VMs a job selects from `all`, each with its options; selectors by name that match no VM
/// give a failed outcome.
pub fn select(
    cfg: &JobConfig,
    all: &[VmInfo],
    only: Option<&str>,
) -> (Vec<(VmInfo, VmOptions)>, Vec<VmOutcome>) {
    let mut chosen: Vec<(VmInfo, VmOptions)> = Vec::new();
    let mut missing = Vec::new();
    for vm in all {
        if let Some(o) = only {
            if !o.eq_ignore_ascii_case(&vm.name) {
                continue;
            }
        }
        if let Some(sel) = cfg.selector_for(&vm.name) {
            chosen.push((
                vm.clone(),
                VmOptions {
                    mode: sel.mode,
                    shutdown_timeout: sel.shutdown_timeout,
                    boot_timeout: sel.boot_timeout,
                    tags: sel.tags.clone(),
                    ..VmOptions::default()
                },
            ));
        }
    }
    for sel in &cfg.vms {
        if let Some(n) = &sel.name {
            if only.is_some_and(|o| !o.eq_ignore_ascii_case(n)) {
                continue;
            }
            if !all.iter().any(|v| v.name.eq_ignore_ascii_case(n)) {
                let mut names: Vec<&str> = all.iter().map(|v| v.name.as_str()).take(11).collect();
                let more = if names.len() > 10 {
                    names.truncate(10);
                    ", ..."
                } else {
                    ""
                };
                missing.push(VmOutcome::failed(
                    n,
                    sel.mode,
                    if names.is_empty() {
                        format!("no VM named '{n}': the hypervisor lists no VMs")
                    } else {
                        format!(
                            "no VM named '{n}'; the hypervisor lists: {}{more}",
                            names.join(", ")
                        )
                    },
                ));
            }
        }
    }
    if let Some(o) = only {
        if chosen.is_empty() && missing.is_empty() {
            missing.push(VmOutcome::failed(
                o,
                Mode::Auto,
                format!("VM '{o}' does not exist or is not selected by the job file"),
            ));
        }
    }
    (chosen, missing)
}

/// Run a job: every selected VM, retention for each VM that succeeded, then one prune.
/// `Err` only when the VMs cannot even be listed.
pub fn run_job(
    cfg: &JobConfig,
    hv: &dyn Hypervisor,
    repo: &Repository,
    jo: &JobOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    let all = hv.list_vms()?;
    let (chosen, mut outcomes) = select(cfg, &all, jo.only_vm.as_deref());
    let policy: Option<KeepPolicy> = cfg.keep_policy()?;
    let state_path = cfg.state_path();
    let mut state = state_path
        .as_deref()
        .map(JobState::load)
        .unwrap_or_default();
    let mut errors = Vec::new();

    for (vm, mut opts) in chosen {
        opts.retry_delay = jo.retry_delay;
        opts.threads = jo.threads;
        opts.tags
            .extend(jo.extra_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        opts.previous = state.vms.get(&vm.name).cloned();
        tracing::info!(vm = %vm.name, mode = mode_name(opts.mode), "backing up");
        let mut out = backup_vm(hv, repo, &vm, &opts, progress);
        if out.ok() {
            if let Some(t) = out.tracking.clone() {
                state.vms.insert(vm.name.clone(), t);
            }
            if let Some(p) = &policy {
                match repo::forget::forget(repo, p, false, Some(&vm.name)) {
                    Ok(r) => {
                        out.retention = Some(RetentionOutcome {
                            kept: r.kept,
                            removed: r.removed,
                        })
                    }
                    Err(e) => errors.push(format!("retention for VM '{}' failed: {e}", vm.name)),
                }
            }
        }
        outcomes.push(out);
    }

    if let Some(p) = &state_path {
        if let Err(e) = state.save(p) {
            errors.push(e.to_string());
        }
    }

    let mut prune_report = None;
    if cfg.prune {
        match repo::prune::prune(repo, &PruneOptions::default()) {
            Ok(r) => prune_report = Some(r),
            Err(e) => errors.push(format!("prune failed: {e}")),
        }
    }
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    Ok(JobReport {
        succeeded: outcomes.len() - failed,
        failed,
        vms: outcomes,
        prune: prune_report,
        errors,
    })
}
