//! exFAT images built by mkfs.exfat and filled through exfat-fuse on a loop device, read through
//! guestfs and checked against the source tree and Sleuth Kit; crafted damage must fail cleanly.

mod guestfs_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use guestfs::fs::{FileType, FsKind, GuestFs};
use guestfs::volume::Volume;
use guestfs_support::*;

/// Loop device + FUSE mount, undone on drop (also when an assertion fails).
struct Mounted {
    dev: String,
    mnt: PathBuf,
}

impl Mounted {
    fn new(img: &Path, mnt: &Path) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let dev = run(
            Command::new("losetup").args(["-f", "--show"]).arg(img),
            "mount",
        )
        .trim()
        .to_string();
        let m = Mounted {
            dev,
            mnt: mnt.to_path_buf(),
        };
        run(
            Command::new("mount.exfat-fuse").arg(&m.dev).arg(mnt),
            "exfat-fuse",
        );
        m
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn make_exfat(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    make_tree(&src, 700);
    let img = dir.join("exfat.img");
    run(
        Command::new("truncate").args(["-s", "64M"]).arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkfs.exfat").args(["-L", "EXVOL"]).arg(&img),
        "exfatprogs",
    );
    {
        let m = Mounted::new(&img, &dir.join("mnt"));
        sh(
            &format!(
                "cp -r --preserve=timestamps '{}'/. '{}'/ && sync",
                src.display(),
                m.mnt.display()
            ),
            "coreutils",
        );
    }
    (src, img)
}

#[test]
fn exfat_matches_source_and_sleuthkit_and_survives_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, img) = make_exfat(tmp.path());
    let disk = open_raw(&img);
    let table = guestfs::partitions(disk.as_ref()).unwrap();
    assert_eq!(table.kind, guestfs::TableKind::None);
    let fs = guestfs::open_fs(table.partitions[0].volume(disk.clone()).unwrap()).unwrap();
    assert_eq!(fs.kind(), FsKind::Exfat);
    assert_eq!(fs.label().as_deref(), Some("EXVOL"));

    // Against the source tree.
    let guest = walk(fs.as_ref()).unwrap();
    let host = host_tree(&src);
    assert_same_paths(
        &guest.keys().collect::<Vec<_>>(),
        &host.keys().collect::<Vec<_>>(),
        "guest vs source",
    );
    for (p, (is_dir, data, mtime)) in &host {
        let g = &guest[p];
        assert_eq!(g.meta.file_type == FileType::Directory, *is_dir, "{p}");
        if let Some(d) = data {
            assert!(g.data.as_ref().unwrap() == d, "{p}: content");
            assert_eq!(g.meta.mtime, Some(*mtime), "{p}: mtime");
        }
    }
    // Against Sleuth Kit.
    let tsk = tsk_list(&img, 0, "exfat");
    assert_same_paths(
        &guest.keys().collect::<Vec<_>>(),
        &tsk.keys().collect::<Vec<_>>(),
        "guest vs fls",
    );
    for (i, (p, inode)) in tsk.iter().enumerate() {
        if p.starts_with("/many/") && i % 97 != 0 {
            continue;
        }
        if let Some(d) = &guest[p].data {
            assert!(tsk_cat(&img, 0, "exfat", inode) == *d, "{p}: icat differs");
        }
    }
    // Case-insensitive lookup through the up-case table (non-ASCII too).
    let n = fs
        .lookup("/DOCS/ÜBERLÄNGE DATEINAME MIT VIELEN ZEICHEN.TXT")
        .unwrap();
    assert_eq!(fs.metadata(n).unwrap().size, 7);

    let bytes = std::fs::read(&img).unwrap();
    check_damage(&bytes, fs.as_ref());
}

/// Find the 0x85 entry of `name` (ASCII) in the raw image.
fn find_set(img: &[u8], name: &str) -> usize {
    let units: Vec<u8> = name.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let mut o = 0;
    while o + 96 <= img.len() {
        if img[o] == 0x85
            && img[o + 32] == 0xC0
            && img[o + 64] == 0xC1
            && img[o + 35] as usize == name.len()
            && img[o + 66..o + 66 + units.len().min(30)] == units[..units.len().min(30)]
        {
            return o;
        }
        o += 32;
    }
    panic!("entry set of {name} not found");
}

fn fix_checksum(img: &mut [u8], at: usize) {
    let n = (img[at + 1] as usize + 1) * 32;
    let mut c = 0u16;
    for (i, &b) in img[at..at + n].iter().enumerate() {
        if i == 2 || i == 3 {
            continue;
        }
        c = c.rotate_right(1).wrapping_add(b as u16);
    }
    img[at + 2..at + 4].copy_from_slice(&c.to_le_bytes());
}

fn check_damage(base: &[u8], good: &dyn GuestFs) {
    let set = find_set(base, "hello.txt");

    // ValidDataLength shorter than DataLength: the tail reads as zeros.
    let mut img = base.to_vec();
    img[set + 32 + 8..set + 32 + 16].copy_from_slice(&5u64.to_le_bytes());
    fix_checksum(&mut img, set);
    let fs = guestfs::open_fs(Volume::from_bytes(img)).unwrap();
    let n = fs.lookup("/hello.txt").unwrap();
    let data = read_all(fs.as_ref(), n, 13).unwrap();
    assert_eq!(&data, b"hello\0\0\0\0\0\0\0\0");

    // A broken set checksum is reported, not papered over.
    let mut img = base.to_vec();
    img[set + 66] ^= 1;
    let fs = guestfs::open_fs(Volume::from_bytes(img)).unwrap();
    let err = fs.read_dir(fs.root()).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");

    // An absurd size with a NoFatChain extent running off the volume.
    let mut img = base.to_vec();
    img[set + 33] |= 0x02;
    img[set + 32 + 8..set + 32 + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    img[set + 32 + 24..set + 32 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fix_checksum(&mut img, set);
    let fs = guestfs::open_fs(Volume::from_bytes(img)).unwrap();
    let n = fs.lookup("/hello.txt").unwrap();
    let mut buf = [0u8; 16];
    let err = fs.read_at(n, None, &mut buf, 0).unwrap_err();
    assert!(err.to_string().contains("leaves the volume"), "{err}");

    // A directory whose first cluster is the root's: a loop the walker sees through dir_key.
    let docs = find_set(base, "docs");
    let root_cluster = u32::from_le_bytes(base[96..100].try_into().unwrap());
    let mut img = base.to_vec();
    img[docs + 32 + 20..docs + 32 + 24].copy_from_slice(&root_cluster.to_le_bytes());
    img[docs + 33] &= !0x02; // follow the FAT chain like the root
    fix_checksum(&mut img, docs);
    let fs = guestfs::open_fs(Volume::from_bytes(img)).unwrap();
    let d = fs.lookup("/docs").unwrap();
    assert_eq!(fs.dir_key(d).unwrap(), fs.dir_key(fs.root()).unwrap());
    walk(fs.as_ref()).unwrap();

    // Boot region checksum damage: the backup boot region is used.
    let mut img = base.to_vec();
    img[100] ^= 0xFF; // volume serial number, covered by the checksum
    let fs = guestfs::open_fs(Volume::from_bytes(img.clone())).unwrap();
    assert_eq!(fs.label(), good.label());
    // ...and with the backup damaged too, a clear error.
    img[12 * 512 + 100] ^= 0xFF;
    let err = guestfs::open_fs(Volume::from_bytes(img)).err().unwrap();
    assert!(err.to_string().contains("boot region checksum"), "{err}");

    // big.bin is contiguous on this fresh volume. Read it both ways: as a NoFatChain extent
    // with its FAT entries wiped, and as a FAT chain with the NoFatChain flag cleared.
    let big = find_set(base, "big.bin");
    let bps = 1usize << base[108];
    let fat = u32::from_le_bytes(base[80..84].try_into().unwrap()) as usize * bps;
    let first = u32::from_le_bytes(base[big + 52..big + 56].try_into().unwrap()) as usize;
    let clusters = (3usize << 20).div_ceil(bps << base[109]);
    let set_fat = |img: &mut Vec<u8>, c: usize, v: u32| {
        img[fat + c * 4..fat + c * 4 + 4].copy_from_slice(&v.to_le_bytes())
    };
    let mut no_chain = base.to_vec();
    let mut chained = base.to_vec();
    for k in 0..clusters {
        set_fat(&mut no_chain, first + k, 0);
        let next = if k + 1 == clusters {
            u32::MAX
        } else {
            (first + k + 1) as u32
        };
        set_fat(&mut chained, first + k, next);
    }
    no_chain[big + 33] |= 0x02;
    fix_checksum(&mut no_chain, big);
    chained[big + 33] &= !0x02;
    fix_checksum(&mut chained, big);
    for img in [no_chain, chained.clone()] {
        let fs = guestfs::open_fs(Volume::from_bytes(img)).unwrap();
        let n = fs.lookup("/big.bin").unwrap();
        assert_eq!(
            read_all(fs.as_ref(), n, 3 << 20).unwrap(),
            pattern(3 << 20, 1)
        );
    }
    // The FAT chain looping back (second cluster -> first): an error, not repeated bytes.
    let mut looped = chained;
    set_fat(&mut looped, first + 1, first as u32);
    let fs = guestfs::open_fs(Volume::from_bytes(looped)).unwrap();
    let n = fs.lookup("/big.bin").unwrap();
    let err = read_all(fs.as_ref(), n, 3 << 20).unwrap_err();
    assert!(err.to_string().contains("loops back"), "{err}");

    // Noise: errors, no panic, no hang.
    for seed in 0..30u64 {
        let mut img = base[..8 << 20].to_vec();
        let noise = pattern(img.len() - 4096, seed);
        for (i, b) in noise.iter().enumerate() {
            if i % (5 + seed as usize) == 0 {
                img[4096 + i] = *b;
            }
        }
        if let Ok(fs) = guestfs::open_fs(Volume::from_bytes(img)) {
            let _ = walk_hostile(fs.as_ref());
        }
    }
}
