//! Helpers shared by the reader tests: running qemu tools, and editing VHDX structures in place
//! (independently of the crate's own serializers) to build damaged and differencing files.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vdisk_core::{Guid, MapScope, VirtualDisk};

pub const MIB: u64 = 1 << 20;

/// Run an external tool; a missing tool fails the test with a clear message.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("this test needs `{tool}` (apt-get install qemu-utils): cannot run it: {e}")
    });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_create(path: &Path, size: u64, opts: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            opts,
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
}

pub fn qemu_io(path: &Path, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", "vhdx"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

pub fn qemu_to_raw(src: &Path, dst: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
}

/// `qemu-img map --output=json`: (start, length, data, zero).
pub fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "vhdx", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Compare the whole guest view of `disk` with the raw image `raw`, in chunks, plus a few
/// unaligned reads.
pub fn assert_same_as_raw(disk: &dyn VirtualDisk, raw: &Path) {
    let vs = disk.geometry().virtual_size;
    let mut f = File::open(raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), vs, "raw size = virtual size");
    let chunk = 4 * MIB as usize;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    let mut pos = 0u64;
    while pos < vs {
        let n = chunk.min((vs - pos) as usize);
        disk.read_at(&mut a[..n], pos).unwrap();
        f.read_exact(&mut b[..n]).unwrap();
        if a[..n] != b[..n] {
            let i = (0..n).find(|&i| a[i] != b[i]).unwrap();
            panic!(
                "hyperkeep and qemu differ at guest offset {}: {:#x} vs {:#x}",
                pos + i as u64,
                a[i],
                b[i]
            );
        }
        pos += n as u64;
    }
    // Unaligned reads, including ones straddling block boundaries.
    let bs = disk.info().block_size.unwrap() as u64;
    for (off, len) in [
        (1u64, 1usize),
        (511, 3),
        (bs - 7, 4099),
        (bs + 1234, 70_000),
        (vs - 5, 5),
        (2 * bs - 100_001, 300_003),
    ] {
        if off + len as u64 > vs {
            continue;
        }
        let mut x = vec![0u8; len];
        let mut y = vec![0u8; len];
        disk.read_at(&mut x, off).unwrap();
        f.read_exact_at(&mut y, off).unwrap();
        assert!(x == y, "unaligned read of {len} at {off} differs");
    }
    let mut one = [0u8; 1];
    assert!(disk.read_at(&mut one, vs).is_err(), "read past the end");
}

/// Check map invariants: contiguous, covering, merged; every non-zero byte of the raw image
/// lies in a Data extent.
pub fn assert_map_covers_data(disk: &dyn VirtualDisk, raw: &Path, scope: MapScope) {
    let vs = disk.geometry().virtual_size;
    let map = disk.map(0, vs, scope).unwrap();
    let mut pos = 0;
    for (i, e) in map.iter().enumerate() {
        assert_eq!(e.offset, pos, "map is contiguous");
        assert!(e.length > 0);
        if i > 0 {
            assert_ne!(map[i - 1].state, e.state, "adjacent extents are merged");
        }
        pos = e.end();
    }
    assert_eq!(pos, vs, "map covers the disk");
    let f = File::open(raw).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for e in map
        .iter()
        .filter(|e| e.state != vdisk_core::ExtentState::Data)
    {
        let mut p = e.offset;
        while p < e.end() {
            let n = buf.len().min((e.end() - p) as usize);
            f.read_exact_at(&mut buf[..n], p).unwrap();
            assert!(
                buf[..n].iter().all(|&x| x == 0),
                "map says {:?} at {p} but qemu reads data there",
                e.state
            );
            p += n as u64;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Editing VHDX structures in place.

pub fn guid(s: &str) -> [u8; 16] {
    s.parse::<Guid>().unwrap().to_le_bytes()
}

pub const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
pub const METADATA_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
pub const FILE_PARAMS_GUID: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
pub const VDISK_SIZE_GUID: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
pub const LSS_GUID: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
pub const PARENT_LOCATOR_GUID: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";
pub const LOCATOR_TYPE_GUID: &str = "B04AEFB7-D19E-4A81-B789-25B8E9445913";

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recompute the CRC-32C (field at byte 4) of the structure `b[at..at+len]`.
pub fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

/// (file offset, length) of a region, from the first region table.
pub fn region(b: &[u8], id: &str) -> (u64, u64) {
    let rt = 192 * 1024;
    let n = u32_at(b, rt + 8) as usize;
    for i in 0..n {
        let at = rt + 16 + 32 * i;
        if b[at..at + 16] == guid(id) {
            return (u64_at(b, at + 16), u32_at(b, at + 24) as u64);
        }
    }
    panic!("region {id} not found");
}

/// Index in the metadata table and the absolute file offset of a metadata item.
pub fn metadata_item(b: &[u8], id: &str) -> Option<(usize, u64)> {
    let (m, _) = region(b, METADATA_GUID);
    let m = m as usize;
    let n = u16::from_le_bytes([b[m + 10], b[m + 11]]) as usize;
    (0..n).find_map(|i| {
        let at = m + 32 + 32 * i;
        (b[at..at + 16] == guid(id)).then(|| (i, m as u64 + u32_at(b, at + 16) as u64))
    })
}

/// The current header's DataWriteGuid.
pub fn data_write_guid(b: &[u8]) -> Guid {
    let (h1, h2) = (64 * 1024, 128 * 1024);
    let cur = if u64_at(b, h2 + 8) > u64_at(b, h1 + 8) {
        h2
    } else {
        h1
    };
    Guid::from_le_bytes(b[cur + 32..cur + 48].try_into().unwrap())
}

pub fn parent_locator_bytes(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * pairs.len()];
    b[..16].copy_from_slice(&guid(LOCATOR_TYPE_GUID));
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let mut put = |s: &str| {
            let off = b.len() as u32;
            for u in s.encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            (off, (b.len() as u32 - off) as u16)
        };
        let (ko, kl) = put(k);
        let (vo, vl) = put(v);
        let at = 20 + 12 * i;
        b[at..at + 4].copy_from_slice(&ko.to_le_bytes());
        b[at + 4..at + 8].copy_from_slice(&vo.to_le_bytes());
        b[at + 8..at + 10].copy_from_slice(&kl.to_le_bytes());
        b[at + 10..at + 12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// Turn a (block_state_zero=off) qemu VHDX into a differencing disk: set HasParent and add a
/// parent locator item (placed at 512 KiB into the metadata region, which qemu leaves free).
/// The BAT already has room for the sector bitmap entries of a small disk.
pub fn make_differencing(b: &mut [u8], pairs: &[(&str, &str)]) {
    let (fp_index, fp_off) = metadata_item(b, FILE_PARAMS_GUID).unwrap();
    let _ = fp_index;
    let flags = u32_at(b, fp_off as usize + 4) | 2;
    b[fp_off as usize + 4..fp_off as usize + 8].copy_from_slice(&flags.to_le_bytes());
    let loc = parent_locator_bytes(pairs);
    let (m, mlen) = region(b, METADATA_GUID);
    let m = m as usize;
    let item_off = 512 * 1024usize;
    assert!(item_off + loc.len() <= mlen as usize);
    b[m + item_off..m + item_off + loc.len()].copy_from_slice(&loc);
    let existing = metadata_item(b, PARENT_LOCATOR_GUID).map(|(i, _)| i);
    let n = u16::from_le_bytes([b[m + 10], b[m + 11]]) as usize;
    let i = existing.unwrap_or(n);
    let at = m + 32 + 32 * i;
    b[at..at + 16].copy_from_slice(&guid(PARENT_LOCATOR_GUID));
    b[at + 16..at + 20].copy_from_slice(&(item_off as u32).to_le_bytes());
    b[at + 20..at + 24].copy_from_slice(&(loc.len() as u32).to_le_bytes());
    b[at + 24..at + 28].copy_from_slice(&4u32.to_le_bytes()); // IsRequired
    if existing.is_none() {
        b[m + 10..m + 12].copy_from_slice(&((n + 1) as u16).to_le_bytes());
    }
}

/// BAT entry `i`.
pub fn bat_entry(b: &[u8], i: usize) -> u64 {
    let (bat, _) = region(b, BAT_GUID);
    u64_at(b, bat as usize + 8 * i)
}

pub fn set_bat_entry(b: &mut [u8], i: usize, v: u64) {
    let (bat, _) = region(b, BAT_GUID);
    let at = bat as usize + 8 * i;
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Give the current header a new DataWriteGuid (both slots, CRCs fixed).
pub fn set_data_write_guid(b: &mut [u8], g: Guid) {
    for h in [64 * 1024usize, 128 * 1024] {
        b[h + 32..h + 48].copy_from_slice(&g.to_le_bytes());
        fix_crc(b, h, 4096);
    }
}

pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

pub fn write_file(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap()
}
