//! Every kind of VHDX qemu-img makes reads byte-identical to `qemu-img convert -O raw`, and the
//! allocation map agrees with what was written.

mod read_util;

use std::path::Path;

use read_util::*;
use tempfile::TempDir;
use vdisk_core::{ExtentState, MapScope, OpenOptions, Subformat, VirtualDisk};
use vdisk_vhdx::Vhdx;

/// Writes at odd (sector- but not block-aligned) offsets, across block boundaries, a zero write
/// inside written data, a whole-block write then zero write, and the last sector of a partial
/// last block. Returns the qemu-io commands and the blocks that must end up holding data.
fn pattern(bs: u64, vs: u64) -> (Vec<String>, Vec<u64>) {
    let l = bs.min(8 * MIB);
    let w = |p: u8, off: u64, len: u64| format!("write -P {p:#x} {off} {len}");
    let z = |off: u64, len: u64| format!("write -z {off} {len}");
    let cmds = vec![
        w(0x11, 1536, 13824),
        w(0x22, bs - 1536, 8192),
        w(0x33, 2 * bs - l / 2 + 512, l),
        z(2 * bs - 4096, 8192),
        w(0x44, 3 * bs, l),
        z(3 * bs, bs),
        w(0x55, vs - 4096, 4096),
    ];
    // Block 3 was written and then zeroed whole: qemu may keep it allocated (zeros) or mark it
    // ZERO, so it is not in the list either way.
    (cmds, vec![0, 1, 2, vs / bs])
}

fn check_file(dir: &Path, subformat: &str, bs: u64, zero: bool) {
    let vs = 4 * bs + bs / 2;
    let name = format!(
        "{subformat}-{}M-{}.vhdx",
        bs / MIB,
        if zero { "z" } else { "nz" }
    );
    let path = dir.join(&name);
    let raw = dir.join(format!("{name}.raw"));
    qemu_create(
        &path,
        vs,
        &format!(
            "subformat={subformat},block_size={bs},block_state_zero={}",
            if zero { "on" } else { "off" }
        ),
    );
    let (cmds, data_blocks) = pattern(bs, vs);
    qemu_io(&path, &cmds);
    qemu_to_raw(&path, &raw);

    let disk = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    let info = disk.info();
    assert_eq!(info.virtual_size, vs);
    assert_eq!(info.block_size, Some(bs as u32));
    assert_eq!(info.logical_sector_size, 512);
    assert_eq!(
        info.subformat,
        if subformat == "fixed" {
            Subformat::Fixed
        } else {
            Subformat::Dynamic
        },
        "{name}"
    );
    assert!(info.details.contains(&("log".into(), "clean".into())));
    assert_same_as_raw(&disk, &raw);
    for scope in [MapScope::View, MapScope::Layer] {
        assert_map_covers_data(&disk, &raw, scope);
    }
    let map = disk.map(0, vs, MapScope::View).unwrap();
    assert_eq!(map, disk.map(0, vs, MapScope::Layer).unwrap());
    let state_at = |off: u64| {
        map.iter()
            .find(|e| e.offset <= off && off < e.end())
            .unwrap()
            .state
    };
    let blocks = vs.div_ceil(bs);
    for b in 0..blocks {
        let s = state_at(b * bs);
        if subformat == "fixed" {
            assert_eq!(s, ExtentState::Data, "{name}: fixed block {b}");
        } else if data_blocks.contains(&b) {
            assert_eq!(s, ExtentState::Data, "{name}: written block {b}");
        } else if b != 3 {
            assert_ne!(s, ExtentState::Data, "{name}: never-written block {b}");
        }
    }
    // qemu's own map: never claim Data for a whole block qemu reports as not data.
    for (start, len, data, _zero) in qemu_map(&path) {
        if data {
            continue;
        }
        let first = start.div_ceil(bs);
        let end = (start + len) / bs;
        for b in first..end {
            assert_ne!(state_at(b * bs), ExtentState::Data, "{name}: block {b}");
        }
    }
    let allocated = info.allocated_bytes;
    if subformat == "fixed" {
        assert_eq!(allocated, vs);
    } else {
        let expect_min: u64 = data_blocks.iter().map(|&b| bs.min(vs - b * bs)).sum();
        assert!(
            allocated >= expect_min && allocated <= expect_min + bs,
            "{name}: allocated {allocated}, written blocks hold {expect_min}"
        );
    }
    std::fs::remove_file(&raw).unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn qemu_dynamic_files_read_like_qemu() {
    let dir = TempDir::new().unwrap();
    for bs in [1, 8, 32, 256] {
        for zero in [true, false] {
            check_file(dir.path(), "dynamic", bs * MIB, zero);
        }
    }
}

#[test]
fn qemu_fixed_files_read_like_qemu() {
    let dir = TempDir::new().unwrap();
    for bs in [1, 8, 32, 256] {
        for zero in [true, false] {
            check_file(dir.path(), "fixed", bs * MIB, zero);
        }
    }
}

/// qemu cannot make 4096-byte-sector VHDX files. The metadata region has no checksum, so we
/// change the logical sector size item of a qemu file; with fewer blocks than a chunk the BAT
/// layout is the same, so the content must still equal qemu's reading of the original.
#[test]
fn logical_sector_4096() {
    let dir = TempDir::new().unwrap();
    for bs in [1, 32] {
        let bs = bs * MIB;
        let vs = 4 * bs + bs / 2;
        let path = dir.path().join("s.vhdx");
        let raw = dir.path().join("s.raw");
        let _ = std::fs::remove_file(&path);
        qemu_create(&path, vs, &format!("block_size={bs},block_state_zero=off"));
        qemu_io(&path, &pattern(bs, vs).0);
        qemu_to_raw(&path, &raw);
        let mut b = read_file(&path);
        let (_, lss) = metadata_item(&b, LSS_GUID).unwrap();
        assert_eq!(u32_at(&b, lss as usize), 512);
        b[lss as usize..lss as usize + 4].copy_from_slice(&4096u32.to_le_bytes());
        write_file(&path, &b);
        let disk = Vhdx::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(disk.geometry().logical_sector_size, 4096);
        assert_same_as_raw(&disk, &raw);
        assert_map_covers_data(&disk, &raw, MapScope::View);
    }
}

#[test]
fn open_backing_and_is_vhdx() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("m.vhdx");
    let raw = dir.path().join("m.raw");
    qemu_create(&path, 20 * MIB, "block_size=1M");
    qemu_io(&path, &pattern(MIB, 20 * MIB).0);
    qemu_to_raw(&path, &raw);
    let bytes = read_file(&path);
    assert!(vdisk_vhdx::is_vhdx(&bytes[..8]));
    assert!(!vdisk_vhdx::is_vhdx(b"conectix"));
    assert!(!vdisk_vhdx::is_vhdx(b"vhdx"));
    let disk = Vhdx::open_backing(std::sync::Arc::new(bytes)).unwrap();
    assert_same_as_raw(&disk, &raw);
    assert!(vdisk_vhdx::check(&path).unwrap().is_empty());
}

/// One open disk serves many reader threads at once (reads take `&self`).
#[test]
fn parallel_readers() {
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("p.vhdx");
    let raw = dir.path().join("p.raw");
    let vs = 40 * MIB;
    qemu_create(&path, vs, "block_size=1M");
    qemu_io(&path, &pattern(MIB, vs).0);
    qemu_io(&path, &["write -P 0x99 7340544 9437184".to_string()]);
    qemu_to_raw(&path, &raw);
    let disk = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    let rawf = std::fs::File::open(&raw).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (disk, rawf) = (&disk, &rawf);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..200 {
                    let len = rng.gen_range(1..3 * MIB as usize);
                    let off = rng.gen_range(0..vs - len as u64);
                    let mut a = vec![0u8; len];
                    let mut b = vec![0u8; len];
                    disk.read_at(&mut a, off).unwrap();
                    rawf.read_exact_at(&mut b, off).unwrap();
                    assert!(a == b, "thread {t}: {len} bytes at {off}");
                }
            });
        }
    });
}
