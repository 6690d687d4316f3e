//! Shared by the jobs `qemu_job*` tests (included with `#[path]`, after the hypervisor crate's
//! `qemu_common`): a repository and a job file beside a booted test VM, running one VM's job,
//! restoring a snapshot to raw for the outside checks (e2fsck, records), and what "the VM was
//! left as it was" means.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::qemu::QemuHypervisor;
use hypervisor::{Hypervisor, VmState};
use jobs::run::{run_job, JobOptions, JobReport, VmOutcome};
use jobs::JobConfig;
use repo::backend::{Backend, LocalBackend};
use repo::backup::{NoProgress, Progress};
use repo::crypto::KdfParams;
use repo::repository::{InitOptions, Repository};
use repo::snapshot::{list_snapshots, load_snapshot, Snapshot};
use vdisk::DiskFormat;

use crate::qemu_common::*;

pub fn init_repo(dir: &Path) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    Repository::init(
        backend,
        "pw",
        InitOptions {
            chunk_size: 1 << 20,
            pack_size: 4 << 20,
            compression_level: 1,
            kdf: Some(KdfParams::FAST_FOR_TESTS),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Write `job.toml` in `dir` for the test VM with these `[[vm]]` settings (e.g.
/// `mode = "offline"`) and load it. The change-tracking state file sits beside it, so
/// successive jobs written here share it, as successive runs of one job file do.
pub fn job(dir: &Path, vm_settings: &str) -> JobConfig {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[hypervisor]\nkind = \"qemu\"\nruntime_dir = \"run\"\n\n[[vm]]\nname = \"{VM}\"\n{vm_settings}\n"
        ),
    )
    .unwrap();
    JobConfig::load(&path).unwrap()
}

/// Run a job of the one test VM; returns the report and the VM's outcome.
pub fn run_vm_job(
    cfg: &JobConfig,
    hv: &QemuHypervisor,
    repo: &Repository,
    progress: &dyn Progress,
) -> (JobReport, VmOutcome) {
    let t = Instant::now();
    let rep = run_job(cfg, hv, repo, &JobOptions::default(), progress).expect("run_job");
    assert_eq!(rep.vms.len(), 1, "{rep:#?}");
    let out = rep.vms[0].clone();
    eprintln!(
        "job ({:?}) took {:?}: {:?} {:?} {:?}",
        out.mode,
        t.elapsed(),
        out.status,
        out.consistency,
        out.error
    );
    (rep, out)
}

pub fn snapshot_ids(repo: &Repository) -> Vec<String> {
    let mut ids: Vec<String> = list_snapshots(repo)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    ids
}

/// Restore snapshot `id` (the VM's one disk) to raw under `target`; returns the raw file.
pub fn restore_raw(repo: &Repository, id: &str, target: &Path) -> (Snapshot, PathBuf) {
    let snap = load_snapshot(repo, id).unwrap();
    assert_eq!(snap.disks.len(), 1, "snapshot {id}: {:?}", snap.disks);
    let report =
        repo::restore::restore(repo, id, &snap, target, Some(DiskFormat::Raw), &NoProgress)
            .unwrap_or_else(|e| panic!("restore of snapshot {id}: {e}"));
    (snap, report.disks[0].path.clone())
}

/// Restore snapshot `id` and check it from outside: the filesystem is clean (for crash-
/// consistent and saved-state copies after journal replay on a copy), and it holds the guest's
/// records 1..n intact with n >= `at_least`. Returns the snapshot and n.
pub fn check_snapshot(
    repo: &Repository,
    id: &str,
    scratch: &Path,
    needs_replay: bool,
    at_least: u64,
) -> (Snapshot, u64) {
    let target = scratch.join(format!("restore-{}", &id[..8]));
    let (snap, raw) = restore_raw(repo, id, &target);
    let n = if needs_replay {
        // The restored raw file is a copy: replaying its journal changes nothing stored.
        e2fsck_repair(&raw);
        check_records(&raw, scratch, true)
    } else {
        e2fsck_clean(&raw);
        check_records(&raw, scratch, false)
    };
    assert!(
        n >= at_least,
        "snapshot {id} ({:?}) holds {n} records, {at_least} were on disk before its freeze point",
        snap.consistency
    );
    std::fs::remove_dir_all(&target).unwrap();
    (snap, n)
}

/// The VM is running on its own disk with no checkpoint and no overlay file left, and the guest
/// keeps writing records.
pub fn assert_vm_untouched(hv: &QemuHypervisor, disk: &Path) {
    let info = hv.vm(VM).unwrap();
    assert_eq!(info.state, VmState::Running, "{info:#?}");
    assert!(
        info.existing_checkpoints.is_empty(),
        "checkpoint left: {:?}",
        info.existing_checkpoints
    );
    assert_eq!(info.disks[0].path.as_deref(), Some(disk), "{info:#?}");
    assert_eq!(overlays(hv), Vec::<PathBuf>::new(), "overlay files left");
    wait_announced(hv, announced(hv));
}

/// Overlay files in the VM's runtime directory.
pub fn overlays(hv: &QemuHypervisor) -> Vec<PathBuf> {
    std::fs::read_dir(hv.vm_dir(VM))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("overlay-"))
        })
        .collect()
}

pub fn boot(hv: &QemuHypervisor) {
    let t = Instant::now();
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not boot:\n{}",
        std::fs::read_to_string(hv.console_log(VM)).unwrap_or_default()
    );
    wait_announced(hv, 0);
    eprintln!("booted in {:?}", t.elapsed());
}

/// Wait until the VM's guest-agent status satisfies `want` (agent up/down, fsfreeze on/off).
pub fn wait_guest(
    hv: &QemuHypervisor,
    what: &str,
    want: impl Fn(&hypervisor::GuestIntegration) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = hv.vm(VM).unwrap().guest;
        if want(&g) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "guest never became {what}: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Replace the guest agent by one that refuses fsfreeze (`--block-rpcs`): the agent answers,
/// the backup service does not, as on a guest whose VSS writer / fsfreeze is broken.
pub fn agent_without_fsfreeze(hv: &QemuHypervisor) {
    guest_sh(
        hv,
        "exec >/dev/null 2>&1; sleep 0.3; kill $(cat /run/qemu-ga.pid); sleep 1; \
         for p in /sys/class/virtio-ports/*; do \
           [ \"$(cat $p/name)\" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p); \
         done; \
         /usr/sbin/qemu-ga -m virtio-serial -p $port -t /run -d -f /run/qemu-ga.pid \
           -b guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-fsfreeze-status",
    );
    std::thread::sleep(Duration::from_millis(1500));
    wait_guest(hv, "agent without fsfreeze", |g| {
        g.agent_responding && !g.backup_service_enabled
    });
}

/// Stop the guest agent altogether.
pub fn kill_agent(hv: &QemuHypervisor) {
    guest_sh(
        hv,
        "exec >/dev/null 2>&1; sleep 0.3; kill $(cat /run/qemu-ga.pid)",
    );
    std::thread::sleep(Duration::from_secs(1));
    wait_guest(hv, "without agent", |g| !g.agent_responding);
}
