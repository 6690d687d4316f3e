//! NTFS, read-only, written for hyperkeep.
//!
//! Why our own reader: the `ntfs` crate (0.4) returns LZNT1-compressed files as raw compressed
//! bytes without an error, shows reparse points (symlinks, junctions, WOF) only as raw bytes,
//! fails on a directory whose index allocation is split across MFT records, cannot reach records
//! past the first extent when `$MFT` itself has an attribute list, panics without an upcase table
//! and caches nothing. Real Windows volumes have all of these, and a backup tool must never hand
//! back wrong bytes silently, so we read NTFS ourselves and refuse clearly what we cannot decode.
//!
//! Map of the module:
//! - `boot`: boot sector geometry and [`probe`].
//! - `record`: update-sequence fixups, file records, attributes, attribute lists.
//! - `runlist`: mapping pairs, bounds and overlap checks.
//! - `lznt1`: decompression of compressed files.
//! - `xpress`: XPRESS Huffman, for WOF/CompactOS files (XPRESS4K/8K/16K; LZX is refused).
//! - `reparse`: symlinks, junctions, WOF.
//! - `index`: directories (`$I30` B+ tree walk and search, `$UpCase` collation, loop checks).
//! - `data`: reading streams: plain, sparse, LZNT1 units, WOF chunks.
//! - this file: [`NtfsFs`] (boot, `$MFT` bootstrap through its own attribute list, files with
//!   their extension records, caches) implementing [`GuestFs`].
//!
//! Safety: every run is checked against the volume, runs of one attribute must not overlap,
//! extents of one attribute must be contiguous, index walks keep a visited set and a depth cap,
//! and every allocation is bounded by real data or a fixed limit. Damage is `Error::Corrupt`
//! naming the record; unsupported encodings (EFS, WOF with LZX, deduplication) are `Error::Unsupported`.

mod boot;
mod data;
mod index;
mod lznt1;
mod record;
mod reparse;
mod runlist;
mod xpress;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use crate::fs::{DirEntry, FileType, FsKind, GuestFs, LinkTarget, Metadata, NodeId, StreamInfo};
use crate::volume::Volume;
use crate::{Error, Result};

use index::parse_file_name;
use record::*;
use reparse::Reparse;
use runlist::Run;

pub use boot::probe;

fn corrupt(detail: impl Into<String>) -> Error {
    Error::corrupt("NTFS", detail)
}

/// Record number of the root directory.
pub const ROOT: u64 = 5;
const UPCASE_RECORD: u64 = 10;
const VOLUME_RECORD: u64 = 3;
/// Records below this number are NTFS metadata files; their `$` names are hidden from listings.
const FIRST_USER_RECORD: u64 = 24;
/// Limits on things a hostile header could make us loop over or allocate.
const MAX_EXTENSION_RECORDS: usize = 4096;
const MAX_METADATA_STREAM: u64 = 16 * 1024 * 1024;
const MAX_INDEX_DEPTH: usize = 64;
const MAX_COMPRESSION_UNIT: u64 = 1024 * 1024;
const FILE_CACHE: usize = 4096;
const FILE_CACHE_BYTES: usize = 64 * 1024 * 1024;
const UNIT_CACHE: usize = 32;
const UNIT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Windows FILETIME (100 ns since 1601) to ns since the Unix epoch.
fn filetime(ft: u64) -> i128 {
    (ft as i128 - 116_444_736_000_000_000) * 100
}

/// A small least-recently-used map behind the filesystem's mutexes, bounded both in entries and
/// in approximate bytes (a hostile volume can make single entries large).
struct Lru<K, V> {
    map: HashMap<K, (V, u64, usize)>,
    tick: u64,
    cap: usize,
    max_bytes: usize,
    bytes: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Lru<K, V> {
    fn new(cap: usize, max_bytes: usize) -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
            cap,
            max_bytes,
            bytes: 0,
        }
    }
    fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }
    fn insert(&mut self, k: K, v: V, weight: usize) {
        if weight > self.max_bytes / 4 {
            // Too big to be worth keeping: callers re-read it.
            return;
        }
        if let Some(old) = self.map.remove(&k) {
            self.bytes -= old.2;
        }
        while !self.map.is_empty()
            && (self.map.len() >= self.cap || self.bytes + weight > self.max_bytes)
        {
            // Drop the older half at once so eviction stays cheap on average.
            let mut ticks: Vec<u64> = self.map.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            self.map.retain(|_, e| e.1 > cut);
            self.bytes = self.map.values().map(|e| e.2).sum();
        }
        self.tick += 1;
        self.bytes += weight;
        self.map.insert(k, (v, self.tick, weight));
    }
}

/// One attribute's data, all extents merged.
#[derive(Clone, Debug)]
struct Stream {
    name: String,
    flags: u16,
    resident: Option<Vec<u8>>,
    runs: Vec<Run>,
    data_size: u64,
    init_size: u64,
    alloc_size: u64,
    total_alloc: Option<u64>,
    compression_unit: u8,
}

impl Stream {
    fn allocated(&self) -> u64 {
        if self.resident.is_some() {
            0
        } else {
            self.total_alloc.unwrap_or(self.alloc_size)
        }
    }
    fn is_compressed(&self) -> bool {
        self.resident.is_none() && self.flags & ATTR_COMPRESSED != 0
    }
}

#[derive(Clone, Debug)]
struct FileName {
    parent: u64,
    namespace: u8,
    name: String,
}

#[derive(Debug)]
struct File {
    num: u64,
    seq: u16,
    is_dir: bool,
    std_info: Option<Vec<u8>>,
    names: Vec<FileName>,
    data: Vec<Stream>,
    index_root: Option<Vec<u8>>,
    index_alloc: Option<Stream>,
    index_bitmap: Option<Vec<u8>>,
    reparse: Option<Vec<u8>>,
}

impl File {
    /// Approximate memory held, for the cache's byte bound.
    fn weight(&self) -> usize {
        let stream = |s: &Stream| {
            s.resident.as_ref().map_or(0, |r| r.len())
                + s.runs.len() * std::mem::size_of::<Run>()
                + 64
        };
        256 + self.data.iter().map(stream).sum::<usize>()
            + self.index_alloc.as_ref().map_or(0, stream)
            + self.index_root.as_ref().map_or(0, |r| r.len())
            + self.index_bitmap.as_ref().map_or(0, |r| r.len())
            + self.reparse.as_ref().map_or(0, |r| r.len())
            + self.names.iter().map(|n| n.name.len() + 32).sum::<usize>()
    }
    fn display_name(&self) -> String {
        self.names
            .iter()
            .find(|n| n.namespace != 2)
            .or(self.names.first())
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("MFT record {}", self.num))
    }
    fn reparse(&self) -> Option<Reparse> {
        self.reparse.as_deref().and_then(|r| reparse::parse(r).ok())
    }
    fn file_type(&self) -> FileType {
        match self.reparse.as_deref().and_then(reparse::tag) {
            Some(reparse::TAG_SYMLINK) => FileType::Symlink,
            Some(reparse::TAG_MOUNT_POINT) => FileType::Junction,
            Some(t) if t & reparse::NAME_SURROGATE != 0 => FileType::Other,
            _ if self.is_dir => FileType::Directory,
            _ => FileType::File,
        }
    }
    fn stream(&self, name: &str) -> Option<&Stream> {
        self.data.iter().find(|s| s.name == name).or_else(|| {
            self.data
                .iter()
                .find(|s| s.name.to_uppercase() == name.to_uppercase())
        })
    }
}

/// Positioned reads of attribute data on the volume (shared by bootstrap and the open fs).
struct Geo {
    vol: Volume,
    cluster: u64,
    total_clusters: u64,
    record_size: u32,
}

impl Geo {
    /// Read the clusters of `runs` covering bytes `offset..offset+buf.len()` of the attribute, in
    /// one volume read per run piece.
    fn read_runs(
        &self,
        what: &dyn Fn() -> String,
        runs: &[Run],
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let cs = self.cluster;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vcn = pos / cs;
            let i = runlist::find(runs, vcn).ok_or_else(|| {
                corrupt(format!(
                    "{}: byte {pos} lies beyond the attribute's runlist",
                    what()
                ))
            })?;
            let run = runs[i];
            let into_run = pos - run.vcn * cs;
            let avail = run.len * cs - into_run;
            let take = avail.min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + take];
            match run.lcn {
                None => piece.fill(0),
                Some(lcn) => self.vol.read_exact_at(piece, lcn * cs + into_run)?,
            }
            done += take;
        }
        Ok(())
    }

    /// Read an uncompressed stream (resident or not), honouring initialized size.
    fn read_plain(
        &self,
        what: &dyn Fn() -> String,
        s: &Stream,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize> {
        if offset >= s.data_size {
            return Ok(0);
        }
        let n = (s.data_size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        if let Some(r) = &s.resident {
            let start = offset as usize;
            buf.copy_from_slice(&r[start..start + n]);
            return Ok(n);
        }
        let valid = s.init_size.saturating_sub(offset).min(n as u64) as usize;
        buf[valid..].fill(0);
        self.read_runs(what, &s.runs, &mut buf[..valid], offset)?;
        Ok(n)
    }

    /// Read a whole (small) metadata stream into memory, bounded.
    fn read_all(&self, what: &dyn Fn() -> String, s: &Stream) -> Result<Vec<u8>> {
        if s.data_size > MAX_METADATA_STREAM {
            return Err(corrupt(format!(
                "{}: size {} is absurd",
                what(),
                s.data_size
            )));
        }
        if s.is_compressed() {
            return Err(corrupt(format!(
                "{}: metadata stream is compressed",
                what()
            )));
        }
        let mut v = vec![0u8; s.data_size as usize];
        self.read_plain(what, s, &mut v, 0)?;
        Ok(v)
    }

    /// Read MFT record `n` through the `$MFT` data stream `mft` and apply its fixups.
    fn read_record(&self, mft: &Stream, n: u64) -> Result<Vec<u8>> {
        let rs = self.record_size as u64;
        let off = n
            .checked_mul(rs)
            .filter(|o| o.checked_add(rs).is_some_and(|end| end <= mft.data_size))
            .ok_or_else(|| corrupt(format!("MFT record {n} is beyond the end of $MFT")))?;
        let mut buf = vec![0u8; rs as usize];
        let what = || format!("$MFT (reading record {n})");
        self.read_runs(&what, &mft.runs, &mut buf, off)?;
        apply_fixups(&mut buf, b"FILE").map_err(|e| corrupt(format!("MFT record {n}: {e}")))?;
        Ok(buf)
    }

    /// Merge the extents of one attribute (sorted by starting VCN) into a stream.
    fn build_stream(
        &self,
        what: &dyn Fn() -> String,
        mut extents: Vec<&Attr>,
        need_full: bool,
    ) -> Result<Stream> {
        extents.sort_by_key(|a| match &a.body {
            Body::NonResident(nr) => nr.start_vcn,
            Body::Resident(_) => 0,
        });
        let first = extents[0];
        if let Body::Resident(v) = &first.body {
            if extents.len() > 1 {
                return Err(corrupt(format!(
                    "{}: resident attribute with several extents",
                    what()
                )));
            }
            return Ok(Stream {
                name: first.name.clone(),
                flags: first.flags,
                resident: Some(v.clone()),
                runs: Vec::new(),
                data_size: v.len() as u64,
                init_size: v.len() as u64,
                alloc_size: v.len() as u64,
                total_alloc: None,
                compression_unit: 0,
            });
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut next_vcn = 0u64;
        let mut head = None;
        for a in &extents {
            let Body::NonResident(nr) = &a.body else {
                return Err(corrupt(format!(
                    "{}: resident and non-resident extents mixed",
                    what()
                )));
            };
            if nr.start_vcn != next_vcn {
                return Err(corrupt(format!(
                    "{}: extent starts at VCN {} but the previous one ended at {next_vcn} (missing, overlapping or looping extents)",
                    what(),
                    nr.start_vcn
                )));
            }
            if head.is_none() {
                head = Some(nr);
            }
            runs.extend_from_slice(&nr.runs);
            next_vcn = runs.last().map(|r| r.vcn + r.len).unwrap_or(next_vcn);
        }
        let head = head.expect("at least one extent");
        runlist::check_no_overlap(&runs).map_err(|e| corrupt(format!("{}: {e}", what())))?;
        let covered = next_vcn
            .checked_mul(self.cluster)
            .ok_or_else(|| corrupt(format!("{}: runlist too long", what())))?;
        if need_full && head.data_size > covered {
            return Err(corrupt(format!(
                "{}: data size {} exceeds the {covered} bytes its runlist maps",
                what(),
                head.data_size
            )));
        }
        Ok(Stream {
            name: first.name.clone(),
            flags: first.flags,
            resident: None,
            runs,
            data_size: head.data_size,
            init_size: head.init_size,
            alloc_size: head.alloc_size,
            total_alloc: head.total_alloc,
            compression_unit: head.compression_unit,
        })
    }
}

/// A decompressed piece of a file: (MFT record, stream name, unit number) for an LZNT1
/// compression unit, stream `None` for a WOF chunk. Separate keys matter: the two have different
/// sizes, and any string (even "\0wof") can be a stream name on a hostile volume.
type UnitKey = (u64, Option<String>, u64);

/// An open NTFS volume.
pub struct NtfsFs {
    geo: Geo,
    boot: boot::Boot,
    mft: Stream,
    label: Option<String>,
    upcase: OnceLock<Option<Vec<u16>>>,
    files: Mutex<Lru<u64, Arc<File>>>,
    units: Mutex<Lru<UnitKey, Arc<Vec<u8>>>>,
}

impl std::fmt::Debug for NtfsFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtfsFs")
            .field("label", &self.label)
            .field("cluster_size", &self.geo.cluster)
            .field("record_size", &self.geo.record_size)
            .field(
                "mft_records",
                &(self.mft.data_size / self.geo.record_size as u64),
            )
            .finish()
    }
}

/// Open the NTFS filesystem in `volume`.
pub fn open(volume: Volume) -> Result<NtfsFs> {
    NtfsFs::open(volume)
}

impl NtfsFs {
    pub fn open(vol: Volume) -> Result<NtfsFs> {
        let mut bs = [0u8; 512];
        vol.read_exact_at(&mut bs, 0)?;
        let boot = boot::parse(&bs)?;
        let volume_bytes = (boot
            .total_sectors
            .saturating_mul(boot.bytes_per_sector as u64))
        .min(vol.len());
        let geo = Geo {
            total_clusters: volume_bytes / boot.cluster_size,
            cluster: boot.cluster_size,
            record_size: boot.record_size,
            vol,
        };
        let mft = Self::bootstrap_mft(&geo, &boot)?;
        let mut fs = NtfsFs {
            geo,
            boot,
            mft,
            label: None,
            upcase: OnceLock::new(),
            files: Mutex::new(Lru::new(FILE_CACHE, FILE_CACHE_BYTES)),
            units: Mutex::new(Lru::new(UNIT_CACHE, UNIT_CACHE_BYTES)),
        };
        // The root must be readable for the filesystem to be of any use; say so now.
        let root = fs.file(ROOT)?;
        if !root.is_dir {
            return Err(corrupt("record 5 (root directory) is not a directory"));
        }
        fs.label = fs.read_label();
        Ok(fs)
    }

    /// `$MFT`'s own runlist: record 0 holds the first extent; if `$MFT` has an attribute list,
    /// further extents live in extension records which must be reachable through the extents
    /// known so far.
    fn bootstrap_mft(geo: &Geo, boot: &boot::Boot) -> Result<Stream> {
        let rs = geo.record_size as usize;
        let mut buf = vec![0u8; rs];
        let off = boot
            .mft_lcn
            .checked_mul(geo.cluster)
            .ok_or_else(|| corrupt("$MFT location overflows"))?;
        geo.vol
            .read_exact_at(&mut buf, off)
            .map_err(|e| corrupt(format!("cannot read $MFT record 0 at byte {off}: {e}")))?;
        apply_fixups(&mut buf, b"FILE").map_err(|e| corrupt(format!("MFT record 0: {e}")))?;
        let rec0 = parse_record(&buf, geo.total_clusters)
            .map_err(|e| corrupt(format!("MFT record 0: {e}")))?;
        let what = || "$MFT $DATA".to_string();
        let mut extents: Vec<Attr> = rec0
            .attrs
            .iter()
            .filter(|a| a.ty == AT_DATA && a.name.is_empty())
            .cloned()
            .collect();
        if extents.is_empty() {
            return Err(corrupt("MFT record 0 has no $DATA attribute"));
        }
        if let Some(al) = rec0.attrs.iter().find(|a| a.ty == AT_ATTRIBUTE_LIST) {
            let alw = || "$MFT $ATTRIBUTE_LIST".to_string();
            let list_stream = geo.build_stream(&alw, vec![al], true)?;
            let bytes = geo.read_all(&alw, &list_stream)?;
            let entries = parse_attribute_list(&bytes)
                .map_err(|e| corrupt(format!("$MFT attribute list: {e}")))?;
            let mut pending: Vec<&ListEntry> = entries
                .iter()
                .filter(|e| e.ty == AT_DATA && e.name.is_empty() && e.record != 0)
                .collect();
            pending.sort_by_key(|e| e.start_vcn);
            let mut seen = HashSet::new();
            for e in pending {
                if !seen.insert(e.record) {
                    continue;
                }
                if seen.len() > MAX_EXTENSION_RECORDS {
                    return Err(corrupt(
                        "$MFT attribute list names too many extension records",
                    ));
                }
                let partial = geo.build_stream(&what, extents.iter().collect(), false)?;
                let b = geo.read_record(&partial, e.record).map_err(|err| {
                    corrupt(format!(
                        "$MFT extension record {} (holding its extent from VCN {}) cannot be read through the extents known so far: {err}",
                        e.record, e.start_vcn
                    ))
                })?;
                let r = parse_record(&b, geo.total_clusters)
                    .map_err(|err| corrupt(format!("MFT record {}: {err}", e.record)))?;
                if r.base != 0 || r.flags & RECORD_IN_USE == 0 {
                    return Err(corrupt(format!(
                        "$MFT attribute list points to record {}, which is not an extension of $MFT",
                        e.record
                    )));
                }
                extents.extend(
                    r.attrs
                        .into_iter()
                        .filter(|a| a.ty == AT_DATA && a.name.is_empty()),
                );
            }
        }
        let mft = geo.build_stream(&what, extents.iter().collect(), true)?;
        if mft.resident.is_some()
            || mft.is_compressed()
            || mft.data_size < 16 * geo.record_size as u64
        {
            return Err(corrupt("$MFT $DATA is resident, compressed or too small"));
        }
        Ok(mft)
    }

    fn read_label(&self) -> Option<String> {
        let buf = self.geo.read_record(&self.mft, VOLUME_RECORD).ok()?;
        let r = parse_record(&buf, self.geo.total_clusters).ok()?;
        r.attrs
            .iter()
            .find(|a| a.ty == AT_VOLUME_NAME)
            .and_then(|a| match &a.body {
                Body::Resident(v) => Some(utf16(v).0),
                _ => None,
            })
    }

    /// Volume serial number from the boot sector.
    pub fn serial(&self) -> u64 {
        self.boot.serial
    }

    /// Load a file's base record and its extension records, cached.
    fn file(&self, n: u64) -> Result<Arc<File>> {
        if let Some(f) = self.files.lock().unwrap_or_else(|e| e.into_inner()).get(&n) {
            return Ok(f);
        }
        let f = Arc::new(self.load_file(n)?);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(n, f.clone(), f.weight());
        Ok(f)
    }

    fn load_file(&self, n: u64) -> Result<File> {
        let tc = self.geo.total_clusters;
        let buf = self.geo.read_record(&self.mft, n)?;
        let rec = parse_record(&buf, tc).map_err(|e| corrupt(format!("MFT record {n}: {e}")))?;
        if rec.flags & RECORD_IN_USE == 0 {
            return Err(corrupt(format!(
                "MFT record {n} is not in use (stale reference)"
            )));
        }
        if rec.base != 0 {
            return Err(corrupt(format!(
                "MFT record {n} is an extension record of record {}, not a file",
                rec.base
            )));
        }
        let mut attrs: Vec<Attr> = Vec::new();
        let mut list = None;
        for a in rec.attrs {
            if a.ty == AT_ATTRIBUTE_LIST {
                list = Some(a);
            } else {
                attrs.push(a);
            }
        }
        if let Some(al) = list {
            let w = || format!("MFT record {n} $ATTRIBUTE_LIST");
            let s = self.geo.build_stream(&w, vec![&al], true)?;
            let bytes = self.geo.read_all(&w, &s)?;
            let entries =
                parse_attribute_list(&bytes).map_err(|e| corrupt(format!("{}: {e}", w())))?;
            let mut seen = HashSet::new();
            for e in &entries {
                if e.record == n || !seen.insert(e.record) {
                    continue;
                }
                if seen.len() > MAX_EXTENSION_RECORDS {
                    return Err(corrupt(format!("{}: too many extension records", w())));
                }
                let b = self.geo.read_record(&self.mft, e.record)?;
                let r = parse_record(&b, tc)
                    .map_err(|err| corrupt(format!("MFT record {}: {err}", e.record)))?;
                if r.base != n || r.flags & RECORD_IN_USE == 0 {
                    return Err(corrupt(format!(
                        "{}: points to record {} which is not an extension of record {n}",
                        w(),
                        e.record
                    )));
                }
                // Extension records never carry their own attribute list; ignoring one keeps a
                // hostile image from making us recurse.
                attrs.extend(r.attrs.into_iter().filter(|a| a.ty != AT_ATTRIBUTE_LIST));
            }
        }
        let mut file = File {
            num: n,
            seq: rec.seq,
            is_dir: rec.flags & RECORD_IS_DIRECTORY != 0,
            std_info: None,
            names: Vec::new(),
            data: Vec::new(),
            index_root: None,
            index_alloc: None,
            index_bitmap: None,
            reparse: None,
        };
        // Group extents by (type, name).
        let mut groups: Vec<((u32, String), Vec<&Attr>)> = Vec::new();
        for a in &attrs {
            let key = (a.ty, a.name.clone());
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push(a),
                None => groups.push((key, vec![a])),
            }
        }
        for ((ty, name), exts) in groups {
            let w = || format!("MFT record {n} attribute {ty:#x} '{name}'");
            match ty {
                AT_STANDARD_INFORMATION => {
                    if let Body::Resident(v) = &exts[0].body {
                        file.std_info = Some(v.clone());
                    }
                }
                AT_FILE_NAME => {
                    for a in exts {
                        if let Body::Resident(v) = &a.body {
                            if let Some(fname) = parse_file_name(v) {
                                file.names.push(FileName {
                                    parent: fname.node,
                                    namespace: fname.namespace,
                                    name: fname.name,
                                });
                            }
                        }
                    }
                }
                AT_DATA => file.data.push(self.geo.build_stream(&w, exts, true)?),
                AT_INDEX_ROOT if name == "$I30" => {
                    if let Body::Resident(v) = &exts[0].body {
                        file.index_root = Some(v.clone());
                    }
                }
                AT_INDEX_ALLOCATION if name == "$I30" => {
                    file.index_alloc = Some(self.geo.build_stream(&w, exts, true)?)
                }
                AT_BITMAP if name == "$I30" => {
                    let s = self.geo.build_stream(&w, exts, true)?;
                    file.index_bitmap = Some(self.geo.read_all(&w, &s)?);
                }
                AT_REPARSE_POINT => {
                    let s = self.geo.build_stream(&w, exts, true)?;
                    if s.data_size > 16 * 1024 {
                        return Err(corrupt(format!("{}: reparse data over 16 KiB", w())));
                    }
                    file.reparse = Some(self.geo.read_all(&w, &s)?);
                }
                _ => {}
            }
        }
        Ok(file)
    }
}

impl GuestFs for NtfsFs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    /// Entries of a directory. NTFS metadata files (`$MFT`, `$Extend`, ...) are hidden from the
    /// root listing (a restore must never pick them up); [`GuestFs::lookup`] still finds them.
    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let entries = self.index_entries(dir)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if dir == ROOT && e.node < FIRST_USER_RECORD && e.name.starts_with('$') {
                continue;
            }
            let mut file_type = e.file_type();
            if file_type == FileType::Directory || file_type == FileType::Junction {
                self.check_subdir(dir, &e)?;
                file_type = self.file(e.node)?.file_type();
            }
            out.push(DirEntry {
                name: e.name,
                name_lossy: e.lossy,
                node: e.node,
                file_type,
            });
        }
        Ok(out)
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let f = self.file(node)?;
        let si = f.std_info.as_deref().unwrap_or(&[]);
        let time = |o| le64(si, o).map(filetime);
        let mut attrs = le32(si, 0x20);
        if f.is_dir {
            attrs = attrs.map(|a| a | 0x10);
        }
        let main = f.stream("").filter(|s| s.name.is_empty());
        let nlink = f.names.iter().filter(|n| n.namespace != 2).count().max(1) as u32;
        Ok(Metadata {
            node,
            file_type: f.file_type(),
            size: if f.is_dir {
                0
            } else {
                main.map_or(0, |s| s.data_size)
            },
            allocated: if f.is_dir {
                0
            } else {
                main.map_or(0, |s| s.allocated())
            },
            btime: time(0),
            mtime: time(8),
            ctime: time(0x10),
            atime: time(0x18),
            mode: None,
            uid: None,
            gid: None,
            windows_attributes: attrs,
            nlink,
            streams: f
                .data
                .iter()
                .filter(|s| !s.name.is_empty())
                .map(|s| StreamInfo {
                    name: s.name.clone(),
                    size: s.data_size,
                })
                .collect(),
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
        let f = self.file(node)?;
        let name = stream.unwrap_or("");
        if name.is_empty() {
            if f.is_dir && f.stream("").is_none() {
                return Err(Error::InvalidArgument(format!(
                    "'{}' (MFT record {node}) is a directory",
                    f.display_name()
                )));
            }
            match f.reparse() {
                Some(Reparse::Wof { algorithm }) => {
                    let chunk = match algorithm {
                        Some(0) => 4096,
                        Some(2) => 8192,
                        Some(3) => 16384,
                        _ => {
                            return Err(Error::unsupported(
                                "NTFS",
                                format!(
                                    "'{}' (MFT record {node}) is compressed by the Windows Overlay Filter (WOF/CompactOS, {}); only XPRESS4K/8K/16K are supported — read it inside Windows or expand it there with `compact /u /exe`",
                                    f.display_name(),
                                    reparse::wof_algorithm_name(algorithm)
                                ),
                            ))
                        }
                    };
                    return self.read_wof(&f, chunk, buf, offset);
                }
                Some(Reparse::Other(reparse::TAG_DEDUP)) => {
                    return Err(Error::unsupported(
                        "NTFS",
                        format!(
                            "'{}' (MFT record {node}) is a Windows Server deduplication stub; its data lives in the volume's chunk store, which is not supported",
                            f.display_name()
                        ),
                    ))
                }
                _ => {}
            }
        }
        let s = if name.is_empty() {
            match f.data.iter().find(|s| s.name.is_empty()) {
                Some(s) => s,
                None => return Ok(0),
            }
        } else {
            f.stream(name).ok_or_else(|| {
                Error::NotFound(format!(
                    "stream '{name}' of '{}' (MFT record {node})",
                    f.display_name()
                ))
            })?
        };
        self.read_stream(&f, s, buf, offset)
    }

    fn read_link(&self, node: NodeId) -> Result<LinkTarget> {
        let f = self.file(node)?;
        let raw = f.reparse.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "'{}' (MFT record {node}) is not a link",
                f.display_name()
            ))
        })?;
        let r = reparse::parse(raw)
            .map_err(|e| corrupt(format!("MFT record {node} reparse point: {e}")))?;
        let strip = |s: &str| s.strip_prefix("\\??\\").unwrap_or(s).to_string();
        match r {
            Reparse::Symlink {
                substitute,
                print,
                relative,
            } => Ok(LinkTarget {
                target: if print.is_empty() {
                    strip(&substitute)
                } else {
                    print.clone()
                },
                detail: Some(format!(
                    "symlink ({}); substitute name: {substitute}; print name: {print}",
                    if relative { "relative" } else { "absolute" }
                )),
            }),
            Reparse::Junction { substitute, print } => Ok(LinkTarget {
                target: if print.is_empty() {
                    strip(&substitute)
                } else {
                    print.clone()
                },
                detail: Some(format!(
                    "junction; substitute name: {substitute}; print name: {print}"
                )),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "'{}' (MFT record {node}) is a reparse point with tag {:#010x}, not a link",
                f.display_name(),
                reparse::tag(raw).unwrap_or(0)
            ))),
        }
    }

    /// Path lookup, case-insensitive through `$UpCase` (an exact match wins).
    fn lookup(&self, path: &str) -> Result<NodeId> {
        let mut node = ROOT;
        let mut depth = 0;
        for comp in path
            .split(['/', '\\'])
            .filter(|c| !c.is_empty() && *c != ".")
        {
            depth += 1;
            if depth > 4096 {
                return Err(Error::InvalidArgument(format!("path too deep: {path}")));
            }
            let found = self
                .find_entry(node, comp)?
                .filter(|e| e.namespace != 2 || e.name.eq_ignore_ascii_case(comp))
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            if matches!(found.file_type(), FileType::Directory | FileType::Junction) {
                self.check_subdir(node, &found)?;
            }
            node = found.node;
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_is_bounded_by_entries_and_bytes() {
        let mut l: Lru<u64, u64> = Lru::new(8, 1000);
        for i in 0..100 {
            l.insert(i, i, 10);
            assert!(l.map.len() <= 8);
        }
        assert_eq!(l.get(&99), Some(99));
        let mut l: Lru<u64, u64> = Lru::new(1000, 1000);
        for i in 0..100 {
            l.insert(i, i, 200);
            assert!(l.bytes <= 1000);
        }
        // Entries over a quarter of the budget are not kept at all.
        l.insert(1000, 1, 300);
        assert_eq!(l.get(&1000), None);
    }

    #[test]
    fn filetime_converts_to_unix_ns() {
        assert_eq!(filetime(116_444_736_000_000_000), 0);
        assert_eq!(filetime(116_444_736_000_000_001), 100);
    }

    #[test]
    fn probe_rejects_non_ntfs() {
        assert!(!probe(&[0u8; 512]));
        assert!(!probe(&[0u8; 10]));
    }
}
