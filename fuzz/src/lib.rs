//! Shared code of the fuzz targets: the compact input encoding and the walk every target runs.
//!
//! Why an encoding: a real VHDX is at least ~4 MiB (header section, log, BAT and metadata regions
//! are each 1 MiB aligned), almost all zeros, while libFuzzer mutates small inputs well and large
//! ones badly. So a fuzz input describes a file instead of being one:
//!
//! ```text
//! input  := size:u32le patch*
//! patch  := offset:u32le len:u16le data[len]
//! ```
//!
//! The file is `size` bytes (clamped to [`MAX_FILE_SIZE`]) of zeros with each patch written at
//! its byte offset, later patches over earlier ones; bytes of a patch past the end of the file
//! are dropped, and a trailing incomplete patch header is ignored. A real 4 MiB VHDX with a few
//! written sectors encodes in a few KiB (see `src/bin/encode_corpus.rs`), and every mutation
//! libFuzzer makes to such an input is still a plausible file.
//!
//! [`exercise`] then drives a disk that opened through every read-side entry point with bounded
//! work, and panics (= a fuzz finding) when the disk breaks the `VirtualDisk` contract.

use std::collections::BTreeMap;
use std::io;

use vdisk_core::{ExtentState, MapScope, ReadAt, VirtualDisk};

pub mod guest;
pub mod repository;

/// Largest file an input can describe. Bigger than any useful corpus entry, small enough that
/// a parser that reads the whole file stays fast.
pub const MAX_FILE_SIZE: u64 = 64 << 20;

/// Granularity of the sparse store: a 1-byte patch costs one page, so keep pages small.
const PAGE: usize = 512;

/// A file of zeros with patches, stored sparsely. Memory is bounded by the input length times
/// `PAGE`, whatever `size` says.
pub struct SparseFile {
    size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE]>>,
}

impl SparseFile {
    /// Decode a fuzz input (never fails: every byte string describes some file).
    pub fn decode(data: &[u8]) -> SparseFile {
        let mut file = SparseFile {
            size: 0,
            pages: BTreeMap::new(),
        };
        let Some(head) = data.get(..4) else {
            return file;
        };
        file.size = u64::from(u32::from_le_bytes(head.try_into().unwrap())).min(MAX_FILE_SIZE);
        let mut rest = &data[4..];
        while rest.len() >= 6 {
            let offset = u64::from(u32::from_le_bytes(rest[..4].try_into().unwrap()));
            let len = usize::from(u16::from_le_bytes(rest[4..6].try_into().unwrap()));
            let body = &rest[6..];
            let bytes = &body[..len.min(body.len())];
            file.patch(offset, bytes);
            rest = &body[bytes.len()..];
        }
        file
    }

    fn patch(&mut self, offset: u64, bytes: &[u8]) {
        let end = (offset + bytes.len() as u64).min(self.size);
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE as u64;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - pos) as usize);
            let src = &bytes[(pos - offset) as usize..][..n];
            let dst = self
                .pages
                .entry(page)
                .or_insert_with(|| Box::new([0u8; PAGE]));
            dst[in_page..in_page + n].copy_from_slice(src);
            pos += n as u64;
        }
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The whole file as bytes (for the corpus tool and tests; fuzz targets never call it).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read_exact_at(&mut v, 0).expect("in range");
        v
    }
}

impl ReadAt for SparseFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Like a real file: reading past the end is an error, never a silent short read.
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / PAGE as u64;
        let last = (end - 1) / PAGE as u64;
        for (&page, bytes) in self.pages.range(first..=last) {
            let page_start = page * PAGE as u64;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE as u64);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - page_start) as usize..(to - page_start) as usize]);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// Encode a file's bytes as a fuzz input: one patch per run of non-zero bytes (runs closer than
/// a patch header are joined). `None` if the file is larger than [`MAX_FILE_SIZE`].
pub fn encode(file: &[u8]) -> Option<Vec<u8>> {
    if file.len() as u64 > MAX_FILE_SIZE {
        return None;
    }
    let mut out = (file.len() as u32).to_le_bytes().to_vec();
    let mut pos = 0usize;
    while pos < file.len() {
        if file[pos] == 0 {
            pos += 1;
            continue;
        }
        // A run starts at pos; extend it while the next non-zero byte is less than a patch
        // header away, and at most u16::MAX bytes.
        let start = pos;
        let mut end = pos + 1;
        let mut scan = end;
        while scan < file.len() && scan - start < usize::from(u16::MAX) && scan - end < 8 {
            if file[scan] != 0 {
                end = scan + 1;
            }
            scan += 1;
        }
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&file[start..end]);
        pos = end;
    }
    Some(out)
}

/// Work limits of [`exercise`], so that no input (a 64 TiB virtual size, millions of extents)
/// makes one run slow.
pub struct Limits {
    /// Virtual bytes walked with `map` from the start of the disk (plus one window at the end).
    pub walk: u64,
    /// Size of each `map` request.
    pub window: u64,
    /// Total guest bytes read per input.
    pub read_budget: u64,
    /// Largest single `read_at`.
    pub piece: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            walk: 4 << 30,
            window: 256 << 20,
            read_budget: 16 << 20,
            piece: 1 << 20,
        }
    }
}

/// Drive a disk through every read-side call and check the `VirtualDisk` contract. Errors from
/// the disk are fine (hostile input); a panic here is a finding: either the disk panicked, or it
/// returned something the contract forbids (a map with gaps, zeros that aren't, a read past the
/// end that succeeded).
pub fn exercise(disk: &dyn VirtualDisk, limits: &Limits) {
    let geo = disk.geometry();
    let size = geo.virtual_size;
    let info = disk.info();
    assert_eq!(
        info.virtual_size, size,
        "info() and geometry() disagree on the virtual size"
    );
    let _ = format!("{info:?}");

    // Out-of-range accesses must be refused, not wrap around or panic.
    let mut two = [0u8; 2];
    if size > 0 {
        assert!(
            disk.read_at(&mut two, size - 1).is_err(),
            "a read crossing the end of the disk succeeded"
        );
    }
    assert!(
        disk.read_at(&mut two, u64::MAX).is_err(),
        "a read at offset u64::MAX succeeded"
    );
    if let Ok(map) = disk.map(u64::MAX - 1, 10, MapScope::View) {
        assert!(
            map.iter().all(|e| e.end() <= size),
            "map of a range past the end returned extents outside the disk: {map:?}"
        );
    }

    let mut budget = limits.read_budget;
    // One buffer for every read: a fresh 1 MiB allocation per read is an mmap, page faults and
    // an munmap each time, which would dominate the run time.
    let mut buf = vec![0u8; limits.piece];
    let walked = size.min(limits.walk);
    let mut windows: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < walked {
        let len = limits.window.min(walked - off);
        windows.push((off, len));
        off += len;
    }
    if size > walked {
        // The end of a huge disk is where offset arithmetic overflows; look there too.
        let len = limits.window.min(size - walked);
        windows.push((size - len, len));
    }

    for scope in [MapScope::View, MapScope::Layer] {
        for &(start, len) in &windows {
            let Ok(map) = disk.map(start, len, scope) else {
                continue;
            };
            check_map(&map, start, len, size, scope);
            if scope != MapScope::View {
                continue;
            }
            for e in &map {
                if budget == 0 {
                    break;
                }
                match e.state {
                    ExtentState::Data => {
                        let mut pos = e.offset;
                        while pos < e.end() && budget > 0 {
                            let n = (e.end() - pos).min(limits.piece as u64).min(budget);
                            if disk.read_at(&mut buf[..n as usize], pos).is_err() {
                                break;
                            }
                            budget -= n;
                            pos += n;
                        }
                    }
                    ExtentState::Zero | ExtentState::Unallocated => {
                        // The map promises zeros here: hold it to that on a sample.
                        let n = e.length.min(4096).min(budget).min(limits.piece as u64);
                        let sample = &mut buf[..n as usize];
                        sample.fill(0xa5);
                        if disk.read_at(sample, e.offset).is_ok() {
                            assert!(
                                vdisk_core::io::is_zero(sample),
                                "map says {:?} at {}+{} but read_at returned non-zero bytes",
                                e.state,
                                e.offset,
                                n
                            );
                        }
                        budget -= n;
                    }
                    ExtentState::Inherited => unreachable!("checked by check_map"),
                }
            }
        }
    }
}

/// The map contract of `VirtualDisk::map`: ascending, contiguous, covering the requested range
/// clipped to the disk, no empty extents, neighbours of the same state merged, and no
/// `Inherited` in the flattened view.
fn check_map(map: &[vdisk_core::Extent], start: u64, len: u64, size: u64, scope: MapScope) {
    let end = start.saturating_add(len).min(size);
    let mut pos = start;
    let mut prev: Option<ExtentState> = None;
    for e in map {
        assert_eq!(
            e.offset, pos,
            "map({start}, {len}, {scope:?}) has a gap or overlap at {pos}: {map:?}"
        );
        assert!(
            e.length > 0,
            "map({start}, {len}) has an empty extent: {map:?}"
        );
        assert!(
            prev != Some(e.state),
            "map({start}, {len}, {scope:?}) did not merge neighbours of the same state: {map:?}"
        );
        assert!(
            scope == MapScope::Layer || e.state != ExtentState::Inherited,
            "map(.., View) reported Inherited: {map:?}"
        );
        prev = Some(e.state);
        pos = e
            .offset
            .checked_add(e.length)
            .expect("extent end overflows u64");
    }
    assert_eq!(
        pos, end,
        "map({start}, {len}, {scope:?}) does not cover the range (disk size {size}): {map:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn encode_decode_round_trip() {
        let mut file = vec![0u8; 3 * 65536 + 77];
        file[0] = 1;
        file[5..15].fill(7);
        file[20] = 9; // joins the previous run (gap < 8)
        file[100_000..100_000 + 70_000].fill(0xee); // longer than one patch
        *file.last_mut().unwrap() = 0xff;
        let enc = encode(&file).unwrap();
        assert!(enc.len() < 71_000, "encoding is {} bytes", enc.len());
        assert_eq!(SparseFile::decode(&enc).to_vec(), file);
    }

    #[test]
    fn decode_is_bounded_and_reads_like_a_file() {
        let mut input = u32::MAX.to_le_bytes().to_vec();
        input.extend_from_slice(&(MAX_FILE_SIZE as u32 - 2).to_le_bytes());
        input.extend_from_slice(&5u16.to_le_bytes());
        input.extend_from_slice(b"abcde");
        input.extend_from_slice(&[1, 2, 3]); // incomplete patch header: ignored
        let f = SparseFile::decode(&input);
        assert_eq!(f.size().unwrap(), MAX_FILE_SIZE);
        let mut b = [9u8; 4];
        f.read_exact_at(&mut b, MAX_FILE_SIZE - 4).unwrap();
        assert_eq!(&b, b"\0\0ab");
        assert!(f.read_exact_at(&mut b, MAX_FILE_SIZE - 3).is_err());
        assert!(f.read_exact_at(&mut b, u64::MAX - 1).is_err());
        assert!(SparseFile::decode(&[1, 2]).is_empty());
    }

    type OpenFn = fn(Arc<dyn ReadAt>) -> vdisk_core::Result<Box<dyn VirtualDisk>>;

    /// Every committed seed was made from a valid image by qemu-img (make-corpus.sh): each must
    /// open and pass the walk, or the seeds (or the parser) are broken and fuzzing starts blind.
    fn seeds_open(target: &str, open: OpenFn) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file: Arc<dyn ReadAt> =
                Arc::new(SparseFile::decode(&std::fs::read(&path).unwrap()));
            let disk =
                open(file).unwrap_or_else(|e| panic!("seed {} does not open: {e}", path.display()));
            exercise(&*disk, &Limits::default());
            n += 1;
        }
        assert!(n >= 4, "only {n} seeds in {}", dir.display());
    }

    #[test]
    fn vhdx_seeds_open() {
        seeds_open("vhdx_open", |f| {
            Ok(Box::new(vdisk_vhdx::Vhdx::open_backing(f)?))
        });
    }

    #[test]
    fn vhd_seeds_open() {
        seeds_open("vhd_open", |f| {
            Ok(Box::new(vdisk_vhd::Vhd::open_backing(f)?))
        });
    }

    #[test]
    fn exercise_accepts_a_raw_disk() {
        // The walk itself must hold on a correct disk (raw images are in vdisk-core).
        let dir = std::env::temp_dir().join(format!("hk-fuzz-selftest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("raw.img");
        let mut data = vec![0u8; 3 << 20];
        data[1 << 20..(1 << 20) + 4096].fill(0x5a);
        std::fs::write(&path, &data).unwrap();
        let disk = vdisk_core::raw::RawDisk::open(&path, false).unwrap();
        exercise(&disk, &Limits::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
