//! Differencing chains built from qemu files turned into children by editing their metadata
//! (qemu cannot make differencing VHDX): every payload state, sector-bitmap granularity,
//! parent resolution by each locator entry and by override, linkage, loops and depth limits.
//! libvhdi (pyvhdi) reads the same chain as an independent check.

mod read_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use read_util::*;
use tempfile::TempDir;
use vdisk_core::{Error, ExtentState, MapScope, OpenOptions, Subformat, VirtualDisk};
use vdisk_vhdx::Vhdx;

const VS: u64 = 16 * MIB;
const BS: u64 = MIB;
/// Chunk ratio of 1 MiB blocks with 512-byte sectors: the first sector bitmap entry's index.
const RATIO: usize = 4096;

fn open(p: &Path) -> Result<Vhdx, Error> {
    Vhdx::open(p, &OpenOptions::default())
}

fn raw_of(p: &Path) -> Vec<u8> {
    let r = p.with_extension("raw");
    qemu_to_raw(p, &r);
    let b = read_file(&r);
    std::fs::remove_file(&r).unwrap();
    b
}

/// A base disk whose every block holds data (so inheritance is visible everywhere).
fn make_base(p: &Path, fill: u8) -> Vec<u8> {
    qemu_create(p, VS, "block_size=1M,block_state_zero=off");
    qemu_io(
        p,
        &[
            format!("write -P {fill:#x} 0 {VS}"),
            format!("write -P {:#x} 3584 1024", fill + 1),
        ],
    );
    raw_of(p)
}

/// A child of `parent_file` at `p`: qemu writes its own blocks, then we make it differencing.
/// Returns the child's standalone content (what its present blocks hold).
fn make_child(p: &Path, parent_bytes: &[u8], pairs: &[(&str, &str)], writes: &[String]) -> Vec<u8> {
    qemu_create(p, VS, "block_size=1M,block_state_zero=off");
    if !writes.is_empty() {
        qemu_io(p, writes);
    }
    let standalone = raw_of(p);
    let mut b = read_file(p);
    let linkage = format!("{:?}", data_write_guid(parent_bytes));
    let mut all: Vec<(&str, &str)> = vec![("parent_linkage", linkage.as_str())];
    all.extend_from_slice(pairs);
    make_differencing(&mut b, &all);
    // A present, all-zero sector bitmap for the (only) chunk, as Hyper-V allocates. (libvhdi
    // misreads NOT_PRESENT bitmap entries as a bitmap at file offset 0; we follow the spec:
    // no bitmap = no sector present.)
    let bm = (b.len() as u64).div_ceil(MIB) * MIB;
    b.resize((bm + MIB) as usize, 0);
    set_bat_entry(&mut b, RATIO, bm | 6);
    write_file(p, &b);
    standalone
}

fn pyvhdi_read(child: &Path, parents: &[&Path]) -> Vec<u8> {
    let mut script = String::from("import pyvhdi, sys\nfs = []\n");
    for p in std::iter::once(&child).chain(parents.iter()) {
        script += &format!(
            "f = pyvhdi.file(); f.open({:?}); fs.append(f)\n",
            p.to_str().unwrap()
        );
    }
    script += "for i in range(len(fs) - 1, 0, -1): fs[i - 1].set_parent(fs[i])\n";
    script += &format!("sys.stdout.buffer.write(fs[0].read_buffer_at_offset({VS}, 0))\n");
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("this test needs python3 with pyvhdi (pip install libvhdi-python)");
    assert!(
        out.status.success(),
        "pyvhdi failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn read_all(d: &Vhdx) -> Vec<u8> {
    let mut v = vec![0u8; VS as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Sectors (of block 2) marked present in the crafted sector bitmap.
fn partial_sectors() -> Vec<u64> {
    let mut s = vec![0, 1, 2, 7, 2047];
    s.extend(100..164);
    s
}

#[test]
fn every_state_in_a_differencing_chain() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    let base_raw = make_base(&base, 0x61);
    let base_bytes = read_file(&base);
    let child = d.join("child.avhdx");
    let standalone = make_child(
        &child,
        &base_bytes,
        &[("relative_path", r".\base.vhdx")],
        &[
            format!("write -P 0x71 {} {}", BS + 512, BS),
            format!("write -P 0x72 {} {}", 6 * BS, BS),
        ],
    );
    let mut b = read_file(&child);
    // Block 2 becomes PARTIALLY_PRESENT with a sector bitmap at the end of the file.
    let e2 = bat_entry(&b, 2);
    assert_eq!(e2 & 7, 6);
    set_bat_entry(&mut b, 2, e2 & !7 | 7);
    let bm = bat_entry(&b, RATIO);
    assert_eq!(bm & 7, 6);
    let bm = bm & !(MIB - 1);
    // Block 2 is the third block of chunk 0: its bits start at bit 2 * 2048.
    for s in partial_sectors() {
        let bit = 2 * 2048 + s;
        b[(bm + bit / 8) as usize] |= 1 << (bit % 8);
    }
    // Block 9 ZERO and block 10 UNMAPPED hide the parent; block 11 UNDEFINED too.
    set_bat_entry(&mut b, 9, 2);
    set_bat_entry(&mut b, 10, 3);
    set_bat_entry(&mut b, 11, 1);
    write_file(&child, &b);

    // The expected view, from qemu's readings of both files.
    let mut want = base_raw.clone();
    let blk = |i: u64| (i * BS) as usize..((i + 1) * BS) as usize;
    want[blk(1)].copy_from_slice(&standalone[blk(1)]);
    want[blk(6)].copy_from_slice(&standalone[blk(6)]);
    for s in partial_sectors() {
        let r = (2 * BS + s * 512) as usize..(2 * BS + (s + 1) * 512) as usize;
        want[r.clone()].copy_from_slice(&standalone[r]);
    }
    for i in [9, 10, 11] {
        want[blk(i)].fill(0);
    }

    let disk = open(&child).unwrap();
    let got = read_all(&disk);
    assert!(got == want, "chain view differs from the expected content");
    // Unaligned reads across the partial block's runs.
    for (off, len) in [
        (2 * BS + 1000, 5000usize),
        (2 * BS + 3 * 512 - 1, 2),
        (2 * BS - 7, 300_000),
    ] {
        let mut x = vec![0u8; len];
        disk.read_at(&mut x, off).unwrap();
        assert!(
            x[..] == want[off as usize..off as usize + len],
            "read {len} at {off}"
        );
    }

    // libvhdi agrees except where it shows the parent through ZERO/UNMAPPED/UNDEFINED blocks.
    let theirs = pyvhdi_read(&child, &[&base]);
    for i in (0..16).filter(|i| ![9, 10, 11].contains(i)) {
        assert!(
            theirs[blk(i)] == got[blk(i)],
            "libvhdi differs in block {i}"
        );
    }

    // Layer map: what the child itself holds.
    let layer = disk.map(0, VS, MapScope::Layer).unwrap();
    let state = |m: &[vdisk_core::Extent], off: u64| {
        m.iter()
            .find(|e| e.offset <= off && off < e.end())
            .unwrap()
            .state
    };
    assert_eq!(state(&layer, 0), ExtentState::Inherited);
    assert_eq!(state(&layer, BS), ExtentState::Data);
    assert_eq!(state(&layer, 6 * BS), ExtentState::Data);
    for i in [9, 10, 11] {
        assert_eq!(state(&layer, i * BS), ExtentState::Zero);
    }
    for s in 0..2048u64 {
        let want = if partial_sectors().contains(&s) {
            ExtentState::Data
        } else {
            ExtentState::Inherited
        };
        assert_eq!(
            state(&layer, 2 * BS + s * 512),
            want,
            "sector {s} of block 2"
        );
    }
    // Exact extents around the partial block.
    let around = disk.map(2 * BS, 8 * 512, MapScope::Layer).unwrap();
    let spans: Vec<(u64, u64, ExtentState)> = around
        .iter()
        .map(|e| (e.offset - 2 * BS, e.length, e.state))
        .collect();
    assert_eq!(
        spans,
        vec![
            (0, 1536, ExtentState::Data),
            (1536, 2048, ExtentState::Inherited),
            (3584, 512, ExtentState::Data)
        ]
    );
    // View: the base is all data, so everything is Data except the zero blocks.
    let view = disk.map(0, VS, MapScope::View).unwrap();
    let spans: Vec<(u64, u64, ExtentState)> =
        view.iter().map(|e| (e.offset, e.length, e.state)).collect();
    assert_eq!(
        spans,
        vec![
            (0, 9 * BS, ExtentState::Data),
            (9 * BS, 3 * BS, ExtentState::Zero),
            (12 * BS, 4 * BS, ExtentState::Data)
        ]
    );

    let info = disk.info();
    assert_eq!(info.subformat, Subformat::Differencing);
    assert_eq!(
        info.allocated_bytes,
        2 * BS + partial_sectors().len() as u64 * 512
    );
    let parent = info.parent.expect("parent info");
    assert_eq!(parent.subformat, Subformat::Dynamic);
    assert_eq!(
        parent.identifier,
        Some(data_write_guid(&base_bytes).to_string())
    );
    assert!(vdisk_vhdx::check(&child).unwrap().is_empty());

    // Opened alone (no parent), inherited ranges read as zeros and map as Unallocated.
    let alone = Vhdx::open_backing(std::sync::Arc::new(read_file(&child))).unwrap();
    let mut x = vec![1u8; BS as usize];
    alone.read_at(&mut x, 0).unwrap();
    assert!(x.iter().all(|&v| v == 0));
    let m = alone.map(0, VS, MapScope::View).unwrap();
    assert_eq!(state(&m, 0), ExtentState::Unallocated);
    assert_eq!(state(&m, 9 * BS), ExtentState::Zero);
}

#[test]
fn three_level_chain_and_locator_kinds() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    let base = d.join("sub/base.vhdx");
    let base_raw = make_base(&base, 0x41);
    let base_bytes = read_file(&base);
    let mid = d.join("mid.avhdx");
    let mid_sa = make_child(
        &mid,
        &base_bytes,
        &[("relative_path", r".\sub\base.vhdx")],
        &[format!("write -P 0x51 {} {}", 3 * BS, 2 * BS)],
    );
    let mid_bytes = read_file(&mid);
    let top = d.join("top.avhdx");
    let top_sa = make_child(
        &top,
        &mid_bytes,
        &[("relative_path", "mid.avhdx")],
        &[format!("write -P 0x61 {} {}", 4 * BS, BS)],
    );
    let mut want = base_raw.clone();
    let blk = |i: u64| (i * BS) as usize..((i + 1) * BS) as usize;
    for i in [3, 4] {
        want[blk(i)].copy_from_slice(&mid_sa[blk(i)]);
    }
    want[blk(4)].copy_from_slice(&top_sa[blk(4)]);
    let disk = open(&top).unwrap();
    assert!(read_all(&disk) == want);
    let theirs = pyvhdi_read(&top, &[&mid, &base]);
    for i in 0..16 {
        assert!(
            theirs[blk(i)] == want[blk(i)],
            "libvhdi differs in block {i} from byte {:?} ({} bytes differ)",
            (0..BS as usize).find(|&k| theirs[blk(i)][k] != want[blk(i)][k]),
            (0..BS as usize)
                .filter(|&k| theirs[blk(i)][k] != want[blk(i)][k])
                .count()
        );
    }
    let info = disk.info();
    assert_eq!(
        info.parent.as_ref().unwrap().parent.as_ref().unwrap().path,
        Some(base.clone())
    );

    // Locators by absolute Win32 path (drive letter stripped here) and by volume path.
    let abs = base.canonicalize().unwrap();
    let win = format!("C:{}", abs.to_str().unwrap().replace('/', "\\"));
    let vol = format!(
        r"\\?\Volume{{26a21bda-a627-11d7-9931-806e6f6e6963}}{}",
        abs.to_str().unwrap().replace('/', "\\")
    );
    for pairs in [
        vec![("absolute_win32_path", win.as_str())],
        vec![("volume_path", vol.as_str())],
        vec![
            ("relative_path", r"..\nowhere\base.vhdx"),
            ("absolute_win32_path", win.as_str()),
        ],
    ] {
        let c = d.join("abs.avhdx");
        let _ = std::fs::remove_file(&c);
        make_child(&c, &base_bytes, &pairs, &[]);
        let disk = open(&c).unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
        assert!(read_all(&disk) == base_raw, "{pairs:?}");
    }
}

fn err_of(r: Result<Vhdx, Error>) -> String {
    match r {
        Ok(_) => panic!("opened, but should have been refused"),
        Err(e) => {
            assert!(matches!(e, Error::Parent(_)), "{e:?}");
            e.to_string()
        }
    }
}

fn assert_words(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} lacks {w:?}");
    }
}

#[test]
fn linkage_override_and_missing_parent() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    let base_raw = make_base(&base, 0x41);
    let base_bytes = read_file(&base);
    let child = d.join("child.avhdx");
    make_child(&child, &base_bytes, &[("relative_path", "base.vhdx")], &[]);

    // The parent changed after the child was made: refuse, naming both files and GUIDs.
    let other = d.join("other.vhdx");
    make_base(&other, 0x33);
    let new_guid: vdisk_core::Guid = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".parse().unwrap();
    let mut moved = base_bytes.clone();
    set_data_write_guid(&mut moved, new_guid);
    write_file(&base, &moved);
    let msg = err_of(open(&child));
    assert_words(
        &msg,
        &[
            "base.vhdx",
            "child.avhdx",
            &data_write_guid(&base_bytes).to_string(),
            &new_guid.to_string(),
            "--parent",
        ],
    );
    let problems = vdisk_vhdx::check(&child).unwrap();
    assert!(
        problems.iter().any(|p| p.contains("parent chain")),
        "{problems:?}"
    );
    // parent_linkage2 names the new GUID: accepted.
    let mut cb = read_file(&child);
    let l1 = format!("{:?}", data_write_guid(&base_bytes));
    let l2 = format!("{new_guid:?}");
    make_differencing(
        &mut cb,
        &[
            ("parent_linkage", &l1),
            ("parent_linkage2", &l2),
            ("relative_path", "base.vhdx"),
        ],
    );
    let c2 = d.join("child2.avhdx");
    write_file(&c2, &cb);
    assert!(read_all(&open(&c2).unwrap()) == base_raw);
    write_file(&base, &base_bytes);

    // Parent moved away: clear error; --parent finds it; a wrong --parent is refused.
    let moved_to = d.join("renamed.vhdx");
    std::fs::rename(&base, &moved_to).unwrap();
    let msg = err_of(open(&child));
    assert_words(
        &msg,
        &[
            "cannot find the parent",
            "child.avhdx",
            "base.vhdx",
            "--parent",
        ],
    );
    let opts = OpenOptions {
        parent_override: Some(moved_to.clone()),
        ..OpenOptions::default()
    };
    assert!(read_all(&Vhdx::open(&child, &opts).unwrap()) == base_raw);
    let opts = OpenOptions {
        parent_override: Some(other.clone()),
        ..OpenOptions::default()
    };
    let msg = err_of(Vhdx::open(&child, &opts));
    assert_words(&msg, &["other.vhdx", "is not the parent"]);
    let opts = OpenOptions {
        parent_override: Some(d.join("nope.vhdx")),
        ..OpenOptions::default()
    };
    let msg = err_of(Vhdx::open(&child, &opts));
    assert_words(&msg, &["cannot find the parent", "nope.vhdx"]);
}

#[test]
fn loops_depth_and_sector_size() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    // A child whose locator points at itself, with its own DataWriteGuid as linkage.
    let selfp = d.join("self.avhdx");
    qemu_create(&selfp, VS, "block_size=1M,block_state_zero=off");
    let mut b = read_file(&selfp);
    let own = format!("{:?}", data_write_guid(&b));
    make_differencing(
        &mut b,
        &[("parent_linkage", &own), ("relative_path", "self.avhdx")],
    );
    write_file(&selfp, &b);
    let msg = err_of(open(&selfp));
    assert_words(&msg, &["loops", "self.avhdx"]);

    // A -> B -> A.
    let a = d.join("a.avhdx");
    let bp = d.join("b.avhdx");
    qemu_create(&a, VS, "block_size=1M,block_state_zero=off");
    qemu_create(&bp, VS, "block_size=1M,block_state_zero=off");
    let (mut ab, mut bb) = (read_file(&a), read_file(&bp));
    let (ga, gb) = (
        format!("{:?}", data_write_guid(&ab)),
        format!("{:?}", data_write_guid(&bb)),
    );
    make_differencing(
        &mut ab,
        &[("parent_linkage", &gb), ("relative_path", "b.avhdx")],
    );
    make_differencing(
        &mut bb,
        &[("parent_linkage", &ga), ("relative_path", "a.avhdx")],
    );
    write_file(&a, &ab);
    write_file(&bp, &bb);
    let msg = err_of(open(&a));
    assert_words(&msg, &["loops", "a.avhdx -> ", "b.avhdx -> "]);

    // A chain of 5 layers opens with the default limit, not with a limit of 3.
    let base = d.join("l0.vhdx");
    make_base(&base, 0x41);
    let mut prev = base.clone();
    for i in 1..5 {
        let p: PathBuf = d.join(format!("l{i}.avhdx"));
        let pb = read_file(&prev);
        make_child(
            &p,
            &pb,
            &[("relative_path", prev.file_name().unwrap().to_str().unwrap())],
            &[],
        );
        prev = p;
    }
    assert!(open(&prev).is_ok());
    let opts = OpenOptions {
        max_chain_depth: 3,
        ..OpenOptions::default()
    };
    let msg = err_of(Vhdx::open(&prev, &opts));
    assert_words(&msg, &["deeper than 3", "l4.avhdx"]);

    // Parent with another logical sector size.
    let mut pb = read_file(&base);
    let (_, lss) = metadata_item(&pb, LSS_GUID).unwrap();
    pb[lss as usize..lss as usize + 4].copy_from_slice(&4096u32.to_le_bytes());
    write_file(&base, &pb);
    let msg = err_of(open(&d.join("l1.avhdx")));
    assert_words(&msg, &["4096-byte", "512-byte", "sector"]);
}

/// A PARTIALLY_PRESENT block whose chunk has no sector bitmap holds no sector: all of it comes
/// from the parent.
#[test]
fn partial_block_without_bitmap_reads_the_parent() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    let base_raw = make_base(&base, 0x41);
    let child = d.join("child.avhdx");
    make_child(
        &child,
        &read_file(&base),
        &[("relative_path", "base.vhdx")],
        &[format!("write -P 0x77 {} {}", 3 * BS, BS)],
    );
    let mut b = read_file(&child);
    let e3 = bat_entry(&b, 3);
    set_bat_entry(&mut b, 3, e3 & !7 | 7);
    set_bat_entry(&mut b, RATIO, 0);
    write_file(&child, &b);
    let disk = open(&child).unwrap();
    assert!(read_all(&disk) == base_raw);
    let layer = disk.map(0, VS, MapScope::Layer).unwrap();
    assert_eq!(layer.len(), 1);
    assert_eq!(layer[0].state, ExtentState::Inherited);
    assert_eq!(disk.info().allocated_bytes, 0);
}

/// `check` looks at every file of the chain and never modifies any.
#[test]
fn check_reports_problems_of_parents() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    make_base(&base, 0x41);
    let child = d.join("child.avhdx");
    make_child(
        &child,
        &read_file(&base),
        &[("relative_path", "base.vhdx")],
        &[],
    );
    assert_eq!(vdisk_vhdx::check(&child).unwrap(), Vec::<String>::new());
    let mut b = read_file(&base);
    b[64 * 1024 + 300] ^= 1; // header 1 checksum
    write_file(&base, &b);
    let (before_c, before_b) = (read_file(&child), read_file(&base));
    let problems = vdisk_vhdx::check(&child).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("parent") && problems[0].contains("base.vhdx"));
    assert!(problems[0].contains("header 1"));
    assert!(read_file(&child) == before_c && read_file(&base) == before_b);
    assert!(vdisk_vhdx::check(&d.join("missing.vhdx")).is_err());
}

/// The view shows the topmost defining layer: a parent's ZERO blocks map as Zero, blocks no
/// layer holds as Unallocated.
#[test]
fn view_map_through_parent_states() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    qemu_create(&base, VS, "block_size=1M,block_state_zero=on");
    qemu_io(&base, &["write -P 0x41 0 1048576".into()]);
    let mut b = read_file(&base);
    assert_eq!(bat_entry(&b, 5) & 7, 2, "qemu marks unwritten blocks ZERO");
    for i in 8..16 {
        set_bat_entry(&mut b, i, 0);
    }
    write_file(&base, &b);
    let child = d.join("child.avhdx");
    make_child(
        &child,
        &b,
        &[("relative_path", "base.vhdx")],
        &[format!("write -P 0x61 {} 512", 10 * BS)],
    );
    let disk = open(&child).unwrap();
    let view: Vec<(u64, u64, ExtentState)> = disk
        .map(0, VS, MapScope::View)
        .unwrap()
        .iter()
        .map(|e| (e.offset / BS, e.length, e.state))
        .collect();
    assert_eq!(
        view,
        vec![
            (0, BS, ExtentState::Data),
            (1, 7 * BS, ExtentState::Zero),
            (8, 2 * BS, ExtentState::Unallocated),
            (10, BS, ExtentState::Data),
            (11, 5 * BS, ExtentState::Unallocated),
        ]
    );
    let layer = disk.map(0, VS, MapScope::Layer).unwrap();
    assert_eq!(layer.len(), 3);
    assert_eq!(layer[1].state, ExtentState::Data);
    let all = read_all(&disk);
    assert!(all[..BS as usize].iter().all(|&x| x == 0x41));
    assert!(all[10 * BS as usize..10 * BS as usize + 512]
        .iter()
        .all(|&x| x == 0x61));
    assert!(all[10 * BS as usize + 512..].iter().all(|&x| x == 0));
}
