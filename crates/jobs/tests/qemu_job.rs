//! End to end through a real QEMU VM (TCG; assets from `testvm/build.sh`): a job backs up the
//! running guest live and application-consistent, then offline; each snapshot restores to a
//! filesystem that checks clean, and the VM is running at the end.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hypervisor::qemu::{build_testvm, testvm_definition, QemuHypervisor};
use hypervisor::strategy::{Method, Mode};
use hypervisor::{Hypervisor, VmState};
use jobs::run::{backup_vm, run_job, JobOptions, VmOptions};
use jobs::JobConfig;
use repo::backend::{Backend, LocalBackend};
use repo::backup::NoProgress;
use repo::crypto::KdfParams;
use repo::repository::{InitOptions, Repository};
use repo::snapshot::load_snapshot;
use vdisk::DiskFormat;

const VM: &str = "j1";

fn e2fsck_clean(repo: &Repository, id: &str, target: &Path) {
    let snap = load_snapshot(repo, id).unwrap();
    let report =
        repo::restore::restore(repo, id, &snap, target, Some(DiskFormat::Raw), &NoProgress)
            .unwrap();
    let raw = &report.disks[0].path;
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(raw)
        .output()
        .unwrap_or_else(|e| panic!("cannot run e2fsck (package e2fsprogs): {e}"));
    assert!(
        out.status.success(),
        "e2fsck -fn of snapshot {id}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn job_backs_up_a_running_qemu_vm_live_then_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let assets = build_testvm(&root).unwrap_or_else(|e| panic!("{e}"));
    // Short paths: QEMU's unix sockets live under the runtime directory.
    let tmp = tempfile::Builder::new()
        .prefix("hkj")
        .tempdir_in("/tmp")
        .unwrap();
    let disk = tmp.path().join("disk.vhdx");
    std::fs::copy(assets.join("disk-template.vhdx"), &disk).unwrap();
    let hv = QemuHypervisor::new(tmp.path().join("run"))
        .unwrap()
        .kill_on_drop(true);
    hv.define(&testvm_definition(VM, &assets, vec![disk.clone()]))
        .unwrap();
    hv.start(VM).unwrap();
    assert!(hv.wait_booted(VM, Duration::from_secs(90)).unwrap());

    let backend: std::sync::Arc<dyn Backend> =
        std::sync::Arc::new(LocalBackend::new(tmp.path().join("repo")));
    let repo = Repository::init(
        backend,
        "pw",
        InitOptions {
            chunk_size: 1 << 20,
            pack_size: 4 << 20,
            compression_level: 1,
            kdf: Some(KdfParams::FAST_FOR_TESTS),
        },
    )
    .unwrap();

    let job_path = tmp.path().join("job.toml");
    std::fs::write(
        &job_path,
        format!(
            "[hypervisor]\nkind = \"qemu\"\nruntime_dir = \"run\"\n[[vm]]\nname = \"{VM}\"\nmode = \"live-app-only\"\n[retention]\nkeep_last = 5\n"
        ),
    )
    .unwrap();
    let cfg = JobConfig::load(&job_path).unwrap();
    let rep = run_job(&cfg, &hv, &repo, &JobOptions::default(), &NoProgress).unwrap();
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    let live = &rep.vms[0];
    assert_eq!(live.method, Some(Method::Live));
    assert_eq!(live.consistency.as_deref(), Some("application"));
    let live_id = live.snapshot.clone().unwrap();
    let snap = load_snapshot(&repo, &live_id).unwrap();
    assert_eq!(snap.mode.as_deref(), Some("live"));
    assert_eq!(snap.consistency.as_deref(), Some("application"));
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    e2fsck_clean(&repo, &live_id, &tmp.path().join("restore-live"));

    let info = hv.vm(VM).unwrap();
    let opts = VmOptions {
        mode: Mode::Offline,
        shutdown_timeout: Duration::from_secs(60),
        boot_timeout: Duration::from_secs(90),
        ..VmOptions::default()
    };
    let off = backup_vm(&hv, &repo, &info, &opts, &NoProgress);
    assert!(off.ok(), "{off:#?}");
    assert_eq!(off.booted, Some(true));
    let off_id = off.snapshot.clone().unwrap();
    let snap = load_snapshot(&repo, &off_id).unwrap();
    assert_eq!(snap.mode.as_deref(), Some("offline"));
    assert_eq!(snap.booted, Some(true));
    assert!(snap.downtime_ms.is_some_and(|d| d > 0));
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    e2fsck_clean(&repo, &off_id, &tmp.path().join("restore-off"));
}
