//! Shared helpers for the NTFS tests (included with `#[path]` by each test file).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use guestfs::fs::{FileType, GuestFs, NodeId};
use guestfs::ntfs::NtfsFs;
use guestfs::volume::Volume;
use serde_json::Value;

pub fn need_tool(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs `{tool}` (apt package {package}); install it with `apt-get install -y {package}`"
    );
}

pub fn need_root() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the NTFS image tests mount images with ntfs-3g (FUSE) and must run as root"
    );
}

/// Build an image with tests/support/ntfs_build.py; returns its manifest.
pub fn build(kind: &str, dir: &Path) -> Value {
    need_root();
    for (t, p) in [
        ("mkntfs", "ntfs-3g"),
        ("ntfs-3g", "ntfs-3g"),
        ("setfattr", "attr"),
        ("fls", "sleuthkit"),
        ("icat", "sleuthkit"),
        ("istat", "sleuthkit"),
        ("python3", "python3"),
    ] {
        need_tool(t, p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ntfs_build.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(kind)
        .arg(dir)
        .output()
        .expect("run ntfs_build.py");
    assert!(
        out.status.success(),
        "ntfs_build.py {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join(format!("{kind}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn open_file(path: &Path) -> NtfsFs {
    let disk = vdisk::open(path, &vdisk::OpenOptions::default()).unwrap();
    guestfs::ntfs::open(Volume::whole(Arc::from(disk))).unwrap()
}

pub fn read_all(fs: &dyn GuestFs, node: NodeId, stream: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    // Odd-sized reads: they straddle clusters and compression units.
    let mut buf = vec![0u8; 100_003];
    loop {
        let n = fs
            .read_at(node, stream, &mut buf, out.len() as u64)
            .unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Every path below the root (directories, files, links), with its node and type.
pub fn walk(fs: &dyn GuestFs) -> BTreeMap<String, (NodeId, FileType)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), fs.root())];
    let mut seen = HashSet::new();
    while let Some((prefix, dir)) = stack.pop() {
        assert!(seen.insert(dir), "directory node {dir} reached twice");
        for e in fs.read_dir(dir).unwrap() {
            let path = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            assert!(!e.name_lossy, "{path}");
            if e.file_type == FileType::Directory {
                stack.push((path.clone(), e.node));
            }
            out.insert(path, (e.node, e.file_type));
        }
    }
    out
}

/// Compare every entry of a manifest written by ntfs_build.py with what the reader returns.
pub fn check_against_manifest(fs: &dyn GuestFs, m: &Value) {
    let tree = walk(fs);
    let entries = m["entries"].as_object().unwrap();
    let listed: HashSet<&String> = tree.keys().collect();
    let expected: HashSet<&String> = entries.keys().collect();
    let extra: Vec<_> = listed.difference(&expected).take(10).collect();
    let missing: Vec<_> = expected.difference(&listed).take(10).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "listing differs from the source tree: {} listed, {} expected; extra {extra:?}, missing {missing:?}",
        listed.len(),
        expected.len()
    );
    let src = PathBuf::from(m["src"].as_str().unwrap());
    let streams = PathBuf::from(m["streams"].as_str().unwrap());
    for (path, e) in entries {
        let (node, ty) = tree[path];
        assert_eq!(fs.lookup(path).unwrap(), node, "{path}");
        let md = fs.metadata(node).unwrap();
        assert_eq!(md.file_type, ty, "{path}: type in listing and metadata");
        if let Some(t) = e.get("mtime").and_then(Value::as_i64) {
            assert_eq!(md.mtime, Some(t as i128), "{path}: mtime");
            let at = e["atime"].as_i64().unwrap();
            assert_eq!(md.atime, Some(at as i128), "{path}: atime");
        }
        match e["type"].as_str().unwrap() {
            "directory" => assert_eq!(ty, FileType::Directory, "{path}"),
            "file" => {
                assert_eq!(ty, FileType::File, "{path}");
                let want = std::fs::read(src.join(path)).unwrap();
                assert_eq!(md.size, want.len() as u64, "{path}: size");
                assert_eq!(md.size, e["size"].as_u64().unwrap(), "{path}: size");
                let got = read_all(fs, node, None);
                assert!(got == want, "{path}: content differs");
                if let Some(n) = e.get("nlink").and_then(Value::as_u64) {
                    assert_eq!(md.nlink as u64, n, "{path}: nlink");
                }
                if let Some(other) = e.get("same_as").and_then(Value::as_str) {
                    assert_eq!(fs.lookup(other).unwrap(), node, "{path}: hard link");
                }
                let want_streams: BTreeMap<String, String> = e["streams"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let is_wof = e.get("wof").and_then(Value::as_bool).unwrap_or(false);
                let got_names: Vec<&String> = md
                    .streams
                    .iter()
                    .map(|s| &s.name)
                    .filter(|n| !(is_wof && *n == "WofCompressedData"))
                    .collect();
                let want_names: Vec<&String> = want_streams.keys().collect();
                let mut got_sorted = got_names.clone();
                got_sorted.sort();
                assert_eq!(got_sorted, want_names, "{path}: stream names");
                for s in md
                    .streams
                    .iter()
                    .filter(|s| want_streams.contains_key(&s.name))
                {
                    let want = std::fs::read(streams.join(&want_streams[&s.name])).unwrap();
                    assert_eq!(s.size, want.len() as u64, "{path}:{}", s.name);
                    assert!(
                        read_all(fs, node, Some(&s.name)) == want,
                        "{path}:{} content",
                        s.name
                    );
                }
            }
            "wof-refused" => {
                assert_eq!(ty, FileType::File, "{path}");
                assert_eq!(md.size, e["size"].as_u64().unwrap(), "{path}: size");
                match fs.read_at(node, None, &mut [0u8; 16], 0) {
                    Err(guestfs::Error::Unsupported { detail, .. }) => {
                        let name = path.rsplit('/').next().unwrap();
                        assert!(detail.contains(&format!("'{name}'")), "{detail}");
                        assert!(detail.contains("WOF") && detail.contains("LZX"), "{detail}");
                    }
                    other => panic!("{path}: WOF file must be refused, got {other:?}"),
                }
                assert!(md.streams.iter().any(|s| s.name == "WofCompressedData"));
            }
            "symlink" => {
                assert_eq!(ty, FileType::Symlink, "{path}");
                let l = fs.read_link(node).unwrap();
                assert_eq!(l.target, e["target"].as_str().unwrap(), "{path}");
            }
            "junction" => {
                assert_eq!(ty, FileType::Junction, "{path}");
                let l = fs.read_link(node).unwrap();
                assert_eq!(l.target, e["target"].as_str().unwrap(), "{path}");
                assert!(l.detail.unwrap().contains("junction"));
            }
            other => panic!("unknown manifest type {other}"),
        }
    }
}

/// Compare with Sleuth Kit: every path `fls -r -p -m /` lists (main streams and ADS, metadata
/// files excluded) must exist in our reader with the same MFT number, size, timestamps (seconds)
/// and bytes (`icat`).
pub fn check_against_sleuthkit(fs: &dyn GuestFs, image: &Path, offset_sectors: u64) {
    let off = offset_sectors.to_string();
    let out = Command::new("fls")
        .args(["-o", &off, "-r", "-p", "-m", "/"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut checked = 0;
    // Sizes and times are compared for every line; bytes through `icat` (one process each) for
    // every stream and big file, and a sample of the thousands of tiny files.
    let step = (text.lines().count() / 300).max(1);
    for (index, line) in text.lines().enumerate() {
        // MD5|name|inode|mode|UID|GID|size|atime|mtime|ctime|crtime
        let f: Vec<&str> = line.split('|').collect();
        let name = f[1].strip_prefix('/').unwrap();
        if name.starts_with('$') || name.ends_with(" ($FILE_NAME)") || f[2].contains("-144-") {
            continue;
        }
        let (path, stream) = match name.rsplit_once(':') {
            Some((p, s)) => (p, Some(s)),
            None => (name, None),
        };
        let inode: u64 = f[2].split('-').next().unwrap().parse().unwrap();
        let node = fs.lookup(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(node, inode, "{path}: MFT number (oracle)");
        let md = fs.metadata(node).unwrap();
        let secs = |t: Option<i128>| t.map(|t| t.div_euclid(1_000_000_000) as i64);
        assert_eq!(
            secs(md.atime),
            Some(f[7].parse().unwrap()),
            "{path}: atime (oracle)"
        );
        assert_eq!(
            secs(md.mtime),
            Some(f[8].parse().unwrap()),
            "{path}: mtime (oracle)"
        );
        assert_eq!(
            secs(md.ctime),
            Some(f[9].parse().unwrap()),
            "{path}: ctime (oracle)"
        );
        assert_eq!(
            secs(md.btime),
            Some(f[10].parse().unwrap()),
            "{path}: crtime (oracle)"
        );
        if f[3].starts_with("d/d") || md.file_type != FileType::File {
            continue;
        }
        let size: u64 = f[6].parse().unwrap();
        let our_size = match stream {
            None => md.size,
            Some(s) => md.streams.iter().find(|x| x.name == s).unwrap().size,
        };
        assert_eq!(our_size, size, "{name}: size (oracle)");
        if stream.is_none() && size <= 65536 && index % step != 0 {
            continue;
        }
        if stream.is_none() && md.streams.iter().any(|s| s.name == "WofCompressedData") {
            // Sleuth Kit does not decode WOF; libfsntfs checks those (check_against_pyfsntfs).
            continue;
        }
        if stream.is_none()
            && matches!(
                fs.read_at(node, None, &mut [0u8; 1], 0),
                Err(guestfs::Error::Unsupported { .. })
            )
        {
            // Refused on purpose (WOF); the manifest check asserts which file and why.
            continue;
        }
        let ours = read_all(fs, node, stream);
        assert_eq!(ours.len() as u64, size, "{name}: bytes read (oracle)");
        let cat = Command::new("icat")
            .args(["-o", &off])
            .arg(image)
            .arg(f[2])
            .output()
            .unwrap();
        assert!(cat.status.success(), "icat {name}");
        assert!(cat.stdout == ours, "{name}: bytes differ from icat");
        checked += 1;
    }
    assert!(checked > 10, "Sleuth Kit listed only {checked} streams");
}

/// Compare main streams with libfsntfs (PyPI `libfsntfs-python`), which decodes LZNT1 and WOF
/// (XPRESS Huffman) on its own.
pub fn check_against_pyfsntfs(fs: &dyn GuestFs, image: &Path, paths: &[&str]) {
    let ok = Command::new("python3")
        .args(["-c", "import pyfsntfs"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs the Python module pyfsntfs: `pip install libfsntfs-python`"
    );
    let script = r#"
import sys, pyfsntfs
v = pyfsntfs.volume()
v.open(sys.argv[1])
e = v.get_file_entry_by_path("\\" + sys.argv[2].replace("/", "\\"))
sys.stdout.buffer.write(e.read_buffer(e.get_size()) if e.get_size() else b"")
"#;
    for path in paths {
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(image)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pyfsntfs {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let node = fs.lookup(path).unwrap();
        assert!(
            read_all(fs, node, None) == out.stdout,
            "{path}: bytes differ from libfsntfs"
        );
    }
}
