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
    // An entry reaching past the disk's end (CRCs made valid): skipped, with a warning.
    let mut bad4 = bytes.clone();
    let e2 = 1024 + 128; // second entry of the array at LBA 2
    bad4[e2 + 40..e2 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
    let array_len = 128 * 128;
    let acrc = crc32(&bad4[1024..1024 + array_len]);
    bad4[512 + 88..512 + 92].copy_from_slice(&acrc.to_le_bytes());
    bad4[512 + 16..512 + 20].fill(0);
    let hcrc = crc32(&bad4[512..512 + 92]);
    bad4[512 + 16..512 + 20].copy_from_slice(&hcrc.to_le_bytes());
    let t = partitions(&MemDisk::new(bad4, 512)).unwrap();
    assert_eq!(t.partitions, want[..1]);
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("does not fit the disk")),
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

/// A 4Kn disk (4096-byte logical sectors, as Hyper-V can create): GPT in 4 KiB LBAs, written
/// here by hand, with a FAT volume that itself uses 4096-byte sectors.
#[test]
fn gpt_on_4k_sectors_with_a_4k_sector_fat() {
    const SS: usize = 4096;
    let sectors = 16384usize; // 64 MiB
    let mut d = vec![0u8; SS * sectors];
    // Protective MBR.
    d[446 + 4] = 0xEE;
    d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xAA;
    // One entry: Microsoft basic data at LBA 256..=2303 (1 MiB, 8 MiB long).
    let mut entries = vec![0u8; 128 * 128];
    let basic: [u8; 16] = [
        0xA2, 0xA0, 0xD0, 0xEB, 0xE5, 0xB9, 0x33, 0x44, 0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99,
        0xC7,
    ];
    entries[0..16].copy_from_slice(&basic);
    entries[16..32].copy_from_slice(&[7u8; 16]);
    entries[32..40].copy_from_slice(&256u64.to_le_bytes());
    entries[40..48].copy_from_slice(&2303u64.to_le_bytes());
    for (i, u) in "four k".encode_utf16().enumerate() {
        entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let ecrc = crc32(&entries);
    let header = |my: u64, alt: u64, elba: u64| {
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&6u64.to_le_bytes());
        h[48..56].copy_from_slice(&((sectors - 6) as u64).to_le_bytes());
        h[56..72].copy_from_slice(&[9u8; 16]);
        h[72..80].copy_from_slice(&elba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&ecrc.to_le_bytes());
        let c = crc32(&h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        h
    };
    let last = (sectors - 1) as u64;
    d[SS..SS + 92].copy_from_slice(&header(1, last, 2));
    d[2 * SS..2 * SS + entries.len()].copy_from_slice(&entries);
    let belba = last - 4;
    d[belba as usize * SS..belba as usize * SS + entries.len()].copy_from_slice(&entries);
    d[last as usize * SS..last as usize * SS + 92].copy_from_slice(&header(last, 1, belba));

    // A FAT volume with 4096-byte sectors in the partition.
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fat4k.img");
    run(
        Command::new("truncate").args(["-s", "8M"]).arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkfs.fat")
            .args(["-S", "4096", "-n", "FOURK"])
            .arg(&img),
        "dosfstools",
    );
    let payload = tmp.path().join("p.bin");
    std::fs::write(&payload, pattern(100_000, 4)).unwrap();
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&img)
            .arg(&payload)
            .arg("::/p.bin"),
        "mtools",
    );
    let fat = std::fs::read(&img).unwrap();
    d[256 * SS..256 * SS + fat.len()].copy_from_slice(&fat);

    for damaged in [false, true] {
        let mut bytes = d.clone();
        if damaged {
            bytes[SS + 40] ^= 1;
        }
        let disk: Arc<dyn vdisk::VirtualDisk> = Arc::new(MemDisk::new(bytes, SS as u32));
        let t = partitions(disk.as_ref()).unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(t.sector_size, 4096);
        assert_eq!(t.warnings.is_empty(), !damaged, "{:?}", t.warnings);
        let p = t.get(1).unwrap();
        assert_eq!((p.start, p.length), (MIB, 8 * MIB));
        assert_eq!(p.name.as_deref(), Some("four k"));
        let fs = guestfs::open_fs(p.volume(disk.clone()).unwrap()).unwrap();
        assert_eq!(fs.label().as_deref(), Some("FOURK"));
        let n = fs.lookup("/P.BIN").unwrap();
        assert_eq!(
            read_all(fs.as_ref(), n, 100_000).unwrap(),
            pattern(100_000, 4)
        );
    }
}
