//! Shared test helpers: the independent implementations we compare against (qemu-img, qemu-io,
//! libvhdi through python3/pyvhdi). A missing tool fails the test with a message saying what to
//! install; nothing is skipped silently.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_core::VirtualDisk;

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what} ({e}); install it: apt-get install qemu-utils python3, pip install libvhdi-python")
    });
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img create -f vpc -o OPTS FILE SIZE`.
pub fn qemu_create(path: &Path, opts: &str, size: u64) {
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", opts])
            .arg(path)
            .arg(size.to_string()),
        "qemu-img create",
    );
}

/// `qemu-io -f vpc -c 'write -P PAT OFF LEN' FILE`.
pub fn qemu_write(path: &Path, pattern: u8, off: u64, len: u64) {
    run(
        Command::new("qemu-io")
            .args(["-f", "vpc", "-c"])
            .arg(format!("write -P {pattern:#x} {off} {len}"))
            .arg(path),
        "qemu-io",
    );
}

/// The guest view of a VHD according to qemu: `qemu-img convert -f vpc -O raw`.
pub fn qemu_read(path: &Path) -> Vec<u8> {
    let out = path.with_extension("qemu.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(path)
            .arg(&out),
        "qemu-img convert",
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Virtual size according to `qemu-img info -f vpc --output=json`.
pub fn qemu_size(path: &Path) -> u64 {
    let out = run(
        Command::new("qemu-img")
            .args(["info", "-f", "vpc", "--output=json"])
            .arg(path),
        "qemu-img info",
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let i = s
        .rfind("\"virtual-size\":")
        .expect("virtual-size in qemu-img info");
    s[i + 15..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vhdi_read.py")
}

/// The guest view according to libvhdi; `chain` is the child first, its parents after it.
pub fn libvhdi_read(chain: &[&Path]) -> Vec<u8> {
    let out = chain[0].with_extension("vhdi.raw");
    run(
        Command::new("python3").arg(script()).arg(&out).args(chain),
        "python3 with pyvhdi (libvhdi-python)",
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Our full read of a disk.
pub fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let size = d.geometry().virtual_size as usize;
    let mut v = vec![0u8; size];
    // Odd-sized chunks so reads cross block and sector boundaries.
    let chunk = 3 * 1024 * 1024 + 512 * 7 + 3;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        d.read_at(&mut v[off..off + n], off as u64).unwrap();
        off += n;
    }
    v
}

/// First differing offset, for readable failures.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:#04x}, want {:#04x}",
            i / 512,
            got[i],
            want[i]
        );
    }
}
