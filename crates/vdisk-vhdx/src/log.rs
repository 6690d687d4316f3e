//! The VHDX metadata log (MS-VHDX 2.3): entry format, replay, and the writer.
//!
//! Every metadata change of a VHDX (BAT, sector bitmaps, region tables, metadata region) goes
//! through this circular log first, so that a power failure between "write the log" and "apply the
//! pages" can be repaired by replaying the log on the next open. No crate implements this; openvmm
//! has one but is not a library we can depend on, so we follow the spec directly.
//!
//! Three things live here:
//! - parsing and validation of entries ([`parse_entry`]), strict enough for hostile files: every
//!   count is checked against the entry length before anything is allocated, and an invalid entry
//!   simply ends a sequence, as the spec says;
//! - replay: [`replay_in_memory`] (read-only opens: an overlay that shows the replayed file without
//!   touching it) and [`replay_on_disk`] (writable opens);
//! - [`LogWriter`], which appends entries of 4 KiB page updates.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use vdisk_core::{Error, Guid, ReadAt, Result, WriteAt};

/// Log sectors, data sectors and descriptors all work in 4 KiB units.
pub(crate) const SECTOR: usize = 4096;
const SECTOR_U64: u64 = SECTOR as u64;
const MIB: u64 = 1 << 20;

/// The log is read into memory for replay; a log longer than this is not something any writer
/// produces (Hyper-V and qemu use 1 MiB) and we refuse it rather than allocate gigabytes.
pub(crate) const MAX_LOG_LENGTH: u32 = 1 << 30;

/// No VHDX structure lies beyond this file offset (64 TiB of payload plus metadata fits far below
/// it); descriptors pointing further are corrupt, not a reason to create a huge sparse file.
const MAX_FILE_OFFSET: u64 = 1 << 48;

/// Descriptors in the first descriptor sector (after the 64-byte entry header), and in every
/// following one.
const DESCS_FIRST_SECTOR: u64 = 126;
const DESCS_PER_SECTOR: u64 = 128;

/// The first 192 KiB (file identifier and the two headers) is never written through the log: the
/// headers locate the log, and the identifier is never overwritten at all.
const FIRST_LOGGABLE_OFFSET: u64 = 192 * 1024;

fn corrupt(detail: impl Into<String>) -> Error {
    Error::corrupt("vhdx", detail)
}

fn io_err(context: &str, e: io::Error) -> Error {
    Error::io(context.to_string(), e)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One 4 KiB update described by a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Descriptor {
    /// Write these 4096 bytes at `file_offset` (leading/trailing bytes already restored).
    Data {
        file_offset: u64,
        page: Box<[u8; SECTOR]>,
    },
    /// Zero `length` bytes at `file_offset`.
    Zero { file_offset: u64, length: u64 },
}

impl Descriptor {
    fn range(&self) -> (u64, u64) {
        match self {
            Descriptor::Data { file_offset, .. } => (*file_offset, *file_offset + SECTOR_U64),
            Descriptor::Zero {
                file_offset,
                length,
            } => (*file_offset, *file_offset + *length),
        }
    }
}

/// A parsed, fully validated log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogEntry {
    pub(crate) entry_length: u32,
    pub(crate) tail: u32,
    pub(crate) sequence_number: u64,
    pub(crate) log_guid: Guid,
    pub(crate) flushed_file_offset: u64,
    pub(crate) last_file_offset: u64,
    pub(crate) descriptors: Vec<Descriptor>,
}

/// Number of descriptor sectors needed for `count` descriptors (at least one: the header).
fn descriptor_sectors(count: u64) -> u64 {
    if count <= DESCS_FIRST_SECTOR {
        1
    } else {
        1 + (count - DESCS_FIRST_SECTOR).div_ceil(DESCS_PER_SECTOR)
    }
}

/// Serialize an entry into its on-disk bytes (descriptor sectors, then data sectors), with the
/// checksum filled in.
pub(crate) fn serialize_entry(
    sequence_number: u64,
    tail: u32,
    log_guid: Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descriptors: &[Descriptor],
) -> Vec<u8> {
    let count = descriptors.len() as u64;
    let data_count = descriptors
        .iter()
        .filter(|d| matches!(d, Descriptor::Data { .. }))
        .count() as u64;
    let ds = descriptor_sectors(count);
    let total = ((ds + data_count) * SECTOR_U64) as usize;
    let mut out = vec![0u8; total];
    out[0..4].copy_from_slice(b"loge");
    out[8..12].copy_from_slice(&(total as u32).to_le_bytes());
    out[12..16].copy_from_slice(&tail.to_le_bytes());
    out[16..24].copy_from_slice(&sequence_number.to_le_bytes());
    out[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    out[32..48].copy_from_slice(&log_guid.to_le_bytes());
    out[48..56].copy_from_slice(&flushed_file_offset.to_le_bytes());
    out[56..64].copy_from_slice(&last_file_offset.to_le_bytes());
    let mut data_index = 0usize;
    for (i, d) in descriptors.iter().enumerate() {
        let at = 64 + 32 * i;
        let desc = &mut out[at..at + 32];
        match d {
            Descriptor::Zero {
                file_offset,
                length,
            } => {
                desc[0..4].copy_from_slice(b"zero");
                desc[8..16].copy_from_slice(&length.to_le_bytes());
                desc[16..24].copy_from_slice(&file_offset.to_le_bytes());
            }
            Descriptor::Data { file_offset, page } => {
                desc[0..4].copy_from_slice(b"desc");
                desc[4..8].copy_from_slice(&page[4092..4096]);
                desc[8..16].copy_from_slice(&page[0..8]);
                desc[16..24].copy_from_slice(&file_offset.to_le_bytes());
                let s = ((ds as usize) + data_index) * SECTOR;
                let sector = &mut out[s..s + SECTOR];
                sector[0..4].copy_from_slice(b"data");
                sector[4..8].copy_from_slice(&((sequence_number >> 32) as u32).to_le_bytes());
                sector[8..4092].copy_from_slice(&page[8..4092]);
                sector[4092..4096].copy_from_slice(&(sequence_number as u32).to_le_bytes());
                data_index += 1;
            }
        }
        out[at + 24..at + 32].copy_from_slice(&sequence_number.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The log region as bytes in memory, read with wrap-around at its end (entries may straddle it).
struct LogImage {
    bytes: Vec<u8>,
}

impl LogImage {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// `len` bytes starting at log offset `pos`, wrapping at the end of the log.
    fn read(&self, pos: u64, len: usize) -> Vec<u8> {
        let n = self.bytes.len();
        let mut out = Vec::with_capacity(len);
        let mut p = (pos % self.len()) as usize;
        while out.len() < len {
            let take = (len - out.len()).min(n - p);
            out.extend_from_slice(&self.bytes[p..p + take]);
            p = (p + take) % n;
        }
        out
    }
}

/// Parse and validate the entry at log offset `pos`. `None` means "not a valid entry" (which ends a
/// sequence); it is never an error by itself, because stale and torn entries are normal in a log.
fn parse_entry_at(log: &LogImage, pos: u64, log_guid: Guid) -> Option<LogEntry> {
    let head = log.read(pos, SECTOR);
    parse_entry(&head, |len| log.read(pos, len), log.len(), log_guid)
}

/// Validate an entry whose first sector is `head`; `whole(len)` returns the entry's first `len`
/// bytes. Checks every field the spec constrains before allocating anything sized by the entry.
pub(crate) fn parse_entry(
    head: &[u8],
    whole: impl FnOnce(usize) -> Vec<u8>,
    log_length: u64,
    log_guid: Guid,
) -> Option<LogEntry> {
    if head.len() < SECTOR || &head[0..4] != b"loge" {
        return None;
    }
    let checksum = le_u32(head, 4);
    let entry_length = le_u32(head, 8);
    let tail = le_u32(head, 12);
    let sequence_number = le_u64(head, 16);
    let count = u64::from(le_u32(head, 24));
    let entry_guid = Guid::from_le_bytes(head[32..48].try_into().ok()?);
    let flushed_file_offset = le_u64(head, 48);
    let last_file_offset = le_u64(head, 56);
    let len = u64::from(entry_length);
    if len == 0
        || len % SECTOR_U64 != 0
        || len > log_length
        || u64::from(tail) % SECTOR_U64 != 0
        || u64::from(tail) >= log_length
        || sequence_number == 0
        || entry_guid != log_guid
        || log_guid.is_zero()
        || flushed_file_offset > MAX_FILE_OFFSET
        || last_file_offset > MAX_FILE_OFFSET
    {
        return None;
    }
    let sectors = len / SECTOR_U64;
    let ds = descriptor_sectors(count);
    if ds > sectors {
        return None;
    }
    let bytes = whole(len as usize);
    let mut zeroed = bytes.clone();
    zeroed[4..8].fill(0);
    if crc32c::crc32c(&zeroed) != checksum {
        return None;
    }
    let mut descriptors = Vec::with_capacity(count as usize);
    let mut data_sector = ds;
    for i in 0..count as usize {
        let at = 64 + 32 * i;
        let d = &bytes[at..at + 32];
        let file_offset = le_u64(d, 16);
        if le_u64(d, 24) != sequence_number || !file_offset.is_multiple_of(SECTOR_U64) {
            return None;
        }
        let desc = match &d[0..4] {
            b"zero" => {
                let length = le_u64(d, 8);
                if le_u32(d, 4) != 0 || !length.is_multiple_of(SECTOR_U64) {
                    return None;
                }
                Descriptor::Zero {
                    file_offset,
                    length,
                }
            }
            b"desc" => {
                if data_sector >= sectors {
                    return None;
                }
                let s = (data_sector * SECTOR_U64) as usize;
                let sector = &bytes[s..s + SECTOR];
                let high = le_u32(sector, 4);
                let low = le_u32(sector, 4092);
                if &sector[0..4] != b"data"
                    || u64::from(high) != sequence_number >> 32
                    || low != sequence_number as u32
                {
                    return None;
                }
                let mut page = Box::new([0u8; SECTOR]);
                page[0..8].copy_from_slice(&d[8..16]);
                page[8..4092].copy_from_slice(&sector[8..4092]);
                page[4092..4096].copy_from_slice(&d[4..8]);
                data_sector += 1;
                Descriptor::Data { file_offset, page }
            }
            _ => return None,
        };
        let (start, end) = match desc {
            Descriptor::Data { .. } => (file_offset, file_offset.checked_add(SECTOR_U64)?),
            Descriptor::Zero { length, .. } => (file_offset, file_offset.checked_add(length)?),
        };
        if start < FIRST_LOGGABLE_OFFSET || end > MAX_FILE_OFFSET {
            return None;
        }
        descriptors.push(desc);
    }
    Some(LogEntry {
        entry_length,
        tail,
        sequence_number,
        log_guid: entry_guid,
        flushed_file_offset,
        last_file_offset,
        descriptors,
    })
}

/// The newest valid, complete log sequence: its entries in order, tail first.
#[derive(Debug)]
pub(crate) struct ActiveSequence {
    pub(crate) entries: Vec<LogEntry>,
}

impl ActiveSequence {
    pub(crate) fn head(&self) -> &LogEntry {
        // Never empty: `find_active_sequence` only returns non-empty sequences.
        &self.entries[self.entries.len() - 1]
    }

    /// The file size after replay: large enough for every descriptor and LastFileOffset.
    fn replayed_size(&self, file_size: u64) -> u64 {
        let mut size = file_size.max(self.head().last_file_offset);
        for e in &self.entries {
            for d in &e.descriptors {
                size = size.max(d.range().1);
            }
        }
        size
    }
}

/// Read the log region and check it lies inside the file and has a sane size.
fn read_log(backing: &dyn ReadAt, log_offset: u64, log_length: u32) -> Result<LogImage> {
    let file_size = backing
        .size()
        .map_err(|e| io_err("cannot get the size of the VHDX file", e))?;
    if log_length == 0
        || !u64::from(log_length).is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
    {
        return Err(corrupt(format!(
            "the log (offset {log_offset}, length {log_length}) is not 1 MiB aligned"
        )));
    }
    if log_offset < MIB {
        return Err(corrupt(format!(
            "the log at offset {log_offset} overlaps the header section"
        )));
    }
    if log_length > MAX_LOG_LENGTH {
        return Err(corrupt(format!(
            "the log is {log_length} bytes long; more than {MAX_LOG_LENGTH} is not a sane VHDX log"
        )));
    }
    match log_offset.checked_add(u64::from(log_length)) {
        Some(end) if end <= file_size => {}
        _ => {
            return Err(corrupt(format!(
                "the log (offset {log_offset}, length {log_length}) extends past the end of the \
                 file ({file_size} bytes): the file is truncated"
            )))
        }
    }
    let mut bytes = vec![0u8; log_length as usize];
    backing
        .read_exact_at(&mut bytes, log_offset)
        .map_err(|e| io_err("cannot read the VHDX log", e))?;
    Ok(LogImage { bytes })
}

/// Find the active sequence as MS-VHDX 2.3.3 describes: try every 4 KiB position as a tail, extend
/// with consecutive valid entries, keep sequences whose head's tail lies inside them, and take the
/// one with the highest head sequence number.
fn find_active_sequence(log: &LogImage, log_guid: Guid) -> Result<Option<ActiveSequence>> {
    let log_len = log.len();
    // The spec's scan re-walks a sequence from every 4 KiB tail inside it; a hostile log full of
    // chained entries whose tails point nowhere would make that quadratic. Real logs need a few
    // steps per sector; past this budget the log is refused rather than scanned for hours.
    let mut budget = (log_len / SECTOR_U64) * 64 + 4096;
    // Each position is parsed at most once: a hostile log cannot make the scan quadratic in I/O.
    let mut cache: HashMap<u64, Option<LogEntry>> = HashMap::new();
    let mut entry_at = |pos: u64| -> Option<LogEntry> {
        cache
            .entry(pos)
            .or_insert_with(|| parse_entry_at(log, pos, log_guid))
            .clone()
    };
    let mut best: Option<(u64, Vec<(u64, LogEntry)>)> = None;
    let mut current_tail = 0u64;
    let mut old_tail = 0u64;
    loop {
        let mut seq: Vec<(u64, LogEntry)> = Vec::new();
        let mut head_pos = current_tail;
        let mut covered = 0u64;
        while let Some(entry) = entry_at(head_pos) {
            budget = budget.checked_sub(1).ok_or_else(|| {
                corrupt(
                    "the log holds so many chained entries with tails outside their sequence \
                     that it cannot be a real log",
                )
            })?;
            if let Some((_, last)) = seq.last() {
                if entry.sequence_number != last.sequence_number.wrapping_add(1)
                    || last.sequence_number == u64::MAX
                {
                    break;
                }
            }
            // A sequence cannot be longer than the log; stop before it laps itself.
            covered += u64::from(entry.entry_length);
            if covered > log_len {
                break;
            }
            let next = (head_pos + u64::from(entry.entry_length)) % log_len;
            seq.push((head_pos, entry));
            head_pos = next;
        }
        let valid = match seq.last() {
            Some((_, head)) => seq.iter().any(|(p, _)| *p == u64::from(head.tail)),
            None => false,
        };
        if valid {
            // The head's tail may be a later entry than the first one we tried: the sequence
            // proper starts at the tail.
            let head = &seq[seq.len() - 1].1;
            let start = seq
                .iter()
                .position(|(p, _)| *p == u64::from(head.tail))
                .unwrap_or(0);
            let head_seq = head.sequence_number;
            if best.as_ref().is_none_or(|(s, _)| head_seq > *s) {
                best = Some((head_seq, seq[start..].to_vec()));
            }
            current_tail = head_pos % log_len;
            // A sequence that wrapped back to (or past) where it started is complete; moving
            // forward from its head would only rescan it.
            if current_tail <= old_tail {
                break;
            }
        } else {
            current_tail += SECTOR_U64;
            if current_tail >= log_len {
                break;
            }
        }
        if current_tail < old_tail {
            break;
        }
        old_tail = current_tail;
    }
    Ok(best.map(|(_, seq)| ActiveSequence {
        entries: seq.into_iter().map(|(_, e)| e).collect(),
    }))
}

/// Find the active sequence of a log that must be replayed, with the checks that make the file
/// unusable when they fail.
fn active_sequence(
    backing: &dyn ReadAt,
    log_guid: Guid,
    log_offset: u64,
    log_length: u32,
) -> Result<ActiveSequence> {
    let log = read_log(backing, log_offset, log_length)?;
    let seq = find_active_sequence(&log, log_guid)?.ok_or_else(|| {
        corrupt(format!(
            "the header says the log (LogGuid {log_guid}) must be replayed, but the log holds no \
             valid entry sequence; the metadata cannot be trusted"
        ))
    })?;
    let file_size = backing
        .size()
        .map_err(|e| io_err("cannot get the size of the VHDX file", e))?;
    let flushed = seq.head().flushed_file_offset;
    if file_size < flushed {
        return Err(corrupt(format!(
            "the file is {file_size} bytes but its log says it was at least {flushed} bytes: \
             it has been truncated"
        )));
    }
    // Replay must not write over the log it is replaying from.
    let log_end = log_offset + u64::from(log_length);
    for e in &seq.entries {
        for d in &e.descriptors {
            let (start, end) = d.range();
            if start < log_end && log_offset < end {
                return Err(corrupt(format!(
                    "a log entry (sequence {}) writes {start}..{end}, inside the log itself",
                    e.sequence_number
                )));
            }
        }
    }
    Ok(seq)
}

/// What the file looks like after replay, without writing it: 4 KiB pages and zeroed ranges over
/// the unchanged file. Memory is bounded by the log (every page came from it).
struct ReplayOverlay {
    inner: Arc<dyn ReadAt>,
    pages: BTreeMap<u64, Box<[u8; SECTOR]>>,
    zeros: Vec<(u64, u64)>,
    size: u64,
}

impl ReadAt for ReplayOverlay {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let inner_size = self.inner.size()?;
        // The part the real file has; past its end the replayed file was extended with zeros.
        let real_end = end.min(inner_size).max(offset);
        let real_len = (real_end - offset) as usize;
        if real_len > 0 {
            self.inner.read_exact_at(&mut buf[..real_len], offset)?;
        }
        buf[real_len..].fill(0);
        for &(zs, ze) in &self.zeros {
            let s = zs.max(offset);
            let e = ze.min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize].fill(0);
            }
        }
        let first_page = offset - offset % SECTOR_U64;
        for (&p, page) in self.pages.range(first_page..end) {
            let s = p.max(offset);
            let e = (p + SECTOR_U64).min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&page[(s - p) as usize..(e - p) as usize]);
            }
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// For read-only opens of a file whose header has a non-zero LogGuid: a view of the file as it
/// would be after replay. The file itself is not modified.
pub(crate) fn replay_in_memory(
    backing: Arc<dyn ReadAt>,
    log_guid: Guid,
    log_offset: u64,
    log_length: u32,
) -> Result<Arc<dyn ReadAt>> {
    let seq = active_sequence(&*backing, log_guid, log_offset, log_length)?;
    let file_size = backing
        .size()
        .map_err(|e| io_err("cannot get the size of the VHDX file", e))?;
    let size = seq.replayed_size(file_size);
    let mut pages: BTreeMap<u64, Box<[u8; SECTOR]>> = BTreeMap::new();
    let mut zeros = Vec::new();
    for e in seq.entries {
        for d in e.descriptors {
            match d {
                Descriptor::Data { file_offset, page } => {
                    pages.insert(file_offset, page);
                }
                Descriptor::Zero {
                    file_offset,
                    length,
                } => {
                    // Pages written earlier in the replay order are overwritten by these zeros.
                    let doomed: Vec<u64> = pages
                        .range(file_offset..file_offset + length)
                        .map(|(&k, _)| k)
                        .collect();
                    for k in doomed {
                        pages.remove(&k);
                    }
                    zeros.push((file_offset, file_offset + length));
                }
            }
        }
    }
    Ok(Arc::new(ReplayOverlay {
        inner: backing,
        pages,
        zeros,
        size,
    }))
}

/// For writable opens: replay the log into the file and flush. Returns false if there was nothing
/// to replay (`log_guid` zero). Clearing LogGuid in the header is the caller's job (a header
/// update, which must come after this returns).
pub(crate) fn replay_on_disk(
    backing: &dyn WriteAt,
    log_guid: Guid,
    log_offset: u64,
    log_length: u32,
) -> Result<bool> {
    if log_guid.is_zero() {
        return Ok(false);
    }
    let seq = active_sequence(backing, log_guid, log_offset, log_length)?;
    let file_size = backing
        .size()
        .map_err(|e| io_err("cannot get the size of the VHDX file", e))?;
    let wio = |e| io_err("cannot write the replayed log into the VHDX file", e);
    let zero = vec![0u8; MIB as usize];
    let mut size = file_size;
    for e in &seq.entries {
        for d in &e.descriptors {
            match d {
                Descriptor::Data { file_offset, page } => {
                    backing.write_all_at(&page[..], *file_offset).map_err(wio)?;
                    size = size.max(file_offset + SECTOR_U64);
                }
                Descriptor::Zero {
                    file_offset,
                    length,
                } => {
                    // Past the end of the file, extending it is enough: new space reads as zeros.
                    let end = file_offset + length;
                    let mut pos = *file_offset;
                    while pos < end.min(size) {
                        let n = (end.min(size) - pos).min(MIB) as usize;
                        backing.write_all_at(&zero[..n], pos).map_err(wio)?;
                        pos += n as u64;
                    }
                    if end > size {
                        backing.set_size(end).map_err(wio)?;
                        size = end;
                    }
                }
            }
        }
    }
    let last = seq.head().last_file_offset;
    if last > size {
        backing.set_size(last).map_err(wio)?;
    }
    backing
        .sync()
        .map_err(|e| io_err("cannot flush the replayed VHDX file", e))?;
    Ok(true)
}

/// Appends entries to the circular log. Each entry is its own tail: the writer applies and flushes
/// an entry's pages before writing the next one, so no older entry is ever needed again, and a torn
/// entry leaves the previous (already applied, harmless to replay again) entry as the active
/// sequence.
pub(crate) struct LogWriter {
    pub(crate) log_offset: u64,
    pub(crate) log_length: u32,
    /// Where the next entry starts, relative to the log.
    next_pos: u64,
    next_sequence: u64,
}

impl LogWriter {
    pub(crate) fn new(log_offset: u64, log_length: u32) -> Self {
        LogWriter {
            log_offset,
            log_length,
            next_pos: 0,
            next_sequence: 1,
        }
    }

    /// Most data pages one entry may carry. Entries are kept to half the log so that writing one
    /// never overwrites the entry just before it (the fallback if this one is torn).
    pub(crate) fn max_pages_per_entry(&self) -> usize {
        let sectors = u64::from(self.log_length) / SECTOR_U64 / 2;
        let mut n = sectors.saturating_sub(1);
        while n > 0 && descriptor_sectors(n) + n > sectors {
            n -= 1;
        }
        n as usize
    }

    /// Write one entry updating `pages` (each 4 KiB, at 4 KiB-aligned file offsets) and flush it.
    /// The caller then writes the pages to their place and flushes.
    pub(crate) fn write_entry(
        &mut self,
        backing: &dyn WriteAt,
        log_guid: Guid,
        pages: &[(u64, &[u8; SECTOR])],
        flushed_file_offset: u64,
        last_file_offset: u64,
    ) -> Result<()> {
        if pages.len() > self.max_pages_per_entry() {
            return Err(Error::InvalidArgument(format!(
                "{} pages do not fit one log entry of a {}-byte log",
                pages.len(),
                self.log_length
            )));
        }
        let descriptors: Vec<Descriptor> = pages
            .iter()
            .map(|(off, p)| Descriptor::Data {
                file_offset: *off,
                page: Box::new(**p),
            })
            .collect();
        let seq = self.next_sequence;
        let bytes = serialize_entry(
            seq,
            self.next_pos as u32,
            log_guid,
            flushed_file_offset,
            last_file_offset,
            &descriptors,
        );
        let log_len = u64::from(self.log_length);
        let wio = |e| io_err("cannot write the VHDX log", e);
        // Sector by sector so that an entry can straddle the end of the ring.
        let mut pos = self.next_pos;
        for sector in bytes.chunks(SECTOR) {
            backing
                .write_all_at(sector, self.log_offset + pos)
                .map_err(wio)?;
            pos = (pos + SECTOR_U64) % log_len;
        }
        backing
            .sync()
            .map_err(|e| io_err("cannot flush the VHDX log", e))?;
        self.next_pos = pos;
        self.next_sequence += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_core::MemBacking;

    const LOG_OFF: u64 = MIB;
    const LOG_LEN: u32 = MIB as u32;

    fn file(size: u64) -> MemBacking {
        let m = MemBacking::default();
        m.set_size(size).unwrap();
        m
    }

    fn page(fill: u8) -> [u8; SECTOR] {
        let mut p = [fill; SECTOR];
        p[0] = 0xA0;
        p[4095] = 0x0B;
        p
    }

    fn read(r: &dyn ReadAt, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        r.read_exact_at(&mut v, off).unwrap();
        v
    }

    #[test]
    fn entry_round_trip() {
        let g = Guid::new_random();
        let p = page(7);
        let descs = vec![
            Descriptor::Data {
                file_offset: 3 * MIB,
                page: Box::new(p),
            },
            Descriptor::Zero {
                file_offset: 4 * MIB,
                length: 8192,
            },
        ];
        let bytes = serialize_entry(0x1_0000_0002, 4096, g, 8 * MIB, 9 * MIB, &descs);
        assert_eq!(bytes.len(), 2 * SECTOR);
        let e = parse_entry(&bytes[..SECTOR], |n| bytes[..n].to_vec(), MIB, g).unwrap();
        assert_eq!(e.sequence_number, 0x1_0000_0002);
        assert_eq!(e.tail, 4096);
        assert_eq!(e.flushed_file_offset, 8 * MIB);
        assert_eq!(e.last_file_offset, 9 * MIB);
        assert_eq!(e.descriptors, descs);
        // Wrong guid, flipped bit, broken data sector sequence: all invalid.
        assert!(parse_entry(
            &bytes[..SECTOR],
            |n| bytes[..n].to_vec(),
            MIB,
            Guid::new_random()
        )
        .is_none());
        let mut bad = bytes.clone();
        bad[5000] ^= 1;
        assert!(parse_entry(&bad[..SECTOR], |n| bad[..n].to_vec(), MIB, g).is_none());
    }

    #[test]
    fn many_descriptors_span_sectors() {
        let g = Guid::new_random();
        let descs: Vec<Descriptor> = (0..300)
            .map(|i| Descriptor::Data {
                file_offset: 2 * MIB + i * SECTOR_U64,
                page: Box::new(page(i as u8)),
            })
            .collect();
        let bytes = serialize_entry(5, 0, g, 0, 0, &descs);
        assert_eq!(bytes.len(), (3 + 300) * SECTOR);
        let e = parse_entry(&bytes[..SECTOR], |n| bytes[..n].to_vec(), 4 * MIB, g).unwrap();
        assert_eq!(e.descriptors, descs);
    }

    #[test]
    fn writer_then_replay_in_memory_and_on_disk() {
        let f = file(8 * MIB);
        f.write_all_at(&[0x55; SECTOR], 3 * MIB).unwrap();
        let g = Guid::new_random();
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN);
        let p1 = page(1);
        let p2 = page(2);
        w.write_entry(&f, g, &[(3 * MIB, &p1)], 8 * MIB, 8 * MIB)
            .unwrap();
        w.write_entry(&f, g, &[(3 * MIB, &p2), (5 * MIB, &p1)], 8 * MIB, 10 * MIB)
            .unwrap();
        let before = f.snapshot();
        let arc: Arc<dyn ReadAt> = Arc::new(MemBacking::new(before.clone()));
        let view = replay_in_memory(arc, g, LOG_OFF, LOG_LEN).unwrap();
        assert_eq!(view.size().unwrap(), 10 * MIB);
        assert_eq!(read(&*view, 3 * MIB, SECTOR), p2.to_vec());
        assert_eq!(read(&*view, 5 * MIB, SECTOR), p1.to_vec());
        assert_eq!(read(&*view, 9 * MIB, 16), vec![0u8; 16]);
        assert_eq!(f.snapshot(), before);
        assert!(replay_on_disk(&f, g, LOG_OFF, LOG_LEN).unwrap());
        assert_eq!(f.size().unwrap(), 10 * MIB);
        assert_eq!(read(&f, 3 * MIB, SECTOR), p2.to_vec());
        assert_eq!(read(&f, 5 * MIB, SECTOR), p1.to_vec());
    }

    #[test]
    fn writer_wraps_around_the_ring() {
        let f = file(8 * MIB);
        let g = Guid::new_random();
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN);
        let max = w.max_pages_per_entry();
        assert!(max > 100);
        let pages: Vec<[u8; SECTOR]> = (0..max).map(|i| page(i as u8)).collect();
        // Several entries: the third and later ones wrap.
        for round in 0..5u64 {
            let list: Vec<(u64, &[u8; SECTOR])> = pages
                .iter()
                .enumerate()
                .take(100 + round as usize)
                .map(|(i, p)| (3 * MIB + i as u64 * SECTOR_U64, p))
                .collect();
            w.write_entry(&f, g, &list, 8 * MIB, 8 * MIB).unwrap();
        }
        let view =
            replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN).unwrap();
        for i in 0..104u64 {
            assert_eq!(
                read(&*view, 3 * MIB + i * SECTOR_U64, SECTOR),
                pages[i as usize].to_vec()
            );
        }
        let log = read_log(&f, LOG_OFF, LOG_LEN).unwrap();
        let seq = find_active_sequence(&log, g).unwrap().unwrap();
        assert_eq!(seq.head().sequence_number, 5);
    }

    #[test]
    fn hostile_logs_are_refused_cleanly() {
        let g = Guid::new_random();
        // Empty log: nothing valid.
        let f = file(4 * MIB);
        let err = replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no valid entry"), "{err}");
        // Log past the end of the file.
        let err = replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, 4 * MIB, LOG_LEN)
            .err()
            .unwrap();
        assert!(err.to_string().contains("past the end"), "{err}");
        // Absurd log length.
        assert!(
            replay_in_memory(Arc::new(MemBacking::new(vec![])), g, MIB, u32::MAX - 4095).is_err()
        );
        // A descriptor count that does not fit the entry, with a correct checksum.
        let mut e = serialize_entry(1, 0, g, 0, 0, &[]);
        e[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        e[4..8].fill(0);
        let c = crc32c::crc32c(&e);
        e[4..8].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&e, LOG_OFF).unwrap();
        assert!(
            replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN).is_err()
        );
        // Absurd file offset in a zero descriptor.
        let e = serialize_entry(
            1,
            0,
            g,
            0,
            0,
            &[Descriptor::Zero {
                file_offset: u64::MAX - 4095,
                length: 1 << 40,
            }],
        );
        f.write_all_at(&e, LOG_OFF).unwrap();
        assert!(
            replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN).is_err()
        );
        // A descriptor writing into the log itself.
        let e = serialize_entry(
            1,
            0,
            g,
            0,
            0,
            &[Descriptor::Zero {
                file_offset: LOG_OFF,
                length: 4096,
            }],
        );
        f.write_all_at(&e, LOG_OFF).unwrap();
        let err = replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN)
            .err()
            .unwrap();
        assert!(err.to_string().contains("inside the log"), "{err}");
        // Truncated file.
        let e = serialize_entry(1, 0, g, 64 * MIB, 64 * MIB, &[]);
        f.write_all_at(&e, LOG_OFF).unwrap();
        let err = replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN)
            .err()
            .unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn newest_sequence_wins_and_torn_entry_falls_back() {
        let f = file(8 * MIB);
        let g = Guid::new_random();
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN);
        let (a, b) = (page(0xA), page(0xB));
        w.write_entry(&f, g, &[(3 * MIB, &a)], 8 * MIB, 8 * MIB)
            .unwrap();
        let second = LOG_OFF + w.next_pos;
        w.write_entry(&f, g, &[(3 * MIB, &b)], 8 * MIB, 8 * MIB)
            .unwrap();
        let view =
            replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN).unwrap();
        assert_eq!(read(&*view, 3 * MIB, SECTOR), b.to_vec());
        // Tear the second entry: its data sector is damaged, the first entry is replayed.
        f.write_all_at(&[0xEE; 100], second + SECTOR_U64 + 200)
            .unwrap();
        let view =
            replay_in_memory(Arc::new(MemBacking::new(f.snapshot())), g, LOG_OFF, LOG_LEN).unwrap();
        assert_eq!(read(&*view, 3 * MIB, SECTOR), a.to_vec());
    }

    #[test]
    fn chained_entries_with_foreign_tails_are_refused_quickly() {
        // Two-sector entries with consecutive sequence numbers filling a 4 MiB log, each naming
        // as its tail a data sector (never an entry): every sequence is invalid, and the spec's
        // scan re-walks each one from every later tail. The budget stops it.
        let g = Guid::new_random();
        let log_len = 4 * MIB;
        let f = file(8 * MIB);
        let n = log_len / (2 * SECTOR_U64);
        for i in 0..n {
            let e = serialize_entry(
                i + 1,
                (((i + n / 2) % n) * 2 * SECTOR_U64 + SECTOR_U64) as u32,
                g,
                0,
                0,
                &[Descriptor::Data {
                    file_offset: 6 * MIB,
                    page: Box::new(page(1)),
                }],
            );
            f.write_all_at(&e, LOG_OFF + i * 2 * SECTOR_U64).unwrap();
        }
        let t = std::time::Instant::now();
        let r = replay_in_memory(
            Arc::new(MemBacking::new(f.snapshot())),
            g,
            LOG_OFF,
            log_len as u32,
        );
        let e = r.err().expect("must be refused").to_string();
        assert!(e.contains("chained entries"), "{e}");
        assert!(t.elapsed().as_secs() < 10);
    }
}
