//! Writing into VHDX files, following MS-VHDX's write rules.
//!
//! Ours because no Rust crate writes VHDX, and qemu (the one other open writer) cannot write
//! differencing disks.
//!
//! - Headers first: the first modification of a session updates both header slots (new
//!   FileWriteGuid and DataWriteGuid), flushed, before anything else changes.
//! - Payload never goes through the log; metadata (BAT and sector-bitmap pages) always does.
//! - New blocks go at the 1 MiB-aligned end of the file.
//! - Metadata changes are batched: changed 4 KiB pages wait in a [`PendingPages`] overlay (which
//!   the reader reads through, so reads see them at once) and are committed through the log at
//!   `flush()` or when many are waiting. A bulk conversion therefore costs a handful of log
//!   entries, not one per block. Payload is made durable (fsync) before the log entry that points
//!   to it, so a crash can lose unflushed data but never leaves metadata pointing at garbage.
//!
//! [`WriteState`] holds everything a writable layer needs besides the BAT, which stays where the
//! reader keeps it and is passed in, so reads and writes share one table.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vdisk_core::disk::check_range;
use vdisk_core::{Error, Guid, ReadAt, Result, VirtualDisk, VirtualDiskMut, WriteAt};

use crate::Vhdx;

use crate::format::{select_header, BatGeometry, Header, HEADER_OFFSETS, HEADER_SIZE, MIB};
use crate::log::{replay_on_disk, LogWriter, SECTOR};

const PAGE: u64 = SECTOR as u64;
/// Commit metadata through the log once this many pages are waiting (16 MiB of pages), to bound
/// memory; a 32 MiB-block BAT page covers 16 GiB of disk, so bulk copies rarely get here.
const MAX_PENDING_PAGES: usize = 4096;
const STATE_MASK: u64 = 7;
const PAYLOAD_BLOCK_NOT_PRESENT: u64 = crate::format::PAYLOAD_NOT_PRESENT as u64;
const PAYLOAD_BLOCK_ZERO: u64 = crate::format::PAYLOAD_ZERO as u64;
const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = crate::format::PAYLOAD_FULLY_PRESENT as u64;
const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = crate::format::PAYLOAD_PARTIALLY_PRESENT as u64;
const SB_BLOCK_PRESENT: u64 = crate::format::SB_PRESENT as u64;
const OFFSET_MASK: u64 = !((1u64 << 20) - 1);

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// The file as readers must see it while a writable layer is open: the file itself, plus the
/// metadata pages changed in memory but not yet committed through the log.
pub(crate) struct PendingPages {
    file: Arc<File>,
    pages: RwLock<BTreeMap<u64, Box<[u8; SECTOR]>>>,
}

impl PendingPages {
    fn len(&self) -> usize {
        self.pages.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Change bytes of the page at `page_offset`, loading it from the file the first time.
    fn modify(&self, page_offset: u64, f: impl FnOnce(&mut [u8; SECTOR])) -> io::Result<()> {
        let mut pages = self.pages.write().unwrap_or_else(|e| e.into_inner());
        let page = match pages.entry(page_offset) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let mut p = Box::new([0u8; SECTOR]);
                let size = self.file.size()?;
                // A page past the end of the file (a new bitmap block) reads as zeros.
                if page_offset < size {
                    let n = (size - page_offset).min(PAGE) as usize;
                    self.file.read_exact_at(&mut p[..n], page_offset)?;
                }
                v.insert(p)
            }
        };
        f(page);
        Ok(())
    }

    fn snapshot(&self) -> Vec<(u64, Box<[u8; SECTOR]>)> {
        self.pages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Forget pages once they are in the file, unless they changed again meanwhile.
    fn forget(&self, applied: &[(u64, Box<[u8; SECTOR]>)]) {
        let mut pages = self.pages.write().unwrap_or_else(|e| e.into_inner());
        for (off, content) in applied {
            if pages.get(off) == Some(content) {
                pages.remove(off);
            }
        }
    }
}

impl ReadAt for PendingPages {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let first = offset - offset % PAGE;
        let mut touched = pages.range(first..end).peekable();
        if touched.peek().is_none() {
            return self.file.read_exact_at(buf, offset);
        }
        // A pending page may lie past the end of the file (new bitmap block not yet extended).
        let size = self.file.size()?;
        let real = end.min(size).max(offset);
        if real > offset {
            self.file
                .read_exact_at(&mut buf[..(real - offset) as usize], offset)?;
        }
        buf[(real - offset) as usize..].fill(0);
        for (&p, page) in touched {
            let s = p.max(offset);
            let e = (p + PAGE).min(end);
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&page[(s - p) as usize..(e - p) as usize]);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
}

/// The facts about a layer the writer needs, from its parsed metadata.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub(crate) virtual_size: u64,
    pub(crate) block_size: u32,
    pub(crate) logical_sector_size: u32,
    pub(crate) has_parent: bool,
    /// LeaveBlockAllocated (fixed disks): never move a block to a non-present state.
    pub(crate) leave_allocated: bool,
    pub(crate) bat_offset: u64,
    /// Entries of the BAT as the reader holds it; indexes past it are corrupt.
    pub(crate) bat_entries: u64,
}

/// Everything a writable layer needs besides the BAT.
pub(crate) struct WriteState {
    path: PathBuf,
    file: Arc<File>,
    pending: Arc<PendingPages>,
    header: Header,
    /// Slot (0 at 64 KiB, 1 at 128 KiB) holding `header`, the current one.
    header_slot: usize,
    /// FileWriteGuid already renewed in this session (the first header update does it).
    file_guid_renewed: bool,
    /// DataWriteGuid already renewed in this session (before the first guest-visible change).
    data_guid_renewed: bool,
    /// The DataWriteGuid the first guest-visible change sets, instead of a random one. A merge
    /// announces it to the child first (`parent_linkage2`), so the child keeps its parent
    /// while the parent is rewritten.
    next_data_write_guid: Option<Guid>,
    log: LogWriter,
    /// The header's LogGuid is set: the log may hold entries to replay.
    log_active: bool,
    layout: Option<Layout>,
    geo: Option<BatGeometry>,
    /// Where the next block is allocated (the 1 MiB-aligned end of the file).
    next_free: u64,
    /// The file's length.
    file_len: u64,
    crash_after_log_write: bool,
    /// The simulated crash happened: the object must not touch the file again.
    crashed: bool,
}

/// Read both header slots and return the current one and its slot.
fn current_header(file: &File, path: &Path) -> Result<(Header, usize)> {
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    for (buf, off) in raw.iter_mut().zip(HEADER_OFFSETS) {
        // A short file leaves that slot zeroed, which select_header reports as invalid.
        let _ = file.read_exact_at(buf, off);
    }
    let choice = select_header([&raw[0], &raw[1]]).map_err(|e| e.with_path(path))?;
    Ok((choice.header, choice.slot))
}

/// Take the exclusive lock, waiting briefly if it is held. A lock is owned by the open file
/// description, and a process that forks (any thread of ours starting a program) holds a copy of
/// every descriptor until its `exec` closes it: a file we closed a moment ago can still look
/// locked for a few milliseconds. A real second writer holds it far longer than we wait.
fn lock_for_writing(file: &File) -> std::result::Result<(), std::fs::TryLockError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Open a layer for writing: renew the headers and replay a pending log on disk, then hand back
/// the view to parse the rest of the file from, and the writer's state. The reader calls this
/// before parsing regions, metadata and BAT.
/// Returns (view, state, replayed a log).
pub(crate) fn open_writable(
    file: File,
    path: &Path,
) -> Result<(Arc<dyn ReadAt>, WriteState, bool)> {
    // Two writers on one file would allocate the same blocks and interleave log entries; the
    // lock (advisory on Unix, enforced on Windows) makes a second writable open fail instead.
    // It is released when the file is closed.
    lock_for_writing(&file).map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => Error::InvalidArgument(format!(
            "{} is already open for writing by another program or handle; close it first",
            path.display()
        )),
        std::fs::TryLockError::Error(e) => {
            Error::io(format!("cannot lock {} for writing", path.display()), e)
        }
    })?;
    let (header, slot) = current_header(&file, path)?;
    let (log_guid, log_offset, log_length) =
        (header.log_guid, header.log_offset, header.log_length);
    let file = Arc::new(file);
    let size = file
        .size()
        .map_err(io_err(format!("cannot get the size of {}", path.display())))?;
    let mut st = WriteState {
        path: path.to_path_buf(),
        file: file.clone(),
        pending: Arc::new(PendingPages {
            file,
            pages: RwLock::new(BTreeMap::new()),
        }),
        header: header.clone(),
        header_slot: slot,
        file_guid_renewed: false,
        data_guid_renewed: false,
        next_data_write_guid: None,
        log: LogWriter::new(header.log_offset, header.log_length),
        log_active: false,
        layout: None,
        geo: None,
        next_free: size.div_ceil(MIB) * MIB,
        file_len: size,
        crash_after_log_write: false,
        crashed: false,
    };
    let replayed = !log_guid.is_zero();
    if replayed {
        // Headers before anything else (a new FileWriteGuid), then replay, then say the log is
        // empty. The DataWriteGuid stays: replay restores what the data already was, and
        // children must keep matching this file.
        st.update_headers(|_| {})?;
        replay_on_disk(&*st.file, log_guid, log_offset, log_length)
            .map_err(|e| e.with_path(path))?;
        st.update_headers(|h| h.log_guid = Guid::ZERO)?;
        let size = st
            .file
            .size()
            .map_err(io_err(format!("cannot get the size of {}", path.display())))?;
        st.next_free = size.div_ceil(MIB) * MIB;
        st.file_len = size;
    }
    let view: Arc<dyn ReadAt> = st.pending.clone();
    Ok((view, st, replayed))
}

impl WriteState {
    /// Give the writer the layer's parsed metadata; required before the first write.
    pub(crate) fn configure(&mut self, layout: Layout) {
        self.geo = Some(BatGeometry::from_params(
            layout.block_size,
            layout.logical_sector_size,
            layout.virtual_size,
            layout.has_parent,
        ));
        self.layout = Some(layout);
    }

    /// The file's length now (it grows as blocks are allocated).
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The current header (its DataWriteGuid is the layer's identity).
    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// Choose the DataWriteGuid the first guest-visible change of this session sets.
    pub(crate) fn set_next_data_write_guid(&mut self, g: Guid) {
        self.next_data_write_guid = Some(g);
    }

    /// Replace a 4 KiB metadata page (page-aligned `offset`); it is committed through the log
    /// with the other pending pages at the next flush, so the change is atomic.
    pub(crate) fn stage_page(&mut self, offset: u64, content: &[u8]) -> Result<()> {
        self.check_alive()?;
        if !offset.is_multiple_of(PAGE) || content.len() as u64 != PAGE {
            return Err(Error::InvalidArgument(format!(
                "internal: metadata page write of {} bytes at {offset} is not one aligned page",
                content.len()
            )));
        }
        self.pending
            .modify(offset, |p| p.copy_from_slice(content))
            .map_err(io_err(self.ctx("update the metadata of")))
    }

    /// Test hook: make the next log commit stop after the log entry is written and flushed and
    /// before its pages are applied, as if the machine crashed there.
    pub(crate) fn set_crash_after_log_write(&mut self, on: bool) {
        self.crash_after_log_write = on;
    }

    fn ctx(&self, what: &str) -> String {
        format!("cannot {what} {}", self.path.display())
    }

    fn check_alive(&self) -> Result<()> {
        if self.crashed {
            return Err(Error::InvalidArgument(format!(
                "{} was left with a pending log by the crash test hook; reopen it",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// MS-VHDX 2.2.2.1: write the non-current slot with sequence+1 and flush, then the other one,
    /// so both hold the new header. The first update of a session gets a new FileWriteGuid.
    fn update_headers(&mut self, change: impl Fn(&mut Header)) -> Result<()> {
        let fresh_file_guid = (!self.file_guid_renewed).then(Guid::new_random);
        for _ in 0..2 {
            let mut h = self.header.clone();
            change(&mut h);
            h.sequence_number = self.header.sequence_number.wrapping_add(1);
            if let Some(g) = fresh_file_guid {
                h.file_write_guid = g;
            }
            let slot = 1 - self.header_slot;
            self.file
                .write_all_at(&h.to_bytes(), HEADER_OFFSETS[slot])
                .map_err(io_err(self.ctx("write the header of")))?;
            self.file
                .sync()
                .map_err(io_err(self.ctx("flush the header of")))?;
            self.header = h;
            self.header_slot = slot;
            self.file_guid_renewed = true;
        }
        Ok(())
    }

    /// Before the first change a reader could see: new FileWriteGuid and DataWriteGuid.
    fn before_first_change(&mut self) -> Result<()> {
        self.check_alive()?;
        if !self.data_guid_renewed {
            let dw = self.next_data_write_guid.unwrap_or_else(Guid::new_random);
            self.update_headers(|h| h.data_write_guid = dw)?;
            self.data_guid_renewed = true;
        }
        Ok(())
    }

    fn layout(&self) -> Result<(Layout, BatGeometry)> {
        match (self.layout, self.geo) {
            (Some(l), Some(g)) if g.total_entries <= l.bat_entries => Ok((l, g)),
            _ => Err(Error::InvalidArgument(format!(
                "{} is not ready for writing (internal: writer not configured, or the BAT is shorter than the disk needs)",
                self.path.display()
            ))),
        }
    }

    fn set_bat(&self, bat: &mut [u64], layout: &Layout, index: u64, value: u64) -> Result<()> {
        let slot = bat.get_mut(index as usize).ok_or_else(|| {
            Error::corrupt(
                "vhdx",
                format!("BAT entry {index} is past the end of the BAT region"),
            )
            .with_path(&self.path)
        })?;
        *slot = value;
        let at = layout.bat_offset + index * 8;
        let page = at - at % PAGE;
        let within = (at - page) as usize;
        self.pending
            .modify(page, |p| {
                p[within..within + 8].copy_from_slice(&value.to_le_bytes())
            })
            .map_err(io_err(self.ctx("update the BAT of")))
    }

    /// Reserve `len` bytes (a multiple of 1 MiB) at the end of the file; they read as zeros.
    fn allocate(&mut self, len: u64) -> Result<u64> {
        let off = self.next_free;
        self.next_free += len;
        self.file
            .set_size(self.next_free)
            .map_err(io_err(self.ctx("grow")))?;
        self.file_len = self.next_free;
        Ok(off)
    }

    fn write_payload(&self, buf: &[u8], file_offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, file_offset)
            .map_err(io_err(self.ctx("write data into")))
    }

    /// Mark sectors `[first, first + count)` of chunk `chunk` present in its sector bitmap,
    /// allocating the bitmap block if the chunk has none yet.
    fn set_bitmap_bits(
        &mut self,
        bat: &mut [u64],
        layout: &Layout,
        geo: &BatGeometry,
        chunk: u64,
        first: u64,
        count: u64,
    ) -> Result<()> {
        let idx = geo.bitmap_index(chunk) as u64;
        let entry = *bat.get(idx as usize).ok_or_else(|| {
            Error::corrupt(
                "vhdx",
                format!("sector bitmap entry {idx} is past the end of the BAT region"),
            )
            .with_path(&self.path)
        })?;
        let sb = if entry & STATE_MASK == SB_BLOCK_PRESENT && entry & OFFSET_MASK != 0 {
            entry & OFFSET_MASK
        } else {
            let off = self.allocate(MIB)?;
            self.set_bat(bat, layout, idx, off | SB_BLOCK_PRESENT)?;
            off
        };
        let mut bit = first;
        let end = first + count;
        while bit < end {
            let page_index = bit / (PAGE * 8);
            let page_end_bit = ((page_index + 1) * PAGE * 8).min(end);
            let (from, to) = (
                bit - page_index * PAGE * 8,
                page_end_bit - page_index * PAGE * 8,
            );
            self.pending
                .modify(sb + page_index * PAGE, |p| {
                    for b in from..to {
                        p[(b / 8) as usize] |= 1 << (b % 8);
                    }
                })
                .map_err(io_err(self.ctx("update a sector bitmap of")))?;
            bit = page_end_bit;
        }
        Ok(())
    }

    /// Write sector-aligned data (offset and length multiples of the logical sector size).
    pub(crate) fn write_sectors(&mut self, bat: &mut [u64], buf: &[u8], offset: u64) -> Result<()> {
        let (layout, geo) = self.layout()?;
        let lss = u64::from(layout.logical_sector_size);
        let len = buf.len() as u64;
        if !offset.is_multiple_of(lss) || !len.is_multiple_of(lss) {
            return Err(Error::InvalidArgument(format!(
                "internal: unaligned sector write of {len} bytes at {offset}"
            )));
        }
        vdisk_core::disk::check_range(offset, len, layout.virtual_size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.before_first_change()?;
        let bs = u64::from(geo.block_size);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let data = &buf[(pos - offset) as usize..(pos - offset + n) as usize];
            let covers_block = in_block == 0 && (n == bs || pos + n == layout.virtual_size);
            let idx = geo.payload_index(block) as u64;
            let entry = *bat.get(idx as usize).ok_or_else(|| {
                Error::corrupt(
                    "vhdx",
                    format!("BAT entry {idx} is past the end of the BAT region"),
                )
                .with_path(&self.path)
            })?;
            let state = entry & STATE_MASK;
            let block_off = entry & OFFSET_MASK;
            match state {
                PAYLOAD_BLOCK_FULLY_PRESENT if block_off != 0 => {
                    self.write_payload(data, block_off + in_block)?;
                }
                PAYLOAD_BLOCK_PARTIALLY_PRESENT if block_off != 0 && layout.has_parent => {
                    self.write_payload(data, block_off + in_block)?;
                    if covers_block {
                        self.set_bat(bat, &layout, idx, block_off | PAYLOAD_BLOCK_FULLY_PRESENT)?;
                    } else {
                        self.mark_present(bat, &layout, &geo, pos, n)?;
                    }
                }
                _ => {
                    // Not allocated here. In a base disk every such state reads as zeros; in a
                    // differencing disk NOT_PRESENT shows the parent and the rest read zeros.
                    let shows_parent = layout.has_parent && state == PAYLOAD_BLOCK_NOT_PRESENT;
                    if !layout.leave_allocated && vdisk_core::io::is_zero(data) {
                        if !shows_parent {
                            pos += n;
                            continue; // already reads as zeros: nothing to store
                        }
                        if covers_block {
                            self.hide_parent_block(bat, &layout, idx)?;
                            pos += n;
                            continue;
                        }
                    }
                    let off = self.allocate(bs)?;
                    self.write_payload(data, off + in_block)?;
                    if shows_parent && !covers_block {
                        // Only the written sectors are ours; the rest still comes from the parent.
                        self.mark_present(bat, &layout, &geo, pos, n)?;
                        self.set_bat(bat, &layout, idx, off | PAYLOAD_BLOCK_PARTIALLY_PRESENT)?;
                    } else {
                        self.set_bat(bat, &layout, idx, off | PAYLOAD_BLOCK_FULLY_PRESENT)?;
                    }
                }
            }
            pos += n;
        }
        if self.pending.len() > MAX_PENDING_PAGES {
            self.commit()?;
        }
        Ok(())
    }

    /// Make a whole block of a differencing disk read as zeros, hiding the parent. MS-VHDX's
    /// ZERO state means exactly that, but libvhdi (and so tools built on it) shows the parent
    /// through ZERO blocks of a differencing disk; a FULLY_PRESENT block that is a hole at the end
    /// of the (sparse) file reads as zeros in every implementation and costs no disk space.
    fn hide_parent_block(&mut self, bat: &mut [u64], layout: &Layout, idx: u64) -> Result<()> {
        let off = self.allocate(u64::from(layout.block_size))?;
        self.set_bat(bat, layout, idx, off | PAYLOAD_BLOCK_FULLY_PRESENT)
    }

    fn mark_present(
        &mut self,
        bat: &mut [u64],
        layout: &Layout,
        geo: &BatGeometry,
        pos: u64,
        n: u64,
    ) -> Result<()> {
        let lss = u64::from(layout.logical_sector_size);
        let chunk_bytes = geo.chunk_ratio * u64::from(geo.block_size);
        let chunk = pos / chunk_bytes;
        let first = (pos % chunk_bytes) / lss;
        self.set_bitmap_bits(bat, layout, geo, chunk, first, n / lss)
    }

    /// Make the whole blocks of `[offset, offset + len)` read as zeros without storing anything:
    /// they become ZERO (or stay unallocated in a base disk). Returns the ranges that must still
    /// be written as zeros by the caller: partial blocks at the edges, or everything in a fixed
    /// disk (whose blocks must stay allocated).
    pub(crate) fn zero_whole_blocks(
        &mut self,
        bat: &mut [u64],
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let (layout, geo) = self.layout()?;
        vdisk_core::disk::check_range(offset, len, layout.virtual_size)?;
        let mut rest: Vec<(u64, u64)> = Vec::new();
        let bs = u64::from(geo.block_size);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let covers_block = in_block == 0 && (n == bs || pos + n == layout.virtual_size);
            if !covers_block || layout.leave_allocated {
                match rest.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += n,
                    _ => rest.push((pos, n)),
                }
            } else {
                let idx = geo.payload_index(block) as u64;
                let entry = *bat.get(idx as usize).ok_or_else(|| {
                    Error::corrupt(
                        "vhdx",
                        format!("BAT entry {idx} is past the end of the BAT region"),
                    )
                    .with_path(&self.path)
                })?;
                let state = entry & STATE_MASK;
                if layout.has_parent {
                    match state {
                        // Zeros in place: no space leaked, every reader agrees.
                        PAYLOAD_BLOCK_FULLY_PRESENT => match rest.last_mut() {
                            Some(last) if last.0 + last.1 == pos => last.1 += n,
                            _ => rest.push((pos, n)),
                        },
                        PAYLOAD_BLOCK_NOT_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                            self.before_first_change()?;
                            self.hide_parent_block(bat, &layout, idx)?;
                        }
                        _ => {} // ZERO, UNMAPPED, UNDEFINED: already zeros here
                    }
                } else if state != PAYLOAD_BLOCK_ZERO && state != PAYLOAD_BLOCK_NOT_PRESENT {
                    self.before_first_change()?;
                    self.set_bat(bat, &layout, idx, PAYLOAD_BLOCK_ZERO)?;
                }
            }
            pos += n;
        }
        if self.pending.len() > MAX_PENDING_PAGES {
            self.commit()?;
        }
        Ok(rest)
    }

    /// Commit every pending metadata page through the log: payload flushed first, then log
    /// entries (flushed), then the pages in place (flushed).
    fn commit(&mut self) -> Result<()> {
        self.check_alive()?;
        let pages = self.pending.snapshot();
        if pages.is_empty() {
            return Ok(());
        }
        // The data the new BAT entries point to must be stable before the entries are.
        self.file.sync().map_err(io_err(self.ctx("flush")))?;
        let size = self.file.size().map_err(io_err(self.ctx("stat")))?;
        let flushed = size - size % MIB;
        let last = size.div_ceil(MIB) * MIB;
        let per_entry = self.log.max_pages_per_entry().max(1);
        for group in pages.chunks(per_entry) {
            let log_guid = if self.log_active {
                self.header.log_guid
            } else {
                Guid::new_random()
            };
            let refs: Vec<(u64, &[u8; SECTOR])> = group.iter().map(|(o, p)| (*o, &**p)).collect();
            self.log
                .write_entry(&*self.file, log_guid, &refs, flushed, last)
                .map_err(|e| e.with_path(&self.path))?;
            if !self.log_active {
                // The entry is written (and flushed) before the header names its LogGuid: until
                // then the log is ignored, so a crash in between leaves a clean file instead of a
                // header pointing at a log with no valid entry, which would be unopenable.
                self.update_headers(|h| h.log_guid = log_guid)?;
                self.log_active = true;
            }
            if self.crash_after_log_write {
                self.crashed = true;
                return Err(Error::io(
                    self.ctx("finish the metadata update of"),
                    io::Error::other("simulated crash after the log write (test hook)"),
                ));
            }
            for (off, page) in group {
                self.file
                    .write_all_at(&page[..], *off)
                    .map_err(io_err(self.ctx("write metadata into")))?;
            }
            self.file.sync().map_err(io_err(self.ctx("flush")))?;
            self.pending.forget(group);
        }
        Ok(())
    }

    /// Commit pending metadata and mark the log empty again, so that other tools (which may not
    /// replay logs, or only on a writable open) read a clean file.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.commit()?;
        if self.log_active {
            self.update_headers(|h| h.log_guid = Guid::ZERO)?;
            self.log_active = false;
        }
        self.file.sync().map_err(io_err(self.ctx("flush")))
    }
}

impl Drop for WriteState {
    /// Closing without flush still leaves a consistent file: commit what is pending. Errors
    /// cannot be reported from here; the log keeps the file valid whatever happens.
    fn drop(&mut self) {
        if !self.crashed {
            let _ = self.flush();
        }
    }
}

impl Vhdx {
    /// The writer of the top layer, or the error for a read-only open.
    fn writer_parts(&mut self) -> Result<(&mut WriteState, &mut Vec<u64>)> {
        if self.top.writer.is_none() {
            return Err(Error::ReadOnly(format!(
                "{} is open read-only; open it with writable = true to write",
                self.top.display_name()
            )));
        }
        let top = &mut self.top;
        match top.writer.as_mut() {
            Some(w) => Ok((w, &mut top.bat)),
            None => Err(Error::ReadOnly("open read-only".into())),
        }
    }

    /// After the writer changed the file: the reader's cached size and header follow.
    fn sync_reader_state(&mut self) {
        let top = &mut self.top;
        if let Some(w) = top.writer.as_ref() {
            top.file_size = w.file_len();
            top.header = w.header().clone();
        }
    }

    /// Test hook: the next metadata commit stops after its log entry is written and flushed,
    /// before the pages are applied (as if the machine crashed there); `flush` then fails and
    /// the object refuses further writes. The file is left with a pending log.
    #[doc(hidden)]
    pub fn set_crash_after_log_write(&mut self, on: bool) -> Result<()> {
        self.writer_parts()?.0.set_crash_after_log_write(on);
        Ok(())
    }
}

impl VirtualDiskMut for Vhdx {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.top.virtual_size())?;
        self.writer_parts()?;
        let lss = u64::from(self.top.geo.logical_sector_size);
        // Partial sectors are completed from the current view (parent included).
        let (aligned, at) = align_to_sectors(buf, offset, lss, |b, o| self.read_at(b, o))?;
        let (w, bat) = self.writer_parts()?;
        let r = w.write_sectors(bat, &aligned, at);
        self.sync_reader_state();
        r
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.top.virtual_size())?;
        let (w, bat) = self.writer_parts()?;
        let rest = w.zero_whole_blocks(bat, offset, length);
        self.sync_reader_state();
        const CHUNK: u64 = 1 << 20;
        let zero = vec![0u8; CHUNK as usize];
        for (mut pos, n) in rest? {
            let end = pos + n;
            while pos < end {
                let k = CHUNK.min(end - pos);
                self.write_at(&zero[..k as usize], pos)?;
                pos += k;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let (w, _) = self.writer_parts()?;
        let r = w.flush();
        self.sync_reader_state();
        r
    }
}

/// Widen a write to whole logical sectors, reading the sectors it only partly covers through
/// `read` (the layer's guest view, parent included), so a sub-sector write in a differencing disk
/// keeps the parent's bytes around it.
pub(crate) fn align_to_sectors<'a>(
    buf: &'a [u8],
    offset: u64,
    sector: u64,
    read: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<(std::borrow::Cow<'a, [u8]>, u64)> {
    let len = buf.len() as u64;
    if offset.is_multiple_of(sector) && len.is_multiple_of(sector) {
        return Ok((std::borrow::Cow::Borrowed(buf), offset));
    }
    let start = offset - offset % sector;
    let end = (offset + len).div_ceil(sector) * sector;
    let mut out = vec![0u8; (end - start) as usize];
    read(&mut out[..sector as usize], start)?;
    let last = end - sector;
    if last != start {
        read(&mut out[(last - start) as usize..], last)?;
    }
    let at = (offset - start) as usize;
    out[at..at + buf.len()].copy_from_slice(buf);
    Ok((std::borrow::Cow::Owned(out), start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{region_geometry, write_new_file, CreateOptions, BAT_OFFSET};
    use rand::{Rng, SeedableRng};
    use std::process::Command;

    /// Open a file we created with the writer alone (no reader): BAT read straight from the
    /// known layout. Lets the write path be checked against qemu-img and libvhdi directly.
    fn open_raw(path: &Path, opts: &CreateOptions) -> (WriteState, Vec<u64>) {
        open_raw_layer(path, opts, false)
    }

    fn open_raw_layer(
        path: &Path,
        opts: &CreateOptions,
        has_parent: bool,
    ) -> (WriteState, Vec<u64>) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let (view, mut st, _) = open_writable(f, path).unwrap();
        let geo = region_geometry(opts);
        let mut raw = vec![0u8; (geo.total_entries * 8) as usize];
        view.read_exact_at(&mut raw, BAT_OFFSET).unwrap();
        let bat = raw
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        st.configure(Layout {
            virtual_size: opts.virtual_size,
            block_size: opts.block_size,
            logical_sector_size: opts.logical_sector_size,
            has_parent,
            leave_allocated: opts.fixed,
            bat_offset: BAT_OFFSET,
            bat_entries: geo.total_entries,
        });
        (st, bat)
    }

    fn qemu_raw(path: &Path) -> Vec<u8> {
        let out = path.with_extension("raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(path)
            .arg(&out)
            .status()
            .expect("qemu-img is required for this test (apt-get install qemu-utils)");
        assert!(st.success());
        std::fs::read(out).unwrap()
    }

    fn qemu_check(path: &Path) {
        let o = Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(path)
            .output()
            .expect("qemu-img is required for this test (apt-get install qemu-utils)");
        assert!(
            o.status.success(),
            "qemu-img check failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    #[test]
    fn random_writes_read_back_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (fixed, bs)) in [(false, 1u32 << 20), (true, 8 << 20), (false, 32 << 20)]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(format!("d{i}.vhdx"));
            let opts = CreateOptions {
                virtual_size: 80 << 20,
                block_size: bs,
                fixed,
                ..Default::default()
            };
            write_new_file(&path, &opts, None).unwrap();
            let mut model = vec![0u8; opts.virtual_size as usize];
            let (mut st, mut bat) = open_raw(&path, &opts);
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            for _ in 0..60 {
                let len = rng.gen_range(1..300_000usize);
                let off = rng.gen_range(0..opts.virtual_size - len as u64);
                let fill: u8 = rng.gen();
                let data: Vec<u8> = (0..len).map(|k| fill.wrapping_add(k as u8)).collect();
                let (aligned, at) = align_to_sectors(&data, off, 512, |b, o| {
                    b.copy_from_slice(&model[o as usize..o as usize + b.len()]);
                    Ok(())
                })
                .unwrap();
                st.write_sectors(&mut bat, &aligned, at).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            // Whole-block zeroing and a zero write that must not allocate.
            let rest = st.zero_whole_blocks(&mut bat, 0, 3 << 20).unwrap();
            for (o, n) in rest {
                st.write_sectors(&mut bat, &vec![0u8; n as usize], o)
                    .unwrap();
            }
            model[..3 << 20].fill(0);
            st.flush().unwrap();
            drop(st);
            qemu_check(&path);
            assert!(qemu_raw(&path) == model, "content differs for {path:?}");
        }
    }

    fn vhdi_read(chain: &[&Path]) -> Vec<u8> {
        let out = chain[0].with_extension("vhdi");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/vhdi_read.py");
        let o = Command::new("python3")
            .arg(script)
            .arg(&out)
            .args(chain)
            .output()
            .expect("python3 with pyvhdi (pip install libvhdi-python) is required");
        assert!(
            o.status.success(),
            "libvhdi failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read(out).unwrap()
    }

    /// Write `data` at `off` (any alignment) into a layer and its model.
    fn put(
        st: &mut WriteState,
        bat: &mut [u64],
        model: &mut [u8],
        lss: u64,
        data: &[u8],
        off: u64,
    ) {
        let (aligned, at) = align_to_sectors(data, off, lss, |b, o| {
            b.copy_from_slice(&model[o as usize..o as usize + b.len()]);
            Ok(())
        })
        .unwrap();
        st.write_sectors(bat, &aligned, at).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    #[test]
    fn differencing_sector_writes_read_back_in_libvhdi() {
        let dir = tempfile::tempdir().unwrap();
        for (lss, bs) in [(512u64, 1u32 << 20), (4096, 2 << 20)] {
            let opts = CreateOptions {
                virtual_size: 24 << 20,
                block_size: bs,
                logical_sector_size: lss as u32,
                ..Default::default()
            };
            let mut model = vec![0u8; opts.virtual_size as usize];
            let mut rng = rand::rngs::StdRng::seed_from_u64(lss);
            let mut chain: Vec<PathBuf> = Vec::new();
            for depth in 0..3 {
                let path = dir.path().join(format!("l{lss}-{depth}.vhdx"));
                let link = chain.last().map(|parent| {
                    let f = File::open(parent).unwrap();
                    let (h, _) = current_header(&f, parent).unwrap();
                    crate::create::parent_link(parent, &path, h.data_write_guid, Guid::new_random())
                        .unwrap()
                });
                write_new_file(&path, &opts, link.as_ref()).unwrap();
                let (mut st, mut bat) = open_raw_layer(&path, &opts, depth > 0);
                for _ in 0..200 {
                    // Mostly single sectors (sub-byte bitmap patterns), some larger runs, some
                    // sub-sector writes (read-modify-write of the parent's bytes).
                    let len = match rng.gen_range(0..4) {
                        0 => lss as usize,
                        1 => rng.gen_range(1..lss as usize),
                        2 => rng.gen_range(1..5) * lss as usize,
                        _ => rng.gen_range(1..200_000usize),
                    };
                    let off = rng.gen_range(0..opts.virtual_size - len as u64);
                    let v: u8 = rng.gen_range(1..255);
                    put(&mut st, &mut bat, &mut model, lss, &vec![v; len], off);
                }
                // A whole block of zeros over parent data must hide it (ZERO state).
                if depth > 0 {
                    let rest = st
                        .zero_whole_blocks(&mut bat, u64::from(bs), u64::from(bs))
                        .unwrap();
                    for (o, n) in rest {
                        put(
                            &mut st,
                            &mut bat,
                            &mut model,
                            lss,
                            &vec![0u8; n as usize],
                            o,
                        );
                    }
                    model[bs as usize..2 * bs as usize].fill(0);
                }
                st.flush().unwrap();
                drop(st);
                chain.push(path);
                let refs: Vec<&Path> = chain.iter().rev().map(|p| p.as_path()).collect();
                let got = vhdi_read(&refs);
                if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
                    let geo = BatGeometry::from_params(bs, lss as u32, opts.virtual_size, true);
                    let b = i as u64 / u64::from(bs);
                    panic!(
                        "libvhdi read differs at depth {depth}, lss {lss}, offset {i}: got {} want {}, block {b} entry {:#x}",
                        got[i], model[i], bat[geo.payload_index(b)]
                    );
                }
            }
        }
    }

    #[test]
    fn crash_after_log_write_leaves_a_log_that_qemu_and_we_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crash.vhdx");
        let opts = CreateOptions {
            virtual_size: 64 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        write_new_file(&path, &opts, None).unwrap();
        let mut model = vec![0u8; opts.virtual_size as usize];
        let (mut st, mut bat) = open_raw(&path, &opts);
        put(&mut st, &mut bat, &mut model, 512, &vec![0x11; 3 << 20], 0);
        st.flush().unwrap();
        st.set_crash_after_log_write(true);
        put(
            &mut st,
            &mut bat,
            &mut model,
            512,
            &vec![0x22; 5 << 20],
            20 << 20,
        );
        put(&mut st, &mut bat, &mut model, 512, &vec![0x33; 1000], 4096);
        let err = st.flush().unwrap_err().to_string();
        assert!(err.contains("simulated crash"), "{err}");
        drop(st);
        let f = File::open(&path).unwrap();
        let (h, _) = current_header(&f, &path).unwrap();
        assert!(!h.log_guid.is_zero(), "the log must be pending");
        // qemu replays it on `check -r all` (on a copy) and then reads the new data.
        let copy = dir.path().join("copy.vhdx");
        std::fs::copy(&path, &copy).unwrap();
        let o = Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx"])
            .arg(&copy)
            .output()
            .expect("qemu-img is required");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            qemu_raw(&copy) == model,
            "qemu's replay differs from the model"
        );
        // Our writable open replays on disk and clears LogGuid.
        let (st, _) = open_raw(&path, &opts);
        assert!(st.header().log_guid.is_zero());
        drop(st);
        qemu_check(&path);
        assert!(
            qemu_raw(&path) == model,
            "our replay differs from the model"
        );
    }
}
