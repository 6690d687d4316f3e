//! check on real repositories: clean when intact; every damaged object named, with the
//! snapshots and disks it affects; restoring an affected snapshot fails loudly; never panics.

mod maint_util;

use std::collections::BTreeSet;
use std::path::Path;

use maint_util::*;
use repo::backend::ObjectKind;
use repo::check::{check, repair_index, CheckOptions, CheckReport, ReadData};
use repo::repository::Repository;
use tempfile::TempDir;

fn run(repo: &Repository, read_data: ReadData) -> CheckReport {
    check(repo, &CheckOptions { read_data }).expect("check itself failed")
}

fn names(kind: ObjectKind, repo: &Repository) -> Vec<String> {
    let mut v: Vec<String> = repo
        .backend()
        .list(kind)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at % b.len();
    b[at] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

fn report_text(r: &CheckReport) -> String {
    r.problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn intact_repository_is_clean() {
    let tmp = TempDir::new().unwrap();
    let (repo, _) = repo_with_history(tmp.path(), 3);
    let r = run(&repo, ReadData::All);
    assert!(r.is_clean(), "{}", report_text(&r));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.snapshots, 3);
    let packs = names(ObjectKind::Pack, &repo).len() as u64;
    assert_eq!(r.packs, packs);
    assert_eq!(r.packs_read, packs);
    assert_eq!(r.bytes_read, pack_bytes(&repo));
    assert_eq!(r.blobs_verified as usize, repo.load_index().unwrap().len());

    // Subsets: seeds 0..4 of 25% read every pack exactly once in total.
    let mut total = 0;
    for seed in 0..4 {
        let r = run(
            &repo,
            ReadData::Subset {
                percent: 25.0,
                seed,
            },
        );
        assert!(r.is_clean());
        total += r.packs_read;
    }
    assert_eq!(total, packs);
    // Same seed, same selection.
    let a = run(
        &repo,
        ReadData::Subset {
            percent: 25.0,
            seed: 1,
        },
    );
    let b = run(
        &repo,
        ReadData::Subset {
            percent: 25.0,
            seed: 1,
        },
    );
    assert_eq!(a.packs_read, b.packs_read);
    assert_eq!(a.bytes_read, b.bytes_read);
}

/// Flip bytes in random packs, index files and snapshots, several rounds with different seeds:
/// every damaged file is named; damaged packs name the snapshots and disks they affect, and
/// restoring those fails (leaving nothing behind) while the unaffected ones still restore.
#[test]
fn flipped_bytes_are_all_found_and_attributed() {
    let mut failed_restores = 0;
    for round in 0..4u64 {
        let tmp = TempDir::new().unwrap();
        let (repo, expected) = repo_with_history(tmp.path(), 4);
        let root = tmp.path().join("repo");
        let mut rng = noise(round + 1000, 64).into_iter().cycle();
        let mut pick = |n: usize| {
            let a = rng.next().unwrap() as usize;
            let b = rng.next().unwrap() as usize;
            (a << 8 | b) % n
        };

        // Two packs, anywhere in them (blob, trailer or footer).
        let packs = names(ObjectKind::Pack, &repo);
        let mut damaged_packs = BTreeSet::new();
        while damaged_packs.len() < 2 {
            damaged_packs.insert(packs[pick(packs.len())].clone());
        }
        for p in &damaged_packs {
            let path = object_path(&root, ObjectKind::Pack, p);
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            flip(&path, pick(65536) * 7919 % len);
        }
        let r = run(&repo, ReadData::All);
        let text = report_text(&r);
        for p in &damaged_packs {
            assert!(
                r.problems.iter().any(|x| x.object == format!("pack {p}")),
                "round {round}: damaged pack {p} not reported:\n{text}"
            );
        }
        // Structure-only check cannot see inside packs, but must not report them as fine if a
        // table blob is hit (it reads tables); it never panics either way.
        let _ = run(&repo, ReadData::None);

        // Attribution: the affected snapshots fail to restore, the others restore exactly.
        let affected: BTreeSet<String> = r
            .problems
            .iter()
            .flat_map(|p| p.affected.iter().map(|a| a.snapshot.clone()))
            .collect();
        for a in r.problems.iter().flat_map(|p| &p.affected) {
            assert!(
                a.item == "disk.raw" || a.item == "vm.vmcx",
                "round {round}: affected item {:?}",
                a.item
            );
            assert_eq!(a.vm, "web");
        }
        for e in &expected {
            if affected.contains(&e.id) {
                let scratch = tmp.path().join("out");
                let err = restore_to(&repo, &e.id, &scratch).expect_err(&format!(
                    "round {round}: restoring damaged {} succeeded",
                    e.id
                ));
                failed_restores += 1;
                let msg = err.to_string();
                assert!(!msg.is_empty());
                // Nothing partial left behind.
                let leftovers: Vec<_> = std::fs::read_dir(&scratch)
                    .map(|d| {
                        d.flatten()
                            .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten())
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    leftovers.is_empty(),
                    "round {round}: partial output left: {leftovers:?}"
                );
            } else {
                assert_restores(&repo, e, tmp.path());
            }
        }

        // Now an index file and a snapshot too.
        let index = names(ObjectKind::Index, &repo);
        let bad_index = index[pick(index.len())].clone();
        let p = object_path(&root, ObjectKind::Index, &bad_index);
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        flip(&p, pick(65536) % len);
        let snaps = names(ObjectKind::Snapshot, &repo);
        let bad_snap = snaps[pick(snaps.len())].clone();
        let p = object_path(&root, ObjectKind::Snapshot, &bad_snap);
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        flip(&p, pick(65536) % len);

        let r = run(&repo, ReadData::All);
        let text = report_text(&r);
        assert!(
            r.problems
                .iter()
                .any(|x| x.object == format!("index {bad_index}")),
            "round {round}: damaged index not reported:\n{text}"
        );
        let snap_problem = r
            .problems
            .iter()
            .find(|x| x.object == format!("snapshot {bad_snap}"))
            .unwrap_or_else(|| panic!("round {round}: damaged snapshot not reported:\n{text}"));
        assert!(snap_problem.affected.iter().any(|a| a.snapshot == bad_snap));
        // Packs the lost index listed are now unindexed: warnings, and snapshots that need
        // their blobs are reported.
        assert!(!r.warnings.is_empty());
    }
    // Most flips land inside blobs (packs are nearly all blob bytes): attribution was exercised.
    assert!(failed_restores > 0, "no flip hit a blob in 4 rounds");
}

#[test]
fn hostile_objects_never_panic_and_are_named() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 2);
    let root = tmp.path().join("repo");
    let packs = names(ObjectKind::Pack, &repo);
    assert!(packs.len() >= 4, "need 4 packs, have {}", packs.len());

    // Truncated pack, pack with garbage appended, emptied pack, deleted pack.
    let p0 = object_path(&root, ObjectKind::Pack, &packs[0]);
    let b = std::fs::read(&p0).unwrap();
    std::fs::write(&p0, &b[..b.len() / 3]).unwrap();
    let p1 = object_path(&root, ObjectKind::Pack, &packs[1]);
    let mut b = std::fs::read(&p1).unwrap();
    b.extend_from_slice(b"garbage after the footer");
    std::fs::write(&p1, b).unwrap();
    std::fs::write(object_path(&root, ObjectKind::Pack, &packs[2]), b"").unwrap();
    std::fs::remove_file(object_path(&root, ObjectKind::Pack, &packs[3])).unwrap();

    // A sealed, correctly named snapshot object that is not a snapshot, and an index file
    // that is not sealed at all.
    let bogus_snap = repo
        .save_json(ObjectKind::Snapshot, &serde_json::json!({"hello": "world"}))
        .unwrap()
        .to_hex();
    let junk = b"{\"packs\": [}".to_vec();
    let junk_name = repo::crypto::hash(&junk).to_hex();
    repo.backend()
        .put(ObjectKind::Index, &junk_name, &junk)
        .unwrap();

    for read_data in [ReadData::None, ReadData::All] {
        let r = run(&repo, read_data);
        let text = report_text(&r);
        for p in &packs[..4] {
            assert!(
                r.problems.iter().any(|x| x.object == format!("pack {p}")),
                "{read_data:?}: pack {p} not named:\n{text}"
            );
        }
        assert!(
            r.problems
                .iter()
                .any(|x| x.object == format!("snapshot {bogus_snap}")),
            "{text}"
        );
        assert!(
            r.problems
                .iter()
                .any(|x| x.object == format!("index {junk_name}")),
            "{text}"
        );
        assert!(!r.is_clean());
    }
    // Every snapshot that needs a blob of those packs is named somewhere. (Without the junk
    // index, which makes every restore refuse to start.)
    repo.backend()
        .delete(ObjectKind::Index, &junk_name)
        .unwrap();
    let r = run(&repo, ReadData::All);
    let affected: BTreeSet<&str> = r
        .problems
        .iter()
        .flat_map(|p| p.affected.iter().map(|a| a.snapshot.as_str()))
        .collect();
    for e in &expected {
        if restore_to(&repo, &e.id, &tmp.path().join("out")).is_err() {
            assert!(
                affected.contains(e.id.as_str()),
                "snapshot {} fails to restore but is not reported",
                e.id
            );
        }
    }
}

#[test]
fn subset_arguments_parse() {
    assert_eq!(
        ReadData::parse_subset("10%", 3).unwrap(),
        ReadData::Subset {
            percent: 10.0,
            seed: 3
        }
    );
    assert_eq!(
        ReadData::parse_subset("2/5", 0).unwrap(),
        ReadData::Subset {
            percent: 20.0,
            seed: 1
        }
    );
    for bad in ["0%", "101%", "x%", "0/5", "6/5", "1/0", "10"] {
        assert!(ReadData::parse_subset(bad, 0).is_err(), "{bad}");
    }
}

/// A lost index file loses no data: check says which snapshots cannot be restored now, and
/// that their blobs are still in (now unindexed) packs.
#[test]
fn lost_index_is_told_apart_from_lost_data() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 2);
    let index = names(ObjectKind::Index, &repo);
    assert_eq!(index.len(), 2, "one index file per backup expected");
    for i in &index {
        repo.backend().delete(ObjectKind::Index, i).unwrap();
    }
    let r = run(&repo, ReadData::All);
    let text = report_text(&r);
    for e in &expected {
        let p = r
            .problems
            .iter()
            .find(|p| p.object == format!("snapshot {}", e.id))
            .unwrap_or_else(|| panic!("snapshot {} not reported:\n{text}", e.id));
        assert!(p.detail.contains("the data exists"), "{text}");
        assert!(p.affected.iter().any(|a| a.snapshot == e.id), "{text}");
    }
    assert_eq!(r.warnings.len(), names(ObjectKind::Pack, &repo).len());

    // The index is a cache of the pack trailers: repair rebuilds it. A junk index file (not
    // even sealed) is replaced along the way.
    let junk = b"not an index".to_vec();
    let junk_name = repo::crypto::hash(&junk).to_hex();
    repo.backend()
        .put(ObjectKind::Index, &junk_name, &junk)
        .unwrap();
    let before = listing(&repo);
    let dry = repair_index(&repo, true).unwrap();
    assert_eq!(listing(&repo), before, "dry run changed the repository");
    let rep = repair_index(&repo, false).unwrap();
    assert_eq!(rep.packs_reindexed, dry.packs_reindexed);
    assert_eq!(rep.packs_reindexed, names(ObjectKind::Pack, &repo));
    assert_eq!(rep.damaged_index_files, vec![junk_name.clone()]);
    assert!(rep.packs_unreadable.is_empty() && rep.packs_missing.is_empty());
    assert_eq!((rep.index_files_written, rep.index_files_deleted), (1, 1));
    let r = run(&repo, ReadData::All);
    assert!(r.is_clean(), "{}", report_text(&r));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    for e in &expected {
        assert_restores(&repo, e, tmp.path());
    }
    // Nothing left to repair.
    let again = repair_index(&repo, false).unwrap();
    assert!(again.packs_reindexed.is_empty() && again.damaged_index_files.is_empty());
    assert_eq!(again.index_files_written, 0);
}
