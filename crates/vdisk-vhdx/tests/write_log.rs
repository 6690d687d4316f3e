//! A VHDX left with a pending log (our writer interrupted between the log write and applying it):
//! read-only opens show the replayed data without touching the file, qemu replays it the same
//! way, writable opens replay it on disk. Damaged logs give clear errors, never a panic.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;

use support::{pattern, Model};
use vdisk_core::{Guid, OpenOptions, VirtualDisk, VirtualDiskMut};
use vdisk_vhdx::{CreateOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// The current header's (LogGuid, LogOffset, LogLength, slot offset), read independently.
fn current_header(path: &Path) -> (Guid, u64, u32, u64) {
    let f = std::fs::File::open(path).unwrap();
    let mut best: Option<(u64, Guid, u64, u32, u64)> = None;
    for slot in [64 * 1024u64, 128 * 1024] {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, slot).unwrap();
        let crc = u32::from_le_bytes(b[4..8].try_into().unwrap());
        b[4..8].fill(0);
        if &b[0..4] != b"head" || crc32c::crc32c(&b) != crc {
            continue;
        }
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let g = Guid::from_le_bytes(b[48..64].try_into().unwrap());
        let len = u32::from_le_bytes(b[68..72].try_into().unwrap());
        let off = u64::from_le_bytes(b[72..80].try_into().unwrap());
        if best.is_none_or(|x| seq > x.0) {
            best = Some((seq, g, off, len, slot));
        }
    }
    let (_, g, off, len, slot) = best.expect("a valid header");
    (g, off, len, slot)
}

/// Make a file with a pending log; returns the model of what it holds after replay.
fn make_pending(dir: &Path, name: &str) -> (std::path::PathBuf, Model) {
    let path = dir.join(format!("{name}.vhdx"));
    let model = Model::new(dir, name, SIZE);
    let mut d = Vhdx::create(
        &path,
        &CreateOptions {
            virtual_size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let a = pattern(3 * MIB as usize + 333, 1);
    d.write_at(&a, 1000).unwrap();
    model.write(&a, 1000);
    d.flush().unwrap();
    d.set_crash_after_log_write(true).unwrap();
    // New blocks (BAT pages change) and an overwrite of an existing one.
    let b = pattern(9 * MIB as usize, 2);
    d.write_at(&b, 40 * MIB + 512).unwrap();
    model.write(&b, 40 * MIB + 512);
    let c = pattern(777, 3);
    d.write_at(&c, 5).unwrap();
    model.write(&c, 5);
    let e = d.flush().unwrap_err().to_string();
    assert!(e.contains("simulated crash"), "{e}");
    assert!(
        d.write_at(b"x", 0).is_err(),
        "a crashed writer refuses more writes"
    );
    drop(d);
    (path, model)
}

#[test]
fn pending_log_is_replayed_in_memory_by_qemu_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = make_pending(dir.path(), "pending");
    let (log_guid, _, _, _) = current_header(&path);
    assert!(!log_guid.is_zero(), "the header must name a pending log");

    // Read-only: the replayed view, file untouched.
    let before = std::fs::read(&path).unwrap();
    let ro = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    support::assert_disk_equals_model(&ro, &model, "read-only view of the pending log");
    let details = format!("{:?}", ro.info().details);
    drop(ro);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read-only open must not modify the file"
    );
    assert!(details.to_lowercase().contains("replay"), "{details}");

    // qemu replays the same log (on a copy) to the same content.
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&path, &copy).unwrap();
    let o = std::process::Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&copy)
        .output()
        .expect("qemu-img is required (apt-get install qemu-utils)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let raw = dir.path().join("copy.raw");
    support::qemu_raw(&copy, &raw);
    support::assert_file_equals_model(&raw, &model, "qemu-img after its replay");

    // Writable: replayed on disk, LogGuid cleared, same content.
    let rw = Vhdx::open(
        &path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(current_header(&path).0.is_zero(), "LogGuid cleared");
    support::assert_disk_equals_model(&rw, &model, "after on-disk replay");
    drop(rw);
    support::qemu_check(&path);
    let raw2 = dir.path().join("replayed.raw");
    support::qemu_raw(&path, &raw2);
    support::assert_file_equals_model(&raw2, &model, "qemu-img after our replay");
}

/// Corrupt the file, open read-only: a clear error mentioning `needle`, never a panic.
fn expect_error(path: &Path, needle: &str) {
    let r = std::panic::catch_unwind(|| Vhdx::open(path, &OpenOptions::default()).map(|_| ()));
    let r = r.expect("opening a damaged log must not panic");
    let e = r.expect_err("a damaged log must be refused").to_string();
    assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
}

/// Rewrite the current header with a change, checksum fixed.
fn patch_header(path: &Path, f: impl Fn(&mut [u8])) {
    let (_, _, _, slot) = current_header(path);
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; 4096];
    file.read_exact_at(&mut b, slot).unwrap();
    f(&mut b);
    b[4..8].fill(0);
    let crc = crc32c::crc32c(&b);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&b, slot).unwrap();
}

/// Find the log entry of the current LogGuid; returns its file offset.
fn pending_entry(path: &Path) -> u64 {
    let (g, off, len, _) = current_header(path);
    let data = std::fs::read(path).unwrap();
    (0..u64::from(len) / 4096)
        .map(|i| off + i * 4096)
        .find(|&p| {
            let p = p as usize;
            &data[p..p + 4] == b"loge" && data[p + 32..p + 48] == g.to_le_bytes()
        })
        .expect("the pending entry")
}

/// Rewrite a log entry's checksum after changing it.
fn fix_entry_checksum(path: &Path, at: u64) {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 12];
    file.read_exact_at(&mut h, at).unwrap();
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut e = vec![0u8; len];
    file.read_exact_at(&mut e, at).unwrap();
    e[4..8].fill(0);
    let crc = crc32c::crc32c(&e);
    file.write_all_at(&crc.to_le_bytes(), at + 4).unwrap();
}

#[test]
fn damaged_logs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_pending(dir.path(), "base");
    let fresh = |name: &str| {
        let p = dir.path().join(format!("{name}.vhdx"));
        std::fs::copy(&path, &p).unwrap();
        p
    };
    let w = |p: &Path, buf: &[u8], at: u64| {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.write_all_at(buf, at).unwrap();
    };

    // A flipped bit in the entry: its checksum fails, no valid sequence remains.
    let p = fresh("crc");
    let e = pending_entry(&p);
    w(&p, &[0xFF, 0xEE], e + 4096 + 100);
    expect_error(&p, "no valid entry sequence");

    // A descriptor count far beyond what the entry holds (checksum made valid).
    let p = fresh("count");
    let e = pending_entry(&p);
    w(&p, &u32::MAX.to_le_bytes(), e + 24);
    fix_entry_checksum(&p, e);
    expect_error(&p, "no valid entry sequence");

    // A descriptor pointing at an absurd file offset.
    let p = fresh("offset");
    let e = pending_entry(&p);
    w(&p, &(u64::MAX - 4095).to_le_bytes(), e + 64 + 16);
    fix_entry_checksum(&p, e);
    expect_error(&p, "no valid entry sequence");

    // A descriptor writing into the log itself.
    let p = fresh("self");
    let e = pending_entry(&p);
    let (_, log_off, _, _) = current_header(&p);
    w(&p, &log_off.to_le_bytes(), e + 64 + 16);
    fix_entry_checksum(&p, e);
    expect_error(&p, "inside the log");

    // The log region past the end of the file.
    let p = fresh("pasteof");
    patch_header(&p, |b| {
        b[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    expect_error(&p, "past the end");

    // A truncated file: shorter than the log's FlushedFileOffset.
    let p = fresh("trunc");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 2 * MIB)
        .unwrap();
    expect_error(&p, "truncated");

    // A writable open of a damaged log refuses too, and leaves the file as it was.
    let p = fresh("rw");
    let e = pending_entry(&p);
    w(&p, &[0xFF], e + 4096 + 100);
    let before = std::fs::read(&p).unwrap();
    let r = Vhdx::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    );
    assert!(r.is_err());
    assert!(std::fs::read(&p).unwrap() == before);
}

#[test]
fn pending_log_of_a_differencing_disk_carries_its_sector_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let model = Model::new(dir.path(), "chain", SIZE);
    let mut d = Vhdx::create(
        &base,
        &CreateOptions {
            virtual_size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let a = pattern(6 * MIB as usize, 4);
    d.write_at(&a, 0).unwrap();
    model.write(&a, 0);
    d.flush().unwrap();
    drop(d);
    let child = dir.path().join("child.avhdx");
    let mut c = Vhdx::create_child(&base, &child).unwrap();
    c.write_at(&[7u8; 512], 512 * 3).unwrap();
    model.write(&[7u8; 512], 512 * 3);
    c.flush().unwrap();
    c.set_crash_after_log_write(true).unwrap();
    // Single sectors in blocks the child did not have yet: new PARTIALLY_PRESENT blocks and
    // bitmap bits that exist only in the log.
    for i in 0..40u64 {
        let off = (i * 7 + 1) * 512 * 97;
        let s = pattern(512, i + 100);
        c.write_at(&s, off).unwrap();
        model.write(&s, off);
    }
    assert!(c.flush().is_err());
    drop(c);
    assert!(!current_header(&child).0.is_zero());
    let before = std::fs::read(&child).unwrap();
    let ro = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    support::assert_disk_equals_model(&ro, &model, "pending differencing log, read-only");
    drop(ro);
    assert!(std::fs::read(&child).unwrap() == before);
    let rw = Vhdx::open(
        &child,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    support::assert_disk_equals_model(&rw, &model, "differencing log replayed on disk");
    drop(rw);
    assert!(current_header(&child).0.is_zero());
    // After replay libvhdi (which ignores logs) agrees too.
    let raw = dir.path().join("chain.vhdi");
    support::vhdi_raw(&[&child, &base], &raw);
    support::assert_file_equals_model(&raw, &model, "libvhdi after replay");
}
