//! End-to-end: a real QEMU VM (TCG, VHDX disk, busybox guest writing checksummed records, guest
//! agent) backed up live (application- and crash-consistent), in saved state and offline, with
//! every copy checked from outside (e2fsck, debugfs) and the live disk checked at the end.
//!
//! The VM assets come from `testvm/build.sh` (idempotent; fast once cached).

mod qemu_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hypervisor::qemu::QemuHypervisor;
use hypervisor::{Consistency, Hypervisor, VmState};
use qemu_common::*;

fn live_backup(hv: &QemuHypervisor, disk: &Path, scratch: &Path, consistency: Consistency) -> u64 {
    let before = wait_announced(hv, announced(hv));
    let cp = hv.create_checkpoint(VM, consistency).expect("checkpoint");
    assert_eq!(cp.consistency, consistency);
    assert_eq!(cp.frozen_disks, vec![disk.to_path_buf()]);
    let info = hv.vm(VM).unwrap();
    assert_eq!(info.existing_checkpoints, vec![cp.id.clone()]);
    assert_ne!(
        info.disks[0].path.as_deref(),
        Some(disk),
        "the guest writes to the overlay now"
    );
    let copy = scratch.join(format!("{consistency:?}.raw"));
    copy_to_raw(&cp.frozen_disks[0], &copy);
    // The guest keeps writing during the backup.
    wait_announced(hv, announced(hv));
    assert_eq!(
        hv.release_checkpoint(VM, &cp, false).expect("release"),
        None
    );
    let info = hv.vm(VM).unwrap();
    assert!(info.existing_checkpoints.is_empty());
    assert_eq!(info.disks[0].path.as_deref(), Some(disk));
    assert_eq!(info.state, VmState::Running);
    match consistency {
        Consistency::Application => e2fsck_clean(&copy),
        Consistency::Crash => e2fsck_repair(&copy),
    }
    let n = check_records(&copy, scratch, consistency == Consistency::Crash);
    assert!(
        n >= before,
        "{consistency:?} copy holds {n} records, {before} were on disk before the checkpoint"
    );
    n
}

#[test]
fn qemu_live_saved_offline_backups() {
    let started = Instant::now();
    let t = test_vm();
    let (hv, disk, scratch) = (&t.hv, t.disk.clone(), t.scratch.clone());
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Off);
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not boot"
    );
    let info = hv.vm(VM).unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(
        info.guest.agent_responding,
        "guest agent: {:?}",
        info.guest.notes
    );
    assert!(
        info.guest.backup_service_enabled,
        "fsfreeze: {:?}",
        info.guest.notes
    );
    assert_eq!(hv.list_vms().unwrap().len(), 1);
    eprintln!("booted after {:?}", started.elapsed());

    // Live, application-consistent, then crash-consistent.
    live_backup(hv, &disk, &scratch, Consistency::Application);
    live_backup(hv, &disk, &scratch, Consistency::Crash);
    eprintln!("live backups done after {:?}", started.elapsed());

    // Saved state: every record announced before the save is in the copy; the VM resumes and
    // keeps writing where it was.
    let before = wait_announced(hv, announced(hv));
    let t = Instant::now();
    hv.save_state(VM).unwrap();
    eprintln!("save took {:?}", t.elapsed());
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Saved);
    let copy = scratch.join("saved.raw");
    copy_to_raw(&disk, &copy);
    e2fsck_repair(&copy); // mounted filesystem: its journal may need replay
    let n = check_records(&copy, &scratch, true);
    assert!(
        n >= before,
        "saved-state copy holds {n} records, {before} were announced"
    );
    let t = Instant::now();
    hv.resume(VM).unwrap();
    eprintln!("resume took {:?}", t.elapsed());
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    // Same guest, not rebooted: no boot marker on the new console, records continue.
    wait_announced(hv, before);
    let console = std::fs::read_to_string(hv.console_log(VM)).unwrap();
    assert!(
        !console.contains("HK-BOOTED"),
        "the guest rebooted instead of resuming:\n{console}"
    );

    // Offline: clean power-off, the copy is a cleanly unmounted filesystem, and the VM comes back.
    let before = wait_announced(hv, announced(hv));
    hv.shutdown(VM, Duration::from_secs(60)).unwrap();
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Off);
    let copy = scratch.join("offline.raw");
    copy_to_raw(&disk, &copy);
    e2fsck_clean(&copy);
    let n_off = check_records(&copy, &scratch, false);
    assert!(n_off >= before);
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not come back after the offline backup"
    );
    wait_announced(hv, 0);

    // The live disk ends with every record.
    let last = wait_announced(hv, announced(hv));
    hv.shutdown(VM, Duration::from_secs(60)).unwrap();
    let (code, text) = run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&disk));
    assert_eq!(code, 0, "qemu-img check of the live disk:\n{text}");
    let fin = scratch.join("final.raw");
    copy_to_raw(&disk, &fin);
    e2fsck_clean(&fin);
    let n = check_records(&fin, &scratch, false);
    assert!(
        n >= last && n > n_off,
        "live disk holds {n} records, {last} were announced"
    );
    assert!(hv.cleanup_leftovers(VM).unwrap().is_empty());
    eprintln!("total {:?}", started.elapsed());
}
