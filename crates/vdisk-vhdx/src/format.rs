//! The on-disk structures of MS-VHDX, each with a validating parser and a serializer.
//!
//! We wrote our own because no crate validates these structures strictly enough for hostile
//! files (CRC-32C of every header and table, ranges, alignment, required-item rules) while also
//! serializing them for our writer. Everything here works on byte slices; the file I/O is in
//! `reader.rs`.
//!
//! What lives here:
//! - [`FileIdentifier`]: the `vhdxfile` signature and creator string at offset 0.
//! - [`Header`]: the two 4 KiB headers at 64 KiB and 128 KiB (sequence number, FileWriteGuid,
//!   DataWriteGuid, LogGuid, log location); [`select_header`] picks the current one.
//! - [`RegionTable`] / [`RegionEntry`]: the two 64 KiB region tables at 192 KiB and 256 KiB that
//!   locate the BAT and the metadata region; [`Regions`] is the validated result.
//! - [`MetadataTable`] / [`MetadataEntry`]: the table at the start of the metadata region.
//! - [`Metadata`]: the parsed metadata items (file parameters, virtual disk size, page 83 id,
//!   sector sizes, [`ParentLocator`]), with [`Metadata::to_region_bytes`] for writers.
//! - [`BatGeometry`]: block counts, chunk ratio and BAT index arithmetic; [`parse_bat`] /
//!   [`serialize_bat`] and the entry helpers [`entry_state`], [`entry_offset`], [`make_entry`].

use vdisk_core::{Error, Guid, Result};

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;

pub(crate) const FILE_ID_SIZE: usize = 64 * 1024;
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(crate) const HEADER_SIZE: usize = 4096;
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(crate) const REGION_TABLE_SIZE: usize = 64 * 1024;
pub(crate) const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// The header section (identifier, headers, region tables) occupies the first MiB.
pub(crate) const HEADER_SECTION_SIZE: u64 = MIB;

pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub(crate) const MIN_BLOCK_SIZE: u32 = 1 << 20;
pub(crate) const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// MS-VHDX limits both tables to 2047 entries.
pub(crate) const MAX_TABLE_ENTRIES: u32 = 2047;
/// Known metadata items are tiny; a parent locator of more than this is not something any writer
/// produces, and we read items into memory.
pub(crate) const MAX_KNOWN_ITEM_LEN: u32 = 1 << 20;

const fn g(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
    Guid {
        data1,
        data2,
        data3,
        data4,
    }
}

pub(crate) const BAT_REGION_GUID: Guid = g(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(crate) const METADATA_REGION_GUID: Guid = g(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
pub(crate) const FILE_PARAMETERS_GUID: Guid = g(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(crate) const VIRTUAL_DISK_SIZE_GUID: Guid = g(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub(crate) const PAGE83_GUID: Guid = g(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(crate) const LOGICAL_SECTOR_SIZE_GUID: Guid = g(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub(crate) const PHYSICAL_SECTOR_SIZE_GUID: Guid = g(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub(crate) const PARENT_LOCATOR_GUID: Guid = g(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
pub(crate) const VHDX_LOCATOR_TYPE_GUID: Guid = g(
    0xB04AEFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Payload block states (BAT entry bits 0-2).
pub(crate) const PAYLOAD_NOT_PRESENT: u8 = 0;
pub(crate) const PAYLOAD_UNDEFINED: u8 = 1;
pub(crate) const PAYLOAD_ZERO: u8 = 2;
pub(crate) const PAYLOAD_UNMAPPED: u8 = 3;
/// The value older files (before the spec renumbered it) use for UNMAPPED.
pub(crate) const PAYLOAD_UNMAPPED_V1: u8 = 5;
pub(crate) const PAYLOAD_FULLY_PRESENT: u8 = 6;
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block states.
pub(crate) const SB_NOT_PRESENT: u8 = 0;
pub(crate) const SB_PRESENT: u8 = 6;

fn corrupt(detail: impl Into<String>) -> Error {
    Error::corrupt("vhdx", detail)
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn le_guid(b: &[u8], at: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Guid::from_le_bytes(a)
}

/// CRC-32C of `buf` as if the 4-byte checksum field at `checksum_at` were zero (how every VHDX
/// checksum is defined).
pub(crate) fn crc32c_zeroed(buf: &[u8], checksum_at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..checksum_at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[checksum_at + 4..])
}

/// Compute and store the checksum of a structure whose checksum field is at byte 4.
pub(crate) fn set_checksum(buf: &mut [u8]) {
    let crc = crc32c_zeroed(buf, 4);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn checksum_ok(buf: &[u8]) -> bool {
    le_u32(buf, 4) == crc32c_zeroed(buf, 4)
}

// ---------------------------------------------------------------------------------------------
// File identifier

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentifier {
    /// Free-form creator string (UTF-16LE on disk, up to 256 code units).
    pub(crate) creator: String,
}

impl FileIdentifier {
    pub(crate) fn parse(b: &[u8]) -> Result<FileIdentifier> {
        if b.len() < 8 + 512 || &b[..8] != b"vhdxfile" {
            return Err(corrupt(
                "no 'vhdxfile' signature at offset 0: this is not a VHDX file",
            ));
        }
        let units: Vec<u16> = b[8..8 + 512]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    /// The 64 KiB identifier structure.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; FILE_ID_SIZE];
        b[..8].copy_from_slice(b"vhdxfile");
        for (i, u) in self.creator.encode_utf16().take(255).enumerate() {
            b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        b
    }
}

/// True if `first_bytes` starts with the VHDX file identifier signature.
pub fn is_vhdx(first_bytes: &[u8]) -> bool {
    first_bytes.len() >= 8 && &first_bytes[..8] == b"vhdxfile"
}

// ---------------------------------------------------------------------------------------------
// Headers

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) sequence_number: u64,
    pub(crate) file_write_guid: Guid,
    pub(crate) data_write_guid: Guid,
    pub(crate) log_guid: Guid,
    pub(crate) log_version: u16,
    pub(crate) version: u16,
    pub(crate) log_length: u32,
    pub(crate) log_offset: u64,
}

impl Header {
    /// Parse and validate one 4 KiB header.
    pub(crate) fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE {
            return Err(corrupt("header is truncated"));
        }
        let b = &b[..HEADER_SIZE];
        if &b[..4] != b"head" {
            return Err(corrupt("header has no 'head' signature"));
        }
        if !checksum_ok(b) {
            return Err(corrupt("header checksum (CRC-32C) does not match"));
        }
        let h = Header {
            sequence_number: le_u64(b, 8),
            file_write_guid: le_guid(b, 16),
            data_write_guid: le_guid(b, 32),
            log_guid: le_guid(b, 48),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        };
        if h.version != 1 {
            return Err(Error::unsupported(
                "vhdx",
                format!("header version {} (only version 1 exists)", h.version),
            ));
        }
        if h.log_version != 0 {
            return Err(Error::unsupported(
                "vhdx",
                format!("log version {} (only version 0 exists)", h.log_version),
            ));
        }
        if !(h.log_length as u64).is_multiple_of(MIB) || !h.log_offset.is_multiple_of(MIB) {
            return Err(corrupt(format!(
                "log location (offset {}, length {}) is not 1 MiB aligned",
                h.log_offset, h.log_length
            )));
        }
        if h.log_length > 0 && h.log_offset < HEADER_SECTION_SIZE {
            return Err(corrupt(format!(
                "log at offset {} overlaps the header section",
                h.log_offset
            )));
        }
        if !h.log_guid.is_zero() && h.log_length == 0 {
            return Err(corrupt("header has a LogGuid but the log is empty"));
        }
        Ok(h)
    }

    /// The 4 KiB on-disk form, checksum included.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.to_le_bytes());
        b[32..48].copy_from_slice(&self.data_write_guid.to_le_bytes());
        b[48..64].copy_from_slice(&self.log_guid.to_le_bytes());
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut b);
        b
    }
}

/// The current header and what was wrong with the other one.
#[derive(Clone, Debug)]
pub(crate) struct HeaderChoice {
    pub(crate) header: Header,
    /// 0 for the header at 64 KiB, 1 for the one at 128 KiB.
    pub(crate) slot: usize,
    /// Problems with the headers that did not prevent opening (for `check`).
    pub(crate) problems: Vec<String>,
}

/// Pick the current header from the raw 4 KiB of both slots: the valid one with the higher
/// sequence number. Both damaged is fatal.
pub(crate) fn select_header(raw: [&[u8]; 2]) -> Result<HeaderChoice> {
    let parsed = [Header::parse(raw[0]), Header::parse(raw[1])];
    let mut problems = Vec::new();
    for (i, p) in parsed.iter().enumerate() {
        if let Err(e) = p {
            problems.push(format!(
                "header {} (at {} KiB) is invalid: {e}",
                i + 1,
                HEADER_OFFSETS[i] / KIB
            ));
        }
    }
    let (slot, header) = match (&parsed[0], &parsed[1]) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number == b.sequence_number && a != b {
                problems.push(format!(
                    "both headers have sequence number {} but differ",
                    a.sequence_number
                ));
            }
            if b.sequence_number > a.sequence_number {
                (1, b.clone())
            } else {
                (0, a.clone())
            }
        }
        (Ok(a), Err(_)) => (0, a.clone()),
        (Err(_), Ok(b)) => (1, b.clone()),
        (Err(e1), Err(e2)) => {
            // An unsupported version is more useful to report than "corrupt".
            for e in [e1, e2] {
                if let Error::Unsupported { detail, .. } = e {
                    return Err(Error::unsupported("vhdx", detail.clone()));
                }
            }
            return Err(corrupt(format!(
                "both headers are damaged (first: {}; second: {}); the file cannot be opened",
                strip(e1),
                strip(e2)
            )));
        }
    };
    Ok(HeaderChoice {
        header,
        slot,
        problems,
    })
}

/// The detail of a format error without its "corrupt vhdx file:" prefix, for nesting.
pub(crate) fn strip(e: &Error) -> String {
    match e {
        Error::Corrupt { detail, .. } | Error::Unsupported { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Region table

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegionEntry {
    pub(crate) guid: Guid,
    pub(crate) file_offset: u64,
    pub(crate) length: u32,
    pub(crate) required: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegionTable {
    pub(crate) entries: Vec<RegionEntry>,
}

/// Where the two known regions are, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Regions {
    pub(crate) bat_offset: u64,
    pub(crate) bat_length: u32,
    pub(crate) metadata_offset: u64,
    pub(crate) metadata_length: u32,
}

impl RegionTable {
    /// Parse and validate one 64 KiB region table (signature, checksum, entry count, alignment).
    pub(crate) fn parse(b: &[u8]) -> Result<RegionTable> {
        if b.len() < REGION_TABLE_SIZE {
            return Err(corrupt("region table is truncated"));
        }
        let b = &b[..REGION_TABLE_SIZE];
        if &b[..4] != b"regi" {
            return Err(corrupt("region table has no 'regi' signature"));
        }
        if !checksum_ok(b) {
            return Err(corrupt("region table checksum (CRC-32C) does not match"));
        }
        let count = le_u32(b, 8);
        if count > MAX_TABLE_ENTRIES {
            return Err(corrupt(format!(
                "region table claims {count} entries (at most {MAX_TABLE_ENTRIES} allowed)"
            )));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = 16 + 32 * i;
            let e = RegionEntry {
                guid: le_guid(b, at),
                file_offset: le_u64(b, at + 16),
                length: le_u32(b, at + 24),
                required: le_u32(b, at + 28) & 1 != 0,
            };
            if !e.file_offset.is_multiple_of(MIB) || !(e.length as u64).is_multiple_of(MIB) {
                return Err(corrupt(format!(
                    "region {} (offset {}, length {}) is not 1 MiB aligned",
                    e.guid, e.file_offset, e.length
                )));
            }
            if e.file_offset < HEADER_SECTION_SIZE {
                return Err(corrupt(format!(
                    "region {} at offset {} overlaps the header section",
                    e.guid, e.file_offset
                )));
            }
            if entries.iter().any(|x: &RegionEntry| x.guid == e.guid) {
                return Err(corrupt(format!("region {} is listed twice", e.guid)));
            }
            entries.push(e);
        }
        Ok(RegionTable { entries })
    }

    /// The 64 KiB on-disk form, checksum included.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = 16 + 32 * i;
            b[at..at + 16].copy_from_slice(&e.guid.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&(e.required as u32).to_le_bytes());
        }
        set_checksum(&mut b);
        b
    }

    /// A table with just the BAT and metadata regions, both required (what writers produce).
    pub(crate) fn standard(r: &Regions) -> RegionTable {
        RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_REGION_GUID,
                    file_offset: r.bat_offset,
                    length: r.bat_length,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_REGION_GUID,
                    file_offset: r.metadata_offset,
                    length: r.metadata_length,
                    required: true,
                },
            ],
        }
    }

    /// Find the BAT and metadata regions; refuse unknown required regions and overlaps.
    pub(crate) fn regions(&self) -> Result<Regions> {
        let mut bat = None;
        let mut meta = None;
        for e in &self.entries {
            if e.guid == BAT_REGION_GUID {
                bat = Some(e);
            } else if e.guid == METADATA_REGION_GUID {
                meta = Some(e);
            } else if e.required {
                return Err(Error::unsupported(
                    "vhdx",
                    format!(
                        "the file has a region {} marked required that this program does not \
                         know; it cannot be read safely",
                        e.guid
                    ),
                ));
            }
        }
        let bat = bat.ok_or_else(|| corrupt("region table has no BAT region"))?;
        let meta = meta.ok_or_else(|| corrupt("region table has no metadata region"))?;
        if meta.length < METADATA_TABLE_SIZE as u32 {
            return Err(corrupt(format!(
                "metadata region is {} bytes, too small for its 64 KiB table",
                meta.length
            )));
        }
        if bat.length == 0 {
            return Err(corrupt("BAT region is empty"));
        }
        for (i, a) in self.entries.iter().enumerate() {
            for b in &self.entries[i + 1..] {
                if overlaps(
                    a.file_offset,
                    a.length as u64,
                    b.file_offset,
                    b.length as u64,
                ) {
                    return Err(corrupt(format!(
                        "regions {} and {} overlap",
                        a.guid, b.guid
                    )));
                }
            }
        }
        Ok(Regions {
            bat_offset: bat.file_offset,
            bat_length: bat.length,
            metadata_offset: meta.file_offset,
            metadata_length: meta.length,
        })
    }
}

/// Do `[a, a+alen)` and `[b, b+blen)` intersect? Saturating, so hostile values cannot overflow.
pub(crate) fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

// ---------------------------------------------------------------------------------------------
// Metadata table

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MetadataEntry {
    pub(crate) item_id: Guid,
    /// Offset of the item from the start of the metadata region.
    pub(crate) offset: u32,
    pub(crate) length: u32,
    pub(crate) is_user: bool,
    pub(crate) is_virtual_disk: bool,
    pub(crate) is_required: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MetadataTable {
    pub(crate) entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parse the 64 KiB table at the start of a metadata region of `region_length` bytes.
    pub(crate) fn parse(b: &[u8], region_length: u32) -> Result<MetadataTable> {
        if b.len() < METADATA_TABLE_SIZE {
            return Err(corrupt("metadata table is truncated"));
        }
        if &b[..8] != b"metadata" {
            return Err(corrupt("metadata region has no 'metadata' signature"));
        }
        let count = le_u16(b, 10) as u32;
        if count > MAX_TABLE_ENTRIES {
            return Err(corrupt(format!(
                "metadata table claims {count} entries (at most {MAX_TABLE_ENTRIES} allowed)"
            )));
        }
        let mut entries: Vec<MetadataEntry> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = 32 + 32 * i;
            let flags = le_u32(b, at + 24);
            let e = MetadataEntry {
                item_id: le_guid(b, at),
                offset: le_u32(b, at + 16),
                length: le_u32(b, at + 20),
                is_user: flags & 1 != 0,
                is_virtual_disk: flags & 2 != 0,
                is_required: flags & 4 != 0,
            };
            if e.length == 0 {
                if e.offset != 0 {
                    return Err(corrupt(format!(
                        "metadata item {} has length 0 but offset {}",
                        e.item_id, e.offset
                    )));
                }
            } else if e.offset < METADATA_TABLE_SIZE as u32
                || e.offset as u64 + e.length as u64 > region_length as u64
            {
                return Err(corrupt(format!(
                    "metadata item {} (offset {}, length {}) lies outside the metadata region \
                     ({} bytes, items start at 64 KiB)",
                    e.item_id, e.offset, e.length, region_length
                )));
            }
            if entries
                .iter()
                .any(|x| x.item_id == e.item_id && x.is_user == e.is_user)
            {
                return Err(corrupt(format!(
                    "metadata item {} is listed twice",
                    e.item_id
                )));
            }
            entries.push(e);
        }
        Ok(MetadataTable { entries })
    }

    /// The 64 KiB table.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; METADATA_TABLE_SIZE];
        b[..8].copy_from_slice(b"metadata");
        b[10..12].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = 32 + 32 * i;
            b[at..at + 16].copy_from_slice(&e.item_id.to_le_bytes());
            b[at + 16..at + 20].copy_from_slice(&e.offset.to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&e.length.to_le_bytes());
            let flags =
                (e.is_user as u32) | (e.is_virtual_disk as u32) << 1 | (e.is_required as u32) << 2;
            b[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
        }
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Parent locator

/// The VHDX parent locator: UTF-16LE key/value pairs (`parent_linkage`, `parent_linkage2`,
/// `relative_path`, `volume_path`, `absolute_win32_path`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParentLocator {
    pub(crate) entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A GUID-valued entry (`parent_linkage`); a present but malformed value is corruption.
    pub(crate) fn get_guid(&self, key: &str) -> Result<Option<Guid>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<Guid>()
                .map(Some)
                .map_err(|_| corrupt(format!("parent locator entry {key} is not a GUID: {v:?}"))),
        }
    }

    pub(crate) fn parse(b: &[u8]) -> Result<ParentLocator> {
        if b.len() < 20 {
            return Err(corrupt("parent locator is shorter than its 20-byte header"));
        }
        let ty = le_guid(b, 0);
        if ty != VHDX_LOCATOR_TYPE_GUID {
            return Err(Error::unsupported(
                "vhdx",
                format!("parent locator of unknown type {ty}"),
            ));
        }
        let count = le_u16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(corrupt(format!(
                "parent locator claims {count} entries but is only {} bytes",
                b.len()
            )));
        }
        let text = |off: u32, len: u16, what: &str| -> Result<String> {
            let (off, len) = (off as usize, len as usize);
            if !len.is_multiple_of(2) || off + len > b.len() {
                return Err(corrupt(format!(
                    "parent locator {what} (offset {off}, length {len}) lies outside the locator"
                )));
            }
            let units: Vec<u16> = b[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .map_err(|_| corrupt(format!("parent locator {what} is not valid UTF-16")))
        };
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + 12 * i;
            let key = text(le_u32(b, at), le_u16(b, at + 8), "key")?;
            let value = text(le_u32(b, at + 4), le_u16(b, at + 10), "value")?;
            if key.is_empty() {
                return Err(corrupt("parent locator has an empty key"));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        b[..16].copy_from_slice(&VHDX_LOCATOR_TYPE_GUID.to_le_bytes());
        b[18..20].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str| -> (u32, u16) {
                let off = b.len() as u32;
                for u in s.encode_utf16() {
                    b.extend_from_slice(&u.to_le_bytes());
                }
                (off, (b.len() as u32 - off) as u16)
            };
            let (ko, kl) = put(k);
            let (vo, vl) = put(v);
            let at = 20 + 12 * i;
            b[at..at + 4].copy_from_slice(&ko.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&vo.to_le_bytes());
            b[at + 8..at + 10].copy_from_slice(&kl.to_le_bytes());
            b[at + 10..at + 12].copy_from_slice(&vl.to_le_bytes());
        }
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata items

/// The parsed, validated metadata of one VHDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Metadata {
    pub(crate) block_size: u32,
    pub(crate) leave_block_allocated: bool,
    pub(crate) has_parent: bool,
    pub(crate) virtual_size: u64,
    pub(crate) page83: Guid,
    pub(crate) logical_sector_size: u32,
    pub(crate) physical_sector_size: u32,
    pub(crate) parent_locator: Option<ParentLocator>,
}

/// The metadata items this implementation understands (the spec's system metadata); an unknown
/// item flagged required makes the file unreadable here.
pub(crate) const KNOWN_METADATA: [Guid; 6] = [
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    PAGE83_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
    PARENT_LOCATOR_GUID,
];

impl Metadata {
    /// Parse the items of `table`; `item(entry)` returns an item's bytes (the caller reads them
    /// from the file, `entry.length` is already bounded by the region).
    pub(crate) fn parse(
        table: &MetadataTable,
        mut item: impl FnMut(&MetadataEntry) -> Result<Vec<u8>>,
    ) -> Result<Metadata> {
        let known = KNOWN_METADATA;
        let mut read = |id: Guid, min: u32| -> Result<Option<Vec<u8>>> {
            let Some(e) = table.entries.iter().find(|e| e.item_id == id && !e.is_user) else {
                return Ok(None);
            };
            if e.length < min || e.length > MAX_KNOWN_ITEM_LEN {
                return Err(corrupt(format!(
                    "metadata item {id} has length {} (expected at least {min})",
                    e.length
                )));
            }
            item(e).map(Some)
        };
        for e in &table.entries {
            if e.is_required && (e.is_user || !known.contains(&e.item_id)) {
                return Err(Error::unsupported(
                    "vhdx",
                    format!(
                        "the file has a metadata item {} marked required that this program \
                         does not know; it cannot be read safely",
                        e.item_id
                    ),
                ));
            }
        }
        let fp = read(FILE_PARAMETERS_GUID, 8)?
            .ok_or_else(|| corrupt("metadata has no file parameters item"))?;
        let block_size = le_u32(&fp, 0);
        let flags = le_u32(&fp, 4);
        let vs = read(VIRTUAL_DISK_SIZE_GUID, 8)?
            .ok_or_else(|| corrupt("metadata has no virtual disk size item"))?;
        let virtual_size = le_u64(&vs, 0);
        let lss = read(LOGICAL_SECTOR_SIZE_GUID, 4)?
            .ok_or_else(|| corrupt("metadata has no logical sector size item"))?;
        let logical_sector_size = le_u32(&lss, 0);
        // Physical sector size and page 83 id do not affect reading; tolerate their absence.
        let physical_sector_size = match read(PHYSICAL_SECTOR_SIZE_GUID, 4)? {
            Some(b) => le_u32(&b, 0),
            None => logical_sector_size,
        };
        let page83 = match read(PAGE83_GUID, 16)? {
            Some(b) => le_guid(&b, 0),
            None => Guid::ZERO,
        };
        let has_parent = flags & 2 != 0;
        let parent_locator = match read(PARENT_LOCATOR_GUID, 20)? {
            Some(b) => Some(ParentLocator::parse(&b)?),
            None => None,
        };
        let m = Metadata {
            block_size,
            leave_block_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            page83,
            logical_sector_size,
            physical_sector_size,
            parent_locator,
        };
        m.validate()?;
        Ok(m)
    }

    /// The rules MS-VHDX puts on the item values.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(corrupt(format!(
                "block size {} is not a power of two between 1 MiB and 256 MiB",
                self.block_size
            )));
        }
        if !matches!(self.logical_sector_size, 512 | 4096) {
            return Err(corrupt(format!(
                "logical sector size {} is neither 512 nor 4096",
                self.logical_sector_size
            )));
        }
        if !matches!(self.physical_sector_size, 512 | 4096) {
            return Err(corrupt(format!(
                "physical sector size {} is neither 512 nor 4096",
                self.physical_sector_size
            )));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!(
                "virtual disk size {} is larger than the 64 TiB VHDX maximum",
                self.virtual_size
            )));
        }
        if !self
            .virtual_size
            .is_multiple_of(self.logical_sector_size as u64)
        {
            return Err(corrupt(format!(
                "virtual disk size {} is not a multiple of the logical sector size {}",
                self.virtual_size, self.logical_sector_size
            )));
        }
        if self.has_parent && self.parent_locator.is_none() {
            return Err(corrupt(
                "the file is a differencing disk (HasParent) but has no parent locator",
            ));
        }
        Ok(())
    }

    /// The whole metadata region (`region_length` bytes, at least 64 KiB + items): the table
    /// followed by the items, each at a 4 KiB-aligned offset from 64 KiB on.
    pub(crate) fn to_region_bytes(&self, region_length: u32) -> Result<Vec<u8>> {
        let mut items: Vec<(Guid, bool, Vec<u8>)> = Vec::new();
        let flags = (self.leave_block_allocated as u32) | (self.has_parent as u32) << 1;
        let mut fp = self.block_size.to_le_bytes().to_vec();
        fp.extend_from_slice(&flags.to_le_bytes());
        items.push((FILE_PARAMETERS_GUID, false, fp));
        items.push((
            VIRTUAL_DISK_SIZE_GUID,
            true,
            self.virtual_size.to_le_bytes().to_vec(),
        ));
        items.push((PAGE83_GUID, true, self.page83.to_le_bytes().to_vec()));
        items.push((
            LOGICAL_SECTOR_SIZE_GUID,
            true,
            self.logical_sector_size.to_le_bytes().to_vec(),
        ));
        items.push((
            PHYSICAL_SECTOR_SIZE_GUID,
            true,
            self.physical_sector_size.to_le_bytes().to_vec(),
        ));
        if let Some(pl) = &self.parent_locator {
            items.push((PARENT_LOCATOR_GUID, false, pl.to_bytes()));
        }
        let mut region = vec![0u8; METADATA_TABLE_SIZE];
        let mut table = MetadataTable {
            entries: Vec::new(),
        };
        for (id, vd, bytes) in items {
            let offset = region.len() as u32;
            region.extend_from_slice(&bytes);
            region.resize(region.len().next_multiple_of(4096), 0);
            table.entries.push(MetadataEntry {
                item_id: id,
                offset,
                length: bytes.len() as u32,
                is_user: false,
                is_virtual_disk: vd,
                is_required: true,
            });
        }
        if region.len() > region_length as usize {
            return Err(Error::InvalidArgument(format!(
                "VHDX metadata needs {} bytes but the region is {region_length}",
                region.len()
            )));
        }
        region.resize(region_length as usize, 0);
        region[..METADATA_TABLE_SIZE].copy_from_slice(&table.to_bytes());
        Ok(region)
    }
}

// ---------------------------------------------------------------------------------------------
// BAT

/// Block counts and BAT index arithmetic, derived from the metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatGeometry {
    pub(crate) block_size: u32,
    pub(crate) logical_sector_size: u32,
    pub(crate) virtual_size: u64,
    pub(crate) has_parent: bool,
    /// Payload blocks per sector bitmap block (each bitmap block covers 2^23 sectors).
    pub(crate) chunk_ratio: u64,
    pub(crate) data_blocks: u64,
    pub(crate) bitmap_blocks: u64,
    pub(crate) total_entries: u64,
}

impl BatGeometry {
    pub(crate) fn new(m: &Metadata) -> BatGeometry {
        BatGeometry::from_params(
            m.block_size,
            m.logical_sector_size,
            m.virtual_size,
            m.has_parent,
        )
    }

    /// `block_size` and `logical_sector_size` must already be validated (powers of two in
    /// range), which keeps the ratio a positive integer.
    pub(crate) fn from_params(
        block_size: u32,
        logical_sector_size: u32,
        virtual_size: u64,
        has_parent: bool,
    ) -> BatGeometry {
        let chunk_ratio = ((1u64 << 23) * logical_sector_size as u64) / block_size as u64;
        let data_blocks = virtual_size.div_ceil(block_size as u64);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let total_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        BatGeometry {
            block_size,
            logical_sector_size,
            virtual_size,
            has_parent,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            total_entries,
        }
    }

    /// BAT index of payload block `b`.
    pub(crate) fn payload_index(&self, b: u64) -> usize {
        (b + b / self.chunk_ratio) as usize
    }

    /// BAT index of the sector bitmap block of chunk `c`.
    pub(crate) fn bitmap_index(&self, c: u64) -> usize {
        (c * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    /// True if BAT index `i` holds a sector bitmap entry rather than a payload entry.
    pub(crate) fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// The BAT index -> payload block number, for payload indexes.
    pub(crate) fn block_of_index(&self, i: u64) -> u64 {
        i - i / (self.chunk_ratio + 1)
    }

    pub(crate) fn sectors_per_block(&self) -> u64 {
        self.block_size as u64 / self.logical_sector_size as u64
    }

    /// Bytes the BAT occupies on disk (entries * 8, rounded up to 1 MiB as regions are).
    pub(crate) fn bat_bytes(&self) -> u64 {
        (self.total_entries * 8).next_multiple_of(MIB)
    }
}

pub(crate) fn entry_state(e: u64) -> u8 {
    (e & 7) as u8
}

/// File offset of the block an entry points at (bits 20-63 are the offset in MiB).
pub(crate) fn entry_offset(e: u64) -> u64 {
    e & !(MIB - 1)
}

#[allow(dead_code)] // for writers
pub(crate) fn make_entry(state: u8, file_offset: u64) -> u64 {
    debug_assert!(file_offset.is_multiple_of(MIB));
    (file_offset & !(MIB - 1)) | state as u64
}

pub(crate) fn parse_bat(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

#[allow(dead_code)] // for writers
pub(crate) fn serialize_bat(entries: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        b.extend_from_slice(&e.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Guid::new_random(),
            data_write_guid: Guid::new_random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn header_selection_prefers_higher_sequence_and_survives_one_damaged() {
        let mut h = Header {
            sequence_number: 1,
            file_write_guid: Guid::new_random(),
            data_write_guid: Guid::new_random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let a = h.to_bytes();
        h.sequence_number = 2;
        let b = h.to_bytes();
        let c = select_header([&a, &b]).unwrap();
        assert_eq!((c.slot, c.header.sequence_number), (1, 2));
        assert!(c.problems.is_empty());
        let mut bad = b.clone();
        bad[0] = b'x';
        let c = select_header([&a, &bad]).unwrap();
        assert_eq!(c.slot, 0);
        assert_eq!(c.problems.len(), 1);
        let e = select_header([&bad, &bad]).unwrap_err().to_string();
        assert!(e.contains("both headers are damaged"), "{e}");
    }

    #[test]
    fn region_table_round_trip_and_unknown_required() {
        let r = Regions {
            bat_offset: 3 * MIB,
            bat_length: MIB as u32,
            metadata_offset: 2 * MIB,
            metadata_length: MIB as u32,
        };
        let mut t = RegionTable::standard(&r);
        let parsed = RegionTable::parse(&t.to_bytes()).unwrap();
        assert_eq!(parsed.regions().unwrap(), r);
        t.entries.push(RegionEntry {
            guid: Guid::new_random(),
            file_offset: 10 * MIB,
            length: MIB as u32,
            required: true,
        });
        let e = RegionTable::parse(&t.to_bytes())
            .unwrap()
            .regions()
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        t.entries.pop();
        t.entries[0].file_offset = 2 * MIB;
        let e = RegionTable::parse(&t.to_bytes())
            .unwrap()
            .regions()
            .unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn metadata_round_trip_with_locator() {
        let m = Metadata {
            block_size: 32 << 20,
            leave_block_allocated: false,
            has_parent: true,
            virtual_size: 10 << 30,
            page83: Guid::new_random(),
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent_locator: Some(ParentLocator {
                entries: vec![
                    ("parent_linkage".into(), format!("{:?}", Guid::new_random())),
                    ("relative_path".into(), r".\base.vhdx".into()),
                ],
            }),
        };
        let region = m.to_region_bytes(MIB as u32).unwrap();
        let t = MetadataTable::parse(&region, MIB as u32).unwrap();
        let back = Metadata::parse(&t, |e| {
            Ok(region[e.offset as usize..(e.offset + e.length) as usize].to_vec())
        })
        .unwrap();
        assert_eq!(back, m);
        let pl = back.parent_locator.unwrap();
        assert!(pl.get_guid("parent_linkage").unwrap().is_some());
        assert_eq!(pl.get("relative_path"), Some(r".\base.vhdx"));
    }

    #[test]
    fn metadata_rejects_bad_values() {
        let mut m = Metadata {
            block_size: 3 << 20,
            leave_block_allocated: false,
            has_parent: false,
            virtual_size: 1 << 30,
            page83: Guid::ZERO,
            logical_sector_size: 512,
            physical_sector_size: 512,
            parent_locator: None,
        };
        assert!(m.validate().unwrap_err().to_string().contains("block size"));
        m.block_size = 1 << 20;
        m.virtual_size = 65 << 40;
        assert!(m.validate().unwrap_err().to_string().contains("64 TiB"));
        m.virtual_size = 1000;
        assert!(m.validate().unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn bat_geometry_matches_spec_examples() {
        // 512-byte sectors, 32 MiB blocks: 2^23*512/2^25 = 128 blocks per chunk.
        let g = BatGeometry::from_params(32 << 20, 512, 10 << 30, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.total_entries, 320 + 319 / 128);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert!(g.is_bitmap_index(128));
        assert_eq!(g.block_of_index(129), 128);
        let d = BatGeometry::from_params(1 << 20, 4096, 1 << 30, true);
        assert_eq!(d.chunk_ratio, 1 << 15);
        assert_eq!(d.total_entries, (1 << 15) + 1);
        assert_eq!(entry_offset(make_entry(6, 5 * MIB)), 5 * MIB);
        assert_eq!(entry_state(make_entry(6, 5 * MIB)), 6);
    }
}
