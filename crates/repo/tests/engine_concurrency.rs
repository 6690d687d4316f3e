//! Two backups into one repository at the same time both succeed and both restore.

mod engine_util;

use std::sync::Arc;

use engine_util::*;
use repo::backend::{Backend, LocalBackend};
use repo::backup::{backup, BackupOptions, NoProgress};
use repo::repository::Repository;
use repo::restore::restore;
use vdisk::DiskFormat;

#[test]
fn two_backups_at_once_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    drop(new_repo(tmp.path()));
    let disks: Vec<_> = (0..2u8)
        .map(|i| {
            let p = tmp.path().join(format!("vm{i}.vhdx"));
            // Overlapping content: both runs may store the shared chunks; duplicates are fine.
            hk_disk(
                &p,
                DiskFormat::Vhdx,
                16 * MIB,
                Some(MIB as u32),
                &[(0x10, 0, 4 * MIB), (0x20 + i, 8 * MIB, 4 * MIB)],
            );
            p
        })
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let root = repo_root(tmp.path());
                s.spawn(move || {
                    // Each backup opens the repository on its own, as two processes would.
                    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(root));
                    let repo = Repository::open(backend, PASSWORD).unwrap();
                    let opts = BackupOptions {
                        vm: format!("vm{i}"),
                        paths: vec![d.clone()],
                        ..Default::default()
                    };
                    backup(&repo, &opts, &NoProgress).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(repo_root(tmp.path())));
    let repo = Repository::open(backend, PASSWORD).unwrap();
    assert_eq!(repo::snapshot::list_snapshots(&repo).unwrap().len(), 2);
    for ((id, snap), disk) in results.iter().zip(&disks) {
        let target = tmp.path().join(format!("r-{}", &id[..8]));
        let r = restore(&repo, id, snap, &target, None, &NoProgress).unwrap();
        qemu_compare(disk, DiskFormat::Vhdx, &r.disks[0].path, DiskFormat::Vhdx);
    }
}
