//! A repository written by an older hyperkeep still opens, checks clean, restores, and takes new
//! backups: `tests/fixtures/format-v1/` was written by commit 0594594, the last one that wrote
//! format version 1 with RustCrypto's XChaCha20-Poly1305 (before sealing moved to `ring` and new
//! repositories to XAES-256-GCM). `fixtures/make-format-v1.sh` rebuilds it.

use std::path::Path;
use std::sync::Arc;

use repo::backend::LocalBackend;
use repo::backup::{backup, BackupOptions, NoProgress};
use repo::check::{check, CheckOptions, ReadData};
use repo::crypto::Cipher;
use repo::repository::Repository;
use repo::restore::SnapshotDisk;
use repo::snapshot::{list_snapshots, sort_by_time};
use vdisk::VirtualDisk;

/// The fixture disk at its first backup (as `make-format-v1.sh` writes it): 256 KiB of
/// scrambled bytes, 512 KiB of zeros, 256 KiB of text.
fn v1_disk() -> Vec<u8> {
    let mut d: Vec<u8> = (0..256u64 << 10)
        .map(|i| ((i * 2_654_435_761) >> 16) as u8)
        .collect();
    d.resize(768 << 10, 0);
    let text = b"hyperkeep format v1 fixture\n";
    d.extend(text.iter().cycle().take(256 << 10));
    d
}

fn v1_config() -> Vec<u8> {
    b"<configuration version=\"1\"/>\n".repeat(100)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn check_clean(repo: &Repository) {
    let report = check(
        repo,
        &CheckOptions {
            read_data: ReadData::All,
        },
    )
    .unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Every snapshot's disk and file, read back.
fn contents(repo: &Repository) -> Vec<(Vec<u8>, Vec<u8>)> {
    let index = repo.load_index().unwrap();
    let mut snaps = list_snapshots(repo).unwrap();
    sort_by_time(&mut snaps);
    snaps
        .iter()
        .map(|(_, snap)| {
            let disk = SnapshotDisk::open(repo, &index, &snap.disks[0]).unwrap();
            let mut data = vec![0u8; disk.geometry().virtual_size as usize];
            disk.read_at(&mut data, 0).unwrap();
            // The configuration file: its chunks in order (this file has no all-zero chunk).
            let file: Vec<u8> = snap.files[0]
                .chunks
                .iter()
                .flat_map(|id| repo.read_chunk(&index, id).unwrap())
                .collect();
            (data, file)
        })
        .collect()
}

#[test]
fn a_format_version_1_repository_opens_checks_restores_and_takes_new_backups() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let dir = tempfile::tempdir().unwrap();
    // A copy: check and backup write locks and objects.
    let root = dir.path().join("repo");
    copy_dir(&fixture, &root);
    let repo = Repository::open(Arc::new(LocalBackend::new(root.clone())), "fixture").unwrap();
    assert_eq!(repo.config().version, 1);
    assert_eq!(repo.config().encryption, "xchacha20poly1305");
    assert_eq!(repo.key().cipher(), Cipher::XChaCha20Poly1305);
    check_clean(&repo);

    let first = v1_disk();
    let mut second = first.clone();
    second[256 << 10..320 << 10].fill(0x5a);
    let got = contents(&repo);
    assert_eq!(got.len(), 2);
    assert!(got[0].0 == first, "the first snapshot's disk differs");
    assert!(got[1].0 == second, "the second snapshot's disk differs");
    assert_eq!(got[0].1, v1_config());

    // A backup by this build into the old repository: it stays version 1 (XChaCha20-Poly1305),
    // deduplicates against the old data, and everything still checks clean.
    let src = dir.path().join("vm.raw");
    let mut third = second.clone();
    third[900 << 10..904 << 10].fill(0xa7);
    std::fs::write(&src, &third).unwrap();
    let opts = BackupOptions {
        vm: "fixture".into(),
        tags: Default::default(),
        paths: vec![src],
        threads: 0,
        ..Default::default()
    };
    let (_, snap) = backup(&repo, &opts, &NoProgress).unwrap();
    // 16 chunks of 64 KiB: 7 all-zero, 1 changed, the 8 others already stored by the old build.
    assert_eq!(
        (
            snap.summary.chunks_new,
            snap.summary.chunks_reused,
            snap.summary.zero_chunks
        ),
        (1, 8, 7),
        "{:?}",
        snap.summary
    );
    drop(repo);
    let repo = Repository::open(Arc::new(LocalBackend::new(root)), "fixture").unwrap();
    assert_eq!(repo.config().version, 1);
    check_clean(&repo);
    let index = repo.load_index().unwrap();
    let disk = SnapshotDisk::open(&repo, &index, &snap.disks[0]).unwrap();
    let mut data = vec![0u8; third.len()];
    disk.read_at(&mut data, 0).unwrap();
    assert!(data == third, "the new snapshot's disk differs");
}
