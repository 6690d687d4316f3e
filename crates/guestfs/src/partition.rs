//! Partition tables: MBR (primary, extended/logical chains), GPT (protective MBR, CRC-checked
//! headers, fallback to the backup header at the disk's end) and bare filesystems without a table.
//!
//! Why our own parser rather than the `gpt` and `mbrman` crates: both want a `Read + Seek` device
//! and parse eagerly with their own allocation and error policies; we need positioned reads on
//! a [`VirtualDisk`], hard caps on every count a hostile header claims, loop protection in the
//! EBR chain, and a result that *says* when the backup GPT header was used. Both formats are a
//! few hundred bytes of fixed layout (UEFI spec chapter 5), so owning the parser is cheaper than
//! adapting around those policies.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;
use vdisk::{Guid, VirtualDisk};

use crate::volume::Volume;
use crate::{Error, Result};

/// Most logical partitions we follow in an extended partition's EBR chain. Real tables have a
/// handful; a longer chain is hostile (or a loop the visited-set missed because it is huge).
pub const MAX_LOGICAL_PARTITIONS: usize = 256;
/// Largest GPT entry array we read (entries × entry size). The usual array is 16 KiB.
pub const MAX_GPT_ARRAY_BYTES: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No partition table: a filesystem starts at the disk's first byte.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    /// MBR partition type byte (0x07 NTFS/exFAT, 0x0C FAT32 LBA, 0x83 Linux, ...).
    Mbr { type_byte: u8 },
    /// GPT partition type GUID, with its well-known name if we know it.
    Gpt {
        type_guid: String,
        type_name: Option<&'static str>,
        unique_guid: String,
        attributes: u64,
    },
    /// The whole disk, when there is no partition table.
    Whole,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Number as users count: GPT entry index + 1; MBR 1–4 primary, 5.. logical (as Linux does).
    pub index: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    pub kind: PartitionKind,
    /// GPT partition name; None for MBR.
    pub name: Option<String>,
    /// MBR active flag (0x80).
    pub bootable: bool,
    /// A logical partition inside an MBR extended partition.
    pub logical: bool,
}

impl Partition {
    /// Short human description of the type: "Microsoft basic data", "0x83 Linux", ...
    pub fn type_description(&self) -> String {
        match &self.kind {
            PartitionKind::Mbr { type_byte } => {
                format!("0x{type_byte:02x} {}", mbr_type_name(*type_byte))
            }
            PartitionKind::Gpt {
                type_guid,
                type_name,
                ..
            } => type_name.map(str::to_string).unwrap_or(type_guid.clone()),
            PartitionKind::Whole => "whole disk".into(),
        }
    }

    /// The partition as a volume the filesystems read through.
    pub fn volume(&self, disk: Arc<dyn VirtualDisk>) -> Result<Volume> {
        Volume::new(disk, self.start, self.length)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub sector_size: u32,
    /// GPT disk GUID or MBR disk signature (hex).
    pub disk_id: Option<String>,
    /// Partitions in table order (GPT by entry index, MBR primaries then logicals).
    pub partitions: Vec<Partition>,
    /// Damage that did not stop us: a primary GPT header that failed its CRC (and that the backup
    /// was used instead), partitions past the disk's end that were skipped, a cut EBR chain.
    pub warnings: Vec<String>,
}

impl PartitionTable {
    /// The partition with this user-visible number.
    pub fn get(&self, index: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.index == index)
    }
}

/// Read the disk's partition table. A disk whose first sector is a filesystem boot sector (FAT,
/// NTFS, exFAT), or that has neither an MBR signature nor a GPT header, is one bare volume.
pub fn partitions(disk: &dyn VirtualDisk) -> Result<PartitionTable> {
    let geo = disk.geometry();
    let size = geo.virtual_size;
    let ss = geo.logical_sector_size;
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "disk reports a logical sector size of {ss} bytes; expected a power of two from 512 to 65536"
        )));
    }
    let whole = |warnings: Vec<String>| PartitionTable {
        kind: TableKind::None,
        sector_size: ss,
        disk_id: None,
        partitions: vec![Partition {
            index: 1,
            start: 0,
            length: size,
            kind: PartitionKind::Whole,
            name: None,
            bootable: false,
            logical: false,
        }],
        warnings,
    };
    if size < 512 {
        return Ok(whole(Vec::new()));
    }
    let mut mbr = [0u8; 512];
    disk.read_at(&mut mbr, 0)?;
    let has_sig = mbr[510] == 0x55 && mbr[511] == 0xAA;
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    let protective = has_sig && entries.iter().any(|e| e.type_byte == 0xEE);
    // Order matters. A GPT header at LBA 1 is decisive (no filesystem keeps "EFI PART" there;
    // a GPT header without a protective MBR is off-spec, but tools that wipe the MBR leave
    // exactly that). Then a filesystem boot sector, whose boot code could hold a stray 0xEE
    // byte where an MBR has its types. Then a protective MBR whose primary header is gone.
    let primary_sig = gpt_signature_at(disk, ss as u64)?;
    if !primary_sig && looks_like_boot_sector(&mbr) {
        return Ok(whole(Vec::new()));
    }
    if protective || primary_sig {
        let mut t = read_gpt(disk, ss, size)?;
        if !protective {
            t.warnings.insert(
                0,
                "GPT header found but no protective MBR (type 0xEE)".into(),
            );
        }
        return Ok(t);
    }
    if has_sig && mbr_entries_plausible(&entries, size / ss as u64) {
        return read_mbr(disk, &mbr, &entries, ss, size);
    }
    if !has_sig && size >= (ss as u64) * 2 {
        // The primary GPT header may be destroyed together with the MBR; the backup at the end
        // still identifies a GPT disk.
        let last = size / ss as u64 - 1;
        if gpt_signature_at(disk, last * ss as u64)? {
            let mut t = read_gpt(disk, ss, size)?;
            t.warnings.insert(
                0,
                "no MBR signature; the disk was recognised by its backup GPT header".into(),
            );
            return Ok(t);
        }
    }
    Ok(whole(Vec::new()))
}

/// A FAT/NTFS/exFAT boot sector also ends in 55 AA; recognise it so its boot code is not read
/// as a partition table.
fn looks_like_boot_sector(s: &[u8; 512]) -> bool {
    if &s[3..11] == b"NTFS    " || &s[3..11] == b"EXFAT   " {
        return true;
    }
    let jump = s[0] == 0xEB || s[0] == 0xE9;
    let bps = u16::from_le_bytes([s[11], s[12]]);
    let spc = s[13];
    let fats = s[16];
    let media = s[21];
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && (1..=2).contains(&fats)
        && (media == 0xF0 || media >= 0xF8)
        && (&s[54..59] == b"FAT12"
            || &s[54..59] == b"FAT16"
            || &s[82..87] == b"FAT32"
            || &s[54..57] == b"FAT")
}

fn gpt_signature_at(disk: &dyn VirtualDisk, offset: u64) -> Result<bool> {
    if offset + 8 > disk.geometry().virtual_size {
        return Ok(false);
    }
    let mut sig = [0u8; 8];
    disk.read_at(&mut sig, offset)?;
    Ok(&sig == b"EFI PART")
}

#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    status: u8,
    type_byte: u8,
    lba: u64,
    sectors: u64,
}

impl MbrEntry {
    fn parse(sector: &[u8], i: usize) -> MbrEntry {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            type_byte: e[4],
            lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64,
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64,
        }
    }
    fn used(&self) -> bool {
        self.type_byte != 0 && self.sectors != 0
    }
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// Status bytes are 0x00 or 0x80 and at least one entry is used; anything else is boot code or
/// garbage, not a table.
fn mbr_entries_plausible(entries: &[MbrEntry], _disk_sectors: u64) -> bool {
    entries.iter().all(|e| e.status == 0 || e.status == 0x80) && entries.iter().any(|e| e.used())
}

fn read_mbr(
    disk: &dyn VirtualDisk,
    mbr: &[u8; 512],
    entries: &[MbrEntry],
    ss: u32,
    size: u64,
) -> Result<PartitionTable> {
    let ss64 = ss as u64;
    let disk_sectors = size / ss64;
    let mut t = PartitionTable {
        kind: TableKind::Mbr,
        sector_size: ss,
        disk_id: Some(format!(
            "{:08x}",
            u32::from_le_bytes([mbr[440], mbr[441], mbr[442], mbr[443]])
        )),
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let mut extended: Option<(u64, u64)> = None;
    for (i, e) in entries.iter().enumerate() {
        if !e.used() {
            continue;
        }
        if e.lba == 0 || e.lba.saturating_add(e.sectors) > disk_sectors {
            t.warnings.push(format!(
                "MBR partition {} (sectors {}..{}) does not fit the disk ({} sectors); skipped",
                i + 1,
                e.lba,
                e.lba.saturating_add(e.sectors),
                disk_sectors
            ));
            continue;
        }
        if is_extended(e.type_byte) {
            if extended.is_some() {
                t.warnings.push(format!(
                    "MBR partition {} is a second extended partition; ignored",
                    i + 1
                ));
            } else {
                extended = Some((e.lba, e.sectors));
            }
            continue;
        }
        t.partitions.push(Partition {
            index: i as u32 + 1,
            start: e.lba * ss64,
            length: e.sectors * ss64,
            kind: PartitionKind::Mbr {
                type_byte: e.type_byte,
            },
            name: None,
            bootable: e.status == 0x80,
            logical: false,
        });
    }
    if let Some((ext_start, ext_len)) = extended {
        read_ebr_chain(disk, ss64, ext_start, ext_len, &mut t)?;
    }
    Ok(t)
}

/// Follow the EBR chain. Each EBR holds one logical partition (relative to the EBR itself) and a
/// link to the next EBR (relative to the extended partition's start). Every EBR and logical
/// partition must lie inside the extended partition; a link seen before ends the chain.
fn read_ebr_chain(
    disk: &dyn VirtualDisk,
    ss: u64,
    ext_start: u64,
    ext_len: u64,
    t: &mut PartitionTable,
) -> Result<()> {
    let ext_end = ext_start + ext_len;
    let mut visited = HashSet::new();
    let mut ebr_lba = ext_start;
    let mut next_index = 5u32;
    loop {
        if !visited.insert(ebr_lba) {
            t.warnings.push(format!(
                "the extended partition's EBR chain loops back to sector {ebr_lba}; stopped there"
            ));
            break;
        }
        if visited.len() > MAX_LOGICAL_PARTITIONS {
            t.warnings.push(format!(
                "more than {MAX_LOGICAL_PARTITIONS} logical partitions; the rest are ignored"
            ));
            break;
        }
        let mut ebr = [0u8; 512];
        disk.read_at(&mut ebr, ebr_lba * ss)?;
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            t.warnings.push(format!(
                "EBR at sector {ebr_lba} has no 55 AA signature; the logical partition chain ends there"
            ));
            break;
        }
        let part = MbrEntry::parse(&ebr, 0);
        let link = MbrEntry::parse(&ebr, 1);
        if part.used() {
            let start = ebr_lba.saturating_add(part.lba);
            let end = start.saturating_add(part.sectors);
            if part.lba == 0 || end > ext_end {
                t.warnings.push(format!(
                    "logical partition {next_index} (sectors {start}..{end}) lies outside the extended partition (sectors {ext_start}..{ext_end}); skipped"
                ));
            } else {
                t.partitions.push(Partition {
                    index: next_index,
                    start: start * ss,
                    length: part.sectors * ss,
                    kind: PartitionKind::Mbr {
                        type_byte: part.type_byte,
                    },
                    name: None,
                    bootable: part.status == 0x80,
                    logical: true,
                });
            }
            next_index += 1;
        }
        if !link.used() || !is_extended(link.type_byte) {
            break;
        }
        let next = ext_start.saturating_add(link.lba);
        if link.lba == 0 || next >= ext_end {
            t.warnings.push(format!(
                "EBR at sector {ebr_lba} links to sector {next}, outside the extended partition; chain ends"
            ));
            break;
        }
        ebr_lba = next;
    }
    Ok(())
}

struct GptHeader {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

/// Parse and CRC-check a GPT header at `lba`; Err(text) says what is wrong with it.
fn read_gpt_header(
    disk: &dyn VirtualDisk,
    ss: u32,
    lba: u64,
    size: u64,
) -> Result<std::result::Result<GptHeader, String>> {
    let ss64 = ss as u64;
    if lba.saturating_add(1).saturating_mul(ss64) > size {
        return Ok(Err(format!("LBA {lba} is past the disk's end")));
    }
    let mut s = vec![0u8; ss as usize];
    disk.read_at(&mut s, lba * ss64)?;
    if &s[0..8] != b"EFI PART" {
        return Ok(Err("no \"EFI PART\" signature".into()));
    }
    let hsize = u32::from_le_bytes(s[12..16].try_into().unwrap()) as usize;
    if hsize < 92 || hsize > ss as usize {
        return Ok(Err(format!("header size {hsize} is not in 92..={ss}")));
    }
    let stored = u32::from_le_bytes(s[16..20].try_into().unwrap());
    let mut h = s[..hsize].to_vec();
    h[16..20].fill(0);
    let computed = crc32(&h);
    if stored != computed {
        return Ok(Err(format!(
            "header CRC32 is {stored:08x}, computed {computed:08x}"
        )));
    }
    let u64at = |o: usize| u64::from_le_bytes(s[o..o + 8].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(s[o..o + 4].try_into().unwrap());
    let hdr = GptHeader {
        my_lba: u64at(24),
        alternate_lba: u64at(32),
        first_usable: u64at(40),
        last_usable: u64at(48),
        disk_guid: Guid::from_le_bytes(s[56..72].try_into().unwrap()),
        entries_lba: u64at(72),
        num_entries: u32at(80),
        entry_size: u32at(84),
        entries_crc: u32at(88),
    };
    if hdr.my_lba != lba {
        return Ok(Err(format!(
            "header says it is at LBA {}, found at LBA {lba}",
            hdr.my_lba
        )));
    }
    if hdr.entry_size < 128 || !hdr.entry_size.is_power_of_two() {
        return Ok(Err(format!(
            "partition entry size {} is not a power of two of at least 128",
            hdr.entry_size
        )));
    }
    let bytes = hdr.num_entries as u64 * hdr.entry_size as u64;
    if bytes > MAX_GPT_ARRAY_BYTES {
        return Ok(Err(format!(
            "partition entry array of {} entries × {} bytes exceeds the {MAX_GPT_ARRAY_BYTES}-byte limit",
            hdr.num_entries, hdr.entry_size
        )));
    }
    if hdr
        .entries_lba
        .checked_mul(ss64)
        .and_then(|o| o.checked_add(bytes))
        .is_none_or(|end| end > size)
    {
        return Ok(Err(format!(
            "partition entry array at LBA {} is past the disk's end",
            hdr.entries_lba
        )));
    }
    Ok(Ok(hdr))
}

fn read_gpt_entries(
    disk: &dyn VirtualDisk,
    ss: u32,
    hdr: &GptHeader,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let len = hdr.num_entries as usize * hdr.entry_size as usize;
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, hdr.entries_lba * ss as u64)?;
    let c = crc32(&buf);
    if c != hdr.entries_crc {
        return Ok(Err(format!(
            "partition entry array CRC32 is {:08x}, computed {c:08x}",
            hdr.entries_crc
        )));
    }
    Ok(Ok(buf))
}

fn read_gpt(disk: &dyn VirtualDisk, ss: u32, size: u64) -> Result<PartitionTable> {
    let ss64 = ss as u64;
    if size / ss64 < 2 {
        // A protective MBR on a disk too small for a GPT header (with 4 KiB sectors a disk of
        // under 8 KiB still has a readable 512-byte MBR).
        return Err(Error::corrupt(
            "GPT",
            format!(
                "a disk of {size} bytes has no room for a GPT header after a {ss}-byte MBR sector"
            ),
        ));
    }
    let last_lba = size / ss64 - 1;
    let mut warnings = Vec::new();
    let primary = read_gpt_header(disk, ss, 1, size)?;
    let mut chosen = None;
    let mut backup_lba = last_lba;
    match primary {
        Ok(h) => {
            if h.alternate_lba <= last_lba && h.alternate_lba > 1 {
                backup_lba = h.alternate_lba;
            }
            match read_gpt_entries(disk, ss, &h)? {
                Ok(e) => chosen = Some((h, e)),
                Err(why) => warnings.push(format!("primary GPT damaged: {why}")),
            }
        }
        Err(why) => warnings.push(format!("primary GPT header at LBA 1 damaged: {why}")),
    }
    if chosen.is_none() {
        let mut backup = read_gpt_header(disk, ss, backup_lba, size)?;
        if backup.is_err() && backup_lba != last_lba {
            backup_lba = last_lba;
            backup = read_gpt_header(disk, ss, backup_lba, size)?;
        }
        match backup {
            Ok(h) => match read_gpt_entries(disk, ss, &h)? {
                Ok(e) => {
                    warnings.push(format!(
                        "using the backup GPT header at LBA {backup_lba}; repair the primary (e.g. with `sgdisk -e` or gdisk's recovery menu) on a copy"
                    ));
                    chosen = Some((h, e));
                }
                Err(why) => {
                    return Err(Error::corrupt(
                        "GPT",
                        format!("{}; backup GPT damaged too: {why}", warnings.join("; ")),
                    ))
                }
            },
            Err(why) => {
                return Err(Error::corrupt(
                    "GPT",
                    format!(
                        "{}; backup GPT header at LBA {backup_lba} damaged too: {why}",
                        warnings.join("; ")
                    ),
                ))
            }
        }
    }
    let (h, array) = chosen.expect("set above or returned");
    let mut parts = Vec::new();
    for i in 0..h.num_entries as usize {
        let e = &array[i * h.entry_size as usize..(i + 1) * h.entry_size as usize];
        let type_guid = Guid::from_le_bytes(e[0..16].try_into().unwrap());
        if type_guid.is_zero() {
            continue;
        }
        let first = u64::from_le_bytes(e[32..40].try_into().unwrap());
        let last = u64::from_le_bytes(e[40..48].try_into().unwrap());
        if last < first || last > last_lba || first == 0 {
            warnings.push(format!(
                "GPT partition {} (LBA {first}..={last}) does not fit the disk (last LBA {last_lba}); skipped",
                i + 1
            ));
            continue;
        }
        if first < h.first_usable || last > h.last_usable {
            warnings.push(format!(
                "GPT partition {} (LBA {first}..={last}) lies outside the usable area {}..={}",
                i + 1,
                h.first_usable,
                h.last_usable
            ));
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        let type_str = type_guid.to_string().to_uppercase();
        parts.push(Partition {
            index: i as u32 + 1,
            start: first * ss64,
            length: (last - first + 1) * ss64,
            kind: PartitionKind::Gpt {
                type_name: gpt_type_name(&type_str),
                type_guid: type_str,
                unique_guid: Guid::from_le_bytes(e[16..32].try_into().unwrap())
                    .to_string()
                    .to_uppercase(),
                attributes: u64::from_le_bytes(e[48..56].try_into().unwrap()),
            },
            name: if name.is_empty() { None } else { Some(name) },
            bootable: false,
            logical: false,
        });
    }
    let _ = h.my_lba;
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: ss,
        disk_id: Some(h.disk_guid.to_string().to_uppercase()),
        partitions: parts,
        warnings,
    })
}

fn gpt_type_name(g: &str) -> Option<&'static str> {
    Some(match g {
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3" => "Windows LDM metadata",
        "AF9B60A0-1431-4F62-BC68-3311714A69AD" => "Windows LDM data",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        _ => return None,
    })
}

fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0E => "FAT16",
        0x05 | 0x0F | 0x85 => "extended",
        0x07 => "NTFS/exFAT",
        0x0B | 0x0C => "FAT32",
        0x27 => "Windows recovery",
        0x42 => "Windows dynamic disk",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xEE => "GPT protective",
        0xEF => "EFI system",
        0xFD => "Linux RAID",
        _ => "unknown",
    }
}
