//! forget + prune on real repositories: exactly the policy's snapshots survive and restore
//! byte for byte, unreferenced data is deleted, prune is crash-safe at every step, refuses
//! beside a running backup, and leaves young orphan packs alone.

mod maint_util;

use std::collections::HashSet;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use maint_util::*;
use repo::backend::{LocalBackend, ObjectKind};
use repo::check::{check, CheckOptions, ReadData};
use repo::crypto::Id;
use repo::forget::{forget, forget_ids, KeepPolicy};
use repo::prune::{prune, PruneOptions};
use repo::repository::Repository;
use repo::{snapshot, Error};
use tempfile::TempDir;

fn read_all() -> CheckOptions {
    CheckOptions {
        read_data: ReadData::All,
    }
}

fn assert_clean(repo: &Repository) {
    let r = check(repo, &read_all()).unwrap();
    assert!(
        r.is_clean(),
        "check found problems: {}",
        r.problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn forget_and_prune_keep_exactly_the_policy_and_everything_restores() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 5);
    let before = pack_bytes(&repo);

    // All five were taken within seconds: keep-last 2 keeps the two newest, and the reasons say so.
    let policy = KeepPolicy {
        last: Some(2),
        ..Default::default()
    };
    let dry = forget(&repo, &policy, true, None).unwrap();
    assert_eq!((dry.kept, dry.removed), (2, 3));
    assert_eq!(
        snapshot::list_snapshots(&repo).unwrap().len(),
        5,
        "dry run removed something"
    );
    let report = forget(&repo, &policy, false, None).unwrap();
    assert_eq!(report.decisions, dry.decisions);
    let kept: HashSet<String> = report
        .decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.clone())
        .collect();
    let want: HashSet<String> = expected[3..].iter().map(|e| e.id.clone()).collect();
    assert_eq!(kept, want);
    for d in report.decisions.iter().filter(|d| d.keep) {
        assert_eq!(d.reasons, vec!["last"]);
    }
    let left: HashSet<String> = snapshot::list_snapshots(&repo)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, want);

    // Repack everything with any waste, so that afterwards the index holds exactly the used set.
    let opts = PruneOptions {
        repack_threshold: 1.0,
        ..Default::default()
    };
    let dry = prune(
        &repo,
        &PruneOptions {
            dry_run: true,
            ..opts.clone()
        },
    )
    .unwrap();
    let r = prune(&repo, &opts).unwrap();
    assert!(!r.dry_run);
    assert!(r.packs_unused + r.packs_repacked > 0, "{r:?}");
    assert_eq!(
        (
            dry.packs_unused,
            dry.packs_repacked,
            dry.packs_kept,
            dry.bytes_deleted,
            dry.blobs_removed
        ),
        (
            r.packs_unused,
            r.packs_repacked,
            r.packs_kept,
            r.bytes_deleted,
            r.blobs_removed
        ),
        "dry run predicted otherwise"
    );
    assert_eq!(dry.packs_written, r.packs_written);
    assert_eq!(dry.bytes_written, r.bytes_written);

    let after = pack_bytes(&repo);
    assert!(
        after < before,
        "repository did not shrink: {before} -> {after}"
    );
    assert_eq!(r.bytes_before, before);
    assert_eq!(r.bytes_after, after);
    assert_eq!(
        r.packs_after,
        repo.backend().list(ObjectKind::Pack).unwrap().len() as u64
    );
    assert_eq!(r.index_files_written, 1);
    assert_eq!(repo.backend().list(ObjectKind::Index).unwrap().len(), 1);

    let index = repo.load_index().unwrap();
    let indexed: HashSet<Id> = index.iter().map(|(id, _)| id).collect();
    assert_eq!(
        indexed,
        used_blobs(&repo),
        "index holds other blobs than the snapshots use"
    );
    assert_eq!(
        index.len(),
        indexed.len(),
        "duplicate copies survived a full repack"
    );

    for e in &expected[3..] {
        assert_restores(&repo, e, tmp.path());
    }
    assert_clean(&repo);

    // A second prune has nothing to do.
    let again = prune(&repo, &opts).unwrap();
    assert_eq!(
        (
            again.packs_unused,
            again.packs_repacked,
            again.bytes_deleted,
            again.index_files_written
        ),
        (0, 0, 0, 0),
        "{again:?}"
    );
}

#[test]
fn forget_everything_then_prune_empties_the_repository() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 2);
    let ids: Vec<String> = expected.iter().map(|e| e.id[..10].to_string()).collect();
    let removed = forget_ids(&repo, &ids, false).unwrap();
    assert_eq!(removed.len(), 2);
    let r = prune(&repo, &PruneOptions::default()).unwrap();
    assert_eq!(r.snapshots, 0);
    assert_eq!(r.used_blobs, 0);
    assert_eq!(r.packs_kept + r.packs_repacked + r.packs_written, 0);
    assert_eq!(pack_bytes(&repo), 0);
    assert!(repo.load_index().unwrap().is_empty());
    assert_clean(&repo);
}

#[test]
fn empty_policy_forgets_nothing() {
    let tmp = TempDir::new().unwrap();
    let (repo, _) = repo_with_history(tmp.path(), 1);
    let err = forget(&repo, &KeepPolicy::default(), false, None).unwrap_err();
    assert!(err.to_string().contains("no policy given"), "{err}");
    assert_eq!(snapshot::list_snapshots(&repo).unwrap().len(), 1);
}

#[test]
fn prune_dry_run_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 3);
    forget_ids(&repo, &[expected[0].id.clone()], false).unwrap();
    let before = listing(&repo);
    let r = prune(
        &repo,
        &PruneOptions {
            dry_run: true,
            repack_threshold: 1.0,
            orphan_grace: Duration::ZERO,
        },
    )
    .unwrap();
    assert!(r.dry_run);
    assert!(r.bytes_deleted > 0, "{r:?}");
    assert_eq!(listing(&repo), before);
}

#[test]
fn prune_refuses_beside_a_running_backup() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 2);
    forget_ids(&repo, &[expected[0].id.clone()], false).unwrap();
    let backup_lock = repo.lock_shared("backup").unwrap();
    let before = listing(&repo);
    let err = prune(&repo, &PruneOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err:?}");
    assert!(err.to_string().contains("backup"), "{err}");
    assert_eq!(
        listing(&repo),
        before,
        "a refused prune changed the repository"
    );
    drop(backup_lock);
    // With the backup gone, prune runs.
    prune(&repo, &PruneOptions::default()).unwrap();
    assert_restores(&repo, &expected[1], tmp.path());
}

#[test]
fn orphan_packs_survive_until_older_than_the_grace() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 1);
    // A pack as a killed backup leaves it: stored, but in no index.
    let mut w = repo.pack_writer();
    let raw = noise(77, 10_000);
    let (compressed, sealed) = repo::pack::seal_blob(repo.key(), 1, &raw);
    w.add(
        repo::pack::BlobEntry {
            id: repo.key().chunk_id(&raw),
            kind: repo::pack::BlobKind::Data,
            compressed,
            offset: 0,
            stored_len: 0,
            raw_len: raw.len() as u32,
        },
        sealed,
    );
    let (orphan, _, _) = repo.save_pack(w).unwrap();
    let orphan = orphan.to_hex();

    // check: a warning, not a problem.
    let c = check(&repo, &read_all()).unwrap();
    assert!(c.is_clean(), "{:?}", c.problems);
    assert!(
        c.warnings.iter().any(|w| w.contains(&orphan)),
        "{:?}",
        c.warnings
    );

    let r = prune(&repo, &PruneOptions::default()).unwrap();
    assert_eq!((r.orphans_kept, r.orphans_deleted), (1, 0));
    assert!(repo.backend().exists(ObjectKind::Pack, &orphan).unwrap());

    let r = prune(
        &repo,
        &PruneOptions {
            orphan_grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.orphans_kept, r.orphans_deleted), (0, 1));
    assert!(!repo.backend().exists(ObjectKind::Pack, &orphan).unwrap());
    assert_restores(&repo, &expected[0], tmp.path());
    assert_clean(&repo);
}

#[test]
fn prune_refuses_when_a_snapshot_is_unreadable() {
    let tmp = TempDir::new().unwrap();
    let (repo, expected) = repo_with_history(tmp.path(), 3);
    forget_ids(&repo, &[expected[0].id.clone()], false).unwrap();
    let root = tmp.path().join("repo");
    let p = object_path(&root, ObjectKind::Snapshot, &expected[1].id);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let before = listing(&repo);
    let err = prune(&repo, &PruneOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&expected[1].id) && msg.contains("prune refused"),
        "{msg}"
    );
    assert_eq!(listing(&repo), before);
}

/// Kill prune (as far as the repository can tell) after every possible number of writes and
/// deletes: afterwards every snapshot restores, check finds no problem, the next prune
/// finishes the job and the next backup works.
#[test]
fn prune_interrupted_at_every_step_loses_nothing() {
    let tmp = TempDir::new().unwrap();
    // A small disk: this runs the whole cycle once per step.
    let (repo, expected) = repo_with_history_sized(tmp.path(), 3, 2 << 20);
    // A VM whose data nothing else shares, then forgotten: its packs become wholly unused,
    // while forgetting the web VM's first snapshot leaves packs partly used (repacked).
    let mut scratch = Vm::with_size(&tmp.path().join("scratch"), "scratch", 1 << 20);
    scratch.change(555, 0, 512 << 10);
    let (scratch_id, _) = scratch.backup(&repo);
    forget_ids(&repo, &[expected[0].id.clone(), scratch_id], false).unwrap();
    let survivors = [expected[1].clone(), expected[2].clone()];
    drop(repo);
    let pristine = tmp.path().join("repo");

    // How many mutating operations a full prune does.
    let full = {
        let dir = tmp.path().join("count");
        copy_dir(&pristine, &dir);
        let counter = Arc::new(CrashingBackend {
            inner: LocalBackend::new(&dir),
            budget: AtomicI64::new(i64::MAX),
        });
        let repo = Repository::open(counter.clone(), PASSWORD).unwrap();
        let opts = PruneOptions {
            repack_threshold: 1.0,
            ..Default::default()
        };
        let r = prune(&repo, &opts).unwrap();
        assert!(r.packs_repacked > 0 && r.packs_unused > 0, "{r:?}");
        i64::MAX - counter.budget.load(std::sync::atomic::Ordering::SeqCst)
    };
    assert!(full > 4, "prune did only {full} writes");

    for budget in 0..full {
        let dir = tmp.path().join(format!("crash-{budget}"));
        copy_dir(&pristine, &dir);
        let crashing = Arc::new(CrashingBackend {
            inner: LocalBackend::new(&dir),
            budget: AtomicI64::new(budget),
        });
        let repo = Repository::open(crashing, PASSWORD).unwrap();
        let res = prune(
            &repo,
            &PruneOptions {
                repack_threshold: 1.0,
                ..Default::default()
            },
        );
        // The lock's own removal may be what failed, after all the work was done.
        if let Err(e) = &res {
            assert!(
                e.to_string().contains("simulated crash"),
                "budget {budget}: {e}"
            );
        }
        drop(repo);

        // The aftermath, with a healthy backend. The dead prune's lock belongs to this live
        // process, so it is not stale: remove it as `hyperkeep unlock --remove-all` would.
        let repo = open_repo(&dir);
        repo::lock::unlock(&repo, true).unwrap();
        for e in &survivors {
            assert_restores(&repo, e, tmp.path());
        }
        let c = check(&repo, &read_all()).unwrap();
        assert!(
            c.is_clean(),
            "budget {budget}: {}",
            c.problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        // Finishing the job (orphans from the crash are young: grace zero to collect them).
        prune(
            &repo,
            &PruneOptions {
                repack_threshold: 1.0,
                orphan_grace: Duration::ZERO,
                ..Default::default()
            },
        )
        .unwrap();
        let index = repo.load_index().unwrap();
        let indexed: HashSet<Id> = index.iter().map(|(id, _)| id).collect();
        assert_eq!(indexed, used_blobs(&repo), "budget {budget}");
        assert_eq!(
            index.len(),
            indexed.len(),
            "budget {budget}: duplicate copies remain"
        );
        let stored: HashSet<Id> = repo
            .backend()
            .list(ObjectKind::Pack)
            .unwrap()
            .iter()
            .map(|i| Id::from_hex(&i.name).unwrap())
            .collect();
        let indexed_packs: HashSet<Id> = index.iter().map(|(_, l)| l.pack).collect();
        assert_eq!(stored, indexed_packs, "budget {budget}: stray packs remain");
        // The next backup works.
        let mut vm = Vm::with_size(&tmp.path().join("vm2"), "web", 2 << 20);
        vm.change(999, 0, 64 << 10);
        let (id, _) = vm.backup(&repo);
        assert_restores(&repo, &Expected::of(&vm, &id), tmp.path());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Backups and forget+prune hammering one repository from two threads: whichever gets the
/// lock first runs, the other is told `Locked` (and retries); nothing is ever lost.
#[test]
fn prune_beside_running_backups_loses_nothing() {
    let tmp = TempDir::new().unwrap();
    let (repo, first) = repo_with_history(tmp.path(), 1);
    let repo = std::sync::Arc::new(repo);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (made, prunes) = std::thread::scope(|scope| {
        let backups = scope.spawn(|| {
            let mut vm = Vm::new(&tmp.path().join("vm"), "web");
            vm.disk.clone_from(&first[0].disk);
            let mut made = Vec::new();
            for i in 0..4u64 {
                vm.change(500 + i, ((i as usize) * 700) << 10, 512 << 10);
                loop {
                    let opts = repo::backup::BackupOptions {
                        vm: "web".into(),
                        paths: vec![vm.dir.join("disk.raw"), vm.dir.join("vm.vmcx")],
                        threads: 2,
                        ..Default::default()
                    };
                    match repo::backup::backup(&repo, &opts, &repo::backup::NoProgress) {
                        Ok((id, _)) => {
                            made.push(Expected::of(&vm, &id));
                            break;
                        }
                        Err(Error::Locked(_)) => std::thread::sleep(Duration::from_millis(20)),
                        Err(e) => panic!("backup failed: {e}"),
                    }
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            made
        });
        let pruner = scope.spawn(|| {
            let mut ran = 0;
            let policy = KeepPolicy {
                last: Some(2),
                ..Default::default()
            };
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                match forget(&repo, &policy, false, None) {
                    Ok(_) | Err(Error::Locked(_)) => {}
                    Err(e) => panic!("forget failed: {e}"),
                }
                match prune(&repo, &PruneOptions::default()) {
                    Ok(_) => ran += 1,
                    Err(Error::Locked(_)) => {}
                    Err(e) => panic!("prune failed: {e}"),
                }
            }
            ran
        });
        (backups.join().unwrap(), pruner.join().unwrap())
    });
    assert_eq!(made.len(), 4);
    eprintln!("{prunes} prunes ran between the backups");
    // Everything still in the repository restores exactly; the newest two always survive.
    let left: HashSet<String> = snapshot::list_snapshots(&repo)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for e in first.iter().chain(&made) {
        if left.contains(&e.id) {
            assert_restores(&repo, e, tmp.path());
        }
    }
    assert!(left.contains(&made[3].id) && left.contains(&made[2].id));
    prune(&repo, &PruneOptions::default()).unwrap();
    for e in &made[2..] {
        assert_restores(&repo, e, tmp.path());
    }
    assert_clean(&repo);
}
