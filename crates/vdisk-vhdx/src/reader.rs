//! One VHDX file (one layer of a chain): opening and validating it, and reading its payload.
//!
//! Opening parses the header section from the raw file, replays a pending log in memory (the
//! log may rewrite region tables, metadata and BAT, so nothing past the headers is parsed from
//! the raw file), then parses the region table, metadata and the whole BAT into a `Vec<u64>` and
//! validates every entry once, so the read path can trust it: a BAT lookup is one index, reads
//! are positioned reads with `&self` and no locks, and adjacent present blocks are read with one
//! call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_core::{Error, ExtentState, ReadAt, Result};

use crate::format::*;

/// What happened to the log when the layer was opened (shown by `disk info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogState {
    Clean,
    ReplayedInMemory,
    ReplayedOnDisk,
}

impl LogState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogState::Clean => "clean",
            LogState::ReplayedInMemory => "replayed in memory",
            LogState::ReplayedOnDisk => "replayed on disk",
        }
    }
}

/// One parsed VHDX file.
pub(crate) struct VhdxFile {
    pub(crate) path: Option<PathBuf>,
    /// The file exactly as stored.
    pub(crate) raw: Arc<dyn ReadAt>,
    /// What everything past the headers is read from: the raw file, a log-replay overlay
    /// (read-only opens of a dirty file) or the writer's pending-pages view (writable opens).
    pub(crate) backing: Arc<dyn ReadAt>,
    pub(crate) file_id: FileIdentifier,
    /// The current header and its slot (0 = 64 KiB, 1 = 128 KiB).
    pub(crate) header: Header,
    #[allow(dead_code)] // for the writer and diagnostics
    pub(crate) header_slot: usize,
    pub(crate) regions: Regions,
    pub(crate) metadata: Metadata,
    pub(crate) geo: BatGeometry,
    /// The whole BAT, `geo.total_entries` long. The writer updates it in place.
    pub(crate) bat: Vec<u64>,
    /// Size of `backing`; payload past it reads as zeros. The writer updates it when it extends
    /// the file.
    pub(crate) file_size: u64,
    pub(crate) log_state: LogState,
    /// Problems that did not prevent opening (one damaged header or region table...), for
    /// `check`.
    pub(crate) problems: Vec<String>,
    /// Present on writable opens.
    pub(crate) writer: Option<crate::write::WriteState>,
}

fn corrupt(detail: impl Into<String>) -> Error {
    Error::corrupt("vhdx", detail)
}

/// Read exactly `buf.len()` bytes; running past the end of the file means it is truncated.
pub(crate) fn read_exact(r: &dyn ReadAt, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    r.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(format!(
                "the file is truncated: it ends before the {what} ({} bytes at offset {offset})",
                buf.len()
            ))
        } else {
            Error::io(format!("cannot read the {what} at offset {offset}"), e)
        }
    })
}

/// What a writable open hands to [`VhdxFile::parse`]: the writer's view of the file and its
/// state, and whether it replayed a log on disk.
pub(crate) struct Writable {
    pub(crate) view: Arc<dyn ReadAt>,
    pub(crate) state: crate::write::WriteState,
    pub(crate) replayed: bool,
}

/// Attach the file name to an error raised while parsing it (I/O errors included).
fn name_file(e: Error, path: Option<&Path>) -> Error {
    match (e, path) {
        (Error::Io { context, source }, Some(p)) => Error::Io {
            context: format!("{}: {context}", p.display()),
            source,
        },
        (e, Some(p)) => e.with_path(p),
        (e, None) => e,
    }
}

/// Most problems `validate_bat` lists before it stops counting in detail.
const MAX_LISTED_PROBLEMS: usize = 50;

impl VhdxFile {
    /// Parse a layer. `raw` is the file as stored; `writable` is the writer's view and state
    /// when opening for writing (the writer has then already replayed the log on disk).
    pub(crate) fn parse(
        raw: Arc<dyn ReadAt>,
        path: Option<&Path>,
        writable: Option<Writable>,
    ) -> Result<VhdxFile> {
        let r = Self::parse_inner(raw, path, writable, true);
        r.map_err(|e| name_file(e, path))
    }

    /// Like [`VhdxFile::parse`] (read-only) but BAT problems do not fail the open: `check`
    /// lists them all with [`VhdxFile::validate_bat`]. Never use the result for reading.
    pub(crate) fn parse_lenient(raw: Arc<dyn ReadAt>, path: Option<&Path>) -> Result<VhdxFile> {
        let r = Self::parse_inner(raw, path, None, false);
        r.map_err(|e| name_file(e, path))
    }

    fn parse_inner(
        raw: Arc<dyn ReadAt>,
        path: Option<&Path>,
        writable: Option<Writable>,
        strict_bat: bool,
    ) -> Result<VhdxFile> {
        let raw_size = raw
            .size()
            .map_err(|e| Error::io("cannot get the size of the VHDX file", e))?;
        let mut id = vec![0u8; 8 + 512];
        if raw_size < id.len() as u64 {
            return Err(corrupt(format!(
                "the file is only {raw_size} bytes, too short to be a VHDX file"
            )));
        }
        read_exact(&*raw, &mut id, 0, "file identifier")?;
        let file_id = FileIdentifier::parse(&id)?;
        if raw_size < HEADER_SECTION_SIZE {
            return Err(corrupt(format!(
                "the file is truncated: it is {raw_size} bytes, shorter than the 1 MiB header \
                 section every VHDX file starts with"
            )));
        }

        let (backing, writer, mut log_state) = match writable {
            Some(w) => (
                w.view,
                Some(w.state),
                if w.replayed {
                    LogState::ReplayedOnDisk
                } else {
                    LogState::Clean
                },
            ),
            None => (raw.clone(), None, LogState::Clean),
        };
        let mut problems = Vec::new();
        let choice = Self::read_headers(&*backing)?;
        problems.extend(choice.problems);
        let header = choice.header;
        let backing: Arc<dyn ReadAt> = if header.log_guid.is_zero() {
            backing
        } else if writer.is_some() {
            // The writer replays on disk and clears LogGuid before handing the view back.
            return Err(corrupt(
                "the log is still pending after the writable open replayed it",
            ));
        } else {
            log_state = LogState::ReplayedInMemory;
            problems.push(format!(
                "the log (LogGuid {}) has entries that were not yet applied (the file was not \
                 closed cleanly); a writable open replays them",
                header.log_guid
            ));
            crate::log::replay_in_memory(
                backing,
                header.log_guid,
                header.log_offset,
                header.log_length,
            )?
        };
        let file_size = backing
            .size()
            .map_err(|e| Error::io("cannot get the size of the VHDX file", e))?;

        // Region tables: both should be valid and identical; one good copy is enough to read.
        let mut tables = Vec::new();
        for (i, &off) in REGION_TABLE_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            let t = read_exact(&*backing, &mut b, off, "region table")
                .and_then(|_| RegionTable::parse(&b));
            if let Err(e) = &t {
                problems.push(format!(
                    "region table {} (at {} KiB) is invalid: {}",
                    i + 1,
                    off / KIB,
                    strip(e)
                ));
            }
            tables.push(t);
        }
        let table = match (&tables[0], &tables[1]) {
            (Ok(a), Ok(b)) => {
                if a != b {
                    problems.push("the two region tables differ".to_string());
                }
                a.clone()
            }
            (Ok(a), Err(_)) | (Err(_), Ok(a)) => a.clone(),
            (Err(a), Err(b)) => {
                return Err(corrupt(format!(
                    "both region tables are damaged (first: {}; second: {}); the file cannot \
                     be opened",
                    strip(a),
                    strip(b)
                )))
            }
        };
        let regions = table.regions()?;
        for (what, off, len) in [
            ("BAT", regions.bat_offset, regions.bat_length as u64),
            (
                "metadata region",
                regions.metadata_offset,
                regions.metadata_length as u64,
            ),
        ] {
            if off.saturating_add(len) > file_size {
                return Err(corrupt(format!(
                    "the {what} (offset {off}, length {len}) extends past the end of the file \
                     ({file_size} bytes): the file is truncated or damaged"
                )));
            }
            if header.log_length > 0
                && overlaps(off, len, header.log_offset, header.log_length as u64)
            {
                return Err(corrupt(format!("the {what} overlaps the log")));
            }
        }

        // Metadata.
        let mut mt = vec![0u8; METADATA_TABLE_SIZE];
        read_exact(
            &*backing,
            &mut mt,
            regions.metadata_offset,
            "metadata table",
        )?;
        let mtable = MetadataTable::parse(&mt, regions.metadata_length)?;
        let metadata = Metadata::parse(&mtable, |e| {
            let mut b = vec![0u8; e.length as usize];
            read_exact(
                &*backing,
                &mut b,
                regions.metadata_offset + e.offset as u64,
                "metadata item",
            )?;
            Ok(b)
        })?;
        let geo = BatGeometry::new(&metadata);

        // BAT: its region must hold every entry; the region lies inside the file, which bounds
        // the allocation by the file size.
        let need = geo.total_entries * 8;
        if need > regions.bat_length as u64 {
            return Err(corrupt(format!(
                "the BAT region ({} bytes) is too small for the {} entries a {}-byte disk with \
                 {}-byte blocks needs",
                regions.bat_length, geo.total_entries, geo.virtual_size, geo.block_size
            )));
        }
        let mut raw_bat = vec![0u8; need as usize];
        read_exact(&*backing, &mut raw_bat, regions.bat_offset, "BAT")?;
        let bat = parse_bat(&raw_bat);
        drop(raw_bat);

        let mut f = VhdxFile {
            path: path.map(Path::to_path_buf),
            raw,
            backing,
            file_id,
            header,
            header_slot: choice.slot,
            regions,
            metadata,
            geo,
            bat,
            file_size,
            log_state,
            problems,
            writer,
        };
        let (bat_problems, total) = if strict_bat {
            f.validate_bat()
        } else {
            (Vec::new(), 0)
        };
        if let Some(first) = bat_problems.first() {
            return Err(corrupt(if total > 1 {
                format!("{first} (and {} more BAT problems)", total - 1)
            } else {
                first.clone()
            }));
        }
        if let Some(st) = f.writer.as_mut() {
            st.configure(crate::write::Layout {
                virtual_size: f.geo.virtual_size,
                block_size: f.geo.block_size,
                logical_sector_size: f.geo.logical_sector_size,
                has_parent: f.geo.has_parent,
                leave_allocated: f.metadata.leave_block_allocated,
                bat_offset: f.regions.bat_offset,
                bat_entries: f.geo.total_entries,
            });
        }
        Ok(f)
    }

    fn read_headers(r: &dyn ReadAt) -> Result<HeaderChoice> {
        let mut h = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
        for (i, b) in h.iter_mut().enumerate() {
            // A truncated slot is just an invalid header; select_header reports it.
            if r.read_exact_at(b, HEADER_OFFSETS[i]).is_err() {
                b.fill(0);
            }
        }
        select_header([&h[0], &h[1]])
    }

    /// Every BAT entry checked against the disk type and the file layout. Returns the first
    /// problems (at most [`MAX_LISTED_PROBLEMS`]) and how many there are in all.
    pub(crate) fn validate_bat(&self) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut note = |s: String| {
            total += 1;
            if out.len() < MAX_LISTED_PROBLEMS {
                out.push(s);
            }
        };
        let bs = self.geo.block_size as u64;
        let reserved: [(&str, u64, u64); 4] = [
            ("header section", 0, HEADER_SECTION_SIZE),
            ("log", self.header.log_offset, self.header.log_length as u64),
            (
                "BAT",
                self.regions.bat_offset,
                self.regions.bat_length as u64,
            ),
            (
                "metadata region",
                self.regions.metadata_offset,
                self.regions.metadata_length as u64,
            ),
        ];
        for (i, &e) in self.bat.iter().enumerate() {
            let i = i as u64;
            let state = entry_state(e);
            let (present, len, what) = if self.geo.is_bitmap_index(i) {
                let c = i / (self.geo.chunk_ratio + 1);
                match state {
                    SB_NOT_PRESENT => (false, 0, String::new()),
                    SB_PRESENT => (true, MIB, format!("sector bitmap block of chunk {c}")),
                    s => {
                        note(format!(
                            "BAT entry {i} (sector bitmap of chunk {c}) has invalid state {s}"
                        ));
                        continue;
                    }
                }
            } else {
                let b = self.geo.block_of_index(i);
                match state {
                    PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED
                    | PAYLOAD_UNMAPPED_V1 => (false, 0, String::new()),
                    PAYLOAD_FULLY_PRESENT => (true, bs, format!("payload block {b}")),
                    PAYLOAD_PARTIALLY_PRESENT if self.geo.has_parent => {
                        (true, bs, format!("payload block {b}"))
                    }
                    PAYLOAD_PARTIALLY_PRESENT => {
                        note(format!(
                            "BAT entry {i} (payload block {b}) is PARTIALLY_PRESENT, which only \
                             a differencing disk may use"
                        ));
                        continue;
                    }
                    s => {
                        note(format!(
                            "BAT entry {i} (payload block {b}) has invalid state {s}"
                        ));
                        continue;
                    }
                }
            };
            if !present {
                continue;
            }
            let off = entry_offset(e);
            if off >= self.file_size {
                note(format!(
                    "BAT entry {i}: {what} at offset {off} lies entirely past the end of the \
                     file ({} bytes): the file is truncated or the BAT is damaged",
                    self.file_size
                ));
                continue;
            }
            for (name, ro, rl) in reserved {
                if overlaps(off, len, ro, rl) {
                    note(format!(
                        "BAT entry {i}: {what} at offset {off} overlaps the {name}"
                    ));
                }
            }
        }
        (out, total)
    }

    pub(crate) fn block_size(&self) -> u64 {
        self.geo.block_size as u64
    }

    pub(crate) fn has_parent(&self) -> bool {
        self.geo.has_parent
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.geo.virtual_size
    }

    pub(crate) fn payload_entry(&self, block: u64) -> u64 {
        self.bat[self.geo.payload_index(block)]
    }

    /// Read payload bytes at `file_offset`; bytes past the end of the file read as zeros (the
    /// BAT was validated to start every block inside it).
    pub(crate) fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        let avail = self.file_size.saturating_sub(file_offset);
        let n = (buf.len() as u64).min(avail) as usize;
        if n > 0 {
            self.backing
                .read_exact_at(&mut buf[..n], file_offset)
                .map_err(|e| {
                    Error::io(
                        format!(
                            "cannot read {} bytes of VHDX payload at file offset {file_offset}{}",
                            n,
                            self.path
                                .as_ref()
                                .map(|p| format!(" in {}", p.display()))
                                .unwrap_or_default()
                        ),
                        e,
                    )
                })?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Sector-bitmap bits of `block` for sectors `[first, first + count)` (in-block sector
    /// numbers), one bool per sector, `true` = the sector is in this file. A bitmap block that is
    /// not present means no sector of the chunk is here.
    pub(crate) fn sector_bits(&self, block: u64, first: u64, count: u64) -> Result<Vec<bool>> {
        let chunk = block / self.geo.chunk_ratio;
        let e = self.bat[self.geo.bitmap_index(chunk)];
        if entry_state(e) != SB_PRESENT {
            return Ok(vec![false; count as usize]);
        }
        let spb = self.geo.sectors_per_block();
        let bit0 = (block % self.geo.chunk_ratio) * spb + first;
        let byte0 = bit0 / 8;
        let byte1 = (bit0 + count).div_ceil(8);
        let mut bytes = vec![0u8; (byte1 - byte0) as usize];
        self.read_payload(&mut bytes, entry_offset(e) + byte0)?;
        Ok((0..count)
            .map(|k| {
                let bit = bit0 + k - byte0 * 8;
                bytes[(bit / 8) as usize] >> (bit % 8) & 1 != 0
            })
            .collect())
    }

    /// This layer's own map of `[offset, offset+len)` (inside the virtual size), pushed onto
    /// `out`: Data / Zero / Unallocated, and Inherited for ranges a differencing layer leaves
    /// to its parent.
    pub(crate) fn layer_map(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<vdisk_core::Extent>,
    ) -> Result<()> {
        let bs = self.block_size();
        let lss = self.geo.logical_sector_size as u64;
        let end = offset + len;
        let mut pos = offset;
        let diff = self.has_parent();
        while pos < end {
            let b = pos / bs;
            let in_block = pos % bs;
            let seg = (bs - in_block).min(end - pos);
            let e = self.payload_entry(b);
            let state = match entry_state(e) {
                PAYLOAD_FULLY_PRESENT => ExtentState::Data,
                PAYLOAD_NOT_PRESENT if diff => ExtentState::Inherited,
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED if !diff => ExtentState::Unallocated,
                PAYLOAD_PARTIALLY_PRESENT => {
                    let first = in_block / lss;
                    let last = (in_block + seg).div_ceil(lss);
                    let bits = self.sector_bits(b, first, last - first)?;
                    let block_start = b * bs;
                    for (k, &bit) in bits.iter().enumerate() {
                        let s0 = (block_start + (first + k as u64) * lss).max(pos);
                        let s1 = (block_start + (first + k as u64 + 1) * lss).min(pos + seg);
                        let st = if bit {
                            ExtentState::Data
                        } else {
                            ExtentState::Inherited
                        };
                        vdisk_core::disk::push_extent(out, s0, s1 - s0, st);
                    }
                    pos += seg;
                    continue;
                }
                // ZERO, UNMAPPED (both values) and UNDEFINED in a differencing layer: zeros
                // that hide the parent.
                _ => ExtentState::Zero,
            };
            vdisk_core::disk::push_extent(out, pos, seg, state);
            pos += seg;
        }
        Ok(())
    }

    /// Guest bytes this layer stores: fully present blocks (clipped to the virtual size) plus
    /// the present sectors of partially present blocks.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        let bs = self.block_size();
        let mut total = 0u64;
        for b in 0..self.geo.data_blocks {
            let e = self.payload_entry(b);
            let len = bs.min(self.virtual_size() - b * bs);
            match entry_state(e) {
                PAYLOAD_FULLY_PRESENT => total += len,
                PAYLOAD_PARTIALLY_PRESENT => {
                    let lss = self.geo.logical_sector_size as u64;
                    if let Ok(bits) = self.sector_bits(b, 0, len / lss) {
                        total += bits.iter().filter(|&&x| x).count() as u64 * lss;
                    }
                }
                _ => {}
            }
        }
        total
    }

    pub(crate) fn subformat(&self) -> vdisk_core::Subformat {
        if self.has_parent() {
            vdisk_core::Subformat::Differencing
        } else if self.metadata.leave_block_allocated {
            vdisk_core::Subformat::Fixed
        } else {
            vdisk_core::Subformat::Dynamic
        }
    }

    pub(crate) fn display_name(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<VHDX bytes>".to_string())
    }
}
