//! `guestfs::extract` on a FAT32 image (mkfs.fat + mtools) whose short directory entries were
//! then edited byte by byte: Windows device names (`AUX.TXT`, `CON`), a drive-letter colon
//! (`C:X.TXT`), a backslash (`A\B.TXT`), and a directory whose first cluster is the root's (a
//! loop). Everything lands escaped inside the target; the loop is reported, neither created nor
//! entered.

mod guestfs_support;

use std::path::Path;
use std::process::Command;

use guestfs::extract::{extract, ExtractOptions};
use guestfs::volume::Volume;
use guestfs_support::*;

/// The byte offset of the 11-byte short name `name` (unique in the image). Directories of this
/// small volume are in its first 4 MiB (after the FATs); scanning only those keeps a debug build quick.
fn find_short(img: &[u8], name: &[u8; 11]) -> usize {
    let hits: Vec<usize> = img[..img.len().min(4 << 20)]
        .windows(11)
        .enumerate()
        .filter(|(_, w)| w == name)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", String::from_utf8_lossy(name));
    hits[0]
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn hostile_fat_short_names_and_a_loop() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("LOOPDIR")).unwrap();
    for i in 1..=4 {
        std::fs::write(src.join(format!("AAAAAAA{i}.TXT")), format!("file {i}")).unwrap();
    }
    std::fs::write(src.join("LOOPDIR/INNER.TXT"), b"inner").unwrap();
    let img = dir.join("fat.img");
    sh(
        &format!(
            "truncate -s 40M '{i}' && mkfs.fat -F 32 -s 1 '{i}' >/dev/null",
            i = img.display()
        ),
        "dosfstools",
    );
    let mut mc = Command::new("mcopy");
    mc.env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(&img);
    for e in std::fs::read_dir(&src).unwrap() {
        mc.arg(e.unwrap().path());
    }
    mc.arg("::/");
    run(&mut mc, "mtools");

    let mut b = std::fs::read(&img).unwrap();
    for (from, to) in [
        (b"AAAAAAA1TXT", b"AUX     TXT"),
        (b"AAAAAAA2TXT", b"C:X     TXT"),
        (b"AAAAAAA3TXT", b"A\\B     TXT"),
        (b"AAAAAAA4TXT", b"CON        "),
    ] {
        let at = find_short(&b, from);
        b[at..at + 11].copy_from_slice(to);
    }
    // LOOPDIR's first cluster becomes 2, the FAT32 root directory's.
    let at = find_short(&b, b"LOOPDIR    ");
    b[at + 20..at + 22].copy_from_slice(&0u16.to_le_bytes());
    b[at + 26..at + 28].copy_from_slice(&2u16.to_le_bytes());
    std::fs::write(&img, &b).unwrap();

    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();
    let outer = dir.join("outer");
    let target = outer.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let report = extract(fs.as_ref(), &["/"], &target, &ExtractOptions::default()).unwrap();

    assert_eq!(listing(&outer), vec!["target".to_string()]);
    assert_eq!(
        listing(&target),
        ["%41UX.TXT", "%43ON", "A%5CB.TXT", "C%3AX.TXT"]
            .map(String::from)
            .to_vec()
    );
    for (host, n) in [
        ("%41UX.TXT", 1),
        ("C%3AX.TXT", 2),
        ("A%5CB.TXT", 3),
        ("%43ON", 4),
    ] {
        assert_eq!(
            std::fs::read(target.join(host)).unwrap(),
            format!("file {n}").as_bytes()
        );
    }
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.path == "/LOOPDIR" && s.reason.contains("loop")),
        "{report:#?}"
    );
    assert_eq!(report.renamed.len(), 4, "{report:#?}");
}
