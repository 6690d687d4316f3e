//! Differencing chains we write (single-sector writes, so PARTIALLY_PRESENT blocks and
//! sub-byte sector-bitmap patterns occur; sub-sector writes that must keep the parent's bytes;
//! chains three deep) read the same in hyperkeep and in libvhdi (parents attached with
//! set_parent, which checks the linkage).

mod support;

use std::path::PathBuf;

use support::{pattern, Model, Rng};
use vdisk_core::{ExtentState, MapScope, OpenOptions, VirtualDisk, VirtualDiskMut};
use vdisk_vhdx::{CreateOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn write_some(disk: &mut Vhdx, model: &Model, rng: &mut Rng, lss: u64, count: usize) {
    let size = model.size;
    for i in 0..count {
        let len = match i % 5 {
            0 | 1 => lss as usize,                           // one sector
            2 => 1 + rng.below(lss - 1) as usize,            // part of a sector
            3 => (1 + rng.below(6)) as usize * lss as usize, // a few sectors
            _ => 1 + rng.below(MIB + 77) as usize,           // a larger, unaligned run
        };
        let off = if (len as u64).is_multiple_of(lss) {
            rng.below((size - len as u64) / lss) * lss
        } else {
            rng.below(size - len as u64)
        };
        let data = pattern(len, rng.next());
        disk.write_at(&data, off).unwrap();
        model.write(&data, off);
    }
}

#[test]
fn three_deep_chains_read_the_same_in_hyperkeep_and_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    for (lss, bs) in [(512u64, 1u32 << 20), (4096, 2 << 20), (512, 32 << 20)] {
        let size = 40 * MIB + 3 * lss;
        let base = dir.path().join(format!("base-{lss}-{bs}.vhdx"));
        let mut rng = Rng(lss * 1000 + u64::from(bs >> 20));
        let mut model = Model::new(dir.path(), &format!("base-{lss}-{bs}"), size);
        let mut disk = Vhdx::create(
            &base,
            &CreateOptions {
                virtual_size: size,
                block_size: bs,
                logical_sector_size: lss as u32,
                ..Default::default()
            },
        )
        .unwrap();
        write_some(&mut disk, &model, &mut rng, lss, 60);
        disk.flush().unwrap();
        drop(disk);
        let mut chain: Vec<PathBuf> = vec![base];
        for depth in 1..=3 {
            let child = dir.path().join(format!("child{depth}-{lss}-{bs}.avhdx"));
            let mut disk = Vhdx::create_child(chain.last().unwrap(), &child).unwrap();
            assert_eq!(disk.geometry().logical_sector_size, lss as u32);
            // A fresh child shows its parent and holds nothing itself.
            let layer = disk.map(0, size, MapScope::Layer).unwrap();
            assert!(
                layer.iter().all(|e| e.state == ExtentState::Inherited),
                "{layer:?}"
            );
            model = Model::copy_of(&model, dir.path(), &format!("child{depth}-{lss}-{bs}"));
            write_some(&mut disk, &model, &mut rng, lss, 150);
            // Zeros over a whole block must hide the parent's data.
            // (Block 1, or up to the end of the disk where that is shorter.)
            let zlen = u64::from(bs).min(size - u64::from(bs));
            disk.write_zeroes(u64::from(bs), zlen).unwrap();
            model.write(&vec![0u8; zlen as usize], u64::from(bs));
            support::assert_disk_equals_model(&disk, &model, "chain before flush");
            disk.flush().unwrap();
            drop(disk);
            chain.push(child);

            let top = chain.last().unwrap();
            let ro = Vhdx::open(top, &OpenOptions::default()).unwrap();
            support::assert_disk_equals_model(&ro, &model, &format!("hyperkeep, depth {depth}"));
            let layer = ro.map(0, size, MapScope::Layer).unwrap();
            assert!(layer.iter().any(|e| e.state == ExtentState::Inherited));
            assert!(layer.iter().any(|e| e.state == ExtentState::Data));
            drop(ro);

            let refs: Vec<&std::path::Path> = chain.iter().rev().map(|p| p.as_path()).collect();
            let raw = dir.path().join("vhdi.raw");
            support::vhdi_raw(&refs, &raw);
            support::assert_file_equals_model(&raw, &model, &format!("libvhdi, depth {depth}"));
        }
        // The parents were only read: each still matches what libvhdi reads of it alone
        // (checked via its own linkage when the child above was attached).
    }
}

#[test]
fn create_child_refuses_itself_and_keeps_the_parent_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("p.vhdx");
    let mut d = Vhdx::create(
        &base,
        &CreateOptions {
            virtual_size: 16 * MIB,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    d.write_at(b"parent", 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let before = std::fs::read(&base).unwrap();
    assert!(Vhdx::create_child(&base, &base).is_err());
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("c.avhdx");
    let mut c = Vhdx::create_child(&base, &child).unwrap();
    c.write_at(b"CHILD", 3).unwrap();
    c.flush().unwrap();
    drop(c);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the parent must not change"
    );
    // Found again through the relative path after the pair moves.
    let moved = dir.path().join("moved");
    std::fs::create_dir_all(moved.join("sub")).unwrap();
    std::fs::rename(&base, moved.join("p.vhdx")).unwrap();
    std::fs::rename(&child, moved.join("sub/c.avhdx")).unwrap();
    let ro = Vhdx::open(&moved.join("sub/c.avhdx"), &OpenOptions::default()).unwrap();
    let mut b = [0u8; 8];
    ro.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"parCHILD");
}
