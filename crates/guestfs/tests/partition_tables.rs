//! Partition tables built by sgdisk (GPT) and sfdisk (MBR with an extended partition and logical
//! partitions), filesystems placed with dd, converted to VHDX by qemu-img and read through
//! vdisk::open; checked against Sleuth Kit's mmls; damaged tables fall back or fail cleanly.

mod guestfs_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use guestfs::fs::FsKind;
use guestfs::volume::MemDisk;
use guestfs::{partitions, PartitionKind, TableKind};
use guestfs_support::*;

const MIB: u64 = 1 << 20;

fn fat32_image(dir: &Path, src: &Path) -> PathBuf {
    let img = dir.join("part-fat.img");
    run(
        Command::new("truncate").args(["-s", "64M"]).arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkfs.fat")
            .args(["-F", "32", "-n", "PARTFAT"])
            .arg(&img),
        "dosfstools",
    );
    let mut cmd = Command::new("mcopy");
    cmd.env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1");
    cmd.args(["-s", "-m", "-i"]).arg(&img);
    for e in std::fs::read_dir(src).unwrap() {
        cmd.arg(e.unwrap().path());
    }
    cmd.arg("::/");
    run(&mut cmd, "mtools");
    img
}

fn ext4_image(dir: &Path, src: &Path) -> PathBuf {
    let img = dir.join("part-ext4.img");
    run(
        Command::new("mke2fs")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "partext", "-d",
            ])
            .arg(src)
            .arg(&img)
            .arg("64M"),
        "e2fsprogs",
    );
    img
}

fn place(disk: &Path, img: &Path, start_sector: u64) {
    run(
        Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .args([
                "bs=512",
                &format!("seek={start_sector}"),
                "conv=notrunc,sparse",
                "status=none",
            ]),
        "coreutils",
    );
}

/// mmls rows: (start sector, length in sectors) of the non-meta, allocated slots.
fn mmls(disk: &Path) -> Vec<(u64, u64)> {
    let out = run(Command::new("mmls").arg(disk), "sleuthkit");
    let mut v = Vec::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || !f[0].ends_with(':') || f[1] == "Meta" || f[1].starts_with("---") {
            continue;
        }
        let desc = f[5..].join(" ");
        if desc.contains("Extended") || desc.contains("Unallocated") || desc.contains("Table") {
            continue;
        }
        v.push((f[2].parse().unwrap(), f[4].parse().unwrap()));
    }
    v
}

fn check_filesystems(disk: Arc<dyn vdisk::VirtualDisk>, src: &Path, expect: &[(u32, FsKind)]) {
    let table = partitions(disk.as_ref()).unwrap();
    let host = host_tree(src);
    for (index, kind) in expect {
        let p = table
            .get(*index)
            .unwrap_or_else(|| panic!("partition {index} in {table:?}"));
        let fs = guestfs::open_fs(p.volume(disk.clone()).unwrap()).unwrap();
        assert_eq!(fs.kind(), *kind);
        let guest = walk(fs.as_ref()).unwrap();
        for (path, (_, data, _)) in &host {
            let g = guest
                .get(path)
                .unwrap_or_else(|| panic!("{path} missing in partition {index}"));
            if let Some(d) = data {
                assert!(g.data.as_ref() == Some(d), "{path} in partition {index}");
            }
        }
    }
}

fn small_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    make_tree(&src, 50);
    src
}

#[test]
fn gpt_disk_with_fat32_and_ext4_raw_and_vhdx_and_backup_header() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_tree(tmp.path());
    let disk = tmp.path().join("gpt.raw");
    run(
        Command::new("truncate").args(["-s", "160M"]).arg(&disk),
        "coreutils",
    );
    run(
        Command::new("sgdisk")
            .args([
                "-o",
                "-n",
                "1:2048:+64M",
                "-t",
                "1:0700",
                "-c",
                "1:fat data",
                "-n",
                "2:0:+64M",
                "-t",
                "2:8300",
                "-c",
                "2:linux",
            ])
            .arg(&disk),
        "gdisk",
    );
    let raw = open_raw(&disk);
    let t = partitions(raw.as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(t.partitions.len(), 2);
    let p1 = &t.partitions[0];
    let p2 = &t.partitions[1];
    assert_eq!((p1.index, p1.start, p1.length), (1, 2048 * 512, 64 * MIB));
    assert_eq!(p1.name.as_deref(), Some("fat data"));
    match &p1.kind {
        PartitionKind::Gpt {
            type_guid,
            type_name,
            ..
        } => {
            assert_eq!(type_guid, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
            assert_eq!(*type_name, Some("Microsoft basic data"));
        }
        k => panic!("{k:?}"),
    }
    assert_eq!(p2.type_description(), "Linux filesystem");
    let ours: Vec<(u64, u64)> = t
        .partitions
        .iter()
        .map(|p| (p.start / 512, p.length / 512))
        .collect();
    assert_eq!(ours, mmls(&disk));
    drop(raw);

    place(&disk, &fat32_image(tmp.path(), &src), p1.start / 512);
    place(&disk, &ext4_image(tmp.path(), &src), p2.start / 512);
    let expect = [(1, FsKind::Fat32), (2, FsKind::Ext4)];
    check_filesystems(open_raw(&disk), &src, &expect);

    // The same disk as a dynamic VHDX, through vdisk::open.
    let vhdx = to_vhdx(&disk);
    assert_eq!(vdisk::detect(&vhdx).unwrap(), vdisk::DiskFormat::Vhdx);
    check_filesystems(open_raw(&vhdx), &src, &expect);

    // Damage the primary header: the backup at the end is used, and the result says so.
    let bytes = std::fs::read(&disk).unwrap();
    let want = partitions(&MemDisk::new(bytes.clone(), 512))
        .unwrap()
        .partitions;
    let mut bad = bytes.clone();
    bad[512 + 30] ^= 0xFF;
    let t = partitions(&MemDisk::new(bad.clone(), 512)).unwrap();
    assert_eq!(t.partitions, want);
    assert!(
        t.warnings.iter().any(|w| w.contains("backup GPT header")),
        "{:?}",
        t.warnings
    );
    assert!(
        t.warnings.iter().any(|w| w.contains("CRC32")),
        "{:?}",
        t.warnings
    );
    // Damaged entry array (header fine): also the backup.
    let mut bad2 = bytes.clone();
    bad2[1024 + 60] ^= 0xFF;
    let t = partitions(&MemDisk::new(bad2, 512)).unwrap();
    assert_eq!(t.partitions, want);
    assert!(
        t.warnings.iter().any(|w| w.contains("entry array CRC32")),
        "{:?}",
        t.warnings
    );
    // A header claiming billions of entries (CRC fixed up): refused, backup used, no huge alloc.
    let mut bad3 = bytes.clone();
    bad3[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
    bad3[512 + 16..512 + 20].fill(0);
    let crc = crc32(&bad3[512..512 + 92]);
    bad3[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    let t = partitions(&MemDisk::new(bad3, 512)).unwrap();
    assert_eq!(t.partitions, want);
    assert!(
        t.warnings.iter().any(|w| w.contains("limit")),
        "{:?}",
        t.warnings
    );
    // Both headers damaged: a clear error.
    let n = bad.len();
    bad[n - 512 + 30] ^= 0xFF;
    let err = partitions(&MemDisk::new(bad, 512)).unwrap_err();
    assert!(err.to_string().contains("backup GPT header"), "{err}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn mbr_disk_with_extended_and_logical_partitions_and_ebr_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_tree(tmp.path());
    let disk = tmp.path().join("mbr.raw");
    run(
        Command::new("truncate").args(["-s", "220M"]).arg(&disk),
        "coreutils",
    );
    let script = "label: dos\nstart=2048, size=131072, type=c, bootable\nstart=135168, size=290816, type=5\nstart=137216, size=131072, type=83\nstart=270336, size=20480, type=83\n";
    let mut child = Command::new("sfdisk")
        .arg("--no-reread")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (apt package fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bytes = std::fs::read(&disk).unwrap();
    let t = partitions(&MemDisk::new(bytes.clone(), 512)).unwrap();
    assert_eq!(t.kind, TableKind::Mbr);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let got: Vec<(u32, u64, u64, bool, bool)> = t
        .partitions
        .iter()
        .map(|p| {
            (
                p.index,
                p.start / 512,
                p.length / 512,
                p.logical,
                p.bootable,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 2048, 131072, false, true),
            (5, 137216, 131072, true, false),
            (6, 270336, 20480, true, false)
        ]
    );
    assert_eq!(t.partitions[0].kind, PartitionKind::Mbr { type_byte: 0x0c });
    let ours: Vec<(u64, u64)> = t
        .partitions
        .iter()
        .map(|p| (p.start / 512, p.length / 512))
        .collect();
    assert_eq!(ours, mmls(&disk));

    place(&disk, &fat32_image(tmp.path(), &src), 2048);
    place(&disk, &ext4_image(tmp.path(), &src), 137216);
    let expect = [(1, FsKind::Fat32), (5, FsKind::Ext4)];
    check_filesystems(open_raw(&disk), &src, &expect);
    check_filesystems(open_raw(&to_vhdx(&disk)), &src, &expect);

    // The second EBR links to itself: the chain stops with a warning, nothing repeats.
    let ebr2 = {
        // Its position: the first EBR's link (entry 2) is relative to the extended partition.
        let ebr1 = 135168 * 512;
        let rel = u32::from_le_bytes(
            bytes[ebr1 + 446 + 16 + 8..ebr1 + 446 + 16 + 12]
                .try_into()
                .unwrap(),
        );
        (135168 + rel as usize) * 512
    };
    let mut bad = bytes.clone();
    let rel2 = (ebr2 / 512 - 135168) as u32;
    bad[ebr2 + 446 + 16] = 0;
    bad[ebr2 + 446 + 16 + 4] = 0x05;
    bad[ebr2 + 446 + 16 + 8..ebr2 + 446 + 16 + 12].copy_from_slice(&rel2.to_le_bytes());
    bad[ebr2 + 446 + 16 + 12..ebr2 + 446 + 16 + 16].copy_from_slice(&2048u32.to_le_bytes());
    let t = partitions(&MemDisk::new(bad, 512)).unwrap();
    assert_eq!(
        t.partitions.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![1, 5, 6]
    );
    assert!(
        t.warnings.iter().any(|w| w.contains("loops back")),
        "{:?}",
        t.warnings
    );

    // A logical partition pointing outside the extended partition is skipped with a warning.
    let mut bad = bytes.clone();
    bad[ebr2 + 446 + 12..ebr2 + 446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    let t = partitions(&MemDisk::new(bad, 512)).unwrap();
    assert_eq!(
        t.partitions.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![1, 5]
    );
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("outside the extended")),
        "{:?}",
        t.warnings
    );

    // Noise in the partition area never panics.
    for seed in 0..200u64 {
        let mut img = bytes[..(2 << 20)].to_vec();
        let noise = pattern(512, seed);
        img[446..510].copy_from_slice(&noise[..64]);
        let _ = partitions(&MemDisk::new(img, 512));
    }
}

#[test]
fn bare_disk_and_tiny_disks() {
    // Zeros: no table, one pseudo-partition over the whole disk; the probe says what it tried.
    let d = MemDisk::new(vec![0u8; 4 << 20], 512);
    let t = partitions(&d).unwrap();
    assert_eq!(t.kind, TableKind::None);
    assert_eq!(
        (t.partitions[0].start, t.partitions[0].length),
        (0, 4 << 20)
    );
    let err = guestfs::open_fs(guestfs::volume::Volume::from_bytes(vec![0u8; 4 << 20]))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("NTFS, exFAT, FAT12/16/32, ext2/3/4"),
        "{err}"
    );
    // Tiny disks.
    for n in [0usize, 1, 511, 512, 1023] {
        let _ = partitions(&MemDisk::new(vec![0x55; n], 512));
        let _ = guestfs::open_fs(guestfs::volume::Volume::from_bytes(vec![0xAA; n]));
    }
}
