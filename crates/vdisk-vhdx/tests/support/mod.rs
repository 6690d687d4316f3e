//! Helpers for the writer tests: an on-disk model of the expected content, and the independent
//! readers (qemu-img, libvhdi) the files we write are checked with.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_core::VirtualDisk;

/// What the disk must contain: a sparse raw file mirrored by every write.
pub struct Model {
    pub path: PathBuf,
    file: File,
    pub size: u64,
}

impl Model {
    pub fn new(dir: &Path, name: &str, size: u64) -> Model {
        let path = dir.join(format!("{name}.model"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Model { path, file, size }
    }

    /// A copy of another model (a child starts as its parent's content).
    pub fn copy_of(other: &Model, dir: &Path, name: &str) -> Model {
        let path = dir.join(format!("{name}.model"));
        std::fs::copy(&other.path, &path).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        Model {
            path,
            file,
            size: other.size,
        }
    }

    pub fn write(&self, buf: &[u8], off: u64) {
        self.file.write_all_at(buf, off).unwrap();
    }

    pub fn read(&self, buf: &mut [u8], off: u64) {
        self.file.read_exact_at(buf, off).unwrap();
    }
}

const CHUNK: usize = 4 << 20;

/// First offset where two readers differ, if any.
fn first_difference(
    size: u64,
    mut a: impl FnMut(&mut [u8], u64),
    mut b: impl FnMut(&mut [u8], u64),
) -> Option<u64> {
    let mut x = vec![0u8; CHUNK];
    let mut y = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(CHUNK as u64) as usize;
        a(&mut x[..n], pos);
        b(&mut y[..n], pos);
        if x[..n] != y[..n] {
            let i = (0..n).find(|&i| x[i] != y[i]).unwrap_or(0);
            return Some(pos + i as u64);
        }
        pos += n as u64;
    }
    None
}

/// Assert a disk (read through our reader) equals the model.
pub fn assert_disk_equals_model(disk: &dyn VirtualDisk, model: &Model, what: &str) {
    assert_eq!(disk.geometry().virtual_size, model.size, "{what}: size");
    let d = first_difference(
        model.size,
        |b, o| disk.read_at(b, o).unwrap(),
        |b, o| model.read(b, o),
    );
    assert_eq!(
        d, None,
        "{what}: hyperkeep's read differs from the model at this offset"
    );
}

/// Assert a raw file (from qemu-img or libvhdi) equals the model.
pub fn assert_file_equals_model(path: &Path, model: &Model, what: &str) {
    let f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), model.size, "{what}: size");
    let d = first_difference(
        model.size,
        |b, o| f.read_exact_at(b, o).unwrap(),
        |b, o| model.read(b, o),
    );
    assert_eq!(d, None, "{what}: differs from the model at this offset");
}

fn run(cmd: &mut Command, what: &str) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e}); the writer tests need qemu-utils and python3 with pyvhdi (pip install libvhdi-python)"));
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img check` must find nothing wrong.
pub fn qemu_check(path: &Path) {
    let out = run(
        Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(path),
        "qemu-img check",
    );
    assert!(out.contains("No errors"), "qemu-img check: {out}");
}

/// qemu-img's view of the disk as a raw file.
pub fn qemu_raw(path: &Path, out: &Path) {
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(path)
            .arg(out),
        "qemu-img convert",
    );
}

/// libvhdi's view of a chain (top first) as a raw file.
pub fn vhdi_raw(chain: &[&Path], out: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/vhdi_read.py");
    run(
        Command::new("python3").arg(script).arg(out).args(chain),
        "libvhdi (tests/support/vhdi_read.py)",
    );
}

/// Deterministic pseudo-random numbers (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A buffer with a recognisable, position-dependent pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed) % 251) as u8 + 1)
        .collect()
}
