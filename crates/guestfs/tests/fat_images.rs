//! FAT12/16/32 images built by mkfs.fat + mtools, read through guestfs and checked against the
//! source tree and Sleuth Kit; hostile FAT images must fail cleanly.

mod guestfs_support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use guestfs::fs::{FileType, FsKind, GuestFs};
use guestfs::volume::Volume;
use guestfs_support::*;

fn mtools_copy(img: &Path, src: &Path) {
    // C.UTF-8 so mtools writes Unicode long names; TZ=UTC so FAT's local time is UTC here.
    let mut cmd = Command::new("mcopy");
    cmd.env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1");
    cmd.arg("-s").arg("-m").arg("-i").arg(img);
    for e in std::fs::read_dir(src).unwrap() {
        cmd.arg(e.unwrap().path());
    }
    cmd.arg("::/");
    run(&mut cmd, "mtools");
}

fn make_fat(
    dir: &Path,
    fat_bits: u32,
    size_mib: u64,
    many: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join(format!("src{fat_bits}"));
    make_tree(&src, many);
    if fat_bits == 12 {
        // FAT12 volumes are small: drop the 3 MiB file.
        std::fs::remove_file(src.join("big.bin")).unwrap();
        std::fs::write(src.join("mid.bin"), pattern(300_000, 9)).unwrap();
        sh(
            &format!(
                "touch -m -d '2021-03-04 05:06:08 UTC' '{}'",
                src.join("mid.bin").display()
            ),
            "coreutils",
        );
    }
    let img = dir.join(format!("fat{fat_bits}.img"));
    run(
        Command::new("truncate")
            .arg("-s")
            .arg(format!("{size_mib}M"))
            .arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkfs.fat")
            .args(["-F", &fat_bits.to_string(), "-n", &format!("VOL{fat_bits}")])
            .arg(&img),
        "dosfstools",
    );
    mtools_copy(&img, &src);
    (src, img)
}

fn check_against_source(fs: &dyn GuestFs, src: &Path) {
    let guest = walk(fs).unwrap();
    let host = host_tree(src);
    let gk: Vec<_> = guest.keys().collect();
    let hk: Vec<_> = host.keys().collect();
    assert_same_paths(&gk, &hk, "guest vs source");
    for (p, (is_dir, data, mtime)) in &host {
        let g = &guest[p];
        assert_eq!(g.meta.file_type == FileType::Directory, *is_dir, "{p}");
        if let Some(d) = data {
            assert_eq!(g.meta.size, d.len() as u64, "{p}: size");
            assert!(g.data.as_ref().unwrap() == d, "{p}: content differs");
            // mcopy -m keeps the mtime; FAT has 2 s resolution (our times are even).
            assert_eq!(g.meta.mtime, Some(*mtime), "{p}: mtime");
        }
    }
}

fn check_against_tsk(fs: &dyn GuestFs, img: &Path, offset_sectors: u64) {
    let guest = walk(fs).unwrap();
    let tsk = tsk_list(img, offset_sectors, "fat");
    let gk: Vec<_> = guest.keys().collect();
    let tk: Vec<_> = tsk.keys().collect();
    assert_same_paths(&gk, &tk, "guest vs fls");
    // icat costs ~40 ms a call: every file outside many/, and every 97th inside it.
    for (i, (p, inode)) in tsk.iter().enumerate() {
        if p.starts_with("/many/") && i % 97 != 0 {
            continue;
        }
        if let Some(d) = &guest[p].data {
            assert!(
                tsk_cat(img, offset_sectors, "fat", inode) == *d,
                "{p}: icat differs"
            );
        }
    }
}

#[test]
fn fat12_fat16_fat32_match_source_and_sleuthkit() {
    let tmp = tempfile::tempdir().unwrap();
    for (bits, size, many, kind) in [
        (12u32, 2u64, 40usize, FsKind::Fat12),
        (16, 32, 600, FsKind::Fat16),
        (32, 64, 1000, FsKind::Fat32),
    ] {
        let (src, img) = make_fat(tmp.path(), bits, size, many);
        let disk = open_raw(&img);
        let table = guestfs::partitions(disk.as_ref()).unwrap();
        assert_eq!(
            table.kind,
            guestfs::TableKind::None,
            "bare FAT{bits} volume"
        );
        let fs = guestfs::open_fs(table.partitions[0].volume(disk.clone()).unwrap()).unwrap();
        assert_eq!(fs.kind(), kind);
        assert_eq!(fs.label().as_deref(), Some(format!("VOL{bits}").as_str()));
        check_against_source(fs.as_ref(), &src);
        check_against_tsk(fs.as_ref(), &img, 0);
        // Lookups are case-insensitive, as on Windows.
        let n = fs.lookup("/DOCS/deep/DEEPER/Leaf.TXT").unwrap();
        assert_eq!(fs.metadata(n).unwrap().size, 70_000);
        assert!(matches!(
            fs.lookup("/nope"),
            Err(guestfs::Error::NotFound(_))
        ));
        let n = fs
            .lookup("\\DOCS\\ÜBERLÄNGE DATEINAME MIT VIELEN ZEICHEN.TXT")
            .unwrap();
        assert_eq!(fs.metadata(n).unwrap().size, 7);
    }
}

/// A FAT12 image as bytes with one file whose entry and FAT we then damage.
fn small_fat12(tmp: &Path) -> Vec<u8> {
    let src = tmp.join("hsrc");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("FILE.BIN"), pattern(5000, 7)).unwrap();
    std::fs::write(src.join("sub/INNER.TXT"), b"inner").unwrap();
    let img = tmp.join("h.img");
    run(
        Command::new("truncate").args(["-s", "1M"]).arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkfs.fat")
            .args(["-F", "12", "-s", "1"])
            .arg(&img),
        "dosfstools",
    );
    mtools_copy(&img, &src);
    std::fs::read(&img).unwrap()
}

fn fat12_layout(img: &[u8]) -> (usize, usize, usize) {
    let bps = u16::from_le_bytes([img[11], img[12]]) as usize;
    let reserved = u16::from_le_bytes([img[14], img[15]]) as usize;
    let fat_sectors = u16::from_le_bytes([img[22], img[23]]) as usize;
    let fat = reserved * bps;
    let root = (reserved + 2 * fat_sectors) * bps;
    (bps, fat, root)
}

fn find_entry(img: &[u8], root: usize, name: &[u8; 11]) -> usize {
    (0..512)
        .map(|i| root + i * 32)
        .find(|&o| &img[o..o + 11] == name)
        .expect("entry")
}

fn set_fat12(img: &mut [u8], fat: usize, n: usize, v: u16) {
    let o = fat + n + n / 2;
    let cur = u16::from_le_bytes([img[o], img[o + 1]]);
    let new = if n & 1 == 1 {
        (cur & 0x000F) | (v << 4)
    } else {
        (cur & 0xF000) | (v & 0xFFF)
    };
    img[o..o + 2].copy_from_slice(&new.to_le_bytes());
}

fn open_mem(img: Vec<u8>) -> Box<dyn GuestFs> {
    guestfs::open_fs(Volume::from_bytes(img)).unwrap()
}

#[test]
fn hostile_fat_chains_sizes_and_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_fat12(tmp.path());
    let (_bps, fat, root) = fat12_layout(&base);
    let file = find_entry(&base, root, b"FILE    BIN");
    let first = u16::from_le_bytes([base[file + 26], base[file + 27]]) as usize;

    // Sanity: the undamaged image reads back.
    let fs = open_mem(base.clone());
    let n = fs.lookup("/FILE.BIN").unwrap();
    assert_eq!(read_all(fs.as_ref(), n, 5000).unwrap(), pattern(5000, 7));

    // A chain that loops back to its first cluster.
    let mut img = base.clone();
    set_fat12(&mut img, fat, first + 2, first as u16);
    let fs = open_mem(img);
    let n = fs.lookup("/FILE.BIN").unwrap();
    let err = read_all(fs.as_ref(), n, 5000).unwrap_err();
    assert!(err.to_string().contains("loops back"), "{err}");

    // A chain that leaves the volume.
    let mut img = base.clone();
    set_fat12(&mut img, fat, first, 0xFF0);
    let fs = open_mem(img);
    let err = read_all(fs.as_ref(), fs.lookup("/FILE.BIN").unwrap(), 5000).unwrap_err();
    assert!(err.to_string().contains("outside the volume"), "{err}");

    // An absurd size: the chain ends long before; reads error, never return invented bytes.
    let mut img = base.clone();
    img[file + 28..file + 32].copy_from_slice(&u32::MAX.to_le_bytes());
    let fs = open_mem(img);
    let n = fs.lookup("/FILE.BIN").unwrap();
    assert_eq!(fs.metadata(n).unwrap().size, u32::MAX as u64);
    let mut buf = vec![0u8; 4096];
    assert_eq!(fs.read_at(n, None, &mut buf, 0).unwrap(), 4096);
    assert_eq!(buf, pattern(5000, 7)[..4096]);
    let err = fs.read_at(n, None, &mut buf, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("clusters end"), "{err}");

    // A subdirectory entry pointing at its own parent's cluster (a loop): the walker's
    // dir_key check ends the recursion.
    let mut img = base.clone();
    let sub = find_entry(&img, root, b"SUB        ");
    let sub_cluster = u16::from_le_bytes([img[sub + 26], img[sub + 27]]) as usize;
    let (bps, _, _) = fat12_layout(&img);
    let data = root + 512 * 32;
    let sub_dir = data + (sub_cluster - 2) * bps;
    // Turn sub/INNER.TXT into a directory whose cluster is sub's own.
    let inner = (0..16)
        .map(|i| sub_dir + i * 32)
        .find(|&o| &img[o..o + 11] == b"INNER   TXT")
        .unwrap();
    img[inner + 11] = 0x10;
    img[inner + 26..inner + 28].copy_from_slice(&(sub_cluster as u16).to_le_bytes());
    let fs = open_mem(img);
    let tree = walk(fs.as_ref()).unwrap();
    assert!(tree.contains_key("/sub/INNER.TXT"));
    assert!(!tree.contains_key("/sub/INNER.TXT/INNER.TXT"));
    // The library walker reports the loop and does not enter it.
    let mut seen = Vec::new();
    guestfs::fs::walk(fs.as_ref(), fs.root(), &mut |w| {
        seen.push((w.path.clone(), w.is_loop));
        Ok(true)
    })
    .unwrap();
    assert!(
        seen.contains(&("sub/INNER.TXT".to_string(), true)),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|(p, _)| p.starts_with("sub/INNER.TXT/")),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|(_, l)| *l).count(), 1);
    let a = fs.lookup("/sub").unwrap();
    let b = fs.lookup("/sub/INNER.TXT").unwrap();
    assert_eq!(fs.dir_key(a).unwrap(), fs.dir_key(b).unwrap());

    // Crafted names come back as stored (the restore layer sanitises them), never panic.
    let mut img = base.clone();
    let names: [&[u8; 11]; 4] = [
        b"CON        ",
        b"C:         ",
        b"A/B        ",
        b"X\0Y       \0",
    ];
    let free = (0..512)
        .map(|i| root + i * 32)
        .find(|&o| base[o] == 0)
        .unwrap();
    for (i, nm) in names.iter().enumerate() {
        let o = free + i * 32;
        img[o..o + 32].copy_from_slice(&base[file..file + 32]);
        img[o..o + 11].copy_from_slice(*nm);
    }
    let fs = open_mem(img);
    let listed: Vec<String> = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    for want in ["CON", "C:", "A/B"] {
        assert!(listed.iter().any(|n| n == want), "{want} in {listed:?}");
    }

    // Garbage everywhere after the boot sector: errors, no panic.
    for seed in 0..40u64 {
        let mut img = base.clone();
        let noise = pattern(img.len() - 512, seed);
        for (i, b) in noise.iter().enumerate() {
            if i % (3 + seed as usize % 7) == 0 {
                img[512 + i] = *b;
            }
        }
        if let Ok(fs) = guestfs::open_fs(Volume::from_bytes(img)) {
            let _ = walk_hostile(fs.as_ref());
        }
    }
    let _ = Arc::new(0);
}
