//! The `hyperkeep` binary, run on real files. Where a second opinion exists it is asked:
//! `qemu-img compare` for conversions, `qemu-img check` for VHDX files we write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vdisk::{OpenOptions, VirtualDisk};

fn hk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hyperkeep"))
        .args(args)
        .output()
        .expect("run hyperkeep")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = hk(args);
    assert!(
        out.status.success(),
        "hyperkeep {args:?} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(&a)).unwrap()
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
        panic!("qemu-img is needed by this test but cannot run ({e}); install qemu-utils (./scripts/test.sh does)")
    })
}

fn qemu_format(f: &str) -> &str {
    match f {
        "vhd" => "vpc",
        other => other,
    }
}

/// Guest content of any disk, read through vdisk.
fn content(p: &Path) -> Vec<u8> {
    let d = vdisk::open(p, &OpenOptions::default()).unwrap();
    let mut v = vec![0u8; d.geometry().virtual_size as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn sample(dir: &Path) -> PathBuf {
    let p = dir.join("sample.raw");
    testkit::write_sample_disk(&p, 64 << 20).unwrap();
    p
}

#[test]
fn info_json_fields_of_a_raw_sample() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path());
    let v = json(&["disk", "info", s(&raw)]);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["subformat"], "fixed");
    assert_eq!(v["virtual_size"], 64 << 20);
    assert_eq!(v["file_size"], 64 << 20);
    assert_eq!(v["logical_sector_size"], 512);
    assert_eq!(v["block_size"], serde_json::Value::Null);
    assert_eq!(v["parent"], serde_json::Value::Null);
    let alloc = v["allocated_bytes"].as_u64().unwrap();
    assert!(alloc > 2 << 20 && alloc < 64 << 20, "allocated {alloc}");

    let text = ok(&["disk", "info", s(&raw)]);
    assert!(
        text.contains("virtual size: 64.0 MiB (67108864 bytes)"),
        "{text}"
    );
    assert!(text.contains("format:       raw (fixed)"), "{text}");
}

#[test]
fn convert_round_trips_through_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample(d);
    let original = content(&raw);

    // (output name, extra args, format for qemu)
    let steps: &[(&str, &[&str], &str)] = &[
        ("a.vhdx", &[], "vhdx"),
        ("b.vhd", &[], "vhd"),
        ("c.vhdx", &["--fixed"], "vhdx"),
        ("d.vhdx", &["--block-size", "1M"], "vhdx"),
        ("e.vhd", &["--fixed"], "vhd"),
        ("f.img", &["--to", "raw"], "raw"),
    ];
    let mut prev = raw.clone();
    for (name, extra, fmt) in steps {
        let out = d.join(name);
        let mut args = vec!["--json", "disk", "convert", s(&prev), s(&out)];
        args.extend_from_slice(extra);
        let r = hk(&args);
        assert!(
            r.status.success(),
            "convert to {name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        // Not a terminal: no progress bar, nothing on stderr.
        assert!(
            r.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(report["virtual_size"], 64 << 20);
        assert_eq!(report["format"], *fmt);
        assert!(
            report["bytes_written"].as_u64().unwrap() < 8 << 20,
            "{report}"
        );

        assert_eq!(content(&out), original, "{name} differs from the original");
        let info = json(&["disk", "info", s(&out)]);
        assert_eq!(info["format"], *fmt, "{name}");
        assert_eq!(info["virtual_size"], 64 << 20, "{name}");
        let c = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            qemu_format(fmt),
            s(&raw),
            s(&out),
        ]);
        assert!(
            c.status.success(),
            "qemu-img compare {name}: {}{}",
            String::from_utf8_lossy(&c.stdout),
            String::from_utf8_lossy(&c.stderr)
        );
        if *fmt == "vhdx" {
            let c = qemu_img(&["check", "-f", "vhdx", s(&out)]);
            assert!(c.status.success(), "qemu-img check {name}: {c:?}");
        }
        assert_eq!(ok(&["disk", "check", s(&out)]).lines().count(), 1);
        prev = out;
    }
    // Dynamic outputs stay small: the sample holds ~2 MiB of data in 64 MiB. (Space used,
    // not apparent size: a 64 MiB disk with data at both ends has both 32 MiB blocks.)
    for name in ["a.vhdx", "b.vhd", "d.vhdx", "f.img"] {
        use std::os::unix::fs::MetadataExt;
        let used = std::fs::metadata(d.join(name)).unwrap().blocks() * 512;
        assert!(used < 16 << 20, "{name} uses {used} bytes");
    }
    let d_info = json(&["disk", "info", s(&d.join("d.vhdx"))]);
    assert!(
        d_info["allocated_bytes"].as_u64().unwrap() <= 8 << 20,
        "{d_info}"
    );
    // The final raw is byte-identical to the original file.
    assert_eq!(
        std::fs::read(d.join("f.img")).unwrap(),
        std::fs::read(&raw).unwrap()
    );
}

#[test]
fn check_exit_codes_clean_damaged_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample(d);
    let vhdx = d.join("x.vhdx");
    ok(&["disk", "convert", s(&raw), s(&vhdx)]);
    let r = hk(&["disk", "check", s(&vhdx)]);
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    assert!(String::from_utf8_lossy(&r.stdout).contains("clean"));

    // Damage the first header's checksum field: the second header still opens the file, and
    // check must report the damage.
    let mut bytes = std::fs::read(&vhdx).unwrap();
    bytes[(64 << 10) + 4] ^= 0xff;
    let damaged = d.join("damaged.vhdx");
    std::fs::write(&damaged, &bytes).unwrap();
    let r = hk(&["disk", "check", s(&damaged)]);
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("problem"), "{out}");
    let v: serde_json::Value =
        serde_json::from_slice(&hk(&["--json", "disk", "check", s(&damaged)]).stdout).unwrap();
    assert_eq!(v["clean"], false);
    assert!(!v["problems"].as_array().unwrap().is_empty());

    // A dynamic VHD whose trailing footer's checksum is wrong (the copy at offset 0 is intact).
    let vhd = d.join("x.vhd");
    ok(&["disk", "convert", s(&raw), s(&vhd)]);
    assert_eq!(hk(&["disk", "check", s(&vhd)]).status.code(), Some(0));
    let mut bytes = std::fs::read(&vhd).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 64] ^= 0x01;
    std::fs::write(&vhd, &bytes).unwrap();
    let r = hk(&["disk", "check", s(&vhd)]);
    assert_eq!(r.status.code(), Some(1), "{r:?}");

    let r = hk(&["disk", "check", s(&d.join("missing.vhdx"))]);
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.starts_with("error: cannot open") && err.contains("missing.vhdx"),
        "{err}"
    );
}

/// A path from JSON names the same file as `p` (locators may yield `dir/./name`).
fn same_file(v: &serde_json::Value, p: &Path) -> bool {
    let got = Path::new(v.as_str().expect("a path string"));
    got.canonicalize().unwrap() == p.canonicalize().unwrap()
}

/// Open for writing. Tests run in parallel threads that spawn processes: a forked child holds a
/// copy of every descriptor (and so of a VHDX writer's file lock) until it execs, so right after
/// another thread's spawn a fresh lock can briefly look taken. Retry for that moment only.
fn open_mut(p: &Path) -> Box<dyn vdisk::VirtualDiskMut> {
    for _ in 0..50 {
        match vdisk::open_mut(p, &OpenOptions::default()) {
            Err(e) if e.to_string().contains("already open for writing") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
    panic!("{} stays locked by another writer", p.display());
}

fn write_pattern(p: &Path, offset: u64, len: usize, byte: u8) {
    let mut d = open_mut(p);
    d.write_at(&vec![byte; len], offset).unwrap();
    d.flush().unwrap();
}

#[test]
fn create_child_write_and_merge_for_vhdx_and_vhd() {
    for ext in ["vhd", "vhdx"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = d.join(format!("base.{ext}"));
        let child = d.join(format!("child.a{ext}"));
        ok(&["disk", "create", s(&base), "--size", "48M"]);
        write_pattern(&base, 0, 3 << 20, 0x11);
        write_pattern(&base, 40 << 20, 1 << 20, 0x22);

        let v = json(&["disk", "create-child", s(&base), s(&child)]);
        assert_eq!(v["subformat"], "differencing");
        // Single sectors and a whole range, overlapping the parent's data and not.
        write_pattern(&child, 512, 512, 0xc1);
        write_pattern(&child, (2 << 20) + 4096, 8192, 0xc2);
        write_pattern(&child, 20 << 20, 3 << 20, 0xc3);
        {
            let mut c = open_mut(&child);
            c.write_zeroes(40 << 20, 1 << 20).unwrap();
            c.flush().unwrap();
        }
        let info = json(&["disk", "info", s(&child)]);
        assert!(same_file(&info["parent"]["path"], &base), "{info}");
        let text = ok(&["disk", "info", s(&child)]);
        assert!(
            text.contains("parent chain:") && text.contains("base."),
            "{text}"
        );
        assert_eq!(hk(&["disk", "check", s(&child)]).status.code(), Some(0));

        let chain_view = content(&child);
        // Converting a child flattens its chain into one standalone disk.
        let flat = d.join(format!("flat.{ext}"));
        ok(&["disk", "convert", s(&child), s(&flat)]);
        assert_eq!(
            json(&["disk", "info", s(&flat)])["parent"],
            serde_json::Value::Null
        );
        assert_eq!(content(&flat), chain_view, "{ext}: flattened chain differs");
        let v = json(&["disk", "merge", s(&child)]);
        assert!(same_file(&v["parent"], &base), "{v}");
        assert!(!child.exists(), "merge must delete the child");
        assert_eq!(
            content(&base),
            chain_view,
            "{ext}: merged parent differs from the chain"
        );
        assert_eq!(hk(&["disk", "check", s(&base)]).status.code(), Some(0));
    }
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample(d);
    let (qcow, n, nope, craw) = (
        d.join("out.qcow"),
        d.join("n.vhdx"),
        d.join("nope.vhdx"),
        d.join("c.raw"),
    );
    let cases: &[(&[&str], &str)] = &[
        (&["disk", "convert", s(&raw), s(&qcow)], "--to"),
        (&["disk", "convert", s(&raw), s(&raw)], "already exists"),
        (&["disk", "create", s(&n), "--size", "12X"], "unit"),
        (&["disk", "info", s(&nope)], "nope.vhdx"),
        (&["disk", "frobnicate"], "frobnicate"),
        (&["disk", "create-child", s(&raw), s(&craw)], "raw image"),
        (&["disk", "merge", s(&raw)], "not a differencing disk"),
        (&["disk", "info", s(&raw), "--parent", s(&raw)], "no parent"),
    ];
    for (args, needle) in cases {
        let r = hk(args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!d.join("c.raw").exists());
    let help = ok(&["--help"]);
    assert!(
        help.contains("Exit codes") && help.contains("problems found"),
        "{help}"
    );
}

#[test]
fn sector_size_4096_is_kept_where_the_format_allows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("4k.vhdx");
    ok(&[
        "disk",
        "create",
        s(&src),
        "--size",
        "16M",
        "--block-size",
        "1M",
        "--logical-sector-size",
        "4096",
    ]);
    write_pattern(&src, 4096 * 3, 4096 * 5, 0x4b);
    let v = json(&["disk", "convert", s(&src), s(&d.join("copy.vhdx"))]);
    assert_eq!(v["format"], "vhdx");
    let info = json(&["disk", "info", s(&d.join("copy.vhdx"))]);
    assert_eq!(info["logical_sector_size"], 4096, "{info}");
    assert_eq!(content(&d.join("copy.vhdx")), content(&src));

    let r = hk(&["disk", "convert", s(&src), s(&d.join("no.vhd"))]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("VHD only has 512-byte sectors"), "{err}");
    assert!(!d.join("no.vhd").exists());

    ok(&["disk", "convert", s(&src), s(&d.join("flat.raw"))]);
    assert_eq!(std::fs::read(d.join("flat.raw")).unwrap(), content(&src));
}

#[test]
fn moved_parent_is_named_with_parent_for_info_convert_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    let child = d.join("child.avhdx");
    ok(&[
        "disk",
        "create",
        s(&base),
        "--size",
        "8M",
        "--block-size",
        "1M",
    ]);
    write_pattern(&base, 0, 1 << 20, 0x31);
    ok(&["disk", "create-child", s(&base), s(&child)]);
    write_pattern(&child, 4096, 4096, 0x32);
    let view = content(&child);
    let moved = d.join("moved.vhdx");
    std::fs::rename(&base, &moved).unwrap();

    let r = hk(&["disk", "info", s(&child)]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("--parent"),
        "{err}"
    );
    assert_eq!(hk(&["disk", "check", s(&child)]).status.code(), Some(1));

    let info = json(&["disk", "info", s(&child), "--parent", s(&moved)]);
    assert!(same_file(&info["parent"]["path"], &moved), "{info}");
    let flat = d.join("flat.raw");
    ok(&[
        "disk",
        "convert",
        s(&child),
        s(&flat),
        "--parent",
        s(&moved),
    ]);
    assert_eq!(std::fs::read(&flat).unwrap(), view);

    // A different file with the right size is refused: the linkage does not match.
    let other = d.join("other.vhdx");
    ok(&[
        "disk",
        "create",
        s(&other),
        "--size",
        "8M",
        "--block-size",
        "1M",
    ]);
    let r = hk(&["disk", "info", s(&child), "--parent", s(&other)]);
    assert_eq!(r.status.code(), Some(2), "{r:?}");

    ok(&["disk", "merge", s(&child), "--parent", s(&moved)]);
    assert!(!child.exists());
    assert_eq!(content(&moved), view);
}
