//! `hyperkeep mount` end to end, through the kernel: a GPT disk with an ext4 partition (from
//! `mke2fs -d`) and a FAT32 one (mtools), converted to VHDX by qemu-img, backed up with the CLI,
//! mounted in a background process, and compared with the source trees through plain `std::fs`:
//! bytes, sizes, mtimes, modes, symlink targets, listings; the whole-disk file against
//! `qemu-img convert -O raw`; writes refused with EROFS; clean unmount and exit 0.
//!
//! Needs root-less FUSE or root: /dev/fuse and fusermount3 (Debian package fuse3), plus gdisk,
//! e2fsprogs, dosfstools, mtools, qemu-utils. Every wait is time-bound and a guard kills the
//! mount and detaches it (lazy unmount) if a test fails, so a hung mount cannot hang the suite.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PASSWORD: &str = "mount test password";
const MIB: u64 = 1 << 20;
/// ext4 partition: sectors 2048.. (1 MiB), 24 MiB; FAT32 after it, 40 MiB.
const EXT_START: u64 = MIB;
const EXT_LEN: u64 = 24 * MIB;
const FAT_START: u64 = EXT_START + EXT_LEN;
const FAT_LEN: u64 = 40 * MIB;
const DISK_SIZE: u64 = 80 * MIB;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hyperkeep")
}

fn require_tools() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE (modprobe fuse, or a container with /dev/fuse)"
    );
    for tool in [
        "fusermount3",
        "sgdisk",
        "mke2fs",
        "mkfs.fat",
        "mcopy",
        "mmd",
        "qemu-img",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is missing: install the Debian packages fuse3 gdisk e2fsprogs dosfstools mtools qemu-utils"
        );
    }
}

fn sh(cmd: &mut Command) {
    let what = format!("{cmd:?}");
    let out = cmd
        .env("TZ", "UTC")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let f = fs::File::options()
        .write(true)
        .open(p)
        .or_else(|_| fs::File::open(p))
        .unwrap();
    f.set_modified(UNIX_EPOCH + Duration::new(secs, nanos))
        .unwrap();
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::setxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {p:?} {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// All extended attributes of a path (not following a symlink), by name.
fn xattrs(p: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let c = cpath(p);
    let mut names = vec![0u8; 65536];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {p:?}: {}",
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = std::collections::BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            len >= 0,
            "lgetxattr {p:?} {cname:?}: {}",
            std::io::Error::last_os_error()
        );
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// Deterministic bytes that do not compress away.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The source trees, the disk (raw and VHDX) and a VM config file.
struct Images {
    ext_tree: PathBuf,
    fat_tree: PathBuf,
    raw: PathBuf,
    vhdx: PathBuf,
    config: PathBuf,
}

fn build_images(dir: &Path) -> Images {
    let ext_tree = dir.join("ext-tree");
    fs::create_dir_all(ext_tree.join("docs/deep/deeper")).unwrap();
    fs::create_dir_all(ext_tree.join("empty-dir")).unwrap();
    fs::write(ext_tree.join("hello.txt"), b"hello from ext4\n").unwrap();
    fs::write(ext_tree.join("empty"), b"").unwrap();
    // Crosses several 1 MiB repository chunks at odd offsets.
    fs::write(
        ext_tree.join("docs/big.bin"),
        pattern(3 * MIB as usize + 12345, 1),
    )
    .unwrap();
    fs::write(ext_tree.join("docs/deep/deeper/note.md"), b"# deep\n").unwrap();
    let sparse = fs::File::create(ext_tree.join("sparse.bin")).unwrap();
    sparse.set_len(2 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"tail", 2 * MIB - 4).unwrap();
    drop(sparse);
    fs::write(ext_tree.join("secret"), b"mode 600").unwrap();
    fs::set_permissions(ext_tree.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    set_xattr(&ext_tree.join("hello.txt"), "user.comment", b"greeting");
    set_xattr(
        &ext_tree.join("docs/big.bin"),
        "user.origin",
        &pattern(300, 9),
    );
    std::os::unix::fs::symlink("docs/deep/deeper/note.md", ext_tree.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/does-not-exist", ext_tree.join("link-abs")).unwrap();
    for (i, name) in [
        "hello.txt",
        "empty",
        "docs/big.bin",
        "docs/deep/deeper/note.md",
        "sparse.bin",
        "secret",
    ]
    .iter()
    .enumerate()
    {
        // Whole seconds: `mke2fs -d` stores no sub-second part (debugfs shows :00000000).
        set_mtime(&ext_tree.join(name), 1_600_000_000 + i as u64 * 1000, 0);
    }

    let fat_tree = dir.join("fat-tree");
    fs::create_dir_all(fat_tree.join("Folder")).unwrap();
    fs::write(fat_tree.join("README.TXT"), b"fat32 file\r\n").unwrap();
    fs::write(fat_tree.join("Long file name.data"), pattern(200_000, 2)).unwrap();
    fs::write(fat_tree.join("Folder/inner.bin"), pattern(70_000, 3)).unwrap();
    // FAT keeps modification times to 2 s.
    for (i, name) in ["README.TXT", "Long file name.data", "Folder/inner.bin"]
        .iter()
        .enumerate()
    {
        set_mtime(&fat_tree.join(name), 1_500_000_000 + i as u64 * 2000, 0);
    }

    let ext_img = dir.join("ext.img");
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&ext_tree)
        .arg(&ext_img)
        .arg(format!("{}M", EXT_LEN / MIB)));
    let fat_img = dir.join("fat.img");
    sh(Command::new("mkfs.fat")
        .args(["-F", "32", "-s", "1", "-n", "FATVOL", "-C"])
        .arg(&fat_img)
        .arg((FAT_LEN / 1024).to_string()));
    let img = format!("{}", fat_img.display());
    sh(Command::new("mmd").args(["-i", &img, "::/Folder"]));
    sh(Command::new("mcopy")
        .args(["-i", &img, "-m"])
        .arg(fat_tree.join("README.TXT"))
        .arg(fat_tree.join("Long file name.data"))
        .arg("::/"));
    sh(Command::new("mcopy")
        .args(["-i", &img, "-m"])
        .arg(fat_tree.join("Folder/inner.bin"))
        .arg("::/Folder/"));

    let raw = dir.join("disk.raw");
    fs::File::create(&raw).unwrap().set_len(DISK_SIZE).unwrap();
    sh(Command::new("sgdisk")
        .arg("-o")
        .arg(format!("-n=1:{}:+{}M", EXT_START / 512, EXT_LEN / MIB))
        .arg("-t=1:8300")
        .arg(format!("-n=2:{}:+{}M", FAT_START / 512, FAT_LEN / MIB))
        .arg("-t=2:0700")
        .arg(&raw));
    let disk = fs::File::options().write(true).open(&raw).unwrap();
    for (img, at) in [(&ext_img, EXT_START), (&fat_img, FAT_START)] {
        let data = fs::read(img).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&disk, &data, at).unwrap();
    }
    drop(disk);
    let vhdx = dir.join("vm-disk.vhdx");
    sh(Command::new("qemu-img")
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
        .arg(&vhdx));
    let config = dir.join("vm.vmcx");
    fs::write(&config, pattern(5000, 4)).unwrap();
    Images {
        ext_tree,
        fat_tree,
        raw,
        vhdx,
        config,
    }
}

fn hyperkeep(repo: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env("HYPERKEEP_REPOSITORY", repo)
        .env("HYPERKEEP_PASSWORD", PASSWORD)
        .env("HYPERKEEP_TEST_FAST_KDF", "1")
        .env_remove("HYPERKEEP_PASSWORD_FILE")
        .env_remove("HYPERKEEP_LOG")
        .stdin(Stdio::null());
    c
}

fn is_mounted(mnt: &Path) -> bool {
    let mnt = fs::canonicalize(mnt).unwrap_or(mnt.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap_or("")))
}

/// A running `hyperkeep mount`; dropping it kills the process and detaches the mount.
struct Mounted {
    child: Option<Child>,
    mnt: PathBuf,
    json: serde_json::Value,
}

impl Mounted {
    fn start(mut cmd: Command, mnt: &Path) -> Mounted {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hyperkeep mount");
        let stdout = child.stdout.take().unwrap();
        let mut guard = Mounted {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            json: serde_json::Value::Null,
        };
        // The mount info is printed once the filesystem is mounted; read it on a thread so a
        // mount that never comes up fails by timeout.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                text.push_str(&line);
                if line.starts_with('}') {
                    let _ = tx.send(text.clone());
                }
                line.clear();
            }
        });
        let text = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("hyperkeep mount did not report a mounted filesystem within 60 s");
        guard.json = serde_json::from_str(&text).expect("mount info is JSON");
        assert!(
            is_mounted(mnt),
            "mount info printed but {mnt:?} is not mounted"
        );
        guard
    }

    /// Wait for the process to end by itself (after an unmount or a signal).
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "hyperkeep mount did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Run `f` on a thread and fail if it takes longer than `limit` (a hung FUSE request would
/// otherwise block the test forever; the guard's drop then unblocks the thread).
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("filesystem operations on the mount took longer than {limit:?}"),
    }
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn mtime(md: &fs::Metadata) -> SystemTime {
    md.modified().unwrap()
}

/// Compare a source tree with its mounted counterpart, entry by entry. `exact_meta`: ext keeps
/// nanosecond times and Unix modes; FAT keeps neither.
fn compare_tree(src: &Path, mounted: &Path, exact_meta: bool, ignore: &[&str]) -> usize {
    let mut checked = 0;
    let mut want = listing(src);
    let mut got = listing(mounted);
    for i in ignore {
        want.remove(*i);
        got.remove(*i);
    }
    assert_eq!(got, want, "listing of {mounted:?} differs from {src:?}");
    for name in want {
        let s = src.join(&name);
        let m = mounted.join(&name);
        let smd = fs::symlink_metadata(&s).unwrap();
        let mmd = fs::symlink_metadata(&m).unwrap_or_else(|e| panic!("lstat {m:?}: {e}"));
        assert_eq!(
            mmd.file_type().is_dir(),
            smd.file_type().is_dir(),
            "{m:?}: type"
        );
        assert_eq!(
            mmd.file_type().is_symlink(),
            smd.file_type().is_symlink(),
            "{m:?}: type"
        );
        checked += 1;
        if smd.is_dir() {
            checked += compare_tree(&s, &m, exact_meta, &[]);
            continue;
        }
        if smd.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&m).unwrap(),
                fs::read_link(&s).unwrap(),
                "{m:?}"
            );
            assert_eq!(mmd.len(), smd.len(), "{m:?}: symlink size");
            continue;
        }
        assert_eq!(mmd.len(), smd.len(), "{m:?}: size");
        assert_eq!(
            fs::read(&m).unwrap(),
            fs::read(&s).unwrap(),
            "{m:?}: content"
        );
        if exact_meta {
            assert_eq!(mtime(&mmd), mtime(&smd), "{m:?}: mtime");
            assert_eq!(mmd.mode() & 0o7777, smd.mode() & 0o7777, "{m:?}: mode");
            assert_eq!(mmd.uid(), smd.uid(), "{m:?}: uid");
            assert_eq!(xattrs(&m), xattrs(&s), "{m:?}: extended attributes");
        } else {
            // FAT: 2-second local time (we build it in UTC).
            let d = mtime(&mmd)
                .duration_since(mtime(&smd))
                .unwrap_or_else(|e| e.duration());
            assert!(d <= Duration::from_secs(2), "{m:?}: mtime off by {d:?}");
        }
    }
    checked
}

fn assert_erofs(r: std::io::Result<impl Sized>, what: &str) {
    match r {
        Ok(_) => panic!("{what} succeeded on a read-only mount"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what}: expected EROFS, got {e}"
        ),
    }
}

fn files_equal(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    assert_eq!(
        fa.metadata().unwrap().len(),
        fb.metadata().unwrap().len(),
        "{a:?} size"
    );
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut pos = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "{a:?} differs from {b:?} near offset {pos}"
        );
        pos += n as u64;
    }
}

#[test]
fn mount_snapshot_matches_sources_and_is_read_only() {
    require_tools();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let img = build_images(dir);
    let repo = dir.join("repo");
    let out = hyperkeep(&repo).arg("init").output().unwrap();
    assert!(out.status.success(), "init: {out:?}");
    let out = hyperkeep(&repo)
        .args(["backup", "--vm", "mountvm"])
        .arg(&img.vhdx)
        .arg(&img.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {out:?}");

    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = hyperkeep(&repo);
    cmd.args(["--json", "mount", "latest"]).arg(&mnt);
    let mut m = Mounted::start(cmd, &mnt);
    assert_eq!(m.json["vm"], "mountvm");
    assert_eq!(m.json["disks"][0]["table"], "gpt");
    assert_eq!(m.json["disks"][0]["partitions"][0]["filesystem"], "ext4");
    assert_eq!(m.json["disks"][0]["partitions"][1]["filesystem"], "fat32");

    let (mnt2, ext_tree, fat_tree, raw, config, dir2) = (
        mnt.clone(),
        img.ext_tree.clone(),
        img.fat_tree.clone(),
        img.raw.clone(),
        img.config.clone(),
        dir.to_path_buf(),
    );
    bounded(Duration::from_secs(240), move || {
        let mnt = mnt2;
        assert_eq!(
            listing(&mnt),
            BTreeSet::from(["vm-disk.vhdx".to_string(), "vm.vmcx".to_string()])
        );
        assert_eq!(
            listing(&mnt.join("vm-disk.vhdx")),
            BTreeSet::from(["disk".to_string(), "p1".to_string(), "p2".to_string()])
        );
        files_equal(&mnt.join("vm.vmcx"), &config);
        let n = compare_tree(
            &ext_tree,
            &mnt.join("vm-disk.vhdx/p1"),
            true,
            &["lost+found"],
        );
        assert!(n >= 12, "only {n} ext entries compared");
        let n = compare_tree(&fat_tree, &mnt.join("vm-disk.vhdx/p2"), false, &[]);
        assert_eq!(n, 4);

        // The whole disk equals qemu-img's raw view of the VHDX (and the raw source).
        let qraw = dir2.join("qemu.raw");
        sh(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(dir2.join("vm-disk.vhdx"))
            .arg(&qraw));
        files_equal(&mnt.join("vm-disk.vhdx/disk"), &qraw);
        files_equal(&mnt.join("vm-disk.vhdx/disk"), &raw);

        // Reads at odd offsets across chunk boundaries.
        let big = mnt.join("vm-disk.vhdx/p1/docs/big.bin");
        let want = fs::read(ext_tree.join("docs/big.bin")).unwrap();
        let f = fs::File::open(&big).unwrap();
        for off in [0u64, 1, MIB - 7, 2 * MIB + 4097, want.len() as u64 - 3] {
            let mut buf = vec![0u8; 10_000];
            let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off).unwrap();
            let end = (off as usize + 10_000).min(want.len());
            assert_eq!(&buf[..n], &want[off as usize..end], "read at {off}");
        }

        // Writes of every kind are refused.
        let p1 = mnt.join("vm-disk.vhdx/p1");
        assert_erofs(fs::File::create(p1.join("new-file")), "create");
        assert_erofs(
            fs::File::options().write(true).open(p1.join("hello.txt")),
            "open for writing",
        );
        assert_erofs(fs::create_dir(p1.join("new-dir")), "mkdir");
        assert_erofs(fs::remove_file(p1.join("hello.txt")), "unlink");
        assert_erofs(
            fs::rename(p1.join("hello.txt"), p1.join("renamed")),
            "rename",
        );
        assert_erofs(
            fs::File::options()
                .write(true)
                .open(mnt.join("vm-disk.vhdx/disk")),
            "writing the disk",
        );
        // A missing name is ENOENT, not an I/O error.
        let e = fs::metadata(p1.join("no-such-file")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // Stable inodes: the same file seen twice has the same number.
        let a = fs::metadata(p1.join("hello.txt")).unwrap().ino();
        let b = fs::metadata(p1.join("docs/../hello.txt")).unwrap().ino();
        assert_eq!(a, b);
    });

    // Unmount from outside: the process notices and exits 0.
    sh(Command::new("fusermount3").arg("-u").arg(&mnt));
    let st = m.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "hyperkeep mount exited with {st:?}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn mount_disk_file_unmounts_on_sigint() {
    require_tools();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let img = build_images(dir);
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["--json", "mount"]).arg(&img.vhdx).arg(&mnt);
    let mut m = Mounted::start(cmd, &mnt);
    assert_eq!(m.json["source_kind"], "disk file");
    let (mnt2, ext_tree) = (mnt.clone(), img.ext_tree.clone());
    bounded(Duration::from_secs(120), move || {
        let p1 = mnt2.join("vm-disk.vhdx/p1");
        assert_eq!(
            fs::read(p1.join("docs/big.bin")).unwrap(),
            fs::read(ext_tree.join("docs/big.bin")).unwrap()
        );
        assert_eq!(
            fs::read_link(p1.join("link-abs")).unwrap(),
            Path::new("/etc/does-not-exist")
        );
    });
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let st = m.wait_exit(Duration::from_secs(30));
    assert!(
        st.success(),
        "hyperkeep mount exited with {st:?} after SIGINT"
    );
    assert!(!is_mounted(&mnt), "still mounted after SIGINT");
}

#[test]
fn mount_refuses_a_missing_mount_point() {
    let tmp = tempfile::TempDir::new().unwrap();
    let disk = tmp.path().join("d.raw");
    fs::File::create(&disk).unwrap().set_len(MIB).unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&disk)
        .arg(tmp.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");
}

/// NTFS through the mount: a bare NTFS volume (no partition table) made by mkntfs, a file and an
/// alternate data stream written by ntfscp; the stream is the xattr `user.<name>`.
#[test]
fn mount_ntfs_shows_streams_as_xattrs() {
    require_tools();
    for tool in ["mkntfs", "ntfscp"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: install the Debian package ntfs-3g"
        );
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let img = dir.join("ntfs.raw");
    fs::File::create(&img).unwrap().set_len(32 * MIB).unwrap();
    sh(Command::new("mkntfs")
        .args([
            "-q", "-F", "-f", "-L", "NTFSVOL", "-c", "4096", "-p", "0", "-H", "255", "-S", "63",
        ])
        .arg(&img));
    let data = dir.join("data.bin");
    fs::write(&data, pattern(1_000_000, 5)).unwrap();
    let stream = dir.join("stream.txt");
    fs::write(&stream, b"zone identifier\n").unwrap();
    sh(Command::new("ntfscp").arg(&img).arg(&data).arg("/data.bin"));
    sh(Command::new("ntfscp")
        .arg("-N")
        .arg("Zone.Identifier")
        .arg(&img)
        .arg(&stream)
        .arg("/data.bin"));
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["--json", "mount"]).arg(&img).arg(&mnt);
    let mut m = Mounted::start(cmd, &mnt);
    assert_eq!(m.json["disks"][0]["table"], "none");
    assert_eq!(m.json["disks"][0]["partitions"][0]["filesystem"], "ntfs");
    assert_eq!(m.json["disks"][0]["partitions"][0]["label"], "NTFSVOL");
    let mnt2 = mnt.clone();
    bounded(Duration::from_secs(120), move || {
        let f = mnt2.join("ntfs.raw/p1/data.bin");
        assert_eq!(fs::read(&f).unwrap(), fs::read(&data).unwrap());
        let x = xattrs(&f);
        assert_eq!(
            x.get("user.Zone.Identifier").map(Vec::as_slice),
            Some(&b"zone identifier\n"[..]),
            "{x:?}"
        );
        assert!(listing(&mnt2.join("ntfs.raw/p1")).contains("data.bin"));
    });
    sh(Command::new("fusermount3").arg("-u").arg(&mnt));
    let st = m.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
}

/// A damaged chunk in the repository: reading the file that uses it fails with EIO (never wrong
/// bytes, never a crash), the rest of the mount keeps working, and the unmount is clean.
#[test]
fn mount_answers_eio_for_a_damaged_chunk_and_stays_up() {
    require_tools();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let img = build_images(dir);
    let repo_dir = dir.join("repo");
    assert!(hyperkeep(&repo_dir).arg("init").status().unwrap().success());
    assert!(hyperkeep(&repo_dir)
        .args(["backup", "--vm", "damaged"])
        .arg(&img.vhdx)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());

    // Where the middle of docs/big.bin lies on the disk (debugfs: file block -> volume block of
    // 4 KiB, as build_images asks mke2fs for), and which pack holds that chunk.
    let out = Command::new("debugfs")
        .args(["-R", "bmap /docs/big.bin 384"])
        .arg(dir.join("ext.img"))
        .output()
        .expect("debugfs (e2fsprogs) is needed");
    let block: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap: {out:?}"));
    let disk_offset = EXT_START + block * 4096;
    std::env::set_var("HYPERKEEP_TEST_FAST_KDF", "1");
    let backend = repo::repository::Repository::open_location(repo_dir.to_str().unwrap()).unwrap();
    let repo = repo::repository::Repository::open(backend, PASSWORD).unwrap();
    let index = repo.load_index().unwrap();
    let (_, snap) = repo::snapshot::find_snapshot(&repo, "latest", None).unwrap();
    let table = repo::snapshot::load_table(&repo, &index, &snap.disks[0]).unwrap();
    let id = table[(disk_offset / u64::from(snap.disks[0].chunk_size)) as usize];
    assert!(!id.is_zero());
    let loc = index.lookup(&id).unwrap();
    let pack = repo_dir.join(repo::backend::ObjectKind::Pack.key(&loc.pack.to_hex()));
    let mut bytes = fs::read(&pack).unwrap();
    let at = (loc.offset + u64::from(loc.stored_len) / 2) as usize;
    bytes[at] ^= 0xFF;
    // Packs are stored read-only.
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&pack, &bytes).unwrap();

    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = hyperkeep(&repo_dir);
    cmd.args(["--json", "mount", "latest"]).arg(&mnt);
    let mut m = Mounted::start(cmd, &mnt);
    let (mnt2, ext_tree) = (mnt.clone(), img.ext_tree.clone());
    bounded(Duration::from_secs(120), move || {
        let p1 = mnt2.join("vm-disk.vhdx/p1");
        let e = fs::read(p1.join("docs/big.bin"))
            .map(|v| v.len())
            .expect_err("a file with a damaged chunk read without an error");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        // The damaged range of the whole-disk file too.
        let disk = fs::File::open(mnt2.join("vm-disk.vhdx/disk")).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = std::os::unix::fs::FileExt::read_exact_at(&disk, &mut buf, disk_offset)
            .expect_err("a damaged chunk of the disk read without an error");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        // Everything else still reads correctly.
        assert_eq!(
            fs::read(p1.join("hello.txt")).unwrap(),
            fs::read(ext_tree.join("hello.txt")).unwrap()
        );
        assert!(listing(&p1.join("docs")).contains("big.bin"));
    });
    assert!(
        m.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "mount process died"
    );
    sh(Command::new("fusermount3").arg("-u").arg(&mnt));
    let st = m.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
}
