//! `guestfs::extract` on NTFS (mkntfs + ntfscp, no mounting): a file's alternate data stream is
//! saved as the sibling `NAME%%STREAM`, the main data as `NAME`, both byte-exact; with streams
//! turned off only the main data is written.

mod guestfs_support;

use std::process::Command;

use guestfs::extract::{extract, ExtractOptions};
use guestfs::volume::Volume;
use guestfs_support::*;

#[test]
fn ntfs_streams_become_percent_percent_siblings() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let img = dir.join("ntfs.img");
    let main = pattern(70_000, 5);
    let stream = b"[ZoneTransfer]\r\nZoneId=3\r\n".to_vec();
    std::fs::write(dir.join("main.bin"), &main).unwrap();
    std::fs::write(dir.join("zone.txt"), &stream).unwrap();
    run(
        Command::new("truncate").args(["-s", "16M"]).arg(&img),
        "coreutils",
    );
    run(
        Command::new("mkntfs")
            .args([
                "-q", "-F", "-f", "-L", "ADS", "-c", "4096", "-p", "2048", "-H", "255", "-S", "63",
            ])
            .arg(&img),
        "ntfs-3g",
    );
    run(
        Command::new("ntfscp")
            .arg(&img)
            .arg(dir.join("main.bin"))
            .arg("file.bin"),
        "ntfs-3g",
    );
    run(
        Command::new("ntfscp")
            .args(["-N", "Zone.Identifier"])
            .arg(&img)
            .arg(dir.join("zone.txt"))
            .arg("file.bin"),
        "ntfs-3g",
    );
    let fs = guestfs::open_fs(Volume::whole(open_raw(&img))).unwrap();

    let target = dir.join("out");
    let report = extract(
        fs.as_ref(),
        &["/file.bin"],
        &target,
        &ExtractOptions::default(),
    )
    .unwrap();
    assert!(report.skipped.is_empty(), "{report:#?}");
    assert_eq!((report.files, report.streams), (1, 1));
    assert!(std::fs::read(target.join("file.bin")).unwrap() == main);
    assert_eq!(
        std::fs::read(target.join("file.bin%%Zone.Identifier")).unwrap(),
        stream
    );
    assert_eq!(report.bytes, (main.len() + stream.len()) as u64);

    let target = dir.join("out2");
    let opts = ExtractOptions {
        streams: false,
        ..ExtractOptions::default()
    };
    let report = extract(fs.as_ref(), &["/"], &target, &opts).unwrap();
    assert_eq!(report.streams, 0);
    let names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // System files ($MFT, ...) are not listed by the NTFS reader's root directory.
    assert_eq!(names, vec!["file.bin".to_string()], "{report:#?}");
}
