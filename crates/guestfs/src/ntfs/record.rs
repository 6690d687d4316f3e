//! MFT file records and index records: update-sequence fixups, record headers, attributes.

use super::runlist::{self, Run};

pub const AT_STANDARD_INFORMATION: u32 = 0x10;
pub const AT_ATTRIBUTE_LIST: u32 = 0x20;
pub const AT_FILE_NAME: u32 = 0x30;
pub const AT_DATA: u32 = 0x80;
pub const AT_INDEX_ROOT: u32 = 0x90;
pub const AT_INDEX_ALLOCATION: u32 = 0xA0;
pub const AT_BITMAP: u32 = 0xB0;
pub const AT_REPARSE_POINT: u32 = 0xC0;
pub const AT_VOLUME_NAME: u32 = 0x60;
const AT_END: u32 = 0xFFFF_FFFF;

pub const ATTR_COMPRESSED: u16 = 0x0001;
pub const ATTR_ENCRYPTED: u16 = 0x4000;
pub const ATTR_SPARSE: u16 = 0x8000;

/// Every 512-byte block of a multi-sector record ends with the update sequence number; the real
/// two bytes are kept in the update sequence array. A torn write leaves a mismatch: we refuse the
/// record instead of reading half-old data.
pub fn apply_fixups(buf: &mut [u8], signature: &[u8; 4]) -> Result<(), String> {
    if buf.len() < 48 || &buf[0..4] != signature {
        return Err(format!(
            "no {} signature",
            String::from_utf8_lossy(signature)
        ));
    }
    let usa_ofs = u16::from_le_bytes([buf[4], buf[5]]) as usize;
    let usa_count = u16::from_le_bytes([buf[6], buf[7]]) as usize;
    let blocks = buf.len() / 512;
    if usa_count != blocks + 1
        || usa_ofs + 2 * usa_count > buf.len()
        || usa_ofs < 8
        || !usa_ofs.is_multiple_of(2)
    {
        return Err(format!(
            "update sequence array (offset {usa_ofs}, {usa_count} entries) does not fit a {}-byte record",
            buf.len()
        ));
    }
    let usn = [buf[usa_ofs], buf[usa_ofs + 1]];
    for i in 0..blocks {
        let end = (i + 1) * 512 - 2;
        if buf[end..end + 2] != usn {
            return Err(format!(
                "update sequence mismatch in sector {i} (torn or damaged write)"
            ));
        }
        let fix = usa_ofs + 2 + 2 * i;
        buf[end] = buf[fix];
        buf[end + 1] = buf[fix + 1];
    }
    Ok(())
}

pub fn le16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
pub fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
pub fn le64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// UTF-16LE to UTF-8; the flag says an unpaired surrogate was replaced.
pub fn utf16(b: &[u8]) -> (String, bool) {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let mut lossy = false;
    let s = char::decode_utf16(units)
        .map(|r| {
            r.unwrap_or_else(|_| {
                lossy = true;
                '\u{FFFD}'
            })
        })
        .collect();
    (s, lossy)
}

#[derive(Clone, Debug)]
pub enum Body {
    Resident(Vec<u8>),
    NonResident(NonResident),
}

#[derive(Clone, Debug)]
pub struct NonResident {
    pub start_vcn: u64,
    pub runs: Vec<Run>,
    pub compression_unit: u8,
    pub alloc_size: u64,
    pub data_size: u64,
    pub init_size: u64,
    pub total_alloc: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Attr {
    pub ty: u32,
    pub name: String,
    pub flags: u16,
    pub body: Body,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u16,
    pub flags: u16,
    pub base: u64,
    pub attrs: Vec<Attr>,
}

pub const RECORD_IN_USE: u16 = 0x0001;
pub const RECORD_IS_DIRECTORY: u16 = 0x0002;

/// Parse a file record whose fixups are applied. `total_clusters` bounds every run.
pub fn parse_record(buf: &[u8], total_clusters: u64) -> Result<Record, String> {
    let seq = le16(buf, 0x10).unwrap_or(0);
    let first = le16(buf, 0x14).unwrap_or(0) as usize;
    let flags = le16(buf, 0x16).unwrap_or(0);
    let used = le32(buf, 0x18).unwrap_or(0) as usize;
    let base = le64(buf, 0x20).unwrap_or(0) & 0x0000_FFFF_FFFF_FFFF;
    if used > buf.len() || first < 0x2A || first >= used {
        return Err(format!(
            "header claims {used} bytes used / first attribute at {first} in a {}-byte record",
            buf.len()
        ));
    }
    let mut attrs = Vec::new();
    let mut pos = first;
    loop {
        let ty = le32(buf, pos).ok_or("attribute runs past the record end")?;
        if ty == AT_END {
            break;
        }
        let len = le32(buf, pos + 4).ok_or("attribute header truncated")? as usize;
        if len < 0x18 || !len.is_multiple_of(8) || pos + len > used {
            return Err(format!(
                "attribute type {ty:#x} at offset {pos} has impossible length {len}"
            ));
        }
        let a = &buf[pos..pos + len];
        attrs.push(
            parse_attr(a, total_clusters)
                .map_err(|e| format!("attribute {ty:#x} at offset {pos}: {e}"))?,
        );
        pos += len;
    }
    Ok(Record {
        seq,
        flags,
        base,
        attrs,
    })
}

fn parse_attr(a: &[u8], total_clusters: u64) -> Result<Attr, String> {
    let ty = le32(a, 0).unwrap_or(0);
    let non_resident = a[8] != 0;
    let name_len = a[9] as usize;
    let name_off = le16(a, 0x0A).unwrap_or(0) as usize;
    let flags = le16(a, 0x0C).unwrap_or(0);
    let name = if name_len == 0 {
        String::new()
    } else {
        let raw = a
            .get(name_off..name_off + 2 * name_len)
            .ok_or("name outside the attribute")?;
        utf16(raw).0
    };
    let body = if !non_resident {
        let vlen = le32(a, 0x10).unwrap_or(0) as usize;
        let voff = le16(a, 0x14).unwrap_or(0) as usize;
        let v = a
            .get(voff..voff.checked_add(vlen).ok_or("value length overflows")?)
            .ok_or_else(|| {
                format!("resident value ({vlen} bytes at {voff}) outside the attribute")
            })?;
        Body::Resident(v.to_vec())
    } else {
        if a.len() < 0x40 {
            return Err("non-resident header truncated".into());
        }
        let start_vcn = le64(a, 0x10).unwrap_or(0);
        let last_vcn = le64(a, 0x18).unwrap_or(0);
        let rl_off = le16(a, 0x20).unwrap_or(0) as usize;
        let compression_unit = le16(a, 0x22).unwrap_or(0);
        let alloc_size = le64(a, 0x28).unwrap_or(0);
        let data_size = le64(a, 0x30).unwrap_or(0);
        let init_size = le64(a, 0x38).unwrap_or(0);
        let total_alloc =
            if flags & (ATTR_COMPRESSED | ATTR_SPARSE) != 0 && start_vcn == 0 && rl_off >= 0x48 {
                le64(a, 0x40)
            } else {
                None
            };
        if compression_unit > 16 {
            return Err(format!(
                "compression unit 2^{compression_unit} clusters is absurd"
            ));
        }
        let rl = a
            .get(rl_off..)
            .ok_or("runlist offset outside the attribute")?;
        if rl_off < 0x40 {
            return Err("runlist offset inside the header".into());
        }
        let runs = runlist::decode(rl, start_vcn, total_clusters)?;
        let end_vcn = runs.last().map(|r| r.vcn + r.len).unwrap_or(start_vcn);
        // An empty attribute has last_vcn = -1 (u64::MAX) or a single empty extent.
        let expected_end = last_vcn.wrapping_add(1);
        if end_vcn != expected_end
            && !(runs.is_empty() && (last_vcn == u64::MAX || last_vcn < start_vcn))
        {
            return Err(format!(
                "runlist covers VCNs {start_vcn}..{end_vcn} but the header says {start_vcn}..={last_vcn}"
            ));
        }
        Body::NonResident(NonResident {
            start_vcn,
            runs,
            compression_unit: compression_unit as u8,
            alloc_size,
            data_size,
            init_size: init_size.min(data_size),
            total_alloc,
        })
    };
    Ok(Attr {
        ty,
        name,
        flags,
        body,
    })
}

/// One entry of an `$ATTRIBUTE_LIST`.
#[derive(Clone, Debug)]
pub struct ListEntry {
    pub ty: u32,
    pub name: String,
    pub start_vcn: u64,
    pub record: u64,
}

pub fn parse_attribute_list(b: &[u8]) -> Result<Vec<ListEntry>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 0x1A <= b.len() {
        let ty = le32(b, pos).unwrap_or(0);
        let len = le16(b, pos + 4).unwrap_or(0) as usize;
        if len < 0x1A || pos + len > b.len() {
            return Err(format!(
                "attribute list entry at {pos} has impossible length {len}"
            ));
        }
        let name_len = b[pos + 6] as usize;
        let name_off = b[pos + 7] as usize;
        let name = if name_len == 0 {
            String::new()
        } else {
            let raw = b
                .get(pos + name_off..pos + name_off + 2 * name_len)
                .filter(|_| name_off + 2 * name_len <= len)
                .ok_or("attribute list entry name outside the entry")?;
            utf16(raw).0
        };
        out.push(ListEntry {
            ty,
            name,
            start_vcn: le64(b, pos + 8).unwrap_or(0),
            record: le64(b, pos + 0x10).unwrap_or(0) & 0x0000_FFFF_FFFF_FFFF,
        });
        pos += len;
    }
    Ok(out)
}
