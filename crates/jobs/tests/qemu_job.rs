//! End to end through the job engine with a real QEMU VM (TCG, VHDX disk, a busybox guest that
//! appends checksummed records with a sync after each, guest agent; assets from
//! `testvm/build.sh`): while the guest writes, `run_job` backs it up live application-consistent,
//! live crash-consistent (the guest agent answers but refuses fsfreeze), in saved state and
//! offline, each into the repository. Every snapshot is restored to raw and checked from outside:
//! the filesystem is clean (after journal replay on a copy for crash-consistent and saved-state
//! copies), it holds every record announced before the freeze point, and the snapshot records
//! the method, the consistency, the downtime and (offline) that the VM booted again. At the end
//! the live disk holds every record.

#[path = "../../hypervisor/tests/qemu_common/mod.rs"]
mod qemu_common;
#[path = "common/qemu.rs"]
mod qemu_jobs;

use std::time::Instant;

use hypervisor::strategy::{Method, Mode};
use hypervisor::{Hypervisor, VmState};
use qemu_common::*;
use qemu_jobs::*;
use repo::backup::NoProgress;

#[test]
fn job_backs_up_a_writing_qemu_vm_live_crash_saved_and_offline() {
    let started = Instant::now();
    let t = test_vm();
    let (hv, disk, scratch) = (&t.hv, t.disk.clone(), t.scratch.clone());
    let repo = init_repo(&t.tmp.path().join("repo"));
    boot(hv);

    // 1. Live, application-consistent (live-app-only insists on it), with retention.
    let cfg = job(
        t.tmp.path(),
        "mode = \"live-app-only\"\n\n[retention]\nkeep_last = 10",
    );
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::Live));
    assert_eq!(out.consistency.as_deref(), Some("application"));
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_eq!(
        out.retention,
        Some(jobs::run::RetentionOutcome {
            kept: 1,
            removed: 0
        })
    );
    assert!(
        out.tracking.is_some(),
        "the live backup keeps a change token"
    );
    let app_id = out.snapshot.clone().unwrap();
    assert_vm_untouched(hv, &disk);
    let (snap, n_app) = check_snapshot(&repo, &app_id, &scratch, false, before);
    assert_eq!(snap.mode.as_deref(), Some("live"));
    assert_eq!(snap.consistency.as_deref(), Some("application"));
    assert_eq!(snap.downtime_ms, None);
    assert_eq!(snap.booted, None);
    eprintln!("application-consistent done after {:?}", started.elapsed());

    // 2. Live, crash-consistent: the agent answers but fsfreeze is unavailable, so mode `live`
    //    takes a crash-consistent checkpoint and says so. It is incremental on the first backup
    //    (the change token from the state file beside the job file).
    agent_without_fsfreeze(hv);
    let cfg = job(t.tmp.path(), "mode = \"live\"");
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::Live));
    assert_eq!(out.consistency.as_deref(), Some("crash"));
    assert!(
        out.warnings.iter().any(|w| w.contains("crash-consistent")),
        "{:?}",
        out.warnings
    );
    let ct = out.change_tracking.clone().unwrap_or_default();
    assert!(
        ct.contains("changed ranges") && ct.contains(&app_id[..8]),
        "change tracking: {ct}"
    );
    let crash_id = out.snapshot.clone().unwrap();
    assert_vm_untouched(hv, &disk);
    let (snap, n_crash) = check_snapshot(&repo, &crash_id, &scratch, true, before);
    assert_eq!(snap.mode.as_deref(), Some("live"));
    assert_eq!(snap.consistency.as_deref(), Some("crash"));
    assert_eq!(snap.parent.as_deref(), Some(app_id.as_str()));
    assert!(n_crash > n_app, "{n_crash} records, {n_app} in the first");
    eprintln!("crash-consistent done after {:?}", started.elapsed());

    // 3. Saved state: the VM is saved, backed up, resumed (the same guest: it does not boot
    //    again, its records continue); the downtime is recorded.
    let cfg = job(t.tmp.path(), "mode = \"saved-state\"");
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::SavedState));
    assert_eq!(out.consistency.as_deref(), Some("saved-state"));
    let saved_id = out.snapshot.clone().unwrap();
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    wait_announced(hv, before);
    let console = std::fs::read_to_string(hv.console_log(VM)).unwrap();
    assert!(
        !console.contains("HK-BOOTED"),
        "the guest booted again instead of resuming:\n{console}"
    );
    assert_vm_untouched(hv, &disk);
    // The filesystem was mounted and in use when saved: its journal may need replay.
    let (snap, n_saved) = check_snapshot(&repo, &saved_id, &scratch, true, before);
    assert_eq!(snap.mode.as_deref(), Some("saved-state"));
    assert_eq!(snap.consistency.as_deref(), Some("saved-state"));
    let downtime = snap.downtime_ms.expect("saved-state downtime");
    assert!(downtime > 0);
    assert_eq!(out.downtime_ms, Some(downtime));
    assert_eq!(snap.booted, None);
    assert!(n_saved > n_crash);
    eprintln!(
        "saved-state done after {:?} (downtime {downtime} ms)",
        started.elapsed()
    );

    // 4. Offline: clean shutdown (a cleanly unmounted filesystem, no partial record), backed
    //    up, started again; downtime and "booted" recorded.
    let cfg = job(
        t.tmp.path(),
        "mode = \"offline\"\nshutdown_timeout = \"60s\"\nboot_timeout = \"90s\"",
    );
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::Shutdown));
    assert_eq!(out.mode, Mode::Offline);
    assert_eq!(out.consistency.as_deref(), Some("offline"));
    assert_eq!(out.booted, Some(true));
    let off_id = out.snapshot.clone().unwrap();
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    let (snap, n_off) = check_snapshot(&repo, &off_id, &scratch, false, before);
    assert_eq!(snap.mode.as_deref(), Some("offline"));
    assert_eq!(snap.consistency.as_deref(), Some("offline"));
    assert_eq!(snap.booted, Some(true));
    let downtime = snap.downtime_ms.expect("offline downtime");
    assert!(downtime > 0);
    assert_eq!(out.downtime_ms, Some(downtime));
    assert!(n_off > n_saved);
    // Booted again: a new boot marker, and the records continue past the backup's.
    assert!(std::fs::read_to_string(hv.console_log(VM))
        .unwrap()
        .contains("HK-BOOTED"));
    wait_announced(hv, n_off);
    assert_vm_untouched(hv, &disk);
    eprintln!(
        "offline done after {:?} (downtime {downtime} ms)",
        started.elapsed()
    );

    // Every snapshot is still there (retention kept them all) and the repository checks clean.
    let ids = snapshot_ids(&repo);
    for id in [&app_id, &crash_id, &saved_id, &off_id] {
        assert!(ids.contains(id), "snapshot {id} missing from {ids:?}");
    }
    let check = repo::check::check(
        &repo,
        &repo::check::CheckOptions {
            read_data: repo::check::ReadData::All,
        },
    )
    .unwrap();
    assert!(check.is_clean(), "{:?}", check.problems);

    // The live disk ends with every record.
    shutdown_and_check_live_disk(hv, &disk, &scratch, n_off);
    eprintln!("total {:?}", started.elapsed());
}
