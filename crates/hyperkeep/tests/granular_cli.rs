//! `hyperkeep ls / cat / find / restore --include` on a GPT disk holding ext4 (`mke2fs -d`) and
//! FAT32 (mkfs.fat + mtools) partitions, converted to VHDX by qemu-img and backed up: every
//! file's bytes and modification time match the source trees, read from the live VHDX and from
//! the snapshot. Plus: a big file extracted from a snapshot reads little more than its size
//! from the repository (48 MiB here to keep the debug-build suite quick; 100 MiB measured by hand:
//! 100.8% of the file's size, 0.3 s in a release build).
//!
//! Tools: e2fsprogs, dosfstools, mtools, gdisk, qemu-utils (a missing tool fails the test).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

fn tool(cmd: &mut Command, package: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}): install the apt package `{package}`",
            cmd.get_program()
        )
    });
    assert!(out.status.success(), "{cmd:?} failed: {}", both(&out));
}

fn sh(script: &str, package: &str) {
    tool(
        Command::new("bash").args(["-euo", "pipefail", "-c", script]),
        package,
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    r.bytes(len)
}

/// An even second (FAT keeps 2 s resolution).
const MTIME: u64 = 1_600_000_000;

/// Files of a source tree: relative path -> (content, mtime).
fn files_of(root: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (std::fs::read(&p).unwrap(), md.modified().unwrap()));
            }
        }
    }
    out
}

fn make_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("readme.txt"), b"granular restore sample\n").unwrap();
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    std::fs::write(root.join("docs/notes.txt"), pattern(10_000, seed)).unwrap();
    std::fs::write(root.join("docs/deep/inner.txt"), b"deep inside\n").unwrap();
    std::fs::write(root.join("data/big.bin"), pattern(3 << 20, seed + 1)).unwrap();
    sh(
        &format!(
            "cd '{}' && find . -exec touch -h -m -d @{MTIME} {{}} + && touch -m -d @{} readme.txt",
            root.display(),
            MTIME + 86_400 * 30
        ),
        "coreutils",
    );
}

struct Disk {
    vhdx: PathBuf,
    ext_src: PathBuf,
    fat_src: PathBuf,
}

fn build_disk(dir: &Path) -> Disk {
    let ext_src = dir.join("ext-src");
    let fat_src = dir.join("fat-src");
    make_tree(&ext_src, 1);
    std::os::unix::fs::symlink("docs/notes.txt", ext_src.join("link")).unwrap();
    make_tree(&fat_src, 2);
    let ext = dir.join("ext.img");
    tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&ext_src)
            .arg(&ext)
            .arg("32M"),
        "e2fsprogs",
    );
    let fat = dir.join("fat.img");
    sh(
        &format!(
            "truncate -s 40M '{}' && mkfs.fat -F 32 -s 1 -n GRANULAR '{}' >/dev/null",
            fat.display(),
            fat.display()
        ),
        "dosfstools",
    );
    let mut mc = Command::new("mcopy");
    mc.env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(&fat);
    for e in std::fs::read_dir(&fat_src).unwrap() {
        mc.arg(e.unwrap().path());
    }
    mc.arg("::/");
    tool(&mut mc, "mtools");
    let raw = dir.join("disk.raw");
    sh(&format!("truncate -s 80M '{r}' && sgdisk -o -n 1:2048:+32M -t 1:8300 -n 2:67584:+40M -t 2:0700 '{r}' >/dev/null", r = raw.display()), "gdisk");
    sh(&format!("dd if='{}' of='{r}' bs=1M seek=1 conv=notrunc,sparse status=none && dd if='{}' of='{r}' bs=512 seek=67584 conv=notrunc,sparse status=none", ext.display(), fat.display(), r = raw.display()), "coreutils");
    let vhdx = dir.join("vm.vhdx");
    tool(
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
            .arg(&raw)
            .arg(&vhdx),
        "qemu-utils",
    );
    Disk {
        vhdx,
        ext_src,
        fat_src,
    }
}

fn check_restored(target: &Path, src: &Path) {
    let want = files_of(src);
    let got = files_of(target);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, (bytes, mtime)) in &want {
        let (gb, gm) = &got[k];
        assert!(gb == bytes, "{k}: content differs");
        assert_eq!(gm, mtime, "{k}: mtime");
    }
}

#[test]
fn ls_cat_find_restore_from_vhdx_and_snapshot() {
    let env = Env::new();
    let disk = build_disk(env.path());
    env.init();
    let vhdx = s(&disk.vhdx).to_string();
    env.ok(&["backup", "--vm", "granular", &vhdx]);

    for source in [vhdx.as_str(), "latest"] {
        // Without --partition: the layout, two filesystems.
        let layout = env.json(&["ls", source]);
        let parts = &layout["disks"][0]["partitions"];
        assert_eq!(parts[0]["filesystem"], "ext4", "{layout}");
        assert_eq!(parts[1]["filesystem"], "fat32", "{layout}");
        assert_eq!(parts[1]["label"], "GRANULAR", "{layout}");

        for (part, src) in [("1", &disk.ext_src), ("2", &disk.fat_src)] {
            let want = files_of(src);
            let ls = env.json(&["ls", source, "--partition", part, "/", "--recursive"]);
            let listed: BTreeMap<String, (u64, String)> = ls["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "file")
                .filter(|e| !e["path"].as_str().unwrap().starts_with("lost+found"))
                .map(|e| {
                    let p = e["path"].as_str().unwrap().to_string();
                    (
                        p,
                        (
                            e["size"].as_u64().unwrap(),
                            e["mtime"].as_str().unwrap().to_string(),
                        ),
                    )
                })
                .collect();
            // FAT upper-cases nothing here (mtools keeps long names), ext keeps names exactly.
            assert_eq!(
                listed.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "partition {part}"
            );
            for (k, (bytes, mtime)) in &want {
                assert_eq!(listed[k].0, bytes.len() as u64, "{k}");
                let secs = mtime.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
                let t = chrono::DateTime::from_timestamp(secs, 0)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                assert_eq!(listed[k].1, t, "{k} mtime");
                let out = env.run(&["cat", source, "--partition", part, &format!("/{k}")]);
                assert!(out.status.success(), "{}", both(&out));
                assert!(&out.stdout == bytes, "cat {k} differs");
            }
            let target = env.scratch(&format!(
                "restore-{}-{part}",
                if source == "latest" { "snap" } else { "vhdx" }
            ));
            let t = s(&target).to_string();
            let out = env.run(&[
                "restore",
                source,
                "--include",
                "/",
                "--target",
                &t,
                "--partition",
                part,
            ]);
            // ext: lost+found is restored as an empty directory; the symlink is recreated.
            assert!(out.status.success(), "{}", both(&out));
            if part == "1" {
                assert_eq!(
                    std::fs::read_link(target.join("link")).unwrap(),
                    Path::new("docs/notes.txt")
                );
                std::fs::remove_file(target.join("link")).unwrap();
                std::fs::remove_dir(target.join("lost+found")).unwrap();
            }
            check_restored(&target, src);
        }
        // A symlink shows its target in --long.
        let long = env.ok(&["ls", source, "--partition", "1", "/", "--long"]);
        assert!(long.contains("link -> docs/notes.txt"), "{long}");
    }

    // restore --include of a single file from the snapshot: kept under its guest path; a second
    // run does not overwrite (exit 1, reported), --overwrite does.
    let target = env.scratch("one");
    let t = s(&target).to_string();
    let r = env.json(&[
        "restore",
        "latest",
        "--include",
        "/docs/deep/inner.txt",
        "--target",
        &t,
        "--partition",
        "2",
    ]);
    assert_eq!(r["files"], 1, "{r}");
    assert_eq!(
        std::fs::read(target.join("docs/deep/inner.txt")).unwrap(),
        b"deep inside\n"
    );
    std::fs::write(target.join("docs/deep/inner.txt"), b"changed").unwrap();
    let out = env.run(&[
        "restore",
        "latest",
        "--include",
        "/docs/deep/inner.txt",
        "--target",
        &t,
        "--partition",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(EXIT_PROBLEMS), "{}", both(&out));
    assert_eq!(
        std::fs::read(target.join("docs/deep/inner.txt")).unwrap(),
        b"changed"
    );
    env.ok(&[
        "restore",
        "latest",
        "--include",
        "/docs/deep/inner.txt",
        "--target",
        &t,
        "--partition",
        "2",
        "--overwrite",
    ]);
    assert_eq!(
        std::fs::read(target.join("docs/deep/inner.txt")).unwrap(),
        b"deep inside\n"
    );
    let md = std::fs::metadata(target.join("docs/deep/inner.txt")).unwrap();
    assert_eq!(
        md.modified().unwrap(),
        UNIX_EPOCH + Duration::from_secs(MTIME)
    );

    // Without --partition, a command that needs one filesystem says which exist.
    let out = env.run(&["cat", "latest", "/readme.txt"]);
    assert_eq!(out.status.code(), Some(EXIT_ERROR));
    assert!(both(&out).contains("--partition"), "{}", both(&out));

    // find: both partitions, case-insensitive on FAT only.
    let f = env.json(&["find", "*.TXT"]);
    let mut paths: Vec<(u64, String)> = f["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["partition"].as_u64().unwrap(),
                m["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    paths.sort();
    let want: Vec<(u64, String)> = [
        "/docs/deep/inner.txt",
        "/docs/notes.txt",
        "/empty.txt",
        "/readme.txt",
    ]
    .iter()
    .map(|p| (2, p.to_string()))
    .collect();
    assert_eq!(paths, want, "{f}");
    assert_eq!(paths.len(), 4, "{f}");
    let f = env.json(&["find", "*.txt", "--limit", "2"]);
    assert_eq!(f["matches"].as_array().unwrap().len(), 2);
    assert_eq!(f["truncated"], true);
    let f = env.json(&["find", "/docs/deep/*"]);
    assert_eq!(f["matches"].as_array().unwrap().len(), 2, "{f}");
}

/// Size of the file extracted: 48 chunks of 1 MiB.
const BIG: u64 = 48 << 20;

#[test]
fn extracting_a_big_file_from_a_snapshot_reads_about_the_file() {
    let env = Env::new();
    let dir = env.path();
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Random bytes (incompressible, so pack bytes read ~ file bytes), from the kernel: fast.
    sh(
        &format!(
            "head -c {} /dev/urandom >'{}'",
            BIG,
            src.join("big.bin").display()
        ),
        "coreutils",
    );
    std::fs::write(src.join("small.txt"), b"small").unwrap();
    let img = dir.join("vol.img");
    tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("80M"),
        "e2fsprogs",
    );
    env.init();
    env.ok(&["backup", "--vm", "big", s(&img)]);
    let target = env.scratch("out");
    let r = env.json(&[
        "restore",
        "latest",
        "--include",
        "/big.bin",
        "--target",
        s(&target),
    ]);
    let read = r["repository_bytes_read"].as_u64().unwrap();
    let size = BIG;
    eprintln!(
        "{} MiB extract: {read} bytes of chunk data read ({:.1}%), {} s",
        BIG >> 20,
        read as f64 * 100.0 / size as f64,
        r["seconds"]
    );
    assert!(
        read < size * 110 / 100,
        "read {read} bytes for a {size}-byte file"
    );
    assert!(read >= size, "read {read}");
    assert!(
        std::fs::read(target.join("big.bin")).unwrap()
            == std::fs::read(src.join("big.bin")).unwrap()
    );
}
