//! VHDs we create and write read identically in qemu-img and in libvhdi, and as our model says.

mod support;

use rand::{Rng, SeedableRng};
use support::*;
use vdisk_core::{ExtentState, MapScope, OpenOptions, VirtualDisk, VirtualDiskMut};
use vdisk_vhd::{CreateOptions, Vhd};

const MIB: u64 = 1 << 20;

/// Random writes of random sizes at random (mostly unaligned) offsets, plus a few at the edges
/// and some zero writes, applied to both the disk and a plain byte vector.
fn random_writes(d: &mut Vhd, model: &mut [u8], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    for i in 0..60u32 {
        let len = match i % 4 {
            0 => rng.gen_range(1..600),
            1 => rng.gen_range(1..8) * 512,
            2 => rng.gen_range(1..3 * MIB),
            _ => rng.gen_range(1..70_000),
        };
        let len = len.min(size);
        let off = if i % 3 == 0 {
            rng.gen_range(0..=(size - len) / 512) * 512
        } else {
            rng.gen_range(0..=size - len)
        };
        let mut buf = vec![0u8; len as usize];
        if i % 7 != 0 {
            rng.fill(&mut buf[..]);
        }
        d.write_at(&buf, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    for (off, len) in [(0, 512), (size - 700, 700)] {
        let buf = vec![0xA5u8; len];
        d.write_at(&buf, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    }
}

fn exercise(opts: CreateOptions, seed: u64) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("x.vhd");
    let size = opts.virtual_size;
    let mut model = vec![0u8; size as usize];
    {
        let mut d = Vhd::create(&p, &opts).unwrap();
        assert_eq!(d.geometry().virtual_size, size);
        random_writes(&mut d, &mut model, seed);
        assert_same("ours, still open", &read_all(&d), &model);
        d.flush().unwrap();
    }
    let d = Vhd::open(&p, &OpenOptions::default()).unwrap();
    let what = format!("{opts:?}");
    assert_same(&format!("ours {what}"), &read_all(&d), &model);
    assert_eq!(qemu_size(&p), size, "qemu sees CurrentSize ({what})");
    assert_same(&format!("qemu-img {what}"), &qemu_read(&p), &model);
    assert_same(&format!("libvhdi {what}"), &libvhdi_read(&[&p]), &model);
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    // The map never calls a range with data unallocated.
    for e in d.map(0, size, MapScope::View).unwrap() {
        if e.state != ExtentState::Data {
            assert!(vdisk_core::io::is_zero(
                &model[e.offset as usize..e.end() as usize]
            ));
        }
    }
}

#[test]
fn fixed_random_writes() {
    exercise(
        CreateOptions {
            virtual_size: 24 * MIB + 512 * 5,
            fixed: true,
            ..Default::default()
        },
        1,
    );
}

#[test]
fn dynamic_random_writes_block_sizes() {
    for (i, bs) in [512 * 1024u32, 2 << 20, 4 << 20].into_iter().enumerate() {
        exercise(
            CreateOptions {
                virtual_size: 40 * MIB + 512 * 3,
                block_size: bs,
                fixed: false,
            },
            10 + i as u64,
        );
    }
}

#[test]
fn zero_writes_do_not_allocate_in_dynamic_disks() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("z.vhd");
    let mut d = Vhd::create(
        &p,
        &CreateOptions {
            virtual_size: 16 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let before = std::fs::metadata(&p).unwrap().len();
    d.write_at(&vec![0u8; 2 * MIB as usize], 2 * MIB).unwrap();
    d.write_zeroes(0, 16 * MIB).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), before);
    assert_eq!(d.info().allocated_bytes, 0);
    d.write_at(&[1u8; 512], 4 * MIB + 512).unwrap();
    let after = std::fs::metadata(&p).unwrap().len();
    assert_eq!(after, before + 512 + 2 * MIB, "one block with its bitmap");
    assert_eq!(
        d.map(0, 16 * MIB, MapScope::View).unwrap(),
        vec![
            vdisk_core::Extent {
                offset: 0,
                length: 4 * MIB,
                state: ExtentState::Unallocated
            },
            vdisk_core::Extent {
                offset: 4 * MIB,
                length: 2 * MIB,
                state: ExtentState::Data
            },
            vdisk_core::Extent {
                offset: 6 * MIB,
                length: 10 * MIB,
                state: ExtentState::Unallocated
            },
        ]
    );
    let info = d.info();
    assert_eq!(info.allocated_bytes, 2 * MIB);
    assert_eq!(info.block_size, Some(2 << 20));
    assert_eq!(info.identifier, Some(d.unique_id().to_string()));
}

#[test]
fn create_validates_arguments() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("bad.vhd");
    for (size, bs) in [
        (1000, 2 << 20),
        (0, 2 << 20),
        (2041 << 30, 2 << 20),
        (MIB, 3 << 20),
    ] {
        let e = Vhd::create(
            &p,
            &CreateOptions {
                virtual_size: size,
                block_size: bs,
                fixed: false,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("must be"), "{e}");
    }
    // Read-only opens refuse writes.
    Vhd::create(
        &p,
        &CreateOptions {
            virtual_size: MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let mut d = Vhd::open(&p, &OpenOptions::default()).unwrap();
    let e = d.write_at(&[1], 0).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    let e = d.read_at(&mut [0u8; 2], MIB - 1).unwrap_err().to_string();
    assert!(e.contains("outside the disk"), "{e}");
}
