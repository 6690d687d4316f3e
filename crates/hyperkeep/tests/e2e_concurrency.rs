//! Concurrency: two backups into one repository at the same moment both succeed and both restore
//! (they may store the same chunk twice, which is allowed); a prune started beside a running
//! backup waits or refuses (the repository is locked, exit 11) and never deletes what the backup
//! writes: afterwards `check` is clean and every snapshot restores.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

fn args_of(vm: &SourceVm) -> Vec<String> {
    Env::backup_args(vm)
}

#[test]
fn two_backups_at_once_both_succeed() {
    let env = Env::new();
    env.init();
    let a = SourceVm::create(env.path(), "vma", 64 * MIB, 24 * MIB, 21);
    let b = SourceVm::create(env.path(), "vmb", 64 * MIB, 24 * MIB, 22);
    // vmc holds the same disk content as vma: both runs find the same new chunks at once.
    std::fs::create_dir_all(env.path().join("vmc")).unwrap();
    let c_disk = env.path().join("vmc/vma-disk.vhdx");
    std::fs::copy(&a.disk, &c_disk).unwrap();

    for (x, y, y_disk) in [(&a, &b, b.disk.clone()), (&a, &a, c_disk.clone())] {
        let ax = args_of(x);
        let mut ay = args_of(y);
        if y_disk == c_disk {
            ay = vec![
                "--json".into(),
                "backup".into(),
                "--vm".into(),
                "vmc".into(),
                s(&c_disk).into(),
            ];
        }
        let p1 = env.spawn(&ax.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let p2 = env.spawn(&ay.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let o1 = p1.wait_with_output().unwrap();
        let o2 = p2.wait_with_output().unwrap();
        assert!(o1.status.success(), "first backup failed:\n{}", both(&o1));
        assert!(
            o2.status.success(),
            "second concurrent backup failed:\n{}",
            both(&o2)
        );
        let id1 = backup_id(&String::from_utf8_lossy(&o1.stdout));
        let id2 = backup_id(&String::from_utf8_lossy(&o2.stdout));
        assert_ne!(id1, id2);
        let ids = env.snapshot_ids();
        assert!(ids.contains(&id1) && ids.contains(&id2), "{ids:?}");
        env.check_clean(&["--read-data"]);
        env.assert_restores(&id1, &x.expected(), None);
        if y_disk == c_disk {
            let mut want = Expected::new();
            want.insert("disk:vma-disk".into(), view_sha256(&c_disk));
            env.assert_restores(&id2, &want, None);
        } else {
            env.assert_restores(&id2, &y.expected(), None);
        }
    }
}

#[test]
fn prune_beside_a_backup_loses_nothing() {
    let env = Env::new();
    env.init();
    let mut rng = Rng::from_env("prune_beside_backup");
    let mut vm = SourceVm::create(env.path(), "vmp", 128 * MIB, 48 * MIB, rng.next_u64());
    let mut known: BTreeMap<String, Expected> = BTreeMap::new();
    known.insert(env.backup(&vm), vm.expected());
    // The kind of backup that runs beside the prunes below: a quarter of the data new.
    vm.mutate(12 * MIB);
    let (id, took) = timed(|| env.backup(&vm));
    known.insert(id, vm.expected());
    eprintln!("an incremental backup takes {took:?}");

    for round in 0..6 {
        // Old snapshots to forget, so that prune has packs to delete and to repack.
        for _ in 0..2 {
            vm.mutate(12 * MIB);
            known.insert(env.backup(&vm), vm.expected());
        }
        env.ok(&["forget", "--keep-last", "2"]);
        let ids = env.snapshot_ids();
        known.retain(|id, _| ids.contains(id));

        vm.mutate(12 * MIB);
        let want = vm.expected();
        let bargs = args_of(&vm);
        let bargs: Vec<&str> = bargs.iter().map(|s| s.as_str()).collect();
        // Even rounds: the backup starts first, prune at a random moment during it. Odd rounds:
        // prune first, the backup right after (it may find the repository locked).
        let backup_first = round % 2 == 0;
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64 * 2 / 3 + 1));
        let (b, p) = if backup_first {
            // "Backup first" means the backup holds its (shared) lock when prune starts: wait
            // for its lock object, else a loaded machine may start prune before the backup
            // process has got that far, and the backup then rightly finds prune's lock.
            let before = repo_files(&env.repo, "locks").len();
            let mut b = env.spawn(&bargs);
            let t = Instant::now();
            while repo_files(&env.repo, "locks").len() <= before {
                if b.try_wait().unwrap().is_some() {
                    break; // finished already (its output is checked below)
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "the backup took no lock within 60 s"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(delay);
            (b, env.spawn(&["prune"]))
        } else {
            let p = env.spawn(&["prune"]);
            std::thread::sleep(delay / 8);
            (env.spawn(&bargs), p)
        };
        let bo = b.wait_with_output().unwrap();
        let po = p.wait_with_output().unwrap();
        eprintln!(
            "round {round}: backup first: {backup_first}, delay {delay:?}: backup exit {:?}, prune exit {:?}",
            bo.status.code(),
            po.status.code()
        );
        assert!(
            matches!(po.status.code(), Some(0) | Some(EXIT_LOCKED)),
            "prune beside a backup must succeed (after waiting) or refuse with exit 11:\n{}",
            both(&po)
        );
        if po.status.code() == Some(EXIT_LOCKED) {
            let err = String::from_utf8_lossy(&po.stderr).to_lowercase();
            assert!(
                err.contains("lock"),
                "exit 11 must say the repository is locked:\n{err}"
            );
        }
        if backup_first {
            assert!(
                bo.status.success(),
                "backup failed beside a prune:\n{}",
                both(&bo)
            );
        } else {
            assert!(
                matches!(bo.status.code(), Some(0) | Some(EXIT_LOCKED)),
                "backup started beside a prune must succeed or refuse with exit 11:\n{}",
                both(&bo)
            );
        }
        if bo.status.success() {
            known.insert(backup_id(&String::from_utf8_lossy(&bo.stdout)), want);
        }
        env.check_clean(&[]);
        let ids = env.snapshot_ids();
        for id in known.keys() {
            assert!(ids.contains(id), "snapshot {id} vanished");
        }
        // Every snapshot restores (each round checks the newest; all are checked at the end).
        let newest = known
            .keys()
            .find(|k| !ids.is_empty() && *k == ids.last().unwrap());
        if let Some(id) = newest {
            env.assert_restores(id, &known[id], None);
        }
    }
    // A prune with nothing running completes, and everything still restores.
    env.ok(&["prune"]);
    env.check_clean(&["--read-data"]);
    for (id, want) in &known {
        env.assert_restores(id, want, None);
    }
}
