//! `guestfs::extract` on an ext4 image built by `mke2fs -d` and then edited byte by byte to
//! hold hostile names (`..`, `.`, `a/b`, a NUL), a duplicate name shadowing a symlink, a
//! directory loop, symlinks to `/etc/passwd` and `../../..`, plus Windows-hostile names
//! (`a\b`, `C:x`, `CON`, `aux.txt`, trailing dot): nothing is written outside the target,
//! existing files survive, normal files come out with the right bytes and times.

mod guestfs_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use guestfs::extract::{extract, unsanitize_name, ExtractOptions, SymlinkMode};
use guestfs::volume::Volume;
use guestfs_support::*;

/// Every path under `root` (symlinks not followed) with its kind and content.
fn snapshot_tree(root: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == skip {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            let v = if md.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else if md.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!(
                    "file {:?} {:?}",
                    std::fs::read(&p).unwrap(),
                    md.modified().ok()
                )
            };
            out.insert(p, v);
        }
    }
    out
}

/// Replace the directory-entry name `from` (preceded by its name_len and file_type bytes)
/// with `to` (same length) at its single occurrence in the image.
fn rename_entry(img: &mut [u8], from: &[u8], file_type: u8, to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut needle = vec![from.len() as u8, file_type];
    needle.extend_from_slice(from);
    let hits: Vec<usize> = img
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "entry {from:?} found {} times", hits.len());
    img[hits[0] + 2..hits[0] + 2 + to.len()].copy_from_slice(to);
    hits[0]
}

fn build_image(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("docs/sub")).unwrap();
    std::fs::create_dir_all(src.join("LOOPDIR")).unwrap();
    std::fs::create_dir_all(src.join("evil3")).unwrap();
    std::fs::write(src.join("evil3/pwned.txt"), b"must stay inside").unwrap();
    std::fs::write(src.join("normal.txt"), b"hello normal\n").unwrap();
    std::fs::write(src.join("docs/sub/deep.bin"), pattern(300_000, 7)).unwrap();
    // A sparse file: 3 MiB with data only in the middle.
    {
        let f = std::fs::File::create(src.join("sparse.bin")).unwrap();
        f.set_len(3 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern(5000, 3), 1 << 20).unwrap();
    }
    for n in [
        "a\\b",
        "C:x",
        "CON",
        "aux.txt",
        "trail.",
        "tab\there",
        "100%",
    ] {
        std::fs::write(src.join(n), n.as_bytes()).unwrap();
    }
    for n in ["Qd", "Q", "aSb", "aN"] {
        std::fs::write(src.join(n), format!("crafted {n}")).unwrap();
    }
    std::os::unix::fs::symlink("/etc/passwd", src.join("evil1")).unwrap();
    std::os::unix::fs::symlink("../../..", src.join("evil2")).unwrap();
    std::fs::hard_link(src.join("normal.txt"), src.join("docs/hardlink.txt")).unwrap();
    sh(
        &format!(
            "cd '{}' && find . -exec touch -h -m -d '2022-05-06 07:08:09 UTC' {{}} +",
            src.display()
        ),
        "coreutils",
    );
    let img = dir.join("ext4.img");
    // No metadata_csum: the raw name edits below would break directory block checksums.
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^metadata_csum,^dir_index",
                "-d",
            ])
            .arg(&src)
            .arg(&img)
            .arg("16M"),
        "e2fsprogs",
    );
    let mut bytes = std::fs::read(&img).unwrap();
    rename_entry(&mut bytes, b"Qd", 1, b"..");
    rename_entry(&mut bytes, b"Q", 1, b".");
    rename_entry(&mut bytes, b"aSb", 1, b"a/b");
    rename_entry(&mut bytes, b"aN", 1, b"a\0");
    // A second entry named like the symlink evil2, a directory holding a file.
    rename_entry(&mut bytes, b"evil3", 2, b"evil2");
    // LOOPDIR points at the root directory (inode 2): a loop.
    let at = rename_entry(&mut bytes, b"LOOPDIR", 2, b"LOOPDIR");
    bytes[at - 6..at - 2].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    (img, src)
}

#[test]
fn hostile_ext_names_never_escape_the_target() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (img, src) = build_image(tmp.path());
    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();

    let outer = tmp.path().join("outer");
    let target = outer.join("target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("normal.txt"), b"OLD").unwrap();
    std::fs::write(outer.join("sibling.txt"), b"sibling").unwrap();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let before = snapshot_tree(tmp.path(), &target);

    let opts = ExtractOptions::default();
    let report = extract(fs.as_ref(), &["/"], &target, &opts).unwrap();

    // Nothing outside the target changed.
    assert_eq!(snapshot_tree(tmp.path(), &target), before);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    // The existing file was not overwritten, and that is reported.
    assert_eq!(std::fs::read(target.join("normal.txt")).unwrap(), b"OLD");
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.path == "/normal.txt" && s.reason.contains("exists")),
        "{:#?}",
        report.skipped
    );
    // The loop was reported, not entered.
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.path == "/LOOPDIR" && s.reason.contains("loop")),
        "{:#?}",
        report.skipped
    );
    // Every host name under the target decodes back to a plain component; no host entry is a
    // reserved name or a dot-name; the escaped names hold the right bytes.
    for (p, _) in snapshot_tree(&target, Path::new("/nonexistent")) {
        let name = p.file_name().unwrap().to_str().unwrap();
        let base = name.split("%%").next().unwrap();
        assert!(unsanitize_name(base).is_some(), "{name}");
        assert!(p.starts_with(&target));
    }
    for (guest, host) in [
        ("a\\b", "a%5Cb"),
        ("C:x", "C%3Ax"),
        ("CON", "%43ON"),
        ("aux.txt", "%61ux.txt"),
        ("trail.", "trail%2E"),
        ("tab\there", "tab%09here"),
        ("100%", "100%25"),
    ] {
        assert_eq!(std::fs::read(target.join(host)).unwrap(), guest.as_bytes());
    }
    // The crafted names: what the ext reader lists is escaped, never interpreted.
    for (crafted, host) in [("a/b", "a%2Fb"), ("a\0", "a%00")] {
        let p = target.join(host);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            format!("crafted {}", if crafted == "a/b" { "aSb" } else { "aN" }).as_bytes(),
            "{crafted:?}"
        );
    }
    for h in ["%2E%2E", "%2E"] {
        if let Ok(b) = std::fs::read(target.join(h)) {
            assert!(b.starts_with(b"crafted"));
        }
    }
    // Symlinks are recreated with their text, never followed.
    assert_eq!(
        std::fs::read_link(target.join("evil1")).unwrap(),
        Path::new("/etc/passwd")
    );
    // evil2 is either the symlink or the directory (whichever came first); the other is refused.
    let e2 = std::fs::symlink_metadata(target.join("evil2")).unwrap();
    if e2.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(target.join("evil2")).unwrap(),
            Path::new("../../..")
        );
        assert!(
            report.skipped.iter().any(|s| s.path == "/evil2"),
            "{:#?}",
            report.skipped
        );
    } else {
        assert_eq!(
            std::fs::read(target.join("evil2/pwned.txt")).unwrap(),
            b"must stay inside"
        );
    }
    // Normal files: bytes, times, sparseness, hard links.
    let want_time = UNIX_EPOCH + Duration::from_secs(1_651_820_889);
    for rel in ["docs/sub/deep.bin", "sparse.bin", "docs/hardlink.txt"] {
        let got = std::fs::read(target.join(rel)).unwrap();
        let want = std::fs::read(src.join(rel)).unwrap();
        assert!(got == want, "{rel} differs");
    }
    let md = std::fs::metadata(target.join("docs/sub/deep.bin")).unwrap();
    assert_eq!(md.modified().unwrap(), want_time);
    assert_eq!(
        std::fs::metadata(target.join("docs/sub"))
            .unwrap()
            .modified()
            .unwrap(),
        want_time
    );
    use std::os::unix::fs::MetadataExt;
    let sp = std::fs::metadata(target.join("sparse.bin")).unwrap();
    assert!(
        sp.blocks() * 512 <= (1 << 20) + 65536,
        "sparse.bin takes {} bytes",
        sp.blocks() * 512
    );
    assert!(report.hard_links == 0 || report.hard_links == 1);
    assert!(report.files >= 10, "{report:#?}");

    // Second run with overwrite: the existing regular file is replaced; symlinks stay links.
    let opts = ExtractOptions {
        overwrite: true,
        ..ExtractOptions::default()
    };
    extract(fs.as_ref(), &["/normal.txt"], &target, &opts).unwrap();
    assert_eq!(
        std::fs::read(target.join("normal.txt")).unwrap(),
        b"hello normal\n"
    );
    assert_eq!(snapshot_tree(tmp.path(), &target), before);

    // Text-file symlinks.
    let t2 = tmp.path().join("t2");
    let opts = ExtractOptions {
        symlinks: SymlinkMode::TextFile,
        ..ExtractOptions::default()
    };
    extract(fs.as_ref(), &["/evil1"], &t2, &opts).unwrap();
    assert_eq!(
        std::fs::read(t2.join("evil1.symlink")).unwrap(),
        b"/etc/passwd\n"
    );
}

#[test]
fn a_host_symlink_in_the_way_is_never_written_through() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (img, _src) = build_image(tmp.path());
    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();
    let target = tmp.path().join("target");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // The host has docs -> elsewhere: extracting /docs must not write into elsewhere.
    std::os::unix::fs::symlink(&elsewhere, target.join("docs")).unwrap();
    let report = extract(
        fs.as_ref(),
        &["/docs/sub/deep.bin"],
        &target,
        &ExtractOptions::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(
        report.skipped.iter().any(|s| s.reason.contains("symlink")),
        "{report:#?}"
    );
    // A missing guest path is an error that names it.
    let e = extract(fs.as_ref(), &["/nope"], &target, &ExtractOptions::default()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}
