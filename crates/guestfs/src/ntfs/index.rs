//! Directories: the `$I30` B+ tree (index root, index allocation records with fixups, the
//! allocation bitmap), name lookups in NTFS collation order through `$UpCase`, loop checks.

use std::collections::HashSet;

use super::record::*;
use super::{corrupt, reparse, File, NtfsFs, MAX_INDEX_DEPTH, ROOT, UPCASE_RECORD};
use crate::fs::FileType;
use crate::{Error, Result};

/// An entry of a directory index.
#[derive(Clone, Debug)]
pub(super) struct IndexEntry {
    pub(super) node: u64,
    pub(super) seq: u16,
    pub(super) name: String,
    pub(super) lossy: bool,
    pub(super) namespace: u8,
    pub(super) flags: u32,
    pub(super) reparse_tag: u32,
}

impl IndexEntry {
    pub(super) fn file_type(&self) -> FileType {
        if self.flags & 0x400 != 0 {
            match self.reparse_tag {
                reparse::TAG_SYMLINK => return FileType::Symlink,
                reparse::TAG_MOUNT_POINT => return FileType::Junction,
                t if t & reparse::NAME_SURROGATE != 0 => return FileType::Other,
                _ => {}
            }
        }
        if self.flags & 0x1000_0000 != 0 {
            FileType::Directory
        } else {
            FileType::File
        }
    }
}

impl NtfsFs {
    fn upcase(&self) -> Option<&Vec<u16>> {
        self.upcase
            .get_or_init(|| {
                let f = self.file(UPCASE_RECORD).ok()?;
                let s = f.stream("")?;
                if s.data_size != 131072 {
                    return None;
                }
                let bytes = self.geo.read_all(&|| "$UpCase".to_string(), s).ok()?;
                Some(
                    bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )
            })
            .as_ref()
    }

    /// One UTF-16 unit upcased the way NTFS collates names: through `$UpCase`, or a simple
    /// uppercase if the table is missing or damaged.
    fn upcase_unit(&self, u: u16) -> u16 {
        match self.upcase() {
            Some(t) => t[u as usize],
            None => char::from_u32(u as u32)
                .map(|c| {
                    let mut it = c.to_uppercase();
                    match (it.next(), it.next()) {
                        (Some(x), None) if (x as u32) < 0x10000 => x as u16,
                        _ => u,
                    }
                })
                .unwrap_or(u),
        }
    }

    fn upcased(&self, s: &str) -> Vec<u16> {
        s.encode_utf16().map(|u| self.upcase_unit(u)).collect()
    }

    /// Find `name` in directory `dir` by descending its `$I30` B+ tree in collation order
    /// (upcased UTF-16). An exact-case match wins over a case-insensitive one.
    pub(super) fn find_entry(&self, dir: u64, name: &str) -> Result<Option<IndexEntry>> {
        let f = self.file(dir)?;
        if !f.is_dir {
            return Err(Error::NotADirectory(format!(
                "MFT record {dir} ({})",
                f.display_name()
            )));
        }
        let root = f
            .index_root
            .as_ref()
            .ok_or_else(|| corrupt(format!("directory record {dir} has no $I30 index root")))?;
        let mut out = Vec::new();
        let mut walk = Walk {
            fs: self,
            file: &f,
            ir_size: self.index_record_size(root),
            visited: HashSet::new(),
            out: &mut out,
            search: Some(self.upcased(name)),
        };
        walk.node(root, 0x10, 0)?;
        let found = match out.into_iter().next() {
            Some(e) if e.name == name => Some(e),
            // Names differing only in case (POSIX namespace) may sit elsewhere in the tree: scan.
            Some(e) => {
                let all = self.index_entries(dir)?;
                all.iter().find(|x| x.name == name).cloned().or(Some(e))
            }
            None => None,
        };
        if let Some(e) = &found {
            if e.node == dir && dir != ROOT {
                return Err(corrupt(format!(
                    "directory record {dir} lists itself as '{}' (directory loop)",
                    e.name
                )));
            }
            if e.node == ROOT && dir == ROOT {
                return Ok(None);
            }
        }
        Ok(found)
    }

    fn index_record_size(&self, root: &[u8]) -> u64 {
        // The index root states its record size; the boot sector's value is the volume default.
        match le32(root, 8).unwrap_or(0) as u64 {
            0 => self.boot.index_record_size as u64,
            n => n,
        }
    }

    /// All entries of directory `dir` (metadata files included, DOS-only names and "." skipped),
    /// in index order.
    pub(super) fn index_entries(&self, dir: u64) -> Result<Vec<IndexEntry>> {
        let f = self.file(dir)?;
        if !f.is_dir {
            return Err(Error::NotADirectory(format!(
                "MFT record {dir} ({})",
                f.display_name()
            )));
        }
        let root = f
            .index_root
            .as_ref()
            .ok_or_else(|| corrupt(format!("directory record {dir} has no $I30 index root")))?;
        let ir_size = self.index_record_size(root);
        let mut out = Vec::new();
        let mut walk = Walk {
            fs: self,
            file: &f,
            ir_size,
            visited: HashSet::new(),
            out: &mut out,
            search: None,
        };
        walk.node(root, 0x10, 0)?;
        let mut result = Vec::with_capacity(out.len());
        for e in out {
            if e.namespace == 2 || (dir == ROOT && e.node == ROOT) {
                continue;
            }
            if e.node == dir {
                return Err(corrupt(format!(
                    "directory record {dir} lists itself as '{}' (directory loop)",
                    e.name
                )));
            }
            result.push(e);
        }
        Ok(result)
    }

    /// A directory listed in `dir` must name `dir` as its parent; otherwise the index points to
    /// an unrelated directory (an ancestor: a loop). Directories have no hard links, so this
    /// check is exact.
    pub(super) fn check_subdir(&self, dir: u64, e: &IndexEntry) -> Result<()> {
        let child = self.file(e.node)?;
        if e.seq != 0 && child.seq != e.seq {
            return Err(corrupt(format!(
                "directory record {dir}: entry '{}' refers to record {} sequence {} but the record has sequence {} (stale entry)",
                e.name, e.node, e.seq, child.seq
            )));
        }
        if child.is_dir && !child.names.iter().any(|n| n.parent == dir) {
            return Err(corrupt(format!(
                "directory record {dir}: entry '{}' points to directory record {} whose parent is elsewhere (directory loop or cross-link)",
                e.name, e.node
            )));
        }
        Ok(())
    }
}

pub(super) struct FileNameKey {
    pub(super) node: u64,
    pub(super) name: String,
    pub(super) lossy: bool,
    pub(super) namespace: u8,
    pub(super) flags: u32,
    pub(super) reparse_tag: u32,
}

/// A `$FILE_NAME` value (also the key of `$I30` index entries).
pub(super) fn parse_file_name(v: &[u8]) -> Option<FileNameKey> {
    let parent = le64(v, 0)?;
    let flags = le32(v, 0x38)?;
    let reparse_tag = le32(v, 0x3C)?;
    let len = *v.get(0x40)? as usize;
    let namespace = *v.get(0x41)?;
    let raw = v.get(0x42..0x42 + 2 * len)?;
    let (name, lossy) = utf16(raw);
    Some(FileNameKey {
        node: parent & 0x0000_FFFF_FFFF_FFFF,
        name,
        lossy,
        namespace,
        flags,
        reparse_tag,
    })
}

/// Depth-first walk of a directory's `$I30` B+ tree in collation order.
struct Walk<'a> {
    fs: &'a NtfsFs,
    file: &'a File,
    ir_size: u64,
    visited: HashSet<u64>,
    out: &'a mut Vec<IndexEntry>,
    /// Upcased name searched for: descend only where it can be (None = list everything).
    search: Option<Vec<u16>>,
}

impl Walk<'_> {
    fn what(&self) -> String {
        format!(
            "directory '{}' (MFT record {})",
            self.file.display_name(),
            self.file.num
        )
    }

    /// Entries of the index node whose header is at `hdr` in `buf`.
    fn node(&mut self, buf: &[u8], hdr: usize, depth: usize) -> Result<()> {
        if depth > MAX_INDEX_DEPTH {
            return Err(corrupt(format!(
                "{}: index tree deeper than {MAX_INDEX_DEPTH}",
                self.what()
            )));
        }
        let bad = |s: &Self, m: &str| corrupt(format!("{}: index node: {m}", s.what()));
        let entries_off = le32(buf, hdr).ok_or_else(|| bad(self, "header truncated"))? as usize;
        let used = le32(buf, hdr + 4).ok_or_else(|| bad(self, "header truncated"))? as usize;
        let start = hdr
            .checked_add(entries_off)
            .ok_or_else(|| bad(self, "bad offset"))?;
        let end = hdr
            .checked_add(used)
            .filter(|&e| e <= buf.len() && e >= start)
            .ok_or_else(|| bad(self, "entries outside the node"))?;
        let mut pos = start;
        loop {
            if pos + 16 > end {
                return Err(bad(self, "no last entry"));
            }
            let file_ref = le64(buf, pos).unwrap_or(0);
            let len = le16(buf, pos + 8).unwrap_or(0) as usize;
            let key_len = le16(buf, pos + 10).unwrap_or(0) as usize;
            let flags = le16(buf, pos + 12).unwrap_or(0);
            if len < 16 || !len.is_multiple_of(8) || pos + len > end || key_len > len - 16 {
                return Err(bad(
                    self,
                    &format!("entry at {pos} has impossible length {len}"),
                ));
            }
            let subnode = if flags & 1 != 0 {
                if len < 24 {
                    return Err(bad(self, "entry with subnode too short"));
                }
                Some(le64(buf, pos + len - 8).unwrap_or(0))
            } else {
                None
            };
            if flags & 2 != 0 {
                if let Some(vcn) = subnode {
                    self.subnode(vcn, depth + 1)?;
                }
                return Ok(());
            }
            let key = parse_file_name(&buf[pos + 16..pos + 16 + key_len])
                .ok_or_else(|| bad(self, &format!("entry at {pos} has a truncated file name")))?;
            let entry = IndexEntry {
                node: file_ref & 0x0000_FFFF_FFFF_FFFF,
                seq: (file_ref >> 48) as u16,
                name: key.name,
                lossy: key.lossy,
                namespace: key.namespace,
                flags: key.flags,
                reparse_tag: key.reparse_tag,
            };
            if let Some(target) = &self.search {
                let here = self.fs.upcased(&entry.name);
                match target.as_slice().cmp(here.as_slice()) {
                    std::cmp::Ordering::Less => {
                        if let Some(vcn) = subnode {
                            self.subnode(vcn, depth + 1)?;
                        }
                        return Ok(());
                    }
                    std::cmp::Ordering::Equal => {
                        self.out.push(entry);
                        return Ok(());
                    }
                    std::cmp::Ordering::Greater => {
                        pos += len;
                        continue;
                    }
                }
            }
            if let Some(vcn) = subnode {
                self.subnode(vcn, depth + 1)?;
            }
            self.out.push(entry);
            if self.out.len() > 50_000_000 {
                return Err(bad(self, "too many entries"));
            }
            pos += len;
        }
    }

    fn subnode(&mut self, vcn: u64, depth: usize) -> Result<()> {
        let what = self.what();
        let alloc = self.file.index_alloc.as_ref().ok_or_else(|| {
            corrupt(format!(
                "{what}: index entry points to a subnode but there is no $INDEX_ALLOCATION"
            ))
        })?;
        let irs = self.ir_size;
        if !irs.is_power_of_two() || !(512..=65536).contains(&irs) {
            return Err(corrupt(format!("{what}: index record size {irs} invalid")));
        }
        // Index VCNs count clusters when records are at least a cluster, else 512-byte blocks.
        let unit = if irs >= self.fs.geo.cluster {
            self.fs.geo.cluster
        } else {
            512
        };
        let off = vcn
            .checked_mul(unit)
            .filter(|o| o.checked_add(irs).is_some_and(|e| e <= alloc.data_size))
            .ok_or_else(|| {
                corrupt(format!(
                    "{what}: index record VCN {vcn} is outside $INDEX_ALLOCATION"
                ))
            })?;
        if !self.visited.insert(off) {
            return Err(corrupt(format!(
                "{what}: index record at VCN {vcn} is reached twice (index loop)"
            )));
        }
        let idx = off / irs;
        if let Some(bm) = &self.file.index_bitmap {
            let in_use = bm
                .get((idx / 8) as usize)
                .is_some_and(|b| b & (1 << (idx % 8)) != 0);
            if !in_use {
                return Err(corrupt(format!(
                    "{what}: index entry points to unused index record {idx}"
                )));
            }
        }
        let mut buf = vec![0u8; irs as usize];
        let w = || format!("{what} $INDEX_ALLOCATION");
        let got = self.fs.geo.read_plain(&w, alloc, &mut buf, off)?;
        if got != buf.len() {
            return Err(corrupt(format!("{what}: index record {idx} truncated")));
        }
        apply_fixups(&mut buf, b"INDX")
            .map_err(|e| corrupt(format!("{what}: index record at VCN {vcn}: {e}")))?;
        if le64(&buf, 0x10) != Some(vcn) {
            return Err(corrupt(format!(
                "{what}: index record at VCN {vcn} says it is at another VCN"
            )));
        }
        self.node(&buf, 0x18, depth)
    }
}
