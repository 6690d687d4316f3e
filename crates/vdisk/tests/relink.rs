//! Merging the oldest layer of a chain away while every other layer stays readable (what
//! replication does): accept_parent_identity, merge_with (chosen identity, child kept),
//! reparent. After every step each remaining layer's view is unchanged; at the end the chain
//! reads identically in libvhdi (which checks linkage itself) and the base passes qemu-img check.

mod support;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use support::*;
use vdisk::{CreateOptions, DiskFormat, Guid, MergeOptions, OpenOptions, VirtualDiskMut};

fn view(p: &Path) -> Vec<u8> {
    let d = vdisk::open(p, &OpenOptions::default()).unwrap();
    read_all(&*d)
}

/// Whole-MiB writes (as replication writes whole chunks), some zero ranges over parent data.
fn change(d: &mut dyn VirtualDiskMut, rng: &mut rand::rngs::StdRng) {
    let size = d.geometry().virtual_size;
    for _ in 0..6 {
        let n = rng.gen_range(1..4u64) * MIB;
        let off = rng.gen_range(0..(size - n) / MIB) * MIB;
        let v: u8 = rng.gen_range(1..255);
        d.write_at(&vec![v; n as usize], off).unwrap();
    }
    let off = rng.gen_range(0..size / MIB - 2) * MIB;
    d.write_zeroes(off, 2 * MIB).unwrap();
    d.flush().unwrap();
}

fn merge_oldest_keeps_every_view(format: DiskFormat, ext: &str, qemu_fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let names: Vec<PathBuf> = (1..=4)
        .map(|i| dir.path().join(format!("d0-v{i:06}.{ext}")))
        .collect();
    let mut opts = CreateOptions::new(format, 32 * MIB);
    opts.block_size = Some(2 << 20);
    let mut d = vdisk::create(&names[0], &opts).unwrap();
    change(&mut *d, &mut rng);
    drop(d);
    for w in names.windows(2) {
        let mut c = vdisk::create_child(&w[0], &w[1]).unwrap();
        change(&mut *c, &mut rng);
    }
    let (base, d2, d3, d4) = (&names[0], &names[1], &names[2], &names[3]);
    let want: Vec<Vec<u8>> = [d2, d3, d4].iter().map(|p| view(p)).collect();
    let check = |step: &str| {
        for (p, w) in [d2, d3, d4].iter().zip(&want) {
            assert!(view(p) == *w, "{ext}: {} changed after {step}", p.display());
        }
    };
    let g = Guid::new_random();
    vdisk::accept_parent_identity(d2, g).unwrap();
    check("accept_parent_identity");
    let mopts = MergeOptions {
        parent_identity: Some(g),
        keep_child: true,
    };
    let r = vdisk::merge_with(d2, &OpenOptions::default(), &mopts).unwrap();
    assert!(r.bytes_merged > 0 && d2.exists());
    check("merge");
    // Redoing the merge (a crash before the manifest said it was done) changes nothing.
    vdisk::merge_with(d2, &OpenOptions::default(), &mopts).unwrap();
    check("second merge");
    vdisk::reparent(d3, base).unwrap();
    check("reparent");
    std::fs::remove_file(d2).unwrap();
    assert!(
        view(base) == want[0],
        "{ext}: the base does not show version 2"
    );
    for (p, w) in [d3, d4].iter().zip(&want[1..]) {
        assert!(view(p) == *w, "{ext}: {} changed without d2", p.display());
        let c = vdisk::check(p, &OpenOptions::default()).unwrap();
        assert!(c.problems.is_empty(), "{ext}: {:?}", c.problems);
    }
    if format == DiskFormat::Vhdx {
        qemu_check_clean(base, qemu_fmt); // qemu-img check has no VHD checker
    }
    let c = vdisk::check(base, &OpenOptions::default()).unwrap();
    assert!(c.problems.is_empty(), "{ext}: {:?}", c.problems);
    // libvhdi: the chain d4 -> d3 -> base, linkage checked by libvhdi.
    let raw = vhdi_dump(&[d4, d3, base], dir.path());
    assert!(
        std::fs::read(raw).unwrap() == want[2],
        "{ext}: libvhdi reads d4 differently"
    );
    let raw = vhdi_dump(&[d3, base], dir.path());
    assert!(
        std::fs::read(raw).unwrap() == want[1],
        "{ext}: libvhdi reads d3 differently"
    );
    if format == DiskFormat::Vhdx {
        let info = vdisk::open(base, &OpenOptions::default()).unwrap().info();
        assert_eq!(info.identifier.as_deref(), Some(g.to_string().as_str()));
    }
}

#[test]
fn vhdx_merge_oldest_keeps_every_view() {
    merge_oldest_keeps_every_view(DiskFormat::Vhdx, "vhdx", "vhdx");
}

#[test]
fn vhd_merge_oldest_keeps_every_view() {
    merge_oldest_keeps_every_view(DiskFormat::Vhd, "vhd", "vpc");
}

#[test]
fn relink_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.vhdx");
    drop(vdisk::create(&a, &CreateOptions::new(DiskFormat::Vhdx, 8 * MIB)).unwrap());
    drop(vdisk::create(&b, &CreateOptions::new(DiskFormat::Vhdx, 16 * MIB)).unwrap());
    let e = vdisk::accept_parent_identity(&a, Guid::new_random())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a differencing disk"), "{e}");
    let c = dir.path().join("c.vhdx");
    drop(vdisk::create_child(&a, &c).unwrap());
    let e = vdisk::reparent(&c, &b).unwrap_err().to_string();
    assert!(e.contains("one size"), "{e}");
    let v = dir.path().join("v.vhd");
    drop(vdisk::create(&v, &CreateOptions::new(DiskFormat::Vhd, 8 * MIB)).unwrap());
    let e = vdisk::reparent(&c, &v).unwrap_err().to_string();
    assert!(e.contains("one format"), "{e}");
}
