//! The index: blob id -> (pack, offset, lengths).
//!
//! On disk: index files (`index/<id>`, sealed JSON, [`IndexFile`]), each listing the blobs of
//! some packs. A backup writes one for the packs it wrote; prune writes one that lists
//! everything still in use and `supersedes` the older ones. Index files are a cache of the pack
//! trailers: losing one loses no data ([`crate::pack::read_pack_trailer`] rebuilds it).
//!
//! In memory: [`Index`], one sorted `Vec` of fixed 56-byte records (id, pack number, offset,
//! lengths, flags) plus the list of pack ids. A `HashMap<String, …>` would cost several times
//! that per entry; at 1 MiB chunks a 4 TiB repository has 4 M entries, ~220 MiB here. Entries
//! added during a backup go to a small sorted tail that is merged in when it grows, so lookups
//! stay two binary searches.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::crypto::Id;
use crate::pack::{BlobEntry, BlobKind};

/// The content of one index file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IndexFile {
    pub packs: Vec<IndexPack>,
    /// Index files this one replaces (prune): readers may ignore them, deleters delete them
    /// only after this file is stored.
    #[serde(default)]
    pub supersedes: Vec<Id>,
}

/// One pack's blobs in an index file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexPack {
    pub id: Id,
    pub blobs: Vec<BlobEntry>,
}

/// Where a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: Id,
    pub kind: BlobKind,
    pub compressed: bool,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl Location {
    /// The pack entry of blob `id` at this location.
    pub fn entry(&self, id: Id) -> BlobEntry {
        BlobEntry {
            id,
            kind: self.kind,
            compressed: self.compressed,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
        }
    }
}

const FLAG_TREE: u8 = 1;
const FLAG_COMPRESSED: u8 = 2;

/// 32 + 8 + 4 + 4 + 4 + 1 = 53 bytes, 56 with alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    id: [u8; 32],
    offset: u64,
    pack: u32,
    stored_len: u32,
    raw_len: u32,
    flags: u8,
}

impl Entry {
    fn same_place(&self, other: &Entry) -> bool {
        self.id == other.id && self.pack == other.pack && self.offset == other.offset
    }
}

/// The in-memory index: every blob of every indexed pack.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Sorted by id.
    entries: Vec<Entry>,
    /// Recent inserts, sorted by id; merged into `entries` when large.
    tail: Vec<Entry>,
    packs: Vec<Id>,
    pack_numbers: HashMap<Id, u32>,
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// An index of all blobs in `files` (duplicates tolerated).
    pub fn from_files<'a>(files: impl IntoIterator<Item = &'a IndexFile>) -> Index {
        let mut ix = Index::new();
        for f in files {
            for p in &f.packs {
                ix.push_unsorted(p.id, &p.blobs);
            }
        }
        ix.finalize();
        ix
    }

    fn pack_number(&mut self, pack: Id) -> u32 {
        if let Some(&n) = self.pack_numbers.get(&pack) {
            return n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(pack);
        self.pack_numbers.insert(pack, n);
        n
    }

    fn record(&mut self, pack: Id, blobs: &[BlobEntry]) -> Vec<Entry> {
        let pack_no = self.pack_number(pack);
        blobs
            .iter()
            .map(|b| Entry {
                id: b.id.0,
                offset: b.offset,
                pack: pack_no,
                stored_len: b.stored_len,
                raw_len: b.raw_len,
                flags: if b.kind == BlobKind::Tree {
                    FLAG_TREE
                } else {
                    0
                } | if b.compressed { FLAG_COMPRESSED } else { 0 },
            })
            .collect()
    }

    /// Bulk loading: append without keeping order; [`Index::finalize`] must follow.
    fn push_unsorted(&mut self, pack: Id, blobs: &[BlobEntry]) {
        let new = self.record(pack, blobs);
        self.entries.extend(new);
    }

    /// Bulk loading: add an index file's blobs without sorting; call [`Index::finalize`] after
    /// the last one (lookups are wrong until then).
    pub fn add_file_unsorted(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.push_unsorted(p.id, &p.blobs);
        }
    }

    /// Add a pack's blobs (e.g. a pack the running backup just stored). Lookups see them at once.
    pub fn insert_pack(&mut self, pack: Id, blobs: &[BlobEntry]) {
        let new = self.record(pack, blobs);
        self.tail.extend(new);
        self.tail.sort_unstable_by_key(|e| e.id);
        // Merge when the tail is a sizeable fraction of the table: amortised O(1) per entry, and
        // the tail's binary search stays cheap.
        if self.tail.len() > 8192.max(self.entries.len() / 8) {
            self.finalize();
        }
    }

    /// Add every pack of an index file.
    pub fn insert_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.push_unsorted(p.id, &p.blobs);
        }
        self.finalize();
    }

    /// Merge the tail, sort, and drop exact duplicates (the same blob of the same pack listed by
    /// two index files). Copies of a blob in different packs are all kept.
    pub fn finalize(&mut self) {
        self.entries.append(&mut self.tail);
        self.entries.sort_unstable_by(|a, b| {
            a.id.cmp(&b.id)
                .then(a.pack.cmp(&b.pack))
                .then(a.offset.cmp(&b.offset))
        });
        self.entries.dedup_by(|a, b| a.same_place(b));
        // Give back spare capacity only when it is large: merges happen repeatedly during a
        // backup, and shrinking each time would reallocate each time.
        if self.entries.capacity() > self.entries.len() + self.entries.len() / 4 + 1024 {
            self.entries.shrink_to_fit();
        }
    }

    fn location(&self, e: &Entry) -> Location {
        Location {
            pack: self.packs[e.pack as usize],
            kind: if e.flags & FLAG_TREE != 0 {
                BlobKind::Tree
            } else {
                BlobKind::Data
            },
            compressed: e.flags & FLAG_COMPRESSED != 0,
            offset: e.offset,
            stored_len: e.stored_len,
            raw_len: e.raw_len,
        }
    }

    fn find(&self, id: &Id) -> Option<&Entry> {
        for table in [&self.entries, &self.tail] {
            if let Ok(i) = table.binary_search_by(|e| e.id.cmp(&id.0)) {
                return Some(&table[i]);
            }
        }
        None
    }

    /// Where blob `id` is (any copy, if several packs hold it).
    pub fn lookup(&self, id: &Id) -> Option<Location> {
        self.find(id).map(|e| self.location(e))
    }

    /// Every location of blob `id` (several when packs overlap, e.g. after an interrupted prune).
    pub fn lookup_all(&self, id: &Id) -> Vec<Location> {
        let mut out = Vec::new();
        for table in [&self.entries, &self.tail] {
            let start = table.partition_point(|e| e.id < id.0);
            out.extend(
                table[start..]
                    .iter()
                    .take_while(|e| e.id == id.0)
                    .map(|e| self.location(e)),
            );
        }
        out
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.find(id).is_some()
    }

    /// Number of entries (copies counted separately).
    pub fn len(&self) -> usize {
        self.entries.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every pack that has (or had) entries.
    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    pub fn has_pack(&self, pack: &Id) -> bool {
        self.pack_numbers.contains_key(pack)
    }

    /// Every entry: the sorted table first, then the recent tail (sorted by id after
    /// [`Index::finalize`]).
    pub fn iter(&self) -> impl Iterator<Item = (Id, Location)> + '_ {
        self.entries
            .iter()
            .chain(self.tail.iter())
            .map(|e| (Id(e.id), self.location(e)))
    }

    /// The blobs of each pack, in pack order (for prune and check).
    pub fn blobs_by_pack(&self) -> HashMap<Id, Vec<BlobEntry>> {
        let mut out: HashMap<Id, Vec<BlobEntry>> = HashMap::new();
        for (id, loc) in self.iter() {
            out.entry(loc.pack).or_default().push(loc.entry(id));
        }
        for v in out.values_mut() {
            v.sort_by_key(|b| b.offset);
        }
        out
    }

    /// Keep only the entries of packs for which `keep` is true.
    pub fn retain_packs(&mut self, mut keep: impl FnMut(&Id) -> bool) {
        let keep_no: Vec<bool> = self.packs.iter().map(&mut keep).collect();
        self.entries.retain(|e| keep_no[e.pack as usize]);
        self.tail.retain(|e| keep_no[e.pack as usize]);
        let mut packs = Vec::new();
        let mut renumber = vec![u32::MAX; self.packs.len()];
        for (i, p) in self.packs.iter().enumerate() {
            if keep_no[i] {
                renumber[i] = packs.len() as u32;
                packs.push(*p);
            }
        }
        for e in self.entries.iter_mut().chain(self.tail.iter_mut()) {
            e.pack = renumber[e.pack as usize];
        }
        self.pack_numbers = packs
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i as u32))
            .collect();
        self.packs = packs;
    }

    /// The whole index as one index file (prune's replacement for all older ones).
    pub fn to_file(&self, supersedes: Vec<Id>) -> IndexFile {
        let mut by_pack = self.blobs_by_pack();
        let packs = self
            .packs
            .iter()
            .filter_map(|p| by_pack.remove(p).map(|blobs| IndexPack { id: *p, blobs }))
            .collect();
        IndexFile { packs, supersedes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u32, offset: u64) -> BlobEntry {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id[31] = 1;
        BlobEntry {
            id: Id(id),
            kind: if n.is_multiple_of(3) {
                BlobKind::Tree
            } else {
                BlobKind::Data
            },
            compressed: n.is_multiple_of(2),
            offset,
            stored_len: 100 + n,
            raw_len: 60 + n,
        }
    }

    #[test]
    fn entry_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn lookup_insert_finalize() {
        let p1 = Id([1; 32]);
        let p2 = Id([2; 32]);
        let mut ix = Index::new();
        let blobs1: Vec<_> = (0..10_000u32)
            .rev()
            .map(|n| blob(n * 2, u64::from(n) * 200))
            .collect();
        ix.insert_pack(p1, &blobs1);
        let blobs2: Vec<_> = (0..50u32)
            .map(|n| blob(n * 2 + 1, u64::from(n) * 200))
            .collect();
        ix.insert_pack(p2, &blobs2);
        assert_eq!(ix.len(), 10_050);
        for b in blobs1.iter().chain(&blobs2) {
            let loc = ix.lookup(&b.id).expect("indexed");
            assert_eq!(loc.entry(b.id), *b);
        }
        assert_eq!(ix.lookup(&blobs2[0].id).unwrap().pack, p2);
        assert!(!ix.contains(&Id([7; 32])));
        ix.finalize();
        assert!(ix.contains(&blobs2[49].id));
        let ids: Vec<Id> = ix.iter().map(|(id, _)| id).collect();
        assert!(ids.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(ix.packs(), &[p1, p2]);

        let by_pack = ix.blobs_by_pack();
        assert_eq!(by_pack[&p2], blobs2);
        ix.retain_packs(|p| *p == p2);
        assert_eq!(ix.len(), 50);
        assert_eq!(ix.packs(), &[p2]);
        assert_eq!(ix.lookup(&blobs2[3].id).unwrap().pack, p2);
        assert!(!ix.contains(&blobs1[0].id));
    }

    #[test]
    fn duplicates_are_tolerated() {
        let p1 = Id([1; 32]);
        let p2 = Id([2; 32]);
        let b = blob(5, 0);
        let f1 = IndexFile {
            packs: vec![IndexPack {
                id: p1,
                blobs: vec![b],
            }],
            supersedes: vec![],
        };
        let f2 = IndexFile {
            packs: vec![
                IndexPack {
                    id: p1,
                    blobs: vec![b],
                },
                IndexPack {
                    id: p2,
                    blobs: vec![b],
                },
            ],
            supersedes: vec![],
        };
        let ix = Index::from_files([&f1, &f2]);
        // Same pack twice collapses; another pack's copy stays.
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.lookup_all(&b.id).len(), 2);
        assert!(ix.lookup(&b.id).is_some());
    }

    #[test]
    fn index_file_json_round_trip() {
        let p1 = Id([1; 32]);
        let f = IndexFile {
            packs: vec![IndexPack {
                id: p1,
                blobs: vec![blob(3, 0), blob(4, 103)],
            }],
            supersedes: vec![Id([9; 32])],
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"kind\":\"tree\"") && json.contains("\"kind\":\"data\""));
        assert!(json.contains("\"stored_len\":103"));
        let back: IndexFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
        let ix = Index::from_files([&f]);
        assert_eq!(ix.to_file(vec![]).packs, f.packs);
        // `supersedes` is optional.
        let min: IndexFile = serde_json::from_str("{\"packs\":[]}").unwrap();
        assert!(min.supersedes.is_empty());
    }
}
