//! Crash safety: `hyperkeep backup` and `hyperkeep prune` are killed with SIGKILL at many random
//! moments spread over their whole run time. After every kill the repository must be consistent
//! (`check` exits 0; packs left behind by a killed backup may be reported as unreferenced, which
//! is not an error), every snapshot made earlier must restore exactly what was backed up, and
//! the next backup must succeed.
//!
//! The kill moments are uniform over 0..1.2x the duration measured for the same kind of run, so
//! they hit every phase: opening, reading and packing, writing packs, the index, the snapshot
//! manifest, and for prune: repacking, the new index, deleting superseded objects.
//!
//! Env: HK_TEST_SEED replays a run; HK_CRASH_KILLS (default 54) sets the number of kills;
//! HK_CRASH_DATA_MIB (default 32) the amount of data in the VM's disk.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Tracker {
    /// Snapshot id -> what it must restore to.
    known: BTreeMap<String, Expected>,
}

impl Tracker {
    /// Record snapshots that appeared since the last call: they were made from the VM as it is now
    /// (a backup killed after writing its manifest has still made a complete snapshot).
    fn adopt_new(&mut self, env: &Env, current: &Expected) -> usize {
        let ids = env.snapshot_ids();
        let mut n = 0;
        for id in &ids {
            if !self.known.contains_key(id) {
                self.known.insert(id.clone(), current.clone());
                n += 1;
            }
        }
        // Nothing we did may make a snapshot disappear except `forget`.
        for id in self.known.keys() {
            assert!(
                ids.contains(id),
                "snapshot {id} vanished from the repository"
            );
        }
        n
    }
}

#[test]
fn sigkill_backup_and_prune_at_random_moments() {
    let started = Instant::now();
    let mut rng = Rng::from_env("e2e_crash");
    let total_kills = env_u64("HK_CRASH_KILLS", 54);
    let data_mib = env_u64("HK_CRASH_DATA_MIB", 32);
    // Every 4th kill hits a prune, the others a backup (backups have more phases).
    let prune_every = 4;

    let env = Env::new();
    env.init();
    let mut vm = SourceVm::create(
        env.path(),
        "crashvm",
        2 * data_mib * MIB,
        data_mib * MIB,
        rng.next_u64(),
    );
    let change = data_mib * MIB / 4;

    let mut t = Tracker {
        known: BTreeMap::new(),
    };
    let mut current = vm.expected();
    let backup_args = Env::backup_args(&vm);
    let backup_args: Vec<&str> = backup_args.iter().map(|s| s.as_str()).collect();

    // Calibration: a first backup (everything new) and an incremental one (a quarter new).
    let (_, first) = timed(|| env.backup(&vm));
    t.adopt_new(&env, &current);
    vm.mutate(change);
    current = vm.expected();
    let (_, mut backup_time) = timed(|| env.backup(&vm));
    t.adopt_new(&env, &current);
    env.ok(&["forget", "--keep-last", "1"]);
    t.known.retain(|id, _| env.snapshot_ids().contains(id));
    let (_, mut prune_time) = timed(|| env.ok(&["prune"]));
    eprintln!(
        "calibration: first backup {first:?}, incremental {backup_time:?}, prune {prune_time:?}"
    );

    let mut kills = 0u64;
    let mut completed = 0u64;
    let mut kills_by_kind = BTreeMap::<&str, u64>::new();
    let mut round = 0u64;
    while kills < total_kills {
        round += 1;
        assert!(
            round < total_kills * 4,
            "too many rounds: the processes finish before the kills"
        );
        let is_prune = round.is_multiple_of(prune_every);
        let (kind, args, expect): (&str, Vec<&str>, Duration) = if is_prune {
            // Give prune work: drop all but the newest three snapshots.
            env.ok(&["forget", "--keep-last", "3"]);
            let ids = env.snapshot_ids();
            t.known.retain(|id, _| ids.contains(id));
            ("prune", vec!["prune"], prune_time)
        } else {
            vm.mutate(change);
            current = vm.expected();
            ("backup", backup_args.clone(), backup_time)
        };
        let delay = Duration::from_micros(rng.below((expect.as_micros() as u64 * 12 / 10).max(1)));
        let child = env.spawn(&args);
        let (out, was_killed) = run_and_kill(child, delay);
        if was_killed {
            kills += 1;
            *kills_by_kind.entry(kind).or_default() += 1;
        } else {
            completed += 1;
            assert!(
                out.status.success(),
                "{kind} (not killed) failed:\n{}",
                both(&out)
            );
            // It ran longer than measured before: widen the window.
            if kind == "prune" {
                prune_time = prune_time.max(delay);
            } else {
                backup_time = backup_time.max(delay);
            }
        }

        let t_killed = started.elapsed();
        // The repository is consistent.
        let out = env.run(&["check"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: check after {kind} killed at {delay:?} is not clean:\n{}",
            both(&out)
        );
        // A killed backup may have finished its manifest: then it is a complete snapshot.
        t.adopt_new(&env, &current);

        let t_checked = started.elapsed();
        // An earlier snapshot (a random one, to save time) restores exactly.
        let ids: Vec<String> = t.known.keys().cloned().collect();
        let id = &ids[rng.below(ids.len() as u64) as usize];
        env.assert_restores(id, &t.known[id], Some("raw"));

        let t_restored = started.elapsed();
        // The next backup succeeds.
        let (_, took) = timed(|| env.backup(&vm));
        let n = t.adopt_new(&env, &current);
        assert_eq!(
            n, 1,
            "round {round}: the backup after the kill must add exactly one snapshot"
        );
        if kind == "backup" {
            backup_time = (backup_time * 3 + took) / 4;
        }
        eprintln!(
            "round {round}: {kind} {} at {delay:?}; {} snapshots; at {t_killed:.1?} killed, \
             {t_checked:.1?} checked, {t_restored:.1?} restored, {:.1?} backed up",
            if was_killed { "killed" } else { "completed" },
            t.known.len(),
            started.elapsed()
        );
    }

    // Finally: a full check including data, and every remaining snapshot restores exactly
    // (alternately as the original format and as raw).
    env.check_clean(&["--read-data"]);
    for (i, (id, want)) in t.known.iter().enumerate() {
        env.assert_restores(id, want, if i % 2 == 0 { None } else { Some("raw") });
    }
    eprintln!(
        "{kills} kills ({kills_by_kind:?}), {completed} runs finished before their kill moment, \
         {} snapshots verified, {:?} in all",
        t.known.len(),
        started.elapsed()
    );
    assert!(kills >= total_kills);
}
