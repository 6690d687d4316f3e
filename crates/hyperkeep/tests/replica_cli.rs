//! Replication through the binary: `replicate` SIGKILLed at random moments (deterministic seed)
//! leaves every earlier version verifiable and the next run succeeds; `replica list --json`,
//! the per-replica lock, and `failover` (which blocks further replication until removed).
//!
//! Env: HK_TEST_SEED replays another kill schedule (default seed fixed); HK_REPLICA_KILLS
//! (default 20) sets the number of kills.

mod support;

use std::time::Duration;

use support::*;

fn replicate_args<'a>(to: &'a str, snap: &'a str) -> Vec<&'a str> {
    vec![
        "replicate",
        "--vm",
        "web",
        "--to",
        to,
        "--keep",
        "2",
        "--snapshot",
        snap,
    ]
}

fn assert_verifies(env: &Env, to: &str, when: &str) {
    let out = env.run(&["replica", "verify", to]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "replica verify after {when}:\n{}",
        both(&out)
    );
}

#[test]
fn replicate_killed_at_random_moments_keeps_every_version() {
    let env = Env::new();
    env.init();
    let seed = std::env::var("HK_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261204u64);
    eprintln!("replica crash test: seed {seed} (replay with HK_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let kills_wanted: u64 = std::env::var("HK_REPLICA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut vm = SourceVm::create(env.path(), "web", 32 * MIB, 12 * MIB, seed);
    let mut snaps = Vec::new();
    for i in 0..5 {
        if i > 0 {
            vm.mutate(4 * MIB);
        }
        snaps.push(env.backup(&vm));
    }
    let to_dir = env.scratch("replicas");
    let to = s(&to_dir).to_string();
    env.ok(&replicate_args(&to, &snaps[0]));
    env.ok(&replicate_args(&to, &snaps[1]));
    // A run with a merge (keep 2): the kill moments are spread over 0..1.3x its duration.
    let (_, took) = timed(|| env.ok(&replicate_args(&to, &snaps[2])));
    let mut span = (took.as_micros() as u64 * 13 / 10).max(1000);
    let (mut kills, mut runs) = (0u64, 3usize);
    let mut attempts = 0;
    while kills < kills_wanted {
        attempts += 1;
        assert!(
            attempts < kills_wanted * 10,
            "only {kills} of {attempts} runs were killed before finishing; the runs are too short"
        );
        let snap = snaps[runs % snaps.len()].clone();
        runs += 1;
        let after = Duration::from_micros(rng.below(span));
        let ((out, killed), ran) =
            timed(|| run_and_kill(env.spawn(&replicate_args(&to, &snap)), after));
        if killed {
            kills += 1;
            // Which state the kill left (for the log: the kills should hit every phase).
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(to_dir.join("web/replica.json")).unwrap())
                    .unwrap();
            let leftovers = std::fs::read_dir(to_dir.join("web/disks")).unwrap().count();
            eprintln!(
                "kill after {after:?}: pending merge {}, {} versions, {leftovers} layer files",
                !m["pending_merge"].is_null(),
                m["versions"].as_array().map_or(0, |v| v.len())
            );
        } else {
            assert!(out.status.success(), "replicate failed:\n{}", both(&out));
            // The machine got faster than at calibration (it is shared): follow it, so that
            // the kills keep landing inside the runs.
            span = (ran.as_micros() as u64 * 13 / 10).max(1000);
        }
        assert_verifies(&env, &to, &format!("a kill after {after:?}"));
        // The next run completes whatever was left (a pending merge, leftovers, the version).
        env.ok(&replicate_args(&to, &snap));
        assert_verifies(&env, &to, "the run after a kill");
    }
    let list = env.json(&["replica", "list", &to]);
    let versions = list[0]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{list}");
    // No leftovers: exactly the files the manifest names.
    let disks: Vec<_> = std::fs::read_dir(to_dir.join("web/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(disks.len() <= 2, "{disks:?}");
}

#[test]
fn lock_list_and_failover() {
    let env = Env::new();
    env.init();
    let vm = SourceVm::create(env.path(), "web", 16 * MIB, 4 * MIB, 3);
    let snap = env.backup(&vm);
    let to_dir = env.scratch("replicas");
    let to = s(&to_dir).to_string();
    env.ok(&replicate_args(&to, &snap));
    // Up to date: nothing written.
    let r = env.json(&replicate_args(&to, &snap));
    assert_eq!(r["up_to_date"], true, "{r}");
    // A second run while one holds the replica's lock is refused.
    let lock = std::fs::File::options()
        .write(true)
        .open(to_dir.join("web/replica.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let out = env.run(&replicate_args(&to, &snap));
    assert_eq!(out.status.code(), Some(EXIT_ERROR), "{}", both(&out));
    assert!(
        both(&out).contains("in use by another hyperkeep"),
        "{}",
        both(&out)
    );
    drop(lock);
    let list = env.json(&["replica", "list", &to]);
    assert_eq!(list[0]["vm"], "web");
    assert_eq!(list[0]["versions"][0]["newest"], true);
    // Failover: a differencing child, config copied, replication refused while it exists.
    let f = env.json(&["replica", "failover", &to]);
    assert_eq!(f["disks"][0]["kind"], "differencing", "{f}");
    let disk = f["disks"][0]["path"].as_str().unwrap();
    assert_eq!(
        view_sha256(std::path::Path::new(disk)),
        view_sha256(&vm.disk)
    );
    assert!(to_dir.join("web/failover/web.vmcx").is_file());
    let out = env.run(&replicate_args(&to, &snap));
    assert_eq!(out.status.code(), Some(EXIT_ERROR), "{}", both(&out));
    assert!(both(&out).contains("failover"), "{}", both(&out));
    let out = env.run(&["replica", "failover", &to, "--version", "7"]);
    assert!(both(&out).contains("already exists"), "{}", both(&out));
    std::fs::remove_dir_all(to_dir.join("web/failover")).unwrap();
    let out = env.run(&["replica", "failover", &to, "--version", "7"]);
    assert!(both(&out).contains("no version 7"), "{}", both(&out));
    // --register needs a Hyper-V host: elsewhere it is refused before anything is prepared
    // (a failover/ left behind would block replication for nothing).
    if !cfg!(windows) {
        let out = env.run(&["replica", "failover", &to, "--register", "--start"]);
        assert_eq!(out.status.code(), Some(EXIT_ERROR), "{}", both(&out));
        assert!(
            both(&out).contains("--register needs a Hyper-V host"),
            "{}",
            both(&out)
        );
        assert!(!to_dir.join("web/failover").exists());
    }
    // --start only means something with --register.
    {
        let flag = "--start";
        let out = env.run(&["replica", "failover", &to, flag]);
        assert_eq!(out.status.code(), Some(EXIT_ERROR), "{}", both(&out));
        assert!(both(&out).contains("--register"), "{}", both(&out));
        assert!(!to_dir.join("web/failover").exists());
    }
    let f = env.json(&["replica", "failover", &to, "--flatten"]);
    assert_eq!(f["disks"][0]["kind"], "standalone", "{f}");
    let disk = f["disks"][0]["path"].as_str().unwrap();
    assert_eq!(
        view_sha256(std::path::Path::new(disk)),
        view_sha256(&vm.disk)
    );
}

/// The run stopped (aborted, as if killed) at each step of writing a version and of merging the
/// oldest one away: afterwards every version in the manifest verifies, and the next run
/// completes the work. For a VHDX and a VHD source (VHD merges keep the base's identity and
/// rewrite the locators in place).
fn stopped_at_every_step(format: &str) {
    let env = Env::new();
    env.init();
    let mut vm = SourceVm::create(env.path(), "web", 24 * MIB, 8 * MIB, 11);
    let src = vm.dir.join(format!("web-disk.{format}"));
    let mut snaps = Vec::new();
    for i in 0..4 {
        if i > 0 {
            vm.mutate(3 * MIB);
        }
        let disk = if format == "vhdx" {
            vm.disk.clone()
        } else {
            let _ = std::fs::remove_file(&src);
            env.ok(&["disk", "convert", s(&vm.disk), s(&src)]);
            src.clone()
        };
        let out = env.ok(&["--json", "backup", "--vm", "web", s(&disk), s(&vm.config)]);
        snaps.push(backup_id(&out));
    }
    let to_dir = env.scratch("replicas");
    let to = s(&to_dir).to_string();
    env.ok(&replicate_args(&to, &snaps[0]));
    env.ok(&replicate_args(&to, &snaps[1]));
    let points = [
        "version-written",
        "merge-recorded",
        "identity-accepted",
        "merged",
        "reparented",
        "merge-done",
    ];
    for (i, point) in points.iter().enumerate() {
        let snap = &snaps[2 + i % 2];
        let out = env
            .cmd(&replicate_args(&to, snap))
            .env("HYPERKEEP_TEST_REPLICA_CRASH", point)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && both(&out).contains(&format!("aborting at {point}")),
            "{format}: the run did not stop at {point}:\n{}",
            both(&out)
        );
        assert_verifies(&env, &to, &format!("{format}: a stop at {point}"));
        env.ok(&replicate_args(&to, snap));
        assert_verifies(
            &env,
            &to,
            &format!("{format}: the run after a stop at {point}"),
        );
        let list = env.json(&["replica", "list", &to]);
        assert_eq!(list[0]["versions"].as_array().unwrap().len(), 2, "{list}");
        assert!(list[0]["pending_removal"].is_null(), "{list}");
        for v in list[0]["versions"].as_array().unwrap() {
            let f = v["disks"][0]["file"].as_str().unwrap();
            assert!(f.ends_with(format), "{format}: replica layer {f}");
        }
    }
}

#[test]
fn replicate_stopped_at_every_step_vhdx() {
    stopped_at_every_step("vhdx");
}

#[test]
fn replicate_stopped_at_every_step_vhd() {
    stopped_at_every_step("vhd");
}
