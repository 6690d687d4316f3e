//! Small pieces the filesystems share: little-endian field access, calendar arithmetic, and the
//! FAT-style cluster chains of FAT12/16/32 and exFAT (one table, one chain walker with loop and
//! bounds checks, one run list to read file bytes through).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::volume::Volume;
use crate::{Error, Result};

pub(crate) fn u16le(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn u32le(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn u64le(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// A DOS date/time (FAT, exFAT) as nanoseconds since the epoch, taking the stored wall-clock
/// value as UTC. `centis` adds 0–199 hundredths. None for the "no date" value 0 and invalid
/// fields (month 0 or 13+, day 0, hour 24+...).
pub(crate) fn dos_datetime(date: u16, time: u16, centis: u8) -> Option<i128> {
    if date == 0 {
        return None;
    }
    let day = (date & 0x1F) as u32;
    let month = ((date >> 5) & 0x0F) as u32;
    let year = 1980 + (date >> 9) as i64;
    let sec2 = (time & 0x1F) as i64;
    let min = ((time >> 5) & 0x3F) as i64;
    let hour = (time >> 11) as i64;
    if day == 0 || !(1..=12).contains(&month) || hour > 23 || min > 59 || sec2 > 29 || centis > 199
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86400 + hour * 3600 + min * 60 + sec2 * 2;
    Some(secs as i128 * 1_000_000_000 + centis as i128 * 10_000_000)
}

/// Which flavour of allocation table: the entry width and the end/bad markers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FatWidth {
    Fat12,
    Fat16,
    Fat32,
    Exfat,
}

/// A run of consecutive clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub first: u32,
    pub count: u32,
}

/// The allocation table, read lazily in blocks with a small cache (a FAT32 table on a 2 TiB
/// volume is hundreds of MiB; we never load it whole).
pub(crate) struct FatTable {
    pub vol: Volume,
    pub fs: &'static str,
    pub offset: u64,
    pub bytes: u64,
    pub width: FatWidth,
    /// Clusters in the heap; valid cluster numbers are 2..cluster_count+2.
    pub cluster_count: u32,
    cache: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
}

const FAT_BLOCK: u64 = 64 << 10;
const FAT_CACHE_BLOCKS: usize = 64;

impl FatTable {
    pub fn new(
        vol: Volume,
        fs: &'static str,
        offset: u64,
        bytes: u64,
        width: FatWidth,
        cluster_count: u32,
    ) -> FatTable {
        FatTable {
            vol,
            fs,
            offset,
            bytes,
            width,
            cluster_count,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn byte(&self, pos: u64) -> Result<u8> {
        if pos >= self.bytes {
            return Err(Error::corrupt(
                self.fs,
                format!(
                    "FAT entry byte {pos} is past the FAT's end ({} bytes)",
                    self.bytes
                ),
            ));
        }
        let blk = pos / FAT_BLOCK;
        let data = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(&blk).cloned()
        };
        let data = match data {
            Some(d) => d,
            None => {
                let start = blk * FAT_BLOCK;
                let len = FAT_BLOCK.min(self.bytes - start) as usize;
                let mut buf = vec![0u8; len];
                self.vol.read_exact_at(&mut buf, self.offset + start)?;
                let d = Arc::new(buf);
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= FAT_CACHE_BLOCKS {
                    cache.clear();
                }
                cache.insert(blk, d.clone());
                d
            }
        };
        Ok(data[(pos - blk * FAT_BLOCK) as usize])
    }

    fn entry(&self, n: u32) -> Result<u32> {
        let n64 = n as u64;
        Ok(match self.width {
            FatWidth::Fat12 => {
                let o = n64 + n64 / 2;
                let v = self.byte(o)? as u32 | (self.byte(o + 1)? as u32) << 8;
                if n & 1 == 1 {
                    v >> 4
                } else {
                    v & 0xFFF
                }
            }
            FatWidth::Fat16 => self.byte(n64 * 2)? as u32 | (self.byte(n64 * 2 + 1)? as u32) << 8,
            FatWidth::Fat32 | FatWidth::Exfat => {
                let o = n64 * 4;
                let v = u32::from_le_bytes([
                    self.byte(o)?,
                    self.byte(o + 1)?,
                    self.byte(o + 2)?,
                    self.byte(o + 3)?,
                ]);
                if self.width == FatWidth::Fat32 {
                    v & 0x0FFF_FFFF
                } else {
                    v
                }
            }
        })
    }

    pub fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && (c as u64) < self.cluster_count as u64 + 2
    }

    /// The cluster after `c`, or None at the end of the chain.
    pub fn next(&self, c: u32) -> Result<Option<u32>> {
        let v = self.entry(c)?;
        let (bad, eoc) = match self.width {
            FatWidth::Fat12 => (0xFF7, 0xFF8),
            FatWidth::Fat16 => (0xFFF7, 0xFFF8),
            FatWidth::Fat32 => (0x0FFF_FFF7, 0x0FFF_FFF8),
            FatWidth::Exfat => (0xFFFF_FFF7, 0xFFFF_FFF8),
        };
        if v >= eoc {
            return Ok(None);
        }
        if v == bad {
            return Err(Error::corrupt(
                self.fs,
                format!("cluster chain reaches cluster {c}, which the FAT marks bad"),
            ));
        }
        if v == 0 {
            return Err(Error::corrupt(
                self.fs,
                format!("cluster chain continues from cluster {c} into a free cluster"),
            ));
        }
        if !self.valid_cluster(v) {
            return Err(Error::corrupt(
                self.fs,
                format!(
                    "FAT entry of cluster {c} points to cluster {v}, outside the volume's {} clusters",
                    self.cluster_count
                ),
            ));
        }
        Ok(Some(v))
    }

    /// Follow a chain from `first`, at most `limit` clusters (None: to its end). Refuses loops
    /// (a cluster seen twice) and clusters outside the heap.
    pub fn chain(&self, first: u32, limit: Option<u64>) -> Result<Vec<Run>> {
        let mut runs: Vec<Run> = Vec::new();
        // Runs by first cluster, to find a revisited cluster in O(log n).
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        let mut total = 0u64;
        let mut cur = Some(first);
        if !self.valid_cluster(first) {
            return Err(Error::corrupt(
                self.fs,
                format!(
                    "chain starts at cluster {first}, outside the volume's {} clusters",
                    self.cluster_count
                ),
            ));
        }
        while let Some(c) = cur {
            if limit.is_some_and(|l| total >= l) {
                break;
            }
            if let Some((&s, &n)) = seen.range(..=c).next_back() {
                if c < s + n {
                    return Err(Error::corrupt(
                        self.fs,
                        format!("cluster chain starting at {first} loops back to cluster {c}"),
                    ));
                }
            }
            match runs.last_mut() {
                Some(r) if r.first as u64 + r.count as u64 == c as u64 => {
                    r.count += 1;
                    *seen.get_mut(&r.first).expect("run recorded") += 1;
                }
                _ => {
                    runs.push(Run { first: c, count: 1 });
                    seen.insert(c, 1);
                }
            }
            total += 1;
            if total > self.cluster_count as u64 {
                return Err(Error::corrupt(
                    self.fs,
                    format!("cluster chain starting at {first} is longer than the volume"),
                ));
            }
            cur = self.next(c)?;
        }
        Ok(runs)
    }
}

/// Where a file's bytes are: runs of clusters in the heap.
#[derive(Clone, Debug)]
pub(crate) struct ClusterRuns {
    pub runs: Vec<Run>,
    pub cluster_size: u64,
    /// Volume offset of cluster 2.
    pub heap_offset: u64,
}

impl ClusterRuns {
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.count as u64).sum::<u64>() * self.cluster_size
    }

    /// Read `buf.len()` bytes at `pos` of the run list; errors if the runs end first.
    pub fn read(&self, vol: &Volume, fs: &'static str, buf: &mut [u8], pos: u64) -> Result<()> {
        let mut done = 0usize;
        let mut run_start = 0u64;
        for r in &self.runs {
            let run_len = r.count as u64 * self.cluster_size;
            let want = pos + done as u64;
            if done == buf.len() {
                break;
            }
            if want < run_start + run_len {
                let within = want - run_start;
                let n = ((run_len - within) as usize).min(buf.len() - done);
                let off = self.heap_offset + (r.first as u64 - 2) * self.cluster_size + within;
                vol.read_exact_at(&mut buf[done..done + n], off)?;
                done += n;
            }
            run_start += run_len;
        }
        if done < buf.len() {
            return Err(Error::corrupt(
                fs,
                format!(
                    "the file's clusters end after {} bytes, but {} bytes at offset {pos} were needed",
                    self.bytes(),
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Volume offset of byte `pos` (for directory entries' node ids).
    pub fn volume_offset(&self, pos: u64) -> Option<u64> {
        let mut run_start = 0u64;
        for r in &self.runs {
            let run_len = r.count as u64 * self.cluster_size;
            if pos < run_start + run_len {
                return Some(
                    self.heap_offset + (r.first as u64 - 2) * self.cluster_size + pos - run_start,
                );
            }
            run_start += run_len;
        }
        None
    }
}

/// Bounded cache of cluster run lists by first cluster, so a sequential read of a big file does
/// not walk its chain again for every buffer.
pub(crate) struct RunCache {
    map: Mutex<HashMap<(u32, u64), Arc<ClusterRuns>>>,
}

impl RunCache {
    pub fn new() -> RunCache {
        RunCache {
            map: Mutex::new(HashMap::new()),
        }
    }
    pub fn get_or(
        &self,
        key: (u32, u64),
        make: impl FnOnce() -> Result<ClusterRuns>,
    ) -> Result<Arc<ClusterRuns>> {
        if let Some(r) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(r.clone());
        }
        let r = Arc::new(make()?);
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= 256 {
            m.clear();
        }
        m.insert(key, r.clone());
        Ok(r)
    }
}

/// Copy the part of a data stream of `size` bytes at `offset` into `buf` through `read`
/// (which gets an in-bounds range); returns bytes copied, 0 at or past the end.
pub(crate) fn clamp_read(size: u64, buf: &mut [u8], offset: u64) -> usize {
    if offset >= size {
        0
    } else {
        ((size - offset).min(buf.len() as u64)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_datetime_fields_and_invalid_values() {
        // 2021-03-04 05:06:08 + 1.23 s: date = (41 << 9) | (3 << 5) | 4, time = (5 << 11) | (6 << 5) | 4.
        let date = (41 << 9) | (3 << 5) | 4;
        let time = (5 << 11) | (6 << 5) | 4;
        let secs = 1_614_834_368i128; // `date -u -d '2021-03-04 05:06:08' +%s`
        assert_eq!(
            dos_datetime(date, time, 123),
            Some(secs * 1_000_000_000 + 1_230_000_000)
        );
        assert_eq!(dos_datetime(0, time, 0), None);
        assert_eq!(dos_datetime((41 << 9) | (13 << 5) | 4, 0, 0), None);
        assert_eq!(dos_datetime(date, 24 << 11, 0), None);
        assert_eq!(dos_datetime(date, time, 200), None);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
    }
}
