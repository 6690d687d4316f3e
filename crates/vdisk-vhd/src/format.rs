//! On-disk structures of the VHD format: the 512-byte footer, the 1024-byte dynamic disk header
//! with its parent locators, and the helpers around them (checksum, CHS geometry, time stamps).
//! Everything is big-endian. Parsing never trusts a field: callers validate what they use.

use vdisk_core::{Error, Guid, Result};

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: usize = 512;
pub const DYN_HEADER_SIZE: usize = 1024;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Footer and dynamic header format version 1.0.
pub const VERSION_1_0: u32 = 0x0001_0000;
/// Footer `features` bit that must always be set ("reserved").
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// A BAT entry for a block that is not stored in this file.
pub const BAT_ABSENT: u32 = 0xFFFF_FFFF;
/// Windows' practical limit, and qemu's: 2040 GiB.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Largest block we accept. The spec's default is 2 MiB; a bigger block only makes the sector
/// bitmap (read on every differencing access) bigger, and 256 MiB keeps it at 64 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most block table entries we hold in memory for one layer (16 MiB of table). A 2040 GiB disk
/// needs about a million with the usual 2 MiB blocks, four million with 512 KiB blocks; more
/// means tiny blocks on a huge disk, which no real writer makes. The file-size bound alone is not
/// enough: a hostile sparse file can be huge and cost nothing.
pub const MAX_BAT_ENTRIES: u64 = 1 << 22;
/// 65535 cylinders x 16 heads x 255 sectors: the largest CHS geometry. Readers (qemu among them)
/// take it as "the geometry says nothing, use CurrentSize".
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Seconds from 1970-01-01 to 2000-01-01, the VHD epoch.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

pub const FORMAT: &str = "vhd";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_u32(v: u32) -> Option<DiskType> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
    pub fn to_u32(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Guid::from_be_bytes(a)
}

/// The VHD checksum: one's complement of the byte sum, with the checksum field counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !(checksum_at..checksum_at + 4).contains(&i) {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

/// Display a 4-byte tag (creator app, host OS, platform code) readably.
pub fn tag_string(t: &[u8; 4]) -> String {
    t.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect::<String>()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: u32,
    pub checksum: u32,
    pub unique_id: Guid,
    pub saved_state: u8,
}

impl Footer {
    /// Parse a footer. Checks the cookie and checksum, nothing else.
    pub fn parse(b: &[u8]) -> Result<Footer> {
        if b.len() < FOOTER_SIZE {
            return Err(Error::corrupt(FORMAT, "footer is shorter than 512 bytes"));
        }
        if &b[0..8] != FOOTER_COOKIE {
            return Err(Error::corrupt(
                FORMAT,
                "no \"conectix\" footer cookie (not a VHD file, or the footer is damaged)",
            ));
        }
        let stored = be32(b, 64);
        let computed = checksum(&b[..FOOTER_SIZE], 64);
        if stored != computed {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                ),
            ));
        }
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: be32(b, 32),
            creator_os: [b[36], b[37], b[38], b[39]],
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: be16(b, 56),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type: be32(b, 60),
            checksum: stored,
            unique_id: guid_at(b, 68),
            saved_state: b[84],
        })
    }

    /// Serialize, computing the checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id.to_be_bytes());
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn chs_sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64
    }
}

/// One parent locator entry of the dynamic header.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Locator {
    pub platform_code: [u8; 4],
    /// As stored: sectors (the spec, Windows) or bytes (some writers). See [`Locator::space_bytes`].
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

pub const PLATFORM_W2RU: [u8; 4] = *b"W2ru";
pub const PLATFORM_W2KU: [u8; 4] = *b"W2ku";
pub const PLATFORM_WI2R: [u8; 4] = *b"Wi2r";
pub const PLATFORM_WI2K: [u8; 4] = *b"Wi2k";

impl Locator {
    pub fn is_empty(&self) -> bool {
        self.platform_code == [0; 4]
    }

    /// The bytes reserved for the locator data. The spec says DataSpace counts sectors, but some
    /// writers store bytes. A path of `len` bytes needs ceil(len/512) sectors, which is less than
    /// `len` for any real path, so a value at least as big as the length can only be bytes.
    pub fn space_bytes(&self) -> u64 {
        if self.data_space >= self.data_length && self.data_length > 1 {
            self.data_space as u64
        } else {
            self.data_space as u64 * SECTOR
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_unique_id: Guid,
    pub parent_timestamp: u32,
    /// Raw UTF-16BE bytes of the parent's name.
    pub parent_name: Vec<u8>,
    pub locators: [Locator; 8],
}

impl DynHeader {
    pub fn parse(b: &[u8]) -> Result<DynHeader> {
        if b.len() < DYN_HEADER_SIZE {
            return Err(Error::corrupt(
                FORMAT,
                "dynamic disk header is cut short (truncated file?)",
            ));
        }
        if &b[0..8] != DYN_COOKIE {
            return Err(Error::corrupt(
                FORMAT,
                "dynamic disk header has no \"cxsparse\" cookie (header damaged or data offset wrong)",
            ));
        }
        let stored = be32(b, 36);
        let computed = checksum(&b[..DYN_HEADER_SIZE], 36);
        if stored != computed {
            return Err(Error::corrupt(
                FORMAT,
                format!(
                    "dynamic disk header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                ),
            ));
        }
        let mut locators: [Locator; 8] = Default::default();
        for (i, l) in locators.iter_mut().enumerate() {
            let at = 576 + 24 * i;
            *l = Locator {
                platform_code: [b[at], b[at + 1], b[at + 2], b[at + 3]],
                data_space: be32(b, at + 4),
                data_length: be32(b, at + 8),
                data_offset: be64(b, at + 16),
            };
        }
        Ok(DynHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: stored,
            parent_unique_id: guid_at(b, 40),
            parent_timestamp: be32(b, 56),
            parent_name: b[64..576].to_vec(),
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_unique_id.to_be_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let n = self.parent_name.len().min(512);
        b[64..64 + n].copy_from_slice(&self.parent_name[..n]);
        for (i, l) in self.locators.iter().enumerate() {
            let at = 576 + 24 * i;
            b[at..at + 4].copy_from_slice(&l.platform_code);
            b[at + 4..at + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&l.data_length.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// The parent's name, decoded from UTF-16BE up to the first NUL.
    pub fn parent_name_string(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// Bytes of the sector bitmap in front of each block: one bit per sector, padded to a whole
/// sector.
pub fn bitmap_bytes(block_size: u32) -> u64 {
    let sectors = block_size as u64 / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// CHS geometry for a disk of `total_sectors`, by the algorithm in the VHD specification
/// (appendix "CHS Calculation"). Returns (cylinders, heads, sectors per track).
pub fn chs_for(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// Seconds since 2000-01-01 UTC for a system time (0 before the epoch, saturating after 2136).
pub fn vhd_timestamp(t: std::time::SystemTime) -> u32 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix.saturating_sub(VHD_EPOCH_UNIX).min(u32::MAX as u64) as u32
}

/// Encode a string as UTF-16LE (locator data).
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Encode a string as UTF-16BE (parent unicode name).
pub fn utf16be(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_be_bytes()).collect()
}

/// Decode locator data. `W2ru`/`W2ku` are UTF-16LE by the spec; the deprecated `Wi2r`/`Wi2k`
/// entries are seen both as UTF-16LE and as 8-bit text, so those are sniffed: 8-bit text has no
/// NUL bytes in its odd positions' partners the way UTF-16 ASCII paths do.
pub fn decode_locator(code: [u8; 4], data: &[u8]) -> String {
    let looks_utf16 = data.len() >= 2 && data.len().is_multiple_of(2) && data[1] == 0;
    if code == PLATFORM_W2RU || code == PLATFORM_W2KU || looks_utf16 {
        let units: Vec<u16> = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
        String::from_utf8_lossy(&data[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_qemu_for_10mib() {
        // qemu-img create -f vpc 10M stores 302/4/17 (it rounds the size up until the geometry
        // covers it; the spec's algorithm rounds down).
        assert_eq!(chs_for(20480), (301, 4, 17));
        assert_eq!(chs_for(20536), (302, 4, 17));
        assert_eq!(chs_for(u64::MAX), (65535, 16, 255));
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let f = Footer {
            features: FEATURES_RESERVED,
            version: VERSION_1_0,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"test",
            creator_version: 1,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            cylinders: 30,
            heads: 4,
            sectors_per_track: 17,
            disk_type: 3,
            checksum: 0,
            unique_id: Guid::new_random(),
            saved_state: 0,
        };
        let mut b = f.to_bytes();
        let g = Footer::parse(&b).unwrap();
        assert_eq!(g.unique_id, f.unique_id);
        assert_eq!(g.current_size, 1 << 20);
        b[100] ^= 1;
        let e = Footer::parse(&b).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn locator_space_units() {
        let mut l = Locator {
            platform_code: PLATFORM_W2RU,
            data_space: 1,
            data_length: 40,
            data_offset: 0,
        };
        assert_eq!(l.space_bytes(), 512);
        l.data_space = 512;
        assert_eq!(l.space_bytes(), 512);
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512), 512);
        assert_eq!(bitmap_bytes(32 << 20), 8192);
    }
}
