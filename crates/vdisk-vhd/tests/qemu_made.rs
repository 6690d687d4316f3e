//! VHDs made and written by qemu read exactly as `qemu-img convert` reads them.

mod support;

use std::path::Path;

use support::*;
use vdisk_core::{ExtentState, MapScope, OpenOptions, VirtualDisk};
use vdisk_vhd::format::{checksum, Footer};
use vdisk_vhd::Vhd;

const MIB: u64 = 1 << 20;

/// Writes at sector-aligned but not block-aligned offsets, several across 2 MiB block
/// boundaries, one ending at the last sector of the disk.
fn qemu_writes(path: &Path, size: u64) -> Vec<(u64, u64)> {
    let w = vec![
        (3 * 512, 5 * 512),
        (2 * MIB - 1024, 4096),
        (7 * MIB + 9 * 512, 3 * MIB + 512),
        (20 * MIB + 512, 512),
        (size - 1536, 1536),
    ];
    for (i, &(off, len)) in w.iter().enumerate() {
        qemu_write(path, 0x11 * (i as u8 + 1), off, len);
    }
    w
}

fn open(path: &Path) -> Vhd {
    Vhd::open(path, &OpenOptions::default()).unwrap()
}

fn compare_with_qemu(path: &Path) -> Vhd {
    let d = open(path);
    assert_eq!(
        d.geometry().virtual_size,
        qemu_size(path),
        "size as qemu-img info"
    );
    let ours = read_all(&d);
    assert_same(&path.display().to_string(), &ours, &qemu_read(path));
    d
}

#[test]
fn qemu_dynamic_chs_sized() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d.vhd");
    qemu_create(&p, "subformat=dynamic", 50 * MIB);
    let size = qemu_size(&p);
    assert_ne!(size, 50 * MIB, "qemu sizes by CHS without force_size");
    let writes = qemu_writes(&p, size);
    let d = compare_with_qemu(&p);
    assert_eq!(d.footer().creator_app, *b"qemu");
    // Block-granular map: exactly the 2 MiB blocks the writes touched are Data.
    let bs = 2 * MIB;
    let mut touched = std::collections::BTreeSet::new();
    for (off, len) in writes {
        for b in off / bs..=(off + len - 1) / bs {
            touched.insert(b);
        }
    }
    let map = d.map(0, size, MapScope::View).unwrap();
    let mut data_blocks = std::collections::BTreeSet::new();
    for e in &map {
        assert!(matches!(
            e.state,
            ExtentState::Data | ExtentState::Unallocated
        ));
        if e.state == ExtentState::Data {
            assert_eq!(e.offset % bs, 0, "{map:?}");
            for b in e.offset / bs..e.end().div_ceil(bs) {
                data_blocks.insert(b);
            }
        }
    }
    assert_eq!(data_blocks, touched);
    assert_eq!(map.last().unwrap().end(), size);
    assert_eq!(d.map(0, size, MapScope::Layer).unwrap(), map);
    assert!(vdisk_vhd::check(&p).unwrap().is_empty());
}

#[test]
fn qemu_dynamic_force_size() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d.vhd");
    qemu_create(&p, "subformat=dynamic,force_size=on", 50 * MIB);
    assert_eq!(qemu_size(&p), 50 * MIB);
    qemu_writes(&p, 50 * MIB);
    let d = compare_with_qemu(&p);
    assert_eq!(d.geometry().virtual_size, 50 * MIB);
}

#[test]
fn qemu_fixed_both_sizings() {
    for (opts, exact) in [
        ("subformat=fixed", false),
        ("subformat=fixed,force_size=on", true),
    ] {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f.vhd");
        qemu_create(&p, opts, 30 * MIB);
        let size = qemu_size(&p);
        assert_eq!(size == 30 * MIB, exact, "{opts}");
        qemu_writes(&p, size);
        let d = compare_with_qemu(&p);
        assert_eq!(
            d.map(0, size, MapScope::View).unwrap(),
            vec![vdisk_core::Extent {
                offset: 0,
                length: size,
                state: ExtentState::Data
            }]
        );
        assert!(vdisk_vhd::check(&p).unwrap().is_empty());
    }
}

/// Rewrite both footer copies of a dynamic VHD through `edit`, with a valid checksum.
fn patch_footers(path: &Path, edit: impl Fn(&mut [u8])) {
    let mut data = std::fs::read(path).unwrap();
    let n = data.len();
    for at in [0, n - 512] {
        let f = &mut data[at..at + 512];
        edit(f);
        let c = checksum(f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
    }
    std::fs::write(path, data).unwrap();
}

/// qemu sizes files whose creator is "qemu" by CHS even when CurrentSize says otherwise, and
/// everything else by CurrentSize. We follow it, so both always agree on the size and content.
#[test]
fn qemu_creator_size_rule() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d.vhd");
    qemu_create(&p, "subformat=dynamic", 20 * MIB);
    let chs_size = qemu_size(&p);
    qemu_writes(&p, chs_size);
    let f0 = Footer::parse(&std::fs::read(&p).unwrap()[..512]).unwrap();
    assert_eq!(f0.chs_sectors() * 512, chs_size);

    // Creator "qemu", CurrentSize 1 MiB smaller than CHS: the CHS size wins.
    let smaller = chs_size - MIB;
    patch_footers(&p, |f| f[48..56].copy_from_slice(&smaller.to_be_bytes()));
    assert_eq!(qemu_size(&p), chs_size);
    let d = compare_with_qemu(&p);
    assert_eq!(d.geometry().virtual_size, chs_size);
    assert!(d
        .info()
        .details
        .iter()
        .any(|(k, v)| k == "size taken from" && v.contains("CHS")));

    // Same file with creator "win ": CurrentSize wins.
    patch_footers(&p, |f| f[28..32].copy_from_slice(b"win "));
    assert_eq!(qemu_size(&p), smaller);
    let d = compare_with_qemu(&p);
    assert_eq!(d.geometry().virtual_size, smaller);
}

/// In a dynamic (non-differencing) disk a present block is read whole: qemu ignores the sector
/// bitmap there, and so do we, even when a bitmap has clear bits.
#[test]
fn dynamic_bitmap_bits_are_informational() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d.vhd");
    qemu_create(&p, "subformat=dynamic,force_size=on", 8 * MIB);
    qemu_write(&p, 0x5e, 2 * MIB, 2 * MIB);
    let mut data = std::fs::read(&p).unwrap();
    let table = u64::from_be_bytes(data[512 + 16..512 + 24].try_into().unwrap()) as usize;
    let entry = u32::from_be_bytes(data[table + 4..table + 8].try_into().unwrap()) as usize;
    assert_ne!(entry, 0xFFFF_FFFF);
    // Clear the bits of the first 64 sectors of block 1.
    data[entry * 512..entry * 512 + 8].fill(0);
    std::fs::write(&p, &data).unwrap();
    let d = compare_with_qemu(&p);
    let mut b = [0u8; 512];
    d.read_at(&mut b, 2 * MIB).unwrap();
    assert_eq!(b, [0x5e; 512]);
}

/// Our writer on files qemu laid out: qemu reads back what we wrote, and qemu's own later
/// writes land where we expect.
#[test]
fn we_write_into_qemu_files() {
    use vdisk_core::VirtualDiskMut;
    for opts in ["subformat=dynamic", "subformat=fixed"] {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("w.vhd");
        qemu_create(&p, opts, 12 * MIB);
        let size = qemu_size(&p);
        qemu_write(&p, 0x21, MIB, 3 * MIB);
        let mut model = qemu_read(&p);
        {
            let mut d = Vhd::open(
                &p,
                &OpenOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            for (i, (off, len)) in [
                (7, 1000),
                (2 * MIB + 3, 5000),
                (9 * MIB - 100, 2 * MIB),
                (size - 10, 10),
            ]
            .into_iter()
            .enumerate()
            {
                let buf = vec![0x90 + i as u8; len as usize];
                d.write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            d.flush().unwrap();
        }
        assert_same(opts, &qemu_read(&p), &model);
        qemu_write(&p, 0x42, 11 * MIB, 4096);
        model[11 * MIB as usize..11 * MIB as usize + 4096].fill(0x42);
        let d = compare_with_qemu(&p);
        assert_same(opts, &read_all(&d), &model);
        assert!(vdisk_vhd::check(&p).unwrap().is_empty());
    }
}
