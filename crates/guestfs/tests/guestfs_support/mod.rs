//! Shared by the guestfs integration tests: external tools (which must exist: a missing tool
//! fails the test and names the package), a source tree to copy into images, and a walker that
//! reads a whole guest filesystem with loop protection.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use guestfs::fs::{FileType, GuestFs, Metadata, NodeId};

/// Run a command; panic with its output if it fails or is missing (naming the apt package).
pub fn run(cmd: &mut Command, package: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}): install the apt package `{package}` (scripts/test.sh does)",
            cmd.get_program()
        )
    });
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str, package: &str) -> String {
    run(
        Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(script),
        package,
    )
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A source tree with the cases every filesystem must get right: empty, tiny, multi-cluster and
/// multi-MiB files, nested directories, Unicode and long names, a directory of many entries.
pub fn make_tree(root: &Path, many: usize) {
    std::fs::create_dir_all(root.join("docs/deep/deeper")).unwrap();
    std::fs::create_dir_all(root.join("many")).unwrap();
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(root.join("big.bin"), pattern(3 << 20, 1)).unwrap();
    std::fs::write(root.join("docs/odd size.dat"), pattern(12_345, 2)).unwrap();
    std::fs::write(root.join("docs/deep/deeper/leaf.txt"), pattern(70_000, 3)).unwrap();
    std::fs::write(
        root.join("docs/Überlänge Dateiname mit vielen Zeichen.txt"),
        b"unicode",
    )
    .unwrap();
    std::fs::write(root.join("docs/日本語のファイル.txt"), pattern(5000, 4)).unwrap();
    for i in 0..many {
        std::fs::write(
            root.join(format!("many/file-{i:05}.txt")),
            format!("entry {i}\n"),
        )
        .unwrap();
    }
    // Fixed mtimes (even seconds, so FAT's 2 s resolution keeps them exactly).
    sh(
        &format!(
            "find '{}' -exec touch -m -d '2021-03-04 05:06:08 UTC' {{}} +",
            root.display()
        ),
        "coreutils",
    );
}

pub struct Node {
    pub meta: Metadata,
    pub data: Option<Vec<u8>>,
}

/// Read a node's whole main stream in odd-sized pieces (exercises offsets inside clusters).
pub fn read_all(fs: &dyn GuestFs, node: NodeId, size: u64) -> guestfs::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = vec![0u8; 77_777];
    loop {
        let n = fs.read_at(node, None, &mut buf, out.len() as u64)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        assert!(out.len() as u64 <= size, "read past the file's size");
    }
    Ok(out)
}

/// Every path below the root ("/a/b"), with metadata and (for files) content. Directories whose
/// `dir_key` is already on the current path are skipped (loops on hostile volumes).
pub fn walk(fs: &dyn GuestFs) -> guestfs::Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut on_path = HashSet::new();
    walk_dir(fs, fs.root(), String::new(), &mut on_path, &mut out, true)?;
    Ok(out)
}

/// `walk` for hostile images: entry and inode types may disagree there.
pub fn walk_hostile(fs: &dyn GuestFs) -> guestfs::Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut on_path = HashSet::new();
    walk_dir(fs, fs.root(), String::new(), &mut on_path, &mut out, false)?;
    Ok(out)
}

fn walk_dir(
    fs: &dyn GuestFs,
    dir: NodeId,
    prefix: String,
    on_path: &mut HashSet<u64>,
    out: &mut BTreeMap<String, Node>,
    strict: bool,
) -> guestfs::Result<()> {
    let key = fs.dir_key(dir)?;
    if !on_path.insert(key) {
        return Ok(());
    }
    for e in fs.read_dir(dir)? {
        let path = format!("{prefix}/{}", e.name);
        let meta = fs.metadata(e.node)?;
        if strict {
            assert_eq!(
                meta.file_type, e.file_type,
                "{path}: entry type vs metadata type"
            );
        }
        let data = if meta.file_type == FileType::File {
            Some(read_all(fs, e.node, meta.size)?)
        } else {
            None
        };
        let is_dir = meta.file_type == FileType::Directory;
        out.insert(path.clone(), Node { meta, data });
        if is_dir {
            walk_dir(fs, e.node, path, on_path, out, strict)?;
        }
    }
    on_path.remove(&key);
    Ok(())
}

/// The host tree as the same map shape: path -> (is_dir, content, mtime ns).
pub fn host_tree(root: &Path) -> BTreeMap<String, (bool, Option<Vec<u8>>, i128)> {
    let mut out = BTreeMap::new();
    fn rec(root: &Path, dir: &Path, out: &mut BTreeMap<String, (bool, Option<Vec<u8>>, i128)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().to_string_lossy());
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mtime = md
                .modified()
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0);
            if md.is_dir() {
                out.insert(rel, (true, None, mtime));
                rec(root, &p, out);
            } else if md.is_file() {
                out.insert(rel, (false, Some(std::fs::read(&p).unwrap()), mtime));
            }
        }
    }
    rec(root, root, &mut out);
    out
}

pub fn open_raw(path: &Path) -> Arc<dyn vdisk::VirtualDisk> {
    Arc::from(vdisk::open(path, &vdisk::OpenOptions::default()).unwrap())
}

/// `qemu-img convert` a raw image to a dynamic VHDX next to it.
pub fn to_vhdx(raw: &Path) -> PathBuf {
    let out = raw.with_extension("vhdx");
    run(
        Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "-o",
                "subformat=dynamic",
            ])
            .arg(raw)
            .arg(&out),
        "qemu-utils",
    );
    out
}

/// Sleuth Kit's view: path -> inode address string, from `fls -r -p` (files and directories,
/// without TSK's virtual `$` entries and deleted ones).
pub fn tsk_list(img: &Path, offset_sectors: u64, fstype: &str) -> BTreeMap<String, String> {
    let out = run(
        Command::new("fls")
            .args([
                "-r",
                "-p",
                "-u",
                "-o",
                &offset_sectors.to_string(),
                "-f",
                fstype,
            ])
            .arg(img),
        "sleuthkit",
    );
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let Some((head, path)) = line.split_once(":\t") else {
            continue;
        };
        if path.starts_with('$')
            || path.contains("/$")
            || head.contains('*')
            || path.ends_with("(Volume Label Entry)")
        {
            continue;
        }
        let inode = head.split_whitespace().last().unwrap().to_string();
        m.insert(format!("/{path}"), inode);
    }
    m
}

pub fn tsk_cat(img: &Path, offset_sectors: u64, fstype: &str, inode: &str) -> Vec<u8> {
    let out = Command::new("icat")
        .args(["-o", &offset_sectors.to_string(), "-f", fstype])
        .arg(img)
        .arg(inode)
        .output()
        .expect("icat (apt package sleuthkit)");
    assert!(
        out.status.success(),
        "icat {inode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Compare two path lists, printing only the differences.
pub fn assert_same_paths<A: AsRef<str>, B: AsRef<str>>(ours: &[A], theirs: &[B], what: &str) {
    let a: std::collections::BTreeSet<&str> = ours.iter().map(|s| s.as_ref()).collect();
    let b: std::collections::BTreeSet<&str> = theirs.iter().map(|s| s.as_ref()).collect();
    let only_a: Vec<_> = a.difference(&b).collect();
    let only_b: Vec<_> = b.difference(&a).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "{what}: only ours {only_a:?}, only theirs {only_b:?}"
    );
}
