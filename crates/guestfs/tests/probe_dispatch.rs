//! `open_fs` recognises every filesystem by its own structures, on a partition of a VHDX: one
//! GPT disk with NTFS, FAT16, exFAT and ext2 partitions, each opened through the probe.

mod guestfs_support;

use std::path::Path;
use std::process::Command;

use guestfs::fs::FsKind;
use guestfs::partitions;
use guestfs_support::*;

fn mkimg(dir: &Path, name: &str, mib: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    run(
        Command::new("truncate")
            .arg("-s")
            .arg(format!("{mib}M"))
            .arg(&p),
        "coreutils",
    );
    p
}

#[test]
fn probe_recognises_each_filesystem_on_a_gpt_vhdx() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let payload = d.join("payload.txt");
    std::fs::write(&payload, b"probe payload\n").unwrap();

    let ntfs = mkimg(d, "ntfs.img", 16);
    run(
        Command::new("mkntfs")
            .args(["-q", "-F", "-f", "-L", "NTFSVOL"])
            .arg(&ntfs),
        "ntfs-3g",
    );
    run(
        Command::new("ntfscp")
            .arg(&ntfs)
            .arg(&payload)
            .arg("payload.txt"),
        "ntfs-3g",
    );

    let fat = mkimg(d, "fat.img", 16);
    run(
        Command::new("mkfs.fat")
            .args(["-F", "16", "-n", "FATVOL"])
            .arg(&fat),
        "dosfstools",
    );
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&fat)
            .arg(&payload)
            .arg("::/payload.txt"),
        "mtools",
    );

    let exfat = mkimg(d, "exfat.img", 16);
    run(
        Command::new("mkfs.exfat").args(["-L", "EXVOL"]).arg(&exfat),
        "exfatprogs",
    );

    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(&payload, src.join("payload.txt")).unwrap();
    let ext = d.join("ext2.img");
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext2", "-L", "extvol", "-d"])
            .arg(&src)
            .arg(&ext)
            .arg("16M"),
        "e2fsprogs",
    );

    let disk = mkimg(d, "disk.raw", 80);
    run(
        Command::new("sgdisk")
            .args([
                "-o",
                "-n",
                "1:2048:+16M",
                "-t",
                "1:0700",
                "-n",
                "2:0:+16M",
                "-t",
                "2:0700",
            ])
            .args([
                "-n", "3:0:+16M", "-t", "3:0700", "-n", "4:0:+16M", "-t", "4:8300",
            ])
            .arg(&disk),
        "gdisk",
    );
    let table = partitions(open_raw(&disk).as_ref()).unwrap();
    for (i, img) in [&ntfs, &fat, &exfat, &ext].iter().enumerate() {
        let start = table.partitions[i].start / 512;
        run(
            Command::new("dd")
                .arg(format!("if={}", img.display()))
                .arg(format!("of={}", disk.display()))
                .args([
                    "bs=512",
                    &format!("seek={start}"),
                    "conv=notrunc",
                    "status=none",
                ]),
            "coreutils",
        );
    }
    let vhdx = to_vhdx(&disk);
    let disk = open_raw(&vhdx);
    let table = partitions(disk.as_ref()).unwrap();
    let want = [
        (FsKind::Ntfs, "NTFSVOL", true),
        (FsKind::Fat16, "FATVOL", true),
        (FsKind::Exfat, "EXVOL", false),
        (FsKind::Ext2, "extvol", true),
    ];
    for (p, (kind, label, has_payload)) in table.partitions.iter().zip(want) {
        let fs = guestfs::open_fs(p.volume(disk.clone()).unwrap()).unwrap();
        assert_eq!(fs.kind(), kind, "partition {}", p.index);
        assert_eq!(fs.label().as_deref(), Some(label), "partition {}", p.index);
        if has_payload {
            let n = fs.lookup("/payload.txt").unwrap();
            assert_eq!(read_all(fs.as_ref(), n, 14).unwrap(), b"probe payload\n");
        }
    }
}
