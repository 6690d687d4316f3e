//! NTFS images built with ntfs-3g (through FUSE, as root) and read back with our reader, checked
//! against the source tree and against Sleuth Kit.

#[path = "ntfs_common.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;

use guestfs::fs::{FileType, GuestFs};
use guestfs::volume::Volume;
use guestfs::Error;

use common::*;

#[test]
fn ntfs_main_image_matches_source_and_sleuthkit() {
    let dir = tempfile::TempDir::new().unwrap();
    let m = build("main", dir.path());
    let img = dir.path().join("main.img");
    let fs = open_file(&img);
    assert_eq!(fs.label().as_deref(), Some("HKMAIN"));
    check_against_manifest(&fs, &m);
    check_against_sleuthkit(&fs, &img, 0);
    check_against_pyfsntfs(
        &fs,
        &img,
        &[
            "wof/text8k.txt",
            "wof/mixed4k.bin",
            "wof/text16k.txt",
            "comp/text.txt",
            "comp/mixed.bin",
            "comp/sparse_comp.bin",
            "sparse.bin",
            "large.bin",
        ],
    );

    // Metadata files are hidden from the root listing but reachable by name.
    let names: Vec<String> = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(!names.iter().any(|n| n.starts_with('$')), "{names:?}");
    assert_eq!(fs.lookup("/$MFT").unwrap(), 0);

    // Case-insensitive lookup through $UpCase (non-ASCII letters too).
    for pair in m["case_lookup"].as_array().unwrap() {
        let a = fs.lookup(pair[0].as_str().unwrap()).unwrap();
        let b = fs.lookup(pair[1].as_str().unwrap()).unwrap();
        assert_eq!(a, b, "{pair:?}");
    }

    // Compressed files carry the attribute and use less space than their size when compressible.
    let text = fs.metadata(fs.lookup("comp/text.txt").unwrap()).unwrap();
    assert_ne!(text.windows_attributes.unwrap() & 0x800, 0);
    assert!(
        text.allocated < text.size / 2,
        "{} of {}",
        text.allocated,
        text.size
    );
    let zeros = fs.metadata(fs.lookup("comp/zeros.bin").unwrap()).unwrap();
    assert_eq!(zeros.allocated, 0);
    // Sparse file: attribute set, almost nothing allocated.
    let sparse = fs.metadata(fs.lookup("sparse.bin").unwrap()).unwrap();
    assert_ne!(sparse.windows_attributes.unwrap() & 0x200, 0);
    assert!(sparse.allocated <= 64 * 1024, "{}", sparse.allocated);
    // Directories carry the directory attribute; hard links share a node with nlink 2.
    let d = fs.metadata(fs.lookup("bigdir").unwrap()).unwrap();
    assert_ne!(d.windows_attributes.unwrap() & 0x10, 0);
    assert_eq!(
        fs.read_dir(fs.lookup("bigdir").unwrap()).unwrap().len(),
        600
    );
    // Link details distinguish relative symlinks, absolute ones and junctions.
    let rel = fs.read_link(fs.lookup("links/sym").unwrap()).unwrap();
    assert!(rel.detail.unwrap().contains("relative"));
    let abs = fs.read_link(fs.lookup("links/abs").unwrap()).unwrap();
    assert!(abs
        .detail
        .unwrap()
        .contains("\\??\\C:\\Windows\\notepad.exe"));
    // Errors are typed.
    assert!(matches!(fs.lookup("nope/none"), Err(Error::NotFound(_))));
    assert!(matches!(
        fs.read_dir(fs.lookup("small.txt").unwrap()),
        Err(Error::NotADirectory(_))
    ));
    assert!(matches!(
        fs.read_link(fs.lookup("small.txt").unwrap()),
        Err(Error::InvalidArgument(_))
    ));
    let ads = fs.lookup("ads.txt").unwrap();
    assert!(matches!(
        fs.read_at(ads, Some("nostream"), &mut [0u8; 4], 0),
        Err(Error::NotFound(_))
    ));
    // Stream names are case-insensitive too.
    assert_eq!(read_all(&fs, ads, Some("SECRET")), b"hidden stream data\n");

    // The same volume inside a GPT partition of a dynamic VHDX, read through vdisk::open.
    need_tool("sgdisk", "gdisk");
    need_tool("qemu-img", "qemu-utils");
    let raw = dir.path().join("disk.raw");
    let image_len = std::fs::metadata(&img).unwrap().len();
    let start = 2048u64 * 512;
    let disk_len = start + image_len + 1024 * 1024;
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(disk_len)
        .unwrap();
    let sectors = image_len / 512;
    let ok = Command::new("sgdisk")
        .args(["-o", "-n", &format!("1:2048:+{sectors}"), "-t", "1:0700"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "sgdisk: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", raw.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
        .status()
        .unwrap();
    assert!(ok.success());
    let vhdx = dir.path().join("disk.vhdx");
    let ok = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
        ])
        .arg(&raw)
        .arg(&vhdx)
        .status()
        .unwrap();
    assert!(ok.success());
    let disk: Arc<dyn vdisk::VirtualDisk> =
        Arc::from(vdisk::open(&vhdx, &vdisk::OpenOptions::default()).unwrap());
    // The partition table reader finds the partition; probing recognises NTFS in it.
    let table = guestfs::partitions(disk.as_ref()).unwrap();
    assert_eq!(table.partitions.len(), 1);
    let p = &table.partitions[0];
    assert_eq!((p.start, p.length), (start, image_len));
    let probed = guestfs::open_fs(Volume::new(disk.clone(), p.start, p.length).unwrap()).unwrap();
    assert_eq!(probed.kind(), guestfs::fs::FsKind::Ntfs);
    assert_eq!(probed.label().as_deref(), Some("HKMAIN"));
    let fs = guestfs::ntfs::open(Volume::new(disk, start, image_len).unwrap()).unwrap();
    check_against_manifest(&fs, &m);
}

#[test]
fn ntfs_fragmented_volume_with_attribute_listed_mft() {
    let dir = tempfile::TempDir::new().unwrap();
    let m = build("frag", dir.path());
    let img = dir.path().join("frag.img");
    // The point of this image: $MFT has an attribute list, and the big directory's index is
    // described across several MFT records. Verify with Sleuth Kit that the builder achieved it.
    let istat = |n: &str| {
        let o = Command::new("istat").arg(&img).arg(n).output().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(
        istat("0").contains("$ATTRIBUTE_LIST"),
        "$MFT has no attribute list:\n{}",
        istat("0")
    );
    let mft_data_records: Vec<String> = istat("0")
        .lines()
        .filter(|l| l.starts_with("Type: 128-"))
        .filter_map(|l| l.split("MFT Entry: ").nth(1))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert!(
        mft_data_records.iter().any(|r| r != "0"),
        "$MFT's $DATA does not continue in an extension record: {mft_data_records:?}"
    );
    let fs = open_file(&img);
    let huge = fs.lookup("hugedir").unwrap();
    let dir_stat = istat(&huge.to_string());
    let mut ia_records: Vec<&str> = dir_stat
        .lines()
        .filter(|l| l.starts_with("Type: 160-"))
        .filter_map(|l| l.split("MFT Entry: ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ia_records.sort();
    ia_records.dedup();
    assert!(
        ia_records.len() >= 2,
        "hugedir's $INDEX_ALLOCATION is not spread over several records:\n{dir_stat}"
    );
    check_against_manifest(&fs, &m);
    check_against_sleuthkit(&fs, &img, 0);
    let entries = fs.read_dir(huge).unwrap();
    assert!(entries.iter().all(|e| e.file_type == FileType::File));
    // Index order is NTFS collation order (upcased names), which for these names is sorted.
    let names: Vec<&String> = entries.iter().map(|e| &e.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

/// A disk that counts the bytes read through it.
struct CountingDisk {
    inner: Box<dyn vdisk::VirtualDisk>,
    bytes: std::sync::atomic::AtomicU64,
}

impl vdisk::VirtualDisk for CountingDisk {
    fn geometry(&self) -> vdisk::Geometry {
        self.inner.geometry()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.bytes
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn map(
        &self,
        offset: u64,
        length: u64,
        scope: vdisk::MapScope,
    ) -> vdisk::Result<Vec<vdisk::Extent>> {
        self.inner.map(offset, length, scope)
    }
    fn info(&self) -> vdisk::DiskInfo {
        self.inner.info()
    }
}

#[test]
fn ntfs_reading_a_file_touches_only_its_clusters() {
    let dir = tempfile::TempDir::new().unwrap();
    let m = build("main", dir.path());
    let img = dir.path().join("main.img");
    let disk = Arc::new(CountingDisk {
        inner: vdisk::open(&img, &vdisk::OpenOptions::default()).unwrap(),
        bytes: Default::default(),
    });
    let fs = guestfs::ntfs::open(Volume::whole(disk.clone())).unwrap();
    let node = fs.lookup("large.bin").unwrap();
    let size = fs.metadata(node).unwrap().size;
    let before = disk.bytes.load(std::sync::atomic::Ordering::Relaxed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut data = Vec::new();
    loop {
        let n = fs.read_at(node, None, &mut buf, off).unwrap();
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    let read = disk.bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
    let src = std::path::PathBuf::from(m["src"].as_str().unwrap()).join("large.bin");
    assert!(data == std::fs::read(src).unwrap());
    // Only the file's clusters (rounded up to whole clusters), nothing else.
    assert!(
        read <= size.div_ceil(4096) * 4096,
        "{read} bytes read for a {size}-byte file"
    );
    // The sparse file costs almost nothing to read: holes are not read from the disk.
    let sparse = fs.lookup("sparse.bin").unwrap();
    let before = disk.bytes.load(std::sync::atomic::Ordering::Relaxed);
    let mut off = 0;
    loop {
        let n = fs.read_at(sparse, None, &mut buf, off).unwrap();
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    assert_eq!(off, 20_000_003);
    let read = disk.bytes.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(read <= 64 * 1024, "{read} bytes read for a sparse file");
}
