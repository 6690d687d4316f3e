//! Retention semantics checked against an independent implementation: restic (the Debian
//! package). The same synthetic timeline (bursts within an hour, gaps of days and weeks, a year
//! boundary) is given to `restic backup --time` and to our policy engine; for a range of
//! policies, `restic forget --dry-run --json` and `apply_policy` must keep exactly the same
//! snapshots for the same reasons.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use chrono::{DateTime, TimeDelta, Utc};
use repo::forget::{decide, parse_time, Candidate, KeepDuration, KeepPolicy};
use tempfile::TempDir;

fn restic(repo: &Path, cache: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", "test")
        .env("RESTIC_CACHE_DIR", cache)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run restic ({e}): this test needs it, install the Debian package `restic`"
            )
        });
    assert!(
        out.status.success(),
        "restic {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Deterministic irregular timeline, about 45 snapshots over a year and a half.
fn timeline() -> Vec<DateTime<Utc>> {
    let steps = [
        TimeDelta::minutes(20),
        TimeDelta::hours(3),
        TimeDelta::days(1),
        TimeDelta::days(2) + TimeDelta::hours(5),
        TimeDelta::days(9),
        TimeDelta::days(40),
        TimeDelta::hours(1),
    ];
    let mut t = parse_time("2024-12-20T22:10:00Z").unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::new();
    for _ in 0..45 {
        out.push(t);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t += steps[(x % steps.len() as u64) as usize];
    }
    out
}

fn kind_of_restic(reason: &str) -> String {
    if reason.starts_with("within") {
        return "within".into();
    }
    reason.trim_end_matches(" snapshot").to_string()
}

fn kind_of_ours(reason: &str) -> String {
    reason.split(' ').next().unwrap_or("").to_string()
}

#[test]
fn retention_matches_restic() {
    let tmp = TempDir::new().unwrap();
    let repo = tmp.path().join("restic-repo");
    let cache = tmp.path().join("cache");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"hello").unwrap();
    restic(&repo, &cache, &["init", "-q"]);
    let times = timeline();
    // Three at a time (restic backups share the repository with non-exclusive locks).
    std::thread::scope(|scope| {
        for part in times.chunks(times.len().div_ceil(3)) {
            let (repo, cache, file) = (&repo, &cache, &file);
            scope.spawn(move || {
                for t in part {
                    let time = t.format("%Y-%m-%d %H:%M:%S").to_string();
                    restic(
                        repo,
                        cache,
                        &[
                            "backup",
                            "-q",
                            "--host",
                            "h",
                            "--time",
                            &time,
                            file.to_str().unwrap(),
                        ],
                    );
                }
            });
        }
    });

    let tags = BTreeMap::new();
    let ours: Vec<(String, String)> = times
        .iter()
        .map(|t| {
            let s = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            (s.clone(), s)
        })
        .collect();
    let candidates: Vec<Candidate<'_>> = ours
        .iter()
        .map(|(id, time)| Candidate {
            id,
            vm: "vm",
            time,
            tags: &tags,
        })
        .collect();

    let within = |s: &str| Some(KeepDuration::parse(s).unwrap());
    let cases: Vec<(Vec<&str>, KeepPolicy)> = vec![
        (
            vec!["--keep-last", "3"],
            KeepPolicy {
                last: Some(3),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-hourly", "6"],
            KeepPolicy {
                hourly: Some(6),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-daily", "7"],
            KeepPolicy {
                daily: Some(7),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-weekly", "5"],
            KeepPolicy {
                weekly: Some(5),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-monthly", "6"],
            KeepPolicy {
                monthly: Some(6),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-yearly", "3"],
            KeepPolicy {
                yearly: Some(3),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-within", "14d"],
            KeepPolicy {
                within: within("2w"),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-within", "1y2m"],
            KeepPolicy {
                within: within("1y2m"),
                ..Default::default()
            },
        ),
        (
            vec!["--keep-within", "50h"],
            KeepPolicy {
                within: within("50h"),
                ..Default::default()
            },
        ),
        (
            vec![
                "--keep-daily",
                "7",
                "--keep-weekly",
                "4",
                "--keep-monthly",
                "12",
                "--keep-yearly",
                "3",
            ],
            KeepPolicy {
                daily: Some(7),
                weekly: Some(4),
                monthly: Some(12),
                yearly: Some(3),
                ..Default::default()
            },
        ),
        (
            vec![
                "--keep-last",
                "2",
                "--keep-hourly",
                "10",
                "--keep-daily",
                "3",
                "--keep-within",
                "30d",
            ],
            KeepPolicy {
                last: Some(2),
                hourly: Some(10),
                daily: Some(3),
                within: within("30d"),
                ..Default::default()
            },
        ),
    ];

    let far_future: SystemTime = parse_time("2035-01-01T00:00:00Z").unwrap().into();
    for (args, policy) in cases {
        let mut full = vec!["forget", "--dry-run", "--json"];
        full.extend(&args);
        let json: serde_json::Value =
            serde_json::from_slice(&restic(&repo, &cache, &full)).unwrap();
        let groups = json
            .as_array()
            .expect("restic forget --json: an array of groups");
        assert_eq!(groups.len(), 1);
        let mut theirs: BTreeMap<DateTime<Utc>, BTreeSet<String>> = BTreeMap::new();
        for r in groups[0]["reasons"].as_array().unwrap() {
            let t = parse_time(r["snapshot"]["time"].as_str().unwrap()).unwrap();
            let kinds = r["matches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| kind_of_restic(m.as_str().unwrap()))
                .collect();
            theirs.insert(t, kinds);
        }
        let kept_by_restic: BTreeSet<DateTime<Utc>> = groups[0]["keep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| parse_time(s["time"].as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(kept_by_restic, theirs.keys().copied().collect());

        let decisions = decide(&candidates, &policy, far_future).unwrap();
        let mine: BTreeMap<DateTime<Utc>, BTreeSet<String>> = decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| {
                (
                    parse_time(&d.time).unwrap(),
                    d.reasons.iter().map(|r| kind_of_ours(r)).collect(),
                )
            })
            .collect();
        assert!(!mine.is_empty());
        assert_eq!(
            mine, theirs,
            "policy {policy} ({args:?}) differs from restic"
        );
    }
}
