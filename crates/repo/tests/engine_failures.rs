//! What goes wrong: sources that shrink or vanish mid-backup, damaged packs on restore, targets
//! in the way, bad snapshot specs. Each gives a clear error and leaves nothing half-done.

mod engine_util;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use engine_util::*;
use repo::backend::ObjectKind;
use repo::backup::{backup, BackupOptions, NoProgress, Progress};
use repo::restore::restore;
use repo::snapshot::find_snapshot;
use repo::Error;
use vdisk::DiskFormat;

fn opts(vm: &str, paths: &[&Path]) -> BackupOptions {
    BackupOptions {
        vm: vm.into(),
        paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        threads: 1,
        ..BackupOptions::default()
    }
}

/// Runs `action` once, when the backup has read its first chunk.
struct OnFirstChunk<F: Fn() + Sync> {
    done: AtomicBool,
    action: F,
}

impl<F: Fn() + Sync> Progress for OnFirstChunk<F> {
    fn start(&self, _total: u64) {}
    fn advance(&self, _bytes: u64) {
        if !self.done.swap(true, Ordering::SeqCst) {
            (self.action)();
        }
    }
    fn finish(&self) {}
}

fn assert_nothing_recorded(repo: &repo::repository::Repository) {
    assert_eq!(
        count(repo, ObjectKind::Snapshot),
        0,
        "no snapshot may be written"
    );
    assert_eq!(count(repo, ObjectKind::Index), 0, "no index may be written");
}

#[test]
fn disk_that_shrinks_mid_backup_fails_without_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("shrinks.vhdx");
    hk_disk(
        &disk,
        DiskFormat::Vhdx,
        16 * MIB,
        Some(MIB as u32),
        &[(0x5a, 0, 12 * MIB)],
    );
    let repo = new_repo(tmp.path());
    let progress = OnFirstChunk {
        done: AtomicBool::new(false),
        action: || {
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            f.set_len(4 * MIB).unwrap();
        },
    };
    let err = backup(&repo, &opts("vm", &[&disk]), &progress).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("shrinks.vhdx"), "{msg}");
    assert!(msg.contains("no snapshot was written"), "{msg}");
    assert_nothing_recorded(&repo);
}

#[test]
fn file_that_shrinks_mid_backup_fails_without_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("vm.vmcx");
    std::fs::write(&cfg, vec![7u8; 3 * MIB as usize]).unwrap();
    let repo = new_repo(tmp.path());
    let progress = OnFirstChunk {
        done: AtomicBool::new(false),
        action: || {
            let f = std::fs::OpenOptions::new().write(true).open(&cfg).unwrap();
            f.set_len(MIB + 10).unwrap();
        },
    };
    let msg = backup(&repo, &opts("vm", &[&cfg]), &progress)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("vm.vmcx"), "{msg}");
    assert!(msg.contains("shrank"), "{msg}");
    assert_nothing_recorded(&repo);
}

#[test]
fn disk_that_vanishes_mid_backup_fails_without_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("gone.vhd");
    hk_disk(&disk, DiskFormat::Vhd, 8 * MIB, None, &[(0x5a, 0, 4 * MIB)]);
    let repo = new_repo(tmp.path());
    let progress = OnFirstChunk {
        done: AtomicBool::new(false),
        action: || std::fs::remove_file(&disk).unwrap(),
    };
    let msg = backup(&repo, &opts("vm", &[&disk]), &progress)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("gone.vhd") && msg.contains("vanished"),
        "{msg}"
    );
    assert_nothing_recorded(&repo);
}

#[test]
fn files_named_like_disks_must_be_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake.vhdx");
    std::fs::write(&fake, vec![1u8; 4096]).unwrap();
    let repo = new_repo(tmp.path());
    let msg = backup(&repo, &opts("vm", &[&fake]), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fake.vhdx") && msg.contains("virtual disk"),
        "{msg}"
    );
    let a = tmp.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let dup = a.join("x.vmcx");
    std::fs::write(&dup, b"1").unwrap();
    let other = tmp.path().join("x.vmcx");
    std::fs::write(&other, b"2").unwrap();
    let msg = backup(&repo, &opts("vm", &[&dup, &other]), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("two paths are named x.vmcx"), "{msg}");
    assert_eq!(count(&repo, ObjectKind::Snapshot), 0);
}

fn pack_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files_under(&root.join("data"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains(".tmp-"))
        .collect();
    v.sort();
    v
}

#[test]
fn restore_of_a_damaged_pack_fails_naming_it_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.vhdx");
    hk_disk(
        &disk,
        DiskFormat::Vhdx,
        8 * MIB,
        Some(MIB as u32),
        &[(0x42, 0, 6 * MIB)],
    );
    let cfg = tmp.path().join("vm.vmcx");
    std::fs::write(&cfg, b"config").unwrap();
    let repo = new_repo(tmp.path());
    let (id, snap) = backup(&repo, &opts("vm", &[&disk, &cfg]), &NoProgress).unwrap();
    let packs = pack_files(&repo_root(tmp.path()));
    assert!(packs.len() >= 3, "{packs:?}");
    // Damage each pack in turn (data chunks of the disk, of the file, the chunk table: the
    // packs hold all of them): the restore fails, names the pack and what is lost, and leaves
    // nothing behind, even when the disk was already restored before a file failed.
    let target = tmp.path().join("restore");
    for victim in &packs {
        let good = std::fs::read(victim).unwrap();
        let mut bytes = good.clone();
        bytes[100] ^= 0x40;
        std::fs::write(victim, &bytes).unwrap();
        let pack_name = victim.file_name().unwrap().to_str().unwrap().to_string();
        let err = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert!(msg.contains(&pack_name), "names the pack: {msg}");
        assert!(
            (msg.contains("d.vhdx") || msg.contains("vm.vmcx")) && msg.contains("offset"),
            "{msg}"
        );
        assert!(
            !target.exists(),
            "the target directory we created is removed again"
        );
        std::fs::write(victim, &good).unwrap();
    }
    let victim = &packs[packs.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();

    // Into an existing directory: it stays, empty.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    restore(&repo, &id, &snap, &existing, None, &NoProgress).unwrap_err();
    assert!(
        files_under(&existing).is_empty(),
        "{:?}",
        files_under(&existing)
    );

    // A missing pack is named too.
    std::fs::remove_file(victim).unwrap();
    let err = restore(&repo, &id, &snap, &existing, None, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::Missing(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("d.vhdx") || msg.contains("vm.vmcx"), "{msg}");
    assert!(files_under(&existing).is_empty());
}

#[test]
fn restore_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.vhdx");
    hk_disk(&disk, DiskFormat::Vhdx, 4 * MIB, None, &[(0x42, 0, MIB)]);
    let cfg = tmp.path().join("vm.vmcx");
    std::fs::write(&cfg, b"config").unwrap();
    let repo = new_repo(tmp.path());
    let (id, snap) = backup(&repo, &opts("vm", &[&disk, &cfg]), &NoProgress).unwrap();
    let target = tmp.path().join("t");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("vm.vmcx"), b"mine").unwrap();
    let msg = restore(&repo, &id, &snap, &target, None, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(std::fs::read(target.join("vm.vmcx")).unwrap(), b"mine");
    assert!(!target.join("d.vhdx").exists());
}

#[test]
fn snapshot_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("vm.vmcx");
    std::fs::write(&cfg, b"config").unwrap();
    let repo = new_repo(tmp.path());
    let e = find_snapshot(&repo, "latest", None).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let (a, _) = backup(&repo, &opts("a", &[&cfg]), &NoProgress).unwrap();
    let (b, _) = backup(&repo, &opts("b", &[&cfg]), &NoProgress).unwrap();
    assert_eq!(find_snapshot(&repo, "latest", None).unwrap().0, b);
    assert_eq!(find_snapshot(&repo, "latest", Some("a")).unwrap().0, a);
    assert_eq!(find_snapshot(&repo, &a, None).unwrap().0, a);
    assert_eq!(
        find_snapshot(&repo, &a[..4].to_uppercase(), None)
            .unwrap()
            .0,
        a
    );
    let e = find_snapshot(&repo, "latest", Some("c"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no snapshot of VM 'c'"), "{e}");
    let e = find_snapshot(&repo, &a[..5], Some("b"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to VM 'a'"), "{e}");
    let e = find_snapshot(&repo, "abc", None).unwrap_err().to_string();
    assert!(e.contains("at least 4 hex digits"), "{e}");
    let e = find_snapshot(&repo, "xyz1", None).unwrap_err().to_string();
    assert!(e.contains("not a snapshot id"), "{e}");
    let unknown = if a.starts_with("0000") {
        "ffff"
    } else {
        "0000"
    };
    let unknown = if b.starts_with(unknown) {
        "1234"
    } else {
        unknown
    };
    let e = find_snapshot(&repo, unknown, None).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    // A second object sharing a's first 4 digits makes that prefix ambiguous.
    let twin = format!("{}{}", &a[..4], "f".repeat(60));
    repo.backend()
        .put(ObjectKind::Snapshot, &twin, b"not a manifest")
        .unwrap();
    let e = find_snapshot(&repo, &a[..4], None).unwrap_err().to_string();
    assert!(e.contains("ambiguous") && e.contains("more digits"), "{e}");
    // The damaged object does not hide the good snapshots.
    assert_eq!(repo::snapshot::list_snapshots(&repo).unwrap().len(), 2);
}
