//! ext2, ext3 and ext4: extents and block maps, htree directories (read linearly: htree index
//! blocks look like empty directory blocks to a linear reader, by design), inline data, symlinks,
//! holes and uninitialised extents (zeros), hard links, extended attributes, metadata with
//! nanosecond times.
//!
//! Why our own reader rather than `ext4-view`: that crate is path-based (no inode numbers, so no
//! [`NodeId`]s and no hard-link identity), exposes no link count and no extended attributes, and
//! is built on `Rc` (its filesystem handle is neither `Send` nor `Sync`, which [`GuestFs`]
//! requires). Extended attributes need the inode and the group descriptors anyway, and with those
//! in hand the rest (extent tree, block map, directory blocks) is a small amount of code that
//! follows the kernel's "ext4 Data Structures and Algorithms" documentation.
//!
//! Node ids are inode numbers; the root is inode 2.
//!
//! Extended attributes are parsed from the inode's in-inode area (after `i_extra_isize`) and from
//! the block named by `i_file_acl`: header magic 0xEA020000, then entries of (name length, name
//! index, value offset, value inode, value size, hash, name) padded to 4 bytes, ended by four
//! zero bytes. Names get their index's prefix ("user.", "security.", "trusted.", "system.",
//! and the POSIX ACL names). Values stored in their own inode (`ea_inode`) are read from it.
//! `system.data` (where inline data continues) is internal and not listed.
//!
//! A filesystem captured while mounted (journal needs recovery, the normal case for a live VM's
//! disk) has its JBD2 log replayed in memory at open: reads see the newest committed copy of
//! each block, revoked blocks excepted, incomplete transactions ignored; the image is never
//! written. Refused with a clear error: fast-commit journals that need replay, external journal
//! devices, `meta_bg`, compression, `dirdata`, and encrypted directories or files. Checksums
//! (metadata_csum, journal checksums) are not verified.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::fs::{DirEntry, FileType, FsKind, GuestFs, LinkTarget, Metadata, NodeId};
use crate::util::{clamp_read, u16le, u32le};
use crate::volume::Volume;
use crate::{Error, Result};

pub const ROOT_INODE: NodeId = 2;
const FS: &str = "ext";
const SUPERBLOCK: u64 = 1024;
/// Directories larger than this are refused (the largest real ones are a few hundred MiB with
/// `largedir`); it bounds the work a hostile size can cause.
const MAX_DIR_BYTES: u64 = 1 << 30;
/// Entries we return from one directory: bounds memory whatever a hostile directory holds
/// (the largest real directories have a few million entries).
const MAX_DIR_ENTRIES: usize = 20_000_000;
const META_CACHE_BLOCKS: usize = 1024;
const JBD2_MAGIC: u32 = 0xC03B_3998;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_DIRDATA: u32 = 0x1000;
/// Incompatible features we read correctly (filetype, recover (checked separately), extents,
/// 64bit, mmp, flex_bg, ea_inode, csum_seed, largedir, inline_data, encrypt (refused per inode),
/// casefold).
const INCOMPAT_KNOWN: u32 = 0x2
    | 0x4
    | 0x10
    | 0x40
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000
    | INCOMPAT_COMPRESSION
    | INCOMPAT_JOURNAL_DEV
    | INCOMPAT_DIRDATA;

const FLAG_ENCRYPT: u32 = 0x800;
const FLAG_HUGE_FILE: u32 = 0x40000;
const FLAG_EXTENTS: u32 = 0x80000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

const S_IFMT: u16 = 0xF000;
const S_IFDIR: u16 = 0x4000;
const S_IFREG: u16 = 0x8000;
const S_IFLNK: u16 = 0xA000;

/// True if the 1024 bytes at volume offset 1024 are an ext superblock.
pub fn probe(sb: &[u8]) -> bool {
    sb.len() >= 1024 && u16le(sb, 56) == 0xEF53
}

pub struct ExtFs {
    vol: Volume,
    kind: FsKind,
    label: Option<String>,
    block_size: u64,
    blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    gdt_offset: u64,
    groups: u64,
    filetype_in_dirent: bool,
    huge_file: bool,
    meta: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    /// Filesystem block -> its newest committed copy in the journal (volume block, escaped).
    journal: BTreeMap<u64, (u64, bool)>,
}

/// One inode's raw bytes (at most the on-disk inode size, at least 128).
struct Inode {
    ino: u32,
    raw: Vec<u8>,
}

impl Inode {
    fn mode(&self) -> u16 {
        u16le(&self.raw, 0)
    }
    fn flags(&self) -> u32 {
        u32le(&self.raw, 32)
    }
    fn size(&self) -> u64 {
        u32le(&self.raw, 4) as u64 | (u32le(&self.raw, 108) as u64) << 32
    }
    fn iblock(&self) -> &[u8] {
        &self.raw[40..100]
    }
    fn file_type(&self) -> FileType {
        match self.mode() & S_IFMT {
            S_IFREG => FileType::File,
            S_IFDIR => FileType::Directory,
            S_IFLNK => FileType::Symlink,
            _ => FileType::Other,
        }
    }
    fn extra_isize(&self) -> usize {
        if self.raw.len() > 128 {
            u16le(&self.raw, 128) as usize
        } else {
            0
        }
    }
    /// A time field (seconds at `lo`) with its `_extra` word at `extra` (epoch bits + ns) when the
    /// inode is large enough to hold it.
    fn time(&self, lo: usize, extra: usize) -> i128 {
        let secs = u32le(&self.raw, lo) as i32 as i128;
        if extra + 4 <= 128 + self.extra_isize() && extra + 4 <= self.raw.len() {
            let x = u32le(&self.raw, extra);
            let secs = secs + (((x & 3) as i128) << 32);
            secs * 1_000_000_000 + (x >> 2) as i128
        } else {
            secs * 1_000_000_000
        }
    }
}

/// Where a logical block lives.
enum Mapping {
    /// `n` blocks from physical block `p`.
    Data(u64, u64),
    /// `n` blocks of zeros (a hole or an uninitialised extent).
    Zero(u64),
}

pub fn open(vol: Volume) -> Result<ExtFs> {
    let mut sb = [0u8; 1024];
    vol.read_exact_at(&mut sb, SUPERBLOCK)?;
    if !probe(&sb) {
        return Err(Error::corrupt(
            FS,
            "no ext superblock magic (0xEF53) at byte 1080",
        ));
    }
    let bad = |s: String| Error::corrupt(FS, s);
    let log = u32le(&sb, 24);
    if log > 6 {
        return Err(bad(format!(
            "block size 2^(10+{log}) is larger than 64 KiB"
        )));
    }
    let block_size = 1024u64 << log;
    let compat = u32le(&sb, 92);
    let incompat = u32le(&sb, 96);
    let ro_compat = u32le(&sb, 100);
    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Error::unsupported(
            FS,
            format!("unknown incompatible feature flags {unknown:#x}; this volume cannot be read safely"),
        ));
    }
    for (flag, what) in [
        (INCOMPAT_COMPRESSION, "compression"),
        (
            INCOMPAT_JOURNAL_DEV,
            "an external journal device (it holds no files)",
        ),
        (INCOMPAT_DIRDATA, "dirdata (Lustre)"),
        (INCOMPAT_META_BG, "meta_bg group descriptor layout"),
    ] {
        if incompat & flag != 0 {
            return Err(Error::unsupported(FS, format!("volume uses {what}")));
        }
    }
    let rev = u32le(&sb, 76);
    let inode_size = if rev == 0 { 128 } else { u16le(&sb, 88) as u64 };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
        return Err(bad(format!("inode size {inode_size}")));
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let desc_size = if is64 { u16le(&sb, 254) as u64 } else { 32 };
    if desc_size < 32 || !desc_size.is_power_of_two() || desc_size > block_size {
        return Err(bad(format!("group descriptor size {desc_size}")));
    }
    let blocks_count = u32le(&sb, 4) as u64
        | if is64 {
            (u32le(&sb, 336) as u64) << 32
        } else {
            0
        };
    let first_data_block = u32le(&sb, 20) as u64;
    let blocks_per_group = u32le(&sb, 32) as u64;
    let inodes_per_group = u32le(&sb, 40);
    let inodes_count = u32le(&sb, 0);
    if blocks_per_group == 0 || inodes_per_group == 0 || blocks_count <= first_data_block {
        return Err(bad(format!(
            "{blocks_count} blocks, {blocks_per_group} blocks and {inodes_per_group} inodes per group"
        )));
    }
    // Every block number below blocks_count must have a byte offset: reads compute
    // `block * block_size` without further checks.
    if blocks_count.checked_mul(block_size).is_none() {
        return Err(bad(format!(
            "{blocks_count} blocks of {block_size} bytes exceed 2^64 bytes"
        )));
    }
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    // A huge group count (a hostile blocks_count) overflows here; it could never fit anyway.
    if groups
        .checked_mul(inodes_per_group as u64)
        .is_none_or(|capacity| (inodes_count as u64) > capacity)
    {
        return Err(bad(format!(
            "{inodes_count} inodes do not fit {groups} groups of {inodes_per_group}"
        )));
    }
    let gdt_offset = (first_data_block + 1) * block_size;
    if groups
        .checked_mul(desc_size)
        .and_then(|gdt| gdt.checked_add(gdt_offset))
        .is_none_or(|end| end > vol.len())
    {
        return Err(bad(format!(
            "the descriptors of {groups} block groups lie past the volume's end"
        )));
    }
    let kind = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | 0x200 | 0x400 | 0x8000) != 0
        || ro_compat & (0x8 | 0x10 | 0x20 | 0x40 | 0x400) != 0
    {
        FsKind::Ext4
    } else if compat & 0x4 != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    };
    let label = {
        let raw = &sb[120..136];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
        let l = String::from_utf8_lossy(&raw[..end]).into_owned();
        (!l.is_empty()).then_some(l)
    };
    let mut fs = ExtFs {
        vol,
        kind,
        label,
        block_size,
        blocks_count,
        inodes_count,
        inodes_per_group,
        inode_size,
        desc_size,
        gdt_offset,
        groups,
        filetype_in_dirent: incompat & INCOMPAT_FILETYPE != 0,
        huge_file: ro_compat & 0x8 != 0,
        meta: Mutex::new(HashMap::new()),
        journal: BTreeMap::new(),
    };
    if incompat & INCOMPAT_RECOVER != 0 {
        // The journal holds committed changes not yet written in place: replay them in memory
        // (the image is never modified) so that every read sees what the kernel would see.
        let jino = u32le(&sb, 224) as u64;
        if jino == 0 {
            return Err(Error::unsupported(
                FS,
                "the journal needs recovery but lives on an external device; run `e2fsck -fy` \
                 with that device on a copy of the volume",
            ));
        }
        fs.journal = fs.replay_journal(jino)?;
        // Blocks cached while reading the journal inode predate the replay.
        fs.meta.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    Ok(fs)
}

impl ExtFs {
    fn check_block(&self, b: u64, n: u64) -> Result<()> {
        if b == 0 || b.checked_add(n).is_none_or(|e| e > self.blocks_count) {
            return Err(Error::corrupt(
                FS,
                format!(
                    "block range {b}+{n} is outside the volume's {} blocks",
                    self.blocks_count
                ),
            ));
        }
        Ok(())
    }

    /// One filesystem block as the filesystem sees it after journal replay.
    fn read_block(&self, b: u64, buf: &mut [u8]) -> Result<()> {
        match self.journal.get(&b) {
            Some(&(jb, escaped)) => {
                self.vol.read_exact_at(buf, jb * self.block_size)?;
                if escaped {
                    // The journal replaced a leading JBD2 magic with zeros; put it back.
                    buf[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                }
                Ok(())
            }
            None => self.vol.read_exact_at(buf, b * self.block_size),
        }
    }

    /// Scan the JBD2 log from its start and collect, per filesystem block, the copy from the
    /// newest complete transaction that no later revoke record cancels (the three passes of
    /// recovery: scan, revoke, replay). A transaction without its commit block is incomplete
    /// and ignored, as in recovery.
    fn replay_journal(&self, jino: u64) -> Result<BTreeMap<u64, (u64, bool)>> {
        let bad = |s: String| Error::corrupt(FS, format!("journal: {s}"));
        let ji = self.inode(jino)?;
        let bs = self.block_size;
        // Journal logical block -> volume block.
        let phys = |l: u64| -> Result<u64> {
            match self.map(&ji, l)? {
                Mapping::Data(p, _) => Ok(p),
                Mapping::Zero(_) => Err(bad(format!("block {l} of the journal is a hole"))),
            }
        };
        let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut jsb = vec![0u8; bs as usize];
        self.vol.read_exact_at(&mut jsb, phys(0)? * bs)?;
        if be32(&jsb, 0) != JBD2_MAGIC || !matches!(be32(&jsb, 4), 3 | 4) {
            return Err(bad("no journal superblock".into()));
        }
        if be32(&jsb, 12) as u64 != bs {
            return Err(bad(format!(
                "journal block size {} differs from the filesystem's {bs}",
                be32(&jsb, 12)
            )));
        }
        let maxlen = (be32(&jsb, 16) as u64).min(ji.size() / bs);
        let first = be32(&jsb, 20) as u64;
        let mut seq = be32(&jsb, 24);
        let start = be32(&jsb, 28) as u64;
        if start == 0 {
            return Ok(BTreeMap::new()); // clean: nothing to replay
        }
        let incompat = if be32(&jsb, 4) == 4 {
            be32(&jsb, 40)
        } else {
            0
        };
        const J_REVOKE: u32 = 0x1;
        const J_64BIT: u32 = 0x2;
        const J_ASYNC_COMMIT: u32 = 0x4;
        const J_CSUM_V2: u32 = 0x8;
        const J_CSUM_V3: u32 = 0x10;
        const J_FAST_COMMIT: u32 = 0x20;
        let known = J_REVOKE | J_64BIT | J_ASYNC_COMMIT | J_CSUM_V2 | J_CSUM_V3 | J_FAST_COMMIT;
        if incompat & !known != 0 {
            return Err(Error::unsupported(
                FS,
                format!("journal has unknown incompatible features {incompat:#x}"),
            ));
        }
        if incompat & J_FAST_COMMIT != 0 {
            return Err(Error::unsupported(
                FS,
                "the journal needs recovery and uses fast commits, which hyperkeep cannot replay; \
                 run `e2fsck -fy` on a copy of the volume",
            ));
        }
        if first == 0 || first >= maxlen || start < first || start >= maxlen {
            return Err(bad(format!(
                "log area {first}..{maxlen} with start {start}"
            )));
        }
        let is64 = incompat & J_64BIT != 0;
        let csum3 = incompat & J_CSUM_V3 != 0;
        let csum2 = incompat & J_CSUM_V2 != 0;
        let tag_bytes = match (csum3, is64) {
            (true, true) => 16,
            (true, false) => 12,
            (false, _) => 8 + if csum2 { 2 } else { 0 } + if is64 { 4 } else { 0 },
        };
        let tail = if csum2 || csum3 { 4 } else { 0 };
        let wrap = |p: u64| if p >= maxlen { first + (p - maxlen) } else { p };

        // (transaction sequence, fs block, journal volume block, escaped) in log order.
        let mut writes: Vec<(u32, u64, u64, bool)> = Vec::new();
        let mut pending: Vec<(u32, u64, u64, bool)> = Vec::new();
        let mut revoked: HashMap<u64, u32> = HashMap::new();
        let mut pending_revokes: Vec<(u64, u32)> = Vec::new();
        let mut pos = start;
        let mut block = vec![0u8; bs as usize];
        let mut steps = 0u64;
        while steps <= maxlen {
            steps += 1;
            self.vol.read_exact_at(&mut block, phys(pos)? * bs)?;
            if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != seq {
                break; // end of the log
            }
            match be32(&block, 4) {
                1 => {
                    // Descriptor: tags, each naming the filesystem block of the next log block.
                    let end = block.len() - tail;
                    let mut o = 12usize;
                    while o + tag_bytes <= end {
                        let lo = be32(&block, o) as u64;
                        let flags = if csum3 {
                            be32(&block, o + 4)
                        } else {
                            u16::from_be_bytes([block[o + 6], block[o + 7]]) as u32
                        };
                        let hi = if is64 { be32(&block, o + 8) as u64 } else { 0 };
                        o += tag_bytes;
                        if flags & 0x2 == 0 {
                            o += 16; // the UUID follows unless SAME_UUID
                        }
                        pos = wrap(pos + 1);
                        steps += 1;
                        pending.push((seq, hi << 32 | lo, phys(pos)?, flags & 0x1 != 0));
                        if flags & 0x8 != 0 {
                            break; // LAST_TAG
                        }
                    }
                }
                2 => {
                    // Commit: the transaction is complete.
                    writes.append(&mut pending);
                    for (b, s) in pending_revokes.drain(..) {
                        let e = revoked.entry(b).or_insert(s);
                        if s.wrapping_sub(*e) as i32 > 0 {
                            *e = s;
                        }
                    }
                    seq = seq.wrapping_add(1);
                }
                5 => {
                    let count = (be32(&block, 12) as usize).min(block.len() - tail);
                    let rec = if is64 { 8 } else { 4 };
                    let mut o = 16;
                    while o + rec <= count {
                        let b = if is64 {
                            u64::from_be_bytes(block[o..o + 8].try_into().expect("8 bytes"))
                        } else {
                            be32(&block, o) as u64
                        };
                        pending_revokes.push((b, seq));
                        o += rec;
                    }
                }
                _ => break,
            }
            pos = wrap(pos + 1);
        }
        let mut overlay = BTreeMap::new();
        for (s, b, jb, esc) in writes {
            // A revoke in this or a later transaction cancels this copy.
            if revoked
                .get(&b)
                .is_some_and(|&r| r.wrapping_sub(s) as i32 >= 0)
            {
                continue;
            }
            if b < self.blocks_count {
                overlay.insert(b, (jb, esc));
            }
        }
        Ok(overlay)
    }

    /// A metadata block through a bounded cache.
    fn meta_block(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.meta.lock().unwrap_or_else(|e| e.into_inner()).get(&b) {
            return Ok(d.clone());
        }
        self.check_block(b, 1)?;
        let mut buf = vec![0u8; self.block_size as usize];
        self.read_block(b, &mut buf)?;
        let d = Arc::new(buf);
        let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= META_CACHE_BLOCKS {
            m.clear();
        }
        m.insert(b, d.clone());
        Ok(d)
    }

    fn inode(&self, ino: NodeId) -> Result<Inode> {
        if ino == 0 || ino > self.inodes_count as u64 {
            return Err(Error::NotFound(format!(
                "ext inode {ino} (the volume has {})",
                self.inodes_count
            )));
        }
        let ino32 = ino as u32;
        let group = ((ino32 - 1) / self.inodes_per_group) as u64;
        let index = ((ino32 - 1) % self.inodes_per_group) as u64;
        if group >= self.groups {
            return Err(Error::corrupt(
                FS,
                format!("inode {ino} is in group {group} of {}", self.groups),
            ));
        }
        let gd_off = self.gdt_offset + group * self.desc_size;
        let gd_blk = self.meta_block(gd_off / self.block_size)?;
        let o = (gd_off % self.block_size) as usize;
        let gd = &gd_blk[o..o + self.desc_size as usize];
        let mut table = u32le(gd, 8) as u64;
        if self.desc_size >= 64 {
            table |= (u32le(gd, 0x28) as u64) << 32;
        }
        let off = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * self.inode_size))
            .ok_or_else(|| Error::corrupt(FS, format!("inode table of group {group} overflows")))?;
        let blk = self.meta_block(off / self.block_size)?;
        let o = (off % self.block_size) as usize;
        let raw = blk[o..o + self.inode_size as usize].to_vec();
        let inode = Inode { ino: ino32, raw };
        if inode.raw.len() > 128 && 128 + inode.extra_isize() > inode.raw.len() {
            return Err(Error::corrupt(
                FS,
                format!(
                    "inode {ino}: extra size {} exceeds the inode",
                    inode.extra_isize()
                ),
            ));
        }
        Ok(inode)
    }

    /// Map logical block `l` of an inode.
    fn map(&self, inode: &Inode, l: u64) -> Result<Mapping> {
        if inode.flags() & FLAG_EXTENTS != 0 {
            self.map_extent(inode, inode.iblock(), l, 5)
        } else {
            self.map_indirect(inode, l)
        }
    }

    fn map_extent(&self, inode: &Inode, node: &[u8], l: u64, depth_budget: u32) -> Result<Mapping> {
        let bad = |s: String| Error::corrupt(FS, format!("inode {}: extent tree: {s}", inode.ino));
        if node.len() < 12 || u16le(node, 0) != 0xF30A {
            return Err(bad("bad header magic".into()));
        }
        let n = u16le(node, 2) as usize;
        let depth = u16le(node, 6) as u32;
        if 12 + n * 12 > node.len() {
            return Err(bad(format!("{n} entries do not fit the node")));
        }
        if depth > depth_budget {
            return Err(bad(format!("depth {depth} is deeper than allowed (loop?)")));
        }
        let entry = |i: usize| &node[12 + i * 12..24 + i * 12];
        if depth == 0 {
            let mut next_start = u64::MAX;
            for i in 0..n {
                let e = entry(i);
                let start = u32le(e, 0) as u64;
                let raw_len = u16le(e, 4) as u64;
                let (len, uninit) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                let phys = (u16le(e, 6) as u64) << 32 | u32le(e, 8) as u64;
                if l >= start && l < start + len {
                    let skip = l - start;
                    return Ok(if uninit {
                        Mapping::Zero(len - skip)
                    } else {
                        self.check_block(phys, len)?;
                        Mapping::Data(phys + skip, len - skip)
                    });
                }
                if start > l {
                    next_start = next_start.min(start);
                }
            }
            return Ok(Mapping::Zero(next_start.saturating_sub(l).max(1)));
        }
        // Index node: the last entry starting at or before `l`.
        let mut pick = None;
        let mut first_start = u64::MAX;
        for i in 0..n {
            let s = u32le(entry(i), 0) as u64;
            first_start = first_start.min(s);
            if s <= l {
                pick = Some(i);
            }
        }
        let Some(i) = pick else {
            return Ok(Mapping::Zero(first_start.saturating_sub(l).max(1)));
        };
        let e = entry(i);
        let child = (u16le(e, 8) as u64) << 32 | u32le(e, 4) as u64;
        let blk = self.meta_block(child)?;
        if blk.len() >= 12 && u16le(&blk, 0) == 0xF30A && u16le(&blk, 6) as u32 != depth - 1 {
            return Err(bad(format!(
                "child at block {child} has depth {} under depth {depth}",
                u16le(&blk, 6)
            )));
        }
        let m = self.map_extent(inode, &blk, l, depth - 1)?;
        // A run may not cross into the next index entry's range.
        if let Some(next) = (i + 1 < n).then(|| u32le(entry(i + 1), 0) as u64) {
            if next > l {
                return Ok(match m {
                    Mapping::Data(p, len) => Mapping::Data(p, len.min(next - l)),
                    Mapping::Zero(len) => Mapping::Zero(len.min(next - l)),
                });
            }
        }
        Ok(m)
    }

    /// ext2/3 block map: 12 direct pointers, then single, double and triple indirect blocks.
    /// Returns the run of physically contiguous (or absent) blocks from `l` within one pointer
    /// array, so big files are read in large pieces and holes are skipped whole.
    fn map_indirect(&self, inode: &Inode, l: u64) -> Result<Mapping> {
        let per = self.block_size / 4;
        let ib = inode.iblock();
        if l < 12 {
            return self.run_in(ib, l as usize, 12);
        }
        // (root pointer, indices from the top level down, blocks one pointer covers per level)
        let (root, path, spans): (u64, Vec<u64>, Vec<u64>) = if l - 12 < per {
            (u32le(ib, 48) as u64, vec![l - 12], vec![1])
        } else if l - 12 - per < per * per {
            let r = l - 12 - per;
            (u32le(ib, 52) as u64, vec![r / per, r % per], vec![per, 1])
        } else if l - 12 - per - per * per < per * per * per {
            let r = l - 12 - per - per * per;
            (
                u32le(ib, 56) as u64,
                vec![r / (per * per), (r / per) % per, r % per],
                vec![per * per, per, 1],
            )
        } else {
            return Ok(Mapping::Zero(1));
        };
        // A missing pointer at some level is a hole to the end of the subtree it would cover.
        let hole_from = |level: usize| -> u64 {
            let covered: u64 = path[level..]
                .iter()
                .zip(&spans[level..])
                .map(|(i, s)| i * s)
                .sum();
            let span = if level == 0 {
                spans[0] * per
            } else {
                spans[level - 1]
            };
            span - covered
        };
        let mut ptr = root;
        for (level, &idx) in path.iter().enumerate() {
            if ptr == 0 {
                return Ok(Mapping::Zero(hole_from(level)));
            }
            let blk = self.meta_block(ptr)?;
            if level + 1 == path.len() {
                return self.run_in(&blk, idx as usize, per as usize);
            }
            ptr = u32le(&blk, idx as usize * 4) as u64;
        }
        unreachable!("the loop returns at the last level")
    }

    /// The run starting at pointer `idx` of an array of `n` block pointers.
    fn run_in(&self, arr: &[u8], idx: usize, n: usize) -> Result<Mapping> {
        let p = u32le(arr, idx * 4) as u64;
        let mut k = 1usize;
        if p == 0 {
            while idx + k < n && u32le(arr, (idx + k) * 4) == 0 {
                k += 1;
            }
            return Ok(Mapping::Zero(k as u64));
        }
        while idx + k < n && u32le(arr, (idx + k) * 4) as u64 == p + k as u64 {
            k += 1;
        }
        self.check_block(p, k as u64)?;
        Ok(Mapping::Data(p, k as u64))
    }

    /// Read an inode's data (regular file, directory or symlink body) at `offset`, clamped to
    /// `size`; returns bytes read.
    fn read_data(&self, inode: &Inode, size: u64, buf: &mut [u8], offset: u64) -> Result<usize> {
        let n = clamp_read(size, buf, offset);
        if n == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..n];
        if inode.flags() & FLAG_ENCRYPT != 0 {
            return Err(Error::unsupported(
                FS,
                format!("inode {} is encrypted (fscrypt)", inode.ino),
            ));
        }
        if inode.flags() & FLAG_INLINE_DATA != 0 {
            let mut data = inode.iblock().to_vec();
            data.extend_from_slice(&self.inline_tail(inode)?);
            let avail = data.len() as u64;
            for (i, b) in buf.iter_mut().enumerate() {
                let p = offset + i as u64;
                *b = if p < avail { data[p as usize] } else { 0 };
            }
            return Ok(n);
        }
        let bs = self.block_size;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let l = pos / bs;
            let within = pos % bs;
            let take = |blocks: u64| {
                ((blocks.saturating_mul(bs) - within).min((n - done) as u64)) as usize
            };
            match self.map(inode, l)? {
                Mapping::Zero(blocks) => {
                    let k = take(blocks);
                    buf[done..done + k].fill(0);
                    done += k;
                }
                Mapping::Data(p, blocks) => {
                    let k = take(blocks);
                    if self.journal.range(p..p + blocks).next().is_some() {
                        // Some of these blocks have newer copies in the journal: one at a time.
                        let k = k.min((bs - within) as usize);
                        let mut block = vec![0u8; bs as usize];
                        self.read_block(p, &mut block)?;
                        buf[done..done + k]
                            .copy_from_slice(&block[within as usize..within as usize + k]);
                        done += k;
                        continue;
                    }
                    self.vol
                        .read_exact_at(&mut buf[done..done + k], p * bs + within)?;
                    done += k;
                }
            }
        }
        Ok(n)
    }

    /// Extended attributes of an inode: (full name, value location).
    fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, XValue)>> {
        let mut out = Vec::new();
        let start = 128 + inode.extra_isize();
        if inode.raw.len() > 128
            && start + 4 <= inode.raw.len()
            && u32le(&inode.raw, start) == 0xEA02_0000
        {
            let region = &inode.raw[start + 4..];
            parse_xattr_entries(region, 0, region, &mut out, inode.ino)?;
        }
        let mut acl = u32le(&inode.raw, 104) as u64;
        if self.blocks_count > u32::MAX as u64 {
            acl |= (u16le(&inode.raw, 118) as u64) << 32;
        }
        if acl != 0 {
            let blk = self.meta_block(acl)?;
            if u32le(&blk, 0) != 0xEA02_0000 {
                return Err(Error::corrupt(
                    FS,
                    format!("inode {}: xattr block {acl} has a bad magic", inode.ino),
                ));
            }
            parse_xattr_entries(&blk, 32, &blk, &mut out, inode.ino)?;
        }
        Ok(out)
    }

    /// The part of an inline-data inode's body past `i_block`: the value of its `system.data`
    /// xattr (empty if none). The kernel keeps it in the inode itself; one stored in an EA inode
    /// is refused, which also stops a chain of EA inodes with inline data from recursing.
    fn inline_tail(&self, inode: &Inode) -> Result<Vec<u8>> {
        for (n, v) in self.xattrs(inode)? {
            if n == "system.data" {
                return match v {
                    XValue::Inline(d) => Ok(d),
                    XValue::Inode(ino, _) => Err(Error::corrupt(
                        FS,
                        format!(
                            "inode {}: inline data continues in EA inode {ino}, not in the inode",
                            inode.ino
                        ),
                    )),
                };
            }
        }
        Ok(Vec::new())
    }

    fn xattr_value(&self, inode: &Inode, name: &str) -> Result<Option<Vec<u8>>> {
        for (n, v) in self.xattrs(inode)? {
            if n == name {
                return Ok(Some(match v {
                    XValue::Inline(d) => d,
                    XValue::Inode(ino, size) => {
                        if size > 64 << 20 {
                            return Err(Error::unsupported(
                                FS,
                                format!("xattr {name} of {size} bytes"),
                            ));
                        }
                        let ea = self.inode(ino as u64)?;
                        let len = ea.size().min(size as u64);
                        let mut d = vec![0u8; len as usize];
                        let got = self.read_data(&ea, len, &mut d, 0)?;
                        d.truncate(got);
                        d
                    }
                }));
            }
        }
        Ok(None)
    }

    fn dir_entries_in(&self, block: &[u8], dir: u32, out: &mut Vec<DirEntry>) -> Result<()> {
        let mut pos = 0usize;
        while pos + 8 <= block.len() {
            let ino = u32le(block, pos);
            let rec_len = u16le(block, pos + 4) as usize;
            if rec_len < 8 || !rec_len.is_multiple_of(4) || pos + rec_len > block.len() {
                return Err(Error::corrupt(
                    FS,
                    format!(
                        "directory inode {dir}: entry at byte {pos} has a bad length {rec_len}"
                    ),
                ));
            }
            let (name_len, ftype) = if self.filetype_in_dirent {
                (block[pos + 6] as usize, block[pos + 7])
            } else {
                (u16le(block, pos + 6) as usize, 0)
            };
            if ino != 0 && name_len > 0 && out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::unsupported(
                    FS,
                    format!("directory inode {dir} has more than {MAX_DIR_ENTRIES} entries"),
                ));
            }
            if ino != 0 && name_len > 0 {
                if 8 + name_len > rec_len {
                    return Err(Error::corrupt(
                        FS,
                        format!(
                            "directory inode {dir}: name of {name_len} bytes overruns its entry"
                        ),
                    ));
                }
                let raw = &block[pos + 8..pos + 8 + name_len];
                if raw != b"." && raw != b".." {
                    let name = String::from_utf8_lossy(raw).into_owned();
                    let file_type = match ftype {
                        1 => FileType::File,
                        2 => FileType::Directory,
                        7 => FileType::Symlink,
                        0 => self.inode(ino as u64)?.file_type(),
                        _ => FileType::Other,
                    };
                    out.push(DirEntry {
                        name_lossy: std::str::from_utf8(raw).is_err(),
                        name,
                        node: ino as u64,
                        file_type,
                    });
                }
            }
            pos += rec_len;
        }
        Ok(())
    }
}

enum XValue {
    Inline(Vec<u8>),
    Inode(u32, u32),
}

fn xattr_prefix(idx: u8) -> String {
    match idx {
        1 => "user.".into(),
        2 => "system.posix_acl_access".into(),
        3 => "system.posix_acl_default".into(),
        4 => "trusted.".into(),
        6 => "security.".into(),
        7 => "system.".into(),
        8 => "system.richacl".into(),
        n => format!("unknown{n}."),
    }
}

/// Entries start at `first` in `area`; value offsets are relative to `base` (the in-inode
/// region after its magic, or the xattr block).
fn parse_xattr_entries(
    area: &[u8],
    first: usize,
    base: &[u8],
    out: &mut Vec<(String, XValue)>,
    ino: u32,
) -> Result<()> {
    let bad = |s: String| Error::corrupt(FS, format!("inode {ino}: xattr {s}"));
    let mut p = first;
    while p + 4 <= area.len() && u32le(area, p) != 0 {
        if p + 16 > area.len() {
            return Err(bad("entry runs past its area".into()));
        }
        let name_len = area[p] as usize;
        let idx = area[p + 1];
        let voff = u16le(area, p + 2) as usize;
        let vinum = u32le(area, p + 4);
        let vsize = u32le(area, p + 8);
        if p + 16 + name_len > area.len() {
            return Err(bad("name runs past its area".into()));
        }
        let name = format!(
            "{}{}",
            xattr_prefix(idx),
            String::from_utf8_lossy(&area[p + 16..p + 16 + name_len])
        );
        let value = if vinum != 0 {
            XValue::Inode(vinum, vsize)
        } else {
            let end = voff
                .checked_add(vsize as usize)
                .filter(|&e| e <= base.len());
            match end {
                Some(end) => XValue::Inline(base[voff..end].to_vec()),
                None => {
                    return Err(bad(format!(
                        "{name}: value of {vsize} bytes at {voff} is outside its area"
                    )))
                }
            }
        };
        out.push((name, value));
        p += (16 + name_len + 3) & !3;
    }
    Ok(())
}

impl GuestFs for ExtFs {
    fn kind(&self) -> FsKind {
        self.kind
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn root(&self) -> NodeId {
        ROOT_INODE
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let inode = self.inode(dir)?;
        if inode.file_type() != FileType::Directory {
            return Err(Error::NotADirectory(format!("ext inode {dir}")));
        }
        if inode.flags() & FLAG_ENCRYPT != 0 {
            return Err(Error::unsupported(
                FS,
                format!("directory inode {dir} is encrypted (fscrypt); its names cannot be read"),
            ));
        }
        let mut out = Vec::new();
        if inode.flags() & FLAG_INLINE_DATA != 0 {
            // Inline directory: 4 bytes of parent inode, then entries in i_block and system.data.
            self.dir_entries_in(&inode.iblock()[4..], inode.ino, &mut out)?;
            let more = self.inline_tail(&inode)?;
            self.dir_entries_in(&more, inode.ino, &mut out)?;
            return Ok(out);
        }
        let size = inode.size();
        if size > MAX_DIR_BYTES {
            return Err(Error::corrupt(
                FS,
                format!("directory inode {dir} claims {size} bytes"),
            ));
        }
        let bs = self.block_size;
        let mut block = vec![0u8; bs as usize];
        let blocks = size.div_ceil(bs);
        let mut l = 0u64;
        while l < blocks {
            match self.map(&inode, l)? {
                // A hole with nothing mapped after it runs to u64::MAX: saturate, never wrap.
                Mapping::Zero(n) => l = l.saturating_add(n.max(1)),
                Mapping::Data(_, _) => {
                    // The last block can be partial (a size not a multiple of the block size):
                    // parse only what was read, not the previous block's tail.
                    let got = self.read_data(&inode, size, &mut block, l * bs)?;
                    self.dir_entries_in(&block[..got], inode.ino, &mut out)?;
                    l += 1;
                }
            }
        }
        Ok(out)
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let i = self.inode(node)?;
        let r = &i.raw;
        let mut blocks = u32le(r, 28) as u64;
        if self.huge_file {
            blocks |= (u16le(r, 116) as u64) << 32;
        }
        let allocated = if i.flags() & FLAG_HUGE_FILE != 0 {
            blocks.saturating_mul(self.block_size)
        } else {
            blocks.saturating_mul(512)
        };
        let crtime = (128 + i.extra_isize() >= 152 && r.len() >= 152).then(|| i.time(144, 148));
        let xattrs = self
            .xattrs(&i)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "system.data")
            .collect();
        Ok(Metadata {
            node,
            file_type: i.file_type(),
            size: if i.file_type() == FileType::Directory {
                0
            } else {
                i.size()
            },
            allocated,
            mtime: Some(i.time(16, 136)),
            atime: Some(i.time(8, 140)),
            ctime: Some(i.time(12, 132)),
            btime: crtime,
            mode: Some(i.mode() as u32),
            uid: Some(u16le(r, 2) as u32 | (u16le(r, 120) as u32) << 16),
            gid: Some(u16le(r, 24) as u32 | (u16le(r, 122) as u32) << 16),
            windows_attributes: None,
            nlink: u16le(r, 26) as u32,
            streams: Vec::new(),
            xattrs,
        })
    }

    fn read_at(
        &self,
        node: NodeId,
        stream: Option<&str>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize> {
        let inode = self.inode(node)?;
        if let Some(name) = stream {
            let v = self
                .xattr_value(&inode, name)?
                .ok_or_else(|| Error::NotFound(format!("xattr {name} of inode {node}")))?;
            let n = clamp_read(v.len() as u64, buf, offset);
            buf[..n].copy_from_slice(&v[offset as usize..offset as usize + n]);
            return Ok(n);
        }
        match inode.file_type() {
            FileType::File => self.read_data(&inode, inode.size(), buf, offset),
            t => Err(Error::InvalidArgument(format!(
                "ext inode {node} is a {t:?}, not a regular file"
            ))),
        }
    }

    fn read_link(&self, node: NodeId) -> Result<LinkTarget> {
        let inode = self.inode(node)?;
        if inode.file_type() != FileType::Symlink {
            return Err(Error::InvalidArgument(format!(
                "ext inode {node} is not a symbolic link"
            )));
        }
        let size = inode.size();
        if size > 4096 {
            return Err(Error::corrupt(
                FS,
                format!("symlink inode {node} of {size} bytes"),
            ));
        }
        let fast = size < 60 && inode.flags() & (FLAG_EXTENTS | FLAG_INLINE_DATA) == 0;
        let data = if fast {
            inode.iblock()[..size as usize].to_vec()
        } else {
            let mut d = vec![0u8; size as usize];
            let n = self.read_data(&inode, size, &mut d, 0)?;
            d.truncate(n);
            d
        };
        Ok(LinkTarget {
            target: String::from_utf8_lossy(&data).into_owned(),
            detail: None,
        })
    }
}
