//! Helpers for the interop tests: running qemu-img, qemu-io and libvhdi (tests/support/vhdi.py),
//! an in-memory model of what a disk should contain, and byte-exact comparisons.
//!
//! Every external tool is required: a missing one fails the test with what to install, never
//! skips it (scripts/test.sh installs them all).

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vdisk::{ExtentState, MapScope, VirtualDisk, VirtualDiskMut};
use vdisk_core::ReadAt;

pub const MIB: u64 = 1 << 20;

/// Run a command; panic with its output if it cannot start or fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program}: {e}. The interop tests need qemu-utils and python3 with \
             pyvhdi (libvhdi-python); run scripts/test.sh, which installs them"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `qemu-img convert -f FMT -O raw` into `dir`, returning the raw file.
pub fn qemu_to_raw(img: &Path, qemu_fmt: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(
        "qemu-img",
        &["convert", "-f", qemu_fmt, "-O", "raw", p(img), p(&out)],
    );
    out
}

/// The virtual size qemu sees.
pub fn qemu_virtual_size(img: &Path, qemu_fmt: &str) -> u64 {
    let json = run(
        "qemu-img",
        &["info", "-f", qemu_fmt, "--output=json", p(img)],
    );
    // The top-level "virtual-size" is the first one at indentation 4 in qemu's pretty JSON;
    // nested nodes (the protocol layer) come later. Parse without a JSON dependency.
    let line = json
        .lines()
        .find(|l| l.starts_with("    \"virtual-size\":"))
        .unwrap_or_else(|| panic!("no virtual-size in qemu-img info output:\n{json}"));
    line.trim()
        .trim_start_matches("\"virtual-size\":")
        .trim()
        .trim_end_matches(',')
        .parse()
        .unwrap_or_else(|e| panic!("bad virtual-size line {line:?}: {e}"))
}

/// `qemu-img check` must report a clean image (exit status 0).
pub fn qemu_check_clean(img: &Path, qemu_fmt: &str) {
    run("qemu-img", &["check", "-f", qemu_fmt, p(img)]);
}

/// Whole-disk dump through libvhdi. `chain` is the image, then its parents nearest first.
pub fn vhdi_dump(chain: &[&Path], dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vhdi.py");
    let out = dir.join(format!(
        "{}.vhdi.raw",
        chain[0].file_name().unwrap().to_string_lossy()
    ));
    let mut args = vec![p(&script), "dump", p(&out)];
    args.extend(chain.iter().map(|c| p(c)));
    run("python3", &args);
    out
}

/// Read the whole disk through hyperkeep in 1 MiB pieces.
pub fn read_all(disk: &dyn VirtualDisk) -> Vec<u8> {
    let size = disk.geometry().virtual_size;
    let mut v = vec![0u8; size as usize];
    for (i, chunk) in v.chunks_mut(MIB as usize).enumerate() {
        disk.read_at(chunk, i as u64 * MIB)
            .unwrap_or_else(|e| panic!("read at {} failed: {e}", i as u64 * MIB));
    }
    v
}

/// Panic with the first differing offset (and the bytes there) if `a` and `b` differ.
pub fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    if a == b {
        return;
    }
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
    let end = (i + 16).min(a.len());
    panic!(
        "{what}: first difference at byte {i} (sector {}): {:02x?} vs {:02x?}",
        i / 512,
        &a[i..end],
        &b[i..end]
    );
}

/// Compare a hyperkeep disk with a raw file of the same size, chunk by chunk (for disks too big
/// to hold twice).
pub fn assert_disk_equals_file(what: &str, disk: &dyn VirtualDisk, raw: &Path) {
    let size = disk.geometry().virtual_size;
    let file = File::open(raw).unwrap();
    let flen = file.metadata().unwrap().len();
    assert_eq!(
        flen, size,
        "{what}: hyperkeep sees {size} bytes, the reference {flen} bytes"
    );
    let chunk = 4 * MIB;
    let mut a = vec![0u8; chunk as usize];
    let mut b = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        disk.read_at(&mut a[..n], off)
            .unwrap_or_else(|e| panic!("{what}: hyperkeep read at {off} failed: {e}"));
        file.read_exact_at(&mut b[..n], off).unwrap();
        if a[..n] != b[..n] {
            assert_same(&format!("{what} (chunk at {off})"), &a[..n], &b[..n]);
        }
        off += n as u64;
    }
}

/// What a disk should contain: every write goes to the disk and to this buffer.
pub struct Model {
    pub data: Vec<u8>,
    pub sector: u64,
    rng: StdRng,
}

impl Model {
    pub fn new(size: u64, sector: u64, seed: u64) -> Model {
        Model {
            data: vec![0u8; size as usize],
            sector,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Write `len` bytes of random data at `off` to the disk and the model.
    pub fn write(&mut self, disk: &mut dyn VirtualDiskMut, off: u64, len: u64) {
        let mut buf = vec![0u8; len as usize];
        self.rng.fill(&mut buf[..]);
        // Never all zeros by accident: the convert tests rely on written ranges holding data.
        buf[0] |= 1;
        disk.write_at(&buf, off)
            .unwrap_or_else(|e| panic!("write_at({off}, {len}) failed: {e}"));
        self.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }

    pub fn zero(&mut self, disk: &mut dyn VirtualDiskMut, off: u64, len: u64) {
        disk.write_zeroes(off, len)
            .unwrap_or_else(|e| panic!("write_zeroes({off}, {len}) failed: {e}"));
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// A mix every writer must handle: single sectors, a run crossing a block boundary, a
    /// whole block, the last sector, random short runs, and zeroes over written data.
    /// Returns the sectors written (for layer-map checks), as (offset, len) in bytes.
    pub fn scribble(&mut self, disk: &mut dyn VirtualDiskMut, block: u64) -> Vec<(u64, u64)> {
        let s = self.sector;
        let size = self.size();
        let mut done = Vec::new();
        let mut w = |m: &mut Model, off: u64, len: u64, d: &mut Vec<(u64, u64)>| {
            m.write(disk, off, len);
            d.push((off, len));
        };
        w(self, s, s, &mut done);
        w(self, 7 * s, 3 * s, &mut done);
        if block + 2 * s < size {
            w(self, block - 2 * s, 4 * s, &mut done);
        }
        if 4 * block <= size {
            w(self, 3 * block, block, &mut done);
        }
        w(self, size - s, s, &mut done);
        for _ in 0..24 {
            let sectors = size / s;
            let len = self.rng.gen_range(1..=64u64).min(sectors);
            let at = self.rng.gen_range(0..=sectors - len);
            w(self, at * s, len * s, &mut done);
        }
        done
    }
}

/// Every sector inside `written` must be held by the layer (Data or Zero), every other sector
/// must be `Inherited`: a child records exactly what was written to it, at sector granularity.
pub fn assert_layer_exact(what: &str, disk: &dyn VirtualDisk, written: &[(u64, u64)], sector: u64) {
    let size = disk.geometry().virtual_size;
    let mut mine = vec![false; (size / sector) as usize];
    for &(off, len) in written {
        for s in off / sector..(off + len).div_ceil(sector) {
            mine[s as usize] = true;
        }
    }
    let map = disk.map(0, size, MapScope::Layer).unwrap();
    for e in &map {
        for s in e.offset / sector..e.end().div_ceil(sector) {
            let inherited = e.state == ExtentState::Inherited;
            assert!(
                inherited != mine[s as usize],
                "{what}: sector {s} is {:?} in the layer map but was {}written to this layer",
                e.state,
                if mine[s as usize] { "" } else { "not " }
            );
        }
    }
}

/// In a dynamic disk, a block holds `Data` iff the content has a non-zero byte in it.
pub fn assert_sparse_like_content(what: &str, disk: &dyn VirtualDisk, content: &[u8], block: u64) {
    let size = disk.geometry().virtual_size;
    let mut off = 0;
    while off < size {
        let len = block.min(size - off);
        let nonzero = !vdisk_core::io::is_zero(&content[off as usize..(off + len) as usize]);
        let map = disk.map(off, len, MapScope::View).unwrap();
        let has_data = map.iter().any(|e| e.state == ExtentState::Data);
        assert_eq!(
            has_data,
            nonzero,
            "{what}: block at {off} holds {} but the map says {map:?}",
            if nonzero { "data" } else { "only zeros" }
        );
        off += len;
    }
}

/// libvhdi reads a differencing VHD wrongly where a sector-bitmap byte is only partly set (a
/// group of 8 sectors of which a layer holds some but not all): it does not fall through to the
/// parent for the unset sectors (a known libvhdi bug, see docs/formats facts). These are those
/// groups, as byte ranges, for the sectors each child layer wrote.
pub fn libvhdi_vhd_blind_spots(layers: &[Vec<(u64, u64)>], size: u64) -> Vec<(u64, u64)> {
    const S: u64 = 512;
    let mut out = Vec::new();
    for written in layers {
        let mut mine = vec![false; (size / S) as usize];
        for &(off, len) in written {
            for s in off / S..(off + len).div_ceil(S) {
                mine[s as usize] = true;
            }
        }
        for (g, group) in mine.chunks(8).enumerate() {
            let n = group.iter().filter(|&&b| b).count();
            if n > 0 && n < group.len() {
                out.push((g as u64 * 8 * S, group.len() as u64 * S));
            }
        }
    }
    out
}

/// Like [`assert_disk_equals_file`] for small disks, but differences inside `blind` are
/// tolerated (the reference is known to be wrong there); returns how many bytes were skipped.
pub fn assert_disk_equals_file_except(
    what: &str,
    disk: &dyn VirtualDisk,
    raw: &Path,
    blind: &[(u64, u64)],
) -> u64 {
    let ours = read_all(disk);
    let mut theirs = std::fs::read(raw).unwrap();
    assert_eq!(theirs.len(), ours.len(), "{what}: sizes differ");
    let mut skipped = 0;
    for &(off, len) in blind {
        let r = off as usize..(off + len).min(ours.len() as u64) as usize;
        if theirs[r.clone()] != ours[r.clone()] {
            skipped += r.len() as u64;
        }
        theirs[r.clone()].copy_from_slice(&ours[r]);
    }
    assert_same(what, &ours, &theirs);
    skipped
}
