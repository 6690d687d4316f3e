//! Acceptance: successive versions with random changes, replicated after each backup with a
//! small `keep` so that the oldest versions are merged away. After every cycle: every version
//! equals its snapshot (`replica::verify`) and the source disk as it was backed up, reads the
//! same in libvhdi (an independent reader, chains attached with set_parent, which checks the
//! linkage), base disks pass `qemu-img check`, and the bytes written are those of the changed
//! chunks.

#[path = "../../repo/tests/engine_util/mod.rs"]
mod engine_util;

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use engine_util::*;
use rand::{Rng, SeedableRng};
use replica::manifest::{load, Manifest};
use replica::{replicate, verify, ReplicateOptions};
use repo::backup::{backup, BackupOptions, NoProgress};
use vdisk::{CreateOptions, DiskFormat, OpenOptions, VirtualDiskMut};

fn digest(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The layer files of a version's disk, top first, from the manifest's parent links.
fn chain(dir: &Path, m: &Manifest, file: &str) -> Vec<PathBuf> {
    let parents: HashMap<&str, Option<&str>> = m
        .versions
        .iter()
        .flat_map(|v| v.disks.iter())
        .map(|d| (d.file.as_str(), d.parent.as_deref()))
        .collect();
    let mut out = vec![dir.join("disks").join(file)];
    let mut cur = parents.get(file).copied().flatten();
    while let Some(p) = cur {
        out.push(dir.join("disks").join(p));
        cur = parents.get(p).copied().flatten();
    }
    out
}

/// Random guest writes (any sector alignment, some spanning chunks) and sometimes a zeroed
/// range; returns the 4 KiB granules touched (replication compares changed chunks in 4 KiB
/// granules and writes only those that differ).
const G: u64 = 4096;

fn change(d: &mut dyn VirtualDiskMut, rng: &mut rand::rngs::StdRng) -> BTreeSet<u64> {
    let size = d.geometry().virtual_size;
    let mut touched = BTreeSet::new();
    for _ in 0..rng.gen_range(1..5) {
        let len = rng.gen_range(1..3 * MIB / 512) * 512;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        d.write_at(&buf, off).unwrap();
        touched.extend(off / G..(off + len).div_ceil(G));
    }
    if rng.gen_bool(0.4) {
        let off = rng.gen_range(0..size / MIB - 2) * MIB;
        d.write_zeroes(off, 2 * MIB).unwrap();
        touched.extend(off / G..(off + 2 * MIB) / G);
    }
    d.flush().unwrap();
    touched
}

fn versions_stay_exact(format: DiskFormat, ext: &str, cycles: usize, keep: usize, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let src = tmp.path().join(format!("vm.{ext}"));
    let cfg = tmp.path().join("vm.vmcx");
    let mut opts = CreateOptions::new(format, 20 * MIB);
    opts.block_size = Some(2 << 20);
    let mut d = vdisk::create(&src, &opts).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Some data that never changes, so old blocks must be found through the whole chain.
    let base: Vec<u8> = (0..6 * MIB).map(|i| noise(3, i)).collect();
    d.write_at(&base, 8 * MIB).unwrap();
    drop(d);
    let to = tmp.path().join("replicas");
    let mut expected: HashMap<String, u64> = HashMap::new();
    let mut merged = 0usize;
    for cycle in 0..cycles {
        let touched = if cycle == 0 {
            BTreeSet::new()
        } else {
            let mut d = vdisk::open_mut(&src, &OpenOptions::default()).unwrap();
            change(&mut *d, &mut rng)
        };
        std::fs::write(&cfg, format!("config of cycle {cycle}")).unwrap();
        let bo = BackupOptions {
            vm: "vm".into(),
            paths: vec![src.clone(), cfg.clone()],
            ..BackupOptions::default()
        };
        let (id, _) = backup(&repo, &bo, &NoProgress).unwrap();
        expected.insert(id.clone(), digest(&read_view(&src)));
        let ro = ReplicateOptions {
            keep,
            snapshot: None,
        };
        let r = replicate(&repo, "vm", &to, &ro).unwrap();
        merged += r.removed_versions.len();
        let dir = to.join("vm");
        let m = load(&dir).unwrap().unwrap();
        assert!(m.versions.len() <= keep);
        assert_eq!(m.versions.last().unwrap().snapshot, id);
        if cycle > 0 {
            let d = &r.disks[0];
            assert_eq!(d.kind, "incremental");
            assert_eq!(d.method, "chunk-ids");
            // Only what changed is written: at most the touched 4 KiB granules.
            assert!(
                d.bytes_written <= touched.len() as u64 * G,
                "cycle {cycle}: wrote {} for {} touched 4 KiB granules",
                d.bytes_written,
                touched.len()
            );
            let layer = dir.join("disks").join(&d.file);
            let allocated = std::fs::metadata(&layer).unwrap().blocks() * 512;
            // Written data plus the layer's fixed structures (headers, log, BAT, bitmaps).
            assert!(
                allocated <= d.bytes_written + 3 * MIB,
                "cycle {cycle}: layer {} allocates {allocated} bytes for {} written",
                d.file,
                d.bytes_written
            );
        }
        let rep = verify(&repo, &dir).unwrap();
        assert!(rep.clean(), "cycle {cycle}: verify: {:?}", rep);
        let last = m.versions.len() - 1;
        for (i, v) in m.versions.iter().enumerate() {
            // libvhdi (slow, a Python process) reads the versions that just changed shape: the
            // newest, and the oldest (into which merges go); every version on the last cycle.
            let independent = i == 0 || i == last || cycle + 1 == cycles;
            for disk in &v.disks {
                let layers = chain(&dir, &m, &disk.file);
                assert!(layers.len() <= keep);
                let ours = read_view(&layers[0]);
                assert_eq!(
                    digest(&ours),
                    expected[&v.snapshot],
                    "cycle {cycle}: version {} differs from the source as backed up",
                    v.version
                );
                if independent {
                    let out = tmp.path().join("libvhdi.raw");
                    let refs: Vec<&Path> = layers.iter().map(|p| p.as_path()).collect();
                    libvhdi_view(&refs, &out);
                    assert!(
                        std::fs::read(&out).unwrap() == ours,
                        "cycle {cycle}: libvhdi reads version {} differently",
                        v.version
                    );
                }
                let base = layers.last().unwrap();
                if format == DiskFormat::Vhdx {
                    qemu_check_clean(base, format);
                }
                let c = vdisk::check(base, &OpenOptions::default()).unwrap();
                assert!(c.problems.is_empty(), "{:?}", c.problems);
            }
        }
    }
    assert!(
        merged >= cycles - keep,
        "only {merged} versions were merged away"
    );
    // Nothing but the manifest's files is left.
    let m = load(&to.join("vm")).unwrap().unwrap();
    let on_disk: BTreeSet<String> = std::fs::read_dir(to.join("vm/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, m.referenced_disk_files());
}

#[test]
fn vhdx_ten_versions_keep_four() {
    versions_stay_exact(DiskFormat::Vhdx, "vhdx", 10, 4, 1);
}

#[test]
fn vhd_source_gives_vhd_replica() {
    versions_stay_exact(DiskFormat::Vhd, "vhd", 6, 2, 2);
}

/// A disk that changed size, and a disk added later, get a new base in that version; with
/// keep 1 the old version's base, which nothing builds on, is deleted.
#[test]
fn resized_and_added_disks_get_new_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let to = tmp.path().join("replicas");
    let (d1, d2) = (tmp.path().join("one"), tmp.path().join("two"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    hk_disk(
        &d1.join("a.vhdx"),
        DiskFormat::Vhdx,
        8 * MIB,
        None,
        &[(5, 0, 3 * MIB)],
    );
    hk_disk(
        &d2.join("a.vhdx"),
        DiskFormat::Vhdx,
        12 * MIB,
        None,
        &[(6, MIB, 2 * MIB)],
    );
    hk_disk(
        &d2.join("b.vhdx"),
        DiskFormat::Vhdx,
        4 * MIB,
        None,
        &[(7, 0, MIB)],
    );
    let ro = ReplicateOptions {
        keep: 1,
        snapshot: None,
    };
    for paths in [
        vec![d1.join("a.vhdx")],
        vec![d2.join("a.vhdx"), d2.join("b.vhdx")],
    ] {
        let bo = BackupOptions {
            vm: "vm".into(),
            paths,
            ..BackupOptions::default()
        };
        backup(&repo, &bo, &NoProgress).unwrap();
        let r = replicate(&repo, "vm", &to, &ro).unwrap();
        assert!(r.disks.iter().all(|d| d.kind == "full"), "{r:?}");
    }
    let dir = to.join("vm");
    let m = load(&dir).unwrap().unwrap();
    assert_eq!(m.versions.len(), 1);
    assert_eq!(m.versions[0].version, 2);
    let rep = verify(&repo, &dir).unwrap();
    assert!(rep.clean(), "{rep:?}");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir.join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, m.referenced_disk_files());
    assert_eq!(on_disk.len(), 2);
    assert_eq!(
        read_view(&dir.join("disks").join(&m.versions[0].disks[0].file)),
        read_view(&d2.join("a.vhdx"))
    );
}
