//! The backup strategies carried out against the Hyper-V implementation fed canned PowerShell
//! outputs, with a real repository and a real VHDX disk: what is called on the VM, in which
//! order, what the snapshot records, and that failures undo everything and keep older versions.

mod common;

use std::time::Duration;

use common::*;
use hypervisor::hyperv::{CannedRunner, Op, PsOutput};
use hypervisor::strategy::{Method, Mode};
use hypervisor::Hypervisor;
use jobs::run::{backup_vm, run_job, JobOptions, VmOptions};
use jobs::JobConfig;
use repo::backup::NoProgress;

fn opts(mode: Mode) -> VmOptions {
    VmOptions {
        mode,
        retry_delay: Some(Duration::ZERO),
        threads: 2,
        ..VmOptions::default()
    }
}

fn backup(
    env: &Env,
    runner: CannedRunner,
    mode: Mode,
) -> (jobs::VmOutcome, std::sync::Arc<CannedRunner>) {
    let (hv, r) = hv(runner);
    let vm = hv.vm("sql01").unwrap();
    let out = backup_vm(&hv, &env.repo, &vm, &opts(mode), &NoProgress);
    (out, r)
}

#[test]
fn auto_on_a_healthy_vm_is_live_application_consistent() {
    let env = Env::new();
    let (out, r) = backup(&env, live_runner(&env), Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::Live));
    assert_eq!(out.consistency.as_deref(), Some("application"));
    assert_eq!(
        ops(&r),
        [
            Op::Inventory,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::ReleaseCheckpoint
        ]
    );
    assert_eq!(args(&r, Op::CreateCheckpoint)[0]["ConsistencyLevel"], 1);
    let rel = &args(&r, Op::ReleaseCheckpoint)[0];
    assert_eq!(rel["InstanceId"], "Microsoft:CP1");
    assert_eq!(rel["KeepReferencePoint"], true);

    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 1);
    let (id, snap) = &snaps[0];
    assert_eq!(Some(id), out.snapshot.as_ref());
    assert_eq!(snap.vm, "sql01");
    assert_eq!(snap.mode.as_deref(), Some("live"));
    assert_eq!(snap.consistency.as_deref(), Some("application"));
    assert_eq!(snap.downtime_ms, None);
    assert_eq!(snap.booted, None);
    assert_eq!(snap.disks.len(), 1);
    assert_eq!(snap.disks[0].name, "sys.vhdx");
    assert_eq!(snap.files.len(), 1);
    assert_eq!(snap.files[0].name, "5F0B2A4E.vmcx");
    assert_eq!(env.snapshot_disk_bytes(snap), env.disk_bytes());
    let t = out.tracking.expect("change token kept");
    assert_eq!(t.token.per_disk, ["rct1"]);
    assert_eq!(&t.snapshot, id);
}

#[test]
fn failed_application_checkpoint_falls_back_to_crash_consistent_with_a_warning() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::CreateCheckpoint,
            PsOutput::failed("Can not create an application consistent checkpoint"),
        )
        .respond(Op::CreateCheckpoint, checkpoint_ok(&env))
        .respond(Op::ReleaseCheckpoint, release_ok("rct1"));
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.consistency.as_deref(), Some("crash"));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("retrying crash-consistent")),
        "{:?}",
        out.warnings
    );
    let levels: Vec<_> = args(&r, Op::CreateCheckpoint)
        .iter()
        .map(|a| a["ConsistencyLevel"].clone())
        .collect();
    assert_eq!(levels, [1, 2]);
    // Whatever the failed attempt left is cleaned up before the retry.
    assert_eq!(
        ops(&r),
        [
            Op::Inventory,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::ReleaseCheckpoint
        ]
    );
    let snaps = env.snapshots();
    assert_eq!(snaps[0].1.consistency.as_deref(), Some("crash"));
    assert_eq!(snaps[0].1.mode.as_deref(), Some("live"));
}

fn job_file(env: &Env, body: &str) -> JobConfig {
    job_file_with(env, "", body)
}

/// `top`: keys outside any table (they must come before the first table header).
fn job_file_with(env: &Env, top: &str, body: &str) -> JobConfig {
    let path = env.dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!("{top}[hypervisor]\nkind = \"hyperv\"\n[repository]\nlocation = \"repo\"\n{body}"),
    )
    .unwrap();
    JobConfig::load(&path).unwrap()
}

#[test]
fn live_app_only_failure_fails_the_vm_and_keeps_older_snapshots() {
    let env = Env::new();
    let (first, _) = backup(&env, live_runner(&env), Mode::Auto);
    assert!(first.ok());
    let before = env.snapshots();

    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::CreateCheckpoint,
            PsOutput::failed("Can not create an application consistent checkpoint"),
        )
        .respond(Op::ReleaseCheckpoint, release_ok("rct2"));
    let (hv, r) = hv(runner);
    let cfg = job_file(
        &env,
        "[[vm]]\nname = \"sql01\"\nmode = \"live-app-only\"\n[retention]\nkeep_last = 1\n",
    );
    let report = run_job(&cfg, &hv, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(report.exit_code(), 1);
    assert_eq!((report.succeeded, report.failed), (0, 1));
    let out = &report.vms[0];
    assert!(!out.ok());
    assert!(out.snapshot.is_none());
    let err = out.error.as_deref().unwrap();
    assert!(err.contains("live-app-only"), "{err}");
    assert!(out.retention.is_none());
    // Only one checkpoint attempt (no crash-consistent retry), cleaned up before and after.
    assert_eq!(
        ops(&r),
        [
            Op::Inventory,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::CleanupLeftovers
        ]
    );
    let after = env.snapshots();
    assert_eq!(after.len(), before.len());
    assert_eq!(after[0].0, before[0].0);
    assert_eq!(env.snapshot_disk_bytes(&after[0].1), env.disk_bytes());
}

#[test]
fn a_live_backup_that_fails_still_releases_the_checkpoint() {
    let env = Env::new();
    // The frozen disk the checkpoint names does not exist: the backup fails.
    let missing = env.dir.path().join("gone.vhdx");
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::CreateCheckpoint,
            PsOutput::ok(
                serde_json::json!({"InstanceId":"Microsoft:CP9","FrozenDisks":[env.path(&missing)],
                    "NewTops":["x.avhdx"],"ConfigFiles":[env.path(&env.vmcx)]})
                .to_string(),
            ),
        )
        .respond(Op::ReleaseCheckpoint, release_ok("rct1"));
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(!out.ok());
    assert!(
        out.error.as_deref().unwrap().contains("gone.vhdx"),
        "{out:?}"
    );
    let rel = args(&r, Op::ReleaseCheckpoint);
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0]["InstanceId"], "Microsoft:CP9");
    // No change token is kept from a failed backup.
    assert_eq!(rel[0]["KeepReferencePoint"], false);
    assert!(out.tracking.is_none());
    assert!(env.snapshots().is_empty());
}

#[test]
fn saved_state_resumes_even_when_the_backup_fails() {
    let env = Env::new();
    let gone = env.dir.path().join("missing.vhdx");
    let vm = vm_json(
        "sql01",
        "Running",
        &[drive(&env.path(&gone), 0)],
        true,
        &[env.path(&env.vmcx)],
    );
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[vm]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#));
    let (out, r) = backup(&env, runner, Mode::SavedState);
    assert!(!out.ok());
    assert!(
        out.error.as_deref().unwrap().contains("missing.vhdx"),
        "{out:?}"
    );
    assert_eq!(
        ops(&r),
        [Op::Inventory, Op::CleanupLeftovers, Op::SaveVm, Op::StartVm]
    );
    assert!(env.snapshots().is_empty());
}

#[test]
fn saved_state_records_the_downtime() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#));
    let (out, r) = backup(&env, runner, Mode::SavedState);
    assert!(out.ok(), "{out:?}");
    assert_eq!(
        ops(&r),
        [Op::Inventory, Op::CleanupLeftovers, Op::SaveVm, Op::StartVm]
    );
    let snaps = env.snapshots();
    assert_eq!(
        snaps.len(),
        1,
        "the amended snapshot replaces the first one"
    );
    let (id, snap) = &snaps[0];
    assert_eq!(Some(id), out.snapshot.as_ref());
    assert_eq!(snap.mode.as_deref(), Some("saved-state"));
    assert_eq!(snap.consistency.as_deref(), Some("saved-state"));
    assert_eq!(snap.downtime_ms, out.downtime_ms);
    assert!(snap.downtime_ms.is_some());
    assert_eq!(snap.booted, None);
    assert_eq!(env.snapshot_disk_bytes(snap), env.disk_bytes());
}

#[test]
fn offline_starts_the_vm_again_and_records_that_it_booted() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::StopVm,
            PsOutput::ok(r#"{"TimedOut":false,"State":"Off"}"#),
        )
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#))
        .respond(Op::WaitBooted, PsOutput::ok(r#"{"Booted":true}"#));
    let (out, r) = backup(&env, runner, Mode::Offline);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::Shutdown));
    assert_eq!(
        ops(&r),
        [
            Op::Inventory,
            Op::CleanupLeftovers,
            Op::StopVm,
            Op::StartVm,
            Op::WaitBooted
        ]
    );
    assert_eq!(args(&r, Op::StopVm)[0]["TimeoutSeconds"], 300);
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 1);
    let snap = &snaps[0].1;
    assert_eq!(snap.mode.as_deref(), Some("offline"));
    assert_eq!(snap.consistency.as_deref(), Some("offline"));
    assert_eq!(snap.booted, Some(true));
    assert!(snap.downtime_ms.is_some());
    assert_eq!(out.booted, Some(true));
}

#[test]
fn offline_vm_that_does_not_boot_is_a_failure_recorded_in_the_snapshot() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::StopVm,
            PsOutput::ok(r#"{"TimedOut":false,"State":"Off"}"#),
        )
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#))
        .respond(Op::WaitBooted, PsOutput::ok(r#"{"Booted":false}"#));
    let (out, _) = backup(&env, runner, Mode::Offline);
    assert!(!out.ok());
    assert!(
        out.error.as_deref().unwrap().contains("did not answer"),
        "{out:?}"
    );
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].1.booted, Some(false));
}

#[test]
fn shutdown_timeout_fails_and_leaves_the_vm_running() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::StopVm,
            PsOutput::ok(r#"{"TimedOut":true,"State":"Running"}"#),
        );
    let (hv, r) = hv(runner);
    let vm = hv.vm("sql01").unwrap();
    let o = VmOptions {
        shutdown_timeout: Duration::from_secs(90),
        ..opts(Mode::Offline)
    };
    let out = backup_vm(&hv, &env.repo, &vm, &o, &NoProgress);
    assert!(!out.ok());
    let err = out.error.as_deref().unwrap();
    assert!(err.contains("did not shut down within 90 s"), "{err}");
    assert!(err.contains("left running"), "{err}");
    assert!(!ops(&r).contains(&Op::StartVm));
    assert_eq!(args(&r, Op::StopVm)[0]["TimeoutSeconds"], 90);
    assert!(env.snapshots().is_empty());
}

#[test]
fn passthrough_disk_is_reported_as_needing_agent_backup() {
    let env = Env::new();
    let vm = vm_json(
        "sql01",
        "Running",
        &[drive(&env.path(&env.disk), 0), passthrough_drive(2)],
        true,
        &[env.path(&env.vmcx)],
    );
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[vm]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::CreateCheckpoint, checkpoint_ok(&env))
        .respond(Op::ReleaseCheckpoint, release_ok("rct1"));
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.needs_agent_backup, ["pass-through disk at SCSI 0:2"]);
    assert!(out.warnings.iter().any(|w| w.contains("agent mode")));
    // Pass-through disks keep the guest out of an application-consistent checkpoint.
    assert_eq!(args(&r, Op::CreateCheckpoint)[0]["ConsistencyLevel"], 2);
    assert_eq!(out.consistency.as_deref(), Some("crash"));
    let snaps = env.snapshots();
    assert_eq!(snaps[0].1.disks.len(), 1);
}

#[test]
fn vm_that_is_off_is_backed_up_as_it_is() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Off")]))
        .respond(Op::CleanupLeftovers, no_leftovers());
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::AsIs));
    assert_eq!(ops(&r), [Op::Inventory, Op::CleanupLeftovers]);
    let snap = &env.snapshots()[0].1;
    assert_eq!(snap.mode.as_deref(), Some("as-is"));
    assert_eq!(snap.consistency.as_deref(), Some("offline"));
}

#[test]
fn vm_in_transition_is_retried_then_backed_up_live() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Starting")]))
        .respond(Op::Inventory, inventory(&[healthy(&env, "Starting")]))
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::CreateCheckpoint, checkpoint_ok(&env))
        .respond(Op::ReleaseCheckpoint, release_ok("rct1"));
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::Live));
    assert_eq!(ops(&r).iter().filter(|o| **o == Op::Inventory).count(), 3);
}

#[test]
fn vm_stuck_in_transition_falls_back_to_saved_state() {
    let env = Env::new();
    let runner = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Stopping")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#));
    let (out, r) = backup(&env, runner, Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::SavedState));
    // The first look plus three retries.
    assert_eq!(ops(&r).iter().filter(|o| **o == Op::Inventory).count(), 4);
    assert!(out.warnings.iter().any(|w| w.contains("falling back")));
}

#[test]
fn retention_runs_only_after_success() {
    let env = Env::new();
    // Two versions without retention.
    for _ in 0..2 {
        let (o, _) = backup(&env, live_runner(&env), Mode::Auto);
        assert!(o.ok());
    }
    assert_eq!(env.snapshots().len(), 2);
    let cfg = job_file(
        &env,
        "[[vm]]\nname = \"sql01\"\nmode = \"live-app-only\"\n[retention]\nkeep_last = 1\n",
    );
    // A failing run: retention must not touch the older versions.
    let failing = CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(&env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::CreateCheckpoint, PsOutput::failed("VSS writer failed"));
    let (hv1, _) = hv(failing);
    let rep = run_job(&cfg, &hv1, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep.exit_code(), 1);
    assert_eq!(env.snapshots().len(), 2);
    // A successful run: keep_last = 1 leaves only the new snapshot.
    let (hv2, _) = hv(live_runner(&env));
    let rep = run_job(&cfg, &hv2, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep.exit_code(), 0, "{rep:?}");
    let out = &rep.vms[0];
    assert_eq!(
        out.retention,
        Some(jobs::run::RetentionOutcome {
            kept: 1,
            removed: 2
        })
    );
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(Some(&snaps[0].0), out.snapshot.as_ref());
}

#[test]
fn unknown_vm_name_fails_the_job() {
    let env = Env::new();
    let cfg = job_file(&env, "[[vm]]\nname = \"nosuchvm\"\n");
    let (hv, _) = hv(live_runner(&env));
    let rep = run_job(&cfg, &hv, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep.exit_code(), 1);
    assert_eq!(rep.vms.len(), 1);
    assert!(rep.vms[0]
        .error
        .as_deref()
        .unwrap()
        .contains("no VM named 'nosuchvm'"));
}

#[test]
fn second_live_backup_reads_only_changed_ranges() {
    let env = Env::new();
    let cfg = job_file_with(&env, "prune = true\n", "[[vm]]\npattern = \"sql*\"\n");
    assert!(cfg.prune);
    let (hv1, _) = hv(live_runner(&env));
    let rep1 = run_job(&cfg, &hv1, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep1.exit_code(), 0, "{rep1:?}");
    let first = rep1.vms[0].snapshot.clone().unwrap();
    let state = std::fs::read_to_string(cfg.state_path().unwrap()).unwrap();
    assert!(state.contains("rct1") && state.contains(&first), "{state}");

    // The guest writes 4 KiB at 5 MiB; RCT reports exactly that range.
    let new_data = pattern(4096, 9);
    env.write_disk(5 * MIB, &new_data);
    let runner = live_runner(&env).respond(
        Op::ChangedRanges,
        PsOutput::ok(
            serde_json::json!({"Available":true,"Reason":null,"DiskSize":DISK_SIZE,
                "ChangedByteOffsets":5 * MIB,"ChangedByteLengths":4096})
            .to_string(),
        ),
    );
    let (hv2, r2) = hv(runner);
    let rep2 = run_job(&cfg, &hv2, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep2.exit_code(), 0, "{rep2:?}");
    let cr = args(&r2, Op::ChangedRanges);
    assert_eq!(cr.len(), 1);
    assert_eq!(cr[0]["LimitId"], "rct1");
    // Asked while the checkpoint existed, i.e. before it was released.
    let o = ops(&r2);
    let pos = |op| o.iter().position(|x| *x == op).unwrap();
    assert!(pos(Op::ChangedRanges) < pos(Op::ReleaseCheckpoint));
    let second = rep2.vms[0].snapshot.clone().unwrap();
    let snap = repo::snapshot::load_snapshot(&env.repo, &second).unwrap();
    assert_eq!(snap.parent.as_deref(), Some(first.as_str()));
    // One 1 MiB chunk of the disk plus the small configuration file.
    let vmcx_len = std::fs::metadata(&env.vmcx).unwrap().len();
    assert_eq!(snap.summary.bytes_read, MIB + vmcx_len);
    assert_eq!(env.snapshot_disk_bytes(&snap), env.disk_bytes());
    assert!(rep2.vms[0]
        .change_tracking
        .as_deref()
        .unwrap()
        .contains("1 changed ranges"));
    assert!(rep2.prune.is_some());
}

#[test]
fn lost_change_tracking_reads_in_full() {
    let env = Env::new();
    let cfg = job_file(&env, "[[vm]]\nname = \"sql01\"\n");
    let (hv1, _) = hv(live_runner(&env));
    run_job(&cfg, &hv1, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    let runner = live_runner(&env).respond(
        Op::ChangedRanges,
        PsOutput::ok(r#"{"Available":false,"Reason":"reference point was removed"}"#),
    );
    let (hv2, _) = hv(runner);
    let rep = run_job(&cfg, &hv2, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep.exit_code(), 0, "{rep:?}");
    let snap =
        repo::snapshot::load_snapshot(&env.repo, rep.vms[0].snapshot.as_deref().unwrap()).unwrap();
    // Both allocated 1 MiB chunks of the disk were read again.
    let vmcx_len = std::fs::metadata(&env.vmcx).unwrap().len();
    assert_eq!(snap.summary.bytes_read, 2 * MIB + vmcx_len);
    assert!(rep.vms[0]
        .warnings
        .iter()
        .any(|w| w.contains("change tracking was lost")));
}

#[test]
fn each_disk_of_a_two_disk_vm_uses_its_own_change_tracking() {
    let env = Env::new();
    let data = env.add_disk(
        "data.vhdx",
        16 * MIB,
        &[(8 * MIB, pattern(2 * MIB as usize, 3))],
    );
    let cfg = job_file(&env, "[[vm]]\nname = \"sql01\"\n");
    // sql01 with two drives; its checkpoint freezes both, and RCT gives one id per disk.
    let runner = || {
        let vm = vm_json(
            "sql01",
            "Running",
            &[drive(&env.path(&env.disk), 0), drive(&env.path(&data), 1)],
            true,
            &[env.path(&env.vmcx)],
        );
        let cp = serde_json::json!({
            "InstanceId": "Microsoft:CP1",
            "FrozenDisks": [env.path(&env.disk), env.path(&data)],
            "NewTops": [env.path(&env.dir.path().join("sys_CP1.avhdx")),
                        env.path(&env.dir.path().join("data_CP1.avhdx"))],
            "ConfigFiles": [env.path(&env.vmcx)],
        });
        CannedRunner::new()
            .respond(Op::Inventory, inventory(&[vm]))
            .respond(Op::CleanupLeftovers, no_leftovers())
            .respond(Op::CreateCheckpoint, PsOutput::ok(cp.to_string()))
            .respond(
                Op::ReleaseCheckpoint,
                PsOutput::ok(r#"{"ReferencePoint":"RP-1","RctIds":["rct-sys","rct-data"]}"#),
            )
    };
    let changed = |size: u64, offset: u64, len: u64| {
        PsOutput::ok(
            serde_json::json!({"Available":true,"Reason":null,"DiskSize":size,
                "ChangedByteOffsets":offset,"ChangedByteLengths":len})
            .to_string(),
        )
    };
    let (hv1, _) = hv(runner());
    let rep1 = run_job(&cfg, &hv1, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep1.exit_code(), 0, "{rep1:?}");
    let vmcx_len = std::fs::metadata(&env.vmcx).unwrap().len();

    // Both disks tracked: one 1 MiB chunk of each is read.
    env.write_disk(5 * MIB, &pattern(4096, 9));
    env.write_disk_at(&data, 9 * MIB, &pattern(4096, 10));
    let r = runner()
        .respond(Op::ChangedRanges, changed(DISK_SIZE, 5 * MIB, 4096))
        .respond(Op::ChangedRanges, changed(16 * MIB, 9 * MIB, 4096));
    let (hv2, r2) = hv(r);
    let rep2 = run_job(&cfg, &hv2, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep2.exit_code(), 0, "{rep2:?}");
    let asked: Vec<_> = args(&r2, Op::ChangedRanges)
        .iter()
        .map(|a| a["LimitId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(asked, ["rct-sys", "rct-data"]);
    let snap =
        repo::snapshot::load_snapshot(&env.repo, rep2.vms[0].snapshot.as_deref().unwrap()).unwrap();
    assert_eq!(
        snap.summary.bytes_read,
        2 * MIB + vmcx_len,
        "{:?}",
        snap.summary
    );
    assert!(
        rep2.vms[0].warnings.is_empty(),
        "{:?}",
        rep2.vms[0].warnings
    );
    let tracking = rep2.vms[0].change_tracking.clone().unwrap();
    assert!(
        tracking.contains("sys.vhdx: 1 changed ranges")
            && tracking.contains("data.vhdx: 1 changed ranges"),
        "{tracking}"
    );
    assert_eq!(env.snapshot_disk_bytes_at(&snap, 0), env.disk_bytes());
    assert_eq!(
        env.snapshot_disk_bytes_at(&snap, 1),
        env.disk_bytes_of(&data)
    );

    // The data disk's tracking lost: it alone is read in full (its 2 allocated MiB), with a
    // warning naming it; the system disk still reads one chunk.
    env.write_disk(5 * MIB, &pattern(4096, 11));
    env.write_disk_at(&data, 9 * MIB, &pattern(4096, 12));
    let r = runner()
        .respond(Op::ChangedRanges, changed(DISK_SIZE, 5 * MIB, 4096))
        .respond(
            Op::ChangedRanges,
            PsOutput::ok(r#"{"Available":false,"Reason":"reference point was removed"}"#),
        );
    let (hv3, _) = hv(r);
    let rep3 = run_job(&cfg, &hv3, &env.repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep3.exit_code(), 0, "{rep3:?}");
    let snap =
        repo::snapshot::load_snapshot(&env.repo, rep3.vms[0].snapshot.as_deref().unwrap()).unwrap();
    assert_eq!(
        snap.summary.bytes_read,
        3 * MIB + vmcx_len,
        "{:?}",
        snap.summary
    );
    let warnings = &rep3.vms[0].warnings;
    assert!(
        warnings.len() == 1 && warnings[0].contains("data.vhdx") && warnings[0].contains("lost"),
        "{warnings:?}"
    );
    assert_eq!(env.snapshot_disk_bytes_at(&snap, 0), env.disk_bytes());
    assert_eq!(
        env.snapshot_disk_bytes_at(&snap, 1),
        env.disk_bytes_of(&data)
    );
}

fn no_checkpoint_runner(env: &Env) -> CannedRunner {
    CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(
            Op::CreateCheckpoint,
            PsOutput::failed("The operation is not supported for this virtual machine"),
        )
        .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
        .respond(Op::StartVm, PsOutput::ok(r#"{"State":"Running"}"#))
}

#[test]
fn auto_falls_back_to_saved_state_when_no_checkpoint_is_possible() {
    let env = Env::new();
    let (out, r) = backup(&env, no_checkpoint_runner(&env), Mode::Auto);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.method, Some(Method::SavedState));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("falling back to a saved-state backup")),
        "{:?}",
        out.warnings
    );
    assert_eq!(
        ops(&r),
        [
            Op::Inventory,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::CleanupLeftovers,
            Op::CreateCheckpoint,
            Op::CleanupLeftovers,
            Op::SaveVm,
            Op::StartVm
        ]
    );
    let snap = &env.snapshots()[0].1;
    assert_eq!(snap.mode.as_deref(), Some("saved-state"));
    assert!(snap.downtime_ms.is_some());
}

#[test]
fn live_mode_does_not_pause_the_vm_when_no_checkpoint_is_possible() {
    let env = Env::new();
    let (out, r) = backup(&env, no_checkpoint_runner(&env), Mode::Live);
    assert!(!out.ok());
    assert!(out.error.as_deref().unwrap().contains("failed"), "{out:?}");
    assert!(!ops(&r).contains(&Op::SaveVm));
    assert!(env.snapshots().is_empty());
}
