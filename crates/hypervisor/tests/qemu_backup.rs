//! End-to-end: a real QEMU VM (TCG, VHDX disk, busybox guest writing checksummed records, guest
//! agent) backed up live (application- and crash-consistent), in saved state and offline, with
//! every copy checked from outside (e2fsck, debugfs) and the live disk checked at the end.
//!
//! The VM assets come from `testvm/build.sh` (idempotent; fast once cached).

mod qemu_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::qemu::QemuHypervisor;
use hypervisor::{ChangeToken, Consistency, Hypervisor, VmState};
use qemu_common::*;

/// One live backup. With `prev` (the change token and copy of the previous backup), also checks
/// that the changed ranges QEMU reports cover every block that differs between the two copies.
/// Returns the copy and the change token for the next backup.
fn live_backup(
    hv: &QemuHypervisor,
    disk: &Path,
    scratch: &Path,
    consistency: Consistency,
    prev: Option<(&ChangeToken, &Path)>,
) -> (PathBuf, ChangeToken) {
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
    if let Some((token, prev_copy)) = prev {
        let ranges = hv
            .changed_ranges(VM, &cp, 0, token)
            .expect("changed ranges")
            .expect("tracking survives while QEMU runs");
        check_ranges_cover(prev_copy, &copy, &ranges);
    }
    // The guest keeps writing during the backup.
    wait_announced(hv, announced(hv));
    let token = hv
        .release_checkpoint(VM, &cp, true)
        .expect("release")
        .expect("a change token");
    assert_eq!(token.id, cp.id);
    let info = hv.vm(VM).unwrap();
    assert!(info.existing_checkpoints.is_empty());
    assert_eq!(info.disks[0].path.as_deref(), Some(disk));
    assert_eq!(info.state, VmState::Running);
    // Checked on a scratch copy: the copy itself is compared with the next backup's.
    let fsck = scratch.join("fsck.raw");
    std::fs::copy(&copy, &fsck).unwrap();
    match consistency {
        Consistency::Application => e2fsck_clean(&fsck),
        Consistency::Crash => e2fsck_repair(&fsck),
    }
    let n = check_records(&fsck, scratch, consistency == Consistency::Crash);
    assert!(
        n >= before,
        "{consistency:?} copy holds {n} records, {before} were on disk before the checkpoint"
    );
    (copy, token)
}

/// Every 4 KiB block that differs between two copies lies inside `ranges`, and the ranges are a
/// small part of the disk (tracking, not "everything changed").
fn check_ranges_cover(a: &Path, b: &Path, ranges: &[(u64, u64)]) {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert_eq!(a.len(), b.len());
    let mut differing = 0;
    for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x != y {
            differing += 1;
            let off = i as u64 * 4096;
            assert!(
                ranges.iter().any(|&(s, l)| s <= off && off + 4096 <= s + l),
                "block at {off} changed but is not in the changed ranges {ranges:?}"
            );
        }
    }
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(differing > 0, "the guest wrote nothing between the backups");
    assert!(
        total < a.len() as u64 / 4,
        "changed ranges cover {total} of {} bytes",
        a.len()
    );
    eprintln!(
        "{differing} blocks differ; changed ranges: {} extents, {total} bytes",
        ranges.len()
    );
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
    let (app_copy, token) = live_backup(hv, &disk, &scratch, Consistency::Application, None);
    let (_, token2) = live_backup(
        hv,
        &disk,
        &scratch,
        Consistency::Crash,
        Some((&token, &app_copy)),
    );
    // The release dropped the older bitmap: its token no longer answers (tracking lost).
    let cp = hv.create_checkpoint(VM, Consistency::Crash).unwrap();
    assert_eq!(hv.changed_ranges(VM, &cp, 0, &token).unwrap(), None);
    assert!(hv.changed_ranges(VM, &cp, 0, &token2).unwrap().is_some());
    assert_eq!(hv.release_checkpoint(VM, &cp, false).unwrap(), None);
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
    shutdown_and_check_live_disk(hv, &disk, &scratch, n_off);
    assert!(hv.cleanup_leftovers(VM).unwrap().is_empty());
    eprintln!("total {:?}", started.elapsed());
}
