//! Hostile NTFS images: damaged fixups, runlists outside the volume, overlapping or looping runs,
//! directory loops, absurd lengths and sizes, random byte flips. The reader must return an error
//! or correct data: never panic, never hang.

#[path = "ntfs_common.rs"]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use guestfs::fs::{FileType, GuestFs, NodeId};
use guestfs::volume::Volume;
use guestfs::Error;

fn le16(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}
fn le32(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}

struct Base {
    bytes: Vec<u8>,
    mft: usize,
    data_node: u64,
    d2_node: u64,
    _dir: tempfile::TempDir,
}

fn base() -> Base {
    let dir = tempfile::TempDir::new().unwrap();
    common::build("small", dir.path());
    let bytes = std::fs::read(dir.path().join("small.img")).unwrap();
    let fs = guestfs::ntfs::open(Volume::from_bytes(bytes.clone())).unwrap();
    let cluster = le16(&bytes, 0x0B) * bytes[0x0D] as usize;
    let mft = u64::from_le_bytes(bytes[0x30..0x38].try_into().unwrap()) as usize * cluster;
    Base {
        data_node: fs.lookup("data.bin").unwrap(),
        d2_node: fs.lookup("d2").unwrap(),
        bytes,
        mft,
        _dir: dir,
    }
}

impl Base {
    fn record(&self, node: u64) -> usize {
        let off = self.mft + node as usize * 1024;
        assert_eq!(&self.bytes[off..off + 4], b"FILE");
        off
    }
    /// Absolute offset of the first attribute of type `ty` in record `node`.
    fn attr(&self, node: u64, ty: usize) -> usize {
        let rec = self.record(node);
        let mut pos = rec + le16(&self.bytes, rec + 0x14);
        loop {
            let t = le32(&self.bytes, pos);
            assert_ne!(
                t, 0xFFFF_FFFF,
                "attribute {ty:#x} not found in record {node}"
            );
            if t == ty {
                return pos;
            }
            pos += le32(&self.bytes, pos + 4);
        }
    }
    fn open(&self, bytes: Vec<u8>) -> guestfs::Result<guestfs::ntfs::NtfsFs> {
        guestfs::ntfs::open(Volume::from_bytes(bytes))
    }
}

fn assert_corrupt<T: std::fmt::Debug>(r: guestfs::Result<T>, needle: &str) {
    match r {
        Err(Error::Corrupt { detail, .. }) => {
            assert!(
                detail.contains(needle),
                "error '{detail}' should mention '{needle}'"
            )
        }
        other => panic!("expected a corrupt-filesystem error mentioning '{needle}', got {other:?}"),
    }
}

/// Replace the mapping pairs of data.bin's $DATA with `pairs` (same total length).
fn with_runs(b: &Base, pairs: &[u8]) -> Vec<u8> {
    let mut bytes = b.bytes.clone();
    let a = b.attr(b.data_node, 0x80);
    assert_eq!(bytes[a + 8], 1, "data.bin must be non-resident");
    let rl = a + le16(&bytes, a + 0x20);
    let rec = b.record(b.data_node);
    assert!(
        rl + pairs.len() < rec + 510,
        "runlist would cross a sector end"
    );
    assert!(
        pairs.len() <= le32(&bytes, a + 4) - le16(&bytes, a + 0x20),
        "runlist too long"
    );
    bytes[rl..rl + pairs.len()].copy_from_slice(pairs);
    bytes
}

#[test]
fn ntfs_hostile_images() {
    let b = base();
    // Sanity: the untouched image reads.
    let fs = b.open(b.bytes.clone()).unwrap();
    assert_eq!(common::read_all(&fs, b.data_node, None).len(), 100_000);

    // 1. Update sequence mismatch (torn write) in data.bin's record.
    let mut bytes = b.bytes.clone();
    bytes[b.record(b.data_node) + 510] ^= 0xFF;
    let fs = b.open(bytes).unwrap();
    assert_corrupt(
        fs.metadata(b.data_node),
        &format!("MFT record {}: update sequence mismatch", b.data_node),
    );

    // 2. A run outside the volume (16 MiB = 4096 clusters).
    let fs = b
        .open(with_runs(&b, &[0x31, 25, 0x00, 0x00, 0x40, 0x00]))
        .unwrap();
    assert_corrupt(fs.metadata(b.data_node), "outside the volume");

    // Where data.bin really is, to build overlapping / looping runs over its clusters.
    let a = b.attr(b.data_node, 0x80);
    let rl = a + le16(&b.bytes, a + 0x20);
    let hdr = b.bytes[rl];
    assert_eq!(
        hdr, 0x21,
        "expected a one-byte run length and a two-byte cluster number"
    );
    assert_eq!(
        b.bytes[rl + 1],
        25,
        "data.bin should be one run of 25 clusters"
    );
    let l = [b.bytes[rl + 2], b.bytes[rl + 3]];
    // The attribute has room for 8 bytes of mapping pairs (5 used, padded to 8).
    assert_eq!(le32(&b.bytes, a + 4) - le16(&b.bytes, a + 0x20), 8);
    // 3. Overlapping: 13 clusters at lcn, then 12 at lcn-5.
    let fs = b
        .open(with_runs(&b, &[0x21, 13, l[0], l[1], 0x11, 12, 0xFB, 0]))
        .unwrap();
    assert_corrupt(fs.metadata(b.data_node), "overlap");
    // 4. Looping: the same clusters again and again.
    let fs = b
        .open(with_runs(&b, &[0x21, 5, l[0], l[1], 0x11, 20, 0, 0]))
        .unwrap();
    assert_corrupt(fs.read_at(b.data_node, None, &mut [0u8; 10], 0), "overlap");

    // 5. A directory whose index lists the directory itself.
    let ir = b.attr(b.d2_node, 0x90);
    let value = ir + le16(&b.bytes, ir + 0x14);
    let first_entry = value + 0x10 + le32(&b.bytes, value + 0x10);
    let mut bytes = b.bytes.clone();
    bytes[first_entry..first_entry + 6].copy_from_slice(&b.d2_node.to_le_bytes()[..6]);
    let fs = b.open(bytes.clone()).unwrap();
    assert_corrupt(fs.read_dir(b.d2_node), "lists itself");
    // 6. ... or an ancestor (the root), flagged as a directory.
    bytes[first_entry..first_entry + 6].copy_from_slice(&5u64.to_le_bytes()[..6]);
    bytes[first_entry + 6..first_entry + 8].copy_from_slice(&[0, 0]);
    let key_flags = first_entry + 16 + 0x38;
    bytes[key_flags + 3] |= 0x10;
    let fs = b.open(bytes).unwrap();
    assert_corrupt(fs.read_dir(b.d2_node), "directory loop");

    // 7. An attribute with an absurd length.
    let mut bytes = b.bytes.clone();
    let si = b.attr(b.data_node, 0x10);
    bytes[si + 4..si + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let fs = b.open(bytes).unwrap();
    assert_corrupt(fs.metadata(b.data_node), "impossible length");

    // 8. An absurd data size (far beyond what the runlist maps).
    let mut bytes = b.bytes.clone();
    bytes[a + 0x30..a + 0x38].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let fs = b.open(bytes).unwrap();
    assert_corrupt(fs.metadata(b.data_node), "exceeds");

    // 9. Damaged boot sector and $MFT record 0: clear errors at open.
    let mut bytes = b.bytes.clone();
    bytes[0x0D] = 3;
    assert!(matches!(b.open(bytes), Err(Error::Corrupt { .. })));
    let mut bytes = b.bytes.clone();
    bytes[b.mft + 510] ^= 1;
    assert_corrupt(b.open(bytes), "MFT record 0");
}

/// Read everything reachable, with a visited set and a cap per stream, ignoring errors.
fn exercise(fs: &dyn GuestFs) {
    let mut stack = vec![fs.root()];
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Some(dir) = stack.pop() {
        if !seen.insert(dir) || seen.len() > 10_000 {
            continue;
        }
        let Ok(entries) = fs.read_dir(dir) else {
            continue;
        };
        for e in entries {
            let _ = fs.lookup(&e.name);
            let _ = fs.read_link(e.node);
            if e.file_type == FileType::Directory {
                stack.push(e.node);
                continue;
            }
            let Ok(md) = fs.metadata(e.node) else {
                continue;
            };
            let mut streams: Vec<Option<String>> = vec![None];
            streams.extend(md.streams.iter().map(|s| Some(s.name.clone())));
            for s in streams {
                let mut off = 0u64;
                while off < 64 << 20 {
                    match fs.read_at(e.node, s.as_deref(), &mut buf, off) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => off += n as u64,
                    }
                }
            }
        }
    }
}

#[test]
fn ntfs_random_byte_flips_never_panic_or_hang() {
    let b = base();
    // Regions worth damaging: the first 64 MFT records and every index record.
    let mut targets: Vec<(usize, usize)> = (0..64).map(|n| (b.mft + n * 1024, 1024)).collect();
    for off in (0..b.bytes.len()).step_by(4096) {
        if &b.bytes[off..off + 4] == b"INDX" {
            targets.push((off, 4096));
        }
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rounds = 400;
    for round in 0..rounds {
        let mut bytes = b.bytes.clone();
        let (start, len) = targets[next() as usize % targets.len()];
        let flips = 1 + next() as usize % 16;
        for _ in 0..flips {
            // Mostly keep fixups intact so damage reaches the parsers behind them.
            let mut at = next() as usize % len;
            if at % 512 >= 510 {
                at -= 2;
            }
            bytes[start + at] ^= 1 << (next() % 8);
        }
        let t = Instant::now();
        if let Ok(fs) = b.open(bytes) {
            exercise(&fs);
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "round {round} took {:?}",
            t.elapsed()
        );
    }
}
