//! [`Vhd`]: one opened VHD layer (fixed, dynamic or differencing) with its parent chain, and the
//! reader, mapper and writer over it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_core::disk::{check_range, push_extent};
use vdisk_core::{
    DiskFormat, DiskInfo, Error, Extent, ExtentState, Geometry, Guid, MapScope, OpenOptions,
    ReadAt, Result, Subformat, VirtualDisk, VirtualDiskMut, WriteAt,
};

use crate::format::*;
use crate::parent;

/// Creator application we write into footers.
///
/// We would like to sign our files ("hkep"), but qemu decides how big a VHD is by its creator:
/// for any creator it does not know it trusts the CHS geometry, which rounds most sizes *down*,
/// so qemu would show a hyperkeep disk smaller than it is. qemu, Hyper-V, VirtualBox and libvhdi
/// all take CurrentSize as the size for files created by Hyper-V ("win "), which is the
/// behaviour we want and what our files are made for. So we write "win " (with Hyper-V's creator
/// version and host OS) and tell our files apart by nothing but their content.
pub const CREATOR_APP: [u8; 4] = *b"win ";
const CREATOR_VERSION: u32 = 0x000a_0000;
const CREATOR_OS: [u8; 4] = *b"Wi2k";

/// Default block size of dynamic and differencing disks (the spec's and Hyper-V's).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// Longest locator path we read (32 Ki UTF-16 units, the Windows path limit).
const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// How to create a new VHD.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Guest-visible size in bytes: a multiple of 512, at most 2040 GiB. Stored exactly as
    /// CurrentSize; the CHS geometry is derived from it by the spec's algorithm.
    pub virtual_size: u64,
    /// Block size of a dynamic disk (power of two, 512 bytes to 256 MiB). Ignored for fixed.
    pub block_size: u32,
    /// Fixed (all data preallocated, sparse on disk) instead of dynamic.
    pub fixed: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            virtual_size: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            fixed: false,
        }
    }
}

/// The block table and what goes with it, for dynamic and differencing disks.
struct Sparse {
    header: DynHeader,
    header_offset: u64,
    /// Entries covering the virtual size only (the table may be longer; the rest is unused).
    bat: Vec<u32>,
    block_size: u64,
    bitmap_bytes: u64,
    /// Parent locator paths as decoded (platform code, path), for resolution and info.
    locators: Vec<([u8; 4], String)>,
}

/// One VHD layer, with its parent chain for differencing disks.
pub struct Vhd {
    path: Option<PathBuf>,
    backing: Arc<dyn ReadAt>,
    writer: Option<Arc<dyn WriteAt>>,
    footer: Footer,
    kind: DiskType,
    virtual_size: u64,
    sparse: Option<Sparse>,
    parent: Option<Box<Vhd>>,
    /// Oddities found while opening (damaged footer copies...), shown by `check`.
    notes: Vec<String>,
    /// Where the next block goes: the trailing footer sits here.
    alloc_pos: u64,
    /// Where the size came from (`CurrentSize` or the CHS geometry), for info.
    size_source: &'static str,
    /// The trailing footer is damaged (we run on the copy at 0): the first write repairs it.
    footer_damaged: bool,
    /// The copy at offset 0 is damaged or differs from the good trailing footer: the first write
    /// rewrites it.
    head_copy_stale: bool,
}

/// Where a run of guest bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// Stored in this file at this offset.
    File(u64),
    /// Not in this layer of a differencing disk: the parent's bytes.
    Parent,
    /// Not allocated anywhere: zeros.
    Unallocated,
}

fn push_seg(segs: &mut Vec<(u64, u64, Src)>, off: u64, len: u64, src: Src) {
    if len == 0 {
        return;
    }
    if let Some(last) = segs.last_mut() {
        if last.0 + last.1 == off {
            let mergeable = match (last.2, src) {
                (Src::File(a), Src::File(b)) => a + last.1 == b,
                (a, b) => a == b,
            };
            if mergeable {
                last.1 += len;
                return;
            }
        }
    }
    segs.push((off, len, src));
}

fn bit_set(bm: &[u8], i: u64) -> bool {
    bm[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

fn io_err(what: &str, path: &Option<PathBuf>, e: std::io::Error) -> Error {
    let p = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "VHD".into());
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return Error::Corrupt {
            format: FORMAT,
            path: path.clone(),
            detail: format!("{what}: the file ends early (truncated?)"),
        };
    }
    Error::io(format!("{what} in {p}"), e)
}

/// Read and validate the footer of a VHD: the trailing one, or the copy at offset 0 if the
/// trailing one is damaged (dynamic and differencing disks only). Returns the footer, whether
/// the trailing copy was good, and notes for `check`.
pub(crate) fn read_footer(backing: &dyn ReadAt) -> Result<(Footer, bool, Vec<String>)> {
    let size = backing
        .size()
        .map_err(|e| Error::io("cannot get the file size", e))?;
    if size < FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            FORMAT,
            format!("file is only {size} bytes; a VHD ends with a 512-byte footer"),
        ));
    }
    let mut notes = Vec::new();
    let mut tail = [0u8; FOOTER_SIZE];
    backing
        .read_exact_at(&mut tail, size - FOOTER_SIZE as u64)
        .map_err(|e| Error::io("cannot read the footer", e))?;
    let mut head = [0u8; FOOTER_SIZE];
    let head_ok = backing.read_exact_at(&mut head, 0).is_ok();
    match Footer::parse(&tail) {
        Ok(f) => {
            let sparse = matches!(
                DiskType::from_u32(f.disk_type),
                Some(DiskType::Dynamic | DiskType::Differencing)
            );
            if sparse && head_ok {
                match Footer::parse(&head) {
                    Err(e) => notes.push(format!("footer copy at offset 0 is damaged: {e}")),
                    Ok(h) if h != f => notes.push(
                        "footer copy at offset 0 differs from the footer at the end of the file"
                            .into(),
                    ),
                    Ok(_) => {}
                }
            }
            Ok((f, true, notes))
        }
        Err(tail_err) => {
            if head_ok {
                if let Ok(h) = Footer::parse(&head) {
                    if matches!(
                        DiskType::from_u32(h.disk_type),
                        Some(DiskType::Dynamic | DiskType::Differencing)
                    ) {
                        notes.push(format!(
                            "footer at the end of the file is damaged ({tail_err}); using the copy at offset 0"
                        ));
                        return Ok((h, false, notes));
                    }
                }
            }
            Err(Error::corrupt(
                FORMAT,
                format!(
                    "{}; there is no valid footer copy at offset 0 either",
                    match tail_err {
                        Error::Corrupt { detail, .. } => detail,
                        other => other.to_string(),
                    }
                ),
            ))
        }
    }
}

impl Vhd {
    /// Open a VHD file and, for a differencing disk, its parent chain (read-only). See the crate
    /// docs for how parents are found and checked.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Vhd> {
        let mut visited = Vec::new();
        Self::open_layer(
            path,
            opts.writable,
            opts.parent_override.as_deref(),
            opts.max_chain_depth,
            &mut visited,
        )
    }

    fn open_layer(
        path: &Path,
        writable: bool,
        parent_override: Option<&Path>,
        max_depth: usize,
        visited: &mut Vec<PathBuf>,
    ) -> Result<Vhd> {
        if visited.len() >= max_depth {
            return Err(Error::Parent(format!(
                "differencing chain is deeper than {max_depth} layers at {} (a loop, or a hostile file); \
                 raise the limit only if the chain is really that deep",
                path.display()
            )));
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        if visited.contains(&canonical) {
            return Err(Error::Parent(format!(
                "differencing chain loops: {} is its own ancestor (chain: {})",
                path.display(),
                visited
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            )));
        }
        visited.push(canonical);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let file = Arc::new(file);
        let writer: Option<Arc<dyn WriteAt>> = if writable {
            Some(file.clone() as Arc<dyn WriteAt>)
        } else {
            None
        };
        let mut vhd = Vhd::from_backing(file as Arc<dyn ReadAt>, writer, Some(path.to_path_buf()))
            .map_err(|e| e.with_path(path))?;
        if vhd.kind == DiskType::Differencing {
            let parent_path = parent::resolve(&vhd, path, parent_override)?;
            let parent = Self::open_layer(&parent_path, false, None, max_depth, visited)?;
            vhd.parent = Some(Box::new(parent));
        }
        Ok(vhd)
    }

    /// Open one layer from any bytes (fuzzers, hostile-input tests). A differencing layer opened
    /// this way has no parent: the ranges it inherits read as zeros (and map as `Inherited` in
    /// [`MapScope::Layer`], `Unallocated` in [`MapScope::View`]).
    pub fn open_backing(backing: Arc<dyn ReadAt>) -> Result<Vhd> {
        Vhd::from_backing(backing, None, None)
    }

    fn from_backing(
        backing: Arc<dyn ReadAt>,
        writer: Option<Arc<dyn WriteAt>>,
        path: Option<PathBuf>,
    ) -> Result<Vhd> {
        let (footer, tail_ok, notes) = read_footer(&*backing)?;
        let notes_empty = notes.is_empty();
        let file_size = backing
            .size()
            .map_err(|e| Error::io("cannot get the file size", e))?;
        let kind = DiskType::from_u32(footer.disk_type).ok_or_else(|| {
            Error::unsupported(
                FORMAT,
                format!(
                    "disk type {} (only 2 fixed, 3 dynamic and 4 differencing exist)",
                    footer.disk_type
                ),
            )
        })?;
        // qemu sizes its own files ("qemu") by the CHS geometry unless the geometry is the
        // maximum one; everyone else uses CurrentSize. Files qemu makes have both agree, but if
        // they don't, reading what qemu reads keeps us identical to `qemu-img convert`.
        let chs = footer.chs_sectors();
        let (size, size_source) = if footer.creator_app == *b"qemu"
            && chs != MAX_CHS_SECTORS
            && chs * SECTOR != footer.current_size
        {
            (chs * SECTOR, "CHS geometry (qemu-created file)")
        } else {
            (footer.current_size, "CurrentSize")
        };
        // Like qemu, a size that is not a whole number of sectors is cut to whole sectors.
        let virtual_size = size / SECTOR * SECTOR;
        if virtual_size > 2 * MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "virtual size {virtual_size} bytes is far beyond the VHD limit of 2040 GiB"
                ),
            ));
        }
        let data_end = if tail_ok {
            file_size - FOOTER_SIZE as u64
        } else {
            file_size
        };
        let mut vhd = Vhd {
            path,
            backing,
            writer,
            footer,
            kind,
            virtual_size,
            sparse: None,
            parent: None,
            notes,
            alloc_pos: data_end,
            size_source,
            footer_damaged: !tail_ok,
            // With a good trailing footer, read_footer's notes are all about the copy at 0.
            head_copy_stale: tail_ok && !notes_empty,
        };
        if kind == DiskType::Fixed {
            if virtual_size > data_end {
                return Err(Error::corrupt(
                    FORMAT,
                    format!(
                        "fixed disk of {virtual_size} bytes, but only {data_end} bytes precede the footer \
                         (the file is truncated)"
                    ),
                ));
            }
            return Ok(vhd);
        }
        vhd.sparse = Some(vhd.read_sparse(file_size, data_end)?);
        let sp = vhd.sparse.as_ref().expect("just set");
        let mut next_free = sp.header_offset + DYN_HEADER_SIZE as u64;
        let table_len = (sp.header.max_table_entries as u64 * 4).div_ceil(SECTOR) * SECTOR;
        next_free = next_free.max(sp.header.table_offset + table_len);
        for &e in &sp.bat {
            if e != BAT_ABSENT {
                next_free = next_free.max(e as u64 * SECTOR + sp.bitmap_bytes + sp.block_size);
            }
        }
        if kind == DiskType::Differencing {
            for l in sp.header.locators.iter().filter(|l| !l.is_empty()) {
                let end = l.data_offset.saturating_add(l.space_bytes());
                if end <= data_end {
                    next_free = next_free.max(end);
                }
            }
        }
        let next_free = next_free.div_ceil(SECTOR) * SECTOR;
        // With a damaged trailing footer, everything after the last structure the file refers
        // to is unreferenced: the repaired footer goes right there.
        vhd.alloc_pos = if tail_ok {
            data_end.max(next_free)
        } else {
            next_free
        };
        Ok(vhd)
    }

    fn read_sparse(&self, file_size: u64, data_end: u64) -> Result<Sparse> {
        let f = &self.footer;
        let header_offset = f.data_offset;
        if header_offset
            .checked_add(DYN_HEADER_SIZE as u64)
            .is_none_or(|e| e > file_size)
        {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "footer points to a dynamic disk header at offset {header_offset}, outside the file ({file_size} bytes)"
                ),
            ));
        }
        let mut hb = vec![0u8; DYN_HEADER_SIZE];
        self.backing
            .read_exact_at(&mut hb, header_offset)
            .map_err(|e| io_err("cannot read the dynamic disk header", &self.path, e))?;
        let header = DynHeader::parse(&hb)?;
        let bs = header.block_size;
        if bs == 0 || bs % SECTOR as u32 != 0 || bs > MAX_BLOCK_SIZE {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "block size {bs} is not a multiple of 512 between 512 bytes and {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let block_size = bs as u64;
        let needed = self.virtual_size.div_ceil(block_size);
        if (header.max_table_entries as u64) < needed {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "block table has {} entries, but a disk of {} bytes in {bs}-byte blocks needs {needed}",
                    header.max_table_entries, self.virtual_size
                ),
            ));
        }
        if needed > MAX_BAT_ENTRIES {
            return Err(Error::unsupported(
                FORMAT,
                format!(
                    "a disk of {} bytes in {bs}-byte blocks needs {needed} block table entries, \
                     more than the {MAX_BAT_ENTRIES} we accept (blocks this small on a disk this big \
                     are not something real writers make)",
                    self.virtual_size
                ),
            ));
        }
        let table_end = header
            .table_offset
            .checked_add(header.max_table_entries as u64 * 4);
        if header.table_offset < SECTOR || table_end.is_none_or(|e| e > data_end) {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "block table at offset {} with {} entries does not lie inside the file ({file_size} bytes): \
                     the header is damaged or the file truncated",
                    header.table_offset, header.max_table_entries
                ),
            ));
        }
        // `needed * 4` is at most the table's size, which lies inside the file: the allocation is
        // bounded by the file size, whatever the header claims.
        let mut raw = vec![0u8; (needed * 4) as usize];
        self.backing
            .read_exact_at(&mut raw, header.table_offset)
            .map_err(|e| io_err("cannot read the block table", &self.path, e))?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_bytes = bitmap_bytes(bs);
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_ABSENT {
                continue;
            }
            let end = e as u64 * SECTOR + bitmap_bytes + block_size;
            if end > data_end {
                return Err(Error::corrupt(
                    FORMAT,
                    format!(
                        "block table entry {i} points to offset {}, but the block ends at {end}, past the end of the data ({data_end}): \
                         the file is truncated or the table damaged",
                        e as u64 * SECTOR
                    ),
                ));
            }
        }
        let mut locators = Vec::new();
        if self.kind == DiskType::Differencing {
            for l in header.locators.iter().filter(|l| !l.is_empty()) {
                if l.data_length == 0 || l.data_length > MAX_LOCATOR_BYTES {
                    continue;
                }
                let Some(end) = l.data_offset.checked_add(l.data_length as u64) else {
                    continue;
                };
                if end > file_size {
                    continue;
                }
                let mut d = vec![0u8; l.data_length as usize];
                if self.backing.read_exact_at(&mut d, l.data_offset).is_ok() {
                    locators.push((l.platform_code, decode_locator(l.platform_code, &d)));
                }
            }
        }
        Ok(Sparse {
            header,
            header_offset,
            bat,
            block_size,
            bitmap_bytes,
            locators,
        })
    }

    // ---- accessors used by the parent resolver, check and tests ----

    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn disk_type(&self) -> DiskType {
        self.kind
    }
    pub fn unique_id(&self) -> Guid {
        self.footer.unique_id
    }
    /// The parent unique id recorded in a differencing disk.
    pub fn parent_unique_id(&self) -> Option<Guid> {
        self.sparse
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing)
            .map(|s| s.header.parent_unique_id)
    }
    pub fn parent_timestamp(&self) -> Option<u32> {
        self.sparse
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing)
            .map(|s| s.header.parent_timestamp)
    }
    pub fn parent_name(&self) -> Option<String> {
        self.sparse
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing)
            .map(|s| s.header.parent_name_string())
    }
    /// Decoded parent locators: (platform code, path as stored).
    pub fn parent_locators(&self) -> Vec<([u8; 4], String)> {
        self.sparse
            .as_ref()
            .map(|s| s.locators.clone())
            .unwrap_or_default()
    }
    pub fn parent(&self) -> Option<&Vhd> {
        self.parent.as_deref()
    }
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn block_size(&self) -> Option<u32> {
        self.sparse.as_ref().map(|s| s.block_size as u32)
    }
    pub(crate) fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Guest bytes this layer stores: whole present blocks in a dynamic disk, the sectors whose
    /// bitmap bits are set in a differencing disk (counted bitmap by bitmap, in constant memory).
    fn allocated_bytes(&self, sp: &Sparse) -> u64 {
        let mut total = 0u64;
        let mut bm = vec![0u8; sp.bitmap_bytes as usize];
        for (b, &e) in sp.bat.iter().enumerate() {
            if e == BAT_ABSENT {
                continue;
            }
            let start = b as u64 * sp.block_size;
            let len = sp.block_size.min(self.virtual_size - start);
            if self.kind != DiskType::Differencing {
                total += len;
                continue;
            }
            if self
                .backing
                .read_exact_at(&mut bm, e as u64 * SECTOR)
                .is_err()
            {
                total += len;
                continue;
            }
            let sectors = len / SECTOR;
            let full = (sectors / 8) as usize;
            let mut bits: u64 = bm[..full].iter().map(|x| x.count_ones() as u64).sum();
            for s in full as u64 * 8..sectors {
                bits += bit_set(&bm, s) as u64;
            }
            total += bits * SECTOR;
        }
        total
    }

    // ---- reading ----

    /// Where each byte of `[offset, offset+len)` of this layer comes from.
    fn plan(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Src)>> {
        let mut segs = Vec::new();
        let Some(sp) = &self.sparse else {
            push_seg(&mut segs, offset, len, Src::File(offset));
            return Ok(segs);
        };
        let diff = self.kind == DiskType::Differencing;
        let end = offset + len;
        let mut pos = offset;
        let mut bm = Vec::new();
        while pos < end {
            let b = pos / sp.block_size;
            let in_off = pos % sp.block_size;
            let n = (sp.block_size - in_off).min(end - pos);
            let entry = sp.bat[b as usize];
            if entry == BAT_ABSENT {
                let src = if diff { Src::Parent } else { Src::Unallocated };
                push_seg(&mut segs, pos, n, src);
            } else {
                let data = entry as u64 * SECTOR + sp.bitmap_bytes;
                if !diff {
                    // In a dynamic disk a present block is read whole: the bitmap is only
                    // informational there, and qemu ignores it too.
                    push_seg(&mut segs, pos, n, Src::File(data + in_off));
                } else {
                    let s0 = in_off / SECTOR;
                    let s1 = (in_off + n).div_ceil(SECTOR);
                    let b0 = s0 / 8;
                    let b1 = (s1 - 1) / 8 + 1;
                    bm.resize((b1 - b0) as usize, 0);
                    self.backing
                        .read_exact_at(&mut bm, entry as u64 * SECTOR + b0)
                        .map_err(|e| io_err("cannot read a sector bitmap", &self.path, e))?;
                    let mut p = pos;
                    let pend = pos + n;
                    while p < pend {
                        let s = (p % sp.block_size) / SECTOR;
                        let set = bit_set(&bm, s - b0 * 8);
                        let run_end = ((b * sp.block_size) + (s + 1) * SECTOR).min(pend);
                        let src = if set {
                            Src::File(data + p % sp.block_size)
                        } else {
                            Src::Parent
                        };
                        push_seg(&mut segs, p, run_end - p, src);
                        p = run_end;
                    }
                }
            }
            pos += n;
        }
        Ok(segs)
    }

    /// Read from the parent, zeros where there is none or past its end (a parent may be a little
    /// smaller than its child, e.g. a qemu parent sized by CHS).
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.virtual_size;
                let avail = psize.saturating_sub(offset).min(buf.len() as u64) as usize;
                if avail > 0 {
                    p.read_at(&mut buf[..avail], offset)?;
                }
                buf[avail..].fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn parent_map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.virtual_size;
                let inside = psize.saturating_sub(offset).min(len);
                if inside > 0 {
                    for e in p.map(offset, inside, MapScope::View)? {
                        push_extent(out, e.offset, e.length, e.state);
                    }
                }
                push_extent(out, offset + inside, len - inside, ExtentState::Unallocated);
            }
            None => push_extent(out, offset, len, ExtentState::Unallocated),
        }
        Ok(())
    }

    fn ctx(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "VHD".into())
    }

    // ---- writing ----

    fn writer(&self) -> Result<&Arc<dyn WriteAt>> {
        self.writer
            .as_ref()
            .ok_or_else(|| Error::ReadOnly(format!("{} is open read-only", self.ctx())))
    }

    fn wio(&self, what: &str, r: std::io::Result<()>) -> Result<()> {
        r.map_err(|e| Error::io(format!("{what} in {}", self.ctx()), e))
    }

    /// Write `data` at `in_off` inside block `b`.
    ///
    /// A new block goes where the trailing footer is. Order: footer at the new end, data,
    /// bitmap, and the table entry last, so that at every step the file ends in a valid footer
    /// and the table only ever points at a complete block; a crash leaves at worst an unused
    /// block. There is no fsync between the steps (that would cost a sync per block); the
    /// ordering holds for what reaches the disk once [`VirtualDiskMut::flush`] returns, and
    /// against a crash of our process at any point.
    fn write_block_piece(&mut self, b: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let diff = self.kind == DiskType::Differencing;
        let sp = self.sparse.as_ref().expect("sparse disk");
        let (block_size, bitmap_len) = (sp.block_size, sp.bitmap_bytes);
        let entry = sp.bat[b as usize];
        if entry == BAT_ABSENT && !diff && vdisk_core::io::is_zero(data) {
            // Absent blocks of a dynamic disk read as zeros already.
            return Ok(());
        }
        let vblock = b * block_size;
        let s0 = in_off / SECTOR;
        let s1 = (in_off + data.len() as u64).div_ceil(SECTOR);
        let a_off = s0 * SECTOR;
        let a_len = (s1 - s0) * SECTOR;
        // Partial sectors: merge with what the guest sees there now (the parent's bytes for a
        // sector this layer does not hold yet).
        let owned;
        let payload: &[u8] = if a_off == in_off && a_len == data.len() as u64 {
            data
        } else {
            let mut v = vec![0u8; a_len as usize];
            if in_off != a_off {
                self.read_at(&mut v[..SECTOR as usize], vblock + a_off)?;
            }
            let tail = !(in_off + data.len() as u64).is_multiple_of(SECTOR);
            if tail && (a_len > SECTOR || in_off == a_off) {
                let at = (a_len - SECTOR) as usize;
                self.read_at(&mut v[at..], vblock + a_off + at as u64)?;
            }
            let d0 = (in_off - a_off) as usize;
            v[d0..d0 + data.len()].copy_from_slice(data);
            owned = v;
            &owned
        };
        let w = self.writer()?.clone();
        if entry == BAT_ABSENT {
            let pos = self.alloc_pos;
            let new_end = pos + bitmap_len + block_size;
            if (pos / SECTOR) >= BAT_ABSENT as u64 {
                return Err(Error::unsupported(
                    FORMAT,
                    "the file has reached the 2 TiB that VHD block offsets can address",
                ));
            }
            let old_size = self
                .backing
                .size()
                .map_err(|e| Error::io(format!("cannot stat {}", self.ctx()), e))?;
            // 1. The footer moves to the new end first, so the file always ends in a footer.
            self.wio(
                "cannot write the footer",
                w.write_all_at(&self.footer.to_bytes(), new_end),
            )?;
            // Anything that was in the new block's place (only the old footer, normally) must
            // read as zeros.
            let data_start = pos + bitmap_len;
            if old_size > data_start {
                let zero_end = old_size.min(new_end);
                let zeros = vec![0u8; (1 << 20).min(zero_end - data_start) as usize];
                let mut p = data_start;
                while p < zero_end {
                    let n = (zero_end - p).min(zeros.len() as u64) as usize;
                    self.wio("cannot clear a new block", w.write_all_at(&zeros[..n], p))?;
                    p += n as u64;
                }
            }
            // 2. The data.
            self.wio(
                "cannot write data",
                w.write_all_at(payload, data_start + a_off),
            )?;
            // 3. The bitmap: every sector of a dynamic disk's block is present; a differencing
            // layer holds only the sectors written.
            let mut bitmap = vec![0u8; bitmap_len as usize];
            if diff {
                for s in s0..s1 {
                    bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
                }
            } else {
                bitmap.fill(0xFF);
            }
            self.wio("cannot write a sector bitmap", w.write_all_at(&bitmap, pos))?;
            // 4. Last, the table entry makes the block part of the disk.
            let sp = self.sparse.as_mut().expect("sparse disk");
            let entry = (pos / SECTOR) as u32;
            let at = sp.header.table_offset + b * 4;
            w.write_all_at(&entry.to_be_bytes(), at)
                .map_err(|e| Error::io("cannot write the block table", e))?;
            sp.bat[b as usize] = entry;
            self.alloc_pos = new_end;
        } else {
            let block_pos = entry as u64 * SECTOR;
            self.wio(
                "cannot write data",
                w.write_all_at(payload, block_pos + bitmap_len + a_off),
            )?;
            if diff {
                // Bits are set after the data is written: a sector never shows stale bytes.
                let b0 = s0 / 8;
                let b1 = (s1 - 1) / 8 + 1;
                let mut bm = vec![0u8; (b1 - b0) as usize];
                self.backing
                    .read_exact_at(&mut bm, block_pos + b0)
                    .map_err(|e| io_err("cannot read a sector bitmap", &self.path, e))?;
                let before = bm.clone();
                for s in s0..s1 {
                    bm[(s / 8 - b0) as usize] |= 0x80 >> (s % 8);
                }
                if bm != before {
                    self.wio(
                        "cannot write a sector bitmap",
                        w.write_all_at(&bm, block_pos + b0),
                    )?;
                }
            }
        }
        Ok(())
    }

    // ---- creating ----

    /// Create a new, empty VHD (truncating any existing file) and open it for writing.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Vhd> {
        let size = opts.virtual_size;
        if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "VHD size {size} must be a non-zero multiple of 512 bytes, at most 2040 GiB"
            )));
        }
        if !opts.fixed {
            check_block_size(opts.block_size)?;
        }
        let file = create_file(path)?;
        let kind = if opts.fixed {
            DiskType::Fixed
        } else {
            DiskType::Dynamic
        };
        let footer = new_footer(kind, size);
        let r = if opts.fixed {
            file.write_all_at(&footer.to_bytes(), size)
        } else {
            write_sparse_layout(&file, &footer, opts.block_size, Guid::ZERO, 0, "", &[])
        };
        r.map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        let file = Arc::new(file);
        Vhd::from_backing(
            file.clone() as Arc<dyn ReadAt>,
            Some(file as Arc<dyn WriteAt>),
            Some(path.to_path_buf()),
        )
        .map_err(|e| e.with_path(path))
    }

    /// Create a differencing child of the VHD `parent` at `child` and open it for writing. The
    /// child records the parent's unique id, modification time and name, and locators with the
    /// relative (`W2ru`) and absolute (`W2ku`) path, UTF-16LE, space counted in sectors.
    pub fn create_child(parent: &Path, child: &Path) -> Result<Vhd> {
        let p = Vhd::open(parent, &OpenOptions::default())?;
        // Creating truncates `child`: never let that be a file of the chain we build on.
        if let Ok(c) = std::fs::canonicalize(child) {
            let mut layer = Some(&p);
            while let Some(l) = layer {
                if l.path().and_then(|lp| std::fs::canonicalize(lp).ok()) == Some(c.clone()) {
                    return Err(Error::InvalidArgument(format!(
                        "{} is part of the parent chain of the child to create; choose another file name",
                        child.display()
                    )));
                }
                layer = l.parent();
            }
        }
        let size = p.virtual_size;
        let block_size = p.block_size().unwrap_or(DEFAULT_BLOCK_SIZE);
        let mtime = std::fs::metadata(parent)
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(format!("cannot stat {}", parent.display()), e))?;
        let (parent_abs, child_dir) = resolve_link_paths(parent, child)?;
        let name = parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rel = parent::relative_windows_path(&child_dir, &parent_abs);
        let abs = parent_abs.to_string_lossy().replace('/', "\\");
        let locators = [(PLATFORM_W2RU, rel), (PLATFORM_W2KU, abs)];
        let file = create_file(child)?;
        let footer = new_footer(DiskType::Differencing, size);
        write_sparse_layout(
            &file,
            &footer,
            block_size,
            p.unique_id(),
            vhd_timestamp(mtime),
            &name,
            &locators,
        )
        .map_err(|e| Error::io(format!("cannot write {}", child.display()), e))?;
        drop(file);
        drop(p);
        Vhd::open(
            child,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
    }
}

impl Vhd {
    /// Point differencing disk `child` at `parent`: parent unique id, time stamp and name, and
    /// its relative (`W2ru`) and absolute (`W2ku`) locators. The child's own unique id does not
    /// change, so its children stay linked. The parent must have the child's size; its content is
    /// the caller's business (this is for a parent that shows what the old parent showed, e.g.
    /// after a merge).
    ///
    /// The new paths must fit in the space the child reserved for its locators (true for a
    /// parent next to the old one with a name of the same length, as replicas use); otherwise
    /// nothing is written and an error says so. Order: locator data first, then the header in
    /// one write. In between, the header still names the old parent, which is found by its name
    /// next to the child, so the child stays readable throughout (against a crash of the
    /// process; a power cut in the middle of the 1 KiB header write is not covered).
    pub fn reparent(child: &Path, parent: &Path) -> Result<()> {
        let pfile = File::open(parent)
            .map_err(|e| Error::io(format!("cannot open {}", parent.display()), e))?;
        let (pfooter, _, _) = read_footer(&pfile).map_err(|e| e.with_path(parent))?;
        let pmtime = pfile
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(format!("cannot stat {}", parent.display()), e))?;
        drop(pfile);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(child)
            .map_err(|e| Error::io(format!("cannot open {} for writing", child.display()), e))?;
        let file = Arc::new(file);
        let vhd = Vhd::from_backing(file.clone() as Arc<dyn ReadAt>, None, Some(child.into()))
            .map_err(|e| e.with_path(child))?;
        let Some(sp) = vhd
            .sparse
            .as_ref()
            .filter(|_| vhd.kind == DiskType::Differencing)
        else {
            return Err(Error::InvalidArgument(format!(
                "{} is not a differencing disk, so it has no parent to change",
                child.display()
            )));
        };
        let psize = Vhd::open_backing(Arc::new(
            File::open(parent)
                .map_err(|e| Error::io(format!("cannot open {}", parent.display()), e))?,
        ))
        .map_err(|e| e.with_path(parent))?
        .virtual_size;
        if psize != vhd.virtual_size {
            return Err(Error::Parent(format!(
                "{} ({psize} bytes) cannot become the parent of {} ({} bytes): a differencing \
                 chain needs one size",
                parent.display(),
                child.display(),
                vhd.virtual_size
            )));
        }
        let (parent_abs, child_dir) = resolve_link_paths(parent, child)?;
        let rel = parent::relative_windows_path(&child_dir, &parent_abs);
        let abs = parent_abs.to_string_lossy().replace('/', "\\");
        let mut header = sp.header.clone();
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for (code, path) in [(PLATFORM_W2RU, rel), (PLATFORM_W2KU, abs)] {
            let Some(l) = header.locators.iter_mut().find(|l| l.platform_code == code) else {
                return Err(Error::unsupported(
                    FORMAT,
                    format!(
                        "{} has no {} locator to rewrite; its parent cannot be changed here",
                        child.display(),
                        tag_string(&code)
                    ),
                ));
            };
            let bytes = utf16le(&path);
            let space = l.space_bytes();
            if bytes.len() as u64 > space {
                return Err(Error::InvalidArgument(format!(
                    "the path {path} needs {} bytes in the {} locator of {}, which has room for \
                     {space}; nothing was changed",
                    bytes.len(),
                    tag_string(&code),
                    child.display()
                )));
            }
            l.data_length = bytes.len() as u32;
            let mut padded = bytes;
            padded.resize(space as usize, 0);
            writes.push((l.data_offset, padded));
        }
        // Deprecated locators would still name the old parent; nothing reads them first, but a
        // stale path is worse than none.
        for l in header.locators.iter_mut() {
            if l.platform_code == PLATFORM_WI2R || l.platform_code == PLATFORM_WI2K {
                *l = Locator::default();
            }
        }
        let name = parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut units: Vec<u16> = name.encode_utf16().collect();
        units.truncate(255);
        let mut raw_name: Vec<u8> = units.iter().flat_map(|u| u.to_be_bytes()).collect();
        raw_name.resize(512, 0);
        header.parent_name = raw_name;
        header.parent_unique_id = pfooter.unique_id;
        header.parent_timestamp = vhd_timestamp(pmtime);
        let header_offset = sp.header_offset;
        drop(vhd);
        let werr = |e| {
            Error::io(
                format!("cannot write the parent locator of {}", child.display()),
                e,
            )
        };
        for (off, data) in &writes {
            file.write_all_at(data, *off).map_err(werr)?;
        }
        file.sync().map_err(werr)?;
        file.write_all_at(&header.to_bytes(), header_offset)
            .map_err(werr)?;
        file.sync().map_err(werr)?;
        Ok(())
    }
}

fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::InvalidArgument(format!(
            "VHD block size {bs} must be a power of two from 512 bytes to 256 MiB (default 2 MiB)"
        )));
    }
    Ok(())
}

fn create_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))
}

fn new_footer(kind: DiskType, size: u64) -> Footer {
    let (c, h, s) = chs_for(size / SECTOR);
    Footer {
        features: FEATURES_RESERVED,
        version: VERSION_1_0,
        data_offset: if kind == DiskType::Fixed {
            u64::MAX
        } else {
            SECTOR
        },
        timestamp: vhd_timestamp(std::time::SystemTime::now()),
        creator_app: CREATOR_APP,
        creator_version: CREATOR_VERSION,
        creator_os: CREATOR_OS,
        original_size: size,
        current_size: size,
        cylinders: c,
        heads: h,
        sectors_per_track: s,
        disk_type: kind.to_u32(),
        checksum: 0,
        unique_id: Guid::new_random(),
        saved_state: 0,
    }
}

/// Lay out a new dynamic or differencing disk: footer copy, header, an empty block table,
/// parent locator data, and the footer.
fn write_sparse_layout(
    file: &File,
    footer: &Footer,
    block_size: u32,
    parent_id: Guid,
    parent_time: u32,
    parent_name: &str,
    locators: &[([u8; 4], String)],
) -> std::io::Result<()> {
    let entries = footer.current_size.div_ceil(block_size as u64);
    let table_offset = SECTOR + DYN_HEADER_SIZE as u64;
    let table_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut pos = table_offset + table_len;
    let mut locs: [Locator; 8] = Default::default();
    let mut loc_data = Vec::new();
    for (i, (code, path)) in locators.iter().enumerate().take(8) {
        let bytes = utf16le(path);
        let space = (bytes.len() as u64).div_ceil(SECTOR).max(1);
        locs[i] = Locator {
            platform_code: *code,
            data_space: space as u32,
            data_length: bytes.len() as u32,
            data_offset: pos,
        };
        loc_data.push((pos, bytes));
        pos += space * SECTOR;
    }
    // The parent name field holds 256 UTF-16 units; a longer name is cut (locators carry paths).
    let mut name: Vec<u16> = parent_name.encode_utf16().collect();
    name.truncate(255);
    let header = DynHeader {
        data_offset: u64::MAX,
        table_offset,
        header_version: VERSION_1_0,
        max_table_entries: entries as u32,
        block_size,
        checksum: 0,
        parent_unique_id: parent_id,
        parent_timestamp: parent_time,
        parent_name: name.iter().flat_map(|u| u.to_be_bytes()).collect(),
        locators: locs,
    };
    let fb = footer.to_bytes();
    file.write_all_at(&fb, 0)?;
    file.write_all_at(&header.to_bytes(), SECTOR)?;
    let ff = vec![0xFFu8; (1 << 20).min(table_len) as usize];
    let mut p = table_offset;
    while p < table_offset + table_len {
        let n = (table_offset + table_len - p).min(ff.len() as u64) as usize;
        file.write_all_at(&ff[..n], p)?;
        p += n as u64;
    }
    for (at, bytes) in loc_data {
        file.write_all_at(&bytes, at)?;
    }
    file.set_len(pos)?;
    file.write_all_at(&fb, pos)?;
    Ok(())
}

impl VirtualDisk for Vhd {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.virtual_size,
            logical_sector_size: SECTOR as u32,
            physical_sector_size: SECTOR as u32,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.virtual_size)?;
        for (off, len, src) in self.plan(offset, buf.len() as u64)? {
            let s = (off - offset) as usize;
            let out = &mut buf[s..s + len as usize];
            match src {
                Src::File(at) => self
                    .backing
                    .read_exact_at(out, at)
                    .map_err(|e| io_err("read error", &self.path, e))?,
                Src::Parent => self.read_parent(out, off)?,
                Src::Unallocated => out.fill(0),
            }
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64, scope: MapScope) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.virtual_size);
        let mut out = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        for (off, len, src) in self.plan(offset, end - offset)? {
            match (src, scope) {
                (Src::File(_), _) => push_extent(&mut out, off, len, ExtentState::Data),
                (Src::Unallocated, _) => push_extent(&mut out, off, len, ExtentState::Unallocated),
                (Src::Parent, MapScope::Layer) => {
                    push_extent(&mut out, off, len, ExtentState::Inherited)
                }
                (Src::Parent, MapScope::View) => self.parent_map(off, len, &mut out)?,
            }
        }
        Ok(out)
    }

    fn info(&self) -> DiskInfo {
        let f = &self.footer;
        let file_size = self.backing.size().unwrap_or(0);
        let allocated = match &self.sparse {
            None => self.virtual_size,
            Some(sp) => self.allocated_bytes(sp),
        };
        let mut details = vec![
            ("creator app".to_string(), tag_string(&f.creator_app)),
            (
                "creator version".into(),
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
            ),
            ("creator host os".into(), tag_string(&f.creator_os)),
            ("current size".into(), f.current_size.to_string()),
            ("original size".into(), f.original_size.to_string()),
            (
                "chs geometry".into(),
                format!("{}/{}/{}", f.cylinders, f.heads, f.sectors_per_track),
            ),
            ("size taken from".into(), self.size_source.into()),
            ("saved state".into(), (f.saved_state != 0).to_string()),
        ];
        if let Some(sp) = &self.sparse {
            details.push(("block table entries".into(), sp.bat.len().to_string()));
        }
        if self.kind == DiskType::Differencing {
            if let Some(id) = self.parent_unique_id() {
                details.push(("parent unique id".into(), id.to_string()));
            }
            if let Some(n) = self.parent_name() {
                details.push(("parent name".into(), n));
            }
            for (code, p) in self.parent_locators() {
                details.push((format!("parent locator {}", tag_string(&code)), p));
            }
        }
        for n in &self.notes {
            details.push(("warning".into(), n.clone()));
        }
        DiskInfo {
            path: self.path.clone(),
            format: DiskFormat::Vhd,
            subformat: match self.kind {
                DiskType::Fixed => Subformat::Fixed,
                DiskType::Dynamic => Subformat::Dynamic,
                DiskType::Differencing => Subformat::Differencing,
            },
            virtual_size: self.virtual_size,
            block_size: self.block_size(),
            logical_sector_size: SECTOR as u32,
            physical_sector_size: SECTOR as u32,
            file_size,
            allocated_bytes: allocated,
            identifier: Some(f.unique_id.to_string()),
            details,
            parent: self.parent.as_ref().map(|p| Box::new(p.info())),
        }
    }
}

impl VirtualDiskMut for Vhd {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.writer()?;
        check_range(offset, buf.len() as u64, self.virtual_size)?;
        let Some(block_size) = self.sparse.as_ref().map(|s| s.block_size) else {
            let w = self.writer()?.clone();
            return self.wio("cannot write data", w.write_all_at(buf, offset));
        };
        if self.footer_damaged {
            // Put a good footer back at the end before changing anything else.
            let w = self.writer()?.clone();
            let at = self.alloc_pos;
            self.wio(
                "cannot repair the footer",
                w.write_all_at(&self.footer.to_bytes(), at),
            )?;
            self.wio(
                "cannot repair the footer",
                w.set_size(at + FOOTER_SIZE as u64),
            )?;
            self.footer_damaged = false;
        }
        if self.head_copy_stale {
            let w = self.writer()?.clone();
            self.wio(
                "cannot repair the footer copy",
                w.write_all_at(&self.footer.to_bytes(), 0),
            )?;
            self.head_copy_stale = false;
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / block_size;
            let in_off = pos % block_size;
            let n = (block_size - in_off).min(end - pos);
            let s = (pos - offset) as usize;
            self.write_block_piece(b, in_off, &buf[s..s + n as usize])?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let w = self.writer()?.clone();
        self.wio("cannot flush", w.sync())
    }
}

/// The parent's absolute path and the child's directory, both canonical: what the parent
/// locators (relative and absolute) of a child at `child` pointing to `parent` are computed from.
fn resolve_link_paths(
    parent: &Path,
    child: &Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let parent_abs = std::fs::canonicalize(parent)
        .map_err(|e| Error::io(format!("cannot resolve {}", parent.display()), e))?;
    let child_dir = child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = std::fs::canonicalize(child_dir)
        .map_err(|e| Error::io(format!("cannot resolve {}", child_dir.display()), e))?;
    Ok((parent_abs, child_dir))
}
