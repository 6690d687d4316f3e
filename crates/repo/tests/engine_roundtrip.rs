//! Backup and restore round trips: qemu-made and hyperkeep-made VHDX and VHD disks (a
//! differencing chain included) and VM configuration files come back content-identical, checked
//! by qemu-img (compare, check) and by reading the disks back.

mod engine_util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use engine_util::*;
use repo::backend::ObjectKind;
use repo::backup::{backup, BackupOptions, NoProgress};
use repo::restore::{restore, SnapshotDisk};
use repo::snapshot::{find_snapshot, list_snapshots};
use vdisk::{DiskFormat, MapScope, VirtualDisk};

fn opts(vm: &str, paths: &[&Path]) -> BackupOptions {
    BackupOptions {
        vm: vm.into(),
        paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        ..BackupOptions::default()
    }
}

/// Writes that cross chunk boundaries, are unaligned, and include an explicit zero write.
fn patterns() -> Vec<(u8, u64, u64)> {
    vec![
        (0xab, 0, 4096),
        (0x5c, MIB - 512, 1024), // crosses the first chunk boundary
        (0x11, 5 * MIB + 3 * 512, 3 * MIB), // several whole and partial chunks
        (0x00, 20 * MIB, 2 * MIB), // allocated, but zeros
        (0x77, 63 * MIB, MIB),   // the last chunk
    ]
}

fn vmcx(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let a = dir.join("vm.vmcx");
    let content: Vec<u8> = (0..(MIB as usize + 4321))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(&a, &content).unwrap();
    let b = dir.join("vm.vmgs");
    std::fs::write(&b, b"").unwrap();
    let c = dir.join("vm.vmrs");
    let mut zeros = vec![0u8; 2 * MIB as usize];
    zeros[MIB as usize + 5] = 1;
    std::fs::write(&c, &zeros).unwrap();
    (a, b, c)
}

fn round_trip_qemu(format: DiskFormat, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let disk = src.join(name);
    qemu_disk(&disk, format, 64 * MIB, &patterns());
    let (c1, c2, c3) = vmcx(&src);
    let repo = new_repo(tmp.path());
    let mut o = opts("web", &[&disk, &c1, &c2, &c3]);
    o.tags = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let (id, snap) = backup(&repo, &o, &NoProgress).unwrap();
    assert_eq!(snap.disks.len(), 1);
    assert_eq!(snap.files.len(), 3);
    assert_eq!(snap.disks[0].format, format.to_string());
    assert_eq!(snap.disks[0].virtual_size, 64 * MIB);
    // Chunks 0, 1, 5..=8, 63 hold data; the zero write and everything else are zero entries.
    // qemu-io fills with a constant, so chunks 6 and 7 are identical: 6 distinct disk chunks,
    // plus 2 of the .vmcx and the one non-zero chunk of the .vmrs.
    assert_eq!(snap.summary.chunks_new, 6 + 2 + 1, "{:?}", snap.summary);
    assert_eq!(snap.summary.chunks_reused, 1);
    // Every chunk the disk's allocation map marks as data is read (whole blocks: qemu
    // allocates 8 MiB VHDX / 2 MiB VHD blocks), plus the files.
    assert_eq!(
        snap.summary.bytes_read,
        allocated_chunk_bytes(&disk) + (MIB + 4321) + 2 * MIB
    );
    assert_eq!(snap.disks[0].data_bytes, 7 * MIB);

    let (found, _) = find_snapshot(&repo, &id[..6], Some("web")).unwrap();
    assert_eq!(found, id);
    let target = tmp.path().join("restore");
    let report = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    let restored = target.join(name);
    assert_eq!(report.disks[0].path, restored);
    assert_eq!(vdisk::detect(&restored).unwrap(), format);
    qemu_compare(&disk, format, &restored, format);
    if format == DiskFormat::Vhdx {
        qemu_check_clean(&restored, format);
    }
    assert_eq!(read_view(&disk), read_view(&restored));
    for f in [&c1, &c2, &c3] {
        let back = target.join(f.file_name().unwrap());
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(&back).unwrap(),
            "{f:?}"
        );
    }

    // Also into the other formats (--to).
    for to in [DiskFormat::Vhdx, DiskFormat::Vhd, DiskFormat::Raw] {
        let t = tmp.path().join(format!("to-{to}"));
        let r = restore(&repo, &id, &snap, &t, Some(to), &NoProgress).unwrap();
        let p = &r.disks[0].path;
        assert_eq!(vdisk::detect(p).unwrap(), to);
        qemu_compare(&disk, format, p, to);
    }
}

#[test]
fn qemu_vhdx_round_trip() {
    round_trip_qemu(DiskFormat::Vhdx, "web.vhdx");
}

#[test]
fn qemu_vhd_round_trip() {
    round_trip_qemu(DiskFormat::Vhd, "web.vhd");
}

#[test]
fn hyperkeep_made_disks_and_chain_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    for (format, ext, block) in [
        (DiskFormat::Vhdx, "vhdx", Some(MIB as u32)),
        (DiskFormat::Vhdx, "vhdx", None),
        (DiskFormat::Vhd, "vhd", None),
    ] {
        let dir = tmp.path().join(format!("src-{ext}-{}", block.unwrap_or(0)));
        std::fs::create_dir(&dir).unwrap();
        let base = dir.join(format!("base.{ext}"));
        hk_disk(&base, format, 64 * MIB, block, &patterns());
        let child = dir.join(format!("child.a{ext}"));
        {
            let mut c = vdisk::create_child(&base, &child).unwrap();
            write_patterns(
                &mut *c,
                &[
                    (0xc1, 3 * MIB + 4096, 8192),
                    (0x00, 5 * MIB, MIB),
                    (0xc2, 40 * MIB, MIB),
                ],
            );
        }
        for disk in [&base, &child] {
            let (id, snap) = backup(&repo, &opts("chain", &[disk]), &NoProgress).unwrap();
            let target = dir.join(format!(
                "restore-{}",
                disk.file_stem().unwrap().to_str().unwrap()
            ));
            let report = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
            let out = &report.disks[0].path;
            // A differencing layer comes back as a standalone dynamic disk of its format.
            assert_eq!(out.extension().unwrap().to_str().unwrap(), ext);
            assert_eq!(read_view(disk), read_view(out), "{disk:?}");
            let info = vdisk::open(out, &Default::default()).unwrap().info();
            assert_eq!(info.subformat, vdisk::Subformat::Dynamic);
            if format == DiskFormat::Vhdx {
                qemu_check_clean(out, format);
            }
            if disk == &base {
                qemu_compare(disk, format, out, format);
            } else {
                // qemu can't read differencing disks we make; libvhdi can.
                let view = dir.join("child-view.raw");
                libvhdi_view(&[&child, &base], &view);
                qemu_compare(&view, DiskFormat::Raw, out, format);
            }
        }
    }
}

#[test]
fn second_backup_of_the_same_disk_stores_nothing_new() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.vhdx");
    qemu_disk(&disk, DiskFormat::Vhdx, 64 * MIB, &patterns());
    let repo = new_repo(tmp.path());
    let (_, first) = backup(&repo, &opts("vm", &[&disk]), &NoProgress).unwrap();
    let packs = count(&repo, ObjectKind::Pack);
    let indexes = count(&repo, ObjectKind::Index);
    assert!(packs >= 1);
    let (id2, second) = backup(&repo, &opts("vm", &[&disk]), &NoProgress).unwrap();
    assert_eq!(second.summary.chunks_new, 0);
    assert_eq!(second.summary.bytes_new, 0);
    assert_eq!(second.summary.bytes_stored, 0);
    assert_eq!(
        second.summary.chunks_reused,
        first.summary.chunks_new + first.summary.chunks_reused
    );
    assert_eq!(second.disks[0].tables, first.disks[0].tables);
    assert_eq!(count(&repo, ObjectKind::Pack), packs);
    assert_eq!(count(&repo, ObjectKind::Index), indexes);
    assert_eq!(list_snapshots(&repo).unwrap().len(), 2);
    let (latest, _) = find_snapshot(&repo, "latest", Some("vm")).unwrap();
    assert_eq!(latest, id2);

    // The same chunks inside another VM's disk in another format dedupe too.
    let vhd = tmp.path().join("other.vhd");
    vdisk::convert(
        &*vdisk::open(&disk, &Default::default()).unwrap(),
        &vhd,
        &vdisk::ConvertOptions {
            format: DiskFormat::Vhd,
            fixed: false,
            block_size: None,
        },
        None,
    )
    .unwrap();
    let (_, third) = backup(&repo, &opts("other", &[&vhd]), &NoProgress).unwrap();
    assert_eq!(third.summary.chunks_new, 0);
}

#[test]
fn zero_chunks_are_never_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("z.vhdx");
    // Allocated blocks that hold only zeros, one data chunk, and unallocated space.
    qemu_disk(
        &disk,
        DiskFormat::Vhdx,
        64 * MIB,
        &[
            (0x00, 0, 16 * MIB),
            (0x42, 16 * MIB, 4096),
            (0x00, 32 * MIB, 8 * MIB),
        ],
    );
    // qemu records `write -P 0` as data in the VHDX: the allocated range really is read.
    let repo = new_repo(tmp.path());
    let (id, snap) = backup(&repo, &opts("z", &[&disk]), &NoProgress).unwrap();
    assert_eq!(snap.summary.chunks_new, 1);
    assert!(snap.summary.zero_chunks >= 16, "{:?}", snap.summary);
    assert_eq!(snap.disks[0].data_bytes, MIB);
    let index = repo.load_index().unwrap();
    let data_blobs = index
        .iter()
        .filter(|(_, l)| l.kind == repo::pack::BlobKind::Data)
        .count();
    assert_eq!(data_blobs, 1);
    // Restored: the zero chunks are holes, not data.
    let sd = SnapshotDisk::open(&repo, &index, &snap.disks[0]).unwrap();
    let map = sd.map(0, 64 * MIB, MapScope::View).unwrap();
    let data: u64 = map
        .iter()
        .filter(|e| e.state == vdisk::ExtentState::Data)
        .map(|e| e.length)
        .sum();
    assert_eq!(data, MIB);
    let target = tmp.path().join("r");
    let r = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    qemu_compare(&disk, DiskFormat::Vhdx, &r.disks[0].path, DiskFormat::Vhdx);
}

#[test]
fn snapshot_disk_reads_across_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("r.vhdx");
    hk_disk(
        &disk,
        DiskFormat::Vhdx,
        10 * MIB + 512,
        Some(MIB as u32),
        &patterns()[..3],
    );
    let repo = new_repo(tmp.path());
    let (_, snap) = backup(&repo, &opts("r", &[&disk]), &NoProgress).unwrap();
    let index = repo.load_index().unwrap();
    let sd = SnapshotDisk::open(&repo, &index, &snap.disks[0]).unwrap();
    assert_eq!(sd.geometry().virtual_size, 10 * MIB + 512);
    assert_eq!(sd.geometry().logical_sector_size, 512);
    let want = read_view(&disk);
    for (off, len) in [
        (0u64, 1usize),
        (MIB - 700, 1400),
        (5 * MIB + 1, 3 * MIB as usize),
        (10 * MIB, 512),
    ] {
        let mut buf = vec![0xeeu8; len];
        sd.read_at(&mut buf, off).unwrap();
        assert_eq!(
            &buf[..],
            &want[off as usize..off as usize + len],
            "at {off}"
        );
    }
    let mut buf = vec![0u8; 1024];
    assert!(sd.read_at(&mut buf, 10 * MIB).is_err(), "read past the end");
    assert_eq!(read_disk(&sd), want);
}

#[test]
fn sector_sizes_survive_the_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("4k.vhdx");
    let mut o = vdisk::CreateOptions::new(DiskFormat::Vhdx, 16 * MIB);
    o.logical_sector_size = 4096;
    o.physical_sector_size = 4096;
    {
        let mut d = vdisk::create(&disk, &o).unwrap();
        write_patterns(&mut *d, &[(0x61, 4096, 3 * MIB)]);
    }
    let repo = new_repo(tmp.path());
    let (id, snap) = backup(&repo, &opts("4k", &[&disk]), &NoProgress).unwrap();
    assert_eq!(snap.disks[0].logical_sector_size, 4096);
    assert_eq!(snap.disks[0].physical_sector_size, 4096);
    let target = tmp.path().join("r");
    let r = restore(&repo, &id, &snap, &target, None, &NoProgress).unwrap();
    let back = vdisk::open(&r.disks[0].path, &Default::default()).unwrap();
    assert_eq!(back.geometry().logical_sector_size, 4096);
    assert_eq!(back.geometry().physical_sector_size, 4096);
    assert_eq!(read_disk(&*back), read_view(&disk));
    // qemu refuses 4 KiB-sector VHDX ("Operation not supported"); libvhdi and our checker
    // read it.
    let view = tmp.path().join("4k-view.raw");
    libvhdi_view(&[&r.disks[0].path], &view);
    assert_eq!(std::fs::read(&view).unwrap(), read_view(&disk));
    let report = vdisk::check(&r.disks[0].path, &Default::default()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // VHD has only 512-byte sectors: a clear refusal, and nothing left behind.
    let t2 = tmp.path().join("r2");
    let e = restore(&repo, &id, &snap, &t2, Some(DiskFormat::Vhd), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("512-byte sectors"), "{e}");
    assert!(!t2.exists());
}
