//! Every kind of VHDX we create, after random writes at odd offsets, reads back as expected in
//! qemu-img (which also checks its structure), in libvhdi, and in our own reader.

mod support;

use std::path::Path;

use support::{pattern, Model, Rng};
use vdisk_core::{OpenOptions, VirtualDiskMut};
use vdisk_vhdx::{CreateOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn exercise(dir: &Path, name: &str, opts: &CreateOptions, seed: u64) {
    let path = dir.join(format!("{name}.vhdx"));
    let model = Model::new(dir, name, opts.virtual_size);
    let mut disk = Vhdx::create(&path, opts).unwrap();
    let mut rng = Rng(seed);
    let size = opts.virtual_size;
    for i in 0..40 {
        let len = match i % 4 {
            0 => 1 + rng.below(700) as usize,
            1 => 1 + rng.below(3 * MIB) as usize,
            2 => opts.logical_sector_size as usize,
            _ => 1 + rng.below(64 * 1024) as usize,
        };
        let off = rng.below(size - len as u64);
        let data = pattern(len, rng.next());
        disk.write_at(&data, off).unwrap();
        model.write(&data, off);
    }
    // Zeros: a whole-block-spanning range, and a zero write into an unallocated area.
    let zoff = rng.below(size / 2) | 1;
    let zlen = (u64::from(opts.block_size) * 2 + 12345).min(size - zoff);
    disk.write_zeroes(zoff, zlen).unwrap();
    model.write(&vec![0u8; zlen as usize], zoff);
    let z = vec![0u8; 8192];
    disk.write_at(&z, size - 8192).unwrap();
    model.write(&z, size - 8192);
    // Before flush, our own reader already sees everything (pending metadata included).
    support::assert_disk_equals_model(&disk, &model, &format!("{name} before flush"));
    disk.flush().unwrap();
    drop(disk);

    let ro = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    support::assert_disk_equals_model(&ro, &model, &format!("{name} reopened"));
    drop(ro);

    let vhdi = dir.join(format!("{name}.vhdi.raw"));
    support::vhdi_raw(&[&path], &vhdi);
    support::assert_file_equals_model(&vhdi, &model, &format!("{name}: libvhdi"));
    std::fs::remove_file(&vhdi).unwrap();

    // qemu implements VHDX only with 512-byte logical sectors.
    if opts.logical_sector_size == 512 {
        support::qemu_check(&path);
        let raw = dir.join(format!("{name}.qemu.raw"));
        support::qemu_raw(&path, &raw);
        support::assert_file_equals_model(&raw, &model, &format!("{name}: qemu-img"));
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn created_disks_read_back_in_qemu_libvhdi_and_hyperkeep() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 1;
    for fixed in [false, true] {
        for bs_mib in [1u32, 8, 32, 256] {
            for lss in [512u32, 4096] {
                // A few blocks, the last one partial.
                let virtual_size =
                    (u64::from(bs_mib) * MIB * 2 + 5 * MIB + 3 * 4096).min(300 * MIB + 4096 * 3);
                let opts = CreateOptions {
                    virtual_size,
                    block_size: bs_mib << 20,
                    logical_sector_size: lss,
                    physical_sector_size: 4096,
                    fixed,
                };
                let name = format!(
                    "{}-{bs_mib}m-{lss}",
                    if fixed { "fixed" } else { "dynamic" }
                );
                exercise(dir.path(), &name, &opts, seed);
                seed += 7;
            }
        }
    }
}

#[test]
fn zero_writes_do_not_allocate_in_a_dynamic_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.vhdx");
    let opts = CreateOptions {
        virtual_size: 64 * MIB,
        block_size: 1 << 20,
        ..Default::default()
    };
    let mut disk = Vhdx::create(&path, &opts).unwrap();
    disk.write_at(&vec![0u8; 8 * MIB as usize], 3 * MIB)
        .unwrap();
    disk.write_zeroes(0, 64 * MIB).unwrap();
    disk.write_at(&[0u8; 100], 12345).unwrap();
    disk.flush().unwrap();
    let len_before = std::fs::metadata(&path).unwrap().len();
    disk.write_at(&[1u8; 100], 12345).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let len_after = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        len_after,
        len_before + MIB,
        "one block allocated for the one non-zero write"
    );
    support::qemu_check(&path);
}

#[test]
fn bad_create_options_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.vhdx");
    let base = CreateOptions {
        virtual_size: 64 * MIB,
        ..Default::default()
    };
    for (opts, needle) in [
        (
            CreateOptions {
                block_size: 3 << 20,
                ..base.clone()
            },
            "power of two",
        ),
        (
            CreateOptions {
                virtual_size: 64 * MIB + 100,
                ..base.clone()
            },
            "multiple of the logical sector size",
        ),
        (
            CreateOptions {
                virtual_size: (64 << 40) + 4096,
                ..base.clone()
            },
            "64 TiB",
        ),
    ] {
        let e = Vhdx::create(&p, &opts)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    assert!(!p.exists(), "nothing is created for bad options");
}

#[test]
fn dropping_without_flush_leaves_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nf.vhdx");
    let model = Model::new(dir.path(), "nf", 32 * MIB);
    let mut disk = Vhdx::create(
        &path,
        &CreateOptions {
            virtual_size: 32 * MIB,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let data = pattern(5 * MIB as usize + 17, 9);
    disk.write_at(&data, 3 * MIB - 5).unwrap();
    model.write(&data, 3 * MIB - 5);
    drop(disk);
    support::qemu_check(&path);
    let raw = dir.path().join("nf.raw");
    support::qemu_raw(&path, &raw);
    support::assert_file_equals_model(&raw, &model, "after drop without flush");
}

#[test]
fn data_write_guid_changes_before_the_first_write() {
    use vdisk_core::VirtualDisk;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.vhdx");
    let opts = CreateOptions {
        virtual_size: 8 * MIB,
        block_size: 1 << 20,
        ..Default::default()
    };
    drop(Vhdx::create(&path, &opts).unwrap());
    let rw = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let mut disk = Vhdx::open(&path, &rw).unwrap();
    let before = disk.info().identifier;
    // Reading and flushing without writing changes nothing a child depends on.
    disk.flush().unwrap();
    assert_eq!(disk.info().identifier, before);
    disk.write_at(b"x", 0).unwrap();
    let after = disk.info().identifier;
    assert_ne!(
        after, before,
        "DataWriteGuid must change with the first write"
    );
    drop(disk);
    let ro = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(ro.info().identifier, after);
    // A read-only disk refuses writes with a clear error.
    let mut ro = ro;
    let e = ro.write_at(b"y", 0).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
}

#[test]
fn writing_into_files_qemu_made() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    for (sub, zero) in [("dynamic", "on"), ("dynamic", "off"), ("fixed", "off")] {
        let path = dir.path().join(format!("q-{sub}-{zero}.vhdx"));
        let size = 40 * MIB;
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o"])
            .arg(format!(
                "subformat={sub},block_size=8M,block_state_zero={zero}"
            ))
            .arg(&path)
            .arg(size.to_string())
            .status()
            .expect("qemu-img is required (apt-get install qemu-utils)");
        assert!(st.success());
        let st = Command::new("qemu-io")
            .args(["-f", "vhdx", "-c", "write -P 0x5a 1000448 3M"])
            .arg(&path)
            .output()
            .expect("qemu-io is required (apt-get install qemu-utils)");
        assert!(st.status.success());
        let model = Model::new(dir.path(), &format!("q-{sub}-{zero}"), size);
        model.write(&vec![0x5a; 3 * MIB as usize], 1000448);
        let mut disk = Vhdx::open(
            &path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = Rng(5);
        for _ in 0..30 {
            let len = 1 + rng.below(2 * MIB) as usize;
            let off = rng.below(size - len as u64);
            let data = pattern(len, rng.next());
            disk.write_at(&data, off).unwrap();
            model.write(&data, off);
        }
        disk.write_zeroes(8 * MIB, 16 * MIB).unwrap();
        model.write(&vec![0u8; 16 * MIB as usize], 8 * MIB);
        disk.flush().unwrap();
        drop(disk);
        support::qemu_check(&path);
        let raw = dir.path().join("q.raw");
        support::qemu_raw(&path, &raw);
        support::assert_file_equals_model(&raw, &model, &format!("qemu {sub} {zero}"));
        let vhdi = dir.path().join("q.vhdi");
        support::vhdi_raw(&[&path], &vhdi);
        support::assert_file_equals_model(&vhdi, &model, &format!("libvhdi {sub} {zero}"));
    }
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock.vhdx");
    let opts = CreateOptions {
        virtual_size: 8 * MIB,
        block_size: 1 << 20,
        ..Default::default()
    };
    let first = Vhdx::create(&path, &opts).unwrap();
    let rw = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let e = Vhdx::open(&path, &rw)
        .err()
        .expect("second writer")
        .to_string();
    assert!(e.contains("already open for writing"), "{e}");
    // Readers are fine.
    Vhdx::open(&path, &OpenOptions::default()).unwrap();
    drop(first);
    Vhdx::open(&path, &rw).unwrap();
}
