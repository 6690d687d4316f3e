//! forget on a real repository: per-VM groups, the VM filter, tags, dry runs, ids.

mod maint_util;

use std::collections::BTreeSet;

use maint_util::*;
use repo::forget::{forget, forget_ids, KeepDuration, KeepPolicy};
use repo::snapshot;
use tempfile::TempDir;

fn ids_of(repo: &repo::repository::Repository, vm: &str) -> BTreeSet<String> {
    snapshot::list_snapshots(repo)
        .unwrap()
        .into_iter()
        .filter(|(_, s)| s.vm == vm)
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn policies_apply_per_vm_and_respect_filters_and_tags() {
    let tmp = TempDir::new().unwrap();
    let repo = init_repo(&tmp.path().join("repo"));
    let mut a = Vm::with_size(&tmp.path().join("a"), "a", 1 << 20);
    let mut b = Vm::with_size(&tmp.path().join("b"), "b", 1 << 20);
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for i in 0..3u64 {
        a.change(10 + i, 0, 4096);
        b.change(20 + i, 0, 4096);
        let tags: &[(&str, &str)] = if i == 0 { &[("keep", "forever")] } else { &[] };
        a_ids.push(a.backup_tagged(&repo, tags).0);
        b_ids.push(b.backup(&repo).0);
    }

    // Dry run: decisions, nothing removed.
    let last1 = KeepPolicy {
        last: Some(1),
        ..Default::default()
    };
    let dry = forget(&repo, &last1, true, Some("b")).unwrap();
    assert!(dry.dry_run);
    assert_eq!((dry.kept, dry.removed), (1, 2));
    assert!(dry.decisions.iter().all(|d| d.vm == "b"));
    assert_eq!(ids_of(&repo, "b").len(), 3);

    // VM filter: only b is touched.
    let r = forget(&repo, &last1, false, Some("b")).unwrap();
    assert_eq!(r.decisions, dry.decisions);
    assert_eq!(ids_of(&repo, "b"), BTreeSet::from([b_ids[2].clone()]));
    assert_eq!(ids_of(&repo, "a").len(), 3);

    // keep-tag protects a's first snapshot; keep-last 1 keeps its newest.
    let p = KeepPolicy {
        last: Some(1),
        keep_tags: vec!["keep=forever".into()],
        ..Default::default()
    };
    let r = forget(&repo, &p, false, None).unwrap();
    assert_eq!(r.removed, 1);
    assert_eq!(
        ids_of(&repo, "a"),
        BTreeSet::from([a_ids[0].clone(), a_ids[2].clone()])
    );
    let tagged = r.decisions.iter().find(|d| d.id == a_ids[0]).unwrap();
    assert_eq!(tagged.reasons, vec!["tag keep=forever"]);

    // keep-within 1h keeps everything taken seconds ago, in both VMs.
    let p = KeepPolicy {
        within: Some(KeepDuration::parse("1h").unwrap()),
        ..Default::default()
    };
    let r = forget(&repo, &p, false, None).unwrap();
    assert_eq!((r.kept, r.removed), (3, 0));

    // The selection filter: only snapshots tagged keep=forever are considered.
    let p = KeepPolicy {
        last: Some(0),
        tags: vec!["keep".into()],
        ..Default::default()
    };
    let r = forget(&repo, &p, false, None).unwrap();
    assert_eq!(r.decisions.len(), 1);
    assert_eq!((r.kept, r.removed), (0, 1));
    assert_eq!(ids_of(&repo, "a"), BTreeSet::from([a_ids[2].clone()]));

    // By id: prefix, unknown, too short.
    assert!(forget_ids(&repo, &["zz".into()], false).is_err());
    assert!(forget_ids(&repo, &["0000000000".into()], false).is_err());
    let gone = forget_ids(&repo, &[a_ids[2][..8].to_string()], false).unwrap();
    assert_eq!(gone, vec![a_ids[2].clone()]);
    assert!(ids_of(&repo, "a").is_empty());
    // The data is still there until prune.
    assert_restores(
        &repo,
        &Expected {
            id: b_ids[2].clone(),
            disk: b.disk.clone(),
            config: b.config.clone(),
        },
        tmp.path(),
    );
}
