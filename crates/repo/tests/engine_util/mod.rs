//! Helpers for the engine tests (backup, restore, diff, stats): a fast-KDF repository in a
//! temporary directory, disks made by qemu and by hyperkeep, external tools that must exist.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use repo::backend::{Backend, LocalBackend, ObjectKind};
use repo::crypto::KdfParams;
use repo::repository::{InitOptions, Repository};
use vdisk::{CreateOptions, DiskFormat, OpenOptions, VirtualDisk, VirtualDiskMut};

pub const MIB: u64 = 1 << 20;
pub const PASSWORD: &str = "engine test password";

/// A new repository at `dir/repo` with 1 MiB chunks and small (1 MiB) packs, so tests also
/// cross pack boundaries.
pub fn new_repo(dir: &Path) -> Repository {
    new_repo_with_pack(dir, 1 << 20)
}

pub fn new_repo_with_pack(dir: &Path, pack_size: u64) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.join("repo")));
    Repository::init(
        backend,
        PASSWORD,
        InitOptions {
            chunk_size: 1 << 20,
            pack_size,
            compression_level: 1,
            kdf: Some(KdfParams::FAST_FOR_TESTS),
            ..Default::default()
        },
    )
    .expect("init repository")
}

pub fn repo_root(dir: &Path) -> PathBuf {
    dir.join("repo")
}

pub fn count(repo: &Repository, kind: ObjectKind) -> usize {
    repo.backend().list(kind).expect("list").len()
}

/// Run an external tool; a missing tool fails the test with a clear message.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("this test needs `{tool}` (install qemu-utils): cannot run it: {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {text}",
        out.status
    );
    text
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn qemu_fmt(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Vhdx => "vhdx",
        DiskFormat::Vhd => "vpc",
        DiskFormat::Raw => "raw",
    }
}

/// A qemu-made dynamic disk with qemu-io pattern writes: `(pattern, offset, length)`.
pub fn qemu_disk(path: &Path, format: DiskFormat, size: u64, writes: &[(u8, u64, u64)]) {
    let f = qemu_fmt(format);
    let size_arg = size.to_string();
    match format {
        DiskFormat::Vhd => run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                f,
                "-o",
                "subformat=dynamic,force_size=on",
                s(path),
                &size_arg,
            ],
        ),
        _ => run("qemu-img", &["create", "-q", "-f", f, s(path), &size_arg]),
    };
    for &(pat, off, len) in writes {
        let cmd = format!("write -P 0x{pat:02x} {off} {len}");
        run("qemu-io", &["-f", f, "-c", &cmd, s(path)]);
    }
}

/// A hyperkeep-made disk with pattern writes (pattern 0 writes explicit zeros).
pub fn hk_disk(
    path: &Path,
    format: DiskFormat,
    size: u64,
    block_size: Option<u32>,
    writes: &[(u8, u64, u64)],
) {
    let mut opts = CreateOptions::new(format, size);
    opts.block_size = block_size;
    let mut d = vdisk::create(path, &opts).expect("create disk");
    write_patterns(&mut *d, writes);
}

pub fn write_patterns(d: &mut dyn VirtualDiskMut, writes: &[(u8, u64, u64)]) {
    for &(pat, off, len) in writes {
        let buf: Vec<u8> = (0..len)
            .map(|i| if pat == 0 { 0 } else { noise(pat, off + i) })
            .collect();
        d.write_at(&buf, off).expect("write pattern");
    }
    d.flush().expect("flush");
}

/// The guest view of any disk (with its chain), read whole.
pub fn read_view(path: &Path) -> Vec<u8> {
    let d = vdisk::open(path, &OpenOptions::default()).expect("open disk");
    read_disk(&*d)
}

pub fn read_disk(d: &dyn VirtualDisk) -> Vec<u8> {
    let size = d.geometry().virtual_size as usize;
    let mut buf = vec![0u8; size];
    d.read_at(&mut buf, 0).expect("read disk");
    buf
}

/// `qemu-img compare` of two qemu-readable disks (exit 0 = identical).
pub fn qemu_compare(a: &Path, fa: DiskFormat, b: &Path, fb: DiskFormat) {
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            qemu_fmt(fa),
            "-F",
            qemu_fmt(fb),
            s(a),
            s(b),
        ],
    );
}

/// `qemu-img check` must report a clean image.
pub fn qemu_check_clean(path: &Path, format: DiskFormat) {
    let out = run("qemu-img", &["check", "-f", qemu_fmt(format), s(path)]);
    assert!(
        out.contains("No errors were found"),
        "qemu-img check of {} is not clean: {out}",
        path.display()
    );
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Incompressible bytes that depend on the pattern and the disk position: chunks of
/// hyperkeep-made test disks are all different and exercise the raw (not compressed) path.
pub fn noise(pat: u8, pos: u64) -> u8 {
    let mut x = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(pat) << 56 | 0x1234_5678);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    (x as u8) | 1
}

/// Bytes of the chunks (1 MiB) that hold data in a disk's view map: what a full backup reads.
pub fn allocated_chunk_bytes(path: &Path) -> u64 {
    let d = vdisk::open(path, &OpenOptions::default()).expect("open disk");
    let size = d.geometry().virtual_size;
    let mut chunks = std::collections::BTreeSet::new();
    for e in d.map(0, size, vdisk::MapScope::View).expect("map") {
        if e.state.has_data() && e.length > 0 {
            for c in e.offset / MIB..e.end().div_ceil(MIB) {
                chunks.insert(c);
            }
        }
    }
    chunks.iter().map(|c| MIB.min(size - c * MIB)).sum()
}

/// The guest view of a differencing disk as libvhdi (an independent implementation) reads it,
/// written to a raw file: `chain` is the top layer, then its parents nearest first.
pub fn libvhdi_view(chain: &[&Path], out: &Path) {
    const SCRIPT: &str = r#"
import sys, pyvhdi
out, paths = sys.argv[1], sys.argv[2:]
files = []
for p in paths:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
top = files[0]
size = top.get_media_size()
with open(out, "wb") as o:
    off = 0
    while off < size:
        n = min(1 << 20, size - off)
        o.write(top.read_buffer_at_offset(n, off))
        off += n
"#;
    let mut args = vec!["-c", SCRIPT, s(out)];
    args.extend(chain.iter().map(|p| s(p)));
    let out = Command::new("python3")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs python3 with pyvhdi (libvhdi-python): {e}"));
    assert!(
        out.status.success(),
        "libvhdi could not read {chain:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
