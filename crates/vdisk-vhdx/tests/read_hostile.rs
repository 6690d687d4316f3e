//! Damaged and hostile VHDX files: each gives a clear error (checked for its key words), never a
//! panic or an unbounded allocation; damage to one of two redundant copies still opens.

mod read_util;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use read_util::*;
use tempfile::TempDir;
use vdisk_core::{Error, MapScope, OpenOptions, VirtualDisk};
use vdisk_vhdx::Vhdx;

/// A small qemu dynamic VHDX (16 MiB, 1 MiB blocks, blocks 0, 1, 5 allocated) and its bytes.
fn base(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("base.vhdx");
    qemu_create(&p, 16 * MIB, "block_size=1M,block_state_zero=off");
    qemu_io(
        &p,
        &[
            "write -P 0x61 512 1048576".into(),
            "write -P 0x62 5242880 4096".into(),
        ],
    );
    let b = read_file(&p);
    (p, b)
}

/// Write `bytes` as a file and open it; also parse the same bytes through `open_backing`, which
/// must agree on success or failure.
fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<Vhdx, Error> {
    let p = dir.join(name);
    write_file(&p, bytes);
    let via_file = Vhdx::open(&p, &OpenOptions::default());
    let via_mem = Vhdx::open_backing(Arc::new(bytes.to_vec()));
    assert_eq!(via_file.is_ok(), via_mem.is_ok(), "{name}");
    via_file
}

fn expect_err(dir: &Path, name: &str, bytes: &[u8], words: &[&str]) -> Error {
    let e = match open_bytes(dir, name, bytes) {
        Ok(_) => panic!("{name}: opened, but should have been refused"),
        Err(e) => e,
    };
    let msg = e.to_string();
    for w in words {
        assert!(msg.contains(w), "{name}: error {msg:?} lacks {w:?}");
    }
    e
}

const H1: usize = 64 * 1024;
const H2: usize = 128 * 1024;
const RT1: usize = 192 * 1024;
const RT2: usize = 256 * 1024;

#[test]
fn one_damaged_header_opens_from_the_other_both_refused() {
    let dir = TempDir::new().unwrap();
    let (_, good) = base(dir.path());
    for h in [H1, H2] {
        let mut b = good.clone();
        b[h + 200] ^= 0xff; // CRC no longer matches
        let d = open_bytes(dir.path(), "h.vhdx", &b).expect("one good header is enough");
        let mut x = vec![0u8; 4096];
        d.read_at(&mut x, 5 * MIB).unwrap();
        assert!(x.iter().all(|&v| v == 0x62));
        let problems = vdisk_vhdx::check(&dir.path().join("h.vhdx")).unwrap();
        let which = if h == H1 { "header 1" } else { "header 2" };
        assert!(
            problems
                .iter()
                .any(|p| p.contains(which) && p.contains("checksum")),
            "{problems:?}"
        );
    }
    let mut b = good.clone();
    b[H1 + 200] ^= 0xff;
    b[H2] = b'x';
    let e = expect_err(
        dir.path(),
        "hh.vhdx",
        &b,
        &[
            "hh.vhdx",
            "corrupt vhdx file",
            "both headers are damaged",
            "checksum",
            "signature",
        ],
    );
    assert!(matches!(e, Error::Corrupt { .. }));
    let problems = vdisk_vhdx::check(&dir.path().join("hh.vhdx")).unwrap();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("both headers"));
}

#[test]
fn higher_sequence_header_wins() {
    let dir = TempDir::new().unwrap();
    let (_, mut b) = base(dir.path());
    // Header 2 gets a higher sequence number and a recognisable DataWriteGuid.
    let g: vdisk_core::Guid = "11111111-2222-3333-4444-555555555555".parse().unwrap();
    let seq = u64_at(&b, H1 + 8).max(u64_at(&b, H2 + 8)) + 5;
    b[H2 + 8..H2 + 16].copy_from_slice(&seq.to_le_bytes());
    b[H2 + 32..H2 + 48].copy_from_slice(&g.to_le_bytes());
    fix_crc(&mut b, H2, 4096);
    let d = open_bytes(dir.path(), "s.vhdx", &b).unwrap();
    assert_eq!(d.info().identifier.as_deref(), Some(g.to_string().as_str()));
}

#[test]
fn region_tables() {
    let dir = TempDir::new().unwrap();
    let (_, good) = base(dir.path());
    let mut b = good.clone();
    b[RT1 + 100] ^= 1;
    open_bytes(dir.path(), "r1.vhdx", &b).expect("second region table is enough");
    let problems = vdisk_vhdx::check(&dir.path().join("r1.vhdx")).unwrap();
    assert!(
        problems.iter().any(|p| p.contains("region table 1")),
        "{problems:?}"
    );
    b[RT2 + 100] ^= 1;
    expect_err(
        dir.path(),
        "r2.vhdx",
        &b,
        &["both region tables are damaged"],
    );

    // An unknown region marked required: refuse (unsupported), in both tables.
    let mut b = good.clone();
    for rt in [RT1, RT2] {
        let n = u32_at(&b, rt + 8) as usize;
        let at = rt + 16 + 32 * n;
        b[at..at + 16].copy_from_slice(&guid("01234567-89ab-cdef-0123-456789abcdef"));
        b[at + 16..at + 24].copy_from_slice(&(100 * MIB).to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&(MIB as u32).to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&1u32.to_le_bytes());
        b[rt + 8..rt + 12].copy_from_slice(&((n + 1) as u32).to_le_bytes());
        fix_crc(&mut b, rt, 64 * 1024);
    }
    let e = expect_err(
        dir.path(),
        "rq.vhdx",
        &b,
        &[
            "unsupported vhdx file",
            "01234567-89ab-cdef-0123-456789abcdef",
            "required",
        ],
    );
    assert!(matches!(e, Error::Unsupported { .. }));
    // The same region, not required: ignored.
    for rt in [RT1, RT2] {
        let n = u32_at(&b, rt + 8) as usize - 1;
        b[rt + 16 + 32 * n + 28] = 0;
        fix_crc(&mut b, rt, 64 * 1024);
    }
    open_bytes(dir.path(), "rn.vhdx", &b).expect("optional unknown region is ignored");

    // Absurd entry count.
    let mut b = good.clone();
    for rt in [RT1, RT2] {
        b[rt + 8..rt + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        fix_crc(&mut b, rt, 64 * 1024);
    }
    expect_err(dir.path(), "rc.vhdx", &b, &["entries", "2047"]);
}

#[test]
fn absurd_metadata() {
    let dir = TempDir::new().unwrap();
    let (_, good) = base(dir.path());
    let (_, vs_at) = metadata_item(&good, VDISK_SIZE_GUID).unwrap();
    let (_, fp_at) = metadata_item(&good, FILE_PARAMS_GUID).unwrap();
    let (_, lss_at) = metadata_item(&good, LSS_GUID).unwrap();
    let set = |b: &mut Vec<u8>, at: u64, v: &[u8]| {
        b[at as usize..at as usize + v.len()].copy_from_slice(v)
    };

    let mut b = good.clone();
    set(&mut b, vs_at, &(1u64 << 60).to_le_bytes());
    expect_err(dir.path(), "vs.vhdx", &b, &["virtual disk size", "64 TiB"]);

    // A legal but huge size: the 1 MiB BAT region cannot hold its entries.
    let mut b = good.clone();
    set(&mut b, vs_at, &(60u64 << 40).to_le_bytes());
    expect_err(dir.path(), "vs2.vhdx", &b, &["BAT region", "too small"]);

    let mut b = good.clone();
    set(&mut b, vs_at, &1000u64.to_le_bytes());
    expect_err(
        dir.path(),
        "vs3.vhdx",
        &b,
        &["not a multiple of the logical sector size"],
    );

    for bs in [0u32, 3 << 20, 512 << 20, 1 << 19, u32::MAX] {
        let mut b = good.clone();
        set(&mut b, fp_at, &bs.to_le_bytes());
        expect_err(dir.path(), "bs.vhdx", &b, &["block size", "power of two"]);
    }

    let mut b = good.clone();
    set(&mut b, lss_at, &1024u32.to_le_bytes());
    expect_err(dir.path(), "lss.vhdx", &b, &["logical sector size 1024"]);

    // Unknown metadata item marked required: refuse. Not required: ignore.
    let (m, _) = region(&good, METADATA_GUID);
    let m = m as usize;
    let n = u16::from_le_bytes([good[m + 10], good[m + 11]]) as usize;
    let mut b = good.clone();
    let at = m + 32 + 32 * n;
    b[at..at + 16].copy_from_slice(&guid("fedcba98-7654-3210-fedc-ba9876543210"));
    b[at + 16..at + 20].copy_from_slice(&(600 * 1024u32).to_le_bytes());
    b[at + 20..at + 24].copy_from_slice(&8u32.to_le_bytes());
    b[at + 24..at + 28].copy_from_slice(&4u32.to_le_bytes());
    b[m + 10..m + 12].copy_from_slice(&((n + 1) as u16).to_le_bytes());
    let e = expect_err(
        dir.path(),
        "mi.vhdx",
        &b,
        &[
            "metadata item fedcba98-7654-3210-fedc-ba9876543210",
            "required",
        ],
    );
    assert!(matches!(e, Error::Unsupported { .. }));
    b[at + 24] = 0;
    open_bytes(dir.path(), "mo.vhdx", &b).expect("optional unknown item is ignored");

    // An item pointing outside the metadata region.
    let mut b = good.clone();
    b[at..at + 16].copy_from_slice(&guid("fedcba98-7654-3210-fedc-ba9876543210"));
    b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    b[at + 20..at + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    b[m + 10..m + 12].copy_from_slice(&((n + 1) as u16).to_le_bytes());
    expect_err(dir.path(), "mx.vhdx", &b, &["outside the metadata region"]);

    // Required item missing.
    let mut b = good.clone();
    let (i, _) = metadata_item(&good, VDISK_SIZE_GUID).unwrap();
    b[m + 32 + 32 * i] ^= 0xff;
    b[m + 32 + 32 * i + 24] = 0; // not required, so only its absence counts
    expect_err(dir.path(), "mm.vhdx", &b, &["no virtual disk size item"]);

    // Differencing flag without a parent locator.
    let mut b = good.clone();
    b[fp_at as usize + 4] |= 2;
    expect_err(
        dir.path(),
        "hp.vhdx",
        &b,
        &["HasParent", "no parent locator"],
    );
}

#[test]
fn bad_bat_entries() {
    let dir = TempDir::new().unwrap();
    let (_, good) = base(dir.path());
    let e0 = bat_entry(&good, 0);
    assert_eq!(e0 & 7, 6, "block 0 is allocated");
    let len = good.len() as u64;

    let mut b = good.clone();
    set_bat_entry(&mut b, 0, (len.div_ceil(MIB) * MIB + 10 * MIB) | 6);
    expect_err(
        dir.path(),
        "eof.vhdx",
        &b,
        &["BAT entry 0", "past the end of the file"],
    );

    let (meta, _) = region(&good, METADATA_GUID);
    let mut b = good.clone();
    set_bat_entry(&mut b, 1, meta | 6);
    expect_err(
        dir.path(),
        "ovl.vhdx",
        &b,
        &["BAT entry 1", "overlaps the metadata region"],
    );
    let (bat, _) = region(&good, BAT_GUID);
    set_bat_entry(&mut b, 2, bat | 6);
    let e = expect_err(dir.path(), "ovl2.vhdx", &b, &["and 1 more BAT problems"]);
    drop(e);
    let problems = vdisk_vhdx::check(&dir.path().join("ovl2.vhdx")).unwrap();
    assert!(
        problems.iter().any(|p| p.contains("overlaps the BAT")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("overlaps the metadata")),
        "{problems:?}"
    );

    let mut b = good.clone();
    set_bat_entry(&mut b, 3, 4);
    expect_err(
        dir.path(),
        "st.vhdx",
        &b,
        &["BAT entry 3", "invalid state 4"],
    );

    let mut b = good.clone();
    set_bat_entry(&mut b, 0, e0 & !7 | 7);
    expect_err(
        dir.path(),
        "pp.vhdx",
        &b,
        &["PARTIALLY_PRESENT", "differencing"],
    );

    // Two blocks sharing file space open (reads are well defined) but check reports them.
    let mut b = good.clone();
    set_bat_entry(&mut b, 7, e0);
    open_bytes(dir.path(), "dup.vhdx", &b).unwrap();
    let problems = vdisk_vhdx::check(&dir.path().join("dup.vhdx")).unwrap();
    assert!(
        problems.iter().any(|p| p.contains("BAT entries 0 and 7")),
        "{problems:?}"
    );

    // Old UNMAPPED value 5 and UNDEFINED read as zeros.
    let mut b = good.clone();
    set_bat_entry(&mut b, 0, 5);
    set_bat_entry(&mut b, 5, 1);
    let d = open_bytes(dir.path(), "old.vhdx", &b).unwrap();
    let mut x = vec![1u8; 6 * MIB as usize];
    d.read_at(&mut x, 0).unwrap();
    assert!(x.iter().all(|&v| v == 0x61 || v == 0) && x[600] == 0 && x[MIB as usize + 100] == 0x61);
    assert!(x[5 * MIB as usize..].iter().all(|&v| v == 0));
}

#[test]
fn truncated_files() {
    let dir = TempDir::new().unwrap();
    let (_, good) = base(dir.path());
    for (cut, words) in [
        (0usize, vec!["too short to be a VHDX"]),
        (100, vec!["too short"]),
        (70 * 1024, vec!["truncated", "1 MiB header section"]),
        (200 * 1024, vec!["truncated"]),
        (2 * MIB as usize, vec!["truncated"]),
    ] {
        let name = format!("t{cut}.vhdx");
        expect_err(dir.path(), &name, &good[..cut], &words);
    }
    // Cut inside the payload: the blocks past the end are refused.
    let last_block = (0..16)
        .map(|i| bat_entry(&good, i))
        .filter(|e| e & 7 == 6)
        .map(|e| e & !(MIB - 1))
        .max()
        .unwrap() as usize;
    expect_err(
        dir.path(),
        "tp.vhdx",
        &good[..last_block],
        &["past the end of the file", "truncated"],
    );
    // Cut in the middle of the last block: opens; the missing tail reads as zeros.
    let d = open_bytes(dir.path(), "tm.vhdx", &good[..last_block + 4096]).unwrap();
    let mut x = vec![1u8; MIB as usize];
    d.read_at(&mut x, 5 * MIB).unwrap();
    assert!(x[..4096].iter().all(|&v| v == 0x62) && x[4096..].iter().all(|&v| v == 0));
}

/// Random damage to the structures in the first few MiB: never a panic; whatever opens can be
/// read and mapped completely.
#[test]
fn random_damage_never_panics() {
    let dir = TempDir::new().unwrap();
    let (_, plain) = base(dir.path());
    // The same file as a differencing disk with a partially present block, so locator and
    // sector bitmap parsing get damaged too.
    let mut diff = plain.clone();
    make_differencing(
        &mut diff,
        &[
            ("parent_linkage", "{11111111-2222-3333-4444-555555555555}"),
            ("relative_path", r".\nowhere.vhdx"),
        ],
    );
    let bm = (diff.len() as u64).div_ceil(MIB) * MIB;
    diff.resize((bm + MIB) as usize, 0xa5);
    set_bat_entry(&mut diff, 4096, bm | 6);
    let e0 = bat_entry(&diff, 0);
    set_bat_entry(&mut diff, 0, e0 & !7 | 7);
    Vhdx::open_backing(Arc::new(diff.clone())).expect("the undamaged differencing file opens");
    let (meta, _) = region(&plain, METADATA_GUID);
    let (bat, _) = region(&plain, BAT_GUID);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let targets = [
        (0usize, 64usize),
        (RT1, 64),
        (meta as usize, 256),
        (meta as usize + 64 * 1024, 64),
        (meta as usize + 512 * 1024, 160),
        (bat as usize, 128),
        (bat as usize + 8 * 4096, 8),
    ];
    let mut opened = 0;
    for round in 0..800 {
        let good = if round % 2 == 0 { &plain } else { &diff };
        let mut b = good.clone();
        let (start, span) = targets[(round / 2) % targets.len()];
        for _ in 0..rng.gen_range(1..6) {
            let i = start + rng.gen_range(0..span);
            b[i] = rng.gen();
        }
        // Region table damage is fixed up so parsing gets past the checksum.
        fix_crc(&mut b, RT1, 64 * 1024);
        if let Ok(d) = Vhdx::open_backing(Arc::new(b)) {
            opened += 1;
            let vs = d.geometry().virtual_size;
            let map = d.map(0, vs, MapScope::View).unwrap();
            assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), vs);
            let mut x = vec![0u8; vs.min(32 * MIB) as usize];
            let _ = d.read_at(&mut x, 0);
            let _ = d.info();
        }
    }
    assert!(opened > 0);
}
