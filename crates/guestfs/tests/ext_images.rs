//! ext2/3/4 images built by `mke2fs -d` from a source tree with symlinks, hard links, holes,
//! xattrs, owners and modes (and `e2fsck -fyD` for htree directories), checked against the tree,
//! Sleuth Kit and debugfs; hostile variants must fail cleanly.

mod guestfs_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use guestfs::fs::{FileType, FsKind, GuestFs};
use guestfs::volume::Volume;
use guestfs_support::*;

const LONG_TARGET: &str =
    "docs/deep/deeper/../../../docs/deep/deeper/leaf.txt-this-target-is-longer-than-sixty-bytes";

fn make_ext_tree(root: &Path, many: usize) {
    make_tree(root, many);
    std::os::unix::fs::symlink("hello.txt", root.join("short-link")).unwrap();
    std::os::unix::fs::symlink(LONG_TARGET, root.join("long-link")).unwrap();
    std::fs::hard_link(root.join("hello.txt"), root.join("docs/hardlink.txt")).unwrap();
    // A sparse file: data, a 5 MiB hole, data, and a hole at the end.
    sh(
        &format!(
            "cd '{}' && printf start > sparse.bin && printf middle | dd of=sparse.bin bs=1 seek=5242880 conv=notrunc status=none && truncate -s 9000000 sparse.bin",
            root.display()
        ),
        "coreutils",
    );
    sh(
        &format!(
            "cd '{}' && setfattr -n user.small -v hello hello.txt && setfattr -n user.big -v 0x{} big.bin && setfattr -n trusted.t -v 1 docs",
            root.display(),
            "ab".repeat(3000)
        ),
        "attr",
    );
    std::fs::set_permissions(
        root.join("hello.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("docs/odd size.dat"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("docs/odd size.dat"), Some(1234), Some(5678)).unwrap();
    sh(
        &format!(
            "touch -h -m -d '2022-01-02 03:04:05.123456789 UTC' '{}'/sparse.bin '{}'/short-link",
            root.display(),
            root.display()
        ),
        "coreutils",
    );
}

fn make_ext(dir: &Path, fstype: &str, many: usize) -> (PathBuf, PathBuf) {
    let src = dir.join(format!("src-{fstype}"));
    make_ext_tree(&src, many);
    let img = dir.join(format!("{fstype}.img"));
    // "ext4+inline": small files and directories stored inside their inodes.
    let (t, features) = match fstype.split_once('+') {
        Some((t, _)) => (t, "inline_data"),
        None => (fstype, "^inline_data"),
    };
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-O",
                features,
                "-t",
                t,
                "-b",
                "4096",
                "-L",
                &format!("lbl-{fstype}"),
                "-I",
                "256",
                "-d",
            ])
            .arg(&src)
            .arg(&img)
            .arg("64M"),
        "e2fsprogs",
    );
    // Nanoseconds: mke2fs drops them, so set some (123456789 ns) with debugfs.
    run(
        Command::new("debugfs")
            .args(["-w", "-R", "sif /sparse.bin mtime_extra 0x1d6f3454"])
            .arg(&img),
        "e2fsprogs",
    );
    // -D rebuilds (and indexes) directories; exit code 1 means "changed something".
    let st = Command::new("e2fsck")
        .arg("-fyD")
        .arg(&img)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert!(
        matches!(st.status.code(), Some(0) | Some(1)),
        "e2fsck: {st:?}"
    );
    (src, img)
}

/// `trailing_hole_cut`: mke2fs -d with inline_data drops a sparse file's trailing hole (an
/// e2fsprogs quirk, debugfs shows the shorter size too), so /sparse.bin's size is not compared.
fn compare(fs: &dyn GuestFs, src: &Path, img: &Path, trailing_hole_cut: bool) {
    let guest = walk(fs).unwrap();
    let mut host = Vec::new();
    sh(
        &format!(
            "cd '{}' && find . -mindepth 1 | sort > ../list-{}",
            src.display(),
            src.file_name().unwrap().to_string_lossy()
        ),
        "findutils",
    );
    let list = std::fs::read_to_string(src.parent().unwrap().join(format!(
        "list-{}",
        src.file_name().unwrap().to_string_lossy()
    )))
    .unwrap();
    for l in list.lines() {
        host.push(format!("/{}", &l[2..]));
    }
    host.sort();
    let gk: Vec<_> = guest
        .keys()
        .filter(|k| !k.starts_with("/lost+found"))
        .cloned()
        .collect();
    assert_same_paths(&gk, &host, "guest vs source");
    for p in &host {
        let hp = src.join(&p[1..]);
        let hm = std::fs::symlink_metadata(&hp).unwrap();
        let g = &guest[p];
        assert_eq!(g.meta.mode, Some(hm.mode()), "{p}: mode");
        assert_eq!(g.meta.uid, Some(hm.uid()), "{p}: uid");
        assert_eq!(g.meta.gid, Some(hm.gid()), "{p}: gid");
        // mke2fs -d keeps whole seconds of files' mtimes (directories get the copy time; they
        // are checked against debugfs below).
        if !hm.is_dir() && p != "/sparse.bin" {
            assert_eq!(
                g.meta.mtime,
                Some(hm.mtime() as i128 * 1_000_000_000),
                "{p}: mtime"
            );
        }
        if hm.is_file() && !(trailing_hole_cut && p == "/sparse.bin") {
            assert_eq!(g.meta.nlink, hm.nlink() as u32, "{p}: nlink");
            assert_eq!(g.meta.size, hm.len(), "{p}: size");
            assert!(
                g.data.as_ref().unwrap() == &std::fs::read(&hp).unwrap(),
                "{p}: content"
            );
            // xattrs: names as the host has them (getfattr is a process per file: skip many/).
            if p.starts_with("/many/") {
                assert!(g.meta.xattrs.is_empty());
                continue;
            }
            let names = sh(
                &format!(
                    "getfattr -m - --absolute-names -d '{}' | grep = | cut -d= -f1 || true",
                    hp.display()
                ),
                "attr",
            );
            let mut want: Vec<String> = names
                .lines()
                .map(str::to_string)
                .filter(|n| !n.starts_with("security."))
                .collect();
            want.sort();
            let mut have = g.meta.xattrs.clone();
            have.sort();
            assert_eq!(have, want, "{p}: xattrs");
        }
        if hm.file_type().is_symlink() {
            assert_eq!(g.meta.file_type, FileType::Symlink);
            let t = fs.read_link(g.meta.node).unwrap();
            assert_eq!(
                t.target,
                std::fs::read_link(&hp).unwrap().to_string_lossy(),
                "{p}"
            );
        }
    }
    // Times against debugfs (seconds and the extra word with epoch bits and nanoseconds).
    for p in ["/docs", "/sparse.bin", "/many", "/short-link"] {
        let st = run(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat {p}"))
                .arg(img),
            "e2fsprogs",
        );
        for (field, got) in [
            ("mtime", guest[p].meta.mtime),
            ("ctime", guest[p].meta.ctime),
            ("atime", guest[p].meta.atime),
            ("crtime", guest[p].meta.btime),
        ] {
            let line = st
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{field}:")))
                .unwrap();
            let hex = line.split_whitespace().nth(1).unwrap();
            let (secs, extra) = hex.split_once(':').unwrap();
            let secs =
                u32::from_str_radix(secs.trim_start_matches("0x"), 16).unwrap() as i32 as i128;
            let extra = u32::from_str_radix(extra, 16).unwrap();
            let want =
                (secs + (((extra & 3) as i128) << 32)) * 1_000_000_000 + (extra >> 2) as i128;
            assert_eq!(got, Some(want), "{p} {field} vs debugfs");
        }
    }
    assert_eq!(
        guest["/sparse.bin"].meta.mtime,
        Some(1_641_092_645_123_456_789)
    );
    // Hard links share the inode.
    assert_eq!(
        guest["/hello.txt"].meta.node,
        guest["/docs/hardlink.txt"].meta.node
    );
    assert_eq!(guest["/hello.txt"].meta.nlink, 2);
    // xattr values.
    let n = guest["/hello.txt"].meta.node;
    let mut v = [0u8; 64];
    let k = fs.read_at(n, Some("user.small"), &mut v, 0).unwrap();
    assert_eq!(&v[..k], b"hello");
    let n = guest["/big.bin"].meta.node;
    let mut v = vec![0u8; 4000];
    let k = fs.read_at(n, Some("user.big"), &mut v, 0).unwrap();
    assert_eq!(&v[..k], &[0xab; 3000][..]);
    // The sparse file uses far less than its size.
    let s = &guest["/sparse.bin"].meta;
    if !trailing_hole_cut {
        assert_eq!(s.size, 9_000_000);
    }
    assert!(s.allocated <= 64 << 10, "sparse allocated {}", s.allocated);
}

fn compare_tsk(fs: &dyn GuestFs, img: &Path) {
    let guest = walk(fs).unwrap();
    let tsk = tsk_list(img, 0, "ext");
    let tk: Vec<_> = tsk
        .keys()
        .filter(|k| !k.starts_with("/lost+found"))
        .collect();
    let gk: Vec<_> = guest
        .keys()
        .filter(|k| !k.starts_with("/lost+found"))
        .collect();
    assert_same_paths(&gk, &tk, "guest vs fls");
    for (i, (p, inode)) in tsk.iter().enumerate() {
        if p.starts_with("/many/") && i % 211 != 0 {
            continue;
        }
        if let Some(g) = guest.get(p) {
            assert_eq!(g.meta.node.to_string(), *inode, "{p}: inode number");
            if let Some(d) = &g.data {
                assert!(tsk_cat(img, 0, "ext", inode) == *d, "{p}: icat differs");
            }
        }
    }
}

#[test]
fn ext4_ext3_ext2_match_source_sleuthkit_and_debugfs() {
    let tmp = tempfile::tempdir().unwrap();
    for (fstype, kind, many) in [
        ("ext4", FsKind::Ext4, 3000usize),
        ("ext3", FsKind::Ext3, 300),
        ("ext2", FsKind::Ext2, 300),
        ("ext4+inline", FsKind::Ext4, 300),
    ] {
        let (src, img) = make_ext(tmp.path(), fstype, many);
        let disk = open_raw(&img);
        let fs = guestfs::open_fs(Volume::whole(disk)).unwrap();
        assert_eq!(fs.kind(), kind);
        assert_eq!(fs.label(), Some(format!("lbl-{fstype}")));
        compare(fs.as_ref(), &src, &img, fstype.contains("inline"));
        // lost+found is there and empty.
        assert!(fs
            .read_dir(fs.lookup("/lost+found").unwrap())
            .unwrap()
            .is_empty());
        compare_tsk(fs.as_ref(), &img);
        if fstype == "ext4+inline" {
            // Make sure the inline paths were exercised: a small file and a small directory.
            for p in ["/hello.txt", "/docs/deep"] {
                let st = run(
                    Command::new("debugfs")
                        .arg("-R")
                        .arg(format!("stat {p}"))
                        .arg(&img),
                    "e2fsprogs",
                );
                assert!(st.contains("Size of inline data"), "{p} not inline: {st}");
            }
        }
        if fstype == "ext4" {
            // e2fsck -D indexed the big directory.
            let stat = run(
                Command::new("debugfs")
                    .arg("-R")
                    .arg("stat /many")
                    .arg(&img),
                "e2fsprogs",
            );
            assert!(
                stat.contains("Indexed")
                    || stat.contains("Flags: 0x81000")
                    || stat.contains("0x1000"),
                "{stat}"
            );
            // debugfs agrees on a file's bytes and inode.
            let out = tmp.path().join("dump");
            run(
                Command::new("debugfs")
                    .arg("-R")
                    .arg(format!("dump /docs/deep/deeper/leaf.txt {}", out.display()))
                    .arg(&img),
                "e2fsprogs",
            );
            let n = fs.lookup("/docs/deep/deeper/leaf.txt").unwrap();
            assert_eq!(
                read_all(fs.as_ref(), n, 70_000).unwrap(),
                std::fs::read(&out).unwrap()
            );
            // Case matters on ext.
            assert!(fs.lookup("/HELLO.TXT").is_err());
        }
    }
}

/// Volume offset of an inode, from debugfs's imap.
fn inode_offset(img: &Path, path: &str) -> usize {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("imap {path}"))
            .arg(img),
        "e2fsprogs",
    );
    let blk: usize = out
        .split("located at block ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let off = usize::from_str_radix(out.split("offset 0x").nth(1).unwrap().trim(), 16).unwrap();
    blk * 1024 + off
}

#[test]
fn hostile_ext_images_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello").unwrap();
    std::fs::write(src.join("a/b/data.bin"), pattern(50_000, 5)).unwrap();
    let img = tmp.path().join("h.img");
    // 1 KiB blocks keep offsets simple.
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "1024", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("8M"),
        "e2fsprogs",
    );
    // A directory loop: /a/b/up is a second link to /a.
    run(
        Command::new("debugfs")
            .args(["-w", "-R", "ln /a /a/b/up"])
            .arg(&img),
        "e2fsprogs",
    );
    let base = std::fs::read(&img).unwrap();
    let fs = guestfs::open_fs(Volume::from_bytes(base.clone())).unwrap();
    let a = fs.lookup("/a").unwrap();
    assert_eq!(fs.lookup("/a/b/up").unwrap(), a);
    let tree = walk(fs.as_ref()).unwrap();
    assert!(tree.contains_key("/a/b/up") && !tree.contains_key("/a/b/up/b"));
    // The library walker reports the loop and does not enter it.
    let mut seen = Vec::new();
    guestfs::fs::walk(fs.as_ref(), fs.root(), &mut |w| {
        seen.push((w.path.clone(), w.is_loop));
        Ok(true)
    })
    .unwrap();
    assert!(seen.contains(&("a/b/up".to_string(), true)), "{seen:?}");
    assert!(
        !seen.iter().any(|(p, _)| p.starts_with("a/b/up/")),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|(_, l)| *l).count(), 1);

    // An extent pointing outside the volume.
    let data_ino = inode_offset(&img, "/a/b/data.bin");
    let mut bad = base.clone();
    bad[data_ino + 40 + 12 + 8..data_ino + 40 + 12 + 12]
        .copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let fs = guestfs::open_fs(Volume::from_bytes(bad)).unwrap();
    let n = fs.lookup("/a/b/data.bin").unwrap();
    let err = read_all(fs.as_ref(), n, 50_000).unwrap_err();
    assert!(err.to_string().contains("outside the volume"), "{err}");

    // An extent tree whose index points back at the inode table (no loop forever, no panic).
    let mut bad = base.clone();
    bad[data_ino + 40 + 6..data_ino + 40 + 8].copy_from_slice(&3u16.to_le_bytes());
    let fs = guestfs::open_fs(Volume::from_bytes(bad)).unwrap();
    let n = fs.lookup("/a/b/data.bin").unwrap();
    assert!(read_all(fs.as_ref(), n, 50_000).is_err());

    // An absurd size on a directory.
    let a_ino = inode_offset(&img, "/a");
    let mut bad = base.clone();
    bad[a_ino + 108..a_ino + 112].copy_from_slice(&0xFFFFu32.to_le_bytes());
    let fs = guestfs::open_fs(Volume::from_bytes(bad)).unwrap();
    let err = fs.read_dir(fs.lookup("/a").unwrap()).unwrap_err();
    assert!(err.to_string().contains("claims"), "{err}");

    // A zero rec_len in the root directory: an error, not an endless loop; crafted names with
    // '/' and NUL come back as stored.
    let pos = base.windows(9).position(|w| w == b"hello.txt").unwrap();
    let mut bad = base.clone();
    bad[pos..pos + 9].copy_from_slice(b"x/y\0z.txt");
    let fs = guestfs::open_fs(Volume::from_bytes(bad.clone())).unwrap();
    let names: Vec<String> = fs
        .read_dir(fs.root())
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"x/y\0z.txt".to_string()), "{names:?}");
    bad[pos - 4..pos - 2].copy_from_slice(&0u16.to_le_bytes());
    let fs = guestfs::open_fs(Volume::from_bytes(bad)).unwrap();
    let err = fs.read_dir(fs.root()).unwrap_err();
    assert!(err.to_string().contains("bad length"), "{err}");

    // The needs_recovery flag over a clean (empty) journal: nothing to replay, same content.
    let mut flagged = base.clone();
    let inc = u32::from_le_bytes(flagged[1024 + 96..1024 + 100].try_into().unwrap()) | 4;
    flagged[1024 + 96..1024 + 100].copy_from_slice(&inc.to_le_bytes());
    let fs = guestfs::open_fs(Volume::from_bytes(flagged)).unwrap();
    let n = fs.lookup("/a/b/data.bin").unwrap();
    assert_eq!(
        read_all(fs.as_ref(), n, 50_000).unwrap(),
        pattern(50_000, 5)
    );

    // Noise over the metadata: errors, no panic, no hang.
    for seed in 0..40u64 {
        let mut img = base.clone();
        let noise = pattern(200_000, seed);
        for (i, b) in noise.iter().enumerate() {
            if i % (7 + seed as usize) == 0 {
                img[2048 + i] = *b;
            }
        }
        if let Ok(fs) = guestfs::open_fs(Volume::from_bytes(img)) {
            let _ = walk_hostile(fs.as_ref());
        }
    }
}

fn debugfs_script(img: &Path, script: &str) {
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("debugfs (apt package e2fsprogs)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A volume captured with committed but un-checkpointed journal transactions (written with
/// debugfs's journal commands): we replay in memory and must read what e2fsck's recovery gives.
#[test]
fn journal_replay_matches_e2fsck_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"original content here\n").unwrap();
    std::fs::write(src.join("other.txt"), b"other original\n").unwrap();
    std::fs::write(src.join("big.bin"), pattern(200_000, 11)).unwrap();
    let img = tmp.path().join("j.img");
    // No metadata_csum: the inode we change through the journal keeps e2fsck (the oracle) calm.
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-O",
                "^metadata_csum",
                "-d",
            ])
            .arg(&src)
            .arg(&img)
            .arg("32M"),
        "e2fsprogs",
    );
    let block_of = |p: &str| -> u64 {
        run(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("blocks {p}"))
                .arg(&img),
            "e2fsprogs",
        )
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
    };
    let hello_blk = block_of("/hello.txt");
    let other_blk = block_of("/other.txt");
    // Transaction 1: new data for hello.txt and other.txt, and hello.txt's inode with size 9.
    let ino_off = inode_offset_4k(&img, "/hello.txt");
    let bytes = std::fs::read(&img).unwrap();
    let itab_blk = (ino_off / 4096) as u64;
    let mut itab = bytes[itab_blk as usize * 4096..itab_blk as usize * 4096 + 4096].to_vec();
    let o = ino_off % 4096;
    itab[o + 4..o + 8].copy_from_slice(&9u32.to_le_bytes());
    std::fs::write(tmp.path().join("itab.bin"), &itab).unwrap();
    let mut data = b"JOURNALED content!".to_vec();
    data.resize(4096, 0);
    std::fs::write(tmp.path().join("new.bin"), &data).unwrap();
    // A block that begins with the JBD2 magic must be escaped in the log.
    let mut magic = 0xC03B_3998u32.to_be_bytes().to_vec();
    magic.extend_from_slice(b" after the magic");
    magic.resize(4096, 0x5A);
    std::fs::write(tmp.path().join("magic.bin"), &magic).unwrap();
    let t = tmp.path().display();
    debugfs_script(&img, &format!(
        "jo\njw -b {hello_blk} {t}/new.bin\njw -b {itab_blk} {t}/itab.bin\njw -b {other_blk} {t}/magic.bin\njc\n"
    ));
    let recovered = tmp.path().join("recovered.img");
    std::fs::copy(&img, &recovered).unwrap();
    let st = Command::new("e2fsck")
        .arg("-fy")
        .arg(&recovered)
        .output()
        .unwrap();
    assert!(matches!(st.status.code(), Some(0) | Some(1)), "{st:?}");

    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();
    let theirs = guestfs::open_fs(Volume::whole(open_raw(&recovered))).unwrap();
    let ours_tree = walk(fs.as_ref()).unwrap();
    let their_tree = walk(theirs.as_ref()).unwrap();
    assert_same_paths(
        &ours_tree.keys().collect::<Vec<_>>(),
        &their_tree.keys().collect::<Vec<_>>(),
        "replayed vs e2fsck",
    );
    for (p, n) in &their_tree {
        assert_eq!(ours_tree[p].data, n.data, "{p}");
        assert_eq!(ours_tree[p].meta.size, n.meta.size, "{p}");
    }
    assert_eq!(
        ours_tree["/hello.txt"].data.as_deref(),
        Some(&b"JOURNALED"[..])
    );
    assert_eq!(
        &ours_tree["/other.txt"].data.as_deref().unwrap()[..4],
        &0xC03B_3998u32.to_be_bytes()
    );
    // And debugfs on the recovered copy agrees.
    let cat = run(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat /hello.txt")
            .arg(&recovered),
        "e2fsprogs",
    );
    assert_eq!(cat, "JOURNALED");

    // Transaction 2 revokes other.txt's block: transaction 1's copy of it must not be replayed.
    debugfs_script(
        &img,
        "jo\njw -r {other_blk}\njc\n"
            .replace("{other_blk}", &other_blk.to_string())
            .as_str(),
    );
    let recovered2 = tmp.path().join("recovered2.img");
    std::fs::copy(&img, &recovered2).unwrap();
    let st = Command::new("e2fsck")
        .arg("-fy")
        .arg(&recovered2)
        .output()
        .unwrap();
    assert!(matches!(st.status.code(), Some(0) | Some(1)), "{st:?}");
    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();
    let theirs = guestfs::open_fs(Volume::whole(open_raw(&recovered2))).unwrap();
    for p in ["/hello.txt", "/other.txt", "/big.bin"] {
        let a = fs.lookup(p).unwrap();
        let b = theirs.lookup(p).unwrap();
        let sa = fs.metadata(a).unwrap().size;
        let sb = theirs.metadata(b).unwrap().size;
        assert_eq!(sa, sb, "{p}");
        assert_eq!(
            read_all(fs.as_ref(), a, sa).unwrap(),
            read_all(theirs.as_ref(), b, sb).unwrap(),
            "{p} after revoke"
        );
    }
    let other = fs.lookup("/other.txt").unwrap();
    assert_eq!(
        read_all(fs.as_ref(), other, 15).unwrap(),
        b"other original\n"
    );
}

fn inode_offset_4k(img: &Path, path: &str) -> usize {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("imap {path}"))
            .arg(img),
        "e2fsprogs",
    );
    let blk: usize = out
        .split("located at block ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let off = usize::from_str_radix(out.split("offset 0x").nth(1).unwrap().trim(), 16).unwrap();
    blk * 4096 + off
}

/// A copy taken while the kernel has the filesystem mounted (as a crash-consistent backup of a
/// running VM is): needs_recovery is set and the log (checksum v3 here) is not empty. Our
/// in-memory replay must read what e2fsck's recovery of the same copy gives.
#[test]
fn live_mounted_copy_reads_like_e2fsck_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("live.img");
    let snap = tmp.path().join("snap.img");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4"])
            .arg(&img)
            .arg("64M"),
        "e2fsprogs",
    );
    run(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
        "mount",
    );
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Umount(mnt.clone());
    std::fs::create_dir_all(mnt.join("d/e")).unwrap();
    for i in 0..200 {
        std::fs::write(mnt.join(format!("d/f{i}")), pattern(3000 + i * 7, i as u64)).unwrap();
    }
    std::fs::write(mnt.join("d/e/big"), pattern(2 << 20, 99)).unwrap();
    std::os::unix::fs::symlink("../d/f1", mnt.join("d/e/link")).unwrap();
    run(&mut Command::new("sync"), "coreutils");
    std::fs::copy(&img, &snap).unwrap();
    drop(guard);
    let head = run(Command::new("dumpe2fs").arg("-h").arg(&snap), "e2fsprogs");
    assert!(head.contains("needs_recovery"), "{head}");

    let recovered = tmp.path().join("recovered.img");
    std::fs::copy(&snap, &recovered).unwrap();
    let st = Command::new("e2fsck")
        .arg("-fy")
        .arg(&recovered)
        .output()
        .unwrap();
    assert!(matches!(st.status.code(), Some(0) | Some(1)), "{st:?}");
    let ours = guestfs::open_fs(Volume::whole(open_raw(&snap))).unwrap();
    let theirs = guestfs::open_fs(Volume::whole(open_raw(&recovered))).unwrap();
    let a = walk(ours.as_ref()).unwrap();
    let b = walk(theirs.as_ref()).unwrap();
    assert_same_paths(
        &a.keys().collect::<Vec<_>>(),
        &b.keys().collect::<Vec<_>>(),
        "live copy vs e2fsck",
    );
    for (p, n) in &b {
        assert_eq!(a[p].data, n.data, "{p}");
        assert_eq!(a[p].meta, n.meta, "{p}");
    }
    for i in 0..200 {
        assert_eq!(
            a[&format!("/d/f{i}")].data.as_deref(),
            Some(&pattern(3000 + i * 7, i as u64)[..])
        );
    }
    assert_eq!(
        a["/d/e/big"].data.as_deref(),
        Some(&pattern(2 << 20, 99)[..])
    );
    assert_eq!(
        ours.read_link(ours.lookup("/d/e/link").unwrap())
            .unwrap()
            .target,
        "../d/f1"
    );
}
