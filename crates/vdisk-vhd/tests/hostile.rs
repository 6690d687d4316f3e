//! Damaged copies of real files: each gives a clear error (or, where the format allows
//! recovery, the right data), never a panic, and memory stays bounded.

mod support;

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use support::*;
use vdisk_core::{MapScope, OpenOptions, VirtualDisk, VirtualDiskMut};
use vdisk_vhd::format::checksum;
use vdisk_vhd::{CreateOptions, Vhd};

const MIB: u64 = 1 << 20;

/// A real dynamic VHD made and written by qemu, and its content.
fn qemu_dynamic(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let p = dir.join("q.vhd");
    qemu_create(&p, "subformat=dynamic,force_size=on", 8 * MIB);
    qemu_write(&p, 0x3c, 512 * 3, 3 * MIB);
    qemu_write(&p, 0x4d, 6 * MIB + 512, 4096);
    let content = qemu_read(&p);
    (std::fs::read(&p).unwrap(), content)
}

fn be32_put(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64_put(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn fix_footer(d: &mut [u8], at: usize) {
    let c = checksum(&d[at..at + 512], 64);
    be32_put(d, at + 64, c);
}
fn fix_header(d: &mut [u8]) {
    let c = checksum(&d[512..1536], 36);
    be32_put(d, 512 + 36, c);
}

/// Open from memory and from a file; both must fail with all `words` in the message, and
/// `check` must report a problem instead of failing.
fn expect_err(dir: &Path, data: &[u8], words: &[&str]) {
    let e = Vhd::open_backing(Arc::new(data.to_vec()))
        .err()
        .expect("damaged file must not open")
        .to_string();
    for w in words {
        assert!(e.contains(w), "error {e:?} lacks {w:?}");
    }
    let p = dir.join("damaged.vhd");
    std::fs::write(&p, data).unwrap();
    let e = Vhd::open(&p, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("damaged.vhd"), "error names the file: {e}");
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(!problems.is_empty(), "check must report {words:?}");
}

#[test]
fn damaged_footers() {
    let t = tempfile::tempdir().unwrap();
    let (good, content) = qemu_dynamic(t.path());
    let n = good.len();

    // Trailing footer damaged, copy at 0 good: recovered, reported by check, repaired by the
    // next block allocation.
    let mut d = good.clone();
    d[n - 512 + 100] ^= 0xff;
    let v = Vhd::open_backing(Arc::new(d.clone())).unwrap();
    assert_same("recovered from the copy at 0", &read_all(&v), &content);
    let p = t.path().join("rec.vhd");
    std::fs::write(&p, &d).unwrap();
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(
        problems
            .iter()
            .any(|s| s.contains("footer at the end") && s.contains("checksum")),
        "{problems:?}"
    );
    {
        let mut w = Vhd::open(
            &p,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        w.write_at(&[0x77; 512], 7 * MIB).unwrap();
        w.flush().unwrap();
    }
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let mut want = content.clone();
    want[7 * MIB as usize..7 * MIB as usize + 512].fill(0x77);
    assert_same("after repair, qemu", &qemu_read(&p), &want);

    // Copy at 0 damaged, trailing footer good: readable, reported, repaired by the next write.
    let mut h = good.clone();
    h[100] ^= 0xff;
    let p = t.path().join("head.vhd");
    std::fs::write(&p, &h).unwrap();
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(
        problems
            .iter()
            .any(|s| s.contains("footer copy at offset 0") && s.contains("checksum")),
        "{problems:?}"
    );
    {
        let v = Vhd::open(&p, &OpenOptions::default()).unwrap();
        assert_same("damaged copy at 0", &read_all(&v), &content);
        let mut w = Vhd::open(
            &p,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        w.write_at(&[0x66; 512], 0).unwrap();
    }
    assert!(vdisk_vhd::check(&p).unwrap().is_empty());

    // Both copies damaged.
    d[100] ^= 0xff;
    expect_err(
        t.path(),
        &d,
        &["footer checksum mismatch", "no valid footer copy"],
    );
    // Not a VHD at all.
    expect_err(t.path(), &vec![0u8; 4096], &["conectix"]);
    expect_err(t.path(), &[1u8; 100], &["512-byte footer"]);
    // Unknown disk type (checksum fixed).
    let mut d = good.clone();
    for at in [0, n - 512] {
        be32_put(&mut d, at + 60, 9);
        fix_footer(&mut d, at);
    }
    expect_err(t.path(), &d, &["disk type 9"]);
    // Fixed disk with a bad footer or cut short.
    let f = t.path().join("f.vhd");
    qemu_create(&f, "subformat=fixed", 4 * MIB);
    let fixed = std::fs::read(&f).unwrap();
    let mut d = fixed.clone();
    let m = d.len();
    d[m - 400] ^= 1;
    expect_err(t.path(), &d, &["checksum"]);
    let mut d = fixed[..MIB as usize].to_vec();
    d.extend_from_slice(&fixed[fixed.len() - 512..]);
    expect_err(t.path(), &d, &["truncated"]);
}

#[test]
fn damaged_dynamic_header() {
    let t = tempfile::tempdir().unwrap();
    let (good, _) = qemu_dynamic(t.path());
    let n = good.len();
    let mut d = good.clone();
    d[512 + 200] ^= 1;
    expect_err(t.path(), &d, &["dynamic disk header checksum"]);
    let mut d = good.clone();
    d[512] = b'X';
    fix_header(&mut d);
    expect_err(t.path(), &d, &["cxsparse"]);
    // Header offset outside the file.
    let mut d = good.clone();
    for at in [0, n - 512] {
        be64_put(&mut d, at + 16, u64::MAX - 100);
        fix_footer(&mut d, at);
    }
    expect_err(t.path(), &d, &["dynamic disk header", "outside the file"]);

    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        fix_header(&mut d);
        d
    };
    // Absurd max table entries.
    expect_err(
        t.path(),
        &edit(&|d| be32_put(d, 512 + 28, u32::MAX)),
        &["block table", "inside the file"],
    );
    expect_err(
        t.path(),
        &edit(&|d| be32_put(d, 512 + 28, 1)),
        &["block table has 1 entries", "needs 4"],
    );
    // Absurd block sizes.
    for bs in [0u32, 1000, 0x8000_0000, 512 << 20] {
        expect_err(
            t.path(),
            &edit(&|d| be32_put(d, 512 + 32, bs)),
            &["block size"],
        );
    }
    // A small but valid block size makes the table too small for the disk.
    expect_err(
        t.path(),
        &edit(&|d| be32_put(d, 512 + 32, 4096)),
        &["needs"],
    );
    // Absurd table offsets.
    for off in [0u64, u64::MAX - 3, n as u64 - 8, 1 << 40] {
        expect_err(
            t.path(),
            &edit(&|d| be64_put(d, 512 + 16, off)),
            &["block table", "inside the file"],
        );
    }
}

#[test]
fn bat_entries_past_eof_and_overlapping() {
    let t = tempfile::tempdir().unwrap();
    let (good, _) = qemu_dynamic(t.path());
    let table = u64::from_be_bytes(good[512 + 16..512 + 24].try_into().unwrap()) as usize;
    let mut d = good.clone();
    be32_put(&mut d, table + 4 * 2, 0x00ff_ffff);
    expect_err(t.path(), &d, &["block table entry 2", "past the end"]);
    // Overlaps: readable, but check reports them.
    let mut d = good.clone();
    let first = u32::from_be_bytes(d[table..table + 4].try_into().unwrap());
    be32_put(&mut d, table + 4 * 2, first);
    be32_put(&mut d, table + 4 * 3, 1);
    let p = t.path().join("overlap.vhd");
    std::fs::write(&p, &d).unwrap();
    assert!(Vhd::open(&p, &OpenOptions::default()).is_ok());
    let problems = vdisk_vhd::check(&p).unwrap();
    assert!(
        problems
            .iter()
            .any(|s| s.contains("overlap the") || s.contains("overlaps the")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|s| s.contains("block 3") && s.contains("dynamic disk header")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|s| s.contains("blocks 0") && s.contains("and 2") && s.contains("overlap")),
        "{problems:?}"
    );
}

#[test]
fn truncated_files_never_panic() {
    let t = tempfile::tempdir().unwrap();
    let (good, _) = qemu_dynamic(t.path());
    let mut lens: Vec<usize> = (0..good.len()).step_by(512 * 37).collect();
    lens.extend([
        1,
        511,
        512,
        513,
        1535,
        1536,
        2047,
        2048,
        good.len() - 512,
        good.len() - 1,
    ]);
    for len in lens {
        let d = good[..len].to_vec();
        match Vhd::open_backing(Arc::new(d.clone())) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(v) => {
                let _ = read_all_fallible(&v);
            }
        }
        let p = t.path().join("trunc.vhd");
        std::fs::write(&p, &d).unwrap();
        let _ = vdisk_vhd::check(&p).unwrap();
    }
    // Cut in the middle of the data: the trailing footer is gone, the copy at 0 is good, and
    // the blocks that were cut off are caught.
    let d = good[..good.len() - 512 - MIB as usize].to_vec();
    expect_err(t.path(), &d, &["past the end"]);
}

fn read_all_fallible(d: &Vhd) -> vdisk_core::Result<()> {
    let size = d.geometry().virtual_size.min(16 * MIB);
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off);
        d.read_at(&mut buf[..n as usize], off)?;
        off += n;
    }
    d.map(0, size, MapScope::View)?;
    d.map(0, size, MapScope::Layer)?;
    let _ = d.info();
    Ok(())
}

/// Random field values with valid checksums, so the parser's later checks are what stands
/// between the values and the reader.
#[test]
fn random_header_fields_never_panic() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("b.vhd");
    let child = t.path().join("c.vhd");
    let mut b = Vhd::create(
        &base,
        &CreateOptions {
            virtual_size: 6 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    b.write_at(&[9u8; 3000], MIB - 7).unwrap();
    drop(b);
    let mut c = Vhd::create_child(&base, &child).unwrap();
    c.write_at(&[8u8; 5000], 2 * MIB - 13).unwrap();
    drop(c);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for good in [
        std::fs::read(&base).unwrap(),
        std::fs::read(&child).unwrap(),
    ] {
        let n = good.len();
        for _ in 0..400 {
            let mut d = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                // Interesting fields: footer sizes/type/data offset, header offsets, counts,
                // block size, locator entries; sometimes raw random bytes anywhere.
                let (base_at, fields): (usize, &[(usize, usize)]) = if rng.gen_bool(0.4) {
                    (n - 512, &[(16, 8), (40, 8), (48, 8), (56, 4), (60, 4)])
                } else {
                    (
                        512,
                        &[(16, 8), (28, 4), (32, 4), (576, 24), (600, 24), (40, 16)],
                    )
                };
                let (off, len) = fields[rng.gen_range(0..fields.len())];
                for i in 0..len {
                    d[base_at + off + i] = match rng.gen_range(0..4) {
                        0 => 0,
                        1 => 0xff,
                        _ => rng.gen(),
                    };
                }
                if rng.gen_bool(0.1) {
                    let at = rng.gen_range(0..n);
                    d[at] = rng.gen();
                }
            }
            fix_header(&mut d);
            let tail = d[n - 512..].to_vec();
            d[..512].copy_from_slice(&tail);
            fix_footer(&mut d, 0);
            fix_footer(&mut d, n - 512);
            if let Ok(v) = Vhd::open_backing(Arc::new(d.clone())) {
                let _ = read_all_fallible(&v);
            }
            let p = t.path().join("fz.vhd");
            std::fs::write(&p, &d).unwrap();
            let _ = vdisk_vhd::check(&p).unwrap();
        }
    }
}

#[test]
fn is_vhd_recognises_footers() {
    let t = tempfile::tempdir().unwrap();
    let (good, _) = qemu_dynamic(t.path());
    let n = good.len();
    let (head, tail) = (&good[..512], &good[n - 512..]);
    assert!(vdisk_vhd::is_vhd(head, tail));
    // Trailing footer destroyed: the valid copy at 0 still identifies it.
    assert!(vdisk_vhd::is_vhd(head, &[0u8; 512]));
    // A raw disk that happens to start with the cookie is not a VHD.
    let mut fake = [0u8; 512];
    fake[..8].copy_from_slice(b"conectix");
    assert!(!vdisk_vhd::is_vhd(&fake, &[0u8; 512]));
    assert!(!vdisk_vhd::is_vhd(&[0u8; 512], &[0u8; 512]));
    assert!(!vdisk_vhd::is_vhd(&[], &[]));
    // Fixed disks have only the trailing footer.
    let f = t.path().join("f.vhd");
    qemu_create(&f, "subformat=fixed", MIB);
    let fixed = std::fs::read(&f).unwrap();
    assert!(vdisk_vhd::is_vhd(
        &fixed[..512],
        &fixed[fixed.len() - 512..]
    ));
}

#[test]
fn create_child_refuses_to_overwrite_its_parent() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("b.vhd");
    drop(
        Vhd::create(
            &base,
            &CreateOptions {
                virtual_size: MIB,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let before = std::fs::read(&base).unwrap();
    let e = Vhd::create_child(&base, &base).err().unwrap().to_string();
    assert!(e.contains("parent chain"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

/// Tiny blocks on a huge disk, in a huge sparse file: the table would fit in the file, but we
/// refuse to hold hundreds of MiB of table in memory.
#[test]
fn huge_block_table_in_sparse_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (good, _) = qemu_dynamic(t.path());
    let size: u64 = 100 << 30;
    let entries = (size / 512) as u32;
    let mut d = good[..good.len() - 512].to_vec();
    let mut footer = good[good.len() - 512..].to_vec();
    be64_put(&mut footer, 48, size);
    fix_footer(&mut footer, 0);
    d[..512].copy_from_slice(&footer);
    be32_put(&mut d, 512 + 28, entries);
    be32_put(&mut d, 512 + 32, 512);
    fix_header(&mut d);
    let p = t.path().join("huge.vhd");
    std::fs::write(&p, &d).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let end = 1536 + entries as u64 * 4 + MIB;
    f.set_len(end).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &footer, end).unwrap();
    drop(f);
    let e = Vhd::open(&p, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("block table entries") && e.contains("huge.vhd"),
        "{e}"
    );
}
