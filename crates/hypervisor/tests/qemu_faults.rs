//! Faults around a real QEMU VM: the VM killed mid-backup (leftover overlay merged offline by
//! cleanup), a shutdown the guest ignores (timeout, VM left running), and a guest without its
//! agent (application-consistent checkpoint refused cleanly, crash-consistent still works).

mod qemu_common;

use std::process::Command;
use std::time::Duration;

use hypervisor::{Consistency, Error, Hypervisor, VmState};
use qemu_common::*;

#[test]
fn qemu_faults_leave_vm_and_disks_sound() {
    let t = test_vm();
    let hv = &t.hv;
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not boot"
    );

    // 1. QEMU killed while a checkpoint exists: the guest's writes since are in the overlay.
    wait_announced(hv, 0);
    let cp = hv.create_checkpoint(VM, Consistency::Crash).unwrap();
    let overlay = hv.vm(VM).unwrap().disks[0].path.clone().unwrap();
    assert_ne!(overlay, t.disk);
    let before_kill = wait_announced(hv, announced(hv));
    hv.kill(VM).unwrap();
    let info = hv.vm(VM).unwrap();
    assert_eq!(info.state, VmState::Off);
    assert_eq!(info.existing_checkpoints, vec![cp.id.clone()]);
    let err = hv.start(VM).unwrap_err();
    assert!(err.to_string().contains("leftover checkpoint"), "{err}");
    let done = hv.cleanup_leftovers(VM).unwrap();
    assert!(
        done.iter()
            .any(|d| d.contains("merged overlay") && d.contains("offline")),
        "{done:?}"
    );
    assert!(
        !overlay.exists(),
        "overlay {} left behind",
        overlay.display()
    );
    assert!(hv.vm(VM).unwrap().existing_checkpoints.is_empty());
    assert!(hv.cleanup_leftovers(VM).unwrap().is_empty());
    let (code, text) = run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&t.disk));
    assert_eq!(code, 0, "qemu-img check after the offline merge:\n{text}");
    let copy = t.scratch.join("killed.raw");
    copy_to_raw(&t.disk, &copy);
    e2fsck_repair(&copy);
    // Records written to the overlay after the checkpoint were merged into the base.
    let n = check_records(&copy, &t.scratch, true);
    assert!(
        n >= before_kill,
        "merged disk holds {n} records, {before_kill} were announced"
    );
    // Releasing the checkpoint that cleanup already merged is a clear NotFound.
    assert!(matches!(
        hv.release_checkpoint(VM, &cp, false),
        Err(Error::NotFound(_))
    ));

    // Fresh, consistent disk for the rest (a killed guest may leave a partial last record).
    hv.start(VM).unwrap();
    assert!(
        hv.wait_booted(VM, BOOT_TIMEOUT).unwrap(),
        "the VM did not boot after cleanup"
    );
    wait_announced(hv, 0);

    // 2. A guest that ignores the power button: Timeout, and the VM keeps running and writing.
    guest_sh(hv, "killall acpid");
    std::thread::sleep(Duration::from_millis(500));
    let err = hv.shutdown(VM, Duration::from_secs(3)).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Running);
    wait_announced(hv, announced(hv));

    // 3. No guest agent: application consistency is refused with a clear error and nothing is
    //    left behind; a crash-consistent checkpoint still works.
    guest_sh(hv, "sleep 0.3; kill $(cat /run/qemu-ga.pid)");
    std::thread::sleep(Duration::from_secs(1));
    let info = hv.vm(VM).unwrap();
    assert!(!info.guest.agent_responding, "{:?}", info.guest.notes);
    let err = hv
        .create_checkpoint(VM, Consistency::Application)
        .unwrap_err();
    assert!(err.to_string().contains("application-consistent"), "{err}");
    let info = hv.vm(VM).unwrap();
    assert!(info.existing_checkpoints.is_empty());
    assert_eq!(info.disks[0].path.as_deref(), Some(t.disk.as_path()));
    assert_eq!(info.state, VmState::Running);
    let cp = hv.create_checkpoint(VM, Consistency::Crash).unwrap();
    hv.release_checkpoint(VM, &cp, false).unwrap();
    assert!(hv.cleanup_leftovers(VM).unwrap().is_empty());
    wait_announced(hv, announced(hv));
}
