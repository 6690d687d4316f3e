//! The QEMU test VM (busybox guest appending checksummed records to its ext4 disk) is backed up
//! twice (offline, after it wrote more records each time) and replicated after each backup; then
//! `failover --flatten` of the newest and of the older version each boot in QEMU, and the guest
//! finds its records: it continues numbering after the records of that version, and the disk
//! afterwards holds records 1..n, every one with the right checksum.
//!
//! The VM assets come from `testvm/build.sh` (idempotent; fast once cached).

#[path = "../../hypervisor/tests/qemu_common/mod.rs"]
mod qemu_common;

#[path = "../../repo/tests/engine_util/mod.rs"]
mod engine_util;

use std::path::Path;
use std::time::Duration;

use hypervisor::qemu::{testvm_definition, QemuHypervisor};
use hypervisor::Hypervisor;
use qemu_common::*;
use replica::{failover, replicate, FailoverOptions, ReplicateOptions};
use repo::backup::{backup, BackupOptions, NoProgress};

/// Records on a (stopped) VM's disk, checked.
fn records_on(disk: &Path, scratch: &Path) -> u64 {
    let raw = scratch.join("check.raw");
    let _ = std::fs::remove_file(&raw);
    copy_to_raw(disk, &raw);
    e2fsck_clean(&raw);
    let n = check_records(&raw, scratch, false);
    std::fs::remove_file(&raw).unwrap();
    n
}

fn run_until(hv: &QemuHypervisor, above: u64) {
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not boot"
    );
    wait_announced(hv, above);
    hv.shutdown(VM, Duration::from_secs(60)).unwrap();
}

#[test]
fn failover_of_newest_and_older_version_boots_and_finds_records() {
    let tv = test_vm();
    let repo = engine_util::new_repo(tv.tmp.path());
    let config = tv.tmp.path().join("t1.vmcx");
    let to = tv.tmp.path().join("replicas");
    let mut counts = Vec::new();
    for round in 0..2u64 {
        let before = counts.last().copied().unwrap_or(0);
        run_until(&tv.hv, before + 10);
        let n = records_on(&tv.disk, &tv.scratch);
        assert!(n > before, "round {round}: {n} records, {before} before");
        counts.push(n);
        std::fs::write(&config, format!("definition, round {round}")).unwrap();
        let bo = BackupOptions {
            vm: VM.into(),
            paths: vec![tv.disk.clone(), config.clone()],
            mode: Some("offline".into()),
            ..BackupOptions::default()
        };
        backup(&repo, &bo, &NoProgress).unwrap();
        let ro = ReplicateOptions {
            keep: 3,
            snapshot: None,
        };
        replicate(&repo, VM, &to, &ro).unwrap();
    }
    let vm_dir = to.join(VM);
    let assets = testvm_assets();
    for (version, want) in [(2u64, counts[1]), (1, counts[0])] {
        let f = failover(
            &vm_dir,
            &FailoverOptions {
                version: Some(version),
                flatten: true,
            },
        )
        .unwrap();
        assert_eq!(f.version, version);
        let disk = f.disks[0].path.clone();
        assert_eq!(records_on(&disk, &tv.scratch), want, "version {version}");
        // A fresh QEMU runtime with the test VM defined on the failover disk.
        let hv = QemuHypervisor::new(tv.tmp.path().join(format!("failover-run-{version}")))
            .unwrap()
            .kill_on_drop(true);
        hv.define(&testvm_definition(VM, &assets, vec![disk.clone()]))
            .unwrap();
        run_until(&hv, want);
        let n = records_on(&disk, &tv.scratch);
        assert!(
            n > want,
            "version {version}: the guest booted from the failover disk should have continued \
             after record {want}, the disk holds {n}"
        );
        drop(hv);
        std::fs::remove_dir_all(vm_dir.join("failover")).unwrap();
    }
}
