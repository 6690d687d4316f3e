//! Change-list incrementals: only chunks touched by the change list are read, everything else
//! comes from the parent's table, and the result equals a full backup of the same state.

mod engine_util;

use std::path::Path;

use engine_util::*;
use repo::backup::{backup, BackupOptions, NoProgress};
use repo::diff::{diff, Change};
use repo::restore::restore;
use repo::snapshot::list_snapshots;
use repo::stats::stats;
use vdisk::{DiskFormat, OpenOptions};

fn opts(vm: &str, paths: &[&Path]) -> BackupOptions {
    BackupOptions {
        vm: vm.into(),
        paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        ..BackupOptions::default()
    }
}

#[test]
fn differencing_disk_change_list_reads_only_changed_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhdx");
    hk_disk(
        &base,
        DiskFormat::Vhdx,
        64 * MIB,
        Some(MIB as u32),
        &[(0x11, 0, 9 * MIB), (0x77, 63 * MIB, MIB)],
    );
    let repo = new_repo(tmp.path());
    let (id1, snap1) = backup(&repo, &opts("vm", &[&base]), &NoProgress).unwrap();
    assert_eq!(snap1.summary.bytes_read, 10 * MIB);

    // A checkpoint: the child holds what changed since backup 1.
    let child = tmp.path().join("base_checkpoint.avhdx");
    {
        let mut c = vdisk::create_child(&base, &child).unwrap();
        write_patterns(
            &mut *c,
            &[
                (0xd1, 10 * MIB + 100, 300), // chunk 10 (was zeros)
                (0xd2, 30 * MIB - 10, 20),   // chunks 29 and 30
                (0xd3, 4 * MIB, 4096),       // chunk 4 (had data)
                (0x00, 63 * MIB, MIB),       // chunk 63 becomes zeros
            ],
        );
    }
    let mut o = opts("vm", &[&child]);
    o.changes_from = vec![child.clone()];
    let (id2, snap2) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap2.parent.as_deref(), Some(id1.as_str()));
    assert_eq!(
        snap2.summary.bytes_read,
        5 * MIB,
        "only chunks 4, 10, 29, 30, 63 are read: {:?}",
        snap2.summary
    );
    assert_eq!(snap2.summary.chunks_new, 4);
    assert_eq!(snap2.summary.zero_chunks, 1);

    // A full backup of the same state yields the same table.
    let (id3, snap3) = backup(&repo, &opts("vm", &[&child]), &NoProgress).unwrap();
    assert_eq!(snap3.summary.bytes_read, 10 * MIB + 3 * MIB);
    assert_eq!(snap3.summary.chunks_new, 0);
    assert_eq!(snap2.disks[0].tables, snap3.disks[0].tables);
    assert_eq!(snap2.disks[0].data_bytes, snap3.disks[0].data_bytes);

    // Both restore to the chain's view.
    let want = read_view(&child);
    for (id, snap) in [(&id2, &snap2), (&id3, &snap3)] {
        let target = tmp.path().join(format!("r-{}", &id[..8]));
        let r = restore(&repo, id, snap, &target, None, &NoProgress).unwrap();
        assert_eq!(r.disks[0].path, target.join("base_checkpoint.vhdx"));
        assert_eq!(read_view(&r.disks[0].path), want);
        qemu_check_clean(&r.disks[0].path, DiskFormat::Vhdx);
    }

    // diff counts the five changed chunks; stats sees three snapshots.
    let index = repo.load_index().unwrap();
    let d = diff(&repo, &index, (&id1, &snap1), (&id2, &snap2)).unwrap();
    // Different disk names: one removed, one added.
    assert_eq!(d.disks.len(), 2);
    let d = diff(&repo, &index, (&id2, &snap2), (&id3, &snap3)).unwrap();
    assert_eq!(d.disks[0].change, Change::Unchanged);
    assert_eq!(d.changed_bytes, 0);
    let mut renamed = snap1.clone();
    renamed.disks[0].name = "base_checkpoint.avhdx".into();
    let d = diff(&repo, &index, (&id1, &renamed), (&id2, &snap2)).unwrap();
    assert_eq!(d.disks.len(), 1);
    assert_eq!(d.disks[0].change, Change::Changed);
    assert_eq!(d.disks[0].changed_chunks, 5);
    assert_eq!(d.changed_bytes, 5 * MIB);
    let all = list_snapshots(&repo).unwrap();
    let st = stats(&repo, &index, &all).unwrap();
    assert_eq!(st.snapshots, 3);
    assert_eq!(st.vms, 1);
    assert_eq!(st.data_blobs, 10 + 4);
    assert!(st.tree_blobs >= 2);
    assert_eq!(st.total_restore_size, 3 * 64 * MIB);
}

#[test]
fn changed_ranges_hook_on_a_raw_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    hk_disk(
        &img,
        DiskFormat::Raw,
        24 * MIB,
        None,
        &[(0x21, 0, 12 * MIB)],
    );
    let repo = new_repo(tmp.path());
    let (_, first) = backup(&repo, &opts("raw", &[&img]), &NoProgress).unwrap();
    // The raw image is sparse: its holes are not read.
    assert_eq!(first.summary.bytes_read, 12 * MIB);
    assert_eq!(first.disks[0].format, "raw");

    let changes = [(3 * MIB + 7, 10u64), (17 * MIB, 2 * MIB)];
    {
        let mut d = vdisk::open_mut(&img, &OpenOptions::default()).unwrap();
        write_patterns(
            &mut *d,
            &[(0x31, 3 * MIB + 7, 10), (0x32, 17 * MIB, 2 * MIB)],
        );
    }
    let mut o = opts("raw", &[&img]);
    o.changed_ranges = Some(changes.to_vec());
    let (id, snap) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap.summary.bytes_read, 3 * MIB, "{:?}", snap.summary);
    assert_eq!(snap.summary.chunks_new, 3);
    let target = tmp.path().join("r");
    let r = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    assert_eq!(
        std::fs::read(&r.disks[0].path).unwrap(),
        std::fs::read(&img).unwrap()
    );
}

#[test]
fn per_disk_change_lists_for_a_vm_with_two_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let sys = tmp.path().join("sys.vhdx");
    let data = tmp.path().join("data.vhdx");
    hk_disk(
        &sys,
        DiskFormat::Vhdx,
        16 * MIB,
        Some(MIB as u32),
        &[(0x41, 0, 6 * MIB)],
    );
    hk_disk(
        &data,
        DiskFormat::Vhdx,
        32 * MIB,
        Some(MIB as u32),
        &[(0x42, 4 * MIB, 8 * MIB)],
    );
    let repo = new_repo(tmp.path());
    let (first_id, first) = backup(&repo, &opts("two", &[&sys, &data]), &NoProgress).unwrap();
    assert_eq!(first.summary.bytes_read, 14 * MIB);

    let rewrite = |path: &Path, writes: &[(u8, u64, u64)]| {
        let mut d = vdisk::open_mut(path, &OpenOptions::default()).unwrap();
        write_patterns(&mut *d, writes);
    };
    rewrite(&sys, &[(0x51, 2 * MIB + 100, 50)]);
    rewrite(&data, &[(0x52, 5 * MIB, MIB + 1), (0x53, 30 * MIB, 4096)]);

    // Both disks tracked: only the chunks their ranges touch are read (1 + 3 chunks).
    let mut o = opts("two", &[&sys, &data]);
    o.disk_changes = vec![
        (data.clone(), vec![(5 * MIB, MIB + 1), (30 * MIB, 4096)]),
        (sys.clone(), vec![(2 * MIB + 100, 50)]),
    ];
    let (id, snap) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap.summary.bytes_read, 4 * MIB, "{:?}", snap.summary);
    assert_eq!(snap.parent.as_deref(), Some(first_id.as_str()));
    let target = tmp.path().join("both");
    let r = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    for (disk, source) in r.disks.iter().zip([&sys, &data]) {
        assert!(read_view(&disk.path) == read_view(source), "{}", disk.name);
    }

    // Only the data disk tracked: the system disk is read in full (its 6 allocated MiB), the
    // data disk's one touched chunk only.
    rewrite(&sys, &[(0x61, 9 * MIB, 10)]);
    rewrite(&data, &[(0x62, 20 * MIB, 10)]);
    let mut o = opts("two", &[&sys, &data]);
    // (Named through another path of the same file: a symbolic link.)
    let link = tmp.path().join("data-link.vhdx");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    o.disk_changes = vec![(link, vec![(20 * MIB, 10)])];
    let (id, snap) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap.summary.bytes_read, 7 * MIB + MIB, "{:?}", snap.summary);
    let target = tmp.path().join("one");
    let r = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    for (disk, source) in r.disks.iter().zip([&sys, &data]) {
        assert!(read_view(&disk.path) == read_view(source), "{}", disk.name);
    }

    // Ranges for a path that is not one of the disks, twice for one disk, or beside another
    // kind of change list: refused before anything is read.
    let mut o = opts("two", &[&sys, &data]);
    o.disk_changes = vec![(tmp.path().join("other.vhdx"), vec![(0, 1)])];
    let e = backup(&repo, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("not one of this backup's disks"), "{e}");
    o.disk_changes = vec![(sys.clone(), vec![(0, 1)]), (sys.clone(), vec![(0, 1)])];
    let e = backup(&repo, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
    o.disk_changes = vec![(sys.clone(), vec![(0, 1)])];
    o.changed_ranges = Some(vec![(0, 1)]);
    let e = backup(&repo, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("one kind of change list"), "{e}");
}

#[test]
fn checkpoint_children_of_two_disks_are_each_a_change_list() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vhdx");
    let b = tmp.path().join("b.vhdx");
    hk_disk(
        &a,
        DiskFormat::Vhdx,
        16 * MIB,
        Some(MIB as u32),
        &[(0x11, 0, 5 * MIB)],
    );
    hk_disk(
        &b,
        DiskFormat::Vhdx,
        16 * MIB,
        Some(MIB as u32),
        &[(0x12, 8 * MIB, 6 * MIB)],
    );
    let repo = new_repo(tmp.path());
    let (id1, _) = backup(&repo, &opts("vm", &[&a, &b]), &NoProgress).unwrap();

    // Round 1: a checkpoint of each disk; the children hold what changed. The snapshot knows
    // the disks as a.vhdx and b.vhdx: each child's parent file name finds its table.
    let child = |parent: &Path, name: &str, writes: &[(u8, u64, u64)]| {
        let path = tmp.path().join(name);
        let mut c = vdisk::create_child(parent, &path).unwrap();
        write_patterns(&mut *c, writes);
        path
    };
    let a1 = child(&a, "a_cp1.avhdx", &[(0x21, 3 * MIB + 5, 100)]);
    let b1 = child(
        &b,
        "b_cp1.avhdx",
        &[(0x22, 9 * MIB, 2 * MIB), (0x23, MIB, 10)],
    );
    let mut o = opts("vm", &[&a1, &b1]);
    o.changes_from = vec![b1.clone(), a1.clone()];
    let (id2, snap2) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap2.parent.as_deref(), Some(id1.as_str()));
    assert_eq!(snap2.summary.bytes_read, 4 * MIB, "{:?}", snap2.summary);

    // Round 2: checkpoints of the checkpoints; now the parent snapshot knows the disks by the
    // first children's names.
    let a2 = child(&a1, "a_cp2.avhdx", &[(0x31, 15 * MIB, 10)]);
    let b2 = child(&b1, "b_cp2.avhdx", &[(0x32, 0, 10)]);
    let mut o = opts("vm", &[&a2, &b2]);
    o.changes_from = vec![a2.clone(), b2.clone()];
    let (id3, snap3) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap3.parent.as_deref(), Some(id2.as_str()));
    assert_eq!(snap3.summary.bytes_read, 2 * MIB, "{:?}", snap3.summary);
    for (id, snap, tops) in [(&id2, &snap2, [&a1, &b1]), (&id3, &snap3, [&a2, &b2])] {
        let target = tmp.path().join(format!("r-{}", &id[..8]));
        let r = restore(&repo, id, snap, &target, None, &NoProgress).unwrap();
        for (disk, top) in r.disks.iter().zip(tops) {
            assert!(read_view(&disk.path) == read_view(top), "{}", disk.name);
        }
    }

    // With several change lists, each must be one of the disks backed up.
    let mut o = opts("vm", &[&a2, &b2]);
    o.changes_from = vec![a2.clone(), b1.clone()];
    let e = backup(&repo, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("not one of the disks backed up"), "{e}");
}

#[test]
fn change_list_without_a_usable_parent_reads_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    hk_disk(&img, DiskFormat::Raw, 8 * MIB, None, &[(0x21, 0, 8 * MIB)]);
    let other = tmp.path().join("other.img");
    hk_disk(
        &other,
        DiskFormat::Raw,
        4 * MIB,
        None,
        &[(0x22, 0, 4 * MIB)],
    );
    let repo = new_repo(tmp.path());
    // No snapshot of this VM yet.
    let mut o = opts("vm", &[&img]);
    o.changed_ranges = Some(vec![(0, 1)]);
    let (_, s) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(s.summary.bytes_read, 8 * MIB);
    // A parent whose disk has another size.
    let (_, _) = backup(&repo, &opts("vm2", &[&other]), &NoProgress).unwrap();
    let mut o = opts("vm2", &[&img]);
    o.changed_ranges = Some(vec![(0, 1)]);
    let (_, s) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(s.summary.bytes_read, 8 * MIB);
    // Two disks: the change list can't say which one it describes.
    let mut o = opts("vm", &[&img, &other]);
    o.changed_ranges = Some(vec![(0, 1)]);
    let e = backup(&repo, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("one disk"), "{e}");
}

#[test]
fn parent_with_lost_chunks_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    hk_disk(&img, DiskFormat::Raw, 8 * MIB, None, &[(0x21, 0, 8 * MIB)]);
    let repo = new_repo(tmp.path());
    backup(&repo, &opts("vm", &[&img]), &NoProgress).unwrap();
    // The index files vanish (the packs stay): the parent's chunks are unknown.
    for o in repo
        .backend()
        .list(repo::backend::ObjectKind::Index)
        .unwrap()
    {
        repo.backend()
            .delete(repo::backend::ObjectKind::Index, &o.name)
            .unwrap();
    }
    let mut o = opts("vm", &[&img]);
    o.changed_ranges = Some(vec![(0, 1)]);
    let (id, s) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(
        s.summary.bytes_read,
        8 * MIB,
        "a full read, not the change list"
    );
    assert_eq!(s.summary.chunks_new, 8);
    let r = restore(&repo, &id, &s, &tmp.path().join("r"), None, &NoProgress).unwrap();
    assert_eq!(
        std::fs::read(&r.disks[0].path).unwrap(),
        std::fs::read(&img).unwrap()
    );
}
