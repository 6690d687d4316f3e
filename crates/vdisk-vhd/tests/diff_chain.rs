//! Differencing chains we write: our reads equal the model at every level, the layer maps say
//! exactly which sectors each layer holds, and libvhdi reads the same (up to its known bug with
//! partially set bitmap bytes, which this file pins down).

mod support;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use support::*;
use vdisk_core::{Error, ExtentState, MapScope, OpenOptions, VirtualDisk, VirtualDiskMut};
use vdisk_vhd::format::{DynHeader, Locator, PLATFORM_W2KU, PLATFORM_W2RU};
use vdisk_vhd::{CreateOptions, Vhd};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 12 * MIB;
const SECTORS: usize = (SIZE / 512) as usize;

struct Level {
    path: PathBuf,
    /// The guest view of the chain with this layer on top.
    model: Vec<u8>,
    /// Sectors this layer holds (its sector bitmap bits).
    held: Vec<bool>,
}

fn write(d: &mut Vhd, model: &mut [u8], held: &mut [bool], off: u64, buf: &[u8]) {
    d.write_at(buf, off).unwrap();
    model[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    for s in off / 512..(off + buf.len() as u64).div_ceil(512) {
        held[s as usize] = true;
    }
}

/// Base (dynamic, 1 MiB blocks, some blocks never written) plus `depth` children. With
/// `byte_aligned`, every child write covers whole groups of 8 sectors (whole bitmap bytes);
/// otherwise most writes are single sectors, so bitmap bytes end up partly set.
fn build_chain(dir: &Path, depth: usize, byte_aligned: bool, seed: u64) -> Vec<Level> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base = dir.join("base.vhd");
    let mut model = vec![0u8; SIZE as usize];
    let mut held = vec![false; SECTORS];
    {
        let mut d = Vhd::create(
            &base,
            &CreateOptions {
                virtual_size: SIZE,
                block_size: 1 << 20,
                fixed: false,
            },
        )
        .unwrap();
        for (off, len) in [(0, 5 * MIB), (8 * MIB, 2 * MIB)] {
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf[..]);
            write(&mut d, &mut model, &mut held, off, &buf);
        }
        d.flush().unwrap();
    }
    let mut levels = vec![Level {
        path: base,
        model,
        held,
    }];
    for k in 1..=depth {
        let path = dir.join(format!("child{k}.vhd"));
        let mut model = levels[k - 1].model.clone();
        let mut held = vec![false; SECTORS];
        let mut d = Vhd::create_child(&levels[k - 1].path, &path).unwrap();
        assert_eq!(d.geometry().virtual_size, SIZE);
        for i in 0..80 {
            let (off, len) = if byte_aligned {
                (
                    rng.gen_range(0..SIZE / 4096) * 4096,
                    rng.gen_range(1..4) * 4096,
                )
            } else if i % 8 == 7 {
                // Unaligned: partial sectors are merged with the parent's bytes.
                (rng.gen_range(0..SIZE - 2000), rng.gen_range(1..2000))
            } else {
                (rng.gen_range(0..SIZE / 512) * 512, 512)
            };
            let len = len.min(SIZE - off);
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf[..]);
            write(&mut d, &mut model, &mut held, off, &buf);
        }
        // A whole block, and zeros that must hide the parent's data.
        let mut buf = vec![0u8; MIB as usize];
        rng.fill(&mut buf[..]);
        write(&mut d, &mut model, &mut held, (3 + k as u64) * MIB, &buf);
        let zeros = vec![0u8; 8192];
        write(
            &mut d,
            &mut model,
            &mut held,
            9 * MIB + 4096 * k as u64,
            &zeros,
        );
        d.flush().unwrap();
        levels.push(Level { path, model, held });
    }
    levels
}

fn check_levels(levels: &[Level]) {
    for (k, lv) in levels.iter().enumerate() {
        let d = Vhd::open(&lv.path, &OpenOptions::default()).unwrap();
        assert_same(&format!("level {k}"), &read_all(&d), &lv.model);
        if k == 0 {
            continue;
        }
        // Layer map at sector granularity: Data exactly where this layer holds sectors.
        let map = d.map(0, SIZE, MapScope::Layer).unwrap();
        let mut got = vec![false; SECTORS];
        for e in &map {
            assert!(
                matches!(e.state, ExtentState::Data | ExtentState::Inherited),
                "{e:?}"
            );
            assert_eq!(e.offset % 512, 0);
            assert_eq!(e.length % 512, 0);
            if e.state == ExtentState::Data {
                got[(e.offset / 512) as usize..(e.end() / 512) as usize].fill(true);
            }
        }
        assert!(
            got == lv.held,
            "layer map of level {k} differs from the sectors written"
        );
        // View map: everything that holds data is Data.
        for e in d.map(0, SIZE, MapScope::View).unwrap() {
            assert_ne!(e.state, ExtentState::Inherited);
            if e.state != ExtentState::Data {
                assert!(vdisk_core::io::is_zero(
                    &lv.model[e.offset as usize..e.end() as usize]
                ));
            }
        }
        let info = d.info();
        assert_eq!(info.subformat, vdisk_core::Subformat::Differencing);
        assert_eq!(
            info.allocated_bytes,
            lv.held.iter().filter(|&&h| h).count() as u64 * 512
        );
        assert_eq!(
            info.parent.as_ref().unwrap().identifier,
            Some(
                Vhd::open(&levels[k - 1].path, &OpenOptions::default())
                    .unwrap()
                    .unique_id()
                    .to_string()
            )
        );
        let problems = vdisk_vhd::check(&lv.path).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }
}

fn libvhdi_chain(levels: &[Level]) -> Vec<u8> {
    let paths: Vec<&Path> = levels.iter().rev().map(|l| l.path.as_path()).collect();
    libvhdi_read(&paths)
}

/// What libvhdi returns for a chain, derived from the model and the layers' bitmaps.
///
/// libvhdi's bug, established by `libvhdi_misreads_partial_bitmap_bytes` and by poking marker
/// bytes into a child's unused sectors: within one bitmap byte (8 sectors), once it meets a set
/// bit it reads every following sector of that byte from the child file, set or not. A clear
/// sector before the first set bit of its byte is read from the parent correctly. Our writer
/// never writes a sector whose bit stays clear, so those sectors read as zeros in libvhdi.
fn libvhdi_expected(levels: &[Level]) -> Vec<u8> {
    let mut view = levels[0].model.clone();
    for lv in &levels[1..] {
        let mut next = view.clone();
        for s in 0..SECTORS {
            let group = s & !7;
            let libvhdi_child = lv.held[group..=s].iter().any(|&h| h);
            let r = s * 512..(s + 1) * 512;
            if lv.held[s] {
                next[r.clone()].copy_from_slice(&lv.model[r]);
            } else if libvhdi_child {
                next[r].fill(0);
            }
        }
        view = next;
    }
    view
}

#[test]
fn chain_three_deep_single_sector_writes() {
    let t = tempfile::tempdir().unwrap();
    let levels = build_chain(t.path(), 3, false, 7);
    check_levels(&levels);
    // libvhdi agrees with the model wherever its bug does not apply, and its result is exactly
    // the model with the bug applied.
    let theirs = libvhdi_chain(&levels);
    let expected = libvhdi_expected(&levels);
    assert_same("libvhdi (with its known bug modelled)", &theirs, &expected);
    assert_ne!(
        theirs, levels[3].model,
        "the test data must contain partly set bitmap bytes that libvhdi misreads"
    );
}

#[test]
fn libvhdi_misreads_partial_bitmap_bytes() {
    // The smallest case: parent all 0xBB, child holds sector 1 only (bitmap byte 0x40).
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("b.vhd");
    let child = t.path().join("c.vhd");
    let mut b = Vhd::create(
        &base,
        &CreateOptions {
            virtual_size: 2 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    b.write_at(&vec![0xBB; 2 * MIB as usize], 0).unwrap();
    drop(b);
    let mut c = Vhd::create_child(&base, &child).unwrap();
    c.write_at(&[0xC1; 512], 512).unwrap();
    let mut ours = vec![0u8; 4096];
    c.read_at(&mut ours, 0).unwrap();
    drop(c);
    let theirs = libvhdi_read(&[&child, &base]);
    let first = |v: &[u8]| (0..8).map(|s| v[s * 512]).collect::<Vec<u8>>();
    // Correct: sector 0 and 2..8 come from the parent.
    assert_eq!(
        first(&ours),
        [0xBB, 0xC1, 0xBB, 0xBB, 0xBB, 0xBB, 0xBB, 0xBB]
    );
    // libvhdi: sectors 2..8 (after the set bit, same byte) come from the child's unused sectors.
    assert_eq!(first(&theirs), [0xBB, 0xC1, 0, 0, 0, 0, 0, 0]);
    assert!(theirs[4096..].iter().all(|&x| x == 0xBB));
}

#[test]
fn chain_byte_aligned_writes_equal_libvhdi() {
    let t = tempfile::tempdir().unwrap();
    let levels = build_chain(t.path(), 3, true, 8);
    check_levels(&levels);
    assert_same("libvhdi", &libvhdi_chain(&levels), &levels[3].model);
}

/// Rewrite a differencing disk's parent locators (both footer-independent: only the header).
fn set_locators(path: &Path, locs: &[([u8; 4], Vec<u8>, bool)]) {
    let mut data = std::fs::read(path).unwrap();
    let mut h = DynHeader::parse(&data[512..1536]).unwrap();
    // Put the new locator data at the end, before the footer.
    let footer = data.split_off(data.len() - 512);
    h.locators = Default::default();
    for (i, (code, bytes, space_in_bytes)) in locs.iter().enumerate() {
        let at = data.len() as u64;
        let space = bytes.len().div_ceil(512) * 512;
        data.extend_from_slice(bytes);
        data.resize(at as usize + space, 0);
        h.locators[i] = Locator {
            platform_code: *code,
            data_space: if *space_in_bytes {
                space as u32
            } else {
                (space / 512) as u32
            },
            data_length: bytes.len() as u32,
            data_offset: at,
        };
    }
    data[512..1536].copy_from_slice(&h.to_bytes());
    data.extend_from_slice(&footer);
    std::fs::write(path, data).unwrap();
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn opens(child: &Path) -> Result<Vhd, Error> {
    Vhd::open(child, &OpenOptions::default())
}

#[test]
fn locators_resolve_in_both_encodings() {
    let t = tempfile::tempdir().unwrap();
    let pdir = t.path().join("parents");
    let cdir = t.path().join("children");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::create_dir_all(&cdir).unwrap();
    let base = pdir.join("base.vhd");
    let child = cdir.join("child.vhd");
    let mut b = Vhd::create(
        &base,
        &CreateOptions {
            virtual_size: 4 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    b.write_at(&[0x5A; 4096], MIB).unwrap();
    drop(b);
    drop(Vhd::create_child(&base, &child).unwrap());
    // What create_child wrote: W2ru relative, W2ku absolute, UTF-16LE, space in sectors.
    let d = opens(&child).unwrap();
    let locs = d.parent_locators();
    assert_eq!(
        locs[0],
        (PLATFORM_W2RU, "..\\parents\\base.vhd".to_string())
    );
    let abs = std::fs::canonicalize(&base)
        .unwrap()
        .display()
        .to_string()
        .replace('/', "\\");
    assert_eq!(locs[1], (PLATFORM_W2KU, abs.clone()));
    assert_eq!(d.parent_name().unwrap(), "base.vhd");
    let mut x = [0u8; 4];
    d.read_at(&mut x, MIB).unwrap();
    assert_eq!(x, [0x5A; 4]);
    drop(d);

    let abs_fwd = std::fs::canonicalize(&base).unwrap().display().to_string();
    for space_in_bytes in [false, true] {
        // Relative only.
        set_locators(
            &child,
            &[(
                PLATFORM_W2RU,
                utf16le("..\\parents\\base.vhd"),
                space_in_bytes,
            )],
        );
        assert!(
            opens(&child).is_ok(),
            "W2ru, space in bytes: {space_in_bytes}"
        );
        assert!(vdisk_vhd::check(&child).unwrap().is_empty());
        // Absolute with a drive letter, as Windows writes it: found with the letter stripped.
        let win = format!("C:{}", abs_fwd.replace('/', "\\"));
        set_locators(
            &child,
            &[
                (PLATFORM_W2RU, utf16le(".\\missing.vhd"), space_in_bytes),
                (PLATFORM_W2KU, utf16le(&win), space_in_bytes),
            ],
        );
        assert!(
            opens(&child).is_ok(),
            "W2ku {win}, space in bytes: {space_in_bytes}"
        );
        assert!(vdisk_vhd::check(&child).unwrap().is_empty());
    }
    // The deprecated codes: Wi2r with 8-bit text, Wi2k with UTF-16LE.
    set_locators(
        &child,
        &[(*b"Wi2r", b"..\\parents\\base.vhd".to_vec(), false)],
    );
    assert!(opens(&child).is_ok(), "Wi2r");
    set_locators(&child, &[(*b"Wi2k", utf16le(&abs), false)]);
    assert!(opens(&child).is_ok(), "Wi2k");
    // Nothing usable: the error lists what was tried and suggests --parent.
    set_locators(&child, &[(PLATFORM_W2RU, utf16le(".\\missing.vhd"), false)]);
    let e = opens(&child).err().unwrap().to_string();
    assert!(
        e.contains("cannot find the parent") && e.contains("missing.vhd") && e.contains("--parent"),
        "{e}"
    );
    // The parent name next to the child is the last resort.
    std::fs::copy(&base, cdir.join("base.vhd")).unwrap();
    assert!(opens(&child).is_ok());
    // An explicit override wins (and is checked).
    std::fs::remove_file(cdir.join("base.vhd")).unwrap();
    let moved = t.path().join("elsewhere.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let d = Vhd::open(
        &child,
        &OpenOptions {
            parent_override: Some(moved.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(d.parent().unwrap().path(), Some(moved.as_path()));
}

#[test]
fn wrong_parent_loop_depth_and_timestamp() {
    let t = tempfile::tempdir().unwrap();
    let levels = build_chain(t.path(), 3, false, 9);
    let top = &levels[3].path;
    // Wrong unique id: a different disk with the right name.
    let other = t.path().join("other.vhd");
    drop(
        Vhd::create(
            &other,
            &CreateOptions {
                virtual_size: SIZE,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let e = Vhd::open(
        top,
        &OpenOptions {
            parent_override: Some(other.clone()),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::Parent(_)));
    let e = e.to_string();
    assert!(
        e.contains("wrong parent")
            && e.contains("unique id")
            && e.contains("other.vhd")
            && e.contains("--parent"),
        "{e}"
    );
    // Too deep: four layers with a limit of three.
    let e = Vhd::open(
        top,
        &OpenOptions {
            max_chain_depth: 3,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("deeper than 3"), "{e}");
    assert!(Vhd::open(
        top,
        &OpenOptions {
            max_chain_depth: 4,
            ..Default::default()
        }
    )
    .is_ok());
    // Timestamp mismatch: only a warning from check.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&levels[2].path)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    drop(f);
    assert!(opens(top).is_ok());
    let problems = vdisk_vhd::check(top).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("warning: parent time stamp"),
        "{problems:?}"
    );
    // Loop: make child1's parent be child2 (whose parent is child1).
    let c1 = &levels[1].path;
    let c2_id = Vhd::open_backing(std::sync::Arc::new(std::fs::read(&levels[2].path).unwrap()))
        .unwrap()
        .unique_id();
    let mut data = std::fs::read(c1).unwrap();
    let mut h = DynHeader::parse(&data[512..1536]).unwrap();
    h.parent_unique_id = c2_id;
    data[512..1536].copy_from_slice(&h.to_bytes());
    std::fs::write(c1, data).unwrap();
    set_locators(c1, &[(PLATFORM_W2RU, utf16le(".\\child2.vhd"), false)]);
    let e = Vhd::open(&levels[2].path, &OpenOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, Error::Parent(_)));
    assert!(e.to_string().contains("loops"), "{e}");
    let problems = vdisk_vhd::check(&levels[2].path).unwrap();
    assert!(problems.iter().any(|p| p.contains("loops")), "{problems:?}");
}

#[test]
fn detached_differencing_layer_reads_inherited_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let levels = build_chain(t.path(), 1, false, 11);
    let bytes = std::fs::read(&levels[1].path).unwrap();
    let d = Vhd::open_backing(std::sync::Arc::new(bytes)).unwrap();
    let got = read_all(&d);
    for s in 0..SECTORS {
        let r = s * 512..(s + 1) * 512;
        if levels[1].held[s] {
            assert_eq!(&got[r.clone()], &levels[1].model[r]);
        } else {
            assert!(got[r].iter().all(|&x| x == 0));
        }
    }
    let view = d.map(0, SIZE, MapScope::View).unwrap();
    assert!(view.iter().all(|e| e.state != ExtentState::Inherited));
    let layer = d.map(0, SIZE, MapScope::Layer).unwrap();
    assert!(layer.iter().any(|e| e.state == ExtentState::Inherited));
}
