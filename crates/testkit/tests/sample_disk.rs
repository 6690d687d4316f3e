//! The sample disk is checked with independent tools: util-linux sfdisk (partition table),
//! mtools (reads the FAT32 filesystem at the partition's offset) and dosfstools' fsck.fat.

use std::path::Path;
use std::process::Command;

fn tool(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("{name} is needed by this test but cannot run ({e}); install fdisk, mtools and dosfstools (./scripts/test.sh does)")
    });
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn img_at(p: &Path) -> String {
    format!("{}@@{}", p.display(), testkit::PARTITION_OFFSET)
}

#[test]
fn sample_disk_has_a_gpt_partition_and_fat32_files() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sample.img");
    let m = testkit::write_sample_disk(&img, 64 << 20).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);

    let dump = String::from_utf8(tool("sfdisk", &["-d", img.to_str().unwrap()]).stdout).unwrap();
    assert!(dump.contains("label: gpt"), "{dump}");
    let line = dump.lines().find(|l| l.contains("start=")).expect(&dump);
    assert!(line.contains("start=        2048"), "{line}");
    assert!(
        line.contains(&format!("size={:>12}", m.partition_size / 512)),
        "{line}"
    );
    assert!(
        line.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{line}"
    );

    let listing =
        String::from_utf8(tool("mdir", &["-/", "-b", "-i", &img_at(&img), "::"]).stdout).unwrap();
    for f in &m.files {
        assert!(
            listing.to_ascii_uppercase().contains(&f.path),
            "{} missing from mdir listing:\n{listing}",
            f.path
        );
        let out = tool("mtype", &["-i", &img_at(&img), &format!("::/{}", f.path)]);
        assert_eq!(out.stdout.len() as u64, f.size, "{}", f.path);
        assert_eq!(testkit::sha256_hex(&out.stdout), f.sha256, "{}", f.path);
        assert_eq!(out.stdout, f.content);
    }
    assert!(m.files.iter().any(|f| f.size > 1 << 20));

    // fsck.fat needs the partition as a file of its own.
    let part = dir.path().join("part.img");
    let data = std::fs::read(&img).unwrap();
    let p = &data[m.partition_offset as usize..(m.partition_offset + m.partition_size) as usize];
    std::fs::write(&part, p).unwrap();
    let out = tool("fsck.fat", &["-n", part.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAT32") || text.contains("files"), "{text}");

    // Deterministic content, and no overwriting.
    assert!(testkit::write_sample_disk(&img, 64 << 20).is_err());
    let m2 = testkit::write_sample_disk(&dir.path().join("b.img"), 48 << 20).unwrap();
    let sums =
        |m: &testkit::SampleManifest| m.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>();
    assert_eq!(sums(&m), sums(&m2));
    assert!(testkit::write_sample_disk(&dir.path().join("c.img"), 8 << 20).is_err());
}
