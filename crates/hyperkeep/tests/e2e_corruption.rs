//! Corruption: bytes flipped in repository files (packs, index files, snapshot manifests), in
//! several rounds on fresh repositories. `check --read-data` must name every damaged file;
//! restoring a snapshot that depends on damaged data must fail loudly (non-zero exit, a message
//! that says what is lost) and leave no output; and a restore that succeeds must be byte-identical
//! to what was backed up: wrong bytes are never written silently.
//!
//! Each round backs up two VMs whose data is unrelated, so that each pack, index file and
//! manifest belongs to exactly one snapshot, and we know which snapshot a damaged file affects.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use support::*;

/// Files a backup added, by kind.
#[derive(Default, Debug)]
struct Added {
    packs: Vec<PathBuf>,
    index: Vec<PathBuf>,
    snapshots: Vec<PathBuf>,
}

fn listing(repo: &Path) -> BTreeMap<&'static str, Vec<PathBuf>> {
    ["data", "index", "snapshots"]
        .into_iter()
        .map(|k| (k, repo_files(repo, k)))
        .collect()
}

fn added(before: &BTreeMap<&'static str, Vec<PathBuf>>, repo: &Path) -> Added {
    let after = listing(repo);
    let new = |k: &str| -> Vec<PathBuf> {
        after[k]
            .iter()
            .filter(|p| !before[k].contains(p))
            .cloned()
            .collect()
    };
    Added {
        packs: new("data"),
        index: new("index"),
        snapshots: new("snapshots"),
    }
}

/// Where the blobs of a pack end (the trailer follows): `HKPACK01` magic in the last 8 bytes,
/// the sealed trailer's length (u32 LE) before it.
fn blob_area_len(pack: &[u8]) -> usize {
    let n = pack.len();
    assert!(
        n >= 12 && &pack[n - 8..] == b"HKPACK01",
        "not a pack file (format changed?)"
    );
    let tl = u32::from_le_bytes(pack[n - 12..n - 8].try_into().unwrap()) as usize;
    n - 12 - tl
}

/// Flip 1-3 bytes of `file` within `range` (XOR with a non-zero value, so the byte changes).
fn flip(rng: &mut Rng, file: &Path, range: std::ops::Range<usize>) -> Vec<usize> {
    let mut bytes = std::fs::read(file).unwrap();
    let mut at = Vec::new();
    for _ in 0..rng.range(1, 4) {
        let i = range.start + rng.below((range.end - range.start) as u64) as usize;
        bytes[i] ^= rng.range(1, 256) as u8;
        at.push(i);
    }
    std::fs::write(file, bytes).unwrap();
    at
}

struct Round {
    env: Env,
    /// (snapshot id, expected content, files its backup wrote)
    snaps: Vec<(String, Expected, Added)>,
}

fn setup(rng: &mut Rng) -> Round {
    let env = Env::new();
    env.init();
    let mut snaps = Vec::new();
    for name in ["alpha", "beta"] {
        let vm = SourceVm::create(env.path(), name, 16 * MIB, 3 * MIB, rng.next_u64());
        let before = listing(&env.repo);
        let id = env.backup(&vm);
        let files = added(&before, &env.repo);
        assert!(
            !files.packs.is_empty() && !files.index.is_empty() && files.snapshots.len() == 1,
            "backup of {name} wrote unexpected files: {files:?}"
        );
        snaps.push((id, vm.expected(), files));
    }
    env.check_clean(&["--read-data"]);
    Round { env, snaps }
}

/// A snapshot none of whose own files is damaged restores exactly; but when an index file is
/// damaged, a restore may also refuse loudly, naming that index file (the damage is
/// repository-wide: no index file can be trusted to be complete until it is rebuilt).
fn assert_unaffected_restores(env: &Env, id: &str, want: &Expected, damaged: &[PathBuf]) {
    let damaged_index: Vec<String> = damaged
        .iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("index")))
        .map(|p| short(p))
        .collect();
    let (target, got) = env.try_restore(id, None);
    match got {
        Ok(got) => assert_eq!(&got, want, "snapshot {id} restored different content"),
        Err(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !damaged_index.is_empty() && damaged_index.iter().any(|n| err.contains(n.as_str())),
                "restore of undamaged snapshot {id} failed:\n{}",
                both(&out)
            );
            eprintln!("note: an undamaged snapshot cannot be restored while an index file is damaged:\n{err}");
        }
    }
    let _ = std::fs::remove_dir_all(&target);
}

/// `check --read-data` (human and JSON) must fail and name every damaged file.
fn assert_check_names(env: &Env, damaged: &[PathBuf]) {
    let human = env.run(&["check", "--read-data"]);
    let json = env.run(&["--json", "check", "--read-data"]);
    for out in [&human, &json] {
        assert_eq!(
            out.status.code(),
            Some(EXIT_PROBLEMS),
            "check must report problems:\n{}",
            both(out)
        );
        let text = both(out);
        for f in damaged {
            let name = file_name(f);
            assert!(
                text.contains(&name),
                "check does not name damaged file {name}:\n{text}"
            );
        }
    }
}

/// A restore of a damaged snapshot: fails, says what is lost, leaves nothing behind; or (only
/// where `may_succeed`) succeeds with exactly the right content.
fn assert_restore_damaged(
    env: &Env,
    id: &str,
    want: &Expected,
    may_succeed: bool,
    names: &[String],
) {
    assert_restore_damaged_as(env, id, want, may_succeed, names, &[None]);
}

fn assert_restore_damaged_as(
    env: &Env,
    id: &str,
    want: &Expected,
    may_succeed: bool,
    names: &[String],
    formats: &[Option<&str>],
) {
    for &to in formats {
        let (target, got) = env.try_restore(id, to);
        match got {
            Ok(got) => {
                assert!(
                    may_succeed,
                    "restore of damaged snapshot {id} succeeded (--to {to:?})"
                );
                assert_eq!(
                    &got, want,
                    "restore of {id} wrote wrong bytes without an error (--to {to:?})"
                );
            }
            Err(out) => {
                assert_ne!(out.status.code(), None, "restore crashed:\n{}", both(&out));
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("error:"), "no error message:\n{}", both(&out));
                assert!(
                    names.iter().any(|n| err.contains(n.as_str())),
                    "the message must name what is lost (one of {names:?}):\n{err}"
                );
                let left: Vec<_> = std::fs::read_dir(&target)
                    .map(|rd| rd.map(|e| e.unwrap().file_name()).collect())
                    .unwrap_or_default();
                assert!(
                    left.iter().all(|n| !n.to_string_lossy().contains("-disk.")),
                    "a failed restore left a partial disk: {left:?}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&target);
    }
}

fn short(p: &Path) -> String {
    file_name(p)[..8].to_string()
}

#[test]
fn damaged_pack_data_is_detected_and_never_restored_wrong() {
    let mut rng = Rng::from_env("damaged_pack");
    for round in 0..3 {
        let r = setup(&mut rng);
        // Damage blob bytes (not the trailer) of one pack of the first snapshot.
        let (id, want, files) = &r.snaps[0];
        let pack = &files.packs[rng.below(files.packs.len() as u64) as usize];
        let bytes = std::fs::read(pack).unwrap();
        let at = flip(&mut rng, pack, 0..blob_area_len(&bytes));
        eprintln!("round {round}: flipped {at:?} in {}", pack.display());
        assert_check_names(&r.env, std::slice::from_ref(pack));
        let names = vec![
            short(pack),
            id[..8].to_string(),
            "alpha-disk".into(),
            "alpha.vmcx".into(),
        ];
        assert_restore_damaged_as(&r.env, id, want, false, &names, &[None, Some("raw")]);
        // The other snapshot is intact.
        let (id2, want2, _) = &r.snaps[1];
        r.env.assert_restores(id2, want2, None);
    }
}

#[test]
fn damaged_index_and_manifest_are_detected() {
    let mut rng = Rng::from_env("damaged_index_manifest");
    for round in 0..2 {
        let r = setup(&mut rng);
        let (id, want, files) = &r.snaps[0];
        let index = &files.index[0];
        let manifest = &files.snapshots[0];
        let damaged = if round == 0 { index } else { manifest };
        let len = std::fs::metadata(damaged).unwrap().len() as usize;
        flip(&mut rng, damaged, 0..len);
        assert_check_names(&r.env, std::slice::from_ref(damaged));
        let names = vec![
            short(damaged),
            id[..8].to_string(),
            "alpha-disk".into(),
            "alpha.vmcx".into(),
        ];
        if round == 0 {
            // The index can be rebuilt from the packs' own trailers: a restore may succeed, but
            // only with the right bytes.
            assert_restore_damaged(&r.env, id, want, true, &names);
        } else {
            // The manifest is gone: the snapshot is unreadable (or not even listed).
            let (target, got) = r.env.try_restore(id, None);
            let out = got.expect_err("restore of a snapshot with a damaged manifest succeeded");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("error:"),
                "{}",
                both(&out)
            );
            assert!(!target.join("alpha-disk.vhdx").exists());
        }
        let (id2, want2, _) = &r.snaps[1];
        assert_unaffected_restores(&r.env, id2, want2, std::slice::from_ref(damaged));
    }
}

#[test]
fn random_damage_anywhere() {
    let mut rng = Rng::from_env("random_damage");
    for round in 0..3 {
        let r = setup(&mut rng);
        let all: Vec<PathBuf> = listing(&r.env.repo).into_values().flatten().collect();
        let mut damaged: Vec<PathBuf> = Vec::new();
        for _ in 0..rng.range(1, 4) {
            let f = all[rng.below(all.len() as u64) as usize].clone();
            let len = std::fs::metadata(&f).unwrap().len() as usize;
            let at = flip(&mut rng, &f, 0..len);
            eprintln!("round {round}: flipped {at:?} in {}", f.display());
            if !damaged.contains(&f) {
                damaged.push(f);
            }
        }
        assert_check_names(&r.env, &damaged);
        for (id, want, files) in &r.snaps {
            let hit: Vec<&PathBuf> = damaged
                .iter()
                .filter(|d| {
                    files.packs.contains(d)
                        || files.index.contains(d)
                        || files.snapshots.contains(d)
                })
                .collect();
            if hit.is_empty() {
                assert_unaffected_restores(&r.env, id, want, &damaged);
            } else {
                // A flip may land in a pack trailer or an index, which a restore may not need:
                // success is allowed, wrong bytes are not.
                let mut names: Vec<String> = damaged.iter().map(|p| short(p)).collect();
                names.push(id[..8].to_string());
                names.extend(
                    want.keys()
                        .map(|k| k.trim_start_matches("disk:").to_string()),
                );
                assert_restore_damaged(&r.env, id, want, true, &names);
            }
        }
    }
}
