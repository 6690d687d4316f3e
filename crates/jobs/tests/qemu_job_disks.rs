//! A QEMU VM with two disks (the test VM's system disk, whose guest keeps appending records, and
//! a blank data disk the guest writes known patterns to), backed up live twice through the job
//! engine: the second backup is incremental on *each* disk from its own dirty bitmap, and both
//! disks restore to what the guest had written.

#[path = "../../hypervisor/tests/qemu_common/mod.rs"]
mod qemu_common;
#[path = "common/qemu.rs"]
mod qemu_jobs;

use std::path::Path;
use std::time::{Duration, Instant};

use hypervisor::qemu::QemuHypervisor;
use hypervisor::strategy::Method;
use qemu_common::*;
use qemu_jobs::*;
use repo::backup::NoProgress;
use vdisk::DiskFormat;

const MIB: u64 = 1 << 20;

/// Have the guest write `mib` MiB of byte `fill` at `at_mib` MiB of its second disk (/dev/vdb),
/// fsync'd, and wait until it says so on the console.
fn guest_fill_data_disk(hv: &QemuHypervisor, step: u32, at_mib: u64, mib: u64, fill: char) {
    guest_sh(
        hv,
        &format!(
            "dd if=/dev/zero bs=65536 count={} 2>/dev/null | tr '\\000' '{fill}' | \
             dd of=/dev/vdb bs=65536 seek={} conv=fsync 2>/dev/null && \
             echo HK-DATA {step} > /dev/console",
            mib * 16,
            at_mib * 16
        ),
    );
    let marker = format!("HK-DATA {step}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(hv.console_log(VM))
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == marker)
    {
        assert!(
            Instant::now() < deadline,
            "the guest did not finish writing the data disk (step {step})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restore_both(repo: &repo::repository::Repository, id: &str, target: &Path) -> Vec<Vec<u8>> {
    let snap = repo::snapshot::load_snapshot(repo, id).unwrap();
    assert_eq!(snap.disks.len(), 2, "{:?}", snap.disks);
    let r = repo::restore::restore(repo, id, &snap, target, Some(DiskFormat::Raw), &NoProgress)
        .unwrap();
    e2fsck_clean(&r.disks[0].path);
    r.disks
        .iter()
        .map(|d| std::fs::read(&d.path).unwrap())
        .collect()
}

fn region(disk: &[u8], at_mib: u64, mib: u64) -> &[u8] {
    &disk[(at_mib * MIB) as usize..((at_mib + mib) * MIB) as usize]
}

#[test]
fn each_disk_of_a_two_disk_qemu_vm_is_backed_up_incrementally() {
    let t = test_vm_with_data_disks(&[32 * MIB]);
    let (hv, tmp) = (&t.hv, &t.tmp);
    let repo = init_repo(&tmp.path().join("repo"));
    boot(hv);

    // First backup: full, both disks.
    guest_fill_data_disk(hv, 1, 4, 2, 'A');
    let cfg = job(tmp.path(), "mode = \"live\"");
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::Live));
    let first = out.snapshot.clone().unwrap();
    let first_read = repo::snapshot::load_snapshot(&repo, &first)
        .unwrap()
        .summary
        .bytes_read;
    let disks = restore_both(&repo, &first, &tmp.path().join("r1"));
    assert!(region(&disks[1], 4, 2).iter().all(|&b| b == b'A'));
    assert!(region(&disks[1], 16, 1).iter().all(|&b| b == 0));

    // Second backup: each disk from its own dirty bitmap against the first snapshot.
    guest_fill_data_disk(hv, 2, 16, 1, 'B');
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let ct = out.change_tracking.clone().unwrap();
    eprintln!("change tracking: {ct}");
    assert!(
        ct.contains("disk.vhdx: ") && ct.contains("data1.vhdx: ") && ct.contains(&first[..8]),
        "{ct}"
    );
    // The data disk's change list is the 1 MiB the guest wrote (dirty-bitmap granularity may
    // round it up a little), not the 3 MiB it holds.
    let data_bytes: u64 = ct
        .split("data1.vhdx: ")
        .nth(1)
        .and_then(|s| s.split(" bytes").next())
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count for the data disk in {ct:?}"));
    assert!((MIB..2 * MIB).contains(&data_bytes), "{ct}");
    let second = out.snapshot.clone().unwrap();
    let snap = repo::snapshot::load_snapshot(&repo, &second).unwrap();
    assert_eq!(snap.parent.as_deref(), Some(first.as_str()));
    assert!(
        snap.summary.bytes_read < first_read / 2,
        "incremental read {} of the first backup's {first_read} bytes",
        snap.summary.bytes_read
    );
    let disks = restore_both(&repo, &second, &tmp.path().join("r2"));
    assert!(region(&disks[1], 4, 2).iter().all(|&b| b == b'A'));
    assert!(region(&disks[1], 16, 1).iter().all(|&b| b == b'B'));
    assert!(region(&disks[1], 0, 4).iter().all(|&b| b == 0));
}
