//! FAT12, FAT16 and FAT32 with long (VFAT) names.
//!
//! Why our own reader rather than the `fatfs` crate: `fatfs` works on paths and hides where an
//! entry lives (first cluster, directory-entry position), so it cannot give the stable
//! [`NodeId`]s the [`GuestFs`] interface needs, and it wants a `Read + Write + Seek` device. A
//! read-only FAT reader is small (Microsoft's FAT specification, "FAT: General Overview of
//! On-Disk Format"), and sharing the cluster-chain walker with exFAT gives both the same loop
//! and bounds checks.
//!
//! Node ids: the volume byte offset of a file's short (8.3) directory entry, which is unique and
//! 32-byte aligned; the root directory, which has no entry, is [`ROOT_NODE`] (1). An id is
//! decoded by reading those 32 bytes again, so nothing is kept per file.
//!
//! Timestamps: FAT stores local wall-clock time without a zone. We report the stored digits as
//! if they were UTC (a file written at 10:00 local reads as 10:00Z); restoring them the same way
//! gives back the same wall-clock digits. Creation time has 10 ms resolution, modification 2 s,
//! access a date only (reported as midnight). FAT has no change time (`ctime` is None).

use std::sync::Arc;

use crate::fs::{DirEntry, FileType, FsKind, GuestFs, LinkTarget, Metadata, NodeId};
use crate::util::{
    clamp_read, dos_datetime, u16le, u32le, ClusterRuns, FatTable, FatWidth, RunCache,
};
use crate::volume::Volume;
use crate::{Error, Result};

/// Node id of the root directory.
pub const ROOT_NODE: NodeId = 1;
/// A FAT directory holds at most 65536 entries (the specification's limit).
const MAX_DIR_BYTES: u64 = 65536 * 32;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;

/// True if the boot sector is a FAT12/16/32 boot sector (BPB fields sane, not NTFS/exFAT).
pub fn probe(boot: &[u8]) -> bool {
    parse_bpb(boot).is_ok()
}

struct Bpb {
    kind: FsKind,
    bps: u64,
    cluster_size: u64,
    fat_offset: u64,
    fat_bytes: u64,
    root_dir_offset: u64,
    root_dir_bytes: u64,
    root_cluster: u32,
    data_offset: u64,
    cluster_count: u32,
    bpb_label: Option<String>,
}

fn parse_bpb(b: &[u8]) -> Result<Bpb> {
    let bad = |why: String| Error::corrupt("FAT", why);
    if b.len() < 512 {
        return Err(bad("boot sector shorter than 512 bytes".into()));
    }
    if &b[3..11] == b"NTFS    " || &b[3..11] == b"EXFAT   " {
        return Err(bad("boot sector is NTFS/exFAT, not FAT".into()));
    }
    if !(b[0] == 0xEB || b[0] == 0xE9) {
        return Err(bad(format!(
            "no x86 jump at the start of the boot sector ({:02x})",
            b[0]
        )));
    }
    let bps = u16le(b, 11) as u64;
    let spc = b[13] as u64;
    let reserved = u16le(b, 14) as u64;
    let nfats = b[16] as u64;
    let root_entries = u16le(b, 17) as u64;
    let total16 = u16le(b, 19) as u64;
    let fat16 = u16le(b, 22) as u64;
    let total32 = u32le(b, 32) as u64;
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        return Err(bad(format!(
            "bytes per sector {bps} is not 512, 1024, 2048 or 4096"
        )));
    }
    if spc == 0 || !spc.is_power_of_two() {
        return Err(bad(format!(
            "sectors per cluster {spc} is not a power of two"
        )));
    }
    if reserved == 0 || nfats == 0 {
        return Err(bad(format!(
            "reserved sectors {reserved}, FAT count {nfats}: both must be at least 1"
        )));
    }
    let fat_sectors = if fat16 != 0 {
        fat16
    } else {
        u32le(b, 36) as u64
    };
    let total = if total16 != 0 { total16 } else { total32 };
    if fat_sectors == 0 || total == 0 {
        return Err(bad("FAT size or total sector count is zero".into()));
    }
    let root_dir_sectors = (root_entries * 32).div_ceil(bps);
    let meta = reserved + nfats * fat_sectors + root_dir_sectors;
    if meta >= total {
        return Err(bad(format!(
            "the volume's {total} sectors do not even hold its FATs and root directory ({meta} sectors)"
        )));
    }
    let clusters = (total - meta) / spc;
    let kind = if clusters < 4085 {
        FsKind::Fat12
    } else if clusters < 65525 {
        FsKind::Fat16
    } else {
        FsKind::Fat32
    };
    if kind == FsKind::Fat32 && (fat16 != 0 || root_entries != 0) {
        return Err(bad(
            "FAT32 by cluster count, but the BPB has FAT16 fields".into()
        ));
    }
    if kind != FsKind::Fat32 && root_entries == 0 {
        return Err(bad("FAT12/16 volume without root directory entries".into()));
    }
    // FAT32 may keep one active FAT (mirroring off, ext flags bit 7); otherwise FAT 0.
    let active = if kind == FsKind::Fat32 && u16le(b, 40) & 0x80 != 0 {
        (u16le(b, 40) & 0x0F) as u64
    } else {
        0
    };
    if active >= nfats {
        return Err(bad(format!("active FAT {active} of {nfats}")));
    }
    let fat_bytes = fat_sectors * bps;
    // A FAT too small for the cluster count limits the usable clusters to what it can describe.
    let fat_capacity = match kind {
        FsKind::Fat12 => fat_bytes * 2 / 3,
        FsKind::Fat16 => fat_bytes / 2,
        _ => fat_bytes / 4,
    };
    let clusters = clusters
        .min(fat_capacity.saturating_sub(2))
        .min(0x0FFF_FFF5) as u32;
    let label_off = if kind == FsKind::Fat32 { 71 } else { 43 };
    let sig_off = if kind == FsKind::Fat32 { 66 } else { 38 };
    let bpb_label = if b[sig_off] == 0x29 {
        let l = String::from_utf8_lossy(&b[label_off..label_off + 11])
            .trim_end()
            .to_string();
        (!l.is_empty() && l != "NO NAME").then_some(l)
    } else {
        None
    };
    Ok(Bpb {
        kind,
        bps,
        cluster_size: spc * bps,
        fat_offset: (reserved + active * fat_sectors) * bps,
        fat_bytes,
        root_dir_offset: (reserved + nfats * fat_sectors) * bps,
        root_dir_bytes: root_dir_sectors * bps,
        root_cluster: if kind == FsKind::Fat32 {
            u32le(b, 44)
        } else {
            0
        },
        data_offset: meta * bps,
        cluster_count: clusters,
        bpb_label,
    })
}

pub struct FatFs {
    vol: Volume,
    kind: FsKind,
    fat: FatTable,
    cluster_size: u64,
    root_dir_offset: u64,
    root_dir_bytes: u64,
    root_cluster: u32,
    data_offset: u64,
    label: Option<String>,
    runs: RunCache,
}

/// A parsed short directory entry.
struct Dirent {
    attr: u8,
    first_cluster: u32,
    size: u32,
    raw: [u8; 32],
}

impl Dirent {
    fn parse(raw: &[u8], fat32: bool) -> Dirent {
        let hi = if fat32 { u16le(raw, 20) as u32 } else { 0 };
        Dirent {
            attr: raw[11],
            first_cluster: hi << 16 | u16le(raw, 26) as u32,
            size: u32le(raw, 28),
            raw: raw[..32].try_into().expect("32 bytes"),
        }
    }
    fn is_dir(&self) -> bool {
        self.attr & ATTR_DIRECTORY != 0
    }
}

/// Open a FAT volume.
pub fn open(vol: Volume) -> Result<FatFs> {
    let mut boot = [0u8; 512];
    vol.read_exact_at(&mut boot, 0)?;
    let b = parse_bpb(&boot)?;
    if b.data_offset > vol.len() {
        return Err(Error::corrupt(
            "FAT",
            format!(
                "data region starts at byte {} but the volume has {} bytes",
                b.data_offset,
                vol.len()
            ),
        ));
    }
    let width = match b.kind {
        FsKind::Fat12 => FatWidth::Fat12,
        FsKind::Fat16 => FatWidth::Fat16,
        _ => FatWidth::Fat32,
    };
    // Clusters past the volume's end cannot hold data; count only those that fit.
    let fit = ((vol.len() - b.data_offset) / b.cluster_size).min(u32::MAX as u64) as u32;
    let fat = FatTable::new(
        vol.clone(),
        "FAT",
        b.fat_offset,
        b.fat_bytes,
        width,
        b.cluster_count.min(fit),
    );
    let _ = b.bps;
    let mut fs = FatFs {
        vol,
        kind: b.kind,
        fat,
        cluster_size: b.cluster_size,
        root_dir_offset: b.root_dir_offset,
        root_dir_bytes: b.root_dir_bytes,
        root_cluster: b.root_cluster,
        data_offset: b.data_offset,
        label: b.bpb_label,
        runs: RunCache::new(),
    };
    if fs.kind == FsKind::Fat32 && !fs.fat.valid_cluster(fs.root_cluster) {
        return Err(Error::corrupt(
            "FAT",
            format!(
                "root directory cluster {} is outside the volume",
                fs.root_cluster
            ),
        ));
    }
    // The volume label entry in the root directory is what Windows shows; the BPB copy is often
    // stale.
    let (root, _) = fs.dir_data(ROOT_NODE)?;
    for e in root.chunks_exact(32) {
        if e[0] == 0 {
            break;
        }
        if e[0] != 0xE5 && e[11] & ATTR_VOLUME_ID != 0 && e[11] & 0x3F != ATTR_LONG_NAME {
            let l = decode_oem(&e[0..11]).0.trim_end().to_string();
            if !l.is_empty() {
                fs.label = Some(l);
            }
            break;
        }
    }
    Ok(fs)
}

/// Directory-entry name bytes (OEM code page 437) to text; `true` if a byte had no mapping.
fn decode_oem(b: &[u8]) -> (String, bool) {
    const HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";
    let mut lossy = false;
    let s = b
        .iter()
        .map(|&c| {
            if c < 0x80 {
                if c < 0x20 {
                    lossy = true;
                    '\u{FFFD}'
                } else {
                    c as char
                }
            } else {
                HIGH.chars().nth(c as usize - 0x80).unwrap_or('\u{FFFD}')
            }
        })
        .collect();
    (s, lossy)
}

fn short_name(raw: &[u8]) -> (String, bool) {
    let mut base = raw[0..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5; // 0x05 stands for a real leading 0xE5 (a KANJI lead byte)
    }
    let (mut b, l1) = decode_oem(&base);
    let (mut e, l2) = decode_oem(&raw[8..11]);
    b = b.trim_end_matches(' ').to_string();
    e = e.trim_end_matches(' ').to_string();
    // Windows NT keeps all-lowercase 8.3 names in the case flags instead of an LFN.
    if raw[12] & 0x08 != 0 {
        b = b.to_lowercase();
    }
    if raw[12] & 0x10 != 0 {
        e = e.to_lowercase();
    }
    if e.is_empty() {
        (b, l1 || l2)
    } else {
        (format!("{b}.{e}"), l1 || l2)
    }
}

fn short_checksum(raw: &[u8]) -> u8 {
    raw[0..11].iter().fold(0u8, |s, &c| {
        ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(c)
    })
}

impl FatFs {
    fn cluster_runs(&self, first: u32, limit: Option<u64>) -> Result<Arc<ClusterRuns>> {
        self.runs.get_or((first, limit.unwrap_or(u64::MAX)), || {
            Ok(ClusterRuns {
                runs: self.fat.chain(first, limit)?,
                cluster_size: self.cluster_size,
                heap_offset: self.data_offset,
            })
        })
    }

    fn dirent(&self, node: NodeId) -> Result<Dirent> {
        if !node.is_multiple_of(32) || node < self.root_dir_offset.min(self.data_offset) {
            return Err(Error::NotFound(format!("FAT node {node}")));
        }
        let mut raw = [0u8; 32];
        self.vol.read_exact_at(&mut raw, node)?;
        if raw[0] == 0 || raw[0] == 0xE5 || raw[11] & 0x3F == ATTR_LONG_NAME {
            return Err(Error::NotFound(format!(
                "FAT node {node}: no directory entry there"
            )));
        }
        Ok(Dirent::parse(&raw, self.kind == FsKind::Fat32))
    }

    /// A directory's entries as bytes, with the run list mapping positions to volume offsets
    /// (None for the FAT12/16 fixed root directory, which is contiguous).
    fn dir_data(&self, node: NodeId) -> Result<(Vec<u8>, Option<Arc<ClusterRuns>>)> {
        let first = if node == ROOT_NODE {
            if self.kind != FsKind::Fat32 {
                let mut buf = vec![0u8; self.root_dir_bytes as usize];
                self.vol.read_exact_at(&mut buf, self.root_dir_offset)?;
                return Ok((buf, None));
            }
            self.root_cluster
        } else {
            let d = self.dirent(node)?;
            if !d.is_dir() {
                return Err(Error::NotADirectory(format!("FAT node {node}")));
            }
            if d.first_cluster == 0 {
                // ".." of a first-level directory uses 0 for the root; a real entry doing so is
                // corrupt but means the root.
                return self.dir_data(ROOT_NODE);
            }
            d.first_cluster
        };
        let runs = self.cluster_runs(
            first,
            Some(MAX_DIR_BYTES / self.cluster_size.min(MAX_DIR_BYTES)),
        )?;
        let len = runs.bytes().min(MAX_DIR_BYTES);
        let mut buf = vec![0u8; len as usize];
        runs.read(&self.vol, "FAT", &mut buf, 0)?;
        Ok((buf, Some(runs)))
    }

    fn entry_offset(&self, runs: &Option<Arc<ClusterRuns>>, pos: u64) -> u64 {
        match runs {
            None => self.root_dir_offset + pos,
            Some(r) => r.volume_offset(pos).unwrap_or(u64::MAX - 31),
        }
    }
}

impl GuestFs for FatFs {
    fn kind(&self) -> FsKind {
        self.kind
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn root(&self) -> NodeId {
        ROOT_NODE
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let (data, runs) = self.dir_data(dir)?;
        let mut out = Vec::new();
        // Long-name slots collected so far: (checksum, next expected sequence, UTF-16 units).
        let mut lfn: Option<(u8, u8, Vec<u16>)> = None;
        for (i, e) in data.chunks_exact(32).enumerate() {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 {
                lfn = None;
                continue;
            }
            if e[11] & 0x3F == ATTR_LONG_NAME {
                let seq = e[0] & 0x1F;
                if e[0] & 0x40 != 0 && (1..=20).contains(&seq) {
                    lfn = Some((e[13], seq, vec![0xFFFF; seq as usize * 13]));
                }
                match &mut lfn {
                    Some((sum, next, units)) if *next == seq && *sum == e[13] && seq >= 1 => {
                        let base = (seq as usize - 1) * 13;
                        for (k, o) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                            .iter()
                            .enumerate()
                        {
                            units[base + k] = u16le(e, *o);
                        }
                        *next = seq - 1;
                    }
                    _ => lfn = None,
                }
                continue;
            }
            let long = lfn.take();
            if e[11] & ATTR_VOLUME_ID != 0 {
                continue;
            }
            if &e[0..11] == b".          " || &e[0..11] == b"..         " {
                continue;
            }
            let (name, lossy) = match long {
                Some((sum, 0, units)) if sum == short_checksum(e) => {
                    let end = units
                        .iter()
                        .position(|&u| u == 0 || u == 0xFFFF)
                        .unwrap_or(units.len());
                    let n = String::from_utf16_lossy(&units[..end]);
                    let lossy = String::from_utf16(&units[..end]).is_err();
                    if n.is_empty() {
                        short_name(e)
                    } else {
                        (n, lossy)
                    }
                }
                _ => short_name(e),
            };
            if name == "." || name == ".." || name.is_empty() {
                continue;
            }
            out.push(DirEntry {
                name,
                name_lossy: lossy,
                node: self.entry_offset(&runs, i as u64 * 32),
                file_type: if e[11] & ATTR_DIRECTORY != 0 {
                    FileType::Directory
                } else {
                    FileType::File
                },
            });
        }
        Ok(out)
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        if node == ROOT_NODE {
            return Ok(Metadata {
                node,
                file_type: FileType::Directory,
                nlink: 1,
                windows_attributes: Some(ATTR_DIRECTORY as u32),
                ..Default::default()
            });
        }
        let d = self.dirent(node)?;
        let r = &d.raw;
        let is_dir = d.is_dir();
        let size = if is_dir { 0 } else { d.size as u64 };
        Ok(Metadata {
            node,
            file_type: if is_dir {
                FileType::Directory
            } else {
                FileType::File
            },
            size,
            allocated: size.div_ceil(self.cluster_size) * self.cluster_size,
            mtime: dos_datetime(u16le(r, 24), u16le(r, 22), 0),
            atime: dos_datetime(u16le(r, 18), 0, 0),
            ctime: None,
            btime: dos_datetime(u16le(r, 16), u16le(r, 14), r[13]),
            mode: None,
            uid: None,
            gid: None,
            windows_attributes: Some((d.attr & 0x37) as u32),
            nlink: 1,
            streams: Vec::new(),
            xattrs: Vec::new(),
        })
    }

    fn read_at(
        &self,
        node: NodeId,
        stream: Option<&str>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize> {
        if let Some(s) = stream {
            return Err(Error::NotFound(format!("FAT has no named streams ({s})")));
        }
        if node == ROOT_NODE {
            return Err(Error::InvalidArgument("the root is a directory".into()));
        }
        let d = self.dirent(node)?;
        if d.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "FAT node {node} is a directory"
            )));
        }
        let n = clamp_read(d.size as u64, buf, offset);
        if n == 0 {
            return Ok(0);
        }
        if d.first_cluster == 0 {
            return Err(Error::corrupt(
                "FAT",
                format!("file of {} bytes has no clusters", d.size),
            ));
        }
        let needed = (d.size as u64).div_ceil(self.cluster_size);
        let runs = self.cluster_runs(d.first_cluster, Some(needed))?;
        runs.read(&self.vol, "FAT", &mut buf[..n], offset)?;
        Ok(n)
    }

    fn read_link(&self, node: NodeId) -> Result<LinkTarget> {
        Err(Error::InvalidArgument(format!(
            "FAT node {node} is not a symbolic link (FAT has none)"
        )))
    }

    /// Case-insensitive like Windows, beyond ASCII too ("ÜBER.TXT" finds "über.txt").
    fn lookup(&self, path: &str) -> Result<NodeId> {
        let mut node = self.root();
        for comp in path
            .split(['/', '\\'])
            .filter(|c| !c.is_empty() && *c != ".")
        {
            let entries = self.read_dir(node)?;
            let want = comp.to_uppercase();
            let found = entries
                .iter()
                .find(|e| e.name == comp)
                .or_else(|| entries.iter().find(|e| e.name.to_uppercase() == want))
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            node = found.node;
        }
        Ok(node)
    }

    fn dir_key(&self, node: NodeId) -> Result<u64> {
        if node == ROOT_NODE {
            return Ok(self.root_cluster as u64);
        }
        let d = self.dirent(node)?;
        Ok(if d.first_cluster == 0 {
            self.root_cluster as u64
        } else {
            d.first_cluster as u64
        })
    }
}
