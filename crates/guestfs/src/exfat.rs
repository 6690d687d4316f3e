//! exFAT, after Microsoft's "exFAT file system specification".
//!
//! Why our own reader: `fatfs` has no exFAT, and `hadris-fat` keeps exFAT behind an unstable
//! feature. exFAT shares FAT32's cluster chains (same walker as [`crate::fat`], with its loop and
//! bounds checks) and adds what is checked here: the boot-region checksum (falling back to the
//! backup boot region), directory entry sets with their checksums, contiguous `NoFatChain` files,
//! `ValidDataLength` (bytes past it read as zeros, as the specification requires), the up-case
//! table (checksummed; used for case-insensitive lookup) and the allocation bitmap's presence.
//!
//! Node ids: the volume byte offset of a file's primary (0x85) directory entry; the root is
//! [`ROOT_NODE`] (1). An id is decoded by re-reading its entry set there (and from a bounded
//! cache when the set straddles two non-adjacent clusters).
//!
//! Timestamps: local time with 10 ms resolution plus, when the writer recorded it, the offset
//! from UTC in 15-minute steps; with an offset we report true UTC, without one the stored
//! digits as if they were UTC (as for FAT).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::fs::{DirEntry, FileType, FsKind, GuestFs, LinkTarget, Metadata, NodeId};
use crate::util::{
    clamp_read, dos_datetime, u16le, u32le, u64le, ClusterRuns, FatTable, FatWidth, Run, RunCache,
};
use crate::volume::Volume;
use crate::{Error, Result};

pub const ROOT_NODE: NodeId = 1;
/// The specification's limit on a directory's size.
const MAX_DIR_BYTES: u64 = 256 << 20;
const NODE_CACHE: usize = 100_000;
const FS: &str = "exFAT";

pub fn probe(boot: &[u8]) -> bool {
    boot.len() >= 512 && &boot[3..11] == b"EXFAT   "
}

#[derive(Clone, Debug)]
struct ExNode {
    attrs: u16,
    first_cluster: u32,
    no_fat_chain: bool,
    valid_len: u64,
    data_len: u64,
    create: Option<i128>,
    modify: Option<i128>,
    access: Option<i128>,
    name: Vec<u16>,
}

impl ExNode {
    fn is_dir(&self) -> bool {
        self.attrs & 0x10 != 0
    }
}

pub struct ExfatFs {
    vol: Volume,
    fat: FatTable,
    cluster_size: u64,
    heap_offset: u64,
    root_cluster: u32,
    label: Option<String>,
    upcase: Option<Vec<u16>>,
    nodes: Mutex<HashMap<NodeId, Arc<ExNode>>>,
    runs: RunCache,
}

fn boot_checksum(region: &[u8]) -> u32 {
    let mut c = 0u32;
    for (i, &b) in region.iter().enumerate() {
        if i == 106 || i == 107 || i == 112 {
            continue;
        }
        c = c.rotate_right(1).wrapping_add(b as u32);
    }
    c
}

fn table_checksum(data: &[u8]) -> u32 {
    data.iter()
        .fold(0u32, |c, &b| c.rotate_right(1).wrapping_add(b as u32))
}

fn set_checksum(set: &[u8]) -> u16 {
    let mut c = 0u16;
    for (i, &b) in set.iter().enumerate() {
        if i == 2 || i == 3 {
            continue;
        }
        c = c.rotate_right(1).wrapping_add(b as u16);
    }
    c
}

/// exFAT timestamp + 10 ms increment + UTC offset byte.
fn timestamp(ts: u32, centis: u8, utc_off: u8) -> Option<i128> {
    let local = dos_datetime((ts >> 16) as u16, ts as u16, centis)?;
    if utc_off & 0x80 != 0 {
        // 7-bit two's complement count of 15-minute steps.
        let steps = ((utc_off << 1) as i8 >> 1) as i128;
        Some(local - steps * 15 * 60 * 1_000_000_000)
    } else {
        Some(local)
    }
}

/// Read and check the main boot region (or the backup at sector 12) and return its boot sector.
fn read_boot(vol: &Volume) -> Result<Vec<u8>> {
    let mut first = [0u8; 512];
    vol.read_exact_at(&mut first, 0)?;
    let shift = first[108];
    if !(9..=12).contains(&shift) {
        return Err(Error::corrupt(
            FS,
            format!("bytes-per-sector shift {shift} is not 9..12"),
        ));
    }
    let bps = 1usize << shift;
    let mut problems = Vec::new();
    for (which, start) in [("main", 0u64), ("backup", 12)] {
        let mut region = vec![0u8; 12 * bps];
        if let Err(e) = vol.read_exact_at(&mut region, start * bps as u64) {
            problems.push(format!("{which} boot region: {e}"));
            continue;
        }
        let sum = boot_checksum(&region[..11 * bps]);
        let stored_ok = region[11 * bps..]
            .chunks_exact(4)
            .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == sum);
        if &region[3..11] != b"EXFAT   " {
            problems.push(format!("{which} boot sector lacks the EXFAT signature"));
        } else if !stored_ok {
            problems.push(format!(
                "{which} boot region checksum does not match (computed {sum:08x})"
            ));
        } else {
            region.truncate(bps);
            return Ok(region);
        }
    }
    Err(Error::corrupt(FS, problems.join("; ")))
}

pub fn open(vol: Volume) -> Result<ExfatFs> {
    let b = read_boot(&vol)?;
    let bad = |s: String| Error::corrupt(FS, s);
    if b[11..64].iter().any(|&x| x != 0) {
        return Err(bad("bytes 11..64 of the boot sector must be zero".into()));
    }
    let bps_shift = b[108] as u32;
    let spc_shift = b[109] as u32;
    if bps_shift + spc_shift > 25 {
        return Err(bad(format!(
            "cluster size 2^{} exceeds the 32 MiB maximum",
            bps_shift + spc_shift
        )));
    }
    let bps = 1u64 << bps_shift;
    let cluster_size = bps << spc_shift;
    let vol_sectors = u64le(&b, 72);
    let fat_offset = u32le(&b, 80) as u64;
    let fat_length = u32le(&b, 84) as u64;
    let heap = u32le(&b, 88) as u64;
    let cluster_count = u32le(&b, 92);
    let root_cluster = u32le(&b, 96);
    let nfats = b[110] as u64;
    let active = if u16le(&b, 106) & 1 != 0 && nfats == 2 {
        1
    } else {
        0
    };
    if !(1..=2).contains(&nfats) || fat_length == 0 {
        return Err(bad(format!("{nfats} FATs of {fat_length} sectors")));
    }
    if heap < fat_offset + fat_length * nfats {
        return Err(bad("cluster heap overlaps the FATs".into()));
    }
    if (fat_length * bps) < (cluster_count as u64 + 2) * 4 {
        return Err(bad(format!(
            "FAT of {fat_length} sectors cannot describe {cluster_count} clusters"
        )));
    }
    let vol_bytes = vol.len().min(vol_sectors.saturating_mul(bps));
    let heap_offset = heap * bps;
    if heap_offset > vol_bytes {
        return Err(bad(format!(
            "cluster heap at byte {heap_offset} is past the volume's end ({vol_bytes})"
        )));
    }
    let fit = ((vol_bytes - heap_offset) / cluster_size).min(u32::MAX as u64) as u32;
    let fat = FatTable::new(
        vol.clone(),
        FS,
        (fat_offset + active * fat_length) * bps,
        fat_length * bps,
        FatWidth::Exfat,
        cluster_count.min(fit),
    );
    if !fat.valid_cluster(root_cluster) {
        return Err(bad(format!(
            "root directory cluster {root_cluster} is outside the volume"
        )));
    }
    let mut fs = ExfatFs {
        vol,
        fat,
        cluster_size,
        heap_offset,
        root_cluster,
        label: None,
        upcase: None,
        nodes: Mutex::new(HashMap::new()),
        runs: RunCache::new(),
    };
    // Critical primary entries of the root: bitmap, up-case table, label.
    let (root, _) = fs.dir_data(ROOT_NODE)?;
    let mut have_bitmap = false;
    let mut upcase = None;
    for e in root.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0x81 => {
                let len = u64le(e, 24);
                if len < (cluster_count as u64).div_ceil(8) {
                    return Err(bad(format!(
                        "allocation bitmap of {len} bytes is too small for {cluster_count} clusters"
                    )));
                }
                have_bitmap = true;
            }
            0x82 => upcase = Some((u32le(e, 4), u32le(e, 20), u64le(e, 24))),
            0x83 => {
                let n = (e[1] as usize).min(11);
                let units: Vec<u16> = (0..n).map(|i| u16le(e, 2 + 2 * i)).collect();
                fs.label = Some(String::from_utf16_lossy(&units));
            }
            _ => {}
        }
    }
    if !have_bitmap {
        return Err(bad(
            "the root directory has no allocation bitmap entry".into()
        ));
    }
    if let Some((sum, first, len)) = upcase {
        fs.upcase = Some(fs.read_upcase(sum, first, len)?);
    } else {
        return Err(bad("the root directory has no up-case table entry".into()));
    }
    Ok(fs)
}

impl ExfatFs {
    fn read_upcase(&self, sum: u32, first: u32, len: u64) -> Result<Vec<u16>> {
        if len == 0 || len > 128 << 10 || !len.is_multiple_of(2) {
            return Err(Error::corrupt(FS, format!("up-case table of {len} bytes")));
        }
        let runs = self
            .fat
            .chain(first, Some(len.div_ceil(self.cluster_size)))?;
        let cr = ClusterRuns {
            runs,
            cluster_size: self.cluster_size,
            heap_offset: self.heap_offset,
        };
        let mut data = vec![0u8; len as usize];
        cr.read(&self.vol, FS, &mut data, 0)?;
        let c = table_checksum(&data);
        if c != sum {
            return Err(Error::corrupt(
                FS,
                format!("up-case table checksum is {sum:08x}, computed {c:08x}"),
            ));
        }
        let mut map: Vec<u16> = (0..=u16::MAX).collect();
        let mut i = 0usize;
        let mut units = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        while let Some(u) = units.next() {
            if i > 0xFFFF {
                break;
            }
            if u == 0xFFFF {
                // Compressed: the next unit counts characters that map to themselves.
                i += units.next().unwrap_or(0) as usize;
            } else {
                map[i] = u;
                i += 1;
            }
        }
        Ok(map)
    }

    fn up(&self, u: u16) -> u16 {
        match &self.upcase {
            Some(m) => m[u as usize],
            None => u,
        }
    }

    fn node(&self, id: NodeId) -> Result<Arc<ExNode>> {
        if let Some(n) = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(n.clone());
        }
        // Not cached (evicted, or never listed): re-read the set at the id's offset. A set that
        // continues into a non-adjacent cluster fails its checksum here and is reported as
        // not found, never misread.
        let mut set = vec![0u8; 19 * 32];
        let n = (self.vol.len().saturating_sub(id)).min(set.len() as u64) as usize;
        if n < 96 {
            return Err(Error::NotFound(format!("exFAT node {id}")));
        }
        self.vol.read_exact_at(&mut set[..n], id)?;
        match parse_set(&set[..n]) {
            Some(Ok((node, _))) => Ok(Arc::new(node)),
            _ => Err(Error::NotFound(format!("exFAT node {id}"))),
        }
    }

    fn runs_of(&self, first: u32, no_fat_chain: bool, len: u64) -> Result<Arc<ClusterRuns>> {
        let clusters = len.div_ceil(self.cluster_size);
        // The runs depend only on the cluster count (below 2^55: the cluster size is at least
        // 512), so the key is exact, where `len << 1` would drop len's top bit.
        self.runs.get_or((first, clusters << 1 | no_fat_chain as u64), || {
            let runs = if no_fat_chain {
                let last = first as u64 + clusters;
                if !self.fat.valid_cluster(first)
                    || last > self.fat.cluster_count as u64 + 2
                {
                    return Err(Error::corrupt(
                        FS,
                        format!(
                            "contiguous extent of {clusters} clusters at cluster {first} leaves the volume"
                        ),
                    ));
                }
                vec![Run {
                    first,
                    count: clusters as u32,
                }]
            } else {
                self.fat.chain(first, Some(clusters))?
            };
            Ok(ClusterRuns {
                runs,
                cluster_size: self.cluster_size,
                heap_offset: self.heap_offset,
            })
        })
    }

    fn dir_data(&self, dir: NodeId) -> Result<(Vec<u8>, Arc<ClusterRuns>)> {
        let runs = if dir == ROOT_NODE {
            let limit = MAX_DIR_BYTES / self.cluster_size;
            let r = self.fat.chain(self.root_cluster, Some(limit))?;
            Arc::new(ClusterRuns {
                runs: r,
                cluster_size: self.cluster_size,
                heap_offset: self.heap_offset,
            })
        } else {
            let n = self.node(dir)?;
            if !n.is_dir() {
                return Err(Error::NotADirectory(format!("exFAT node {dir}")));
            }
            if n.data_len > MAX_DIR_BYTES {
                return Err(Error::corrupt(
                    FS,
                    format!(
                        "directory of {} bytes exceeds the 256 MiB limit",
                        n.data_len
                    ),
                ));
            }
            if n.data_len == 0 {
                return Err(Error::corrupt(FS, "directory without clusters"));
            }
            self.runs_of(n.first_cluster, n.no_fat_chain, n.data_len)?
        };
        let len = if dir == ROOT_NODE {
            runs.bytes()
        } else {
            self.node(dir)?.data_len
        };
        // Check before allocating: a chain that ends early must not cost the claimed size.
        if runs.bytes() < len {
            return Err(Error::corrupt(
                FS,
                format!(
                    "directory of {len} bytes has only {} bytes of clusters",
                    runs.bytes()
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        runs.read(&self.vol, FS, &mut buf, 0)?;
        Ok((buf, runs))
    }
}

/// Parse the entry set starting at `set[0]` (a 0x85 entry). None if it is not a file entry;
/// Err if it is damaged. Returns the node and the number of entries used.
fn parse_set(set: &[u8]) -> Option<Result<(ExNode, usize)>> {
    if set.len() < 32 || set[0] != 0x85 {
        return None;
    }
    let sc = set[1] as usize;
    let bad = |s: String| Some(Err(Error::corrupt(FS, s)));
    if !(2..=18).contains(&sc) {
        return bad(format!("file entry with {sc} secondary entries (2..18)"));
    }
    let total = (sc + 1) * 32;
    if set.len() < total {
        return bad("file entry set runs past the directory's end".into());
    }
    let s = &set[..total];
    let stored = u16le(s, 2);
    let computed = set_checksum(s);
    if stored != computed {
        return bad(format!(
            "file entry set checksum is {stored:04x}, computed {computed:04x}"
        ));
    }
    let st = &s[32..64];
    if st[0] != 0xC0 {
        return bad(format!(
            "file entry not followed by a stream extension (type {:02x})",
            st[0]
        ));
    }
    let name_len = st[3] as usize;
    let mut name = Vec::with_capacity(name_len);
    for k in 2..=sc {
        let e = &s[k * 32..k * 32 + 32];
        if e[0] != 0xC1 {
            continue;
        }
        for i in 0..15 {
            if name.len() < name_len {
                name.push(u16le(e, 2 + 2 * i));
            }
        }
    }
    if name.len() != name_len || name_len == 0 {
        return bad(format!(
            "name of {name_len} characters, {} found in the entry set",
            name.len()
        ));
    }
    let f = &s[0..32];
    let node = ExNode {
        attrs: u16le(f, 4),
        first_cluster: u32le(st, 20),
        no_fat_chain: st[1] & 0x02 != 0,
        valid_len: u64le(st, 8),
        data_len: u64le(st, 24),
        create: timestamp(u32le(f, 8), f[20], f[22]),
        modify: timestamp(u32le(f, 12), f[21], f[23]),
        access: timestamp(u32le(f, 16), 0, f[24]),
        name,
    };
    if node.valid_len > node.data_len {
        return bad(format!(
            "valid data length {} exceeds the data length {}",
            node.valid_len, node.data_len
        ));
    }
    Some(Ok((node, sc + 1)))
}

impl GuestFs for ExfatFs {
    fn kind(&self) -> FsKind {
        FsKind::Exfat
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
        let mut i = 0usize;
        let count = data.len() / 32;
        while i < count {
            let e = &data[i * 32..];
            match e[0] {
                0x00 => break,
                0x85 => {
                    let (node, used) = parse_set(e).expect("type checked")?;
                    let id = runs
                        .volume_offset(i as u64 * 32)
                        .ok_or_else(|| Error::corrupt(FS, "entry outside its directory"))?;
                    let name = String::from_utf16_lossy(&node.name);
                    let lossy = String::from_utf16(&node.name).is_err();
                    let file_type = if node.is_dir() {
                        FileType::Directory
                    } else {
                        FileType::File
                    };
                    i += used;
                    if name == "." || name == ".." {
                        continue;
                    }
                    let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
                    if nodes.len() >= NODE_CACHE {
                        nodes.clear();
                    }
                    nodes.insert(id, Arc::new(node));
                    out.push(DirEntry {
                        name,
                        name_lossy: lossy,
                        node: id,
                        file_type,
                    });
                }
                _ => i += 1,
            }
        }
        Ok(out)
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        if node == ROOT_NODE {
            return Ok(Metadata {
                node,
                file_type: FileType::Directory,
                nlink: 1,
                windows_attributes: Some(0x10),
                ..Default::default()
            });
        }
        let n = self.node(node)?;
        let is_dir = n.is_dir();
        Ok(Metadata {
            node,
            file_type: if is_dir {
                FileType::Directory
            } else {
                FileType::File
            },
            size: if is_dir { 0 } else { n.data_len },
            allocated: n
                .data_len
                .div_ceil(self.cluster_size)
                .saturating_mul(self.cluster_size),
            mtime: n.modify,
            atime: n.access,
            ctime: None,
            btime: n.create,
            windows_attributes: Some((n.attrs & 0x37) as u32),
            nlink: 1,
            ..Default::default()
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
            return Err(Error::NotFound(format!("exFAT has no named streams ({s})")));
        }
        if node == ROOT_NODE {
            return Err(Error::InvalidArgument("the root is a directory".into()));
        }
        let n = self.node(node)?;
        if n.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "exFAT node {node} is a directory"
            )));
        }
        let len = clamp_read(n.data_len, buf, offset);
        if len == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..len];
        // Bytes at or past ValidDataLength read as zeros; only the valid part is on disk.
        let valid = clamp_read(n.valid_len, buf, offset);
        buf[valid..].fill(0);
        if valid > 0 {
            if n.first_cluster == 0 {
                return Err(Error::corrupt(
                    FS,
                    format!("file of {} bytes has no clusters", n.valid_len),
                ));
            }
            let runs = self.runs_of(n.first_cluster, n.no_fat_chain, n.valid_len)?;
            runs.read(&self.vol, FS, &mut buf[..valid], offset)?;
        }
        Ok(len)
    }

    fn read_link(&self, node: NodeId) -> Result<LinkTarget> {
        Err(Error::InvalidArgument(format!(
            "exFAT node {node} is not a symbolic link (exFAT has none)"
        )))
    }

    fn lookup(&self, path: &str) -> Result<NodeId> {
        let mut node = self.root();
        for comp in path
            .split(['/', '\\'])
            .filter(|c| !c.is_empty() && *c != ".")
        {
            let want: Vec<u16> = comp.encode_utf16().map(|u| self.up(u)).collect();
            let found = self
                .read_dir(node)?
                .into_iter()
                .find(|e| {
                    let have: Vec<u16> = e.name.encode_utf16().map(|u| self.up(u)).collect();
                    have == want
                })
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            node = found.node;
        }
        Ok(node)
    }

    fn dir_key(&self, node: NodeId) -> Result<u64> {
        if node == ROOT_NODE {
            return Ok(self.root_cluster as u64);
        }
        Ok(self.node(node)?.first_cluster as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_apply_the_utc_offset_in_15_minute_steps() {
        let date: u32 = (41 << 9) | (3 << 5) | 4; // 2021-03-04
        let time: u32 = (5 << 11) | (6 << 5) | 4; // 05:06:08
        let ts = date << 16 | time;
        let local = 1_614_834_368i128 * 1_000_000_000 + 550_000_000;
        let hour = 3_600_000_000_000i128;
        // No valid offset: the stored digits as UTC.
        assert_eq!(timestamp(ts, 55, 0), Some(local));
        // UTC+09:00 (36 steps): UTC is nine hours earlier.
        assert_eq!(timestamp(ts, 55, 0x80 | 36), Some(local - 9 * hour));
        // UTC-05:30 (-22 steps, 7-bit two's complement 0x6A).
        assert_eq!(
            timestamp(ts, 55, 0x80 | 0x6A),
            Some(local + 5 * hour + hour / 2)
        );
    }

    #[test]
    fn checksums() {
        // The entry-set checksum skips bytes 2 and 3 (where it is stored).
        let mut set = [0u8; 64];
        set[0] = 0x85;
        set[32] = 0xC0;
        let c = set_checksum(&set);
        set[2] = 0xFF;
        set[3] = 0xEE;
        assert_eq!(set_checksum(&set), c);
        set[4] = 1;
        assert_ne!(set_checksum(&set), c);
    }
}
